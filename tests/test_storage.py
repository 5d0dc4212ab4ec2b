"""The storage manager through ``Resources.call``, on SQLite AND a real PostgreSQL (every test runs
on both): file operations, versions and rollback, content dedup, quotas that change nothing,
search, migrations, and isolation between agents (no share, read and read-write shares, group
shares, path traversal)."""

from __future__ import annotations

import sqlite3
import string
import time
from collections.abc import Iterator
from typing import Any

import pytest
from syscalls import syscalls

from aios.config import MemoryConfig, StorageConfig
from aios.errors import (
    AIOSError,
    Conflict,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    StorageError,
    StorageFull,
    SyscallCancelled,
)
from aios.resources import Resources
from aios.storage.db import Conn, Database, Job
from aios.storage.files import INDEX_BYTES, Principal
from aios.storage.schema import MIGRATIONS, migrate

ALICE = Principal("alice")
BOB = Principal("bob")
BOB_TEAM = Principal("bob", frozenset({"team"}))
CAROL_TEAM = Principal("carol", frozenset({"team"}))


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(resources: Resources) -> Iterator[Clock]:
    c = Clock()
    resources.files.clock = c
    yield c


call, raises = syscalls("storage")


def limit(r: Resources, **limits: int) -> None:
    """Give every agent this quota from now on."""
    r.files.limits = StorageConfig(**limits)


async def content(r: Resources, who: Principal, path: str, **args: Any) -> bytes:
    result = await call(r, who, "read", path=path, **args)
    data: bytes = result["content"]
    return data


async def paths(r: Resources, who: Principal, path: str = "", **args: Any) -> list[str]:
    return [e["path"] for e in await call(r, who, "ls", path=path, **args)]


async def tables(r: Resources) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every storage table (the strictest "nothing changed")."""

    def dump(conn: Conn) -> dict[str, list[tuple[Any, ...]]]:
        return {
            "files": conn.all(
                "SELECT owner, path, kind, version, hash, size, created, modified FROM files "
                "ORDER BY owner, path"
            ),
            "versions": conn.all(
                "SELECT id, owner, path, hash, size, op, at, author FROM versions ORDER BY id"
            ),
            "blobs": conn.all("SELECT hash, size FROM blobs ORDER BY hash"),
            "shares": conn.all("SELECT owner, path, grantee, mode FROM shares ORDER BY 1, 2, 3"),
            "usage": conn.all("SELECT owner, bytes, files FROM usage ORDER BY owner"),
        }

    result: dict[str, list[tuple[Any, ...]]] = await r.db.run(dump)
    return result


async def snapshot(r: Resources, who: Principal) -> dict[str, Any]:
    """What an agent sees of its own namespace: usage, the tree, every history."""
    tree = await call(r, who, "ls", recursive=True)
    histories = {}
    for path in sorted({row[2] for row in (await tables(r))["versions"] if row[1] == who.name}):
        histories[path] = await call(r, who, "history", path=path)
    return {"usage": await call(r, who, "usage"), "tree": tree, "histories": histories}


# -- write, read, ls, stat, mkdir ------------------------------------------------------------
async def test_write_read_overwrite_create_append(resources: Resources) -> None:
    r = resources
    stat = await call(r, ALICE, "write", path="docs/a.txt", content="one")
    assert stat["owner"] == "alice" and stat["path"] == "docs/a.txt"
    assert stat["kind"] == "file" and stat["size"] == 3 and isinstance(stat["version"], int)
    read = await call(r, ALICE, "read", path="docs/a.txt")
    assert read["content"] == b"one" and read["stat"] == stat

    stat2 = await call(r, ALICE, "write", path="docs/a.txt", content=b"two!")
    assert stat2["size"] == 4 and stat2["version"] > stat["version"]
    assert stat2["created"] == stat["created"]
    assert await content(r, ALICE, "docs/a.txt") == b"two!"

    await raises(Conflict, r, ALICE, "write", path="docs/a.txt", content="x", mode="create")
    assert await content(r, ALICE, "docs/a.txt") == b"two!"
    await call(r, ALICE, "write", path="docs/new.txt", content="fresh", mode="create")
    assert await content(r, ALICE, "docs/new.txt") == b"fresh"

    await call(r, ALICE, "write", path="docs/a.txt", content=" three", mode="append")
    assert await content(r, ALICE, "docs/a.txt") == b"two! three"
    await call(r, ALICE, "write", path="log", content={"base64": "/wEC"}, mode="append")
    assert await content(r, ALICE, "log") == b"\xff\x01\x02"  # append to nothing creates

    await raises(InvalidRequest, r, ALICE, "write", path="x", content="x", mode="truncate")
    await raises(InvalidRequest, r, ALICE, "write", path="", content="x")
    await raises(InvalidRequest, r, ALICE, "write", path="x", content=5)
    await raises(InvalidRequest, r, ALICE, "write", path="x", content={"base64": "!!"})
    await raises(Conflict, r, ALICE, "write", path="docs", content="x")  # a folder
    await raises(Conflict, r, ALICE, "write", path="docs/a.txt/b", content="x")  # under a file
    await raises(Conflict, r, ALICE, "read", path="docs")
    await raises(NotFound, r, ALICE, "read", path="docs/missing")
    usage = await call(r, ALICE, "usage")
    assert usage["bytes"] == len(b"two! three") + len(b"fresh") + 3
    assert usage["files"] == 4  # docs, docs/a.txt, docs/new.txt, log


async def test_ls_recursive_and_not_and_stat(resources: Resources) -> None:
    r = resources
    for path in ("top.txt", "a/x.txt", "a/y.txt", "a/sub/z.txt", "b/w.txt", "a_b/v.txt"):
        await call(r, ALICE, "write", path=path, content=path)
    assert await paths(r, ALICE) == ["a", "a_b", "b", "top.txt"]
    assert await paths(r, ALICE, "/") == ["a", "a_b", "b", "top.txt"]
    assert await paths(r, ALICE, recursive=True) == [
        "a", "a/sub", "a/sub/z.txt", "a/x.txt", "a/y.txt", "a_b", "a_b/v.txt", "b", "b/w.txt",
        "top.txt",
    ]  # fmt: skip
    assert await paths(r, ALICE, "a") == ["a/sub", "a/x.txt", "a/y.txt"]
    assert await paths(r, ALICE, "./a//") == ["a/sub", "a/x.txt", "a/y.txt"]
    assert await paths(r, ALICE, "a", recursive=True) == [
        "a/sub", "a/sub/z.txt", "a/x.txt", "a/y.txt",
    ]  # fmt: skip
    assert await paths(r, ALICE, "a/x.txt") == ["a/x.txt"]  # a file lists as itself
    await raises(NotFound, r, ALICE, "ls", path="nothing")

    folder = await call(r, ALICE, "stat", path="a/sub")
    assert folder["kind"] == "dir" and folder["size"] == 0 and folder["version"] is None
    file = await call(r, ALICE, "stat", path="a/sub/z.txt")
    assert file["kind"] == "file" and file["size"] == len("a/sub/z.txt")
    root = await call(r, ALICE, "stat", path="")
    assert root["kind"] == "dir" and root["path"] == ""
    await raises(NotFound, r, ALICE, "stat", path="a/nothing")


async def test_mkdir_makes_parents_and_refuses_files_in_the_way(resources: Resources) -> None:
    r = resources
    stat = await call(r, ALICE, "mkdir", path="p/q/r")
    assert stat["kind"] == "dir" and stat["path"] == "p/q/r"
    assert await paths(r, ALICE, recursive=True) == ["p", "p/q", "p/q/r"]
    again = await call(r, ALICE, "mkdir", path="p/q/r")  # an existing folder is fine
    assert again == stat
    assert (await call(r, ALICE, "usage"))["files"] == 3

    await call(r, ALICE, "write", path="p/f", content="file")
    before = await tables(r)
    await raises(Conflict, r, ALICE, "mkdir", path="p/f")
    await raises(Conflict, r, ALICE, "mkdir", path="p/f/g/h")
    assert await tables(r) == before


# -- delete, move ----------------------------------------------------------------------------
async def test_delete_files_and_folders(resources: Resources) -> None:
    r = resources
    for path in ("d/a", "d/b", "d/e/c", "keep"):
        await call(r, ALICE, "write", path=path, content="12345")
    assert await call(r, ALICE, "delete", path="d/a") == 1
    await raises(NotFound, r, ALICE, "stat", path="d/a")
    await raises(NotFound, r, ALICE, "delete", path="d/a")

    before = await tables(r)
    await raises(Conflict, r, ALICE, "delete", path="d")  # not empty
    assert await tables(r) == before
    await raises(InvalidRequest, r, ALICE, "delete", path="")
    await raises(InvalidRequest, r, ALICE, "delete", path="/")

    assert await call(r, ALICE, "delete", path="d", recursive=True) == 2
    assert await paths(r, ALICE, recursive=True) == ["keep"]
    await call(r, ALICE, "mkdir", path="empty")
    assert await call(r, ALICE, "delete", path="empty") == 0
    usage = await call(r, ALICE, "usage")
    assert (usage["bytes"], usage["files"]) == (5, 1)
    # deleted files keep their history, ending with the deletion
    history = await call(r, ALICE, "history", path="d/e/c")
    assert [v["op"] for v in history] == ["delete", "write"] and history[0]["hash"] is None


async def test_move_files_and_folders_and_history_follows(resources: Resources) -> None:
    r = resources
    first = await call(r, ALICE, "write", path="src/f.txt", content="v1")
    await call(r, ALICE, "write", path="src/f.txt", content="v2")
    await call(r, ALICE, "write", path="src/deep/g.txt", content="g")
    await call(r, ALICE, "write", path="other", content="o")
    usage = await call(r, ALICE, "usage")

    moved = await call(r, ALICE, "move", src="src/f.txt", dst="new/place/f.txt")
    assert moved["path"] == "new/place/f.txt" and moved["kind"] == "file"
    assert await content(r, ALICE, "new/place/f.txt") == b"v2"
    await raises(NotFound, r, ALICE, "read", path="src/f.txt")
    new_history = await call(r, ALICE, "history", path="new/place/f.txt")
    assert [v["op"] for v in new_history] == ["move"]
    assert new_history[0]["id"] == moved["version"]
    old_history = await call(r, ALICE, "history", path="src/f.txt")
    assert [v["op"] for v in old_history] == ["delete", "write", "write"]
    assert new_history[0]["hash"] == old_history[1]["hash"]  # the content moved with it
    # the old versions stay readable at the old path, and a rollback brings them back
    assert await content(r, ALICE, "src/f.txt", version=first["version"]) == b"v1"

    folder = await call(r, ALICE, "move", src="src", dst="dst")
    assert folder["kind"] == "dir"
    assert await paths(r, ALICE, "dst", recursive=True) == ["dst/deep", "dst/deep/g.txt"]
    assert await content(r, ALICE, "dst/deep/g.txt") == b"g"
    assert [v["op"] for v in await call(r, ALICE, "history", path="dst/deep/g.txt")] == ["move"]
    await raises(NotFound, r, ALICE, "ls", path="src")
    after = await call(r, ALICE, "usage")
    assert after["bytes"] == usage["bytes"]
    assert after["files"] == usage["files"] + 2  # "new" and "new/place" were created

    before = await tables(r)
    await raises(Conflict, r, ALICE, "move", src="other", dst="dst")  # target exists
    await raises(Conflict, r, ALICE, "move", src="dst", dst="other")
    await raises(InvalidRequest, r, ALICE, "move", src="dst", dst="dst/inside")
    await raises(InvalidRequest, r, ALICE, "move", src="dst", dst="dst")
    await raises(InvalidRequest, r, ALICE, "move", src="", dst="x")
    await raises(NotFound, r, ALICE, "move", src="nothing", dst="x")
    await raises(Conflict, r, ALICE, "move", src="dst", dst="other/x")  # a file in the way
    assert await tables(r) == before
    await call(r, ALICE, "move", src="dst", dst="dst2")  # a sibling prefix is not "inside"
    assert "dst2/deep/g.txt" in await paths(r, ALICE, recursive=True)


# -- versions --------------------------------------------------------------------------------
async def test_history_newest_first_and_reads_at_a_version(
    resources: Resources, clock: Clock
) -> None:
    r = resources
    ids = []
    for i, text in enumerate(["one", "two", "three"]):
        clock.now = 100.0 * (i + 1)
        ids.append((await call(r, ALICE, "write", path="f", content=text))["version"])
    history = await call(r, ALICE, "history", path="f")
    assert [v["id"] for v in history] == ids[::-1]
    assert [v["size"] for v in history] == [5, 3, 3]
    assert [v["at"] for v in history] == [300.0, 200.0, 100.0]
    assert {v["author"] for v in history} == {"alice"} and {v["op"] for v in history} == {"write"}
    assert len(await call(r, ALICE, "history", path="f", limit=2)) == 2
    await raises(InvalidRequest, r, ALICE, "history", path="f", limit=0)
    await raises(NotFound, r, ALICE, "history", path="never")

    for version, text in zip(ids, [b"one", b"two", b"three"], strict=True):
        read = await call(r, ALICE, "read", path="f", version=version)
        assert read["content"] == text and read["stat"]["version"] == version
    other = await call(r, ALICE, "write", path="g", content="other")
    await raises(NotFound, r, ALICE, "read", path="f", version=other["version"])
    await raises(NotFound, r, ALICE, "read", path="f", version=10**6)
    await raises(InvalidRequest, r, ALICE, "read", path="f", version="1")

    clock.now = 400.0
    await call(r, ALICE, "delete", path="f")
    history = await call(r, ALICE, "history", path="f")
    assert history[0]["op"] == "delete" and history[0]["hash"] is None
    await raises(NotFound, r, ALICE, "read", path="f", version=history[0]["id"])
    assert await content(r, ALICE, "f", version=ids[1]) == b"two"  # still there


async def test_rollback_by_version_and_by_time(resources: Resources, clock: Clock) -> None:
    r = resources
    ids = []
    for i, text in enumerate(["v1", "v2 longer", "v3"]):
        clock.now = 100.0 * (i + 1)
        ids.append((await call(r, ALICE, "write", path="f", content=text))["version"])

    clock.now = 350.0
    stat = await call(r, ALICE, "rollback", path="f", version=ids[0])
    assert await content(r, ALICE, "f") == b"v1"
    history = await call(r, ALICE, "history", path="f")
    assert history[0]["op"] == "rollback" and history[0]["id"] == stat["version"]
    assert history[0]["hash"] == history[-1]["hash"] and len(history) == 4

    clock.now = 360.0
    await call(r, ALICE, "rollback", path="f", at=250.0)  # v2 was current at 250
    assert await content(r, ALICE, "f") == b"v2 longer"
    await call(r, ALICE, "rollback", path="f", at=200)  # "then or before": at exactly 200
    assert await content(r, ALICE, "f") == b"v2 longer"
    await call(r, ALICE, "rollback", path="f", at=355.0)  # the rollback at 350 was v1
    assert await content(r, ALICE, "f") == b"v1"
    assert (await call(r, ALICE, "usage"))["bytes"] == 2

    before = await tables(r)
    await raises(NotFound, r, ALICE, "rollback", path="f", at=50.0)  # did not exist yet
    await raises(NotFound, r, ALICE, "rollback", path="f", version=10**6)
    await raises(InvalidRequest, r, ALICE, "rollback", path="f")
    await raises(InvalidRequest, r, ALICE, "rollback", path="f", version=ids[0], at=1.0)
    await raises(InvalidRequest, r, ALICE, "rollback", path="f", at="yesterday")
    await raises(NotFound, r, ALICE, "rollback", path="never", version=ids[0])
    assert await tables(r) == before


async def test_rollback_to_a_deletion_and_of_a_deleted_file(
    resources: Resources, clock: Clock
) -> None:
    r = resources
    clock.now = 100.0
    v1 = (await call(r, ALICE, "write", path="d/f", content="first"))["version"]
    clock.now = 200.0
    await call(r, ALICE, "delete", path="d/f")
    clock.now = 300.0
    await call(r, ALICE, "write", path="d/f", content="second")
    deletion = (await call(r, ALICE, "history", path="d/f"))[1]
    assert deletion["op"] == "delete"

    clock.now = 400.0
    assert await call(r, ALICE, "rollback", path="d/f", at=250.0) is None  # back to "deleted"
    await raises(NotFound, r, ALICE, "read", path="d/f")
    assert await paths(r, ALICE, "d") == []
    assert (await call(r, ALICE, "usage"))["bytes"] == 0
    # rolling a deleted file back to a deletion again changes nothing
    before = await tables(r)
    assert await call(r, ALICE, "rollback", path="d/f", version=deletion["id"]) is None
    assert await tables(r) == before

    clock.now = 500.0
    restored = await call(r, ALICE, "rollback", path="d/f", version=v1)
    assert restored["kind"] == "file" and restored["size"] == 5
    assert await content(r, ALICE, "d/f") == b"first"
    assert await paths(r, ALICE, "d") == ["d/f"]
    usage = await call(r, ALICE, "usage")
    assert (usage["bytes"], usage["files"]) == (5, 2)
    # a deleted file whose folder went too: the rollback makes the folder again
    await call(r, ALICE, "delete", path="d", recursive=True)
    await call(r, ALICE, "rollback", path="d/f", version=v1)
    assert await paths(r, ALICE, recursive=True) == ["d", "d/f"]
    # a path that is a folder now cannot be rolled back to a file
    await call(r, ALICE, "delete", path="d", recursive=True)
    await call(r, ALICE, "mkdir", path="d/f")
    await raises(Conflict, r, ALICE, "rollback", path="d/f", version=v1)


async def test_same_content_is_stored_once(resources: Resources) -> None:
    r = resources
    one = await call(r, ALICE, "write", path="one", content="the same bytes")
    two = await call(r, ALICE, "write", path="two", content="the same bytes")
    three = await call(r, BOB, "write", path="mine", content="the same bytes")
    await call(r, ALICE, "write", path="one", content="other")
    await call(r, ALICE, "write", path="one", content="the same bytes")
    assert one["hash"] == two["hash"] == three["hash"]
    rows = (await tables(r))["blobs"]
    assert len(rows) == 2 and (one["hash"], 14) in rows
    assert (await call(r, ALICE, "usage"))["bytes"] == 28  # the quota counts each file


# -- quotas ----------------------------------------------------------------------------------
async def test_over_max_bytes_changes_nothing(resources: Resources) -> None:
    r = resources
    limit(r, max_bytes=100)
    v1 = (await call(r, ALICE, "write", path="a", content="x" * 90))["version"]
    await call(r, ALICE, "write", path="a", content="x" * 10)
    await call(r, ALICE, "write", path="b", content="y" * 80)
    before, rows = await snapshot(r, ALICE), await tables(r)
    assert before["usage"]["bytes"] == 90

    await raises(StorageFull, r, ALICE, "write", path="new/dirs/c", content="z" * 11)
    await raises(StorageFull, r, ALICE, "write", path="a", content="z" * 21)
    await raises(StorageFull, r, ALICE, "write", path="a", content="z" * 11, mode="append")
    await raises(StorageFull, r, ALICE, "rollback", path="a", version=v1)
    assert await snapshot(r, ALICE) == before
    assert await tables(r) == rows
    # exactly at the limit is fine; other agents have their own quota
    await call(r, ALICE, "write", path="c", content="z" * 10)
    await call(r, BOB, "write", path="c", content="z" * 100)


async def test_over_max_files_changes_nothing(resources: Resources) -> None:
    r = resources
    limit(r, max_files=3)
    await call(r, ALICE, "write", path="a", content="1")
    await call(r, ALICE, "write", path="d/b", content="2")  # d and d/b: 3 entries
    await call(r, ALICE, "delete", path="a")
    await call(r, ALICE, "write", path="a", content="1")
    before, rows = await snapshot(r, ALICE), await tables(r)
    assert before["usage"]["files"] == 3

    await raises(StorageFull, r, ALICE, "write", path="c", content="3")
    await raises(StorageFull, r, ALICE, "write", path="d/c", content="3")
    await raises(StorageFull, r, ALICE, "write", path="e/f/g", content="3")
    await raises(StorageFull, r, ALICE, "mkdir", path="e")
    await raises(StorageFull, r, ALICE, "move", src="a", dst="x/a")  # x would be a 4th
    assert await snapshot(r, ALICE) == before
    assert await tables(r) == rows
    await call(r, ALICE, "write", path="a", content="overwriting adds no file")
    await call(r, ALICE, "move", src="a", dst="d/a")  # moving within the quota is fine


async def test_over_max_file_bytes_changes_nothing(resources: Resources) -> None:
    r = resources
    limit(r, max_file_bytes=50)
    await call(r, ALICE, "write", path="f", content="x" * 40)
    before, rows = await snapshot(r, ALICE), await tables(r)

    await raises(StorageFull, r, ALICE, "write", path="g", content="x" * 51)
    await raises(StorageFull, r, ALICE, "write", path="dir/g", content="x" * 51)
    await raises(StorageFull, r, ALICE, "write", path="f", content="x" * 11, mode="append")
    await raises(StorageFull, r, ALICE, "write", path="f", content="x" * 51)
    assert await snapshot(r, ALICE) == before
    assert await tables(r) == rows
    await call(r, ALICE, "write", path="f", content="x" * 10, mode="append")  # exactly 50


async def test_folders_that_differ_only_in_case_are_different_folders(
    resources: Resources,
) -> None:
    """Paths are case-sensitive: listing, deleting, moving or searching "pub" must not touch
    "PUB" (SQLite's LIKE folds ASCII case by default), nor show it through a share of "pub"."""
    r = resources
    await call(r, ALICE, "write", path="pub/a.txt", content="public kiwi")
    await call(r, ALICE, "write", path="PUB/secret.txt", content="private kiwi")
    await call(r, ALICE, "share", path="pub", grantee="agent:bob")

    assert await paths(r, BOB, "pub", owner="alice", recursive=True) == ["pub/a.txt"]
    found = await call(r, BOB, "search", query="kiwi", owner="alice", folder="pub")
    assert [f["path"] for f in found] == ["pub/a.txt"]
    assert await paths(r, ALICE, "pub", recursive=True) == ["pub/a.txt"]
    found = await call(r, ALICE, "search", query="kiwi", folder="pub")
    assert [f["path"] for f in found] == ["pub/a.txt"]

    await call(r, ALICE, "move", src="pub", dst="moved")
    assert await paths(r, ALICE, recursive=True) == [
        "PUB", "PUB/secret.txt", "moved", "moved/a.txt",
    ]  # fmt: skip
    await call(r, ALICE, "write", path="del/x", content="x")
    await call(r, ALICE, "write", path="DEL/y", content="y")
    assert await call(r, ALICE, "delete", path="del", recursive=True) == 1
    assert await content(r, ALICE, "DEL/y") == b"y"
    await call(r, ALICE, "write", path="full/x", content="x")
    await call(r, ALICE, "write", path="FULL/y", content="y")
    await raises(Conflict, r, ALICE, "delete", path="FULL")  # not empty
    await call(r, ALICE, "delete", path="full/x")
    assert await call(r, ALICE, "delete", path="full") == 0  # empty, whatever FULL holds
    assert await content(r, ALICE, "FULL/y") == b"y"


# -- search ----------------------------------------------------------------------------------
FILLER = [
    "the weekly grocery list has apples bread and cheese",
    "notes on the garden: tomatoes need water every morning",
    "a recipe for lentil soup with cumin and lemon",
    "travel plans for the summer holiday by the sea",
    "the car needs new tyres before the winter",
]


async def test_search_ranks_relevant_first_and_respects_folder(resources: Resources) -> None:
    r = resources
    for i, text in enumerate(FILLER):
        await call(r, ALICE, "write", path=f"misc/{i}.txt", content=text)
    await call(r, ALICE, "write", path="misc/deploy-mention.txt", content="we deploy on fridays")
    await call(
        r,
        ALICE,
        "write",
        path="work/runbook.md",
        content="Kubernetes rollout: deploy the kubernetes cluster, watch the rollout, "
        "then deploy again if the kubernetes rollout fails.",
    )
    await call(
        r, ALICE, "write", path="work_old/copy.md", content="an old kubernetes note on lunch"
    )
    await call(r, ALICE, "write", path="blob.bin", content=b"\xff\xfe kubernetes")  # not UTF-8

    found = await call(r, ALICE, "search", query="kubernetes rollout deploy")
    assert found[0]["path"] == "work/runbook.md"
    assert {f["path"] for f in found} == {
        "work/runbook.md", "work_old/copy.md", "misc/deploy-mention.txt",
    }  # fmt: skip
    scores = [f["score"] for f in found]
    assert scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert found[0]["size"] == len(
        (await call(r, ALICE, "read", path="work/runbook.md"))["content"]
    )

    in_work = await call(r, ALICE, "search", query="kubernetes rollout deploy", folder="work")
    assert [f["path"] for f in in_work] == ["work/runbook.md"]  # not work_old
    in_misc = await call(r, ALICE, "search", query="Kubernetes DEPLOY", folder="misc")
    assert [f["path"] for f in in_misc] == ["misc/deploy-mention.txt"]
    assert len(await call(r, ALICE, "search", query="kubernetes deploy", limit=1)) == 1
    assert await call(r, ALICE, "search", query="zeppelin") == []
    assert await call(r, BOB, "search", query="kubernetes") == []  # bob's own (empty) files
    await raises(InvalidRequest, r, ALICE, "search", query="  ?! ")
    await raises(InvalidRequest, r, ALICE, "search", query="x", limit=0)
    # quotes and operators are words, never query syntax
    await call(r, ALICE, "search", query='"kubernetes" OR NOT * ( - : ^ near')

    # the index follows changes: overwrite, move, delete
    await call(r, ALICE, "write", path="work/runbook.md", content="nothing relevant now")
    await call(r, ALICE, "move", src="work_old", dst="archive")
    await call(r, ALICE, "delete", path="misc/deploy-mention.txt")
    found = await call(r, ALICE, "search", query="kubernetes rollout deploy")
    assert [f["path"] for f in found] == ["archive/copy.md"]


async def test_search_scores_do_not_depend_on_other_agents_files(
    resources: Resources, request: pytest.FixtureRequest
) -> None:
    """Scores must not reveal what other agents store (term statistics across namespaces)."""
    if "sqlite" in request.node.name:  # a known limit, documented in the README
        request.applymarker(
            pytest.mark.xfail(strict=True, reason="FTS5 ranks with corpus-wide statistics")
        )
    r = resources
    await call(r, BOB, "write", path="mine.txt", content="the merger is secret")
    await call(r, BOB, "write", path="other.txt", content="lunch menu")
    alone = await call(r, BOB, "search", query="merger")
    for i in range(5):
        await call(r, ALICE, "write", path=f"m{i}.txt", content=f"merger plan {i}")
        await call(r, ALICE, "write", path=f"n{i}.txt", content=f"unrelated {i}")
    assert await call(r, BOB, "search", query="merger") == alone


# -- migrations ------------------------------------------------------------------------------
async def test_reopening_applies_nothing_new(url: str) -> None:
    db = Database.open(url)
    await db.start()
    try:
        assert await db.run(migrate) == []  # everything was applied at start
        rows = await db.run(
            lambda c: c.all("SELECT version, name FROM aios_migrations ORDER BY version")
        )
        assert rows == [(m.version, m.name) for m in MIGRATIONS]
        assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))
    finally:
        await db.close()

    for _ in range(2):  # restarts apply nothing and keep one row per migration
        again = Database.open(url)
        await again.start()
        try:
            assert await again.run(migrate) == []
            count = await again.run(lambda c: c.scalar("SELECT COUNT(*) FROM aios_migrations"))
            assert count == len(MIGRATIONS)
        finally:
            await again.close()
    r = Resources(StorageConfig(database=url), MemoryConfig())
    await r.start()
    try:  # and the schema works after all those starts
        await call(r, ALICE, "write", path="f", content="works")
        assert await content(r, ALICE, "f") == b"works"
    finally:
        await r.close()


def is_closed(conn: Conn) -> bool:
    if conn.dialect == "postgres":
        return bool(conn.raw.closed)
    try:
        conn.raw.execute("SELECT 1")
    except sqlite3.ProgrammingError:
        return True
    return False


async def test_a_database_newer_than_the_code_is_refused(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = Database.open(url)
    await db.start()
    newer = MIGRATIONS[-1].version + 1
    await db.run(
        lambda c: c.run(
            "INSERT INTO aios_migrations (version, name, applied) VALUES (?, 'future', 0)",
            (newer,),
        )
    )
    await db.close()

    opened: list[Conn] = []
    connect = Database._connect

    def spy(self: Database) -> Conn:
        conn = connect(self)
        opened.append(conn)
        return conn

    monkeypatch.setattr(Database, "_connect", spy)
    refused = Database.open(url)
    with pytest.raises(StorageError, match="newer"):
        await refused.start()
    await refused.close()
    with pytest.raises(StorageError, match="not open"):
        await refused.run(lambda c: c.scalar("SELECT 1"))
    # the connection the refused start opened is closed, not left to the garbage collector
    leaked = [conn for conn in opened if not is_closed(conn)]
    for conn in leaked:
        conn.close()
    assert opened and leaked == []


# -- isolation -------------------------------------------------------------------------------
def shape(error: AIOSError, *names: str) -> str:
    """An error message with the given path/owner names blanked."""
    message = str(error)
    for name in sorted(names, key=len, reverse=True):
        message = message.replace(name, "<>")
    return message


def attempts(path: str) -> list[tuple[str, dict[str, Any]]]:
    """Every storage operation on ``path`` (the caller adds the owner)."""
    return [
        ("read", {"path": path}),
        ("read", {"path": path, "version": 1}),
        ("ls", {"path": path}),
        ("ls", {"path": path, "recursive": True}),
        ("stat", {"path": path}),
        ("history", {"path": path}),
        ("search", {"query": "secret plan", "folder": path}),
        ("rollback", {"path": path, "version": 1}),
        ("rollback", {"path": path, "at": 1e12}),
        ("delete", {"path": path}),
        ("delete", {"path": path, "recursive": True}),
        ("move", {"src": path, "dst": "stolen"}),
        ("write", {"path": path, "content": "overwritten"}),
        ("write", {"path": path, "content": "more", "mode": "append"}),
        ("mkdir", {"path": path}),
    ]


async def test_without_a_share_other_files_look_missing(resources: Resources) -> None:
    r = resources
    await call(r, ALICE, "write", path="secret/plan.txt", content="the secret plan")
    await call(r, ALICE, "write", path="secret/plan.txt", content="the secret plan v2")
    await call(r, ALICE, "write", path="top.txt", content="secret plan at the top")
    await call(r, BOB, "write", path="bobs.txt", content="bob's own")
    before = await tables(r)

    for existing in ("secret/plan.txt", "secret", "top.txt", ""):
        for op, args in attempts(existing):
            if existing == "" and op in ("delete", "move", "write"):
                continue  # never valid on the root: InvalidRequest for everyone
            there = await raises(NotFound, r, BOB, op, owner="alice", **args)
            missing_args = {
                k: ("nothing/here.txt" if v == existing and k in ("path", "src", "folder") else v)
                for k, v in args.items()
            }
            if existing == "":  # the root exists for everyone: compare with a missing owner
                gone = await raises(NotFound, r, BOB, op, owner="zed", **args)
                assert shape(there, "alice") == shape(gone, "zed"), (op, args)
            else:
                gone = await raises(NotFound, r, BOB, op, owner="alice", **missing_args)
                assert shape(there, existing) == shape(gone, "nothing/here.txt"), (op, args)
            assert "secret plan" not in str(there)
    # the same for bob with groups, and for a move within alice's namespace
    await raises(NotFound, r, BOB_TEAM, "read", owner="alice", path="top.txt")
    await raises(NotFound, r, BOB, "move", owner="alice", src="secret/plan.txt", dst="secret/x")
    # a move names one owner: bob cannot take alice's file into his namespace or give his away
    await raises(NotFound, r, BOB, "move", owner="alice", src="top.txt", dst="bobs.txt")
    await raises(InvalidRequest, r, BOB, "share", owner="alice", path="secret", grantee="agent:bob")

    # alice's version ids mean nothing in bob's namespace
    alice_version = (await call(r, ALICE, "stat", path="top.txt"))["version"]
    await raises(NotFound, r, BOB, "read", path="bobs.txt", version=alice_version)
    await raises(NotFound, r, BOB, "rollback", path="bobs.txt", version=alice_version)
    await raises(NotFound, r, BOB, "read", path="top.txt", version=alice_version)
    # bob's own view has none of alice's files
    assert await paths(r, BOB, recursive=True) == ["bobs.txt"]
    assert await call(r, BOB, "search", query="secret plan") == []
    assert (await call(r, BOB, "shares"))["received"] == []
    assert await tables(r) == before


async def test_a_read_share_grants_reading_only_under_the_shared_folder(
    resources: Resources,
) -> None:
    r = resources
    await call(r, ALICE, "write", path="pub/a.txt", content="shared kiwi text")
    await call(r, ALICE, "write", path="pub/sub/b.txt", content="deeper kiwi")
    await call(r, ALICE, "write", path="pubx/c.txt", content="sibling kiwi")  # a prefix sibling
    await call(r, ALICE, "write", path="priv/d.txt", content="private kiwi")
    share = await call(r, ALICE, "share", path="pub", grantee="agent:bob")
    assert share == {**share, "owner": "alice", "path": "pub", "grantee": "agent:bob", "mode": "r"}
    before = await tables(r)

    assert await content(r, BOB, "pub/a.txt", owner="alice") == b"shared kiwi text"
    assert await paths(r, BOB, "pub", owner="alice") == ["pub/a.txt", "pub/sub"]
    assert await paths(r, BOB, "pub/sub", owner="alice", recursive=True) == ["pub/sub/b.txt"]
    assert (await call(r, BOB, "stat", path="pub", owner="alice"))["kind"] == "dir"
    history = await call(r, BOB, "history", path="pub/a.txt", owner="alice")
    assert [v["author"] for v in history] == ["alice"]
    version = history[0]["id"]
    assert await content(r, BOB, "pub/a.txt", owner="alice", version=version) == b"shared kiwi text"
    found = await call(r, BOB, "search", query="kiwi", owner="alice", folder="pub")
    assert {f["path"] for f in found} == {"pub/a.txt", "pub/sub/b.txt"}
    await raises(NotFound, r, BOB, "read", path="pub/missing", owner="alice")

    for outside in ("pubx/c.txt", "pubx", "priv/d.txt", "priv", ""):
        op = "read" if "." in outside else "ls"
        await raises(NotFound, r, BOB, op, path=outside, owner="alice")
        await raises(NotFound, r, BOB, "search", query="kiwi", owner="alice", folder=outside)
        await raises(NotFound, r, BOB, "stat", path=outside, owner="alice")
    await raises(NotFound, r, BOB, "history", path="priv/d.txt", owner="alice")

    writes: list[tuple[str, dict[str, Any]]] = [
        ("write", {"path": "pub/a.txt", "content": "defaced"}),
        ("write", {"path": "pub/new.txt", "content": "new"}),
        ("write", {"path": "pub/a.txt", "content": "more", "mode": "append"}),
        ("mkdir", {"path": "pub/dir"}),
        ("delete", {"path": "pub/a.txt"}),
        ("delete", {"path": "pub", "recursive": True}),
        ("move", {"src": "pub/a.txt", "dst": "pub/b.txt"}),
        ("rollback", {"path": "pub/a.txt", "version": version}),
    ]
    for op, args in writes:
        await raises(PermissionDenied, r, BOB, op, owner="alice", **args)
    assert await tables(r) == before
    assert (await call(r, BOB, "shares"))["received"] == [share]


async def test_a_read_write_share_allows_writes_charged_to_the_owner(
    resources: Resources,
) -> None:
    r = resources
    await call(r, ALICE, "write", path="pub/a.txt", content="alice wrote this")
    await call(r, ALICE, "write", path="priv/p.txt", content="private")
    await call(r, ALICE, "share", path="pub", grantee="agent:bob", mode="rw")
    alice_before = await call(r, ALICE, "usage")

    await call(r, BOB, "write", path="pub/a.txt", content="bob edited", owner="alice")
    await call(r, BOB, "write", path="pub/new/n.txt", content="12345", owner="alice")
    history = await call(r, ALICE, "history", path="pub/a.txt")
    assert [v["author"] for v in history] == ["bob", "alice"]
    assert await content(r, ALICE, "pub/a.txt") == b"bob edited"
    alice_after = await call(r, ALICE, "usage")
    assert alice_after["bytes"] == alice_before["bytes"] - len("alice wrote this") + 10 + 5
    assert alice_after["files"] == alice_before["files"] + 2  # pub/new and pub/new/n.txt
    assert (await call(r, BOB, "usage"))["bytes"] == 0
    assert await paths(r, BOB, recursive=True) == []  # nothing landed in bob's namespace

    await call(r, BOB, "rollback", path="pub/a.txt", owner="alice", version=history[1]["id"])
    assert await content(r, ALICE, "pub/a.txt") == b"alice wrote this"
    await call(r, BOB, "move", src="pub/new", dst="pub/renamed", owner="alice")
    assert await call(r, BOB, "delete", path="pub/renamed", owner="alice", recursive=True) == 1
    assert (await call(r, ALICE, "history", path="pub/renamed/n.txt"))[0]["author"] == "bob"

    # the share reaches no further than its folder, even for moves
    await raises(NotFound, r, BOB, "write", path="priv/p.txt", content="x", owner="alice")
    await raises(NotFound, r, BOB, "move", src="pub/a.txt", dst="priv/a.txt", owner="alice")
    await raises(NotFound, r, BOB, "move", src="priv/p.txt", dst="pub/p.txt", owner="alice")
    await raises(NotFound, r, BOB, "write", path="top.txt", content="x", owner="alice")
    # bob cannot pass the share on: a share always names the caller's own files
    await raises(NotFound, r, BOB, "share", path="pub", grantee="agent:carol")
    # the owner's quota applies to bob's writes
    used = (await call(r, ALICE, "usage"))["bytes"]
    limit(r, max_bytes=used + 10)
    before = await tables(r)
    await raises(StorageFull, r, BOB, "write", path="pub/big", content="x" * 11, owner="alice")
    assert await tables(r) == before
    await call(r, BOB, "write", path="pub/small", content="x" * 10, owner="alice")


async def test_group_shares_and_unshare(resources: Resources) -> None:
    r = resources
    await call(r, ALICE, "write", path="team/plan.txt", content="team plan")
    await call(r, ALICE, "write", path="solo/file.txt", content="mine")
    await call(r, ALICE, "share", path="team", grantee="group:team")
    await call(r, ALICE, "share", path="solo/file.txt", grantee="agent:bob", mode="rw")

    assert await content(r, BOB_TEAM, "team/plan.txt", owner="alice") == b"team plan"
    assert await content(r, CAROL_TEAM, "team/plan.txt", owner="alice") == b"team plan"
    await raises(NotFound, r, BOB, "read", path="team/plan.txt", owner="alice")  # not in team
    await raises(NotFound, r, Principal("dave"), "read", path="team/plan.txt", owner="alice")
    await raises(
        PermissionDenied, r, CAROL_TEAM, "write", path="team/x", content="x", owner="alice"
    )
    # a file share: that file only; the widest of several shares applies
    await call(r, BOB, "write", path="solo/file.txt", content="bob", owner="alice")
    await raises(NotFound, r, BOB, "ls", path="solo", owner="alice")
    await raises(NotFound, r, BOB, "write", path="solo/other", content="x", owner="alice")
    await call(r, ALICE, "share", path="team", grantee="agent:bob", mode="rw")
    await call(r, BOB_TEAM, "write", path="team/x", content="x", owner="alice")  # rw wins

    shares = await call(r, ALICE, "shares")
    assert [(s["path"], s["grantee"], s["mode"]) for s in shares["given"]] == [
        ("solo/file.txt", "agent:bob", "rw"), ("team", "agent:bob", "rw"),
        ("team", "group:team", "r"),
    ]  # fmt: skip
    received = (await call(r, BOB_TEAM, "shares"))["received"]
    assert {(s["owner"], s["path"], s["grantee"]) for s in received} == {
        ("alice", "solo/file.txt", "agent:bob"), ("alice", "team", "agent:bob"),
        ("alice", "team", "group:team"),
    }  # fmt: skip
    assert (await call(r, BOB, "shares"))["received"] != received  # groups count

    # only the owner can revoke; revoking removes access at once
    assert await call(r, BOB, "unshare", path="team", grantee="group:team") is False
    assert await content(r, CAROL_TEAM, "team/plan.txt", owner="alice") == b"team plan"
    assert await call(r, ALICE, "unshare", path="team", grantee="group:team") is True
    assert await call(r, ALICE, "unshare", path="team", grantee="group:team") is False
    await raises(NotFound, r, CAROL_TEAM, "read", path="team/plan.txt", owner="alice")
    assert await content(r, BOB_TEAM, "team/plan.txt", owner="alice") == b"team plan"
    assert await call(r, ALICE, "unshare", path="team", grantee="agent:bob") is True
    await raises(NotFound, r, BOB_TEAM, "read", path="team/plan.txt", owner="alice")
    await raises(NotFound, r, BOB_TEAM, "search", query="plan", owner="alice", folder="team")

    # a share of the root is a share of everything
    dave = Principal("dave")
    await call(r, ALICE, "share", path="/", grantee="agent:dave")
    assert await content(r, dave, "solo/file.txt", owner="alice") == b"bob"
    assert await paths(r, dave, owner="alice") == ["solo", "team"]
    assert (await call(r, dave, "stat", path="", owner="alice"))["kind"] == "dir"
    await raises(PermissionDenied, r, dave, "write", path="new", content="x", owner="alice")
    assert await call(r, ALICE, "unshare", path="", grantee="agent:dave") is True
    await raises(NotFound, r, dave, "ls", owner="alice")

    # re-sharing changes the mode; bad shares are refused
    await call(r, ALICE, "share", path="team", grantee="agent:bob", mode="rw")
    await call(r, ALICE, "share", path="team", grantee="agent:bob", mode="r")
    await raises(PermissionDenied, r, BOB, "write", path="team/y", content="y", owner="alice")
    for grantee in ("bob", "user:bob", "agent:", "agent:../bob", "group:Team", "agent:bob/x"):
        await raises(InvalidRequest, r, ALICE, "share", path="team", grantee=grantee)
    await raises(InvalidRequest, r, ALICE, "share", path="team", grantee="agent:bob", mode="w")
    await raises(InvalidRequest, r, ALICE, "share", path="team", grantee="agent:alice")
    await raises(NotFound, r, ALICE, "share", path="nothing", grantee="agent:bob")


# -- path traversal --------------------------------------------------------------------------
BAD_PATHS: list[Any] = [
    "..", "../x", "../../etc/passwd", "/etc/passwd", "/pub/a.txt", "a/../../b", "pub/../priv",
    "pub/..", "pub/./../priv/p.txt", "a\x00b", "pub/a.txt\x00", "a\\b", "..\\priv", "a\nb",
    "a\tb", "a\rb", "a\x1bb", "a\x7fb", "x" * 300, "pub/" + "y" * 256, "é" * 128,
    "/".join(["d"] * 40), "/".join(["abcdefghij"] * 100), 5, None, ["pub"], {"path": "pub"},
]  # fmt: skip
BAD_OWNERS: list[Any] = [
    "../alice", "alice/..", "/alice", "alice/", "Alice", "", " alice", "alice\x00", "a" * 65,
    "*", "%", "alice'--", "..", ".alice", "alice/pub", 5,
]  # fmt: skip


def path_attempts(bad: Any) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("read", {"path": bad}),
        ("write", {"path": bad, "content": "pwned"}),
        ("write", {"path": bad, "content": "pwned", "mode": "append"}),
        ("stat", {"path": bad}),
        ("ls", {"path": bad, "recursive": True}),
        ("history", {"path": bad}),
        ("delete", {"path": bad, "recursive": True}),
        ("mkdir", {"path": bad}),
        ("rollback", {"path": bad, "version": 1}),
        ("move", {"src": bad, "dst": "pub/moved"}),
        ("move", {"src": "pub/a.txt", "dst": bad}),
        ("search", {"query": "private", "folder": bad}),
    ]


async def test_path_traversal_is_refused_everywhere(resources: Resources) -> None:
    r = resources
    await call(r, ALICE, "write", path="pub/a.txt", content="public")
    await call(r, ALICE, "write", path="priv/p.txt", content="private")
    await call(r, BOB, "write", path="b.txt", content="bob private")
    await call(r, ALICE, "share", path="pub", grantee="agent:bob", mode="rw")
    before = await tables(r)

    failures = []
    for bad in BAD_PATHS:
        tries = [(ALICE, op, args) for op, args in path_attempts(bad)]
        tries += [(BOB, op, {**args, "owner": "alice"}) for op, args in path_attempts(bad)]
        tries += [
            (ALICE, "share", {"path": bad, "grantee": "agent:bob"}),
            (ALICE, "unshare", {"path": bad, "grantee": "agent:bob"}),
        ]
        for who, op, args in tries:
            try:
                await call(r, who, op, **args)
            except InvalidRequest:
                continue
            except Exception as e:
                failures.append((who.name, op, args, type(e).__name__))
            else:
                failures.append((who.name, op, args, "succeeded"))
    for bad in BAD_OWNERS:
        for op, args in [*attempts("pub/a.txt"), *path_attempts("pub/a.txt")]:
            try:
                await call(r, BOB, op, owner=bad, **args)
            except InvalidRequest:
                continue
            except Exception as e:
                failures.append(("bob", op, {**args, "owner": bad}, type(e).__name__))
            else:
                failures.append(("bob", op, {**args, "owner": bad}, "succeeded"))
    assert failures == []
    for op, args in attempts("pub/a.txt"):  # a valid name without files: NotFound
        await raises(NotFound, r, BOB, op, owner="zed", **args)
    after = await tables(r)
    assert after == before
    assert {row[0] for row in after["files"]} == {"alice", "bob"}


async def test_a_lone_surrogate_in_a_path_is_an_invalid_request(resources: Resources) -> None:
    """JSON can carry "\\ud800"; it must be refused as a bad path, not crash with
    UnicodeEncodeError."""
    for op, args in path_attempts("pub/\ud800"):
        await raises(InvalidRequest, resources, ALICE, op, **args)


async def test_a_lone_surrogate_in_text_content_is_an_invalid_request(
    resources: Resources,
) -> None:
    """Text content is stored as UTF-8; "\ud800" has no UTF-8 form (resources.content)."""
    await raises(InvalidRequest, resources, ALICE, "write", path="f", content="a\ud800b")
    await raises(NotFound, resources, ALICE, "read", path="f")


async def test_files_with_nul_bytes_are_stored(resources: Resources) -> None:
    """Valid UTF-8 with a NUL (many binary formats) is a file like any other; PostgreSQL text
    cannot hold NUL, so it must not reach the full-text index as text."""
    r = resources
    for data in (b"\x00", b"abc\x00def kiwi", b"\x00\x01\x02", bytes(range(128))):
        await call(r, ALICE, "write", path="bin", content=data)
        assert await content(r, ALICE, "bin") == data
        await call(r, ALICE, "write", path="bin", content=data, mode="append")
        assert await content(r, ALICE, "bin") == data + data


def distinct_words(total: int) -> bytes:
    """About ``total`` bytes of text, every word different (base-26 numbers)."""
    out, i = [], 0
    size = 0
    while size < total:
        n, word = i + 26**3, ""
        while n:
            n, d = divmod(n, 26)
            word += string.ascii_lowercase[d]
        out.append(word)
        size += len(word) + 1
        i += 1
    return " ".join(out).encode()


async def test_a_large_text_file_is_stored_on_both_backends(resources: Resources) -> None:
    """A text file well under max_file_bytes (and under the 1 MiB indexing limit) must be
    stored; PostgreSQL refuses a tsvector over 1 MiB, so indexing must not fail the write."""
    r = resources
    data = distinct_words(800_000)  # 160,000 different words
    assert len(data) < min(INDEX_BYTES, StorageConfig().max_file_bytes)
    await call(r, ALICE, "write", path="big.txt", content=data)
    assert await content(r, ALICE, "big.txt") == data
    assert (await call(r, ALICE, "search", query="baab"))[0]["path"] == "big.txt"


async def test_a_late_or_withdrawn_job_changes_nothing(resources: Resources) -> None:
    r = resources
    await call(r, ALICE, "write", path="f", content="kept")
    before = await tables(r)
    late = Job(deadline=time.monotonic() - 1.0)
    with pytest.raises(DeadlineExceeded, match="nothing"):
        await r.call(ALICE, "storage", "write", {"path": "f", "content": "late"}, late)
    assert late.started is None
    withdrawn = Job(withdrawn=True)
    with pytest.raises(SyscallCancelled):
        await r.call(ALICE, "storage", "delete", {"path": "f"}, withdrawn)
    assert await tables(r) == before
    assert await content(r, ALICE, "f") == b"kept"


async def test_an_out_of_range_version_is_not_a_database_error(resources: Resources) -> None:
    r = resources
    await call(r, ALICE, "write", path="f", content="x")
    for version in (2**63, -(2**63) - 1, 2**100):
        with pytest.raises((NotFound, InvalidRequest)):
            await call(r, ALICE, "read", path="f", version=version)
        with pytest.raises((NotFound, InvalidRequest)):
            await call(r, ALICE, "rollback", path="f", version=version)
