"""The ``aios`` command line: thin over the library. Library errors become a one-line message
and an exit code here, at the edge; no traceback reaches the user."""

from __future__ import annotations

import asyncio
import logging
import runpy
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from aios.config import POLICIES, CoreConfig, KernelConfig
from aios.errors import AIOSError, ConfigError, InvalidRequest, ModelNotFound

app = typer.Typer(
    help="aios: an operating system for LLM agents. Agents make system calls; the kernel "
    "schedules and batches them onto shared LLM cores.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Run benchmarks (results under bench/results/).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")

console = Console()
err = Console(stderr=True)
T = TypeVar("T")

EXIT_CODES: dict[type[AIOSError], int] = {ConfigError: 2, InvalidRequest: 2, ModelNotFound: 3}

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Built-in model (smollm2-135m, gemma3-270m) or a GGUF path."
    ),
]
SlotsOpt = Annotated[int, typer.Option(help="Sequences the core decodes together in one batch.")]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show debug logs (llama.cpp too).")
]


def _run(coro: Coroutine[Any, Any, T], verbose: bool = False) -> T:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(coro)
    except AIOSError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(next((c for t, c in EXIT_CODES.items() if isinstance(e, t)), 1)) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


def _kernel_config(model: str, slots: int, policy: str = "fifo", quantum: int = 32) -> KernelConfig:
    return KernelConfig(
        cores=(CoreConfig(name="default", model=model, slots=slots),),
        policy=policy,
        quantum_tokens=quantum,
    )


@app.command()
def run(
    agents: Annotated[int, typer.Option("--agents", "-n", help="How many agents run at once.")] = 8,
    agent: Annotated[
        str, typer.Option(help="Example agent: planner, writer, quiz, or mixed (all three).")
    ] = "mixed",
    model: ModelOpt = "smollm2-135m",
    slots: SlotsOpt = 16,
    policy: Annotated[
        str, typer.Option(help=f"Scheduling policy: {', '.join(POLICIES)}.")
    ] = "fifo",
    quantum: Annotated[
        int,
        typer.Option(
            help="Tokens a request runs before it may be pre-empted (rr, priority, fair)."
        ),
    ] = 32,
    verbose: VerboseOpt = False,
) -> None:
    """Start a kernel on the embedded model and run N example agents concurrently.

    Example: aios run --agents 8 --agent writer --policy rr --quantum 16
    """
    if agents < 1:
        raise typer.BadParameter("--agents must be >= 1")
    if policy not in POLICIES:
        raise typer.BadParameter(f"--policy must be one of {', '.join(POLICIES)}")
    if quantum < 1:
        raise typer.BadParameter("--quantum must be >= 1")
    _run(_run_agents(agents, agent, _kernel_config(model, slots, policy, quantum)), verbose)


async def _run_agents(n: int, agent: str, config: KernelConfig) -> None:
    from aios.agents import AGENTS, get_agent, tasks_for
    from aios.kernel import Kernel
    from aios.llm.core import LLMCore

    kinds = list(AGENTS.values()) if agent == "mixed" else [get_agent(agent)]
    jobs = []
    per_kind = {cls: tasks_for(cls, n) for cls in kinds}
    for i in range(n):
        cls = kinds[i % len(kinds)]
        jobs.append((cls, per_kind[cls][i // len(kinds)]))

    async with Kernel(config) as kernel:
        core = kernel.cores["default"]
        assert isinstance(core, LLMCore)  # _kernel_config builds one embedded core
        err.print(
            f"kernel up: model {core.engine.description} ({core.config.model}), "
            f"{core.config.slots} slots, policy {config.policy}"
        )
        started = time.monotonic()
        with Live(
            get_renderable=lambda: _progress(kernel),
            console=err,
            refresh_per_second=4,
            transient=True,
        ):
            procs = await asyncio.gather(*(kernel.run_agent(cls, task) for cls, task in jobs))
        elapsed = time.monotonic() - started
        stats = core.stats

    table = Table(title=f"{n} agents on the aios kernel ({elapsed:.1f} s)")
    for col in (
        "agent",
        "kind",
        "task",
        "turnaround s",
        "waiting s",
        "calls",
        "tokens out",
        "result",
    ):
        table.add_column(col, overflow="fold")
    for p in procs:
        table.add_row(
            p.id,
            p.name,
            p.task,
            f"{p.turnaround or 0:.2f}",
            f"{p.waited:.2f}",
            str(p.syscalls),
            str(p.completion_tokens),
            (p.result or f"[red]{p.error}[/red]")[:160],
        )
    console.print(table)
    out_tokens = sum(p.completion_tokens for p in procs)
    failed = sum(1 for p in procs if p.error)
    console.print(
        f"{n - failed}/{n} agents done in {elapsed:.1f} s: {60 * n / elapsed:.1f} agents/min, "
        f"{out_tokens / elapsed:.1f} generated tokens/s, mean turnaround "
        f"{sum(p.turnaround or 0 for p in procs) / n:.2f} s"
    )
    console.print(
        f"KV reuse: {stats.prefix_hit_rate:.0%} of calls hit the cache, "
        f"{stats.prefill_saved:.0%} of prompt tokens not prefilled "
        f"({stats.prefill_tokens} prefilled); {stats.preemptions} pre-emptions, "
        f"{stats.parked} idle contexts parked, {stats.unparked} restored"
    )
    if failed:
        raise typer.Exit(1)


def _progress(kernel: Any) -> Table:
    table = Table(box=None, show_header=True, header_style="bold")
    for col in ("agent", "kind", "state", "calls", "tokens out", "waiting s"):
        table.add_column(col)
    for p in list(kernel.processes.values()):
        table.add_row(
            p.id,
            p.name,
            p.state.value,
            str(p.syscalls),
            str(p.completion_tokens),
            f"{p.waited:.1f}",
        )
    return table


@app.command()
def chat(
    prompt: Annotated[str, typer.Argument(help="What to ask.")],
    system: Annotated[str | None, typer.Option(help="Optional system prompt.")] = None,
    model: ModelOpt = "smollm2-135m",
    max_tokens: Annotated[int | None, typer.Option(help="Cap on generated tokens.")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy (deterministic).")] = 0.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed (temperature > 0).")] = None,
    json_mode: Annotated[
        bool, typer.Option("--json", help="Constrain the answer to JSON.")
    ] = False,
    raw: Annotated[
        bool, typer.Option(help="Complete the prompt as raw text (base models).")
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Ask the embedded model one question through the kernel and print the answer.

    Example: aios chat "What is the capital of France?"
    """

    async def ask() -> str:
        from aios.kernel import Kernel
        from aios.syscall import LLMCall, Message, SamplingParams

        params = SamplingParams(max_tokens, temperature, 1.0, seed, (), json_mode)
        if raw:
            call = LLMCall(prompt=prompt, params=params)
        else:
            messages = ((Message("system", system),) if system else ()) + (Message("user", prompt),)
            call = LLMCall(messages=messages, params=params)

        async with Kernel(_kernel_config(model, 1)) as kernel:
            return (await kernel.llm(kernel.register("chat"), call)).text

    console.print(_run(ask(), verbose).strip(), markup=False, highlight=False)


@app.command("agents")
def list_agents() -> None:
    """List the example agents.

    Example: aios agents
    """
    from aios.agents import AGENTS

    for name, cls in AGENTS.items():
        console.print(f"[bold]{name}[/bold]: {cls.description}")


BENCHMARKS = {
    "throughput": "Agents with and without the kernel, and raw batched decode.",
    "agents": "The agent workload: direct vs the kernel under each scheduling policy.",
    "context-switch": "KV snapshot and restore vs re-prefill, by context length.",
    "scale": "100-2000 agents on the simulated core, with and without the kernel.",
}


def _bench_command(name: str, help_text: str) -> None:
    script_name = name.replace("-", "_") + ".py"

    def command(ctx: typer.Context) -> None:
        script = Path(__file__).resolve().parent.parent / "bench" / script_name
        if not script.is_file():
            err.print(
                f"[red]error:[/red] {script} not found (benchmarks run from a source checkout)"
            )
            raise typer.Exit(2)
        sys.argv = [str(script), *ctx.args]
        sys.path.insert(0, str(script.parent))  # benchmarks import their siblings
        runpy.run_path(str(script), run_name="__main__")

    command.__doc__ = f"{help_text} (bench/{script_name}; --help lists its options)"
    bench_app.command(
        name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
    )(command)


for _name, _help in BENCHMARKS.items():
    _bench_command(_name, _help)


def main() -> None:
    app()
