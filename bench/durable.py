"""What durable processes cost and how fast they come back (aios.durable, aios.journal).

Three parts, each comparing arms in one run, interleaved (a different order each round):

- ``instant``: syscalls/s of C concurrent agents on the instant SIMULATED core (CostModel
  time_scale=0, 1-token replies), each an LLM chat call or a ``storage.ls``, with the journal
  off (a plain in-process client) and on (each agent a durable process: every result is
  group-committed to the journal before the agent sees it). The kernel's own per-call work is
  all there is, so this is the journal's cost at its most visible.
- ``agents``: the agent workload of bench/agents.py (growing conversations, short and long
  agents) on the embedded model, policy fair, journal off vs on: agents/min and wall time.
- ``recovery``: N durable processes with 5 journalled syscalls each (4 LLM calls and a write)
  are left running in the database (the kernel stops as after a kill -9: rows running, leases
  held); a new kernel with the same kernel id starts, claims them and replays each to its live
  point. Reported: the time from entering the kernel to every process past its journal, and
  an empty kernel's start on the same machine for reference.

    python bench/durable.py --part instant --repeats 9
    python bench/durable.py --part agents --agents 8 --repeats 3
    python bench/durable.py --part recovery --processes 100 1000
Writes bench/results/durable-PART.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown, medians
from http_overhead import core_config, instant_engine

from aios.config import CoreConfig, DurableConfig, KernelConfig, StorageConfig
from aios.durable import ReplayClient
from aios.kernel import Kernel
from aios.sdk import Agent
from aios.sdk.llm import SyscallClient
from aios.sdk.local import LocalClient
from aios.syscall import LLMCall, Message, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("off", "journal")
CALL = LLMCall(messages=(Message("user", "Say hi."),), params=SamplingParams(max_tokens=1))


async def client_for(kernel: Kernel, arm: str, name: str) -> SyscallClient:
    """An agent's syscall client: plain, or a durable process's (journalled)."""
    if arm == "off":
        return LocalClient(kernel, kernel.register(name))
    assert kernel.durable is not None
    row = await kernel.durable.create(f"bench:{name}", name, "", None, frozenset())
    process = kernel.register(name, pid=row.id)
    return ReplayClient(
        kernel, process, kernel.journal, {}, seed=row.seed, started=row.created, lease=row.n
    )


def config(database: str, kernel_id: str = "bench", core: CoreConfig | None = None) -> KernelConfig:
    return KernelConfig(
        cores=(core or core_config(),),
        storage=StorageConfig(database=database),
        durable=DurableConfig(kernel_id=kernel_id),
        policy="fair",
    )


# -- instant ----------------------------------------------------------------------------------
async def instant_rate(arm: str, kind: str, clients: int, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        kernel = Kernel(config(str(Path(tmp) / "aios.db")), engine_factory=instant_engine)
        async with kernel:
            agents = [await client_for(kernel, arm, f"a{i}") for i in range(clients)]
            done = 0
            deadline = time.perf_counter() + seconds

            async def one(client: SyscallClient) -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    if kind == "llm":
                        await client.llm(CALL)
                    else:
                        await client.call("storage", "ls", {})
                    done += 1

            cpu, start = time.process_time(), time.perf_counter()
            await asyncio.gather(*(one(a) for a in agents))
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            commits, appended = kernel.journal.commits, kernel.journal.appended
    return {
        "arm": arm,
        "kind": kind,
        "per_s": done / wall,
        "cpu_us": 1e6 * cpu / done,
        "rows_per_commit": appended / commits if commits else 0.0,
    }


async def part_instant(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for repeat in range(args.repeats):
        for kind in ("llm", "storage"):
            for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
                run = await instant_rate(arm, kind, args.clients, args.seconds)
                runs.append({**run, "repeat": repeat})
                print(f"  {kind:8s} {arm:8s} {run['per_s']:8.0f}/s", file=sys.stderr)
    summary = {}
    for kind in ("llm", "storage"):
        base = medians(runs, ["per_s", "cpu_us"], arm="off", kind=kind)
        on = medians(runs, ["per_s", "cpu_us", "rows_per_commit"], arm="journal", kind=kind)
        summary[kind] = {
            "off_per_s": base["per_s"],
            "journal_per_s": on["per_s"],
            "cost": 1 - on["per_s"] / base["per_s"],
            "cpu_us_off": base["cpu_us"],
            "cpu_us_journal": on["cpu_us"],
            "rows_per_commit": on["rows_per_commit"],
        }
    return {"clients": args.clients, "seconds": args.seconds, "runs": runs, "summary": summary}


# -- agents (embedded model) ----------------------------------------------------------------
async def agents_arm(arm: str, n: int, model: str, threads: int) -> dict[str, Any]:
    from agents import metrics, run_script, workload

    core = CoreConfig(name="bench", model=model, slots=16, cache_slots=32, threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        async with Kernel(config(str(Path(tmp) / "aios.db"), core=core)) as kernel:
            scripts = workload(n)
            clients = [await client_for(kernel, arm, s.kind) for s in scripts]
            start = time.monotonic()
            runs = await asyncio.gather(
                *(run_script(c, s) for c, s in zip(clients, scripts, strict=True))
            )
            result = metrics(list(runs), time.monotonic() - start)
    return {"arm": arm, **result}


async def part_agents(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for repeat in range(args.repeats):
        for arm in ARMS if repeat % 2 == 0 else ARMS[::-1]:
            run = await agents_arm(arm, args.agents, args.model, args.threads)
            runs.append({**run, "repeat": repeat})
            print(f"  {arm:8s} {run['agents_per_min']:8.1f} agents/min", file=sys.stderr)
    base = medians(runs, ["agents_per_min", "wall_s"], arm="off")
    on = medians(runs, ["agents_per_min", "wall_s"], arm="journal")
    ratios = [
        a["agents_per_min"] / b["agents_per_min"]
        for a, b in zip(
            [r for r in runs if r["arm"] == "journal"],
            [r for r in runs if r["arm"] == "off"],
            strict=True,
        )
    ]
    summary = {
        "off_agents_per_min": base["agents_per_min"],
        "journal_agents_per_min": on["agents_per_min"],
        "median_ratio": statistics.median(ratios),
        "ratios": ratios,
    }
    return {"agents": args.agents, "model": args.model, "runs": runs, "summary": summary}


# -- recovery -----------------------------------------------------------------------------------
class Replayed(Agent):
    """Four LLM calls and a write, then it waits (its process stays running)."""

    name = "replayed"
    reached: asyncio.Queue[str] | None = None  # told when a run is past its journalled calls

    async def run(self, task: str) -> str:
        for i in range(4):
            await self.llm.chat([{"role": "user", "content": f"{task} step {i}"}], max_tokens=1)
        await self.storage.write(f"{task}.txt", "x")
        if Replayed.reached is not None:
            Replayed.reached.put_nowait(task)
        await asyncio.Event().wait()
        return "never"


async def recovery(n: int, database: str) -> dict[str, float]:
    # Leave n processes running with 5 journalled syscalls each.
    Replayed.reached = asyncio.Queue()
    async with Kernel(config(database), engine_factory=instant_engine) as first:
        for i in range(n):
            await first.spawn(Replayed, f"t{i}")
        for _ in range(n):
            await Replayed.reached.get()
    Replayed.reached = asyncio.Queue()
    start = time.perf_counter()
    async with Kernel(config(database), engine_factory=instant_engine) as again:
        started = time.perf_counter() - start
        for _ in range(n):
            await Replayed.reached.get()
        resumed = time.perf_counter() - start
        assert again.journal.appended == 0  # nothing ran live
    Replayed.reached = None
    return {"kernel_start_s": started, "recovered_s": resumed}


async def part_recovery(args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for repeat in range(args.repeats):
        for n in args.processes:
            with tempfile.TemporaryDirectory() as tmp:
                empty = await recovery(0, str(Path(tmp) / "empty.db"))
                run = await recovery(n, str(Path(tmp) / "aios.db"))
            runs.append(
                {"processes": n, "repeat": repeat, **run, "empty_start_s": empty["recovered_s"]}
            )
            print(f"  {n:5d} processes: {run['recovered_s']:.2f} s", file=sys.stderr)
    summary = {
        str(n): medians(runs, ["recovered_s", "kernel_start_s", "empty_start_s"], processes=n)
        for n in args.processes
    }
    return {"runs": runs, "summary": summary}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("instant", "agents", "recovery"), required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--agents", type=int, default=8)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--processes", type=int, nargs="+", default=[100, 1000])
    args = parser.parse_args()
    part = {"instant": part_instant, "agents": part_agents, "recovery": part_recovery}[args.part]
    result = asyncio.run(part(args))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"durable-{args.part}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    summary = result["summary"]
    rows = [[key, *(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value.values())]
            for key, value in summary.items() if isinstance(value, dict)]  # fmt: skip
    if rows:
        first = next(v for v in summary.values() if isinstance(v, dict))
        print(markdown(["", *first.keys()], rows))
    else:
        print(json.dumps(summary, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
