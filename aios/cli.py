"""The ``aios`` command line: thin over the library. Library errors become a one-line message
and an exit code here, at the edge; no traceback reaches the user."""

from __future__ import annotations

import asyncio
import faulthandler
import json
import logging
import runpy
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from aios.config import POLICIES, CoreConfig, KernelConfig, StorageConfig
from aios.errors import AIOSError, ConfigError, InvalidRequest, ModelNotFound

if TYPE_CHECKING:
    from aios.sdk.http import Client

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
TokenOpt = Annotated[
    str | None,
    typer.Option(
        help="Bearer token (default: $AIOS_TOKEN, else the admin token in the data dir).",
        show_default=False,
    ),
]
UrlOpt = Annotated[
    str | None,
    typer.Option(help="Kernel URL (default: $AIOS_URL, else from the config's host and port)."),
]
ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="TOML config file (default: $AIOS_CONFIG, or none)."),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Show debug logs (llama.cpp too).")
]


def _say_error(error: object) -> None:
    """One error line on stderr, as written: no markup read into it, no line breaks added (a
    command in the message stays copyable)."""
    err.print(f"[red]error:[/red] {escape(str(error))}", soft_wrap=True)


def _run(coro: Coroutine[Any, Any, T], verbose: bool = False) -> T:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(coro)
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(next((c for t, c in EXIT_CODES.items() if isinstance(e, t)), 1)) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None


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


BENCHMARKS = {
    "throughput": "Agents with and without the kernel, and raw batched decode.",
    "agents": "The agent workload: direct vs the kernel under each scheduling policy.",
    "context-switch": "KV snapshot and restore vs re-prefill, by context length.",
    "scale": "100-2000 agents on the simulated core, with and without the kernel.",
    "http-overhead": "What the HTTP server adds to a syscall (instant simulated core).",
    "memory-storage": "Memory and storage syscalls, SQLite vs PostgreSQL, 1k-100k notes.",
    "remote-relay": "Kernel CPU per token relayed from a remote core (simulated remote).",
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


# -- the server and its clients ---------------------------------------------------------------
agent_app = typer.Typer(help="Agent identities: bearer tokens for agents.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")


def _settings(config: str | None) -> Any:
    from aios.server.config import load_settings

    try:
        return load_settings(config)
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(2) from None


def _token(token: str | None, config: str | None = None) -> str:
    import os

    from aios.server.main import read_admin_token

    found = token or os.environ.get("AIOS_TOKEN")
    if not found:
        found = read_admin_token(_settings(config).server.data_path)
    if not found:
        err.print("[red]error:[/red] no token: pass --token, set AIOS_TOKEN, or start aios serve")
        raise typer.Exit(2)
    return found


def _url(url: str | None, config: str | None = None) -> str:
    import os

    if url or os.environ.get("AIOS_URL"):
        return str(url or os.environ["AIOS_URL"])
    server = _settings(config).server
    return f"http://{server.host}:{server.port}"


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default 8080).")] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="The default core's model.")
    ] = None,
    policy: Annotated[
        str | None, typer.Option(help=f"Scheduling policy: {', '.join(POLICIES)}.")
    ] = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the kernel as a server: the syscall API (/api/v1), the OpenAI-compatible API (/v1)
    and the docs (/docs). Options override the config file and the environment.

    Example: aios serve --port 8080 --policy spf
    """
    import os

    from aios.server.config import load_settings
    from aios.server.main import serve as serve_forever

    env = dict(os.environ)
    overrides = {"AIOS_HOST": host, "AIOS_PORT": port, "AIOS_MODEL": model, "AIOS_POLICY": policy}
    env.update({k: str(v) for k, v in overrides.items() if v is not None})
    try:
        settings = load_settings(config, env)
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(2) from None
    server = settings.server
    err.print(
        f"aios serving on http://{server.host}:{server.port} (docs: /docs); data in "
        f"{server.data_path}; admin token: $AIOS_ADMIN_TOKEN or {server.data_path / 'admin.token'}"
    )
    _run(serve_forever(settings), verbose)


@agent_app.command("create")
def agent_create(
    name: Annotated[str, typer.Argument(help="The agent's name (its identity).")],
    group: Annotated[
        list[str] | None, typer.Option("--group", "-g", help="A group (repeatable).")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Issue a bearer token for a new agent (printed once; only its hash is stored).

    Example: aios agent create alice --group research
    """
    from aios.server.main import open_identities

    identities = open_identities(_settings(config))
    try:
        identity, token = identities.create(name, tuple(group or ()))
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(2) from None
    finally:
        identities.close()
    err.print(f"agent {identity.name!r} created; its token (shown once):")
    console.print(token, markup=False, highlight=False)


@agent_app.command("list")
def agent_list(config: ConfigOpt = None) -> None:
    """List agent identities."""
    from aios.server.main import open_identities

    identities = open_identities(_settings(config))
    try:
        for identity in identities.list():
            groups = ",".join(identity.groups) or "-"
            console.print(
                f"{identity.name}\tgroups={groups}{'  (admin)' if identity.admin else ''}"
            )
    finally:
        identities.close()


@agent_app.command("revoke")
def agent_revoke(name: str, config: ConfigOpt = None) -> None:
    """Revoke an agent's token (it stops working at once)."""
    from aios.server.main import open_identities

    identities = open_identities(_settings(config))
    try:
        if not identities.revoke(name):
            err.print(f"[red]error:[/red] no agent named {name!r}")
            raise typer.Exit(1)
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(2) from None
    finally:
        identities.close()
    err.print(f"agent {name!r} revoked")


@app.command()
def ps(url: UrlOpt = None, token: TokenOpt = None, config: ConfigOpt = None) -> None:
    """List the agents of a running kernel with their state and usage (the admin token sees
    all of them, an agent's token its own).

    Example: aios ps
    """
    from aios.sdk.http import Client

    try:
        with Client(_url(url, config), _token(token, config), retries=1) as client:
            processes = client.processes()
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(1) from None
    table = Table(box=None, header_style="bold")
    for col in (
        "ID",
        "NAME",
        "OWNER",
        "STATE",
        "CALLS",
        "IN FLIGHT",
        "TOKENS IN",
        "TOKENS OUT",
        "WAITED s",
        "AGE s",
    ):
        table.add_column(col)
    for p in processes:
        table.add_row(
            p["id"],
            p["name"],
            p["owner"] or "-",
            p["state"],
            str(p["syscalls"]),
            str(len(p["inflight"])),
            str(p["prompt_tokens"]),
            str(p["completion_tokens"]),
            f"{p['waited_s']:.2f}",
            f"{p['age_s']:.0f}",
        )
    console.print(table)


@app.command()
def kill(
    process_id: Annotated[str, typer.Argument(help="Process id (see aios ps).")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Stop an agent: cancel its task and its syscalls in flight.

    Example: aios kill agent-3
    """
    from aios.sdk.http import Client

    try:
        with Client(_url(url, config), _token(token, config), retries=1) as client:
            process = client.kill(process_id)
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(1) from None
    err.print(f"{process['id']}: {process['state']}")


# -- memory and storage, read from the kernel's database (as the agent) -----------------------
storage_app = typer.Typer(
    help="Agents' versioned files, through the kernel's access check and audit log (works "
    "while a server runs on the same database).",
    no_args_is_help=True,
)
memory_app = typer.Typer(
    help="Agents' memory notes, through the kernel's access check and audit log.",
    no_args_is_help=True,
)
app.add_typer(storage_app, name="storage")
app.add_typer(memory_app, name="memory")
AgentArg = Annotated[str, typer.Argument(help="The agent (its identity name).")]
DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database",
        help="SQLite path or postgresql:// URL (default: the config's, else DATA_DIR/aios.db).",
        envvar="AIOS_DATABASE",
    ),
]


@contextmanager
def _storage(config: str | None, database: str | None) -> Iterator[Any]:
    """A connection to the kernel's database (never creates one), errors as messages. For the
    audit log's own commands only: agents' data goes through :func:`_operate`."""
    from aios.storage.db import Database

    url = _database_url(config, database)
    db = Database.open(url)
    try:
        conn = db.connect()
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(2) from None
    try:
        yield conn
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(1) from None
    finally:
        conn.close()


def _database_url(config: str | None, database: str | None) -> str:
    """The configured database; an error if it is a SQLite file that does not exist yet."""
    from aios.storage.db import Database

    url = database or _settings(config).kernel.storage.database
    path = Database.open(url).path
    if path is not None and not Path(path).exists():
        err.print(f"[red]error:[/red] no database at {path} (has aios serve run?)")
        raise typer.Exit(2)
    return str(url)


def _operator() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no login name, no password entry
        return "unknown"


def _operate(
    agent: str, config: str | None, database: str | None, kind: str, op: str, args: dict[str, Any]
) -> Any:
    """One memory or storage syscall on ``agent``'s data, made by the person at this terminal
    through the kernel's one checked path: the configured access policy (as ``agent``, with
    its credential's groups), approvals (asked here), limits and the audit log, where the
    process is named ``cli:USER``. Works beside a running server (the database is shared)."""
    import dataclasses

    from aios.identity import check_name
    from aios.kernel import Kernel

    try:
        check_name(agent)
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(2) from None
    settings = _settings(config)
    storage = dataclasses.replace(settings.kernel.storage, database=_database_url(config, database))
    kernel_config = dataclasses.replace(settings.kernel, storage=storage, mcp=())
    groups = _groups_of(settings, agent)

    async def go() -> Any:
        async with Kernel(kernel_config, llm=False) as kernel:
            kernel.access.on_ask = _ask_here
            process = kernel.register(f"cli:{_operator()}", owner=agent, pid=f"cli:{_operator()}")
            process.groups = groups
            return await kernel.resource(process, kind, op, args)

    try:
        return asyncio.run(go())
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(EXIT_CODES.get(type(e), 1)) from None


def _groups_of(settings: Any, agent: str) -> frozenset[str]:
    """The groups of ``agent``'s credential (none for an agent without one)."""
    from aios.identity import RESERVED_GROUPS, Identities
    from aios.server.main import DB_FILE

    path = settings.server.data_path / DB_FILE
    if not path.exists():
        return frozenset()
    identities = Identities(path, RESERVED_GROUPS | set(settings.kernel.access.exempt))
    try:
        found = [i for i in identities.list() if i.name == agent]
    finally:
        identities.close()
    return frozenset(found[0].groups) if found else frozenset()


def _ask_here(pending: Any) -> None:
    """A call that needs approval: the person at the terminal decides (no terminal: denied)."""
    if not sys.stdin.isatty():
        err.print(f"{escape(pending.capability)} needs approval ({escape(pending.reason)}): "
                  "denied (no terminal to ask on)")  # fmt: skip
        pending.decided.set_result(False)
        return
    question = f"{pending.capability} needs approval ({pending.reason}). Allow?"
    pending.decided.set_result(typer.confirm(question, default=False, err=True))


def _when(stamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(stamp).isoformat(sep=" ", timespec="seconds")


@storage_app.command("ls")
def storage_ls(
    agent: AgentArg,
    path: Annotated[str, typer.Argument(help="A folder (default: the root).")] = "",
    recursive: Annotated[bool, typer.Option("--recursive", "-r")] = False,
    config: ConfigOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """List an agent's folder.

    Example: aios storage ls alice notes -r
    """
    entries = _operate(agent, config, database, "storage", "ls",
                       {"path": path, "recursive": recursive})  # fmt: skip
    table = Table(box=None, header_style="bold")
    for col in ("PATH", "KIND", "SIZE", "VERSION", "MODIFIED"):
        table.add_column(col)
    for e in entries:
        size = str(e["size"]) if e["kind"] == "file" else "-"
        table.add_row(e["path"] + ("/" if e["kind"] == "dir" else ""), e["kind"], size,
                      str(e["version"] or "-"), _when(e["modified"]))  # fmt: skip
    console.print(table)


@storage_app.command("cat")
def storage_cat(
    agent: AgentArg,
    path: Annotated[str, typer.Argument(help="The file.")],
    version: Annotated[int | None, typer.Option(help="A version id (see history).")] = None,
    config: ConfigOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Print a file (now, or at a version) to stdout, byte for byte.

    Example: aios storage cat alice notes/today.md --version 12
    """
    found = _operate(agent, config, database, "storage", "read",
                     {"path": path, "version": version})  # fmt: skip
    sys.stdout.buffer.write(found["content"])
    sys.stdout.flush()


@storage_app.command("history")
def storage_history(
    agent: AgentArg,
    path: Annotated[str, typer.Argument(help="The file.")],
    limit: Annotated[int, typer.Option(help="At most this many versions.")] = 50,
    config: ConfigOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """A file's versions, newest first (deleted files keep theirs).

    Example: aios storage history alice notes/today.md
    """
    versions = _operate(agent, config, database, "storage", "history",
                        {"path": path, "limit": limit})  # fmt: skip
    table = Table(box=None, header_style="bold")
    for col in ("VERSION", "OP", "SIZE", "WHEN", "BY", "SHA-256"):
        table.add_column(col)
    for v in versions:
        table.add_row(str(v["id"]), v["op"], str(v["size"]) if v["hash"] else "-",
                      _when(v["at"]), v["author"], (v["hash"] or "(deleted)")[:16])  # fmt: skip
    console.print(table)


@storage_app.command("rollback")
def storage_rollback(
    agent: AgentArg,
    path: Annotated[str, typer.Argument(help="The file.")],
    version: Annotated[int | None, typer.Option(help="Back to this version id.")] = None,
    at: Annotated[
        str | None,
        typer.Option(help="Back to the file as it was at this time (ISO 8601 or UNIX seconds)."),
    ] = None,
    config: ConfigOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Restore a file to an earlier version; the rollback is itself a new version.

    Example: aios storage rollback alice notes/today.md --at "2026-11-22 09:30"
    """
    if (version is None) == (at is None):
        raise typer.BadParameter("give exactly one of --version or --at")
    stamp = None if at is None else _timestamp(at)
    stat = _operate(agent, config, database, "storage", "rollback",
                    {"path": path, "version": version, "at": stamp})  # fmt: skip
    if stat is None:
        err.print(f"{path}: rolled back to a deletion (the file is gone; its history stays)")
    else:
        err.print(f"{path}: now version {stat['version']} ({stat['size']} bytes)")


def _timestamp(text: str) -> float:
    import datetime

    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise typer.BadParameter(f"--at must be ISO 8601 or UNIX seconds, got {text!r}") from None


@memory_app.command("search")
def memory_search(
    agent: AgentArg,
    query: Annotated[str, typer.Argument(help="Words to look for (any of them).")],
    limit: Annotated[int, typer.Option(help="At most this many notes.")] = 5,
    config: ConfigOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """An agent's notes matching a query, best first.

    Example: aios memory search alice "meeting tuesday"
    """
    if not 1 <= limit <= 10_000:
        raise typer.BadParameter("--limit must be in [1, 10000]")
    hits = _operate(agent, config, database, "memory", "search", {"query": query, "limit": limit})
    table = Table(box=None, header_style="bold")
    for col in ("ID", "SCORE", "TEXT", "METADATA"):
        table.add_column(col)
    for hit in hits:
        note = hit["note"]
        table.add_row(str(note["id"]), f"{hit['score']:.3g}", note["text"][:120],
                      json.dumps(note["metadata"]))  # fmt: skip
    console.print(table)


# -- the audit log -----------------------------------------------------------------------------
audit_app = typer.Typer(help="The hash-chained audit log of every syscall.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")


@audit_app.command("verify")
def audit_verify(
    head: Annotated[
        str | None,
        typer.Option(help="The head hash you kept from an earlier verify (detects truncation)."),
    ] = None,
    config: ConfigOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Recompute the chain: exit 0 if every record checks, 1 naming the first that does not.

    Example: aios audit verify --head 3f2a...
    """
    from aios.audit import verify

    with _storage(config, database) as conn:
        verdict = verify(conn, head)
    if verdict.ok:
        since = f" after record {verdict.pruned} (older ones pruned)" if verdict.pruned else ""
        console.print(f"ok: {verdict.records} records{since}; head {verdict.head}")
        return
    err.print(f"[red]TAMPERED:[/red] {verdict.problem} ({verdict.records} records check)")
    raise typer.Exit(1)


@audit_app.command("prune")
def audit_prune(
    older_than: Annotated[
        float, typer.Option("--older-than", help="Remove records older than this many days.")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Remove them (else: only count).")] = False,
    config: ConfigOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """Remove the oldest records; the chain resumes after them, so the rest still verifies
    (the newest record always stays, and the pruning is itself recorded).

    Example: aios audit prune --older-than 90 --yes
    """
    from aios.audit import prune

    if not older_than >= 0:
        raise typer.BadParameter("--older-than must be >= 0 days")
    before = time.time() - older_than * 86400
    with _storage(config, database) as conn:
        count = prune(conn, before, f"cli:{_operator()}", dry_run=not yes)
    if yes:
        console.print(f"pruned {count} records older than {older_than:g} days")
    else:
        console.print(f"{count} records are older than {older_than:g} days (--yes removes them)")


@audit_app.command("tail")
def audit_tail(
    n: Annotated[int, typer.Option("-n", help="How many records.")] = 20,
    config: ConfigOpt = None,
    database: DatabaseOpt = None,
) -> None:
    """The newest records.

    Example: aios audit tail -n 50
    """
    from aios.audit import FIELDS

    with _storage(config, database) as conn:
        rows = conn.all(
            f"SELECT seq, {', '.join(FIELDS)} FROM audit ORDER BY seq DESC LIMIT ?", (n,)
        )
    table = Table(box=None, header_style="bold")
    for col in ("SEQ", "WHEN", "PRINCIPAL", "PROCESS", "CALL", "RESOURCE", "DECISION", "OUTCOME"):
        table.add_column(col)
    for row in reversed(rows):
        seq, at, principal, process, kind, op, resource, decision, outcome, _ = row
        table.add_row(str(seq), _when(at), principal, process, f"{kind}.{op}", resource[:40],
                      decision, outcome)  # fmt: skip
    console.print(table)


# -- approvals ----------------------------------------------------------------------------------
approve_app = typer.Typer(
    help="Calls waiting for a person's approval (needs the admin token).", no_args_is_help=True
)
app.add_typer(approve_app, name="approve")


def _api_call(
    url: str | None, token: str | None, config: str | None, use: Callable[[Client], T]
) -> T:
    """``use(client)`` on a blocking client of the kernel at ``url``; errors as one line."""
    from aios.sdk.http import Client

    try:
        with Client(_url(url, config), _token(token, config), retries=1) as client:
            return use(client)
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(1) from None


@approve_app.command("list")
def approve_list(url: UrlOpt = None, token: TokenOpt = None, config: ConfigOpt = None) -> None:
    """The calls waiting for approval.

    Example: aios approve list
    """
    table = Table(box=None, header_style="bold")
    for col in ("ID", "AGENT", "PROCESS", "CAPABILITY", "WHY", "WAITING s"):
        table.add_column(col)
    for p in _api_call(url, token, config, lambda c: c.request("GET", "/api/v1/approvals")):
        table.add_row(p["id"], p["principal"], p["process"], p["capability"], p["reason"],
                      f"{p['age_s']:.0f}")  # fmt: skip
    console.print(table)


@approve_app.command("allow")
def approve_allow(
    approval_id: Annotated[str, typer.Argument(help="The id (see aios approve list).")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Let a waiting call run.

    Example: aios approve allow ap-3
    """
    path = f"/api/v1/approvals/{approval_id}/allow"
    decided = _api_call(url, token, config, lambda c: c.request("POST", path))
    err.print(f"{decided['id']}: allowed {decided['capability']}")


@approve_app.command("deny")
def approve_deny(
    approval_id: Annotated[str, typer.Argument(help="The id (see aios approve list).")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Refuse a waiting call (its agent gets PermissionDenied).

    Example: aios approve deny ap-3
    """
    path = f"/api/v1/approvals/{approval_id}/deny"
    decided = _api_call(url, token, config, lambda c: c.request("POST", path))
    err.print(f"{decided['id']}: denied {decided['capability']}")


# -- tools ---------------------------------------------------------------------------------------
tools_app = typer.Typer(
    help="Tools: what a kernel offers, and the sandbox its code tools run in.",
    no_args_is_help=True,
)
app.add_typer(tools_app, name="tools")


@tools_app.command("list")
def tools_list(url: UrlOpt = None, token: TokenOpt = None, config: ConfigOpt = None) -> None:
    """The tools a running kernel offers (built-ins, entry points, MCP servers).

    Example: aios tools list --token aios_...
    """
    table = Table(box=None, header_style="bold")
    for col in ("NAME", "LIMIT", "TIMEOUT s", "HINTS", "SOURCE", "DESCRIPTION"):
        table.add_column(col)
    for t in _api_call(url, token, config, lambda c: c.call("tools", "list", {})):
        hints = [h.removesuffix("Hint") for h, on in t["annotations"].items() if on]
        table.add_row(t["name"], str(t["concurrency"]), f"{t['timeout']:g}", ",".join(hints),
                      t["source"], t["description"].split("\n")[0][:60])  # fmt: skip
    console.print(table)


@tools_app.command("sandbox")
def tools_sandbox() -> None:
    """Which sandbox code tools (python) would run in on this machine, and whether they run:
    exit 0 if bubblewrap, 1 if only the weaker namespaces (code tools are then off unless an
    operator opts in, unsafe: AIOS_UNSAFE_SANDBOX=1), 2 if none (code tools are off).

    Example: aios tools sandbox
    """
    from aios.tools.sandbox import Sandbox

    found = Sandbox.detect()
    console.print(found.describe(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"code tools: {'on' if found.enabled else 'off'}", highlight=False)
    raise typer.Exit({"bubblewrap": 0, "namespaces": 1}.get(found.kind, 2))


# -- MCP -----------------------------------------------------------------------------------------
mcp_app = typer.Typer(help="MCP: aios' tools for MCP clients.", no_args_is_help=True)
app.add_typer(mcp_app, name="mcp")


@mcp_app.command("serve")
def mcp_serve(url: UrlOpt = None, token: TokenOpt = None, config: ConfigOpt = None) -> None:
    """Serve a running kernel's tools to an MCP client over stdio, as the agent of --token
    (the kernel's access checks apply to that agent). Configure it as an MCP server command.

    Example: aios mcp serve --url http://127.0.0.1:8080 --token aios_...
    """
    try:
        from aios.tools.mcp import serve as serve_mcp
    except ImportError:
        err.print("[red]error:[/red] needs the mcp package: pip install 'aios[mcp]'")
        raise typer.Exit(2) from None
    asyncio.run(serve_mcp(_url(url, config), _token(token, config)))


def main() -> None:
    # A crash inside native code (llama.cpp) then prints which Python call it was in, instead
    # of a bare "Segmentation fault". The known causes are refused before they happen
    # (aios.llm.cpu); this is for the unknown ones.
    faulthandler.enable()
    app()


if __name__ == "__main__":
    main()
