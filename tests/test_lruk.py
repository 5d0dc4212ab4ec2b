"""LRU-K as a pure policy (against a brute-force reference over random traces), and in the
memory manager: a hot note survives a long scan with K=2, and plain LRU (K=1) loses it."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aios.config import MemoryConfig
from aios.memory.lruk import LRUK
from aios.memory.manager import MemoryManager
from aios.storage.db import Database


class Reference:
    """LRU-K by its definition, by brute force: evict the key whose K-th most recent access is
    oldest (-inf with fewer than K accesses), ties by the oldest last access."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.seen: dict[str, list[float]] = {}

    def access(self, key: str, now: float) -> None:
        self.seen.setdefault(key, []).append(now)

    def remove(self, key: str) -> None:
        self.seen.pop(key, None)

    def rank(self, key: str) -> tuple[float, float]:
        seen = self.seen[key]
        return (seen[-self.k] if len(seen) >= self.k else -math.inf, seen[-1])

    def victim(self) -> str | None:
        return min(self.seen, key=self.rank) if self.seen else None

    def order(self) -> list[str]:
        return sorted(self.seen, key=self.rank)


def drain(policy: LRUK[str]) -> list[str]:
    """Every key in eviction order (evicting them all)."""
    order = []
    while (key := policy.victim()) is not None:
        order.append(key)
        policy.remove(key)
    return order


def test_victims_in_order() -> None:
    policy: LRUK[str] = LRUK(2)
    assert policy.victim() is None and len(policy) == 0
    for now, key in enumerate(["a", "b", "c", "a", "b", "d", "a"], start=1):
        policy.access(key, float(now))
    # a: 1,4,7 -> 2nd newest 4; b: 2,5 -> 2; c: 3 (once: -inf); d: 6 (once: -inf)
    assert len(policy) == 4 and "a" in policy and "z" not in policy
    assert drain(policy) == ["c", "d", "b", "a"]
    assert policy.victim() is None and len(policy) == 0


def test_k1_is_lru() -> None:
    policy: LRUK[str] = LRUK(1)
    lru: OrderedDict[str, None] = OrderedDict()
    trace = "abcabdeacbfgahbca"
    for now, key in enumerate(trace):
        policy.access(key, float(now))
        lru[key] = None
        lru.move_to_end(key)
        assert policy.victim() == next(iter(lru))
    assert drain(policy) == list(lru)


def test_k3_counts_the_third_access() -> None:
    policy: LRUK[str] = LRUK(3)
    for now, key in enumerate(["a", "a", "a", "b", "b", "b", "a", "c", "c"], start=1):
        policy.access(key, float(now))
    # a: 1,2,3,7 -> 3rd newest 2; b: 4,5,6 -> 4; c: twice -> -inf
    assert drain(policy) == ["c", "a", "b"]


def test_remove_forgets_the_history() -> None:
    policy: LRUK[str] = LRUK(2)
    for now, key in enumerate(["a", "a", "b", "b"], start=1):
        policy.access(key, float(now))
    assert policy.victim() == "a"
    policy.remove("a")
    assert "a" not in policy and policy.victim() == "b"
    policy.remove("a")  # removing what is not tracked is fine
    policy.access("a", 5.0)  # back with one access: it goes first
    assert policy.victim() == "a"
    policy.remove("b")
    policy.remove("a")
    assert policy.victim() is None and len(policy) == 0


def test_k_below_one_is_refused() -> None:
    with pytest.raises(ValueError):
        LRUK(0)


def test_compaction_keeps_the_heap_small_and_the_answers_right() -> None:
    policy: LRUK[str] = LRUK(2)
    reference = Reference(2)
    for now in range(20_000):
        key = f"k{(now * 7919) % 13}" if now % 5 else "hot"
        policy.access(key, float(now))
        reference.access(key, float(now))
        assert len(policy._heap) <= 4 * len(policy) + 65
        if now % 997 == 0:
            assert policy.victim() == reference.victim()
    assert drain(policy) == reference.order()


@settings(max_examples=300, deadline=None)
@given(
    k=st.integers(1, 4),
    trace=st.lists(
        st.tuples(
            st.sampled_from(["access", "access", "access", "remove", "evict"]), st.integers(0, 9)
        ),
        max_size=400,
    ),
)
def test_victims_match_the_reference(k: int, trace: list[tuple[str, int]]) -> None:
    policy: LRUK[str] = LRUK(k)
    reference = Reference(k)
    for now, (action, n) in enumerate(trace):
        key = f"b{n}"
        if action == "access":
            policy.access(key, float(now))
            reference.access(key, float(now))
        elif action == "remove":
            policy.remove(key)
            reference.remove(key)
        else:
            victim = policy.victim()
            assert victim == reference.victim()
            if victim is not None:
                policy.remove(victim)
                reference.remove(victim)
        assert len(policy) == len(reference.seen)
        assert policy.victim() == reference.victim()
    assert drain(policy) == reference.order()


# -- the scan pattern in the memory manager ---------------------------------------------------
NOTE_TEXT = 100  # characters; a note takes 100 + 2 ("{}") + 96 = 198 bytes resident


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    database = Database.open(str(tmp_path / "scan.db"))
    await database.start()
    yield database
    await database.close()


async def hot_hits_during_a_scan(db: Database, k: int) -> tuple[list[bool], MemoryManager]:
    """A budget for 5 notes; a hot note read after every 8 reads of a 120-note scan (each
    read once). Whether each read of the hot note was a hit."""
    config = MemoryConfig(ram_bytes=1 << 20, agent_ram_bytes=5 * 198 + 50, high_water=1.0, k=k)
    manager = MemoryManager(db, config)
    hot = await manager.add("alice", "hot ".ljust(NOTE_TEXT, "h"))
    scan = [await manager.add("alice", f"scan {i} ".ljust(NOTE_TEXT, "s")) for i in range(120)]
    assert hot.size == 198
    await manager.get("alice", hot.id)  # the hot note is used again and again
    await manager.get("alice", hot.id)
    hits = []
    for i, note in enumerate(scan):
        assert await manager.get("alice", note.id) == note
        if i % 8 == 7:
            before = manager.stats.hits
            assert await manager.get("alice", hot.id) == hot
            hits.append(manager.stats.hits == before + 1)
        assert manager.resident("alice") <= config.agent_ram_bytes
    return hits, manager


async def test_a_scan_does_not_push_out_a_hot_note_with_k2(db: Database) -> None:
    hits, manager = await hot_hits_during_a_scan(db, k=2)
    assert len(hits) == 15 and all(hits)
    assert manager.stats.evictions > 100  # the scan itself churned through the budget


async def test_plain_lru_loses_the_hot_note_to_a_scan(db: Database) -> None:
    hits, manager = await hot_hits_during_a_scan(db, k=1)
    assert len(hits) == 15 and not any(hits)
    assert manager.stats.evictions > 100
