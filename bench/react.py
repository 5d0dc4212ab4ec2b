"""Tool-using agents on the embedded model: task success with and without tools.

Math (aios/agents/tasks.py MATH): the model alone ("Answer with the number only") against the
ReAct MathAgent, which must compute with the calculator tool. A task succeeds if the last
number in the answer equals the expected value. Files (FILES): the ReAct FileAgent must save
the text in its storage and read it back; success if the file holds exactly that text and the
answer contains it (the model alone cannot write files, so it has no arm there). Arms are
interleaved task by task on one kernel (SmolLM2-135M, greedy decoding: deterministic).

    python bench/react.py
Writes bench/results/react.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from common import markdown

from aios.agents.react import FileAgent, MathAgent, number_in
from aios.agents.tasks import FILES, MATH
from aios.config import CoreConfig, KernelConfig
from aios.kernel import Kernel
from aios.sdk.llm import LLM
from aios.sdk.local import LocalClient

RESULTS = Path(__file__).resolve().parent / "results"


async def main_async(model: str) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    config = KernelConfig(cores=(CoreConfig(name="default", model=model, slots=4),))
    async with Kernel(config) as kernel:
        for question, expected in MATH:
            process = kernel.register("plain")
            start = time.perf_counter()
            reply = await LLM(LocalClient(kernel, process)).chat(
                [{"role": "user", "content": f"{question} Answer with the number only."}],
                max_tokens=16,
            )
            got = number_in(reply.text)
            rows.append({"suite": "math", "arm": "model alone", "task": question,
                         "answer": reply.text.strip(), "ok": got == expected,
                         "seconds": time.perf_counter() - start, "tool_calls": 0})  # fmt: skip
            process = kernel.register("math")
            agent = MathAgent(LocalClient(kernel, process))
            start = time.perf_counter()
            answer = await agent.run(question)
            rows.append({"suite": "math", "arm": "ReAct + calculator", "task": question,
                         "answer": answer, "ok": number_in(answer) == expected,
                         "seconds": time.perf_counter() - start,
                         "tool_calls": calls_of(agent)})  # fmt: skip
        for i, (task, path, content) in enumerate(FILES):
            process = kernel.register("filer", owner=f"filer-{i}")  # its own namespace
            agent = FileAgent(LocalClient(kernel, process))
            start = time.perf_counter()
            answer = await agent.run(task)
            try:
                found = await kernel.resource(process, "storage", "read", {"path": path})
                stored = bytes(found["content"]).decode()
            except Exception:
                stored = None
            rows.append({"suite": "files", "arm": "ReAct + file tools", "task": task,
                         "answer": answer, "ok": stored == content and content in answer,
                         "seconds": time.perf_counter() - start,
                         "tool_calls": calls_of(agent)})  # fmt: skip
    summary = []
    for suite, arm in dict.fromkeys((r["suite"], r["arm"]) for r in rows):
        mine = [r for r in rows if r["suite"] == suite and r["arm"] == arm]
        summary.append({
            "suite": suite, "arm": arm, "tasks": len(mine),
            "succeeded": sum(r["ok"] for r in mine),
            "mean_seconds": sum(r["seconds"] for r in mine) / len(mine),
            "mean_tool_calls": sum(r["tool_calls"] for r in mine) / len(mine),
        })  # fmt: skip
    return {
        "benchmark": "react",
        "command": " ".join(["python", "bench/react.py", *sys.argv[1:]]),
        "model": model,
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "summary": summary,
        "rows": rows,
    }


def calls_of(agent: Any) -> int:
    return sum(len(step.get("calls", [])) for step in agent.trace)


def table(result: dict[str, Any]) -> str:
    header = ["suite", "arm", "succeeded", "mean s/task", "tool calls/task"]
    rows = [
        [s["suite"], s["arm"], f"{s['succeeded']}/{s['tasks']}", f"{s['mean_seconds']:.2f}",
         f"{s['mean_tool_calls']:.1f}"]
        for s in result["summary"]
    ]  # fmt: skip
    return markdown(header, rows, "ll")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(main_async(args.model))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "react.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
