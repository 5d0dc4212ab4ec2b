"""The audit log: every syscall's principal, resource, decision and outcome, appended to a
hash-chained table in the kernel's database.

Record n stores ``hash = SHA-256(hash of record n-1 + the record's canonical JSON)``, so editing
a record, removing one or reordering them breaks the chain at that point, and
:func:`verify` (``aios audit verify``) names the first record that does not check. Removing the
newest records leaves a shorter valid chain: compare the head hash :func:`verify` reports with
one kept elsewhere (``--head``) to detect that too.

:func:`prune` (``aios audit prune``) removes the oldest records and keeps, in ``audit_anchor``,
the sequence number and hash of the last one removed: the chain resumes there, so the rest
still verifies, removing records after the anchor is still detected, and the pruning is
itself a record.

Records are appended by one writer task in batches (each batch one transaction, gathered for
up to ``linger`` seconds after the first record), so auditing adds no database round trip to a
syscall and costs one commit per batch, not per syscall; a crash can lose the records of the
last moments.

The queue is bounded without losing a record: :meth:`AuditLog.record` always accepts (every
call in flight ends with one), and the kernel refuses *new* syscalls (``Overloaded``, retry
later) while the writer is ``max_pending`` records behind, so the backlog stays below that bound
plus one record per call in flight. The writer drains far faster than the kernel makes
syscalls (``bench/audit.py`` measures both), so the bound is reached only when the database
stalls; refusing then, rather than dropping records or blocking calls that have already run,
keeps the log complete and the kernel responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

from aios.storage.db import Conn, Database

log = logging.getLogger("aios.audit")
GENESIS = "0" * 64
FIELDS = ("at", "principal", "process", "kind", "op", "resource", "decision", "outcome", "detail")
INSERT = (
    f"INSERT INTO audit (seq, {', '.join(FIELDS)}, prev, hash) "
    f"VALUES (?, {', '.join('?' for _ in FIELDS)}, ?, ?)"
)


@dataclass(frozen=True)
class Record:
    at: float
    principal: str
    process: str
    kind: str  # llm, memory, storage, tools
    op: str
    resource: str  # what it touched: a model, a path, a tool, a note
    decision: str  # allowed, denied, approved, rejected
    outcome: str  # done, failed:<code>, cancelled
    detail: str = ""

    def canonical(self) -> str:
        fields = {name: getattr(self, name) for name in FIELDS}  # (asdict is slower, same JSON)
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))


def chain(prev: str, record: Record) -> str:
    return hashlib.sha256((prev + record.canonical()).encode()).hexdigest()


def anchor(conn: Conn) -> tuple[int, str]:
    """Where the chain starts: after the last pruned record, or at the beginning."""
    row = conn.one("SELECT seq, hash FROM audit_anchor WHERE id = 1")
    return (int(row[0]), row[1]) if row else (0, GENESIS)


def append(conn: Conn, records: list[Record]) -> str:
    """Append ``records`` in one transaction; the new head hash."""
    with conn.transaction():
        conn.lock("audit")
        row = conn.one("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
        seq, prev = (int(row[0]), row[1]) if row else anchor(conn)
        rows = []
        for record in records:
            seq += 1
            digest = chain(prev, record)
            rows.append((seq, *(getattr(record, f) for f in FIELDS), prev, digest))
            prev = digest
        conn.many(INSERT, rows)
        return prev


@dataclass(frozen=True)
class Verdict:
    ok: bool
    records: int
    head: str
    problem: str = ""  # what is wrong, at which record
    pruned: int = 0  # the chain starts after this record (removed by prune)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def tail(conn: Conn, limit: int, principal: str | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` records, oldest first (``principal``'s only, if given), each with
    its ``seq`` and fields."""
    where, params = ("WHERE principal = ? ", (principal,)) if principal is not None else ("", ())
    rows = conn.all(
        f"SELECT seq, {', '.join(FIELDS)} FROM audit {where}ORDER BY seq DESC LIMIT ?",
        (*params, limit),
    )
    return [dict(zip(("seq", *FIELDS), row, strict=True)) for row in reversed(rows)]


def prune(conn: Conn, before: float, by: str, *, dry_run: bool = False) -> int:
    """Remove the records older than ``before`` (a time), keeping at least the newest one, and
    record that ``by`` did; how many were removed (``dry_run``: would be; nothing changes)."""
    with conn.transaction():
        conn.lock("audit")
        newest = conn.scalar("SELECT MAX(seq) FROM audit")
        row = conn.one(
            "SELECT seq, hash FROM audit WHERE at < ? AND seq < ? ORDER BY seq DESC LIMIT 1",
            (before, newest or 0),
        )
        if row is None:
            return 0
        through, last_hash = int(row[0]), row[1]
        if dry_run:
            return int(conn.scalar("SELECT COUNT(*) FROM audit WHERE seq <= ?", (through,)))
        removed = conn.run("DELETE FROM audit WHERE seq <= ?", (through,))
        conn.run("DELETE FROM audit_anchor WHERE id = 1")
        conn.run(
            "INSERT INTO audit_anchor (id, seq, hash, at) VALUES (1, ?, ?, ?)",
            (through, last_hash, time.time()),
        )
        note = Record(time.time(), by, "", "audit", "prune", f"through record {through}",
                      "allowed", "done", f"{removed} records")  # fmt: skip
        append(conn, [note])
        return removed


def verify(conn: Conn, head: str | None = None) -> Verdict:
    """Recompute the chain from its start (the anchor, if pruned); the first break, if any."""
    start, prev = anchor(conn)
    expected_seq, count = start + 1, 0

    def broken(problem: str) -> Verdict:
        return Verdict(False, count, prev, problem, start)

    for row in conn.all(f"SELECT seq, {', '.join(FIELDS)}, prev, hash FROM audit ORDER BY seq"):
        seq, values, stored_prev, stored = int(row[0]), row[1:-2], row[-2], row[-1]
        if seq != expected_seq:
            return broken(f"record {expected_seq} is missing (next is {seq})")
        if stored_prev != prev:
            return broken(f"record {seq} does not follow record {seq - 1}")
        if chain(prev, Record(*values)) != stored:
            return broken(f"record {seq} was altered")
        prev, expected_seq, count = stored, seq + 1, count + 1
    if start and not count:  # a prune always leaves its own record after the anchor
        return broken(f"every record after the pruned ones (from {start + 1}) was removed")
    if head is not None and head != prev:
        return broken("the head differs from the expected one: records were removed from the "
                      "end (or added)")  # fmt: skip
    return Verdict(True, count, prev, pruned=start)


class AuditLog:
    """The kernel's writer: ``record`` never blocks a syscall; :meth:`run` (a task of the
    kernel's TaskGroup) appends in batches."""

    def __init__(
        self, db: Database, max_batch: int = 512, linger: float = 0.02, max_pending: int = 50_000
    ) -> None:
        self.db = db
        self.max_batch = max_batch
        self.linger = linger
        self.max_pending = max_pending
        self._queue: asyncio.Queue[Record] = asyncio.Queue()
        self.head = GENESIS
        self.written = 0
        self.lost = 0  # records the database refused (logged)
        self.refused = 0  # syscalls refused while the writer was max_pending behind
        self.peak = 0  # the largest backlog seen

    @property
    def pending(self) -> int:
        """Records queued and not yet written."""
        return self._queue.qsize()

    @property
    def behind(self) -> bool:
        """The writer is ``max_pending`` records behind: the kernel takes no new syscall."""
        return self._queue.qsize() >= self.max_pending

    def record(self, record: Record) -> None:
        self._queue.put_nowait(record)
        self.peak = max(self.peak, self._queue.qsize())

    async def run(self) -> None:
        """Append what is recorded, in batches, until cancelled. Never raises: a database
        error loses that batch (counted in ``lost`` and logged), not the kernel."""
        while True:
            batch = [await self._queue.get()]
            if self.linger > 0 and self._queue.qsize() < self.max_batch:
                await asyncio.sleep(self.linger)  # let the batch gather
            while not self._queue.empty() and len(batch) < self.max_batch:
                batch.append(self._queue.get_nowait())
            try:
                self.head = await self.db.run(functools.partial(append, records=batch))
                self.written += len(batch)
            except Exception as e:  # the log must not take syscalls down with it
                self.lost += len(batch)
                log.error("audit: could not append %d records: %s", len(batch), e)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def flush(self) -> None:
        """Return once everything recorded so far is written."""
        await self._queue.join()

    async def drain(self, timeout: float = 10.0) -> None:
        """Before the writer stops: wait (up to ``timeout``) for what is queued to be written
        (the writer, :meth:`run`, must be running)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)
