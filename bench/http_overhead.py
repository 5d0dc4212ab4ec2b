"""HTTP overhead: what the server (API + kernel) adds to a syscall, on an INSTANT simulated core.

The core is aios.llm.sim's engine with a zero-time cost model (``time_scale=0``) and
one-token replies, so a call's latency is all overhead: HTTP, JSON, auth, the kernel's queue and
scheduler, the core's thread hop. No model runs; the core is simulated (labelled as such).

Arms, interleaved (order rotated per concurrency level and repeat), all on the same core config:
  kernel     - in-process ``Kernel.llm`` (no HTTP): the kernel's own cost.
  api        - ``POST /api/v1/llm/chat`` on ``aios serve`` in a separate process.
  openai     - ``POST /v1/chat/completions`` on the same server.
  api-httpx  - the api arm from one ``httpx.AsyncClient`` shared by all clients (one pool).
The api and openai arms use a lean load generator (one keep-alive HTTP/1.1 connection per
client, a few lines of asyncio streams) so that they measure the server: on 2 cores a client
library's own CPU competes with the server's, and httpx's pool costs grow with its connections
(the api-httpx arm shows what a client sees through it). Each level runs C concurrent clients,
each calling back to back for ``--seconds``. Reported per arm and level: latency p50/p99 (ms,
as the client sees it), sustained syscalls/s, and the p50 added over the in-process kernel (the
API's cost). Target: p50 added by API + kernel <= 3 ms (at 1 client, where nothing queues).

    python bench/http_overhead.py --clients 1 10 100 --seconds 5 --repeats 3
Writes bench/results/http_overhead.json and http_overhead.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import markdown, medians, percentile

from aios.config import CoreConfig, KernelConfig
from aios.kernel import Kernel
from aios.llm.sim import CostModel, SimulatedEngine
from aios.server.config import ServerConfig, Settings
from aios.server.main import BackgroundServer
from aios.syscall import LLMCall, Message, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("kernel", "api", "openai", "api-httpx")
MESSAGES = [{"role": "user", "content": "Say hi."}]
API = "/api/v1/llm/chat"
API_BODY: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 1}
OPENAI_BODY: dict[str, Any] = {**API_BODY, "model": "sim", "temperature": 0}


def core_config() -> CoreConfig:
    return CoreConfig(
        name="sim",
        model="simulated",
        slots=128,
        cache_slots=0,
        kv_unified=True,
        context_tokens=32768,
        max_sequence_tokens=256,
        batch_tokens=4096,
        kv_reuse=False,
        max_queue=100_000,
    )


def instant_engine(config: CoreConfig) -> SimulatedEngine:
    return SimulatedEngine(config, CostModel(time_scale=0.0), reply_tokens=(1, 1))


def settings(data_dir: str) -> Settings:
    limits = ServerConfig(
        port=0, data_dir=data_dir, max_inflight_per_agent=100_000, max_streams_per_agent=1000
    )
    return Settings(limits, KernelConfig(cores=(core_config(),)))


def serve_child(data_dir: str, conn: Any) -> None:
    """The server process: runs until its parent closes the pipe."""
    with BackgroundServer(settings(data_dir), engine_factory=instant_engine) as server:
        conn.send((server.url, server.admin_token))
        with contextlib.suppress(EOFError):
            conn.recv()


class Wire:
    """One keep-alive HTTP/1.1 connection that POSTs a fixed JSON body (a load generator that
    costs the client almost nothing; it reads Content-Length responses, as aios sends)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, url: str) -> Wire:
        parts = httpx.URL(url)
        return cls(*await asyncio.open_connection(parts.host, parts.port))

    @staticmethod
    def request(url: str, path: str, token: str, body: dict[str, Any]) -> bytes:
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {httpx.URL(url).host}\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        )
        return head.encode() + data

    async def post(self, request: bytes) -> None:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = head.split(b" ", 2)[1]
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        body = await self.reader.readexactly(length)
        if status != b"200":
            raise RuntimeError(f"HTTP {status.decode()}: {body[:200]!r}")

    def close(self) -> None:
        self.writer.close()


async def run_level(arm: str, clients: int, seconds: float, target: Any) -> dict[str, Any]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    if arm == "kernel":
        kernel: Kernel = target
        call = LLMCall(messages=(Message("user", "Say hi."),), params=SamplingParams(max_tokens=1))

        async def one() -> None:
            process = kernel.register("bench")
            while (start := time.perf_counter()) < deadline:
                await kernel.llm(process, call)
                latencies.append(time.perf_counter() - start)

    elif arm == "api-httpx":
        http: httpx.AsyncClient = target

        async def one() -> None:
            while (start := time.perf_counter()) < deadline:
                response = await http.post(API, json=API_BODY)
                if response.status_code != 200:
                    raise RuntimeError(f"{arm}: HTTP {response.status_code}: {response.text}")
                latencies.append(time.perf_counter() - start)

    else:
        url, token = target
        request = (
            Wire.request(url, API, token, API_BODY)
            if arm == "api"
            else Wire.request(url, "/v1/chat/completions", token, OPENAI_BODY)
        )

        async def one() -> None:
            wire = await Wire.open(url)
            try:
                while (start := time.perf_counter()) < deadline:
                    await wire.post(request)
                    latencies.append(time.perf_counter() - start)
            finally:
                wire.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    wall = time.perf_counter() - started
    return {
        "arm": arm,
        "clients": clients,
        "calls": len(latencies),
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 0.99),
        "syscalls_per_s": len(latencies) / wall,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    data_dir = tempfile.mkdtemp(prefix="aios-bench-")
    proc = ctx.Process(target=serve_child, args=(data_dir, child), daemon=True)
    proc.start()
    url, admin = parent.recv()
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {admin}"}) as c:
        token = (await c.post("/api/v1/agents", json={"name": "bench"})).json()["token"]
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    runs: list[dict[str, Any]] = []
    try:
        async with (
            Kernel(KernelConfig(cores=(core_config(),)), engine_factory=instant_engine) as kernel,
            httpx.AsyncClient(
                base_url=url, headers={"authorization": f"Bearer {token}"}, limits=limits
            ) as http,
        ):
            targets = {"kernel": kernel, "api-httpx": http}
            for arm in ARMS:  # warm-up (connections, imports, caches)
                await run_level(arm, 4, 0.5, targets.get(arm, (url, token)))
            for repeat in range(args.repeats):
                for i, clients in enumerate(args.clients):
                    shift = (repeat + i) % len(ARMS)
                    for arm in ARMS[shift:] + ARMS[:shift]:
                        target = targets.get(arm, (url, token))
                        result = await run_level(arm, clients, args.seconds, target)
                        result["repeat"] = repeat
                        runs.append(result)
                        print(
                            f"  {arm:7s} c={clients:<4d} p50 {result['p50_ms']:.2f} ms "
                            f"p99 {result['p99_ms']:.2f} ms {result['syscalls_per_s']:.0f}/s",
                            file=sys.stderr,
                        )
    finally:
        parent.close()
        proc.join(30)
    return {
        "benchmark": "http_overhead",
        "core": "SIMULATED instant core (CostModel time_scale=0, 1-token replies)",
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "seconds_per_level": args.seconds,
        "repeats": args.repeats,
        "runs": runs,
        "summary": summarize(runs, args.clients),
    }


def summarize(runs: list[dict[str, Any]], levels: list[int]) -> list[dict[str, Any]]:
    rows = []
    for clients in levels:
        keys = ("p50_ms", "p99_ms", "syscalls_per_s")
        med = {arm: medians(runs, keys, arm=arm, clients=clients) for arm in ARMS}
        for arm in ARMS:
            rows.append(
                {
                    "arm": arm,
                    "clients": clients,
                    **med[arm],
                    "p50_added_over_kernel_ms": med[arm]["p50_ms"] - med["kernel"]["p50_ms"],
                }
            )
    return rows


def table(result: dict[str, Any]) -> str:
    header = ["clients", "arm", "p50 ms", "p99 ms", "syscalls/s", "p50 added by HTTP ms"]
    rows = [
        [r["clients"], r["arm"], f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
         f"{r['syscalls_per_s']:.0f}", f"{r['p50_added_over_kernel_ms']:.2f}"]
        for r in result["summary"]
    ]  # fmt: skip
    return markdown(header, rows, "rl")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for arm in ARMS:
        rows = [r for r in result["summary"] if r["arm"] == arm]
        xs = [r["clients"] for r in rows]
        left.plot(xs, [r["p50_ms"] for r in rows], marker="o", label=f"{arm} p50")
        left.plot(xs, [r["p99_ms"] for r in rows], marker="x", linestyle="--", label=f"{arm} p99")
        right.plot(xs, [r["syscalls_per_s"] for r in rows], marker="o", label=arm)
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent clients")
        ax.legend(fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("latency ms")
    right.set_ylabel("syscalls/s")
    fig.suptitle("aios syscall overhead on an instant SIMULATED core")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "http_overhead.png")
    print(table(result))


if __name__ == "__main__":
    main()
