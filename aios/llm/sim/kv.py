"""The SIMULATED core's KV cache: a unified pool of reference-counted cells, and the
out-of-memory error raised when a step needs more cells than the simulated hardware has.
"""

from __future__ import annotations

from collections.abc import Sequence

from aios.errors import CoreError


class OutOfMemory(CoreError):
    """The simulated KV cache is full: a step needed more cells than it has."""

    code = "out_of_memory"


class KVPool:
    """A unified KV cache's cells, reference-counted: a copy shares its prefix's cells."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._next = 0

    @property
    def used(self) -> int:
        return len(self._refs)

    def check(self, n: int, what: str) -> None:
        if self.used + n > self.capacity:
            raise OutOfMemory(
                f"out of memory: {what} needs {n} new KV cells but {self.used} of "
                f"{self.capacity} are in use (simulated core)"
            )

    def alloc(self, n: int) -> range:
        cells = range(self._next, self._next + n)
        self._refs.update(dict.fromkeys(cells, 1))
        self._next += n
        self.peak = max(self.peak, len(self._refs))
        return cells

    def share(self, cells: Sequence[int]) -> None:
        refs = self._refs
        for c in cells:
            refs[c] += 1

    def free(self, cells: Sequence[int]) -> None:
        refs = self._refs
        for c in cells:
            r = refs[c] - 1
            if r:
                refs[c] = r
            else:
                del refs[c]
