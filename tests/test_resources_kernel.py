"""Memory and storage as syscalls: through the kernel (process table, timings, cancel, deadlines),
the SDK's ``self.memory`` / ``self.storage`` in-process and over HTTP, the HTTP routes, and
chat calls that use memory (fitted into the context). The fake engine stands in for the model."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import CORE_DEFAULTS, FakeEngine, FakeFactory, detokenize
from servers import Harness, serve

from aios.config import CoreConfig, KernelConfig, MemoryConfig, StorageConfig
from aios.errors import (
    Conflict,
    ContextOverflow,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    StorageFull,
    SyscallCancelled,
)
from aios.kernel import Kernel
from aios.llm.core import LLMCore
from aios.sdk import Agent
from aios.sdk.http import AsyncClient
from aios.syscall import Status


def kernel(tmp_path: Path, **storage: Any) -> Kernel:
    config = KernelConfig(
        cores=(
            CoreConfig(name="fake", model="fake", **{**CORE_DEFAULTS, "max_sequence_tokens": 1024}),
        ),
        storage=StorageConfig(database=str(tmp_path / "aios.db"), **storage),
        memory=MemoryConfig(),
    )
    return Kernel(config, engine_factory=FakeFactory(lambda prompt: "noted."))


class Librarian(Agent):
    name = "librarian"

    async def run(self, task: str) -> str:
        await self.storage.write("notes/task.txt", task)
        await self.storage.write("notes/task.txt", " (seen)", mode="append")
        note = await self.memory.add(f"task was: {task}", {"kind": "task"})
        found = await self.memory.search("task", where={"kind": "task"})
        assert found[0]["note"]["id"] == note["id"]
        history = await self.storage.history("notes/task.txt")
        await self.storage.rollback("notes/task.txt", version=history[-1]["id"])
        return await self.storage.read_text("notes/task.txt")


async def test_agent_uses_memory_and_storage_in_process(tmp_path: Path) -> None:
    async with kernel(tmp_path) as k:
        process = await k.run_agent(Librarian, "count the books")
        assert process.error is None, process.error
        assert process.result == "count the books"
        assert process.syscalls == 7  # every call was a syscall, metered to the agent
        kinds = {s.kind for s, p in k.syscalls.values() if p is process}
        assert kinds == {"memory", "storage"}
        assert all(s.status is Status.DONE for s, _ in k.syscalls.values())
        assert all(s.timings.finished is not None for s, _ in k.syscalls.values())
    # The files outlive the kernel: a new kernel on the same database sees them.
    async with kernel(tmp_path) as k:
        again = k.register("librarian")
        read = await k.resource(again, "storage", "read", {"path": "notes/task.txt"})
        assert read["content"] == b"count the books"


async def test_unknown_ops_and_bad_arguments_are_clear(tmp_path: Path) -> None:
    async with kernel(tmp_path) as k:
        p = k.register("a")
        with pytest.raises(NotFound, match="operations: write"):
            await k.resource(p, "storage", "format", {})
        with pytest.raises(NotFound, match="kinds"):
            await k.resource(p, "disk", "read", {})
        with pytest.raises(InvalidRequest, match="unknown argument"):
            await k.resource(p, "storage", "read", {"path": "x", "colour": 1})
        with pytest.raises(InvalidRequest, match="missing"):
            await k.resource(p, "storage", "read", {})
        with pytest.raises(InvalidRequest, match=r"'\.\.'"):
            await k.resource(p, "storage", "read", {"path": "../b/x"})
        with pytest.raises(InvalidRequest):
            await k.resource(p, "memory", "add", {"text": ""})
        assert not p.inflight  # failed calls are accounted too
        # Unknown operations and arguments that do not fit them are refused at entry, before
        # any access decision or approval: they never become syscalls.
        assert p.syscalls == 2


async def test_quota_and_conflicts_are_typed(tmp_path: Path) -> None:
    async with kernel(tmp_path, max_bytes=10) as k:
        p = k.register("a")
        await k.resource(p, "storage", "write", {"path": "a", "content": "12345"})
        with pytest.raises(StorageFull):
            await k.resource(p, "storage", "write", {"path": "b", "content": "1234567"})
        with pytest.raises(Conflict):
            await k.resource(p, "storage", "write", {"path": "a", "content": "x", "mode": "create"})
        ls = await k.resource(p, "storage", "ls", {})
        assert [e["path"] for e in ls] == ["a"]


async def test_cancel_and_deadline_withdraw_queued_calls(tmp_path: Path) -> None:
    async with kernel(tmp_path) as k:
        p = k.register("a")
        db = k._resources.db  # white box: occupy the only worker
        # Occupy the only database worker so the next calls stay queued.
        blocker = asyncio.Event()
        loop = asyncio.get_running_loop()
        gate = asyncio.ensure_future(
            db.run(lambda conn: asyncio.run_coroutine_threadsafe(blocker.wait(), loop).result())
        )
        queued = k.submit(p, "storage", "write", {"path": "never", "content": "x"})
        k.cancel(queued)
        with pytest.raises(SyscallCancelled):
            await k.settle(p, queued)
        with pytest.raises(DeadlineExceeded, match="nothing was changed"):
            await k.resource(p, "storage", "write", {"path": "late", "content": "x"}, timeout=0.05)
        blocker.set()
        await gate
        assert await k.resource(p, "storage", "ls", {}) == []  # neither write happened
        assert queued.status is Status.CANCELLED


async def test_chat_with_memory_fits_history_and_notes(tmp_path: Path) -> None:
    async with kernel(tmp_path) as k:
        p = k.register("chatter")
        from aios.sdk.llm import LLM
        from aios.sdk.local import LocalClient
        from aios.sdk.resources import Memory

        llm, memory = LLM(LocalClient(k, p)), Memory(LocalClient(k, p))
        await memory.add("The access code of the lab is 4417.")
        for i in range(3):
            reply = await llm.chat(
                [{"role": "user", "content": f"question {i} about the lab code"}],
                history=True,
                recall=2,
                remember=True,
            )
            assert reply.context is not None
            assert reply.context["history_used"] == 2 * i  # every earlier turn fits
            assert reply.context["history_dropped"] == 0
            assert len(reply.context["notes_used"]) == 1
        history = await memory.history()
        assert [t["role"] for t in history] == ["user", "assistant"] * 3
        assert history[-1]["content"] == "noted."
        # The prompt the engine saw held the recalled note and the earlier turns.
        core = k.cores["fake"]
        assert isinstance(core, LLMCore) and isinstance(core.engine, FakeEngine)
        prompt = detokenize(core.engine.prompts[-1])
        assert "4417" in prompt and "question 0" in prompt and "question 2" in prompt
        # A call that leaves little room: old turns and the note are dropped, and it says so.
        tight = await llm.chat(
            [{"role": "user", "content": "the lab code again?"}],
            history=True,
            recall=2,
            max_tokens=880,
        )
        assert tight.context is not None
        assert tight.context["history_dropped"] > 0 and tight.context["notes_dropped"]
        assert tight.context["prompt_tokens"] <= tight.context["budget"] == 1024 - 880
        assert tight.usage.prompt_tokens == tight.context["prompt_tokens"]
        with pytest.raises(ContextOverflow):  # its own message alone cannot fit: an error
            await llm.chat([{"role": "user", "content": "x" * 200}], history=True, max_tokens=900)


def test_http_routes_and_sdk(tmp_path: Path) -> None:
    with serve(tmp_path / "data") as server:
        alice, bob = server.agent("alice"), make_member(server, "bob", ["team"])
        a, b = server.client(alice), server.client(bob)
        written = a.post("/api/v1/storage/write", json={"path": "docs/r.txt", "content": "hi"})
        assert written.status_code == 200, written.text
        assert written.json()["kind"] == "storage" and written.json()["status"] == "done"
        raw = {"base64": base64.b64encode(b"\x00\xff").decode()}
        assert a.post("/api/v1/storage/write", json={"path": "bin", "content": raw}).is_success
        read = a.post("/api/v1/storage/read", json={"path": "bin"}).json()["result"]
        assert base64.b64decode(read["content"]["base64"]) == b"\x00\xff"
        # bob: the same 404 as for a missing file, until alice shares the folder with his group
        missing = b.post("/api/v1/storage/read", json={"path": "nope", "owner": "alice"})
        hidden = b.post("/api/v1/storage/read", json={"path": "docs/r.txt", "owner": "alice"})
        assert hidden.status_code == missing.status_code == 404
        shared = a.post("/api/v1/storage/share", json={"path": "docs", "grantee": "group:team"})
        assert shared.is_success, shared.text
        got = b.post("/api/v1/storage/read", json={"path": "docs/r.txt", "owner": "alice"})
        assert base64.b64decode(got.json()["result"]["content"]["base64"]) == b"hi"
        denied = b.post(
            "/api/v1/storage/write", json={"path": "docs/x", "content": "", "owner": "alice"}
        )
        assert denied.status_code == 403
        # memory is private: bob cannot see alice's note
        note = a.post("/api/v1/memory/add", json={"text": "alice's secret"}).json()["result"]
        assert b.post("/api/v1/memory/get", json={"id": note["id"]}).status_code == 404
        # errors: JSON envelopes with types, never a 500
        for path, body, status in [
            ("/api/v1/storage/read", {"path": "../x"}, 400),
            ("/api/v1/storage/read", [1, 2], 400),
            ("/api/v1/storage/nope", {}, 404),
            ("/api/v1/memory/get", {"id": "x"}, 400),
            ("/api/v1/storage/write", {"path": "docs", "content": "x"}, 409),
        ]:
            response = a.post(path, json=body)
            assert response.status_code == status, (path, response.text)
            assert response.json()["error"]["type"]
        assert a.post("/api/v1/storage/ls", content=b"{not json").status_code == 400
        assert a.post("/api/v1/storage/ls?timeout=-1", json={}).status_code == 400
        unauth = server.client().post("/api/v1/storage/ls", json={})
        assert unauth.status_code == 401

        async def over_sdk() -> None:
            async with AsyncClient(server.url, alice) as client:
                agent = Librarian(client)
                assert await agent.run("over http") == "over http"
                assert await agent.storage.read("bin") == b"\x00\xff"
                first = await agent.llm.chat(
                    [{"role": "user", "content": "remember me"}], history=True, remember=True
                )
                second = await agent.llm.chat(
                    [{"role": "user", "content": "and now?"}], history=True, remember=True
                )
                assert first.context is not None and second.context is not None
                assert second.context["history_used"] == 2  # the first exchange came back
                turns = await agent.memory.history()
                assert [t["content"] for t in turns][-4:-2] == ["remember me", first.text]
                with pytest.raises(PermissionDenied):
                    async with AsyncClient(server.url, bob) as other:
                        await Librarian(other).storage.write("docs/y", "x", owner="alice")

        asyncio.run(over_sdk())


def make_member(server: Harness, name: str, groups: list[str]) -> str:
    response = server.reader(server.admin).post(
        "/api/v1/agents", json={"name": name, "groups": groups}
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


def test_openapi_lists_the_resource_routes(tmp_path: Path) -> None:
    with serve(tmp_path / "data") as server:
        paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
        assert "/api/v1/memory/{op}" in paths and "/api/v1/storage/{op}" in paths
