"""For the operator who runs a kernel: ``serve`` runs it as a server (the syscall API, the
OpenAI-compatible API, the docs), ``mcp serve`` serves a running kernel's tools to an MCP
client over stdio."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from aios.cli.common import (
    ConfigOpt,
    TokenOpt,
    UrlOpt,
    VerboseOpt,
    _run,
    _say_error,
    _token,
    _url,
    app,
    err,
    mcp_app,
)
from aios.config import POLICIES
from aios.errors import AIOSError


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
