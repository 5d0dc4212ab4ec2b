"""What tracing and metrics cost: syscalls/s of one kernel with tracing off, on without an
exporter, and on with an OTLP/HTTP exporter sending to a local sink (a separate process that
answers every export with 200 and keeps nothing: a collector that costs nothing).

Arms, interleaved (a different order each round), C concurrent clients each making syscalls
for S seconds, on the instant SIMULATED core (CostModel time_scale=0, 1-token replies), so
the kernel's own per-call work is all there is to measure:

- ``off``: no Tracing (the default); metrics are always on, so this is the base.
- ``on``: spans recorded by the SDK, exported nowhere (``[observability] tracing = true``).
- ``otlp``: spans batched to the sink over OTLP/HTTP (``otlp_endpoint``).

Workloads: ``llm`` (chat calls) and ``storage`` (``ls``: a real SQLite query each).

Reported per arm, medians over the rounds: syscalls/s, and the kernel process's CPU time per
syscall (all its threads; the OTLP child's own CPU is not in it: it runs on another core). On
a small VM the wall-clock rate swings by 20% between identical rounds; the CPU time per
syscall is the steadier measure of what tracing adds.

    python bench/tracing.py               # writes bench/results/tracing.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit import syscall_rate
from common import instant_result, markdown, medians
from http_overhead import core_config, instant_engine

from aios.config import KernelConfig, ObservabilityConfig, StorageConfig
from aios.kernel import Kernel

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("off", "on", "otlp")

SINK = """
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def observability(arm: str, sink: str) -> ObservabilityConfig:
    if arm == "off":
        return ObservabilityConfig(tracing=False)
    if arm == "on":
        return ObservabilityConfig(tracing=True)
    return ObservabilityConfig(otlp_endpoint=sink)


async def rate(arm: str, kind: str, clients: int, seconds: float, sink: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config = KernelConfig(
            cores=(core_config(),),
            storage=StorageConfig(database=str(Path(tmp) / "aios.db")),
            observability=observability(arm, sink),
        )
        kernel = Kernel(config, engine_factory=instant_engine)
        assert (kernel.tracing is None) == (arm == "off")
        async with kernel:
            cpu = time.process_time()
            per_s = await syscall_rate(kernel, kind, clients, seconds)
            cpu = time.process_time() - cpu
        # (leaving the kernel flushed the batched spans to the sink: not in the timing)
    return {
        "arm": arm,
        "kind": kind,
        "clients": clients,
        "per_s": per_s,
        "cpu_us": 1e6 * cpu / (per_s * seconds),  # the process's CPU per syscall, all threads
    }


@contextlib.contextmanager
def otlp_sink() -> Iterator[str]:
    """The sink's URL while it runs (its own process: it takes nothing from the kernel's)."""
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-c", SINK, str(port)])
    try:
        for _ in range(100):  # until it listens
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        sink.terminate()
        sink.wait()


async def main(args: argparse.Namespace, sink_url: str) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for kind in args.kinds:
            order = ARMS[repeat % 3 :] + ARMS[: repeat % 3]
            for arm in order:
                result = await rate(arm, kind, args.clients, args.seconds, sink_url)
                result["repeat"] = repeat
                runs.append(result)
                print(
                    f"  {kind:8s} {arm:5s} {result['per_s']:8.0f}/s {result['cpu_us']:6.0f} us",
                    file=sys.stderr,
                )
    summary: dict[str, Any] = {}
    for kind in args.kinds:
        base = medians(runs, ["per_s", "cpu_us"], arm="off", kind=kind)
        for arm in ARMS:
            m = medians(runs, ["per_s", "cpu_us"], arm=arm, kind=kind)
            summary[f"{kind}/{arm}"] = {
                **m,
                "cost": 1 - m["per_s"] / base["per_s"],  # throughput lost
                "cpu_cost": m["cpu_us"] / base["cpu_us"] - 1,  # CPU time added per syscall
            }
    return instant_result("tracing", args, runs, summary)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["llm", "storage"])
    parser.add_argument("--out", type=Path, default=RESULTS / "tracing.json")
    options = parser.parse_args()
    with otlp_sink() as url:
        result = asyncio.run(main(options, url))
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        (key, f"{v['per_s']:.0f}", f"{100 * v['cost']:+.1f}%", f"{v['cpu_us']:.0f}",
         f"{100 * v['cpu_cost']:+.1f}%")
        for key, v in result["summary"].items()
    ]  # fmt: skip
    header = ["workload/arm", "syscalls/s", "throughput cost", "CPU us/syscall", "CPU cost"]
    print(markdown(header, rows, "l"))
