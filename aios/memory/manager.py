"""The memory manager: each agent's notes and conversation history, durable in the database,
with a RAM tier under a byte budget.

Every write is in the database before it is acknowledged (write-through), so RAM holds clean
copies: evicting a block is dropping it, and touching an evicted block faults it back in from
storage. Blocks are single notes and chunks of ``chunk_turns`` history turns. When the resident
bytes of all agents pass ``high_water`` of ``ram_bytes``, or one agent's pass
``agent_ram_bytes``, blocks are evicted by LRU-K (:mod:`aios.memory.lruk`) until they are under
again. A hit costs no database round trip at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aios.config import MemoryConfig
from aios.errors import InvalidRequest
from aios.memory.lruk import LRUK
from aios.memory.notes import Note, Notes, Scalar, Turn, check_metadata, check_text
from aios.storage.db import Conn, Database, Job
from aios.storage.paths import check_text as valid_text
from aios.syscall import ROLES

BlockKey = tuple[str, str, int]  # (kind "note" | "turns", owner, note id | chunk number)


@dataclass
class MemoryStats:
    resident_bytes: int = 0
    blocks: int = 0
    hits: int = 0
    faults: int = 0
    evictions: int = 0

    def to_json(self) -> dict[str, int]:
        return self.__dict__.copy()


class MemoryManager:
    def __init__(
        self,
        db: Database,
        config: MemoryConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.config = config or MemoryConfig()
        self.notes = Notes(clock)
        self.stats = MemoryStats()
        self._blocks: dict[BlockKey, tuple[Any, int]] = {}
        self._lru: LRUK[BlockKey] = LRUK(self.config.k)
        self._agents: dict[str, LRUK[BlockKey]] = {}
        self._agent_bytes: dict[str, int] = {}
        self._lengths: dict[str, int] = {}  # history length per agent, once known
        self._tick = 0
        # Write generations, per agent: a read that started before a write (or delete) of
        # the same agent's notes, or of its history, must not make what it read resident.
        self._notes_gen: dict[str, int] = {}
        self._history_gen: dict[str, int] = {}

    # -- the resident tier ------------------------------------------------------------------
    def resident(self, owner: str | None = None) -> int:
        """Resident bytes (of one agent, or of all)."""
        return self.stats.resident_bytes if owner is None else self._agent_bytes.get(owner, 0)

    def _touch(self, key: BlockKey) -> Any:
        """The block's value if resident (a hit, which counts as an access), else None."""
        entry = self._blocks.get(key)
        if entry is None:
            return None
        self.stats.hits += 1
        self._access(key)
        return entry[0]

    def _access(self, key: BlockKey) -> None:
        self._tick += 1
        self._lru.access(key, self._tick)
        self._agents.setdefault(key[1], LRUK(self.config.k)).access(key, self._tick)

    def _admit(self, key: BlockKey, value: Any, size: int) -> None:
        """Make ``value`` resident as ``key`` (replacing what was there, keeping its access
        history), then evict down to the budgets. A block bigger than an agent's whole budget
        is never resident."""
        owner = key[1]
        if size > min(self.config.agent_ram_bytes, self.config.ram_bytes * self.config.high_water):
            self._drop(key)
            return
        old = self._blocks.get(key)
        grow = size - (old[1] if old else 0)
        self._blocks[key] = (value, size)
        self.stats.resident_bytes += grow
        self.stats.blocks += old is None
        self._agent_bytes[owner] = self._agent_bytes.get(owner, 0) + grow
        self._access(key)
        while self._agent_bytes.get(owner, 0) > self.config.agent_ram_bytes:
            self._evict(self._agents[owner].victim())
        limit = self.config.ram_bytes * self.config.high_water
        while self.stats.resident_bytes > limit:
            self._evict(self._lru.victim())

    def _evict(self, key: BlockKey | None) -> None:
        assert key is not None, "over budget with nothing resident"
        self._drop(key)
        self.stats.evictions += 1

    def _drop(self, key: BlockKey) -> None:
        entry = self._blocks.pop(key, None)
        if entry is None:
            return
        owner = key[1]
        self.stats.resident_bytes -= entry[1]
        self.stats.blocks -= 1
        self._agent_bytes[owner] -= entry[1]
        self._lru.remove(key)
        agent = self._agents[owner]
        agent.remove(key)
        if not len(agent):
            del self._agents[owner]
            del self._agent_bytes[owner]

    async def _run(self, fn: Callable[[Conn], Any], job: Job | None) -> Any:
        return await self.db.run(fn, job)

    # -- notes ------------------------------------------------------------------------------
    async def add(
        self,
        owner: str,
        text: str,
        metadata: dict[str, Scalar] | None = None,
        *,
        job: Job | None = None,
    ) -> Note:
        text, meta = check_text(text), check_metadata(metadata)
        note: Note = await self._run(lambda c: self.notes.add(c, owner, text, meta), job)
        self._admit(("note", owner, note.id), note, note.size)
        return note

    async def get(self, owner: str, id: int, *, job: Job | None = None) -> Note:
        key = ("note", owner, _id(id))
        note: Note | None = self._touch(key)
        if note is not None:
            return note
        self.stats.faults += 1
        generation = self._notes_gen.get(owner, 0)
        note = await self._run(lambda c: self.notes.get(c, owner, id), job)
        if self._notes_gen.get(owner, 0) == generation and key not in self._blocks:
            self._admit(key, note, note.size)  # (no write or delete meanwhile)
        return note

    async def update(
        self,
        owner: str,
        id: int,
        text: str | None = None,
        metadata: dict[str, Scalar] | None = None,
        *,
        job: Job | None = None,
    ) -> Note:
        _id(id)
        if text is None and metadata is None:
            raise InvalidRequest("give 'text', 'metadata' or both to update a note")
        text = None if text is None else check_text(text)
        meta = None if metadata is None else check_metadata(metadata)
        key = ("note", owner, id)
        mine = self._bump(self._notes_gen, owner)
        self._drop(key)
        note: Note = await self._run(lambda c: self.notes.update(c, owner, id, text, meta), job)
        if self._notes_gen[owner] == mine:  # no later write or delete: this is the newest
            self._admit(key, note, note.size)
        return note

    async def delete(self, owner: str, id: int, *, job: Job | None = None) -> bool:
        key = ("note", owner, _id(id))
        self._bump(self._notes_gen, owner)
        self._drop(key)
        try:
            await self._run(lambda c: self.notes.delete(c, owner, id), job)
        finally:
            self._drop(key)
        return True

    @staticmethod
    def _bump(generations: dict[str, int], owner: str) -> int:
        generations[owner] = generations.get(owner, 0) + 1
        return generations[owner]

    async def list_notes(
        self,
        owner: str,
        where: dict[str, Scalar] | None = None,
        limit: int = 50,
        *,
        job: Job | None = None,
    ) -> list[Note]:
        limit = _limit(limit)
        result: list[Note] = await self._run(
            lambda c: self.notes.list_notes(c, owner, where, limit), job
        )
        return result

    async def search(
        self,
        owner: str,
        query: str,
        where: dict[str, Scalar] | None = None,
        limit: int = 5,
        *,
        job: Job | None = None,
    ) -> list[dict[str, Any]]:
        """Notes matching ``query`` best first: ``{"note": Note, "score": float}``."""
        limit = _limit(limit)
        found = await self._run(lambda c: self.notes.search(c, owner, query, where, limit), job)
        return [{"note": note, "score": score} for note, score in found]

    # -- conversation history ---------------------------------------------------------------
    async def remember(
        self, owner: str, turns: Sequence[tuple[str, str]], *, job: Job | None = None
    ) -> list[Turn]:
        """Append (role, content) turns to the agent's history."""
        if not isinstance(turns, list | tuple):
            raise InvalidRequest("turns must be a list of [role, content] pairs")
        checked = []
        for turn in turns:
            if (
                not isinstance(turn, list | tuple)
                or len(turn) != 2
                or turn[0] not in ROLES
                or not isinstance(turn[1], str)
            ):
                raise InvalidRequest(f"a turn is [role, content] with role in {sorted(ROLES)}")
            checked.append((str(turn[0]), valid_text(str(turn[1]), "a turn's content")))
        if not checked:
            return []
        mine = self._bump(self._history_gen, owner)
        added: list[Turn] = await self._run(lambda c: self.notes.append(c, owner, checked), job)
        if self._history_gen[owner] != mine:  # a forget or another append meanwhile
            self._drop_history(owner)
            return added
        self._lengths[owner] = added[-1].n + 1
        size = self.config.chunk_turns
        for new in added:  # extend resident chunks in place; start the chunk a turn opens
            key = ("turns", owner, new.n // size)
            entry = self._blocks.get(key)
            if entry is not None and entry[0] and entry[0][-1].n == new.n - 1:
                self._admit(key, [*entry[0], new], entry[1] + _turn_size(new))
            elif entry is None and new.n % size == 0:
                self._admit(key, [new], _turn_size(new))
            else:
                self._drop(key)
        return added

    async def history(self, owner: str, limit: int = 50, *, job: Job | None = None) -> list[Turn]:
        """The agent's most recent ``limit`` turns, oldest first."""
        limit = _limit(limit)
        generation = self._history_gen.get(owner, 0)
        length = self._lengths.get(owner)
        if length is None:
            length = await self._run(lambda c: self.notes.length(c, owner), job)
            if self._history_gen.get(owner, 0) == generation:
                self._lengths[owner] = length
        start = max(0, length - limit)
        size = self.config.chunk_turns
        chunks = range(start // size, (length + size - 1) // size)
        have: dict[int, list[Turn]] = {}
        missing = []
        for c in chunks:
            value = self._touch(("turns", owner, c))
            if value is None:
                missing.append(c)
            else:
                have[c] = value
        if missing:
            self.stats.faults += len(missing)
            lo, hi = missing[0] * size, (missing[-1] + 1) * size
            loaded = await self._run(lambda c: self.notes.turns(c, owner, lo, hi), job)
            for c in missing:
                block = [t for t in loaded if t.n // size == c]
                have[c] = block
                fresh = self._history_gen.get(owner, 0) == generation
                if block and fresh and ("turns", owner, c) not in self._blocks:
                    self._admit(("turns", owner, c), block, sum(map(_turn_size, block)))
        turns = [t for c in chunks for t in have[c]]
        return [t for t in turns if t.n >= start]

    async def forget(self, owner: str, *, job: Job | None = None) -> int:
        """Clear the agent's conversation history; how many turns were dropped."""
        self._bump(self._history_gen, owner)
        self._drop_history(owner)
        try:
            dropped: int = await self._run(lambda c: self.notes.clear(c, owner), job)
        finally:
            self._drop_history(owner)
        return dropped

    def _drop_history(self, owner: str) -> None:
        for key in [k for k in self._blocks if k[0] == "turns" and k[1] == owner]:
            self._drop(key)
        self._lengths.pop(owner, None)

    async def usage(self, owner: str, *, job: Job | None = None) -> dict[str, Any]:
        notes = await self._run(lambda c: self.notes.count(c, owner), job)
        return {  # the agent's own figures only (kernel-wide stats would leak others')
            "notes": notes,
            "resident_bytes": self.resident(owner),
            "agent_ram_bytes": self.config.agent_ram_bytes,
        }


def _turn_size(turn: Turn) -> int:
    return len(turn.content.encode()) + 64


def _id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise InvalidRequest(f"a note id must be an integer, got {value!r}")
    return value


def _limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000:
        raise InvalidRequest(f"limit must be an integer in [1, 10000], got {value!r}")
    return value
