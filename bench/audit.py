"""How fast the audit writer drains, against how fast the kernel makes syscalls.

The audit queue is bounded by refusing new syscalls while the writer is ``max_pending`` records
behind (aios/audit.py). That policy is right only if the writer, in normal operation, drains
much faster than the kernel can produce records: this benchmark measures both, interleaved.

- ``writer``: N records recorded at once, then the time until all are written (records/s), on
  SQLite with ``synchronous`` FULL (the default) and NORMAL.
- ``kernel``: syscalls/s of one kernel (one audit record each) for C concurrent clients, on the
  instant SIMULATED core (LLM chat calls) and on storage ``ls`` calls (a real database query
  each), with the peak audit backlog seen during the run.

    python bench/audit.py                 # writes bench/results/audit.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import instant_result, markdown
from http_overhead import core_config, instant_engine

from aios.audit import AuditLog, Record
from aios.config import KernelConfig, StorageConfig
from aios.kernel import Kernel
from aios.storage.db import Database
from aios.storage.schema import migrate
from aios.syscall import LLMCall, Message, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"


async def writer_rate(records: int, synchronous: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        db = Database.open(str(Path(tmp) / "audit.db"), synchronous=synchronous)
        await db.start()
        await db.run(migrate)
        log = AuditLog(db)
        writer = asyncio.create_task(log.run())
        start = time.perf_counter()
        for i in range(records):
            log.record(Record(time.time(), "bench", f"p{i % 64}", "llm", "chat", "sim", "allowed",
                              "done"))  # fmt: skip
        await log.flush()
        seconds = time.perf_counter() - start
        writer.cancel()
        await db.close()
    return {"arm": f"writer-{synchronous}", "records": records, "per_s": records / seconds}


async def syscall_rate(kernel: Kernel, kind: str, clients: int, seconds: float) -> float:
    """Syscalls/s of a running kernel: ``clients`` back to back for ``seconds``, each an LLM
    chat call (``kind`` "llm") or a ``storage.ls`` (a real database query)."""
    call = LLMCall(messages=(Message("user", "Say hi."),), params=SamplingParams(max_tokens=1))
    done = 0
    deadline = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal done
        process = kernel.register("bench")
        while time.perf_counter() < deadline:
            if kind == "llm":
                await kernel.llm(process, call)
            else:
                await kernel.resource(process, "storage", "ls", {})
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return done / (time.perf_counter() - start)


async def kernel_rate(kind: str, clients: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config = KernelConfig(
            cores=(core_config(),), storage=StorageConfig(database=str(Path(tmp) / "aios.db"))
        )
        async with Kernel(config, engine_factory=instant_engine) as kernel:
            per_s = await syscall_rate(kernel, kind, clients, seconds)
            peak, written = kernel.audit.peak, kernel.audit.written
    return {
        "arm": f"kernel-{kind}",
        "clients": clients,
        "per_s": per_s,
        "peak_pending": peak,
        "written_during_run": written,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    arms = [
        lambda: writer_rate(args.records, "full"),
        lambda: writer_rate(args.records, "normal"),
        lambda: kernel_rate("llm", args.clients, args.seconds),
        lambda: kernel_rate("storage", args.clients, args.seconds),
    ]
    for repeat in range(args.repeats):
        shift = repeat % len(arms)
        for arm in arms[shift:] + arms[:shift]:  # interleaved, a different order each round
            result = await arm()
            result["repeat"] = repeat
            runs.append(result)
            print(f"  {result['arm']:16s} {result['per_s']:9.0f}/s", file=sys.stderr)
    names = sorted({r["arm"] for r in runs})
    summary: dict[str, Any] = {
        name: statistics.median(r["per_s"] for r in runs if r["arm"] == name) for name in names
    }
    slowest_writer = min(v for k, v in summary.items() if k.startswith("writer"))
    fastest_kernel = max(v for k, v in summary.items() if k.startswith("kernel"))
    summary["headroom"] = slowest_writer / fastest_kernel
    summary["peak_pending"] = max(r.get("peak_pending", 0) for r in runs)
    return instant_result("audit", args, runs, summary, records=args.records)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS / "audit.json")
    options = parser.parse_args()
    result = asyncio.run(main(options))
    options.out.write_text(json.dumps(result, indent=2) + "\n")
    s = result["summary"]
    print(markdown(["arm", "per second (median)"], [(k, f"{v:.0f}") for k, v in s.items()
                   if k.startswith(("writer", "kernel"))], "l"))  # fmt: skip
    print(f"headroom (slowest writer / fastest kernel): {s['headroom']:.1f}x; "
          f"peak backlog {s['peak_pending']} records")  # fmt: skip
