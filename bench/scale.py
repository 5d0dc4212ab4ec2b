"""Scale: hundreds to thousands of concurrent agents on a SIMULATED core, with and without the
kernel.

No model runs here. Both arms run on the cost model of aios.llm.sim, calibrated on
SmolLM2-135M on the 2-core reference machine (bench/results/simulated_calibration.json, copied
into the results) and sped up by ``--time-scale`` (0.01: a machine 100x faster), so every number
and figure below is of a simulated core, labelled as such.

Workload (deterministic): N agents start at once. Each makes 2-4 LLM calls with a growing
conversation (one shared ~300-token system prompt, its own user turns, its earlier replies);
three of four are "short" (8-32 output tokens per call), one of four "long" (Pareto, 48-256).

Arms, interleaved (order rotated per size and repeat), each in its own process so that its peak
resident memory is its own:
  kernel-fifo, kernel-fair - agents make LLM syscalls to the aios kernel; its core runs a
      SimulatedEngine (--slots running, --cache-slots idle-KV slots, the hardware's KV cells).
  direct - no kernel: agents call SimulatedServer.generate (bench/naive_server.py) directly
      and concurrently, a naive continuously batching server with no admission control on the
      same simulated hardware.
      A call that fails with out-of-memory is retried after an exponential backoff with full
      jitter (as the AIOS paper describes agents doing), up to --max-attempts attempts.

Metrics, per arm (medians over repeats):
  completed agents: agents whose every call succeeded. failed syscalls: calls that ended in an
  error (direct: after their last attempt); an agent stops at its first failed call.
  retries, OOM errors: attempts repeated, and out-of-memory replies (every attempt counts).
  wall s; agents/min: completed agents per minute of wall time (at this time scale).
  overhead per syscall (p50, p99, ms): the call's wall time (from the agent's call to its
  return) minus the time the simulated hardware spent running steps inside that window, i.e.
  how long the call was in flight while the engine sat idle. A step runs for its modeled time
  at this time scale from the moment the engine gets the plan (SimStats.busy; the simulator's
  own bookkeeping hides inside it unless it takes longer). The rest is the kernel's own cost on
  the call: scheduling, postprocessing, thread hand-offs, tokenization, waiting for the GIL and
  whatever else runs on the event loop between steps; with a work-conserving scheduler of zero
  cost it would be 0. Queueing behind other agents' work is not overhead (the engine is busy
  then). Direct: the same, per attempt, against the server's steps. idle in flight: all calls'
  overhead over all calls' wall time.
  loop gap per step (p50, p99, ms): time between the end of one step and the start of the next
  when a sequence decoded in both (the driver had work ready): the per-step cost of the loop.
  gap / 1x step: the mean loop gap over the mean modeled step time of the calibrated machine
  (time_scale 1): the loop's cost relative to real steps. At --time-scale 0.01 the simulated
  steps are 100x shorter than real ones while the kernel's Python runs at its real speed, so
  the overhead per syscall and the idle share are those of a machine 100x faster than this one.
  RSS: peak resident memory of the arm's process (VmHWM), and at its start. Saved contexts
  (pre-empted or parked KV) are zero bytes of the modeled size kept as unmapped pages (see
  run_child), so RSS leaves them out; snapshots MB is their modeled peak, which a real kernel
  holds in RAM (up to --snapshot-ram-mb) or on disk on top of its RSS.

    python bench/scale.py --agents 100 500 2000 --repeats 1
Writes bench/results/scale.json and scale.png (and simulated_calibration.json) and prints a
Markdown table. Validate quickly with: python bench/scale.py --agents 20 50 --out /tmp/scale
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import percentile
from naive_server import SimulatedServer

from aios.config import CoreConfig, KernelConfig
from aios.errors import AIOSError
from aios.kernel import Kernel
from aios.llm.core import LLMCore
from aios.llm.engine import Engine
from aios.llm.sim import CostModel, OutOfMemory, SimStats, SimulatedEngine
from aios.syscall import LLMCall, Message, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("kernel-fifo", "kernel-fair", "direct")
REPLY_TOKENS = (8, 256)  # the simulated model's own reply lengths (max_tokens usually binds)
LABEL = "SIMULATED core"

SYSTEM = """You are one agent in a large multi-agent system that plans and carries out small
projects for its users. Be accurate, brief and consistent with your earlier answers.
Tools you may mention (you cannot call them in this exercise): search(query) returns the top
web results for a query; calculator(expression) evaluates arithmetic exactly;
notes.write(path, text) saves a note for later steps; notes.read(path) reads a saved note;
calendar.add(date, title) books a slot; email.send(to, subject, body) sends a message.
Rules: answer the current step only; number the items of any list; never invent tool results;
when a step depends on an earlier one, reuse what you said there; when you are unsure, say so
and propose how to find out. Example. User: Plan a short trip to Paris. Assistant: 1. Book a
train. 2. Visit the Louvre. 3. Walk along the Seine. 4. Eat at a small bistro. Example. User:
What is 12 times 7? Assistant: calculator("12*7") gives 84."""

TOPICS = (
    "a vegetable garden",
    "a trip to the mountains",
    "learning the guitar",
    "a birthday party",
    "a small bakery",
    "a science fair project",
    "a reading club",
    "a bicycle repair",
    "a neighbourhood cleanup",
    "a family budget",
)
STEPS = (
    "Agent {i} here. In a few sentences, what is the first thing to do for {t}?",
    "List the tools and materials needed for {t}.",
    "What could go wrong with {t}, and how do we prevent it?",
    "Summarize the plan for {t} in one paragraph for the user.",
)


@dataclass(frozen=True)
class Script:
    kind: str  # "short" or "long"
    turns: tuple[tuple[str, int], ...]  # (user message, max_tokens)


def workload(n: int) -> list[Script]:
    """Agent i is the same in every run and for every N (its own random stream)."""
    scripts = []
    for i in range(n):
        rng = random.Random(20261122 + i)
        kind = "long" if i % 4 == 3 else "short"
        turns = []
        for k in range(rng.randint(2, 4)):
            text = STEPS[k].format(i=i, t=TOPICS[(i * 7 + k) % len(TOPICS)])
            if kind == "long":
                max_tokens = min(256, max(48, int(48 * rng.paretovariate(1.3))))
            else:
                max_tokens = rng.randint(8, 32)
            turns.append((text, max_tokens))
        scripts.append(Script(kind, tuple(turns)))
    return scripts


@dataclass
class Tally:
    """What the agents of one run saw."""

    windows: list[tuple[float, float]] = field(default_factory=list)  # per attempt
    latencies: list[float] = field(default_factory=list)  # per successful call, retries included
    completed_agents: int = 0
    failed_syscalls: int = 0
    retries: int = 0
    oom_errors: int = 0
    tokens: int = 0
    errors: dict[str, int] = field(default_factory=dict)


Call = Callable[[list[Message], int], Awaitable[tuple[str, int]]]


async def run_agent(script: Script, call: Call, tally: Tally) -> None:
    """One agent: its turns in order; it stops at its first failed call."""
    messages = [Message("system", SYSTEM)]
    for text, max_tokens in script.turns:
        messages.append(Message("user", text))
        t0 = time.perf_counter()
        try:
            reply, tokens = await call(messages, max_tokens)
        except AIOSError as e:
            tally.failed_syscalls += 1
            tally.errors[e.code] = tally.errors.get(e.code, 0) + 1
            return
        tally.latencies.append(time.perf_counter() - t0)
        tally.tokens += tokens
        messages.append(Message("assistant", reply))
    tally.completed_agents += 1


# -- arms ---------------------------------------------------------------------------------------
async def arm_kernel(
    scripts: list[Script], policy: str, cost: CostModel, args: argparse.Namespace
) -> tuple[Tally, SimStats, dict[str, Any]]:
    engines: list[SimulatedEngine] = []

    def factory(cfg: CoreConfig) -> Engine:
        engine = SimulatedEngine(cfg, cost, reply_tokens=REPLY_TOKENS, record=True)
        engines.append(engine)
        return engine

    core = CoreConfig(
        name="sim",
        model="simulated",
        slots=args.slots,
        cache_slots=args.cache_slots,
        kv_unified=True,  # the simulated engine models one shared pool
        context_tokens=cost.kv_cells,
        max_sequence_tokens=4096,
        batch_tokens=512,
        max_queue=max(4096, 2 * len(scripts)),
        snapshot_ram_mb=args.snapshot_ram_mb,
    )
    config = KernelConfig(cores=(core,), policy=policy, syscall_timeout=args.syscall_timeout)
    tally = Tally()
    async with Kernel(config, engine_factory=factory) as kernel:

        async def one(script: Script) -> None:
            process = kernel.register(script.kind)

            async def call(messages: list[Message], max_tokens: int) -> tuple[str, int]:
                llm = LLMCall(
                    messages=tuple(messages), params=SamplingParams(max_tokens=max_tokens)
                )
                t0 = time.perf_counter()
                try:
                    done = await kernel.llm(process, llm)
                finally:
                    tally.windows.append((t0, time.perf_counter()))
                return done.text, done.usage.completion_tokens

            try:
                await run_agent(script, call, tally)
            finally:
                kernel.release(process)

        await asyncio.gather(*(one(s) for s in scripts))
        sim_core = kernel.cores["sim"]
        assert isinstance(sim_core, LLMCore)
        stats = sim_core.stats
        extra = {
            "preemptions": stats.preemptions,
            "prefill_saved": stats.prefill_saved,
            "snapshots_spilled": sim_core.snapshots.stats.spilled,
        }
    return tally, engines[0].stats, extra


async def arm_direct(
    scripts: list[Script], cost: CostModel, args: argparse.Namespace
) -> tuple[Tally, SimStats, dict[str, Any]]:
    tally = Tally()
    async with SimulatedServer(
        cost, batch_tokens=512, reply_tokens=REPLY_TOKENS, record=True
    ) as server:

        async def one(index: int, script: Script) -> None:
            rng = random.Random(7 + index)

            async def call(messages: list[Message], max_tokens: int) -> tuple[str, int]:
                for attempt in range(args.max_attempts):
                    t0 = time.perf_counter()
                    try:
                        done = await server.generate(messages, max_tokens)
                    except OutOfMemory:
                        tally.oom_errors += 1
                        if attempt + 1 == args.max_attempts:
                            raise
                        tally.retries += 1
                        # Exponential backoff with full jitter, in the simulated machine's time.
                        delay = min(args.backoff_cap, args.backoff * 2**attempt) * rng.random()
                        await asyncio.sleep(delay * cost.time_scale)
                        continue
                    finally:
                        tally.windows.append((t0, time.perf_counter()))
                    return done.text, done.completion_tokens
                raise AssertionError("unreachable")

            await run_agent(script, call, tally)

        await asyncio.gather(*(one(i, s) for i, s in enumerate(scripts)))
        extra = {"wasted_tokens": server.stats.wasted_tokens}
    return tally, server.stats, extra


# -- measures -----------------------------------------------------------------------------------
def idle_within(
    windows: list[tuple[float, float]], busy: list[tuple[float, float, bool]]
) -> list[float]:
    """For each window, its length minus the engine-busy time inside it (busy intervals are
    disjoint and in order: one thread runs the steps)."""
    starts = [b[0] for b in busy]
    cum = [0.0]
    for s, e, _ in busy:
        cum.append(cum[-1] + (e - s))

    def busy_until(t: float) -> float:
        i = bisect.bisect_right(starts, t) - 1
        if i < 0:
            return 0.0
        s, e, _ = busy[i]
        return cum[i] + max(0.0, min(t, e) - s)

    return [max(0.0, (b - a) - (busy_until(b) - busy_until(a))) for a, b in windows]


def loop_gaps(busy: list[tuple[float, float, bool]]) -> list[float]:
    return [nxt[0] - prev[1] for prev, nxt in itertools.pairwise(busy) if nxt[2]]


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB."""
    try:
        fields = dict(
            line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines()
        )
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux
        return peak, peak


async def run_one(arm: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    cost = CostModel.calibrated(args.time_scale)
    if args.kv_cells:
        cost = CostModel(kv_cells=args.kv_cells, time_scale=args.time_scale)
    scripts = workload(n)
    rss_start, _ = rss_mb()
    start = time.perf_counter()
    if arm == "direct":
        tally, stats, extra = await arm_direct(scripts, cost, args)
    else:
        tally, stats, extra = await arm_kernel(scripts, arm.removeprefix("kernel-"), cost, args)
    wall = time.perf_counter() - start
    _, rss_peak = rss_mb()
    overhead = idle_within(tally.windows, stats.busy)
    gaps = loop_gaps(stats.busy)
    busy = sum(e - s for s, e, _ in stats.busy)
    return {
        "agents": n,
        "calls": sum(len(s.turns) for s in scripts),
        "completed_agents": tally.completed_agents,
        "failed_syscalls": tally.failed_syscalls,
        "retries": tally.retries,
        "oom_errors": tally.oom_errors,
        "errors": tally.errors,
        "wall_s": wall,
        "agents_per_min": 60 * tally.completed_agents / wall,
        "tokens": tally.tokens,
        "latency_p50_s": percentile(tally.latencies, 0.5),
        "latency_p99_s": percentile(tally.latencies, 0.99),
        "overhead_p50_ms": 1000 * percentile(overhead, 0.5),
        "overhead_p99_ms": 1000 * percentile(overhead, 0.99),
        "overhead_mean_ms": 1000 * statistics.fmean(overhead) if overhead else float("nan"),
        # Of all the time calls were in flight, the share the engine sat idle.
        "overhead_share": sum(overhead) / max(1e-9, sum(b - a for a, b in tally.windows)),
        "loop_gap_p50_ms": 1000 * percentile(gaps, 0.5),
        "loop_gap_p99_ms": 1000 * percentile(gaps, 0.99),
        "loop_gap_mean_ms": 1000 * statistics.fmean(gaps) if gaps else float("nan"),
        # A step's modeled time on the calibrated machine (time_scale 1), and the loop's cost
        # relative to it: the kernel's per-step overhead at the calibrated machine's speed.
        "step_modeled_mean_ms": 1000 * stats.modeled_seconds / max(1, stats.steps),
        "gap_vs_calibrated_step": (statistics.fmean(gaps) if gaps else float("nan"))
        / max(1e-12, stats.modeled_seconds / max(1, stats.steps)),
        "steps": stats.steps,
        "engine_busy_fraction": busy / wall,
        "modeled_engine_s": stats.modeled_seconds,
        "prefill_tokens": stats.prefill_tokens,
        "decode_tokens": stats.decode_tokens,
        "peak_kv_cells": stats.peak_cells,
        "peak_snapshot_mb": stats.peak_snapshot_bytes / 2**20,
        "rss_start_mb": rss_start,
        "rss_peak_mb": rss_peak,
        **extra,
    }


def run_child(arm: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one arm in a fresh process (its own peak RSS, nothing left over from other arms)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", arm, str(n)]
    for key in CHILD_ARGS:
        command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    # Saved contexts are zero bytes of the modeled size. With a fixed mmap threshold, glibc
    # gives each its own fresh zero pages, which stay unmapped: neither the time to zero reused
    # heap memory nor its RSS (the simulator's artifacts, not the kernel's) is counted. The
    # modeled snapshot memory is reported on its own (snapshots MB).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{arm} n={n} failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


CHILD_ARGS = (
    "time_scale",
    "slots",
    "cache_slots",
    "kv_cells",
    "snapshot_ram_mb",
    "syscall_timeout",
    "max_attempts",
    "backoff",
    "backoff_cap",
)


# -- driver -------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for n in args.agents:
            shift = (rep + n) % len(args.arms)
            for arm in args.arms[shift:] + args.arms[:shift]:
                m = run_child(arm, n, args)
                runs.append({"arm": arm, "rep": rep, **m})
                print(
                    f"rep {rep} n={n:>4} {arm:>11}: {m['completed_agents']:>4}/{n} agents, "
                    f"{m['failed_syscalls']} failed, {m['retries']} retries, "
                    f"{m['oom_errors']} OOM, {m['wall_s']:.1f}s, "
                    f"{m['agents_per_min']:.0f} agents/min, overhead p50 "
                    f"{m['overhead_p50_ms']:.2f} ms p99 {m['overhead_p99_ms']:.2f} ms, "
                    f"RSS {m['rss_peak_mb']:.0f} MB",
                    flush=True,
                )
    return summarize(runs, args)


KEYS = (
    "completed_agents",
    "failed_syscalls",
    "retries",
    "oom_errors",
    "wall_s",
    "agents_per_min",
    "tokens",
    "latency_p50_s",
    "latency_p99_s",
    "overhead_p50_ms",
    "overhead_p99_ms",
    "overhead_mean_ms",
    "overhead_share",
    "loop_gap_p50_ms",
    "loop_gap_p99_ms",
    "loop_gap_mean_ms",
    "step_modeled_mean_ms",
    "gap_vs_calibrated_step",
    "steps",
    "engine_busy_fraction",
    "modeled_engine_s",
    "peak_kv_cells",
    "peak_snapshot_mb",
    "rss_start_mb",
    "rss_peak_mb",
    "preemptions",
    "prefill_saved",
    "wasted_tokens",
)


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    for n in args.agents:
        for arm in args.arms:
            mine = [r for r in runs if r["arm"] == arm and r["agents"] == n]
            row: dict[str, Any] = {"agents": n, "arm": arm}
            for key in KEYS:
                if key in mine[0]:
                    row[key] = statistics.median(r[key] for r in mine)
            rows.append(row)
    cost = CostModel.calibrated(args.time_scale)
    if args.kv_cells:
        cost = CostModel(kv_cells=args.kv_cells, time_scale=args.time_scale)
    return {
        "benchmark": "scale",
        "simulated": True,
        "note": f"{LABEL}: no model ran; every number comes from aios.llm.sim's cost model "
        f"at time_scale {args.time_scale:g} (a machine {1 / args.time_scale:g}x faster than the "
        "calibrated one). Kernel overhead and RSS are real measurements of the kernel process.",
        "command": "python bench/scale.py "
        + " ".join(
            [
                f"--agents {' '.join(map(str, args.agents))}",
                f"--repeats {args.repeats}",
                f"--arms {' '.join(args.arms)}",
                f"--time-scale {args.time_scale:g}",
                f"--slots {args.slots}",
                f"--cache-slots {args.cache_slots}",
            ]
            + ([f"--kv-cells {args.kv_cells}"] if args.kv_cells else [])
        ),
        "cost_model": cost.to_dict(),
        "settings": {key: getattr(args, key) for key in CHILD_ARGS},
        "reply_tokens": list(REPLY_TOKENS),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"),
        "medians": rows,
        "runs": runs,
    }


COLUMNS = [
    ("agents", "agents", "{}"),
    ("arm (simulated core)", "arm", "{}"),
    ("completed", "completed_agents", "{:.0f}"),
    ("failed syscalls", "failed_syscalls", "{:.0f}"),
    ("retries", "retries", "{:.0f}"),
    ("OOM errors", "oom_errors", "{:.0f}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("agents/min", "agents_per_min", "{:.0f}"),
    ("call p99 s", "latency_p99_s", "{:.2f}"),
    ("overhead p50 ms", "overhead_p50_ms", "{:.2f}"),
    ("overhead p99 ms", "overhead_p99_ms", "{:.2f}"),
    ("idle in flight", "overhead_share", "{:.0%}"),
    ("loop gap p50 ms", "loop_gap_p50_ms", "{:.2f}"),
    ("loop gap p99 ms", "loop_gap_p99_ms", "{:.2f}"),
    ("gap / 1x step", "gap_vs_calibrated_step", "{:.1%}"),
    ("engine busy", "engine_busy_fraction", "{:.0%}"),
    ("peak RSS MB", "rss_peak_mb", "{:.0f}"),
    ("snapshots MB", "peak_snapshot_mb", "{:.0f}"),
]


def table(result: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for r in result["medians"]:
        cells = [fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["medians"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    ns = sorted({r["agents"] for r in rows})

    def series(arm: str, key: str) -> list[float]:
        return [
            next(r.get(key, 0) for r in rows if r["arm"] == arm and r["agents"] == n) for n in ns
        ]

    fig, axes = plt.subplots(2, 2, figsize=(12, 8.4))
    (a, b), (c, d) = axes
    for i, arm in enumerate(arms):
        color = f"C{i}"
        a.plot(ns, series(arm, "agents_per_min"), "o-", color=color, label=arm)
        b.plot(ns, series(arm, "failed_syscalls"), "o-", color=color, label=f"{arm}: failed")
        if arm == "direct":
            b.plot(ns, series(arm, "oom_errors"), "s--", color=color, label="direct: OOM errors")
            b.plot(ns, series(arm, "retries"), "^:", color=color, label="direct: retries")
        c.plot(ns, series(arm, "overhead_p50_ms"), "o-", color=color, label=f"{arm} p50")
        c.plot(ns, series(arm, "overhead_p99_ms"), "^--", color=color, label=f"{arm} p99")
        d.plot(ns, series(arm, "rss_peak_mb"), "o-", color=color, label=f"{arm}: peak RSS")
        if any(series(arm, "peak_snapshot_mb")):
            d.plot(
                ns,
                series(arm, "peak_snapshot_mb"),
                "s--",
                color=color,
                label=f"{arm}: saved contexts (modeled, not in RSS)",
            )
    a.set(ylabel="completed agents / min (wall)", title=f"throughput, {LABEL}")
    b.set(ylabel="count", title=f"failed syscalls and OOM retries, {LABEL}")
    b.set_yscale("symlog")
    c.set(ylabel="ms per call", title=f"overhead per syscall (engine idle in call), {LABEL}")
    d.set(ylabel="MB", title=f"memory of the agents + kernel process, {LABEL}")
    for ax in (a, b, c, d):
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("concurrent agents")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"aios at scale on a {LABEL} (cost model calibrated on SmolLM2-135M, 2-core CPU; "
        f"time_scale {result['settings']['time_scale']:g}; no model ran) — {result['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--agents", type=int, nargs="+", default=[100, 500, 2000])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--time-scale", type=float, default=0.01, help="0.01: 100x the calibration")
    p.add_argument("--slots", type=int, default=16, help="running slots of the kernel's core")
    p.add_argument("--cache-slots", type=int, default=64, help="idle-KV slots of the core")
    p.add_argument("--kv-cells", type=int, default=0, help="KV cache size (0: calibrated)")
    p.add_argument(
        "--snapshot-ram-mb", type=int, default=8192, help="saved contexts kept in RAM, not spilled"
    )
    p.add_argument("--syscall-timeout", type=float, default=3600.0)
    p.add_argument("--max-attempts", type=int, default=8, help="direct: attempts per call")
    p.add_argument("--backoff", type=float, default=1.0, help="direct: first backoff (sim s)")
    p.add_argument("--backoff-cap", type=float, default=60.0, help="direct: longest (sim s)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", nargs=2, metavar=("ARM", "N"), help=argparse.SUPPRESS)
    return p


def cli() -> None:
    p = parser()
    args = p.parse_args()
    if args.max_attempts < 1 or not args.time_scale >= 0:
        p.error("--max-attempts must be >= 1 and --time-scale >= 0")
    if args.child:
        arm, n = args.child
        print(json.dumps(asyncio.run(run_one(arm, int(n), args))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    CostModel.calibrated().save(args.out / "simulated_calibration.json")
    result = main(args)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "scale.png")
    print(table(result))


if __name__ == "__main__":
    cli()
