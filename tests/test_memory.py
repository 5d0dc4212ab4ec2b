"""The memory manager on SQLite AND a real PostgreSQL (every test runs on both): notes (CRUD,
metadata filters, ranked search), conversation history across chunks, isolation between
agents, the RAM tier's byte budgets under eviction, and a restart that finds everything."""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from syscalls import syscalls

from aios.config import MemoryConfig, StorageConfig
from aios.errors import InvalidRequest, NotFound, StorageError
from aios.memory.manager import MemoryManager
from aios.memory.notes import Note
from aios.resources import Resources
from aios.storage.db import Conn, Database, Job
from aios.storage.files import Principal

ALICE, BOB = Principal("alice"), Principal("bob")


async def start(url: str, memory: MemoryConfig | None = None) -> Resources:
    r = Resources(StorageConfig(database=url), memory or MemoryConfig())
    await r.start()
    return r


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = Database.open(url)
    await database.start()
    yield database
    await database.close()


mem, raises = syscalls("memory")


async def ids(r: Resources, who: Principal, **where: Any) -> list[int]:
    return [n["id"] for n in await mem(r, who, "list", where=where, limit=10_000)]


# -- notes -----------------------------------------------------------------------------------
async def test_notes_add_get_update_delete(resources: Resources) -> None:
    r = resources
    note = await mem(r, ALICE, "add", text="Buy oat milk", metadata={"list": "shopping"})
    assert set(note) == {"id", "text", "metadata", "created", "updated"}
    assert note["text"] == "Buy oat milk" and note["metadata"] == {"list": "shopping"}
    assert note["created"] == note["updated"]
    assert await mem(r, ALICE, "get", id=note["id"]) == note
    bare = await mem(r, ALICE, "add", text="no metadata")
    assert bare["metadata"] == {} and bare["id"] != note["id"]

    text_only = await mem(r, ALICE, "update", id=note["id"], text="Buy soy milk")
    assert text_only["text"] == "Buy soy milk" and text_only["metadata"] == {"list": "shopping"}
    assert text_only["created"] == note["created"] and text_only["updated"] >= note["updated"]
    meta_only = await mem(r, ALICE, "update", id=note["id"], metadata={"list": "groceries"})
    assert meta_only["text"] == "Buy soy milk" and meta_only["metadata"] == {"list": "groceries"}
    cleared = await mem(r, ALICE, "update", id=note["id"], metadata={})
    assert cleared["metadata"] == {}
    assert await mem(r, ALICE, "get", id=note["id"]) == cleared
    await raises(InvalidRequest, r, ALICE, "update", id=note["id"])  # nothing to change

    assert await mem(r, ALICE, "delete", id=note["id"]) is True
    await raises(NotFound, r, ALICE, "get", id=note["id"])
    await raises(NotFound, r, ALICE, "delete", id=note["id"])
    await raises(NotFound, r, ALICE, "update", id=note["id"], text="back?")
    assert await ids(r, ALICE) == [bare["id"]]
    assert (await mem(r, ALICE, "usage"))["notes"] == 1
    # unicode round-trips
    odd = await mem(r, ALICE, "add", text="naïve café 日本 🎉", metadata={"lang": "日本 ü"})
    assert await mem(r, ALICE, "get", id=odd["id"]) == odd


async def test_list_newest_first_with_metadata_filters(resources: Resources) -> None:
    r = resources
    metas: list[dict[str, Any]] = [
        {"kind": "a", "n": 1, "flag": True, "x": None},
        {"kind": "b", "n": "1", "flag": False},
        {"kind": "a", "n": 1.5, "flag": 1},
        {"kind": "a", "n": 2, "x": "null"},
        {},
        {"kind": "a", "n": 0, "flag": 0, "x": ""},
    ]
    n = [
        (await mem(r, ALICE, "add", text=f"note {i}", metadata=m))["id"]
        for i, m in enumerate(metas)
    ]
    assert await ids(r, ALICE) == n[::-1]
    assert [x["id"] for x in await mem(r, ALICE, "list", limit=2)] == [n[5], n[4]]

    assert await ids(r, ALICE, kind="a") == [n[5], n[3], n[2], n[0]]
    assert await ids(r, ALICE, n=1) == [n[0]]  # not the string "1", not true
    assert await ids(r, ALICE, n=1.0) == [n[0]]  # numbers compare as numbers
    assert await ids(r, ALICE, n="1") == [n[1]]
    assert await ids(r, ALICE, n=1.5) == [n[2]]
    assert await ids(r, ALICE, n=0) == [n[5]]
    assert await ids(r, ALICE, flag=True) == [n[0]]  # not the number 1
    assert await ids(r, ALICE, flag=1) == [n[2]]  # not true
    assert await ids(r, ALICE, flag=False) == [n[1]]  # not the number 0
    assert await ids(r, ALICE, flag=0) == [n[5]]
    assert await ids(r, ALICE, x=None) == [n[0]]  # a null value, not a missing key
    assert await ids(r, ALICE, x="null") == [n[3]]
    assert await ids(r, ALICE, x="") == [n[5]]
    assert await ids(r, ALICE, kind="a", n=2) == [n[3]]
    assert await ids(r, ALICE, kind="b", n=2) == []
    assert await ids(r, ALICE, kind="c") == []
    assert await ids(r, ALICE, missing="a") == []
    assert [x["id"] for x in await mem(r, ALICE, "list", where={"kind": "a"}, limit=1)] == [n[5]]
    assert await mem(r, ALICE, "list", where=None) == await mem(r, ALICE, "list")


def filler(i: int) -> str:
    topics = [
        "code review for the parser module",
        "lunch with the design team on Friday",
        "the garden needs watering twice a week",
        "read the paper about distributed consensus",
        "call the plumber about the kitchen sink",
        "weekly sync moved to the afternoon",
        "remember to renew the passport",
    ]
    return f"{topics[i % len(topics)]} (item {i})"


async def test_search_ranks_the_relevant_note_first(resources: Resources) -> None:
    r = resources
    for i in range(19):
        await mem(r, ALICE, "add", text=filler(i), metadata={"topic": "work" if i % 2 else "home"})
        if i == 9:
            relevant = await mem(
                r,
                ALICE,
                "add",
                text="The quarterly budget review: the budget is due before the review on Monday",
                metadata={"topic": "work"},
            )
    found = await mem(r, ALICE, "search", query="When is the budget review?")
    assert found[0]["note"] == relevant
    assert all(set(f) == {"note", "score"} for f in found)
    scores = [f["score"] for f in found]
    assert scores == sorted(scores, reverse=True) and scores[0] > scores[-1]
    assert len(found) <= 5  # the default top-k
    top2 = await mem(r, ALICE, "search", query="budget review", limit=2)
    assert len(top2) == 2 and top2[0]["note"]["id"] == relevant["id"]

    home = await mem(r, ALICE, "search", query="budget review", where={"topic": "home"}, limit=50)
    assert home and all(f["note"]["metadata"] == {"topic": "home"} for f in home)
    assert relevant["id"] not in [f["note"]["id"] for f in home]
    work = await mem(r, ALICE, "search", query="budget review", where={"topic": "work"}, limit=50)
    assert work[0]["note"]["id"] == relevant["id"]
    assert await mem(r, ALICE, "search", query="zeppelin") == []
    # stemming: "reviews" finds "review"; query syntax is just words
    assert (await mem(r, ALICE, "search", query="Reviews BUDGETS"))[0]["note"] == relevant
    await mem(r, ALICE, "search", query='"budget" OR NOT * ( : ^ NEAR -review')
    # an updated note is searched by its new text, a deleted one not at all
    await mem(r, ALICE, "update", id=relevant["id"], text="nothing about money now")
    assert relevant["id"] not in [
        f["note"]["id"] for f in await mem(r, ALICE, "search", query="budget", limit=50)
    ]
    assert (await mem(r, ALICE, "search", query="money"))[0]["note"]["id"] == relevant["id"]
    await mem(r, ALICE, "delete", id=relevant["id"])
    assert await mem(r, ALICE, "search", query="money") == []


async def test_search_scores_do_not_depend_on_other_agents_notes(
    resources: Resources, request: pytest.FixtureRequest
) -> None:
    """Scores must not reveal what other agents remember (term statistics across agents)."""
    if "sqlite" in request.node.name:  # a known limit, documented in the README
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="FTS5 ranks with corpus-wide statistics")
        )
    r = resources
    await mem(r, BOB, "add", text="the merger is secret")
    await mem(r, BOB, "add", text="lunch menu")
    alone = await mem(r, BOB, "search", query="merger")
    for i in range(5):
        await mem(r, ALICE, "add", text=f"merger plan {i}")
        await mem(r, ALICE, "add", text=f"unrelated {i}")
    assert await mem(r, BOB, "search", query="merger") == alone


async def test_bad_requests_are_clear_errors(resources: Resources) -> None:
    r = resources
    note = await mem(r, ALICE, "add", text="a note")
    bad_metadata: list[Any] = [
        {"nested": {"a": 1}}, {"list": [1, 2]}, {"bad key": 1}, {"": 1}, {"k" * 65: 1},
        {"quote\"": 1}, "text", [1], 5, {"big": "x" * (17 << 10)},
    ]  # fmt: skip
    for metadata in bad_metadata:
        await raises(InvalidRequest, r, ALICE, "add", text="x", metadata=metadata)
        await raises(InvalidRequest, r, ALICE, "update", id=note["id"], metadata=metadata)
        await raises(InvalidRequest, r, ALICE, "list", where=metadata)
        await raises(InvalidRequest, r, ALICE, "search", query="note", where=metadata)
    for text in ["", "   ", None, 5, ["a"], "x" * ((256 << 10) + 1)]:
        await raises(InvalidRequest, r, ALICE, "add", text=text)
        await raises(InvalidRequest, r, ALICE, "update", id=note["id"], text=text)
    for bad_id in ["1", 1.0, True, None, [1]]:
        for op in ("get", "delete"):
            await raises(InvalidRequest, r, ALICE, op, id=bad_id)
        await raises(InvalidRequest, r, ALICE, "update", id=bad_id, text="x")
    for bad_limit in [0, -1, 10_001, "5", True, 2.5, None]:
        await raises(InvalidRequest, r, ALICE, "list", limit=bad_limit)
        await raises(InvalidRequest, r, ALICE, "search", query="note", limit=bad_limit)
        await raises(InvalidRequest, r, ALICE, "history", limit=bad_limit)
    for query in ["", " ?! ", None, 5]:
        await raises(InvalidRequest, r, ALICE, "search", query=query)
    for turns in [[["robot", "hi"]], [["user", 5]], [["user"]], [{"role": "user"}], ["hi"]]:
        await raises(InvalidRequest, r, ALICE, "remember", turns=turns)

    # unknown operations, kinds and arguments; missing arguments
    with pytest.raises(NotFound, match="operations:"):
        await mem(r, ALICE, "explode")
    with pytest.raises(NotFound, match="kinds"):
        await r.call(ALICE, "brain", "get", {"id": 1}, Job())
    with pytest.raises(InvalidRequest, match="unknown argument"):
        await mem(r, ALICE, "get", id=note["id"], owner="bob")  # memory is always the caller's
    with pytest.raises(InvalidRequest, match="unknown argument"):
        await mem(r, ALICE, "add", text="x", tags=["a"])
    with pytest.raises(InvalidRequest):
        await mem(r, ALICE, "add")
    with pytest.raises(InvalidRequest, match="must be an object"):
        await r.call(ALICE, "memory", "list", [], Job())  # type: ignore[arg-type]
    assert await mem(r, ALICE, "get", id=note["id"]) == note
    assert await ids(r, ALICE) == [note["id"]]  # nothing bad was stored


async def test_non_finite_metadata_is_refused(resources: Resources) -> None:
    """NaN and Infinity are not JSON: accepted, they fail on PostgreSQL as a database error
    and on SQLite poison every later metadata filter over the agent's notes."""
    r = resources
    await mem(r, ALICE, "add", text="fine", metadata={"n": 1})
    for value in (math.nan, math.inf, -math.inf):
        await raises(InvalidRequest, r, ALICE, "add", text="x", metadata={"n": value})
        await raises(InvalidRequest, r, ALICE, "list", where={"n": value})
    assert len(await mem(r, ALICE, "list", where={"n": 1})) == 1
    assert len(await mem(r, ALICE, "search", query="fine", where={"n": 1})) == 1


async def test_a_lone_surrogate_is_an_invalid_request(resources: Resources) -> None:
    """JSON can carry "\ud800"; it cannot be encoded as UTF-8, so it must be refused as
    InvalidRequest (not crash with UnicodeEncodeError or become a database error)."""
    r = resources
    note = await mem(r, ALICE, "add", text="fine")
    await raises(InvalidRequest, r, ALICE, "add", text="\ud800 alone")
    await raises(InvalidRequest, r, ALICE, "update", id=note["id"], text="\ud800")
    await raises(InvalidRequest, r, ALICE, "add", text="meta", metadata={"v": "\ud800"})
    await raises(InvalidRequest, r, ALICE, "remember", turns=[["user", "\ud800"]])
    assert await ids(r, ALICE) == [note["id"]] and await mem(r, ALICE, "history") == []


async def test_nul_characters_behave_the_same_on_both_backends(resources: Resources) -> None:
    """PostgreSQL text and jsonb cannot hold NUL, SQLite can: either both store it faithfully
    or both refuse it as InvalidRequest, never a database error on one backend only."""
    r = resources
    try:
        note = await mem(r, ALICE, "add", text="a\x00b")
    except InvalidRequest:
        pass
    else:
        assert (await mem(r, ALICE, "get", id=note["id"]))["text"] == "a\x00b"
    try:
        note = await mem(r, ALICE, "add", text="meta", metadata={"v": "a\x00b"})
    except InvalidRequest:
        pass
    else:
        assert (await mem(r, ALICE, "get", id=note["id"]))["metadata"] == {"v": "a\x00b"}
    try:
        await mem(r, ALICE, "remember", turns=[["user", "a\x00b"]])
    except InvalidRequest:
        pass
    else:
        assert (await mem(r, ALICE, "history"))[-1]["content"] == "a\x00b"


async def test_an_out_of_range_id_is_not_a_database_error(resources: Resources) -> None:
    r = resources
    for big in (2**63, -(2**63) - 1, 2**80):
        for op, args in [("get", {}), ("delete", {}), ("update", {"text": "x"})]:
            with pytest.raises((NotFound, InvalidRequest)):
                await mem(r, ALICE, op, id=big, **args)


# -- conversation history --------------------------------------------------------------------
async def test_remember_history_forget(resources: Resources) -> None:
    r = resources
    assert await mem(r, ALICE, "history") == []
    added = await mem(r, ALICE, "remember", turns=[["user", "hi"], ["assistant", "hello!"]])
    assert [(t["n"], t["role"], t["content"]) for t in added] == [
        (0, "user", "hi"), (1, "assistant", "hello!"),
    ]  # fmt: skip
    assert await mem(r, ALICE, "remember", turns=[]) == []
    await mem(r, ALICE, "remember", turns=[("system", "be nice")])
    history = await mem(r, ALICE, "history")
    assert [(t["n"], t["content"]) for t in history] == [(0, "hi"), (1, "hello!"), (2, "be nice")]
    assert history[:2] == added
    assert [t["n"] for t in await mem(r, ALICE, "history", limit=2)] == [1, 2]

    assert await mem(r, ALICE, "forget") == 3
    assert await mem(r, ALICE, "history") == []
    assert await mem(r, ALICE, "forget") == 0
    again = await mem(r, ALICE, "remember", turns=[["user", "new start"]])
    assert again[0]["n"] == 0
    assert [t["content"] for t in await mem(r, ALICE, "history")] == ["new start"]


@pytest.mark.parametrize("ram_bytes", [64 << 20, 600, 100])  # 100: one turn fits, not two
async def test_history_across_chunk_boundaries(url: str, ram_bytes: int) -> None:
    """chunk_turns=4 and 30 turns in uneven batches; with a tiny RAM tier chunks are evicted
    and faulted back in. The last N turns always come back in order."""
    config = MemoryConfig(chunk_turns=4, ram_bytes=ram_bytes, agent_ram_bytes=ram_bytes)
    r = await start(url, config)
    model: list[tuple[str, str]] = []
    try:
        n = 0
        for batch in (1, 3, 5, 2, 7, 4, 8):
            turns = [
                ("user" if (n + i) % 2 == 0 else "assistant", f"turn {n + i}") for i in range(batch)
            ]
            n += batch
            await mem(r, ALICE, "remember", turns=turns)
            model += turns
            for limit in (1, 3, 4, 5, 10, 100):
                got = await mem(r, ALICE, "history", limit=limit)
                assert [(t["role"], t["content"]) for t in got] == model[-limit:]
                assert [t["n"] for t in got] == list(range(max(0, n - limit), n))
            assert r.memory.resident() <= ram_bytes * config.high_water
        assert n == 30
        last10 = await mem(r, ALICE, "history", limit=10)
        assert [t["content"] for t in last10] == [f"turn {i}" for i in range(20, 30)]
        if ram_bytes < 1000:  # chunks were evicted (or never fit) and read back
            assert r.memory.stats.faults > 0
            assert r.memory.stats.evictions > 0 or ram_bytes == 100
    finally:
        await r.close()
    restarted = await start(url, config)  # a restart reads it all from the database
    try:
        got = await mem(restarted, ALICE, "history", limit=10)
        assert [t["content"] for t in got] == [f"turn {i}" for i in range(20, 30)]
        assert got == last10
        assert len(await mem(restarted, ALICE, "history", limit=10_000)) == 30
        await mem(restarted, ALICE, "remember", turns=[["user", "turn 30"]])
        got = await mem(restarted, ALICE, "history", limit=3)
        assert [t["n"] for t in got] == [28, 29, 30]
    finally:
        await restarted.close()


# -- isolation -------------------------------------------------------------------------------
async def test_agents_cannot_reach_each_others_memory(resources: Resources) -> None:
    r = resources
    secret = await mem(r, ALICE, "add", text="alice's secret launch code", metadata={"k": "v"})
    await mem(r, ALICE, "remember", turns=[["user", "alice's private chat"]])
    missing_id = secret["id"] + 1000

    for op, args in [("get", {}), ("delete", {}), ("update", {"text": "hijacked"})]:
        theirs = await raises(NotFound, r, BOB, op, id=secret["id"], **args)
        nothing = await raises(NotFound, r, BOB, op, id=missing_id, **args)
        assert str(theirs).replace(str(secret["id"]), "#") == str(nothing).replace(
            str(missing_id), "#"
        )
    await raises(NotFound, r, BOB, "update", id=secret["id"], metadata={"k": "stolen"})
    assert await mem(r, BOB, "search", query="secret launch code") == []
    assert await mem(r, BOB, "search", query="secret", where={"k": "v"}) == []
    assert await mem(r, BOB, "list") == []
    assert await mem(r, BOB, "list", where={"k": "v"}) == []
    assert await mem(r, BOB, "history") == []
    assert await mem(r, BOB, "forget") == 0
    assert (await mem(r, BOB, "usage"))["notes"] == 0
    bobs = await mem(r, BOB, "add", text="bob's note")
    await raises(NotFound, r, ALICE, "get", id=bobs["id"])

    # alice's memory is untouched, in RAM and in the database
    assert await mem(r, ALICE, "get", id=secret["id"]) == secret
    fresh = MemoryManager(r.db, MemoryConfig())
    assert (await fresh.get("alice", secret["id"])).to_json() == secret
    assert [t.content for t in await fresh.history("alice")] == ["alice's private chat"]
    assert await ids(r, ALICE) == [secret["id"]]


# -- the RAM tier ----------------------------------------------------------------------------
def check_budgets(manager: MemoryManager, owners: list[str]) -> None:
    config = manager.config
    assert manager.resident() <= config.ram_bytes * config.high_water
    for owner in owners:
        assert 0 <= manager.resident(owner) <= config.agent_ram_bytes
    assert manager.resident() == sum(manager.resident(o) for o in owners)
    assert manager.stats.resident_bytes == manager.resident()


async def test_eviction_keeps_budgets_and_notes_come_back_intact(db: Database) -> None:
    config = MemoryConfig(ram_bytes=4000, agent_ram_bytes=1500, high_water=0.8)
    manager = MemoryManager(db, config)
    owners = ["alice", "bob", "carol"]
    originals: dict[int, tuple[str, Note]] = {}
    for i in range(200):
        owner = owners[i % 3]
        text = f"note {i} about " + " ".join(f"w{(i * j) % 97}" for j in range(8))
        note = await manager.add(owner, text, {"i": i, "even": i % 2 == 0})
        originals[note.id] = (owner, note)
        check_budgets(manager, owners)
    assert manager.stats.evictions > 100
    assert manager.stats.blocks < 200

    faults, hits = manager.stats.faults, manager.stats.hits
    for note_id, (owner, note) in originals.items():
        assert await manager.get(owner, note_id) == note
        check_budgets(manager, owners)
    assert manager.stats.faults > faults  # evicted notes came back from the database
    faults, hits = manager.stats.faults, manager.stats.hits
    last_id, (last_owner, last_note) = max(originals.items())
    assert await manager.get(last_owner, last_id) == last_note  # just read: resident
    assert (manager.stats.hits, manager.stats.faults) == (hits + 1, faults)

    # updates, deletes, searches and history keep within budget too
    for note_id, (owner, note) in list(originals.items())[::7]:
        updated = await manager.update(owner, note_id, text=note.text + " (edited)")
        assert (await manager.get(owner, note_id)).text == updated.text
        check_budgets(manager, owners)
    for note_id, (owner, _) in list(originals.items())[1::11]:
        await manager.delete(owner, note_id)
        check_budgets(manager, owners)
        with pytest.raises(NotFound):
            await manager.get(owner, note_id)
    for owner in owners:
        await manager.remember(owner, [("user", "x" * 300)] * 10)
        await manager.history(owner, limit=10)
        await manager.search(owner, "note about w1")
        check_budgets(manager, owners)
    # a note bigger than an agent's whole budget is never resident, but is stored
    big = await manager.add("alice", "b" * 2000)
    check_budgets(manager, owners)
    assert (await manager.get("alice", big.id)).text == "b" * 2000
    check_budgets(manager, owners)


async def test_one_agent_never_takes_more_than_its_budget(db: Database) -> None:
    config = MemoryConfig(ram_bytes=100_000, agent_ram_bytes=1000, high_water=0.8)
    manager = MemoryManager(db, config)
    quiet = await manager.add("bob", "bob's one note")
    for i in range(100):
        await manager.add("alice", f"alice note {i} " + "x" * 100)
        assert manager.resident("alice") <= 1000
    for note in await manager.list_notes("alice", limit=100):
        await manager.get("alice", note.id)
        assert manager.resident("alice") <= 1000
    # a busy agent evicts its own blocks, never another agent's
    hits = manager.stats.hits
    assert await manager.get("bob", quiet.id) == quiet
    assert manager.stats.hits == hits + 1
    assert manager.resident("bob") == quiet.size
    usage = await manager.usage("alice")
    assert usage["resident_bytes"] == manager.resident("alice") and usage["notes"] == 100


async def test_a_second_manager_over_the_same_database_sees_everything(url: str) -> None:
    first = await start(url, MemoryConfig(ram_bytes=2000, agent_ram_bytes=1000))
    notes = []
    try:
        for i in range(30):
            who = ALICE if i % 3 else BOB
            notes.append((who, await mem(first, who, "add", text=filler(i), metadata={"i": i})))
        await mem(first, ALICE, "update", id=notes[1][1]["id"], text="edited budget note")
        notes[1] = (ALICE, await mem(first, ALICE, "get", id=notes[1][1]["id"]))
        await mem(first, BOB, "delete", id=notes[0][1]["id"])
        del notes[0]
        await mem(first, ALICE, "remember", turns=[["user", f"t{i}"] for i in range(9)])
        before = {
            who.name: (
                await mem(first, who, "list", limit=100),
                await mem(first, who, "search", query="review budget garden", limit=50),
                await mem(first, who, "history", limit=100),
            )
            for who in (ALICE, BOB)
        }
    finally:
        await first.close()

    second = await start(url)
    try:
        for who in (ALICE, BOB):
            listed, found, history = before[who.name]
            assert await mem(second, who, "list", limit=100) == listed
            again = await mem(second, who, "search", query="review budget garden", limit=50)
            assert [f["note"] for f in again] == [f["note"] for f in found]
            assert await mem(second, who, "history", limit=100) == history
        for who, note in notes:
            assert await mem(second, who, "get", id=note["id"]) == note
        assert second.memory.stats.faults >= len(notes)  # all read from the database
    finally:
        await second.close()


async def test_a_get_racing_a_delete_does_not_resurrect_the_note(db: Database) -> None:
    """A get that read the note from the database just before a concurrent delete removed it
    must not leave the deleted note resident (later gets would return it as a hit)."""
    manager = MemoryManager(db, MemoryConfig())
    note = await manager.add("alice", "soon gone")
    manager = MemoryManager(db, MemoryConfig())  # nothing resident: the get will fault
    read = threading.Event()
    get, delete = manager.notes.get, manager.notes.delete

    def slow_get(conn: Conn, owner: str, note_id: int) -> Note:
        try:
            return get(conn, owner, note_id)
        finally:
            read.set()

    def late_delete(conn: Conn, owner: str, note_id: int) -> None:
        read.wait(10)  # the delete commits after the get read the row
        delete(conn, owner, note_id)

    manager.notes.get = slow_get  # type: ignore[method-assign]
    manager.notes.delete = late_delete  # type: ignore[method-assign]
    results = await asyncio.gather(
        manager.get("alice", note.id), manager.delete("alice", note.id), return_exceptions=True
    )
    assert results[1] is True
    with pytest.raises(NotFound):
        await manager.get("alice", note.id)
    assert manager.resident("alice") == 0


async def test_an_update_racing_a_delete_does_not_resurrect_the_note(db: Database) -> None:
    """An update that committed just before a concurrent delete must not leave the deleted
    note resident."""
    manager = MemoryManager(db, MemoryConfig())
    note = await manager.add("alice", "soon gone")
    updated = threading.Event()
    update, delete = manager.notes.update, manager.notes.delete

    def first_update(conn: Conn, *args: Any) -> Note:
        try:
            return update(conn, *args)
        finally:
            updated.set()

    def late_delete(conn: Conn, owner: str, note_id: int) -> None:
        updated.wait(10)
        delete(conn, owner, note_id)

    manager.notes.update = first_update  # type: ignore[method-assign]
    manager.notes.delete = late_delete  # type: ignore[method-assign]
    results = await asyncio.gather(
        manager.update("alice", note.id, text="edited"),
        manager.delete("alice", note.id),
        return_exceptions=True,
    )
    assert results[1] is True
    with pytest.raises(NotFound):
        await manager.get("alice", note.id)


async def test_a_forget_racing_a_remember_leaves_ram_and_database_agreeing(
    db: Database,
) -> None:
    """remember's append committed, then forget's clear: the history is empty, in RAM as in
    the database (not the forgotten turn, served from RAM)."""
    manager = MemoryManager(db, MemoryConfig(chunk_turns=4))
    appended = threading.Event()
    append, clear = manager.notes.append, manager.notes.clear

    def first_append(conn: Conn, owner: str, turns: list[tuple[str, str]]) -> Any:
        try:
            return append(conn, owner, turns)
        finally:
            appended.set()

    def late_clear(conn: Conn, owner: str) -> int:
        appended.wait(10)
        return clear(conn, owner)

    manager.notes.append = first_append  # type: ignore[method-assign]
    manager.notes.clear = late_clear  # type: ignore[method-assign]
    await asyncio.gather(
        manager.remember("alice", [("user", "forget me")]), manager.forget("alice")
    )
    on_disk = await MemoryManager(db, MemoryConfig(chunk_turns=4)).history("alice")
    assert on_disk == []
    assert await manager.history("alice") == on_disk
    added = await manager.remember("alice", [("user", "after")])
    assert [t.n for t in added] == [0]
    assert [t.content for t in await manager.history("alice")] == ["after"]


async def test_a_closed_database_answers_storage_error(url: str) -> None:
    """A database that is gone answers StorageError, not a driver exception."""
    r = await start(url)
    await r.close()
    with pytest.raises(StorageError, match="not open"):
        await mem(r, ALICE, "list")
