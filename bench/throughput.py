"""Throughput of concurrent agents: without a kernel, through the aios kernel, and the limit.

Arms, interleaved within each repeat (same model file, prompts and greedy sampling):
  direct  - what agents do without a kernel: they share one ``llama_cpp.Llama`` behind a lock
            (one request at a time, as an agent framework would) and call it directly.
  kernel  - the same agents through the aios kernel (FIFO, continuous batching).
  limit   - raw multi-sequence decode tokens/s of the model at batch size N with no kernel
            (one llama_batch of N sequences per step), against the kernel's decode rate for
            the same N sequences (``kernel_decode``).

    python bench/throughput.py --agents 1 4 8 16 --repeats 2
Writes bench/results/throughput.json and throughput.png and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from common import medians

from aios.agents import get_agent, tasks_for
from aios.config import CoreConfig, KernelConfig
from aios.kernel import Kernel
from aios.llm.llamacpp import apply_chat_template
from aios.llm.models import resolve_model
from aios.syscall import Completion, LLMCall, Message, SamplingParams, Timings, Usage

RESULTS = Path(__file__).resolve().parent / "results"
DECODE_PROMPT = "Tell me a long story about a dragon and a knight."


# -- direct arm: a shared Llama behind a lock ---------------------------------------------------
class DirectClient:
    """An agent framework's own concurrency: every agent calls the same Llama object, one at a
    time behind a lock, in a worker thread."""

    def __init__(self, llama: Any, lock: asyncio.Lock) -> None:
        self.llama, self.lock = llama, lock
        self.template = llama.metadata["tokenizer.chat_template"].encode()

    async def llm(self, call: LLMCall, *, timeout: float | None = None) -> Completion:
        import llama_cpp

        p = call.params
        # The same prompt bytes as the kernel's (llama.cpp's renderer of the GGUF template), so
        # both arms decode the same tokens; Llama's own Jinja path adds a system prompt.
        prompt = apply_chat_template(llama_cpp, self.template, call.messages)
        assert prompt is not None
        t0 = time.monotonic()
        async with self.lock:
            t1 = time.monotonic()
            out = await asyncio.to_thread(
                self.llama.create_completion,
                prompt=prompt.decode(),
                max_tokens=p.max_tokens,
                temperature=0.0,
                repeat_penalty=1.0,
                stop=list(p.stop) or None,
            )
        usage = out["usage"]
        return Completion(
            text=out["choices"][0]["text"],
            finish_reason="length" if out["choices"][0]["finish_reason"] == "length" else "stop",
            usage=Usage(usage["prompt_tokens"], usage["completion_tokens"]),
            timings=Timings(submitted=t0, admitted=t1, finished=time.monotonic()),
            model="direct",
            syscall_id="direct",
        )


async def run_agents(n: int, agent_name: str, client_for: Any) -> dict[str, Any]:
    cls = get_agent(agent_name)
    tasks = tasks_for(cls, n)
    turnaround: list[float] = []
    tokens = 0

    async def one(task: str) -> None:
        nonlocal tokens
        client = client_for()
        counted = _Counting(client)
        t = time.monotonic()
        await cls(counted).run(task)
        turnaround.append(time.monotonic() - t)
        tokens += counted.tokens

    start = time.monotonic()
    await asyncio.gather(*(one(t) for t in tasks))
    wall = time.monotonic() - start
    return _agent_metrics(n, wall, tokens, turnaround)


class _Counting:
    def __init__(self, inner: Any) -> None:
        self.inner, self.tokens = inner, 0

    async def llm(self, call: LLMCall, *, timeout: float | None = None) -> Completion:
        c: Completion = await self.inner.llm(call, timeout=timeout)
        self.tokens += c.usage.completion_tokens
        return c


def _agent_metrics(n: int, wall: float, tokens: int, turnaround: list[float]) -> dict[str, Any]:
    ordered = sorted(turnaround)
    return {
        "wall_s": wall,
        "agents_per_min": 60 * n / wall,
        "tokens_per_s": tokens / wall,
        "tokens": tokens,
        "turnaround_mean_s": statistics.fmean(ordered),
        "turnaround_p95_s": ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))],
    }


async def arm_direct(n: int, agent: str, model_path: Path, threads: int) -> dict[str, Any]:
    from llama_cpp import Llama

    llama = await asyncio.to_thread(
        Llama, str(model_path), n_ctx=4096, n_batch=512, n_threads=threads, verbose=False
    )
    lock = asyncio.Lock()
    try:
        return await run_agents(n, agent, lambda: DirectClient(llama, lock))
    finally:
        llama.close()


async def arm_kernel(n: int, agent: str, model: str, slots: int) -> dict[str, Any]:
    from aios.sdk.local import LocalClient

    config = KernelConfig(cores=(CoreConfig(name="bench", model=model, slots=slots),))
    async with Kernel(config) as kernel:
        return await run_agents(n, agent, lambda: LocalClient(kernel, kernel.register(agent)))


# -- decode rate: kernel vs raw llama.cpp -------------------------------------------------------
async def kernel_decode(n: int, model: str, steps: int) -> float:
    """Decode tokens/s of N sequences through the kernel, measured from the moment every
    sequence has its first token until the last one finishes."""
    config = KernelConfig(cores=(CoreConfig(name="bench", model=model, slots=max(n, 1)),))
    call = LLMCall(
        messages=(Message("user", DECODE_PROMPT),),
        params=SamplingParams(max_tokens=steps + 1, ignore_eos=True),
    )
    async with Kernel(config) as kernel:
        proc = kernel.register("decode")
        done = await asyncio.gather(*(kernel.llm(proc, call) for _ in range(n)))
    first = max(c.timings.first_token or 0.0 for c in done)
    last = max(c.timings.finished or 0.0 for c in done)
    return n * steps / (last - first)


def limit_decode(n: int, model: str, steps: int, threads: int) -> float:
    """Raw llama.cpp: N sequences, one llama_batch of N tokens per step, greedy sampling."""
    import llama_cpp as lc

    from aios.llm.llamacpp import LlamaCppEngine  # for tokenization with the chat template

    engine = LlamaCppEngine(CoreConfig(name="limit", model=model, slots=max(n, 1), threads=threads))
    ctx = engine._ctx
    prompt = engine.tokenize_chat([Message("user", DECODE_PROMPT)])
    batch = lc.llama_batch_init(max(512, n * len(prompt)), 0, 1)
    samplers = [lc.llama_sampler_init_greedy() for _ in range(n)]
    try:

        def fill(items: list[tuple[int, list[int], int]]) -> list[int]:
            k, outs = 0, []
            for seq, toks, pos in items:
                for j, t in enumerate(toks):
                    batch.token[k], batch.pos[k], batch.n_seq_id[k] = t, pos + j, 1
                    batch.seq_id[k][0], batch.logits[k] = seq, 0
                    k += 1
                batch.logits[k - 1] = 1
                outs.append(k - 1)
            batch.n_tokens = k
            return outs

        outs = fill([(s, prompt, 0) for s in range(n)])
        assert lc.llama_decode(ctx, batch) == 0
        last = [lc.llama_sampler_sample(samplers[s], ctx, outs[s]) for s in range(n)]
        start = time.perf_counter()
        for step in range(steps):
            outs = fill([(s, [last[s]], len(prompt) + step) for s in range(n)])
            assert lc.llama_decode(ctx, batch) == 0
            last = [lc.llama_sampler_sample(samplers[s], ctx, outs[s]) for s in range(n)]
        return n * steps / (time.perf_counter() - start)
    finally:
        for s in samplers:
            lc.llama_sampler_free(s)
        lc.llama_batch_free(batch)
        engine.close()


# -- driver -------------------------------------------------------------------------------------
async def main(args: argparse.Namespace) -> dict[str, Any]:
    model_path = resolve_model(args.model)
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for n in args.agents:
            order = ["direct", "kernel"] if (rep + n) % 2 == 0 else ["kernel", "direct"]
            for arm in order:
                if arm == "direct":
                    m = await arm_direct(n, args.agent, model_path, args.threads)
                else:
                    m = await arm_kernel(n, args.agent, args.model, args.slots)
                runs.append({"arm": arm, "n": n, "rep": rep, **m})
                print(
                    f"rep {rep} n={n:>2} {arm:>6}: {m['agents_per_min']:.1f} agents/min, "
                    f"{m['tokens_per_s']:.1f} tok/s, mean turnaround {m['turnaround_mean_s']:.2f}s",
                    flush=True,
                )
            for arm in ["limit", "kernel_decode"] if rep % 2 == 0 else ["kernel_decode", "limit"]:
                if arm == "limit":
                    rate = await asyncio.to_thread(
                        limit_decode, n, args.model, args.decode_steps, args.threads
                    )
                else:
                    rate = await kernel_decode(n, args.model, args.decode_steps)
                runs.append({"arm": arm, "n": n, "rep": rep, "decode_tokens_per_s": rate})
                print(f"rep {rep} n={n:>2} {arm:>13}: {rate:.1f} decode tok/s", flush=True)
    return summarize(runs, args)


def summarize(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    def med(arm: str, n: int, key: str) -> float:
        return medians(runs, [key], arm=arm, n=n)[key]

    rows = []
    for n in args.agents:
        row: dict[str, Any] = {"agents": n}
        for arm in ("direct", "kernel"):
            for key in ("agents_per_min", "tokens_per_s", "turnaround_mean_s", "turnaround_p95_s"):
                row[f"{arm}_{key}"] = med(arm, n, key)
        row["limit_decode_tokens_per_s"] = med("limit", n, "decode_tokens_per_s")
        row["kernel_decode_tokens_per_s"] = med("kernel_decode", n, "decode_tokens_per_s")
        row["kernel_over_direct"] = row["kernel_agents_per_min"] / row["direct_agents_per_min"]
        row["kernel_decode_over_limit"] = (
            row["kernel_decode_tokens_per_s"] / row["limit_decode_tokens_per_s"]
        )
        rows.append(row)
    return {
        "benchmark": "throughput",
        "command": "python bench/throughput.py "
        + " ".join(
            [
                f"--agents {' '.join(map(str, args.agents))}",
                f"--repeats {args.repeats}",
                f"--agent {args.agent}",
                f"--decode-steps {args.decode_steps}",
            ]
        ),
        "model": args.model,
        "agent": args.agent,
        "slots": args.slots,
        "threads": args.threads,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "medians": rows,
        "runs": runs,
    }


COLUMNS = [
    ("agents", "agents", "{}"),
    ("direct agents/min", "direct_agents_per_min", "{:.1f}"),
    ("kernel agents/min", "kernel_agents_per_min", "{:.1f}"),
    ("kernel/direct", "kernel_over_direct", "{:.2f}x"),
    ("direct tok/s", "direct_tokens_per_s", "{:.1f}"),
    ("kernel tok/s", "kernel_tokens_per_s", "{:.1f}"),
    ("direct mean s", "direct_turnaround_mean_s", "{:.1f}"),
    ("direct p95 s", "direct_turnaround_p95_s", "{:.1f}"),
    ("kernel mean s", "kernel_turnaround_mean_s", "{:.1f}"),
    ("kernel p95 s", "kernel_turnaround_p95_s", "{:.1f}"),
    ("limit decode tok/s", "limit_decode_tokens_per_s", "{:.1f}"),
    ("kernel decode tok/s", "kernel_decode_tokens_per_s", "{:.1f}"),
    ("kernel/limit", "kernel_decode_over_limit", "{:.0%}"),
]


def table(result: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "---:|" * len(COLUMNS)]
    for r in result["medians"]:
        lines.append("| " + " | ".join(fmt.format(r[key]) for _, key, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["medians"]
    ns = [r["agents"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(
        ns, [r["direct_agents_per_min"] for r in rows], "o-", label="direct (shared Llama + lock)"
    )
    a.plot(
        ns, [r["kernel_agents_per_min"] for r in rows], "o-", label="aios kernel (FIFO, batching)"
    )
    a.set(
        xlabel="concurrent agents",
        ylabel="agents / min",
        title=f"{result['agent']} agents, {result['model']}",
    )
    b.plot(
        ns, [r["limit_decode_tokens_per_s"] for r in rows], "o-", label="limit: raw llama.cpp batch"
    )
    b.plot(ns, [r["kernel_decode_tokens_per_s"] for r in rows], "o-", label="aios kernel")
    b.set(
        xlabel="sequences decoded together",
        ylabel="decode tokens / s",
        title="decode rate vs limit",
    )
    for ax in (a, b):
        ax.set_xticks(ns)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"aios throughput ({result['machine']}, medians of interleaved repeats, {result['date']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def cli() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--agent", default="writer", help="example agent kind (planner, writer, quiz)"
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--threads", type=int, default=__import__("os").cpu_count() or 1)
    parser.add_argument("--decode-steps", type=int, default=64)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(main(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "throughput.png")
    print(table(result))


if __name__ == "__main__":
    cli()
