"""The database under memory and storage: SQLite (embedded default) or PostgreSQL, one interface.

Everything above this module writes SQL once, with ``?`` placeholders; :class:`Conn` adapts it
to the dialect. Blocking database work runs on a few worker threads, each with its own
connection (SQLite: one writer thread, which is what SQLite allows anyway), so the kernel's
event loop never blocks on disk. :meth:`Database.run` is how the kernel submits one job; a job
whose caller left or whose deadline passed before a worker picked it up never starts.

    db = Database.open("sqlite:///var/lib/aios/aios.db")   # or "postgresql://..." or a path
    await db.start()
    rows = await db.run(lambda conn: conn.all("SELECT 1"))
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from aios.errors import (
    AIOSError,
    ConfigError,
    DeadlineExceeded,
    Overloaded,
    StorageError,
    SyscallCancelled,
)

T = TypeVar("T")
Dialect = Literal["sqlite", "postgres"]
Row = tuple[Any, ...]


class Conn:
    """One connection, used by one thread at a time; SQL is written with ``?`` placeholders."""

    def __init__(self, raw: Any, dialect: Dialect) -> None:
        self.raw = raw
        self.dialect: Dialect = dialect
        self._depth = 0

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgres" else sql

    def all(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        cursor = self.raw.execute(self._sql(sql), tuple(params))
        try:
            return list(cursor.fetchall()) if cursor.description is not None else []
        finally:
            cursor.close()

    def one(self, sql: str, params: Sequence[Any] = ()) -> Row | None:
        rows = self.all(sql, params)
        return rows[0] if rows else None

    def scalar(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = self.one(sql, params)
        return None if row is None else row[0]

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Execute a statement; the number of rows it changed."""
        cursor = self.raw.execute(self._sql(sql), tuple(params))
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Execute one statement for each of ``rows`` (one round trip where the driver can)."""
        cursor = self.raw.cursor()
        try:
            cursor.executemany(self._sql(sql), [tuple(row) for row in rows])
        finally:
            cursor.close()

    def script(self, statements: Sequence[str]) -> None:
        for statement in statements:
            self.raw.execute(statement)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Conn]:
        """All or nothing (nested uses join the outer one). SQLite takes the write lock at
        BEGIN, so a transaction that reads then writes never fails half-way on a lock."""
        if self._depth:
            self._depth += 1
            try:
                yield self
            finally:
                self._depth -= 1
            return
        self._depth = 1
        try:
            if self.dialect == "sqlite":
                self.raw.execute("BEGIN IMMEDIATE")
                try:
                    yield self
                except BaseException:
                    self.raw.execute("ROLLBACK")
                    raise
                self.raw.execute("COMMIT")
            else:
                with self.raw.transaction():
                    yield self
        finally:
            self._depth = 0

    def lock(self, key: str) -> None:
        """Inside a transaction: serialize with every other transaction that locks ``key``
        (PostgreSQL's transaction-scoped advisory lock; SQLite's write lock already does)."""
        if self.dialect == "postgres":
            self.run("SELECT pg_advisory_xact_lock(hashtext(?))", (key,))

    def close(self) -> None:
        self.raw.close()


@dataclass
class Job:
    """A unit of work a caller waits for (a database job, a tool run), on the caller's clock.
    Withdrawn before it starts, it never runs (nothing changes)."""

    deadline: float | None = None  # on ``clock``
    clock: Callable[[], float] = time.monotonic  # the kernel's (safe to read from a worker)
    withdrawn: bool = False
    started: float | None = None
    finished: float | None = None

    def remaining(self) -> float | None:
        """Seconds until the deadline (negative once past); None without one."""
        return None if self.deadline is None else self.deadline - self.clock()

    def begin(self) -> None:
        """A worker takes the job: it raises if the job was withdrawn or its deadline passed
        while it waited (it never runs), and otherwise records its start."""
        if self.withdrawn:
            raise SyscallCancelled("withdrawn before it started")
        left = self.remaining()
        if left is not None and left < 0:
            raise DeadlineExceeded("the deadline passed while it was queued; nothing changed")
        self.started = self.clock()


@dataclass
class Database:
    """A database URL and the workers that run jobs on it."""

    url: str
    dialect: Dialect
    workers: int = 1
    synchronous: str = "full"  # SQLite: FULL survives power loss, NORMAL only process crashes
    max_queue: int = 10_000
    _pool: ThreadPoolExecutor | None = None
    _local: threading.local = field(default_factory=threading.local)
    _conns: list[Conn] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: int = 0
    # Told each job's seconds waiting for a worker and running (on the worker's thread).
    timed: Callable[[float, float], None] | None = None

    @classmethod
    def open(cls, url: str, *, workers: int | None = None, synchronous: str = "full") -> Database:
        """``sqlite:///PATH``, a bare file path, or ``postgresql://...`` (also a libpq
        ``key=value`` string starting with ``host=`` or ``dbname=``)."""
        if url.startswith(("postgresql://", "postgres://", "host=", "dbname=")):
            return cls(url, "postgres", workers or 4, synchronous)
        path = url.removeprefix("sqlite:///").removeprefix("sqlite://")
        if not path:
            raise ConfigError("the database URL names no file")
        if synchronous.lower() not in ("full", "normal", "extra"):
            raise ConfigError(f"sqlite synchronous must be full, normal or extra: {synchronous!r}")
        return cls(f"sqlite:///{path}", "sqlite", workers or 1, synchronous)

    @property
    def path(self) -> Path | None:
        return Path(self.url.removeprefix("sqlite:///")) if self.dialect == "sqlite" else None

    def redacted(self) -> str:
        """The URL without a password (for logs and errors)."""
        if self.dialect == "sqlite":
            return self.url
        import re

        return re.sub(r"(password=)\S+|(://[^:/@]+:)[^@]+@", r"\1\2***@", self.url)

    # -- connections ------------------------------------------------------------------------
    def connect(self) -> Conn:
        """A new connection (the caller closes it). Schema migrations are applied first."""
        conn = self._connect()
        from aios.storage.schema import migrate

        try:
            migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect(self) -> Conn:
        if self.dialect == "sqlite":
            path = self.path
            assert path is not None
            path.parent.mkdir(parents=True, exist_ok=True)
            raw = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
            raw.execute("PRAGMA journal_mode=WAL")
            raw.execute(f"PRAGMA synchronous={self.synchronous.upper()}")
            raw.execute("PRAGMA foreign_keys=ON")
            raw.execute("PRAGMA case_sensitive_like=ON")  # 'PUB/%' must not match 'pub/x'
            return Conn(raw, "sqlite")
        try:
            import psycopg
        except ImportError:
            raise ConfigError("PostgreSQL needs psycopg: pip install 'aios[postgres]'") from None
        try:
            pg = psycopg.connect(self.url, autocommit=True)
        except psycopg.Error as e:
            raise StorageError(
                f"cannot connect to PostgreSQL at {self.redacted()}: {e}".strip()
            ) from None
        return Conn(pg, "postgres")

    # -- lifespan ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Apply migrations and start the workers (each opens its own connection)."""
        await asyncio.to_thread(lambda: self.connect().close())
        self._pool = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="aios-db", initializer=self._open_local
        )

    def _open_local(self) -> None:
        conn = self._connect()
        self._local.conn = conn
        with self._lock:
            self._conns.append(conn)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    # -- jobs -------------------------------------------------------------------------------
    async def run(self, fn: Callable[[Conn], T], job: Job | None = None) -> T:
        """Run ``fn`` on a worker's connection and return its result (or raise its error).

        The job is withdrawn (never runs) if the caller is cancelled or its deadline passes
        while it waits for a worker. Once it runs it finishes; a caller whose deadline passes
        meanwhile gets :class:`DeadlineExceeded` saying the change may have been applied."""
        pool = self._pool
        if pool is None:
            raise StorageError("the database is not open")
        job = job or Job()
        if self._pending >= self.max_queue:
            raise Overloaded(f"{self._pending} database jobs are queued; retry later")
        self._pending += 1
        try:
            submitted = job.clock()
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(pool, self._work, fn, job, submitted)
            left = job.remaining()
            try:
                return await asyncio.wait_for(
                    asyncio.shield(future), None if left is None else max(0.0, left)
                )
            except (TimeoutError, asyncio.CancelledError) as e:
                job.withdrawn = True  # a worker that has not taken it yet never will
                future.add_done_callback(_retrieve)
                if isinstance(e, asyncio.CancelledError):
                    raise
                if job.started is None:
                    raise DeadlineExceeded(
                        "the call's deadline passed while it was queued; nothing was changed"
                    ) from None
                raise DeadlineExceeded(
                    "the call's deadline passed while it ran; it may have been applied"
                ) from None
        finally:
            self._pending -= 1

    def _work(self, fn: Callable[[Conn], T], job: Job, submitted: float) -> T:
        job.begin()
        try:
            return fn(self._local.conn)
        except AIOSError:
            raise
        except Exception as e:  # the driver's own errors: typed, without the driver's types
            raise StorageError(f"database error: {type(e).__name__}: {e}".strip()) from None
        finally:
            job.finished = job.clock()
            if self.timed is not None and job.started is not None:
                self.timed(job.started - submitted, job.finished - job.started)

    @property
    def pending(self) -> int:
        """Jobs submitted and not finished."""
        return self._pending


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Collect the outcome of a job nobody waits for any more (no "never retrieved" noise)."""
    if not future.cancelled():
        future.exception()
