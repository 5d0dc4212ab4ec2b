"""The storage and memory suite, run against SQLite AND a real PostgreSQL server (started by the
test setup itself, tests/postgres.py): operations, versioning, quotas that change nothing,
search ranking, migrations, and isolation between agents (with and without shares)."""

from __future__ import annotations

import re
from typing import Any

import pytest

from aios.config import MemoryConfig, StorageConfig
from aios.errors import (
    AIOSError,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    StorageError,
    StorageFull,
)
from aios.resources import Resources
from aios.storage.db import Database, Job
from aios.storage.files import Principal
from aios.storage.schema import MIGRATIONS, migrate

ALICE, BOB, CAROL = Principal("alice"), Principal("bob", frozenset({"team"})), Principal("carol")


async def open_store(url: str, **limits: Any) -> Resources:
    memory = limits.pop("memory", MemoryConfig())
    store = Resources(StorageConfig(database=url, **limits), memory)
    await store.start()
    return store


@pytest.fixture
def store(resources: Resources) -> Resources:
    return resources


def caller(store: Resources, who: Principal, kind: str = "storage") -> Any:
    async def call(op: str, **args: Any) -> Any:
        return await store.call(who, kind, op, args, Job())

    return call


# -- files ------------------------------------------------------------------------------------
async def test_write_read_append_create(store: Resources) -> None:
    fs = caller(store, ALICE)
    stat = await fs("write", path="a/b/c.txt", content="one")
    assert stat["kind"] == "file" and stat["size"] == 3 and stat["owner"] == "alice"
    assert [e["path"] for e in await fs("ls")] == ["a"]
    assert [e["path"] for e in await fs("ls", recursive=True)] == ["a", "a/b", "a/b/c.txt"]
    await fs("write", path="a/b/c.txt", content=" two", mode="append")
    assert (await fs("read", path="a/b/c.txt"))["content"] == b"one two"
    with pytest.raises(Conflict):
        await fs("write", path="a/b/c.txt", content="x", mode="create")
    with pytest.raises(Conflict):  # a folder where a file is wanted, and the reverse
        await fs("write", path="a/b", content="x")
    with pytest.raises(Conflict):
        await fs("write", path="a/b/c.txt/d", content="x")
    with pytest.raises(Conflict):
        await fs("read", path="a")
    with pytest.raises(NotFound):
        await fs("read", path="nope")
    assert (await fs("stat", path="a/b"))["kind"] == "dir"
    assert (await fs("mkdir", path="a/b"))["kind"] == "dir"  # existing folder: fine


async def test_delete_move_and_history_follow(store: Resources) -> None:
    fs = caller(store, ALICE)
    await fs("write", path="d/x.txt", content="x1")
    await fs("write", path="d/x.txt", content="x2")
    await fs("write", path="d/y.txt", content="y")
    with pytest.raises(Conflict):
        await fs("delete", path="d")
    with pytest.raises(InvalidRequest):
        await fs("move", src="d", dst="d/inner")
    await fs("write", path="e", content="in the way")
    with pytest.raises(Conflict):
        await fs("move", src="d", dst="e")
    await fs("move", src="d", dst="m/d2")
    assert [e["path"] for e in await fs("ls", path="m", recursive=True)] == [
        "m/d2", "m/d2/x.txt", "m/d2/y.txt"
    ]  # fmt: skip
    moved = await fs("history", path="m/d2/x.txt")
    assert moved[0]["op"] == "move" and (await fs("read", path="m/d2/x.txt"))["content"] == b"x2"
    old = await fs("history", path="d/x.txt")  # the old path: ends with a deletion
    assert [v["op"] for v in old] == ["delete", "write", "write"]
    assert await fs("delete", path="m", recursive=True) == 2
    assert await fs("ls", path="") == [await fs("stat", path="e")]
    usage = await fs("usage")
    assert usage["bytes"] == len("in the way") and usage["files"] == 1


async def test_versions_rollback_and_dedup(store: Resources) -> None:
    fs = caller(store, ALICE)
    clock = iter(range(1000, 2000, 10))
    store.files.clock = lambda: float(next(clock))
    for text in ("v1", "v2", "v3"):
        await fs("write", path="f", content=text)
    history = await fs("history", path="f")
    assert [v["size"] for v in history] == [2, 2, 2] and history[0]["id"] > history[1]["id"]
    v1, v2 = history[2]["id"], history[1]["id"]
    assert (await fs("read", path="f", version=v1))["content"] == b"v1"
    await fs("rollback", path="f", version=v1)
    assert (await fs("read", path="f"))["content"] == b"v1"
    await fs("rollback", path="f", at=history[1]["at"])  # by time: v2 was current then
    assert (await fs("read", path="f"))["content"] == b"v2"
    with pytest.raises(NotFound):
        await fs("rollback", path="f", at=1.0)  # before the file existed
    with pytest.raises(InvalidRequest):
        await fs("rollback", path="f", version=v1, at=5.0)
    await fs("delete", path="f")
    with pytest.raises(NotFound):
        await fs("read", path="f")
    await fs("rollback", path="f", version=v2)  # a deleted file comes back
    assert (await fs("read", path="f"))["content"] == b"v2"
    deletion = (await fs("history", path="f"))[1]
    assert deletion["op"] == "delete" and deletion["hash"] is None
    assert await fs("rollback", path="f", version=deletion["id"]) is None
    with pytest.raises(NotFound):
        await fs("stat", path="f")
    await fs("write", path="g", content="v1")  # same content as f's v1: one blob
    blobs = await store.db.run(lambda c: c.scalar("SELECT COUNT(*) FROM blobs"))
    assert blobs == 3  # v1, v2, v3


async def test_quota_failures_change_nothing(url: str) -> None:
    store = await open_store(url, max_bytes=100, max_files=4, max_file_bytes=60)
    try:
        fs = caller(store, ALICE)
        await fs("write", path="d/a", content="x" * 50)
        before = (
            await fs("usage"),
            await fs("ls", recursive=True),
            await fs("history", path="d/a"),
        )
        for args in (
            {"path": "d/b", "content": "y" * 51},  # past max_bytes
            {"path": "d/a", "content": "z" * 61},  # past max_file_bytes
            {"path": "d/a", "content": "w" * 40, "mode": "append"},  # append past a limit
            {"path": "e/f/g/h", "content": ""},  # past max_files (folders count)
        ):
            with pytest.raises(StorageFull):
                await fs("write", **args)
        after = (await fs("usage"), await fs("ls", recursive=True), await fs("history", path="d/a"))
        assert after == before
        await fs("write", path="d/a", content="x" * 60)  # an overwrite that fits is fine
    finally:
        await store.close()


async def test_search_ranks_and_respects_folders(store: Resources) -> None:
    fs = caller(store, ALICE)
    await fs("write", path="docs/cats.md", content="cats cats cats and their whiskers")
    await fs("write", path="docs/dogs.md", content="dogs bark; a cat may watch them")
    await fs("write", path="other/cats.md", content="cats everywhere, cats again")
    for i in range(12):
        await fs("write", path=f"noise/{i}.txt", content=f"weather report number {i}")
    await fs("write", path="bin", content=b"\xff\xfe cats")  # not UTF-8: not indexed
    hits = await fs("search", query="Cats!", folder="docs")
    assert hits[0]["path"] == "docs/cats.md"
    assert all(h["path"].startswith("docs/") for h in hits)
    everywhere = [h["path"] for h in await fs("search", query="cats", limit=10)]
    assert "other/cats.md" in everywhere and "bin" not in everywhere
    await fs("delete", path="other/cats.md")
    assert "other/cats.md" not in [h["path"] for h in await fs("search", query="cats")]
    with pytest.raises(InvalidRequest):
        await fs("search", query="?!")


async def test_migrations_are_recorded_once_and_newer_databases_refused(url: str) -> None:
    db = Database.open(url)
    conn = db.connect()
    try:
        assert migrate(conn) == []  # connect() already applied them
        rows = conn.all("SELECT version FROM aios_migrations ORDER BY version")
        assert [r[0] for r in rows] == [m.version for m in MIGRATIONS]
        conn.run("INSERT INTO aios_migrations (version, name, applied) VALUES (999, 'x', 0)")
        with pytest.raises(StorageError, match="newer"):
            migrate(conn)
    finally:
        conn.close()


# -- isolation and sharing -------------------------------------------------------------------
def _shape(error: AIOSError) -> str:
    return re.sub(r"'[^']*'", "PATH", str(error))


async def test_other_agents_files_look_missing(store: Resources) -> None:
    fs, bob = caller(store, ALICE), caller(store, BOB)
    await fs("write", path="secret/plan.txt", content="top secret")
    attempts = [
        ("read", {"path": "secret/plan.txt"}),
        ("stat", {"path": "secret/plan.txt"}),
        ("ls", {"path": "secret"}),
        ("ls", {"path": ""}),
        ("history", {"path": "secret/plan.txt"}),
        ("search", {"query": "secret"}),
        ("rollback", {"path": "secret/plan.txt", "version": 1}),
        ("delete", {"path": "secret/plan.txt"}),
        ("move", {"src": "secret/plan.txt", "dst": "mine.txt"}),
        ("write", {"path": "secret/plan.txt", "content": "pwned"}),
        ("mkdir", {"path": "secret/x"}),
    ]
    for op, args in attempts:
        with pytest.raises(NotFound) as hidden:
            await bob(op, owner="alice", **args)
        missing_args = {
            k: v.replace("secret", "nothing") if isinstance(v, str) and k != "query" else v
            for k, v in args.items()
        }
        if op not in ("ls", "search", "write", "mkdir"):
            with pytest.raises(NotFound) as missing:
                await bob(op, owner="alice", **missing_args)
            assert _shape(hidden.value) == _shape(missing.value), op
    for owner in ("../alice", "alice/..", "ALICE", "", "a" * 65):
        with pytest.raises(InvalidRequest):
            await bob("read", path="secret/plan.txt", owner=owner)
    for path in ("../alice/secret/plan.txt", "/alice/secret", "a/../../x", "x\x00", "x\\y"):
        with pytest.raises(InvalidRequest):
            await bob("read", path=path)
    assert (await fs("read", path="secret/plan.txt"))["content"] == b"top secret"
    assert len(await fs("history", path="secret/plan.txt")) == 1


async def test_shares_grant_exactly_what_they_say(store: Resources) -> None:
    fs, bob, carol = caller(store, ALICE), caller(store, BOB), caller(store, CAROL)
    await fs("write", path="pub/readme.md", content="shared words")
    await fs("write", path="private/diary.md", content="private words")
    with pytest.raises(NotFound):
        await fs("share", path="missing", grantee="agent:bob")
    with pytest.raises(InvalidRequest):
        await fs("share", path="pub", grantee="bob")
    await fs("share", path="pub", grantee="agent:bob", mode="r")
    assert (await bob("read", path="pub/readme.md", owner="alice"))["content"] == b"shared words"
    assert [e["path"] for e in await bob("ls", path="pub", owner="alice")] == ["pub/readme.md"]
    assert await bob("history", path="pub/readme.md", owner="alice")
    assert [h["path"] for h in await bob("search", query="words", folder="pub", owner="alice")] == [
        "pub/readme.md"
    ]
    with pytest.raises(NotFound):
        await bob("read", path="private/diary.md", owner="alice")
    with pytest.raises(PermissionDenied):
        await bob("write", path="pub/readme.md", content="edit", owner="alice")
    with pytest.raises(PermissionDenied):
        await bob("delete", path="pub/readme.md", owner="alice")
    with pytest.raises(NotFound):  # carol has no share at all
        await carol("read", path="pub/readme.md", owner="alice")
    # read-write to a group bob is in
    await fs("share", path="pub", grantee="group:team", mode="rw")
    await bob("write", path="pub/readme.md", content="edited by bob", owner="alice")
    newest = (await fs("history", path="pub/readme.md"))[0]
    assert newest["author"] == "bob"
    assert (await fs("usage"))["bytes"] == len("edited by bob") + len("private words")
    assert (await bob("usage"))["bytes"] == 0
    shares = await bob("shares")
    assert {s["grantee"] for s in shares["received"]} == {"agent:bob", "group:team"}
    with pytest.raises(InvalidRequest, match="unknown argument"):  # only owners share
        await bob("share", path="pub", grantee="agent:carol", owner="alice")
    assert await fs("unshare", path="pub", grantee="group:team") is True
    assert await fs("unshare", path="pub", grantee="agent:bob") is True
    assert await fs("unshare", path="pub", grantee="agent:bob") is False
    with pytest.raises(NotFound):
        await bob("read", path="pub/readme.md", owner="alice")


# -- memory -------------------------------------------------------------------------------------
async def test_notes_crud_filters_and_ranking(store: Resources) -> None:
    mem = caller(store, ALICE, "memory")
    meta = {"topic": "calendar", "n": 1, "urgent": True, "x": None}
    meeting = await mem(
        "add", text="The meeting with the dean is on Tuesday at noon", metadata=meta
    )
    for i in range(20):
        await mem("add", text=f"grocery list item {i}: apples and bread", metadata={"n": i})
    await mem("add", text="string one", metadata={"n": "1"})
    found = await mem("search", query="when is the meeting?", limit=3)
    assert found[0]["note"]["id"] == meeting["id"] and found[0]["score"] > 0
    assert [n["note"]["id"] for n in await mem("search", query="apples", limit=5)]
    assert len(await mem("search", query="apples", limit=5)) == 5
    assert [n["id"] for n in await mem("list", where={"topic": "calendar"})] == [meeting["id"]]
    numbers = await mem("list", where={"n": 1})
    assert {n["text"][:6] for n in numbers} == {"The me", "grocer"}  # not the string "1"
    assert [n["id"] for n in await mem("list", where={"urgent": True})] == [meeting["id"]]
    assert [n["id"] for n in await mem("list", where={"x": None})] == [meeting["id"]]
    newest = await mem("list", limit=2)
    assert newest[0]["text"] == "string one"
    updated = await mem("update", id=meeting["id"], text="The meeting moved to Friday")
    assert updated["metadata"]["topic"] == "calendar"
    assert (await mem("get", id=meeting["id"]))["text"] == "The meeting moved to Friday"
    assert (await mem("search", query="friday"))[0]["note"]["id"] == meeting["id"]
    assert await mem("search", query="tuesday") == []
    assert await mem("delete", id=meeting["id"]) is True
    with pytest.raises(NotFound):
        await mem("get", id=meeting["id"])
    for bad in ({"text": ""}, {"text": "x", "metadata": {"a": [1]}},
                {"text": "x", "metadata": {"bad key": 1}}, {"text": 5}):  # fmt: skip
        with pytest.raises(InvalidRequest):
            await mem("add", **bad)
    with pytest.raises(InvalidRequest):
        await mem("get", id="1")
    with pytest.raises(InvalidRequest):
        await mem("list", limit=0)


async def test_history_across_chunks_and_restart(url: str) -> None:
    store = await open_store(url, memory=MemoryConfig(chunk_turns=4))
    try:
        mem = caller(store, ALICE, "memory")
        for i in range(15):
            await mem("remember", turns=[["user", f"q{i}"], ["assistant", f"a{i}"]])
        last = await mem("history", limit=10)
        assert [t["n"] for t in last] == list(range(20, 30))
        assert [t["content"] for t in last[-2:]] == ["q14", "a14"]
        with pytest.raises(InvalidRequest):
            await mem("remember", turns=[["robot", "x"]])
    finally:
        await store.close()
    again = await open_store(url, memory=MemoryConfig(chunk_turns=7))  # a restart
    try:
        mem = caller(again, ALICE, "memory")
        assert [t["content"] for t in await mem("history", limit=3)] == ["a13", "q14", "a14"]
        assert await mem("forget") == 30
        assert await mem("history") == []
    finally:
        await again.close()


async def test_memory_is_private(store: Resources) -> None:
    mem, bob = caller(store, ALICE, "memory"), caller(store, BOB, "memory")
    note = await mem("add", text="alice's private thought")
    await mem("remember", turns=[["user", "alice's question"]])
    for op, args in [("get", {"id": note["id"]}), ("update", {"id": note["id"], "text": "x"}),
                     ("delete", {"id": note["id"]})]:  # fmt: skip
        with pytest.raises(NotFound):
            await bob(op, **args)
    assert await bob("search", query="private thought") == []
    assert await bob("list") == []
    assert await bob("history") == []
    with pytest.raises(InvalidRequest, match="unknown argument"):
        await bob("get", id=note["id"], owner="alice")
    assert (await mem("get", id=note["id"]))["text"] == "alice's private thought"


async def test_eviction_keeps_budgets_and_notes_come_back_intact(url: str) -> None:
    budget = MemoryConfig(ram_bytes=4000, agent_ram_bytes=2000, high_water=0.8)
    store = await open_store(url, memory=budget)
    try:
        manager = store.memory
        originals: dict[int, dict[str, Any]] = {}
        for i in range(200):
            owner = ALICE if i % 2 else CAROL
            note = await store.call(owner, "memory", "add", {"text": f"note {i} " * 5}, Job())
            originals[note["id"]] = {"owner": owner, **note}
            assert manager.resident() <= 4000 * 0.8
            assert manager.resident("alice") <= 2000 and manager.resident("carol") <= 2000
        assert manager.stats.evictions > 100
        faults = manager.stats.faults
        for note_id, note in originals.items():
            got = await store.call(note["owner"], "memory", "get", {"id": note_id}, Job())
            assert got == {k: v for k, v in note.items() if k != "owner"}
            assert manager.resident() <= 4000 * 0.8
        assert manager.stats.faults > faults  # evicted notes came back from the database
    finally:
        await store.close()
