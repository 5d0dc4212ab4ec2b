"""Two llama.cpp builds of the same version, same model, same prompts: does a build flag cost speed?

Each arm is a built llama-cpp-python wheel, unpacked once and put first on a child process's
``PYTHONPATH``; the child runs the aios kernel on SmolLM2 (greedy) and reports:
  prefill - prompt tokens/s of one ~40-token chat prompt (admission to first token)
  decode1 - decode tokens/s of one sequence (first token to finished, 128 tokens at most)
  decode8 - aggregate decode tokens/s of 8 sequences decoded together (64 tokens each)
Arms alternate (A B A B ...), each run in a fresh process; medians and the B/A ratios.

    python bench/builds.py --a OLD.whl --b NEW.whl --labels native native-no-amx --repeats 5
Writes bench/results/builds.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from common import markdown, medians

from aios.llm.cpu import AMX_FLAGS, CpuFacts

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
METRICS = ("prefill", "decode1", "decode8")

CHILD = r"""
import asyncio, json, llama_cpp
from aios.config import CoreConfig, KernelConfig
from aios.kernel import Kernel
from aios.llm.cpu import LibraryFacts
from aios.syscall import LLMCall, Message, SamplingParams

def call(text, n):
    return LLMCall(messages=(Message("user", text),), params=SamplingParams(max_tokens=n))

async def main():
    core = CoreConfig(name="m", slots=8, cache_slots=0, kv_reuse=False)
    async with Kernel(KernelConfig(cores=(core,))) as k:
        p = k.register("bench")
        await k.llm(p, call("Say hello.", 8))  # warm up
        one = await k.llm(p, call("Tell me a long story about a dragon and a knight.", 128))
        t = one.timings
        many = await asyncio.gather(*(
            k.llm(p, call(f"Write a long poem about the number {i}.", 64)) for i in range(8)
        ))
        first = min(c.timings.first_token for c in many)
        last = max(c.timings.finished for c in many)
        print(json.dumps({
            "prefill": one.usage.prompt_tokens / (t.first_token - t.admitted),
            "decode1": (one.usage.completion_tokens - 1) / (t.finished - t.first_token),
            "decode8": sum(c.usage.completion_tokens - 1 for c in many) / (last - first),
            "library": llama_cpp.__file__,
            "amx": LibraryFacts.of_module(llama_cpp).amx,
        }))

asyncio.run(main())
"""


def unpack(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(into)
    return into


def run_arm(path: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode:
        raise SystemExit(f"arm at {path} failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["library"].startswith(str(path)):
        raise SystemExit(f"the child loaded {result['library']}, not the arm's build in {path}")
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--a", type=Path, required=True, help="wheel of build A")
    ap.add_argument("--b", type=Path, required=True, help="wheel of build B")
    ap.add_argument("--labels", nargs=2, default=["A", "B"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        arms = {
            label: unpack(wheel, Path(tmp) / label)
            for label, wheel in zip(args.labels, (args.a, args.b), strict=True)
        }
        for repeat in range(args.repeats):
            for label, path in arms.items():
                result = run_arm(path)
                runs.append({"arm": label, "repeat": repeat, **result})
                print(label, {m: round(result[m], 1) for m in METRICS}, flush=True)
    a, b = args.labels
    med = {arm: medians(runs, METRICS, arm=arm) for arm in args.labels}
    rows = [
        (m, f"{med[a][m]:.1f}", f"{med[b][m]:.1f}", f"{med[b][m] / med[a][m]:.3f}") for m in METRICS
    ]
    table = markdown(["tokens/s (median)", a, b, f"{b}/{a}"], rows, "l")
    print(table)
    RESULTS.mkdir(exist_ok=True)
    host = CpuFacts.of_host()
    out = {
        "machine": host.model or platform.machine(),
        "cpu_advertises_amx": bool(host.flags & AMX_FLAGS),
        "arms": {label: str(w) for label, w in zip(args.labels, (args.a, args.b), strict=True)},
        "runs": runs,
        "medians": med,
        "table": table,
    }
    (RESULTS / "builds.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
