"""The context manager's store: saved sequence contexts of pre-empted requests.

A snapshot (a sequence's KV state as llama.cpp serializes it) stays in RAM while the store's RAM
budget allows and is spilled to a file otherwise; ``take`` returns it either way and forgets it.
The store is confined to one thread (the core's): the engine calls it in the middle of a step,
so neither RAM copies nor disk writes ever run on the event loop.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from aios.errors import CoreError


@dataclass
class ContextStats:
    saved: int = 0
    restored: int = 0
    dropped: int = 0
    spilled: int = 0  # snapshots that went to disk
    saved_bytes: int = 0
    ram_bytes: int = 0  # resident now
    disk_bytes: int = 0  # on disk now
    put_seconds: float = 0.0
    take_seconds: float = 0.0


class SnapshotStore:
    """Snapshots by key: RAM up to ``ram_budget`` bytes, then files in ``spill_dir`` (a private
    temporary directory, created on the first spill, when none is given)."""

    def __init__(self, ram_budget: int, spill_dir: Path | None = None) -> None:
        if ram_budget < 0:
            raise ValueError("ram_budget must be >= 0")
        self.ram_budget = ram_budget
        self.stats = ContextStats()
        self._ram: dict[str, bytes] = {}
        self._disk: dict[str, tuple[Path, int]] = {}
        self._dir = spill_dir
        self._own_dir = False

    def put(self, key: str, data: bytes) -> None:
        if key in self._ram or key in self._disk:
            raise CoreError(f"a context is already saved under {key!r}")
        started = time.perf_counter()
        stats = self.stats
        if stats.ram_bytes + len(data) <= self.ram_budget:
            self._ram[key] = data
            stats.ram_bytes += len(data)
        else:
            path = self._spill_dir() / f"{len(self._disk)}-{os.getpid()}-{_safe(key)}.kv"
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
            self._disk[key] = (path, len(data))
            stats.disk_bytes += len(data)
            stats.spilled += 1
        stats.saved += 1
        stats.saved_bytes += len(data)
        stats.put_seconds += time.perf_counter() - started

    def take(self, key: str) -> bytes:
        started = time.perf_counter()
        data = self._ram.pop(key, None)
        if data is not None:
            self.stats.ram_bytes -= len(data)
        else:
            entry = self._disk.pop(key, None)
            if entry is None:
                raise CoreError(f"no context saved under {key!r}")
            path, size = entry
            data = path.read_bytes()
            path.unlink(missing_ok=True)
            self.stats.disk_bytes -= size
        self.stats.restored += 1
        self.stats.take_seconds += time.perf_counter() - started
        return data

    def drop(self, key: str) -> None:
        """Forget a snapshot (its request was cancelled or failed while pre-empted)."""
        data = self._ram.pop(key, None)
        if data is not None:
            self.stats.ram_bytes -= len(data)
        elif (entry := self._disk.pop(key, None)) is not None:
            entry[0].unlink(missing_ok=True)
            self.stats.disk_bytes -= entry[1]
        else:
            return
        self.stats.dropped += 1

    def __contains__(self, key: str) -> bool:
        return key in self._ram or key in self._disk

    def __len__(self) -> int:
        return len(self._ram) + len(self._disk)

    def close(self) -> None:
        """Forget everything and remove spill files (and the directory if the store made it)."""
        for key in list(self._ram) + list(self._disk):
            self.drop(key)
        if self._own_dir and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _spill_dir(self) -> Path:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="aios-kv-"))
            self._own_dir = True
        self._dir.mkdir(parents=True, exist_ok=True)
        return self._dir


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in key)[:64]
