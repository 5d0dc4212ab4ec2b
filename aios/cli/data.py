"""For a person looking into agents' data at the terminal: their files (``storage``) and
notes (``memory``), read and changed as the agent through an in-process kernel's one checked
path (access policy, approvals asked here, audit log); and the audit log itself (``audit``),
verified, pruned and read straight from the database."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from aios.cli.common import (
    EXIT_CODES,
    ConfigOpt,
    _say_error,
    _settings,
    audit_app,
    console,
    err,
    memory_app,
    storage_app,
)
from aios.errors import AIOSError

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

    url = _database_url(_settings(config), database)
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


def _database_url(settings: Any, database: str | None) -> str:
    """The configured database; an error if it is a SQLite file that does not exist yet."""
    from aios.storage.db import Database

    url = database or settings.kernel.storage.database
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
    storage = dataclasses.replace(
        settings.kernel.storage, database=_database_url(settings, database)
    )
    kernel_config = dataclasses.replace(settings.kernel, storage=storage, mcp=())
    try:
        groups = _groups_of(settings, storage.database, agent)
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(EXIT_CODES.get(type(e), 1)) from None

    async def go() -> Any:
        async with Kernel(kernel_config, llm=False) as kernel:
            kernel.access.on_ask = _ask_here
            pid = f"cli:{_operator()}"
            process = kernel.register(pid, owner=agent, pid=pid)
            process.groups = groups
            return await kernel.resource(process, kind, op, args)

    try:
        return asyncio.run(go())
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(EXIT_CODES.get(type(e), 1)) from None


def _groups_of(settings: Any, url: str, agent: str) -> frozenset[str]:
    """The groups of ``agent``'s credential in the database at ``url`` (none for an agent
    without one)."""
    from aios.identity import Identities

    identities = Identities(url, settings.kernel.access.exempt)
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
    from aios.audit import tail

    with _storage(config, database) as conn:
        records = tail(conn, n)
    table = Table(box=None, header_style="bold")
    for col in ("SEQ", "WHEN", "PRINCIPAL", "PROCESS", "CALL", "RESOURCE", "DECISION", "OUTCOME"):
        table.add_column(col)
    for r in records:
        table.add_row(str(r["seq"]), _when(r["at"]), r["principal"], r["process"],
                      f"{r['kind']}.{r['op']}", r["resource"][:40], r["decision"],
                      r["outcome"])  # fmt: skip
    console.print(table)
