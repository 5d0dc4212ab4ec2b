"""For the administrator of a kernel: agent identities (``agent``, in the kernel's database),
and, over a running kernel's HTTP API with a token, its processes (``ps``, ``kill``), the
calls waiting for approval (``approve``) and its tools (``tools``; ``tools sandbox`` looks at
this machine)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from aios.cli.common import (
    ConfigOpt,
    TokenOpt,
    UrlOpt,
    _api_call,
    _say_error,
    _settings,
    agent_app,
    app,
    approve_app,
    console,
    err,
    tools_app,
)
from aios.errors import AIOSError

if TYPE_CHECKING:
    from aios.identity import Identities


def _identities(config: str | None) -> Identities:
    """The kernel's identity table (in its database), or a one-line error."""
    from aios.server.main import open_identities

    try:
        return open_identities(_settings(config))
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(2) from None


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
    identities = _identities(config)
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
    identities = _identities(config)
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
    identities = _identities(config)
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
    processes = _api_call(url, token, config, lambda c: c.processes())
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
    process = _api_call(url, token, config, lambda c: c.kill(process_id))
    err.print(f"{process['id']}: {process['state']}")


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
    _decide(approval_id, "allow", url, token, config)


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
    _decide(approval_id, "deny", url, token, config)


def _decide(
    approval_id: str, verdict: str, url: str | None, token: str | None, config: str | None
) -> None:
    path = f"/api/v1/approvals/{approval_id}/{verdict}"
    decided = _api_call(url, token, config, lambda c: c.request("POST", path))
    err.print(f"{decided['id']}: {'allowed' if verdict == 'allow' else 'denied'} "
              f"{decided['capability']}")  # fmt: skip


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
