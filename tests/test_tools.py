"""The tool manager: registry and schemas, validation, the safe calculator, per-tool
concurrency limits under load, timeouts and crashes that stay contained, and tools as
syscalls (in-process SDK and HTTP)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fakes import CORE_DEFAULTS, FakeFactory
from servers import serve

from aios.config import CoreConfig, KernelConfig, StorageConfig
from aios.errors import ConfigError, InvalidRequest, NotFound, ToolError, ToolTimeout
from aios.kernel import Kernel
from aios.sdk import Agent
from aios.storage.db import Job
from aios.tools.builtin import builtin_tools, evaluate
from aios.tools.manager import ToolManager
from aios.tools.registry import ToolRegistry
from aios.tools.spec import ToolContext, tool


def context() -> ToolContext:
    async def no_syscalls(kind: str, op: str, args: dict[str, Any]) -> Any:
        raise AssertionError("no syscalls expected")

    return ToolContext("tester", no_syscalls)


def kernel(tmp_path: Path, registry: ToolRegistry | None = None) -> Kernel:
    config = KernelConfig(
        cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
        storage=StorageConfig(database=str(tmp_path / "aios.db")),
    )
    return Kernel(config, engine_factory=FakeFactory(lambda p: "ok"), tools=registry)


# -- registry and schemas ---------------------------------------------------------------------
def test_registry_renders_openai_tools_and_rejects_bad_ones() -> None:
    registry = ToolRegistry(builtin_tools())
    calc = registry.openai(["calculator"])[0]
    assert calc["type"] == "function" and calc["function"]["name"] == "calculator"
    params = calc["function"]["parameters"]
    assert params["required"] == ["expression"]
    assert params["properties"]["expression"]["type"] == "string"
    assert params["additionalProperties"] is False
    listed = {t["name"]: t for t in ToolManager(registry).list()}
    assert listed["write_file"]["annotations"]["destructiveHint"] is False  # versioned
    assert listed["read_file"]["annotations"]["readOnlyHint"] is True
    assert "ctx" not in listed["read_file"]["parameters"]["properties"]  # injected, not asked
    with pytest.raises(ConfigError, match="already"):
        registry.register(builtin_tools()[0])
    with pytest.raises(NotFound, match="calculator"):
        registry.get("rm_rf")
    with pytest.raises(ConfigError):
        tool(name="bad name")(lambda: None)
    with pytest.raises(ConfigError, match="needs a type"):

        @tool()
        def untyped(x):  # type: ignore[no-untyped-def]
            return x


# -- the calculator ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("expression", "value"),
    [("12*7", 84), ("2**10", 1024), ("2^10", 1024), ("(1+2)*3 - 4/2", 7.0), ("17 // 5", 3),
     ("17 % 5", 2), ("-3 + +4", 1), ("sqrt(16) + abs(-2)", 6.0), ("round(pi, 2)", 3.14),
     ("max(1, 5, 3)", 5), ("1234567 * 7654321", 9449772114007)],
)  # fmt: skip
def test_calculator_computes(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('true')", "().__class__", "open('/etc/passwd')", "x", "lambda: 1",
     "9**9**9", "10**400", "1/0", "'a' * 3", "[1, 2]", "sqrt(-1)", "1" * 600, "2 +", "exp(1000)"],
)  # fmt: skip
def test_calculator_refuses_everything_else(expression: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expression)


async def test_calculator_errors_reach_the_caller_as_tool_errors() -> None:
    manager = ToolManager(ToolRegistry(builtin_tools()))
    assert await manager.call(context(), "calculator", {"expression": "6*7"}, Job()) == 42
    with pytest.raises(ToolError, match="division by zero"):
        await manager.call(context(), "calculator", {"expression": "1/0"}, Job())
    with pytest.raises(InvalidRequest, match="expression"):
        await manager.call(context(), "calculator", {}, Job())
    with pytest.raises(InvalidRequest, match=r"(?i)extra"):
        await manager.call(context(), "calculator", {"expression": "1", "x": 2}, Job())
    with pytest.raises(InvalidRequest, match="string"):
        await manager.call(context(), "calculator", {"expression": 12}, Job())
    assert manager.stats["calculator"].errors == 1  # invalid arguments never ran


# -- concurrency, hangs and crashes ------------------------------------------------------------
async def test_fifty_agents_and_a_tool_with_limit_two(tmp_path: Path) -> None:
    running = peak = 0

    @tool(concurrency=2, timeout=10.0)
    async def slow(n: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        return n * 2

    class Caller(Agent):
        name = "caller"

        async def run(self, task: str) -> str:
            return str(await self.tools.call("slow", n=int(task)))

    registry = ToolRegistry([slow])
    async with kernel(tmp_path, registry) as k:
        procs = await asyncio.gather(*(k.run_agent(Caller, str(i)) for i in range(50)))
        assert [p.result for p in procs] == [str(2 * i) for i in range(50)]
        assert peak == 2  # never more than its limit, and the limit was used
        stats = k.tool_stats["slow"]
        assert stats.calls == 50 and stats.peak == 2 and stats.running == 0


async def test_hangs_and_crashes_stay_contained() -> None:
    forever = asyncio.Event()
    release_thread = threading.Event()

    @tool(timeout=0.2)
    async def hangs() -> str:
        await forever.wait()
        return "never"

    @tool(timeout=0.2, concurrency=1)
    def blocks() -> str:  # a sync tool: its thread cannot be stopped
        release_thread.wait(5)
        return "late"

    @tool()
    def crashes(n: int) -> int:
        raise RuntimeError(f"boom {n}")

    registry = ToolRegistry([hangs, blocks, crashes, *builtin_tools()])
    manager = ToolManager(registry)
    ctx = context()
    start = time.monotonic()
    results = await asyncio.gather(
        manager.call(ctx, "hangs", {}, Job()),
        manager.call(ctx, "blocks", {}, Job()),
        manager.call(ctx, "crashes", {"n": 7}, Job()),
        *(manager.call(ctx, "calculator", {"expression": f"{i}+1"}, Job()) for i in range(20)),
        return_exceptions=True,
    )
    assert time.monotonic() - start < 2.0
    assert isinstance(results[0], ToolTimeout) and isinstance(results[1], ToolTimeout)
    assert isinstance(results[2], ToolError) and "RuntimeError: boom 7" in str(results[2])
    assert results[3:] == [i + 1 for i in range(20)]  # other tools ran meanwhile
    # The blocked thread still holds the sync tool's only slot: a new call waits, then times out
    # at its deadline without running; once the thread returns, the slot is free again.
    assert manager.stats["blocks"].running == 1
    with pytest.raises(ToolTimeout, match="never ran"):
        await manager.call(ctx, "blocks", {}, Job(deadline=time.monotonic() + 0.1))
    release_thread.set()
    for _ in range(200):
        if manager.stats["blocks"].running == 0:
            break
        await asyncio.sleep(0.01)
    assert manager.stats["blocks"].running == 0
    manager.close()


async def test_a_tool_result_that_is_not_json_is_an_error() -> None:
    @tool()
    def weird() -> object:
        return object()

    manager = ToolManager(ToolRegistry([weird]))
    with pytest.raises(ToolError, match="not JSON"):
        await manager.call(context(), "weird", {}, Job())


# -- tools as syscalls -----------------------------------------------------------------------
class Filer(Agent):
    name = "filer"

    async def run(self, task: str) -> str:
        await self.tools.call("write_file", path="notes/a.txt", content=task)
        listed = await self.tools.call("list_files", path="notes")
        text = await self.tools.call("read_file", path="notes/a.txt")
        note = await self.tools.call("remember", text=f"I wrote {task}")
        found = await self.tools.call("recall", query="wrote")
        total = await self.tools.call("calculator", expression="12*7")
        return f"{listed}|{text}|{note > 0}|{found}|{total}"


async def test_agents_use_tools_as_syscalls_on_their_own_data(tmp_path: Path) -> None:
    async with kernel(tmp_path) as k:
        alice = k.register("alice-agent", owner="alice")
        proc = await k.run_agent(Filer, "hello", process=alice)
        assert proc.result == "['notes/a.txt']|hello|True|['I wrote hello']|84", proc.error
        # Each tool's own memory and storage calls are syscalls of its caller, one each.
        made = [(s.kind, s.op) for s, p in k.syscalls.values() if p is proc]
        assert [m for m in made if m[0] != "tools"] == [
            ("storage", "write"),
            ("storage", "ls"),
            ("storage", "read"),
            ("memory", "add"),
            ("memory", "search"),
        ]
        assert len([m for m in made if m[0] == "tools"]) == 6
        bob = k.register("bob-agent", owner="bob")
        with pytest.raises(NotFound):  # bob's read_file reads bob's namespace: nothing there
            args = {"name": "read_file", "arguments": {"path": "notes/a.txt"}}
            await k.resource(bob, "tools", "call", args)
        tools = await k.resource(bob, "tools", "list", {})
        assert "calculator" in {t["name"] for t in tools}


def test_tools_over_http(tmp_path: Path) -> None:
    with serve(tmp_path / "data") as server:
        client = server.client(server.agent("alice"))
        ok = client.post(
            "/api/v1/tools/call", json={"name": "calculator", "arguments": {"expression": "6*7"}}
        )
        assert ok.status_code == 200 and ok.json()["result"] == 42 and ok.json()["kind"] == "tools"
        bad = client.post("/api/v1/tools/call", json={"name": "calculator", "arguments": {}})
        assert bad.status_code == 400 and "expression" in bad.json()["error"]["message"]
        failed = client.post(
            "/api/v1/tools/call", json={"name": "calculator", "arguments": {"expression": "1/0"}}
        )
        assert failed.status_code == 502 and failed.json()["error"]["type"] == "tool_error"
        missing = client.post("/api/v1/tools/call", json={"name": "nope"})
        assert missing.status_code == 404
        listed = client.post("/api/v1/tools/list").json()["result"]
        assert {"calculator", "read_file", "write_file"} <= {t["name"] for t in listed}
