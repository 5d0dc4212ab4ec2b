"""LRU-K alone (a pure policy, checked against a brute-force reference), and in the memory
manager: the scan pattern that plain LRU gets wrong."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aios.config import MemoryConfig, StorageConfig
from aios.memory.lruk import LRUK
from aios.resources import Resources


def reference_victim(history: dict[str, list[float]], k: int) -> str | None:
    """The definition, by brute force: the oldest K-th most recent access (-inf if fewer than
    K accesses), ties broken by the oldest last access."""
    if not history:
        return None

    def rank(key: str) -> tuple[float, float]:
        seen = history[key]
        return (seen[-k] if len(seen) >= k else -math.inf, seen[-1])

    return min(history, key=rank)


@settings(max_examples=200, deadline=None)
@given(
    k=st.integers(1, 3),
    trace=st.lists(
        st.tuples(st.sampled_from(["access", "remove", "evict"]), st.integers(0, 7)),
        max_size=300,
    ),
)
def test_victims_match_the_definition(k: int, trace: list[tuple[str, int]]) -> None:
    policy: LRUK[str] = LRUK(k)
    history: dict[str, list[float]] = {}
    for now, (action, n) in enumerate(trace):
        key = f"b{n}"
        if action == "access":
            policy.access(key, float(now))
            history.setdefault(key, []).append(float(now))
        elif action == "remove":
            policy.remove(key)
            history.pop(key, None)
        else:
            victim = policy.victim()
            assert victim == reference_victim(history, k)
            if victim is not None:
                policy.remove(victim)
                del history[victim]
        assert len(policy) == len(history)
    assert policy.victim() == reference_victim(history, k)


def test_k1_is_lru_and_k2_prefers_blocks_seen_once() -> None:
    lru: LRUK[str] = LRUK(1)
    lruk: LRUK[str] = LRUK(2)
    for now, key in enumerate(["hot", "hot", "a", "b"]):
        lru.access(key, now)
        lruk.access(key, now)
    assert lru.victim() == "hot"  # least recently used
    assert lruk.victim() == "a"  # seen once: its 2nd access is infinitely old
    with pytest.raises(ValueError):
        LRUK(0)


def test_the_heap_stays_bounded_under_many_accesses() -> None:
    policy: LRUK[int] = LRUK(2)
    for now in range(100_000):
        policy.access(now % 10, now)
    assert len(policy._heap) <= 4 * 10 + 64 + 1
    assert policy.victim() == 0  # its 2nd most recent access is the oldest


async def scan(tmp_path: Path, k: int) -> tuple[int, int, bool]:
    """A hot note read between the notes of a long scan (each read once), with RAM for about
    five notes. Returns (hits on the hot note, its reads, resident at the end)."""
    note_size = 96 + len("x" * 200) + 2  # Note.size: text + "{}" metadata + bookkeeping
    memory = MemoryConfig(ram_bytes=int(5.5 * note_size / 0.8), agent_ram_bytes=10**6, k=k)
    r = Resources(StorageConfig(database=str(tmp_path / f"k{k}.db")), memory)
    await r.start()
    try:
        manager = r.memory
        ids = [(await manager.add("a", "x" * 200)).id for _ in range(40)]
        hot, others = ids[0], ids[1:]
        await manager.get("a", hot)
        await manager.get("a", hot)  # used twice before the scan
        hits = reads = 0
        for i, other in enumerate(others):
            await manager.get("a", other)
            if i % 8 == 7:  # more scan reads between two hot reads than RAM holds
                before = manager.stats.hits
                assert (await manager.get("a", hot)).text == "x" * 200
                hits += manager.stats.hits - before
                reads += 1
            assert manager.resident() <= memory.ram_bytes * memory.high_water
        return hits, reads, ("note", "a", hot) in manager._blocks
    finally:
        await r.close()


async def test_lru_k_keeps_the_hot_note_through_a_scan_plain_lru_does_not(
    tmp_path: Path,
) -> None:
    hits2, reads2, resident2 = await scan(tmp_path, k=2)
    hits1, _, resident1 = await scan(tmp_path, k=1)
    assert hits2 == reads2 and resident2  # LRU-K: every read of the hot note was a hit
    assert hits1 == 0 and not resident1  # LRU: the scan pushed it out before each read
