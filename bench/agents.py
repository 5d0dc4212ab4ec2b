"""Agent workload: concurrent agents with and without the kernel, under each scheduling policy.

The workload (deterministic): N agents, three of four "short" (three calls of 8-24 tokens) and
one of four "long" (three calls with heavy-tailed lengths, Pareto, 48-256 tokens). Every agent
shares one system prompt (tools and examples, ~300 tokens) and has a growing conversation:
each call sends the whole history plus a new user turn. Greedy decoding; answers end at the
model's end of turn or at max_tokens.

Arms, interleaved within each repeat, all on the same model file:
  direct - no kernel: agents share one ``llama_cpp.Llama`` behind a lock, as an agent framework
           would (its own prefix cache reuses the previous prompt's common prefix).
  fifo, rr, fair, spf - the aios kernel (continuous batching, KV reuse) with that policy.

    python bench/agents.py --agents 1 4 8 16 32 --repeats 1
Writes bench/results/agents.json and agents.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import markdown, percentile
from throughput import DirectClient

from aios.config import CoreConfig, KernelConfig
from aios.kernel import Kernel
from aios.llm.models import resolve_model
from aios.syscall import Completion, LLMCall, Message, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
POLICIES = ("fifo", "rr", "fair", "spf")

SYSTEM = """You are a helpful assistant inside an agent system. Be accurate and brief.
Tools you may mention (you cannot call them in this exercise):
- search(query: string): returns the top web results for a query.
- calculator(expression: string): evaluates an arithmetic expression exactly.
- notes.write(path: string, text: string): saves a note for later steps.
- notes.read(path: string): reads a note saved earlier.
Rules: answer the user's current step only; keep facts consistent with earlier steps;
when a step asks for a list, number the items; never invent tool results.
Example 1. User: What is 12 times 7? Assistant: Use calculator("12*7"): 84.
Example 2. User: Name a planet with rings. Assistant: Saturn.
Example 3. User: Plan a short trip to Paris. Assistant: 1. Book a train. 2. Visit the Louvre.
3. Walk along the Seine. 4. Eat at a small bistro.
Example 4. User: Summarize why the sky is blue. Assistant: Air molecules scatter blue
sunlight more than red light (Rayleigh scattering), so the sky looks blue."""

TOPICS = [
    "a vegetable garden",
    "a trip to the mountains",
    "learning the guitar",
    "a birthday party",
    "a small bakery",
    "a science fair project",
    "a reading club",
    "a bicycle repair",
]
SHORT_STEPS = [
    "In one short sentence, what is the first thing to do for {t}?",
    "Name one tool needed for {t}. One word.",
    "Is {t} easy or hard for a beginner? One word.",
]
LONG_STEPS = [
    "Write a detailed, numbered plan for {t}, with at least ten steps.",
    "Explain each step of your plan for {t} in more detail.",
    "Write a long story about someone doing {t}, using the plan.",
]


@dataclass(frozen=True)
class Script:
    kind: str  # "short" or "long"
    turns: tuple[tuple[str, int], ...]  # (user message, max_tokens)


def workload(n: int) -> list[Script]:
    """Agent i is the same in every run and for every N (its own random stream)."""
    scripts = []
    for i in range(n):
        rng = random.Random(1000 + i)
        topic = TOPICS[i % len(TOPICS)]
        if i % 4 == 3:
            lengths = [min(256, max(48, int(48 * rng.paretovariate(1.3)))) for _ in LONG_STEPS]
            turns = tuple((s.format(t=topic), m) for s, m in zip(LONG_STEPS, lengths, strict=True))
            scripts.append(Script("long", turns))
        else:
            turns = tuple((s.format(t=topic), rng.randint(8, 24)) for s in SHORT_STEPS)
            scripts.append(Script("short", turns))
    return scripts


@dataclass
class AgentRun:
    kind: str
    seconds: float
    tokens: int
    waits: list[float]


async def run_script(client: Any, script: Script) -> AgentRun:
    messages = [Message("system", SYSTEM)]
    waits, tokens = [], 0
    start = time.monotonic()
    for text, max_tokens in script.turns:
        messages.append(Message("user", text))
        call = LLMCall(messages=tuple(messages), params=SamplingParams(max_tokens=max_tokens))
        done: Completion = await client.llm(call)
        messages.append(Message("assistant", done.text))
        waits.append(done.timings.waited)
        tokens += done.usage.completion_tokens
    return AgentRun(script.kind, time.monotonic() - start, tokens, waits)


# -- arms ----------------------------------------------------------------------------------------
async def arm_direct(scripts: list[Script], model_path: Path, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama

    llama = await asyncio.to_thread(
        Llama, str(model_path), n_ctx=8192, n_batch=512, n_threads=threads, verbose=False
    )
    lock = asyncio.Lock()
    try:
        start = time.monotonic()
        runs = await asyncio.gather(*(run_script(DirectClient(llama, lock), s) for s in scripts))
        return metrics(runs, time.monotonic() - start)
    finally:
        llama.close()


async def arm_kernel(
    scripts: list[Script], model: str, policy: str, slots: int, threads: int
) -> dict[str, Any]:
    from aios.sdk.local import LocalClient

    core = CoreConfig(
        name="bench",
        model=model,
        slots=slots,
        cache_slots=32,  # idle agents' KV stays resident for 32 agents; the rest is parked
        threads=threads,
    )
    async with Kernel(KernelConfig(cores=(core,), policy=policy)) as kernel:

        async def one(script: Script) -> AgentRun:
            process = kernel.register(script.kind)
            try:
                return await run_script(LocalClient(kernel, process), script)
            finally:
                kernel.release(process)

        start = time.monotonic()
        runs = await asyncio.gather(*(one(s) for s in scripts))
        result = metrics(runs, time.monotonic() - start)
        stats = kernel.cores["bench"].stats
        result.update(
            prefix_hit_rate=stats.prefix_hit_rate,
            prefill_saved=stats.prefill_saved,
            preemptions=stats.preemptions,
            busy_s=stats.busy_seconds,
            steps=stats.steps,
            prefill_tokens=stats.prefill_tokens,
            decode_tokens=stats.decode_tokens,
            parked=stats.parked,
        )
        return result


# -- metrics -------------------------------------------------------------------------------------
def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one gets everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if values else 1.0


def metrics(runs: list[AgentRun], wall: float) -> dict[str, Any]:
    seconds = [r.seconds for r in runs]
    short = [r.seconds for r in runs if r.kind == "short"] or seconds
    waits = [w for r in runs for w in r.waits]
    tokens = sum(r.tokens for r in runs)
    return {
        "wall_s": wall,
        "agents_per_min": 60 * len(runs) / wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "mean_s": statistics.fmean(seconds),
        "p50_s": percentile(seconds, 0.5),
        "p95_s": percentile(seconds, 0.95),
        "p99_s": percentile(seconds, 0.99),
        "short_p99_s": percentile(short, 0.99),
        "wait_mean_s": statistics.fmean(waits),
        "wait_p95_s": percentile(waits, 0.95),
        # Per-agent service rate (output tokens per second of the agent's life).
        "jain": jain([r.tokens / r.seconds for r in runs]),
    }


# -- driver -------------------------------------------------------------------------------------
async def main(args: argparse.Namespace) -> dict[str, Any]:
    model_path = resolve_model(args.model)
    arms = ["direct", *args.policies]
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for n in args.agents:
            scripts = workload(n)
            shift = (rep + n) % len(arms)
            for arm in arms[shift:] + arms[:shift]:  # rotate the order: no arm always first
                if arm == "direct":
                    m = await arm_direct(scripts, model_path, args.threads)
                else:
                    m = await arm_kernel(scripts, args.model, arm, args.slots, args.threads)
                runs.append({"arm": arm, "n": n, "rep": rep, **m})
                print(
                    f"rep {rep} n={n:>2} {arm:>6}: {m['agents_per_min']:6.1f} agents/min "
                    f"{m['tokens_per_s']:6.1f} tok/s mean {m['mean_s']:6.1f}s "
                    f"p99 {m['p99_s']:6.1f}s short p99 {m['short_p99_s']:6.1f}s "
                    f"jain {m['jain']:.2f}"
                    + (
                        f" hit {m['prefix_hit_rate']:.0%} saved {m['prefill_saved']:.0%}"
                        f" preempt {m['preemptions']} busy {m['busy_s']:.1f}s"
                        f" steps {m['steps']} prefill {m['prefill_tokens']}"
                        f" decode {m['decode_tokens']} parked {m['parked']}"
                        if "prefill_saved" in m
                        else ""
                    ),
                    flush=True,
                )
    return summarize(runs, args, arms)


KEYS = (
    "agents_per_min",
    "tokens_per_s",
    "tokens",
    "mean_s",
    "p50_s",
    "p95_s",
    "p99_s",
    "short_p99_s",
    "wait_mean_s",
    "wait_p95_s",
    "jain",
)


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace, arms: list[str]) -> Any:
    rows = []
    for n in args.agents:
        for arm in arms:
            mine = [r for r in runs if r["arm"] == arm and r["n"] == n]
            row: dict[str, Any] = {"agents": n, "arm": arm}
            for key in (*KEYS, "prefix_hit_rate", "prefill_saved", "preemptions"):
                if key in mine[0]:
                    row[key] = statistics.median(r[key] for r in mine)
            rows.append(row)
        direct = next(r for r in rows if r["arm"] == "direct" and r["agents"] == n)
        for row in rows:
            if row["agents"] == n:
                row["x_direct"] = row["agents_per_min"] / direct["agents_per_min"]
    return {
        "benchmark": "agents",
        "command": "python bench/agents.py "
        + " ".join(
            [
                f"--agents {' '.join(map(str, args.agents))}",
                f"--repeats {args.repeats}",
                f"--slots {args.slots}",
                f"--policies {' '.join(args.policies)}",
            ]
        ),
        "model": args.model,
        "slots": args.slots,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "medians": rows,
        "runs": runs,
    }


COLUMNS = [
    ("agents", "agents", "{}"),
    ("arm", "arm", "{}"),
    ("agents/min", "agents_per_min", "{:.1f}"),
    ("x direct", "x_direct", "{:.2f}x"),
    ("tok/s", "tokens_per_s", "{:.1f}"),
    ("mean s", "mean_s", "{:.1f}"),
    ("p50 s", "p50_s", "{:.1f}"),
    ("p95 s", "p95_s", "{:.1f}"),
    ("p99 s", "p99_s", "{:.1f}"),
    ("short p99 s", "short_p99_s", "{:.1f}"),
    ("call wait s", "wait_mean_s", "{:.2f}"),
    ("Jain", "jain", "{:.2f}"),
    ("prefill saved", "prefill_saved", "{:.0%}"),
    ("pre-emptions", "preemptions", "{:.0f}"),
]


def table(result: dict[str, Any]) -> str:
    rows = [
        [fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS]
        for r in result["medians"]
    ]
    return markdown([c[0] for c in COLUMNS], rows)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["medians"]
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    ns = sorted({r["agents"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for key, ax, label in zip(
        ("agents_per_min", "mean_s", "short_p99_s"),
        axes,
        ("agents / min", "mean agent completion (s)", "p99 completion of short agents (s)"),
        strict=True,
    ):
        for arm in arms:
            ax.plot(
                ns,
                [next(r[key] for r in rows if r["arm"] == arm and r["agents"] == n) for n in ns],
                "o-",
                label=arm,
            )
        ax.set(xlabel="concurrent agents", ylabel=label)
        ax.set_xticks(ns)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"aios agent workload, {result['model']}, {result['slots']} running slots "
        f"({result['machine']}, {result['date']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--slots", type=int, default=8, help="running slots of the kernel's core")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(main(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "agents.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "agents.png")
    print(table(result))


if __name__ == "__main__":
    cli()
