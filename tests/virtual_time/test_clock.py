"""One clock and one object per resource call: deadlines, approvals and quotas on the kernel's
clock (tested on virtual time, so a 5-minute wait ends in milliseconds), a memory, storage or
tool call as one future owned by the kernel's TaskGroup, and the audit queue's bound."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from fakes import CORE_DEFAULTS, FakeFactory
from vtime import VirtualTimeLoop, skipped

from aios.audit import verify
from aios.config import AccessConfig, CoreConfig, KernelConfig, StorageConfig
from aios.errors import Overloaded, PermissionDenied, SyscallCancelled, ToolTimeout
from aios.kernel import Kernel
from aios.resources import ResourceCall
from aios.storage.db import Database
from aios.syscall import Status
from aios.tools.builtin import builtin_tools
from aios.tools.registry import ToolRegistry
from aios.tools.spec import tool


@tool(description="Wait for a long time.", timeout=100_000)
async def nap(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "rested"


def kernel(tmp_path: Path, **access: Any) -> Kernel:
    config = KernelConfig(
        cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
        storage=StorageConfig(database=str(tmp_path / "aios.db")),
        access=AccessConfig(**access),
    )
    registry = ToolRegistry([*builtin_tools(), nap])
    return Kernel(config, engine_factory=FakeFactory(lambda p: "ok"), tools=registry)


def audit_rows(db: Path) -> list[tuple[Any, ...]]:
    conn = Database.open(str(db)).connect()
    try:
        return conn.all("SELECT op, decision, outcome FROM audit ORDER BY seq")
    finally:
        conn.close()


async def test_the_loop_jumps_only_when_every_task_waits() -> None:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, VirtualTimeLoop)
    real, virtual = time.monotonic(), loop.time()
    await asyncio.sleep(3600)
    assert loop.time() - virtual >= 3600 and time.monotonic() - real < 1.0
    # Executor work holds the clock: a 0.2 s query is not skipped over, its time is real.
    before = skipped()
    await loop.run_in_executor(None, time.sleep, 0.2)
    assert skipped() == before


async def test_an_unanswered_approval_times_out_on_the_kernel_clock(tmp_path: Path) -> None:
    async with kernel(tmp_path, approve=("storage.delete:*",), approval_timeout=300.0) as k:
        p = k.register("agent", owner="alice")
        await k.resource(p, "storage", "write", {"path": "a.txt", "content": "x"})
        start, real = k.clock(), time.monotonic()
        with pytest.raises(PermissionDenied, match="no one approved it within 300s"):
            await k.resource(p, "storage", "delete", {"path": "a.txt"})
        assert 300 <= k.clock() - start < 301 and time.monotonic() - real < 5
        assert not k.access.pending  # no longer waiting for anyone
        read = await k.resource(p, "storage", "read", {"path": "a.txt"})
        assert read["content"] == b"x"  # not deleted
    assert ("delete", "rejected", "failed:permission_denied") in audit_rows(tmp_path / "aios.db")


async def test_a_call_deadline_bounds_the_approval_wait(tmp_path: Path) -> None:
    async with kernel(tmp_path, approve=("storage.write:*",), approval_timeout=3600.0) as k:
        p = k.register("agent", owner="alice")
        start = k.clock()
        with pytest.raises(PermissionDenied, match="within 120s"):
            await k.resource(p, "storage", "write", {"path": "a", "content": "x"}, timeout=120)
        assert 120 <= k.clock() - start < 121


async def test_a_tool_that_outlives_its_deadline_is_stopped_there(tmp_path: Path) -> None:
    async with kernel(tmp_path, groups={"default": ("tools.call:nap",)}) as k:
        p = k.register("agent")
        call = {"name": "nap", "arguments": {"seconds": 10_000}}
        start = k.clock()
        with pytest.raises(ToolTimeout, match="90s"):
            await k.resource(p, "tools", "call", call, timeout=90)
        assert 90 <= k.clock() - start < 91
        assert await k.resource(p, "tools", "call", {**call, "arguments": {"seconds": 30}}) == (
            "rested"
        )


async def test_a_resource_call_is_one_task_of_the_kernel(tmp_path: Path) -> None:
    async with kernel(tmp_path, groups={"default": ("tools.call:nap",)}) as k:
        p = k.register("agent")
        call = k.submit(p, "tools", "call", {"name": "nap", "arguments": {"seconds": 60}})
        assert isinstance(call, ResourceCall) and k.syscalls[call.id][0] is call
        (task,) = k._calls.values()  # white box: its work, a task of the kernel's TaskGroup
        assert task.get_name() == call.id
        result = await k.settle(p, call)
        assert result == "rested" and call.status is Status.DONE and call.future.result() == result
        t = call.timings
        assert t.admitted is not None and t.finished is not None
        assert t.submitted <= t.admitted and t.finished - t.admitted >= 60  # one clock
        await asyncio.sleep(0)
        assert not k._calls


async def test_a_caller_that_leaves_cancels_its_call(tmp_path: Path) -> None:
    async with kernel(tmp_path, groups={"default": ("tools.call:nap",)}) as k:
        p = k.register("agent")
        call = {"name": "nap", "arguments": {"seconds": 600}}
        waiting = asyncio.ensure_future(k.resource(p, "tools", "call", call))
        await asyncio.sleep(10)
        ((request, _),) = k.syscalls.values()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert request.status is Status.CANCELLED
        await asyncio.sleep(1)
        assert not k._calls  # its work stopped
    assert ("call", "allowed", "cancelled") in audit_rows(tmp_path / "aios.db")


async def test_a_killed_call_raises_cancelled_and_a_queued_one_never_runs(tmp_path: Path) -> None:
    async with kernel(tmp_path, groups={"default": ("tools.call:nap", "storage.*")}) as k:
        p = k.register("agent")
        running = k.submit(p, "tools", "call", {"name": "nap", "arguments": {"seconds": 600}})
        await asyncio.sleep(5)
        assert running.started
        k.cancel(running)
        with pytest.raises(SyscallCancelled, match="had started and may have been applied"):
            await k.settle(p, running)
        # A storage call cancelled before a worker takes it never runs.
        queued = k.submit(p, "storage", "write", {"path": "never.txt", "content": "x"})
        k.cancel(queued)
        with pytest.raises(SyscallCancelled) as info:
            await k.settle(p, queued)
        assert "may have been applied" not in str(info.value)
        await asyncio.sleep(1)
        assert await k.resource(p, "storage", "ls", {}) == []


async def test_a_full_audit_queue_refuses_new_calls_and_loses_no_record(tmp_path: Path) -> None:
    async with kernel(tmp_path, groups={"default": ("storage.*",)}) as k:
        p = k.register("agent")
        k.audit.max_pending = 3
        writer = k._writer  # white box: hold the writer back, as a stalled database would
        assert writer is not None
        writer.cancel()
        await asyncio.sleep(0)
        done = [await k.resource(p, "storage", "ls", {}) for i in range(3)]
        assert len(done) == 3 and k.audit.pending == 3
        with pytest.raises(Overloaded, match="audit log is 3 records behind"):
            await k.resource(p, "storage", "ls", {})
        assert k.audit.refused == 1 and k.audit.pending == 3  # refused before it was recorded
        k._writer = asyncio.get_running_loop().create_task(k.audit.run())
        await k.audit.flush()
        await k.resource(p, "storage", "ls", {})  # taken again
    conn = Database.open(str(tmp_path / "aios.db")).connect()
    try:
        assert verify(conn).ok
        count = conn.scalar("SELECT count(*) FROM audit")
    finally:
        conn.close()
    assert count == 4 and k.audit.lost == 0
