"""MCP both ways, against real servers: a FastMCP server's tools used through the kernel (the
same validation, limits, access checks and audit as built-ins), and ``aios mcp serve`` used by
the official MCP client."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fakes import CORE_DEFAULTS, FakeFactory
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from servers import serve

from aios.config import AccessConfig, CoreConfig, KernelConfig, McpServerConfig, StorageConfig
from aios.errors import ConfigError, InvalidRequest, PermissionDenied, ToolError
from aios.kernel import Kernel

DEMO = str(Path(__file__).with_name("mcp_demo_server.py"))


def kernel(tmp_path: Path, command: tuple[str, ...] = (sys.executable, DEMO)) -> Kernel:
    config = KernelConfig(
        cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
        storage=StorageConfig(database=str(tmp_path / "aios.db")),
        access=AccessConfig(approval_timeout=0.3),
        mcp=(McpServerConfig("demo", command, timeout=10.0),),
    )
    return Kernel(config, engine_factory=FakeFactory(lambda p: "ok"))


async def test_an_mcp_servers_tools_work_like_any_tool(tmp_path: Path) -> None:
    async with kernel(tmp_path) as k:
        p = k.register("user", owner="alice")
        listed = {t["name"]: t for t in await k.resource(p, "tools", "list", {})}
        assert {"demo__add", "demo__shout", "demo__erase", "calculator"} <= set(listed)
        assert listed["demo__add"]["source"] == "mcp:demo"
        assert listed["demo__add"]["annotations"]["readOnlyHint"] is True
        assert listed["demo__add"]["parameters"]["required"] == ["a", "b"]

        def call(name: str, **arguments: object) -> object:
            return k.resource(p, "tools", "call", {"name": name, "arguments": arguments})

        assert await call("demo__add", a=2, b=40) == {"result": 42}  # its structured content
        assert await call("demo__shout", text="hi") == {"result": "HI"}
        with pytest.raises(InvalidRequest, match="a"):  # checked before the server sees it
            await call("demo__add", a="two", b=1)
        with pytest.raises(ToolError, match="asked to fail"):
            await call("demo__shout", text="fail")
        with pytest.raises(PermissionDenied, match="approval"):  # destructive: needs a person
            await call("demo__erase", what="everything")
        assert await call("demo__add", a=1, b=1) == {"result": 2}  # it still serves
        await k.audit.flush()


async def test_a_broken_mcp_server_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="demo"):
        async with kernel(tmp_path, (sys.executable, "-c", "raise SystemExit(3)")):
            pass


async def test_aios_mcp_serve_exposes_the_kernels_tools(tmp_path: Path) -> None:
    with serve(tmp_path / "data") as server:
        token = server.agent("mcp-user")
        params = StdioServerParameters(
            command=sys.executable,
            args=["-m", "aios.cli", "mcp", "serve", "--url", server.url, "--token", token],
        )
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            tools = {t.name: t for t in (await session.list_tools()).tools}
            assert "calculator" in tools and "python" in tools
            assert tools["calculator"].inputSchema["required"] == ["expression"]
            result = await session.call_tool("calculator", {"expression": "6*7"})
            assert not result.isError and result.content[0].text == "42"
            bad = await session.call_tool("calculator", {"expression": "1/0"})
            assert bad.isError and "division by zero" in bad.content[0].text
