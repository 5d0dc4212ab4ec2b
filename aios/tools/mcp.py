"""MCP, both ways (the official ``mcp`` package, 1.x API; ``pip install 'aios[mcp]'``).

- **Client**: each configured MCP server (a command speaking MCP over stdio) is started with
  the kernel; its tools join the registry as ``SERVER__TOOL``, with their JSON Schemas (checked
  before a call), annotations (a destructive one needs approval), and the same limits, access
  checks and audit as every tool.
- **Server**: ``aios mcp serve`` exposes a running kernel's tools to an MCP client over stdio,
  as the agent whose token it is given (so the kernel's access checks apply to that agent).
"""

from __future__ import annotations

import json
from contextlib import AsyncExitStack
from typing import Any

from aios.config import McpServerConfig
from aios.errors import ConfigError, ToolError
from aios.tools.registry import ToolRegistry
from aios.tools.spec import NAME, Annotations, ToolSpec


async def connect(
    servers: tuple[McpServerConfig, ...], registry: ToolRegistry, stack: AsyncExitStack
) -> list[str]:
    """Start each MCP server, register its tools; the names registered. The servers stop
    when ``stack`` closes."""
    if not servers:
        return []
    try:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client
    except ImportError:
        raise ConfigError("MCP servers need the mcp package: pip install 'aios[mcp]'") from None
    added = []
    for server in servers:
        params = StdioServerParameters(
            command=server.command[0], args=list(server.command[1:]), env=dict(server.env) or None
        )
        try:
            read, write = await stack.enter_async_context(stdio_client(params))
            session = await stack.enter_async_context(ClientSession(read, write))
            await session.initialize()
            listed = await session.list_tools()
        except Exception as e:
            raise ConfigError(f"MCP server {server.name!r} did not start: {e}") from e
        for tool in listed.tools:
            added.append(registry.register(_spec(server, session, tool)).name)
    return added


def _spec(server: McpServerConfig, session: Any, tool: Any) -> ToolSpec:
    name = f"{server.name}__{tool.name}"
    if not NAME.fullmatch(name):
        raise ConfigError(f"MCP server {server.name!r}: tool name {tool.name!r} is not usable")
    hints = tool.annotations

    async def call(**arguments: Any) -> Any:
        result = await session.call_tool(tool.name, arguments)
        texts = [c.text for c in result.content if getattr(c, "type", "") == "text"]
        if result.isError:
            raise ToolError(f"MCP tool {name!r} failed: {' '.join(texts)[:2000]}")
        if result.structuredContent is not None:
            return result.structuredContent
        return texts[0] if len(texts) == 1 else texts

    return ToolSpec(
        name=name,
        description=tool.description or "",
        params=None,
        json_schema=dict(tool.inputSchema or {"type": "object", "properties": {}}),
        fn=call,
        concurrency=server.concurrency,
        timeout=server.timeout,
        annotations=Annotations(
            read_only=bool(hints and hints.readOnlyHint),
            destructive=bool(hints and hints.destructiveHint),
            open_world=bool(hints and hints.openWorldHint),
        ),
        source=f"mcp:{server.name}",
    )


async def serve(url: str, token: str) -> None:
    """An MCP server on stdio whose tools are the kernel's at ``url``, called as ``token``."""
    import mcp.types as types
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server

    from aios.sdk.http import AsyncClient

    async with AsyncClient(url, token) as client:
        server: Server[Any, Any] = Server("aios")

        @server.list_tools()  # type: ignore[untyped-decorator, no-untyped-call]
        async def list_tools() -> list[types.Tool]:
            tools = await client.call("tools", "list", {})
            return [
                types.Tool(
                    name=t["name"],
                    description=t["description"],
                    inputSchema=t["parameters"],
                    annotations=types.ToolAnnotations(**t["annotations"]),
                )
                for t in tools
            ]

        @server.call_tool()  # type: ignore[untyped-decorator]
        async def call_tool(name: str, arguments: dict[str, Any]) -> list[types.TextContent]:
            result = await client.call("tools", "call", {"name": name, "arguments": arguments})
            text = result if isinstance(result, str) else json.dumps(result)
            return [types.TextContent(type="text", text=text)]

        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())
