"""Remote relay: what the kernel's CPU pays per token it relays from a remote core.

With a GPU server (vLLM) doing the decoding, the kernel process only relays streams, so its
CPU per relayed token bounds how many tokens per second one kernel can serve. No GPU here, so
the remote is ``aios serve`` in another process on an INSTANT SIMULATED core (zero-time cost
model, fixed-length replies) speaking the OpenAI streaming API as vLLM does (one SSE event per
token); the kernel under test reaches it through a ``RemoteCoreConfig`` core.

Arms, interleaved per repeat: ``remote`` (the kernel relays the remote's SSE stream) and
``local`` (the same simulated engine inside the kernel process: the kernel's own per-token
cost, plus the simulated engine's). C agents call back to back for ``--seconds``; reported:
tokens/s relayed and the kernel process's CPU microseconds per token (medians of repeats).

    python bench/remote_relay.py --agents 8 32 --seconds 4 --repeats 3
Writes bench/results/remote_relay.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from common import markdown, medians
from http_overhead import core_config, settings

from aios.config import CoreConfig, KernelConfig, RemoteCoreConfig
from aios.kernel import Kernel
from aios.llm.sim import CostModel, SimulatedEngine
from aios.server.main import BackgroundServer
from aios.syscall import LLMCall, Message, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("remote", "local")
TOKENS = 128  # per reply
KEY_ENV = "AIOS_BENCH_RELAY_KEY"


def engine(config: CoreConfig) -> SimulatedEngine:
    return SimulatedEngine(config, CostModel(time_scale=0.0), reply_tokens=(TOKENS, TOKENS))


def serve_child(data_dir: str, conn: Any) -> None:
    """The remote: runs until its parent closes the pipe."""
    with BackgroundServer(settings(data_dir), engine_factory=engine) as server:
        conn.send((server.url, server.admin_token))
        with contextlib.suppress(EOFError):
            conn.recv()


def cpu_seconds() -> float:
    usage = os.times()
    return usage.user + usage.system


async def run_level(arm: str, agents: int, seconds: float, url: str) -> dict[str, Any]:
    if arm == "remote":
        core: CoreConfig | RemoteCoreConfig = RemoteCoreConfig(
            name="sim", base_url=f"{url}/v1", model="sim", api_key_env=KEY_ENV, max_inflight=256
        )
    else:
        core = core_config()
    call = LLMCall(messages=(Message("user", "Say hi."),), params=SamplingParams(max_tokens=TOKENS))
    tokens = 0
    async with Kernel(KernelConfig(cores=(core,)), engine_factory=engine) as kernel:
        await kernel.llm(kernel.register("warm-up"), call)
        deadline = time.perf_counter() + seconds

        async def one() -> None:
            nonlocal tokens
            process = kernel.register("relay")
            while time.perf_counter() < deadline:
                completion = await kernel.llm(process, call)  # (awaited before the +=)
                tokens += completion.usage.completion_tokens

        cpu, started = cpu_seconds(), time.perf_counter()
        await asyncio.gather(*(one() for _ in range(agents)))
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {
        "arm": arm,
        "agents": agents,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "cpu_us_per_token": 1e6 * cpu / tokens,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve_child, args=(tempfile.mkdtemp(prefix="aios-bench-"), child))
    proc.daemon = True
    proc.start()
    url, admin = parent.recv()
    async with httpx.AsyncClient(base_url=url, headers={"authorization": f"Bearer {admin}"}) as c:
        os.environ[KEY_ENV] = (await c.post("/api/v1/agents", json={"name": "relay"})).json()[
            "token"
        ]
    runs: list[dict[str, Any]] = []
    try:
        for repeat in range(args.repeats):
            for i, agents in enumerate(args.agents):
                order = ARMS if (repeat + i) % 2 == 0 else ARMS[::-1]
                for arm in order:
                    result = {**await run_level(arm, agents, args.seconds, url), "repeat": repeat}
                    runs.append(result)
                    print(
                        f"  {arm:6s} agents={agents:<4d} {result['tokens_per_s']:7.0f} tok/s "
                        f"{result['cpu_us_per_token']:6.1f} us CPU/token",
                        file=sys.stderr,
                    )
    finally:
        parent.close()
        proc.join(30)
    keys = ("tokens_per_s", "cpu_us_per_token")
    summary = [
        {"arm": arm, "agents": agents, **medians(runs, keys, arm=arm, agents=agents)}
        for agents in args.agents
        for arm in ARMS
    ]
    return {
        "benchmark": "remote_relay",
        "remote": "aios serve on an INSTANT SIMULATED core (OpenAI SSE, one event per token)",
        "tokens_per_reply": TOKENS,
        "machine": f"{platform.machine()}, {mp.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        "seconds_per_level": args.seconds,
        "repeats": args.repeats,
        "runs": runs,
        "summary": summary,
    }


def table(result: dict[str, Any]) -> str:
    header = ["agents", "arm", "tokens/s", "kernel CPU us/token"]
    rows = [
        [r["agents"], r["arm"], f"{r['tokens_per_s']:.0f}", f"{r['cpu_us_per_token']:.0f}"]
        for r in result["summary"]
    ]
    return markdown(header, rows, "rl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "remote_relay.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
