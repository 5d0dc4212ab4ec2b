"""The kernel's event bus: syscall state changes and approvals as they happen, per principal,
bounded per subscriber (a slow one drops and is told, in order), ended by the kernel's exit."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fakes import CORE_DEFAULTS, FakeFactory, asked
from servers import Harness

from aios.config import AccessConfig, CoreConfig, KernelConfig, StorageConfig
from aios.events import Event, EventBus
from aios.kernel import Kernel
from aios.syscall import LLMCall, Message


def kernel(tmp_path: Path, **access: object) -> Kernel:
    config = KernelConfig(
        cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
        storage=StorageConfig(database=str(tmp_path / "aios.db")),
        access=AccessConfig(**access),  # type: ignore[arg-type]
    )
    return Kernel(config, engine_factory=FakeFactory(lambda p: "ok"))


def drain(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.kind, e.data.get("kind", ""), e.state) for e in events]


async def read(subscription: object, count: int) -> list[Event]:
    return [await subscription.get() for _ in range(count)]  # type: ignore[attr-defined]


async def test_syscall_states_are_published_per_principal(tmp_path: Path) -> None:
    everything = {"default": ("llm.*", "storage.*")}
    async with kernel(tmp_path, groups=everything) as k:
        alice, bob = k.register("a", owner="alice"), k.register("b", owner="bob")
        all_events = k.events.subscribe()
        alices = k.events.subscribe(principals={"alice"})
        await k.llm(alice, LLMCall(messages=(Message("user", "hi"),)))
        await k.resource(bob, "storage", "write", {"path": "x", "content": "y"})
        mine = await read(alices, 3)
        assert drain(mine) == [("syscall", "llm", s) for s in ("queued", "running", "done")]
        assert {e.principal for e in mine} == {"alice"} and {e.process for e in mine} == {alice.id}
        assert mine[0].data["op"] == "fake" and len({e.syscall for e in mine}) == 1
        seen = await read(all_events, 5)
        assert drain(seen)[3:] == [("syscall", "storage", "queued"), ("syscall", "storage", "done")]
        assert seen[3].principal == "bob" and seen[3].data["op"] == "write"
        assert [e.seq for e in seen] == sorted(e.seq for e in seen)
        assert seen[0].at <= seen[-1].at <= k.clock()
        assert not alices._queue  # white box: bob's call never reached alice's subscriber


async def test_approvals_are_published(tmp_path: Path) -> None:
    policy = {"groups": {"default": ("storage.*",)}, "approve": ("storage.delete:*",)}
    async with kernel(tmp_path, **policy) as k:
        p = k.register("a", owner="alice")
        await k.resource(p, "storage", "write", {"path": "x", "content": "y"})
        events = k.events.subscribe()
        approvals = asked(k)
        call = asyncio.ensure_future(k.resource(p, "storage", "delete", {"path": "x"}))
        pending = await approvals.get()
        k.access.resolve(pending.id, allow=True)
        await call
        got = await read(events, 4)
    assert [(e.kind, e.state) for e in got] == [
        ("syscall", "queued"),
        ("approval", "asked"),
        ("approval", "allowed"),
        ("syscall", "done"),
    ]
    assert got[1].syscall == pending.id and got[1].data["capability"] == "storage.delete:x"
    assert got[1].data["call"] == got[0].syscall


async def test_a_slow_subscriber_drops_and_is_told_in_order() -> None:
    bus = EventBus(asyncio.get_running_loop().time)
    slow, fast = bus.subscribe(limit=3), bus.subscribe(limit=100)
    for i in range(10):
        bus.publish("syscall", syscall=f"sc-{i}")
    assert [e.syscall for e in await read(slow, 2)] == ["sc-0", "sc-1"]
    bus.publish("syscall", syscall="sc-10")  # room again: the gap is reported before it
    got = await read(slow, 3)
    assert [e.syscall for e in got] == ["sc-2", "", "sc-10"]
    assert got[1].kind == "dropped" and got[1].data == {"count": 7}
    assert [e.syscall for e in await read(fast, 11)] == [f"sc-{i}" for i in range(11)]
    # A gap at the end is reported once the queue is empty.
    for i in range(5):
        bus.publish("syscall", syscall=f"late-{i}")
    assert [e.kind for e in await read(slow, 4)] == ["syscall"] * 3 + ["dropped"]


async def test_nobody_watching_costs_nothing_and_exit_ends_the_stream(tmp_path: Path) -> None:
    async with kernel(tmp_path, groups={"default": ("storage.*",)}) as k:
        p = k.register("a")
        assert not k.events.watched
        await k.resource(p, "storage", "ls", {})
        events = k.events.subscribe()
        first = k.events.event("probe")
        assert first.seq == 1  # nothing was built while nobody watched
        waiter = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0)
    done, _ = await asyncio.wait([waiter], timeout=1)  # the kernel's exit ended it
    assert waiter in done and isinstance(waiter.exception(), StopAsyncIteration)
    assert [e async for e in events] == []


def frames(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, JSON data) of each SSE frame."""
    name = ""
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, json.loads(line.removeprefix("data: "))


def test_the_event_stream_over_http_shows_an_agent_its_own_events(server: Harness) -> None:
    alice, bob = server.agent("alice"), server.agent("bob")
    with (
        server.client(alice).stream("GET", "/api/v1/events") as mine,
        server.client(server.admin).stream("GET", "/api/v1/events") as everything,
    ):
        assert mine.status_code == 200
        assert mine.headers["content-type"].startswith("text/event-stream")
        seen, seen_all = frames(mine.iter_lines()), frames(everything.iter_lines())
        assert next(seen) == ("ready", {"principals": ["alice"]})
        assert next(seen_all) == ("ready", {"principals": []})
        body = {"path": "a.txt", "content": "hi"}
        for token in (bob, alice):
            assert server.client(token).post("/api/v1/storage/write", json=body).is_success
        name, first = next(seen)
        assert name == "syscall" and first["principal"] == "alice"  # bob's never show here
        assert (first["state"], first["data"]) == ("queued", {"kind": "storage", "op": "write"})
        assert next(seen)[1]["state"] == "done"
        owners = [next(seen_all)[1]["principal"] for _ in range(4)]
        assert owners == ["bob", "bob", "alice", "alice"]
    assert server.client().get("/api/v1/events").status_code == 401
