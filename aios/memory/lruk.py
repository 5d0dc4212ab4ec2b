"""LRU-K (O'Neil, O'Neil and Weikum, 1993): evict the block whose K-th most recent access is
oldest. A block seen fewer than K times has an infinitely old K-th access, so it goes first
(the least recently used of those first). A scan touches each block once and so cannot push
out a block that is used again and again, which is what breaks plain LRU (K = 1).

Pure: the caller supplies the time of each access (any increasing number, e.g. a counter).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class LRUK(Generic[K]):
    def __init__(self, k: int = 2) -> None:
        if k < 1:
            raise ValueError(f"LRU-K needs k >= 1, got {k}")
        self.k = k
        self._seen: dict[K, deque[float]] = {}
        self._rank: dict[K, tuple[float, float]] = {}
        self._heap: list[tuple[float, float, int, K]] = []
        self._pushes = 0

    def __len__(self) -> int:
        return len(self._seen)

    def __contains__(self, key: object) -> bool:
        return key in self._seen

    def access(self, key: K, now: float) -> None:
        """``key`` was used at time ``now`` (tracking it if it is new)."""
        seen = self._seen.get(key)
        if seen is None:
            seen = self._seen[key] = deque(maxlen=self.k)
        seen.append(now)
        rank = (seen[0] if len(seen) == self.k else -math.inf, now)
        self._rank[key] = rank
        self._pushes += 1
        heapq.heappush(self._heap, (*rank, self._pushes, key))
        if len(self._heap) > 4 * len(self._seen) + 64:
            self._compact()

    def remove(self, key: K) -> None:
        """Stop tracking ``key`` (it was evicted or deleted)."""
        self._seen.pop(key, None)
        self._rank.pop(key, None)

    def victim(self) -> K | None:
        """The block to evict next (still tracked until :meth:`remove`), or None."""
        heap = self._heap
        while heap:
            kth, last, _, key = heap[0]
            if self._rank.get(key) == (kth, last):
                return key
            heapq.heappop(heap)  # a stale entry: the key was used again or removed
        return None

    def _compact(self) -> None:
        self._heap = [(*rank, i, key) for i, (key, rank) in enumerate(self._rank.items())]
        heapq.heapify(self._heap)
