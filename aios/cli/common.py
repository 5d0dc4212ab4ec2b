"""What every audience of the ``aios`` command line shares: the root ``app`` and its command
groups (declared here, in the order ``aios --help`` lists them), the consoles, the options
several commands take, and library errors turned into one line and an exit code at the edge
(no traceback reaches the user)."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from aios.errors import AIOSError, ConfigError, InvalidRequest, ModelNotFound

if TYPE_CHECKING:
    from aios.sdk.http import Client

app = typer.Typer(
    help="aios: an operating system for LLM agents. Agents make system calls; the kernel "
    "schedules and batches them onto shared LLM cores.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
# The groups, in help order (typer lists a Typer's commands, then its groups, each in the order
# they were registered); each module of this package registers its commands on them.
bench_app = typer.Typer(help="Run benchmarks (results under bench/results/).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
agent_app = typer.Typer(help="Agent identities: bearer tokens for agents.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")
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
audit_app = typer.Typer(help="The hash-chained audit log of every syscall.", no_args_is_help=True)
app.add_typer(audit_app, name="audit")
approve_app = typer.Typer(
    help="Calls waiting for a person's approval (needs the admin token).", no_args_is_help=True
)
app.add_typer(approve_app, name="approve")
tools_app = typer.Typer(
    help="Tools: what a kernel offers, and the sandbox its code tools run in.",
    no_args_is_help=True,
)
app.add_typer(tools_app, name="tools")
mcp_app = typer.Typer(help="MCP: aios' tools for MCP clients.", no_args_is_help=True)
app.add_typer(mcp_app, name="mcp")

console = Console()
err = Console(stderr=True)
T = TypeVar("T")

EXIT_CODES: dict[type[AIOSError], int] = {ConfigError: 2, InvalidRequest: 2, ModelNotFound: 3}

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


def main() -> None:
    # A crash inside native code (llama.cpp) then prints which Python call it was in, instead
    # of a bare "Segmentation fault". The known causes are refused before they happen
    # (aios.llm.cpu); this is for the unknown ones.
    faulthandler.enable()
    app()
