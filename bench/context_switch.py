"""Cost of a context switch on the embedded core: snapshot and restore vs re-prefill.

For each context length, one sequence of that many tokens is prefilled (the cost a kernel
without snapshots pays to bring a pre-empted sequence back), then saved with
``llama_state_seq_get_data`` (time and size) and restored into another slot with
``llama_state_seq_set_data``, in RAM and through a file (the spill path). Lengths are
interleaved within each repeat; medians are reported.

    python bench/context_switch.py --lengths 128 256 512 1024 2048 --repeats 5
Writes bench/results/context_switch.json and .png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import markdown

from aios.config import CoreConfig
from aios.context import SnapshotStore
from aios.llm.engine import BatchItem, SeqRestore, SeqSave, SeqStart, StepPlan
from aios.llm.llamacpp import LlamaCppEngine
from aios.syscall import SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = (
    "The lighthouse keeper climbed the stairs every evening to light the lamp, counting the "
    "steps and watching the ships that passed through the narrow channel below. "
)


def measure(engine: LlamaCppEngine, tokens: list[int], spill: Path) -> dict[str, float]:
    batch = engine.max_sequence_tokens
    ram, disk = SnapshotStore(2**31), SnapshotStore(0, spill)
    t0 = time.perf_counter()
    engine.step(StepPlan(starts=[SeqStart(0, SamplingParams())]), ram)
    for start in range(0, len(tokens), 512):  # the core's batch budget
        chunk = tokens[start : start + 512]
        last = start + len(chunk) == len(tokens)
        engine.step(StepPlan(items=[BatchItem(0, chunk, start, last)]), ram)
    prefill = time.perf_counter() - t0
    assert batch >= len(tokens)

    t0 = time.perf_counter()
    data = engine.save_seq(0)
    save = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.load_seq(1, data)
    restore = time.perf_counter() - t0
    engine.step(StepPlan(releases=[1]), ram)

    t0 = time.perf_counter()  # the spill path: save to a file, restore from it
    engine.step(StepPlan(saves=[SeqSave(0, "k")]), disk)
    save_disk = time.perf_counter() - t0
    t0 = time.perf_counter()
    engine.step(StepPlan(restores=[SeqRestore(2, "k")]), disk)
    restore_disk = time.perf_counter() - t0
    engine.step(StepPlan(releases=[2]), disk)
    disk.close()
    return {
        "prefill_s": prefill,
        "save_s": save,
        "restore_s": restore,
        "save_disk_s": save_disk,
        "restore_disk_s": restore_disk,
        "bytes": float(len(data)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()

    config = CoreConfig(name="bench", model=args.model, slots=4, cache_slots=0, context_tokens=8192)
    engine = LlamaCppEngine(config)
    base = engine.tokenize(TEXT * 200)
    raw: dict[int, list[dict[str, float]]] = {n: [] for n in args.lengths}
    with tempfile.TemporaryDirectory(prefix="aios-bench-kv-") as tmp:
        measure(engine, base[:64], Path(tmp))  # warm-up
        for _ in range(args.repeats):
            for n in args.lengths:
                raw[n].append(measure(engine, base[:n], Path(tmp)))
    engine.close()

    rows = []
    for n in args.lengths:
        med = {k: statistics.median(r[k] for r in raw[n]) for k in raw[n][0]}
        rows.append(
            {
                "tokens": n,
                **med,
                "mb": med["bytes"] / 2**20,
                "restore_vs_prefill": med["prefill_s"] / med["restore_s"],
                "restore_disk_vs_prefill": med["prefill_s"] / med["restore_disk_s"],
            }
        )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "benchmark": "context_switch",
        "command": "python bench/context_switch.py "
        + " ".join([f"--lengths {' '.join(map(str, args.lengths))}", f"--repeats {args.repeats}"]),
        "model": args.model,
        "machine": {"python": platform.python_version(), "cpu": platform.processor()},
        "rows": rows,
        "raw": {str(n): raw[n] for n in args.lengths},
    }
    (RESULTS / "context_switch.json").write_text(json.dumps(out, indent=2))
    print(table(rows))
    plot(rows, RESULTS / "context_switch.png")


def table(rows: list[dict[str, Any]]) -> str:
    header = ["tokens", "snapshot MB", "save ms", "restore ms", "save+restore via disk ms",
              "re-prefill ms", "re-prefill / restore"]  # fmt: skip
    cells = [
        [r["tokens"], f"{r['mb']:.1f}", f"{1e3 * r['save_s']:.1f}", f"{1e3 * r['restore_s']:.1f}",
         f"{1e3 * (r['save_disk_s'] + r['restore_disk_s']):.1f}", f"{1e3 * r['prefill_s']:.0f}",
         f"{r['restore_vs_prefill']:.0f}x"]
        for r in rows
    ]  # fmt: skip
    return markdown(header, cells)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [1e3 * r["prefill_s"] for r in rows], "o-", label="re-prefill")
    ax.plot(x, [1e3 * r["restore_s"] for r in rows], "o-", label="restore (RAM)")
    ax.plot(x, [1e3 * r["save_s"] for r in rows], "o-", label="save (RAM)")
    disk = [1e3 * (r["save_disk_s"] + r["restore_disk_s"]) for r in rows]
    ax.plot(x, disk, "o--", label="save + restore (disk)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms (median)")
    ax.set_title("Context switch vs re-prefill (SmolLM2-135M, CPU)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
