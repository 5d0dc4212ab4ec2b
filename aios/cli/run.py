"""For someone trying aios on one machine: ``run`` starts a kernel in this process on the
embedded model and runs example agents on it (or, with ``--url``, runs them against a running
kernel), ``chat`` asks the model one question through a kernel, ``agents`` lists the examples."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import typer
from rich.live import Live
from rich.table import Table

from aios.cli.common import TokenOpt, VerboseOpt, _run, _settings, _token, app, console, err
from aios.config import POLICIES, CoreConfig, KernelConfig, StorageConfig
from aios.errors import AIOSError

ModelOpt = Annotated[
    str,
    typer.Option(
        "--model", "-m", help="Built-in model (smollm2-135m, gemma3-270m) or a GGUF path."
    ),
]
SlotsOpt = Annotated[int, typer.Option(help="Sequences the core decodes together in one batch.")]


def _kernel_config(
    model: str, slots: int, policy: str = "fifo", quantum: int = 32, database: str = ""
) -> KernelConfig:
    return KernelConfig(
        cores=(CoreConfig(name="default", model=model, slots=slots),),
        policy=policy,
        quantum_tokens=quantum,
        storage=StorageConfig(database=database),
    )


@app.command()
def run(
    agents: Annotated[int, typer.Option("--agents", "-n", help="How many agents run at once.")] = 8,
    agent: Annotated[
        str,
        typer.Option(
            help="Example agent: planner, writer, quiz, math, filer, or mixed (the first three)."
        ),
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
    url: Annotated[
        str | None,
        typer.Option(help="Run against a running kernel (aios serve) at this URL instead."),
    ] = None,
    token: TokenOpt = None,
    submit: Annotated[
        bool,
        typer.Option(help="With --url: the kernel runs the agents as its own tasks."),
    ] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Start a kernel on the embedded model and run N example agents concurrently; or, with
    --url, run them against a running kernel: here, as HTTP clients (default), or in the
    kernel itself (--submit).

    Example: aios run --agents 8 --agent writer --policy rr --quantum 16
    Example: aios run --url http://127.0.0.1:8080 --submit --agents 4
    """
    if agents < 1:
        raise typer.BadParameter("--agents must be >= 1")
    if url is not None:
        _run(_run_remote(agents, agent, url, _token(token), submit), verbose)
        return
    if policy not in POLICIES:
        raise typer.BadParameter(f"--policy must be one of {', '.join(POLICIES)}")
    if quantum < 1:
        raise typer.BadParameter("--quantum must be >= 1")
    database = _settings(None).kernel.storage.database  # agents' files and notes persist
    config = _kernel_config(model, slots, policy, quantum, database)
    _run(_run_agents(agents, agent, config), verbose)


def _jobs(n: int, agent: str) -> list[tuple[type[Any], str]]:
    """``n`` (agent class, task) pairs: one kind, or the example kinds in turn."""
    from aios.agents import MIXED, get_agent, tasks_for

    kinds = list(MIXED) if agent == "mixed" else [get_agent(agent)]
    per_kind = {cls: tasks_for(cls, n) for cls in kinds}
    return [
        (kinds[i % len(kinds)], per_kind[kinds[i % len(kinds)]][i // len(kinds)]) for i in range(n)
    ]


async def _run_remote(n: int, agent: str, url: str, token: str, submit: bool) -> None:
    from aios.sdk.http import AsyncClient

    jobs = _jobs(n, agent)
    started = time.monotonic()
    async with AsyncClient(url, token) as client:
        if submit:
            spawned = [await client.spawn(cls.name, task) for cls, task in jobs]
            rows = await asyncio.gather(*(_finished(client, p["id"]) for p in spawned))
        else:

            async def one(cls: type[Any], task: str) -> dict[str, Any]:
                # Each agent its own client, as separate programs would be (and one httpx pool
                # shared by ~100 busy requests costs more CPU than the server: see README).
                try:
                    async with AsyncClient(url, token) as own:
                        return {"name": cls.name, "task": task, "result": await cls(own).run(task)}
                except AIOSError as e:
                    return {"name": cls.name, "task": task, "error": f"{e.code}: {e}"}

            rows = await asyncio.gather(*(one(cls, task) for cls, task in jobs))
    elapsed = time.monotonic() - started
    where = "in the kernel" if submit else "as HTTP clients"
    table = Table(title=f"{n} agents via {url} ({elapsed:.1f} s, {where})")
    for col in ("agent", "task", "result"):
        table.add_column(col, overflow="fold")
    for row in rows:
        result = row.get("result") or f"[red]{row.get('error')}[/red]"
        table.add_row(row.get("id", row["name"]), row["task"], str(result)[:160])
    console.print(table)
    if any(row.get("error") for row in rows):
        raise typer.Exit(1)


async def _finished(client: Any, process_id: str) -> dict[str, Any]:
    while True:  # long-polls: each wait returns when the process ends (or after 60 s)
        process: dict[str, Any] = await client.wait(process_id, timeout=60)
        if process["state"] in ("done", "failed"):
            return process


async def _run_agents(n: int, agent: str, config: KernelConfig) -> None:
    from aios.kernel import Kernel
    from aios.llm.core import LLMCore

    jobs = _jobs(n, agent)

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
    if any(p.name == "writer" for p in procs) and kernel.database is not None:
        console.print(
            f"Writers' drafts and notes are in {kernel.database}: "
            "aios storage ls writer drafts; aios memory search writer TOPIC"
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
