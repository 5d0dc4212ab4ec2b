"""Cost of engine isolation: the embedded model in-process vs in a child process of its own.

Arms, interleaved within each repeat (same model, prompts, greedy sampling, one core each):
  inprocess - ``LlamaCppEngine`` on the core's thread (``isolate = false``).
  isolated  - the same engine behind ``IsolatedEngine``: each step is pickled over a socket to
              a child process and its sampled tokens come back (``isolate = true``, default).

Workloads: N concurrent greedy chat calls of ``--tokens`` output tokens each (EOS ignored,
KV reuse off so every run does the same work), measured on the core: per-step time (the core's
busy time / steps) and wall time; and the round trip of a tiny plan (one release, no model
work), which is the isolation overhead alone. Also the start time of a fresh isolated engine
(child interpreter + model load + the parent's vocabulary: the core's recovery time after a
crash), next to an in-process load, and the time for a real crash (llama.cpp's grammar abort) to
reach the parent as ``EngineCrashed``.

    python bench/isolation.py --calls 1 8 --tokens 64 --repeats 5
Writes bench/results/isolation.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from common import markdown, medians

from aios.config import CoreConfig
from aios.context import SnapshotStore
from aios.errors import EngineCrashed
from aios.kernel import llamacpp_engine
from aios.llm.core import LLMCore, standalone
from aios.llm.engine import BatchItem, SeqStart, StepPlan
from aios.llm.isolated import IsolatedEngine
from aios.llm.llamacpp import LlamaCppEngine
from aios.scheduler import FIFO
from aios.syscall import LLMCall, Message, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("inprocess", "isolated")
PROMPTS = [
    "Tell me a story about a lighthouse keeper.",
    "Describe a walk through a forest in autumn.",
    "Explain how bread is made.",
    "Write about a journey across the sea.",
    "Describe a busy market in the morning.",
    "Tell me about a robot learning to paint.",
    "Write about a city in the rain.",
    "Describe a mountain village in winter.",
]


def config(arm: str, model: str, slots: int) -> CoreConfig:
    return CoreConfig(
        name=arm, model=model, slots=slots, cache_slots=0, kv_reuse=False, isolate=arm == "isolated"
    )


def running(cfg: CoreConfig) -> contextlib.AbstractAsyncContextManager[LLMCore]:
    return standalone(LLMCore(cfg, lambda: llamacpp_engine(cfg), FIFO()))


async def workload(core: LLMCore, calls: int, tokens: int) -> dict[str, float]:
    """``calls`` concurrent greedy chat calls of ``tokens`` tokens; per-step time on the core."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    steps, busy = core.stats.steps, core.stats.busy_seconds
    t0 = time.perf_counter()
    requests = [
        core.submit(
            f"agent{i}", LLMCall(messages=(Message("user", PROMPTS[i % 8]),), params=params)
        )
        for i in range(calls)
    ]
    await asyncio.gather(*(r.future for r in requests))
    wall = time.perf_counter() - t0
    n_steps = core.stats.steps - steps
    return {
        "wall_s": wall,
        "steps": n_steps,
        "step_ms": 1e3 * (core.stats.busy_seconds - busy) / n_steps,
        "tokens_per_s": calls * tokens / wall,
    }


async def roundtrip(core: LLMCore, n: int) -> dict[str, float]:
    """Median time of ``n`` steps of a tiny plan (one release: no model work), run on the
    core's own thread (queued behind any step it is still running)."""
    engine, store = core.engine, SnapshotStore(0)

    def steps() -> list[float]:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            engine.step(StepPlan(releases=[0]), store)
            times.append(time.perf_counter() - t0)
        return times

    times = await asyncio.get_running_loop().run_in_executor(core._thread, steps)
    return {"roundtrip_us": 1e6 * statistics.median(times)}


def start_times(model: str, n: int) -> dict[str, float]:
    """Fresh isolated engines (what a crash costs the core) and in-process loads."""
    isolated, child, inprocess = [], [], []
    cfg = config("isolated", model, 8)
    for _ in range(n):
        t0 = time.perf_counter()
        engine = llamacpp_engine(cfg)  # the parent's vocabulary, then the child
        isolated.append(time.perf_counter() - t0)
        assert isinstance(engine, IsolatedEngine)
        child.append(engine.start_seconds)
        engine.close()
        t0 = time.perf_counter()
        LlamaCppEngine(config("inprocess", model, 8)).close()
        inprocess.append(time.perf_counter() - t0)
    return {
        "isolated_start_s": statistics.median(isolated),
        "child_start_s": statistics.median(child),
        "inprocess_load_s": statistics.median(inprocess),
    }


def crash_time(model: str) -> dict[str, Any]:
    """How long llama.cpp's grammar abort takes to reach the parent as EngineCrashed."""
    engine = llamacpp_engine(config("isolated", model, 2))
    assert isinstance(engine, IsolatedEngine)
    params = SamplingParams(json=True)
    object.__setattr__(params, "temperature", 1e-40)  # past the validation that prevents it
    prompt = engine.tokenize_chat([Message("user", "Give me a JSON object.")])
    plan = StepPlan(starts=[SeqStart(0, params)], items=[BatchItem(0, prompt, 0, True)])
    t0 = time.perf_counter()
    try:
        for _ in range(16):  # it aborts within the first few tokens
            sampled = engine.step(plan, SnapshotStore(0))
            token, pos = sampled[0].token, plan.items[0].pos + len(plan.items[0].tokens)
            plan = StepPlan(items=[BatchItem(0, [token], pos, True)])
    except EngineCrashed as e:
        return {"crash_to_error_s": time.perf_counter() - t0, "crash": str(e)}
    finally:
        engine.close()
    raise AssertionError("the grammar abort did not happen")


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    slots = max(args.calls)
    async with (
        running(config("inprocess", args.model, slots)) as a,
        running(config("isolated", args.model, slots)) as b,
    ):
        cores = {"inprocess": a, "isolated": b}
        for core in cores.values():  # warm-up
            await workload(core, 1, 8)
        for repeat in range(args.repeats):
            for calls in args.calls:
                for arm in ARMS:
                    result = await workload(cores[arm], calls, args.tokens)
                    runs.append({"arm": arm, "calls": calls, "repeat": repeat, **result})
            for arm in ARMS:
                trip = await roundtrip(cores[arm], args.roundtrips)
                runs.append({"arm": arm, "calls": 0, "repeat": repeat, **trip})
    return {"runs": runs}


def summarize(runs: list[dict[str, Any]], levels: list[int]) -> list[dict[str, Any]]:
    rows = []
    for calls in levels:
        keys = ["step_ms", "wall_s", "tokens_per_s"]
        a, b = (medians(runs, keys, arm=arm, calls=calls) for arm in ARMS)
        rows.append(
            {
                "calls": calls,
                "inprocess_step_ms": a["step_ms"],
                "isolated_step_ms": b["step_ms"],
                "step_ratio": b["step_ms"] / a["step_ms"],
                "inprocess_tokens_per_s": a["tokens_per_s"],
                "isolated_tokens_per_s": b["tokens_per_s"],
                "throughput_ratio": b["tokens_per_s"] / a["tokens_per_s"],
            }
        )
    return rows


def table(rows: list[dict[str, Any]], trip: dict[str, float], start: dict[str, float]) -> str:
    header = ["calls", "in-process ms/step", "isolated ms/step", "step ratio",
              "in-process tok/s", "isolated tok/s"]  # fmt: skip
    cells = [
        [r["calls"], f"{r['inprocess_step_ms']:.2f}", f"{r['isolated_step_ms']:.2f}",
         f"{r['step_ratio']:.3f}", f"{r['inprocess_tokens_per_s']:.1f}",
         f"{r['isolated_tokens_per_s']:.1f}"]
        for r in rows
    ]  # fmt: skip
    lines = [
        markdown(header, cells),
        "",
        f"tiny-plan round trip: in-process {trip['inprocess']:.1f} us, "
        f"isolated {trip['isolated']:.1f} us",
        f"fresh isolated engine (recovery): {start['isolated_start_s']:.2f} s "
        f"(child {start['child_start_s']:.2f} s); "
        f"in-process load {start['inprocess_load_s']:.2f} s",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--roundtrips", type=int, default=500)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    measured = asyncio.run(measure(args))
    runs = measured["runs"]
    rows = summarize(runs, args.calls)
    trip = {arm: medians(runs, ["roundtrip_us"], arm=arm, calls=0)["roundtrip_us"] for arm in ARMS}
    start = start_times(args.model, args.starts)
    crash = crash_time(args.model)
    out = {
        "benchmark": "isolation",
        "command": "python bench/isolation.py "
        + " ".join(
            [
                f"--calls {' '.join(map(str, args.calls))}",
                f"--tokens {args.tokens}",
                f"--repeats {args.repeats}",
                f"--roundtrips {args.roundtrips}",
                f"--starts {args.starts}",
            ]
        ),
        "model": args.model,
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor(),
            "cpus": os.cpu_count(),
        },
        "rows": rows,
        "roundtrip_us": trip,
        "start": start,
        "crash": crash,
        "raw": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "isolation.json").write_text(json.dumps(out, indent=2))
    print(table(rows, trip, start))
    print(f"grammar abort to EngineCrashed: {crash['crash_to_error_s']:.2f} s")


if __name__ == "__main__":
    main()
