"""Concurrent writers on both backends: PostgreSQL runs several database workers at once, so
quota checks and version numbering must hold under real concurrency (not only SQLite's single
writer)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from aios.config import MemoryConfig, StorageConfig
from aios.errors import StorageFull
from aios.resources import Resources
from aios.storage.db import Job
from aios.storage.files import Principal

ALICE = Principal("alice")


@pytest.fixture(params=["sqlite", "postgres"])
async def quota_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Resources]:
    url = str(tmp_path / "c.db") if request.param == "sqlite" else request.getfixturevalue("pg_dsn")
    resources = Resources(StorageConfig(database=url, max_bytes=1000), MemoryConfig())
    await resources.start()
    yield resources
    await resources.close()


async def test_concurrent_writes_never_pass_the_quota(quota_store: Resources) -> None:
    async def write(i: int) -> bool:
        args = {"path": f"f{i}", "content": "x" * 100}
        try:
            await quota_store.call(ALICE, "storage", "write", args, Job())
        except StorageFull:
            return False
        return True

    written = await asyncio.gather(*(write(i) for i in range(25)))
    assert sum(written) == 10  # exactly what fits, whatever the interleaving
    usage = await quota_store.call(ALICE, "storage", "usage", {}, Job())
    assert usage["bytes"] == 1000 and usage["files"] == 10


async def test_concurrent_writes_to_one_file_keep_every_version(quota_store: Resources) -> None:
    async def write(i: int) -> None:
        await quota_store.call(ALICE, "storage", "write", {"path": "f", "content": str(i)}, Job())

    await asyncio.gather(*(write(i) for i in range(20)))
    history = await quota_store.call(ALICE, "storage", "history", {"path": "f"}, Job())
    assert sorted(v["size"] for v in history) == sorted(len(str(i)) for i in range(20))
    read = await quota_store.call(ALICE, "storage", "read", {"path": "f"}, Job())
    assert read["stat"]["version"] == history[0]["id"]  # the newest version is the content


async def test_concurrent_history_appends_stay_in_order(quota_store: Resources) -> None:
    async def remember(i: int) -> None:
        turns = [["user", f"q{i}"], ["assistant", f"a{i}"]]
        await quota_store.call(ALICE, "memory", "remember", {"turns": turns}, Job())

    await asyncio.gather(*(remember(i) for i in range(15)))
    turns = await quota_store.call(ALICE, "memory", "history", {"limit": 100}, Job())
    assert [t["n"] for t in turns] == list(range(30))
    for q, a in zip(turns[::2], turns[1::2], strict=True):  # each exchange stays together
        assert q["content"][1:] == a["content"][1:]
