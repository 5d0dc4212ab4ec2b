"""Agent identities: who is calling, derived from a bearer token and nothing else.

``aios agent create NAME`` issues a token (``aios_`` + 43 random URL-safe characters, 256 bits);
only its SHA-256 is stored, so the database never holds a usable credential. A random 256-bit
token needs no salt or slow hash: nothing can be guessed from its digest. The admin token
belongs to the reserved identity ``admin``.

Identities live in the kernel's database (``[kernel.storage] database``, the one memory and
storage use; schema migration 6), so every kernel on one PostgreSQL database knows the same
agents, and on SQLite (``DATA_DIR/aios.db`` by default, WAL) the CLI can add agents while a
server runs. Before that they had a SQLite file of their own, ``DATA_DIR/aios.db``: a SQLite
kernel database there adopts the table as it is, and a kernel on another database copies its
rows once, while its own table is still empty (:meth:`Identities.import_file`). There is one
admin identity per database: kernels sharing one need the same admin token.

A server authenticates every request, so known tokens are kept in memory until the table
changes: its own writes clear them, and so does another connection's (``aios agent revoke``,
another kernel), seen on each call; a revoked token stops working at once. How a change is
seen depends on the database:

- SQLite: ``PRAGMA data_version``, which moves when another connection commits to the file
  (cheap: it reads no table). It counts every table, so after the kernel's own writes (memory,
  storage, audit) the next call reads its identity again: one indexed lookup.
- PostgreSQL: every write to ``identities`` also bumps the one row of ``identities_version``
  in the same transaction, and each call reads it (``SELECT n FROM identities_version``): one
  round trip to the server per request, on a primary-key row, plus one more for a token not
  in memory. That query runs on the caller's thread (the server's event loop), so a slow
  database slows authentication.

One connection serves an :class:`Identities` object, guarded by a lock (the server's event
loop and any other thread may use it). A connection that breaks (the database restarted) is
replaced on the next call; the call that found it broken fails with :class:`StorageError`.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aios.errors import ConfigError, InvalidRequest, StorageError
from aios.storage.db import Conn, Database

T = TypeVar("T")
ADMIN = "admin"
# Groups the kernel gives meaning to: everyone's, and the admin identity's (the server grants
# it to the admin token only). A policy's ``exempt`` groups are reserved too.
RESERVED_GROUPS: frozenset[str] = frozenset({"default", ADMIN})
TOKEN_PREFIX = "aios_"
MAX_CACHED = 10_000  # known tokens kept in memory (only valid ones: random tokens add nothing)
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_IMPORT_LOCK = "aios.identities.import"  # two kernels starting at once import once


@dataclass(frozen=True)
class Identity:
    name: str
    groups: tuple[str, ...] = ()
    admin: bool = False


def check_name(name: str, what: str = "agent name") -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(
            f"{what} must be 1-64 characters: lowercase letters, digits, '_', '.', '-' "
            f"(starting with a letter or digit), got {name!r}"
        )
    return name


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Identities:
    """The identity table in the kernel's database. Short transactions, safe beside a running
    server and beside other kernels on the same database."""

    def __init__(self, database: str | Path | Database, exempt: Iterable[str] = ()) -> None:
        """``database``: the kernel's database (a URL, a SQLite path, or a :class:`Database`);
        ``exempt``: the policy's groups that skip approvals, reserved as well."""
        self.database = database if isinstance(database, Database) else Database.open(str(database))
        # Groups with powers by their name: no credential may claim them.
        self.reserved = RESERVED_GROUPS | frozenset(exempt)
        self._errors: tuple[type[Exception], ...]  # the driver's
        self._unique: type[Exception]  # the driver's unique violation
        if self.database.dialect == "sqlite":
            self._errors, self._unique = (sqlite3.Error,), sqlite3.IntegrityError
        else:
            try:
                import psycopg
            except ImportError:
                raise ConfigError(
                    "PostgreSQL needs psycopg: pip install 'aios[postgres]'"
                ) from None
            self._errors, self._unique = (psycopg.Error,), psycopg.errors.UniqueViolation
        # What opening a connection may raise (besides ConfigError: no driver, a bad URL).
        self._opening: tuple[type[Exception], ...] = (OSError, StorageError, *self._errors)
        self._lock = threading.Lock()
        self._known: dict[str, Identity] = {}  # token digest -> identity, while unchanged
        self._version: Any = None  # the table's version when _known was last valid
        self._db: Conn | None = None
        self._closed = False
        try:
            self._db = self.database.connect()  # migrations applied
        except self._opening as e:
            raise ConfigError(
                f"cannot open the identity database {self.database.redacted()}: {e}"
            ) from None

    def close(self) -> None:
        with self._lock:
            db, self._db = self._db, None
            self._closed = True
            if db is not None:
                db.close()

    # -- the connection -------------------------------------------------------------------------
    def _with(self, fn: Callable[[Conn], T], exists: str | None = None) -> T:
        """Run ``fn`` on the connection, under the lock; the driver's errors become ours (a
        unique violation: InvalidRequest(``exists``) where given)."""
        with self._lock:
            if self._closed:
                raise StorageError("the identity database is closed")
            db = self._db
            if db is None:  # broken in an earlier call
                try:
                    db = self._db = self.database.connect()
                except self._opening as e:
                    raise StorageError(
                        f"cannot reach the identity database {self.database.redacted()}: {e}"
                    ) from None
                self._known.clear()
                self._version = None
            try:
                return fn(db)
            except self._errors as e:
                if exists is not None and isinstance(e, self._unique):
                    raise InvalidRequest(exists) from None
                if self._broken(db):
                    self._db = None
                    db.close()
                raise StorageError(
                    f"identity database error: {type(e).__name__}: {e}".strip()
                ) from None

    @staticmethod
    def _broken(db: Conn) -> bool:
        raw = db.raw
        return db.dialect == "postgres" and bool(raw.closed or raw.broken)

    def _write(self, db: Conn, sql: str, params: tuple[Any, ...]) -> int:
        """One change to the table; on PostgreSQL with its version bump, in one transaction.
        The number of rows it changed."""
        if db.dialect == "sqlite":  # other connections see it in data_version
            changed = db.run(sql, params)
        else:
            with db.transaction():
                changed = db.run(sql, params)
                if changed:
                    db.run("UPDATE identities_version SET n = n + 1 WHERE id = 1")
        self._changed()
        return changed

    def _changed(self) -> None:
        """After a write on this connection (which ``data_version`` does not count)."""
        self._known.clear()

    @staticmethod
    def _version_of(db: Conn) -> Any:
        if db.dialect == "sqlite":
            return db.scalar("PRAGMA data_version")
        return db.scalar("SELECT n FROM identities_version WHERE id = 1")

    # -- the operations ------------------------------------------------------------------------
    def create(
        self, name: str, groups: tuple[str, ...] = (), *, admin: bool = False
    ) -> tuple[Identity, str]:
        """Issue a new identity and return it with its token (shown once, never stored)."""
        check_name(name)
        if name == ADMIN and not admin:
            raise InvalidRequest(f"the name {ADMIN!r} is reserved for the admin identity")
        for group in groups:
            check_name(group, "group name")
            if group in self.reserved:
                raise InvalidRequest(
                    f"the group {group!r} is reserved (the kernel gives it powers by its name); "
                    "grant capabilities through a group of your own in [kernel.access.groups]"
                )
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = (name, digest(token), ",".join(groups), int(admin), time.time())
        self._with(
            lambda db: self._write(
                db,
                "INSERT INTO identities (name, token_sha256, groups, admin, created) "
                "VALUES (?, ?, ?, ?, ?)",
                row,
            ),
            exists=f"an agent named {name!r} exists; revoke it first to issue a new token",
        )
        return Identity(name, tuple(groups), admin), token

    def set_admin_token(self, token: str) -> bool:
        """Make ``token`` the admin token (from the environment or the admin token file).
        True if it replaced a different one: an earlier token, or another kernel's on a shared
        database (there is one admin identity per database). Unchanged, nothing is written."""
        if len(token) < 24:
            raise ConfigError("the admin token must be at least 24 characters")
        key = digest(token)

        def put(db: Conn) -> bool:
            with db.transaction():
                before = db.scalar("SELECT token_sha256 FROM identities WHERE name = ?", (ADMIN,))
                if before == key:
                    return False
                self._write(
                    db,
                    "INSERT INTO identities (name, token_sha256, groups, admin, created) "
                    "VALUES (?, ?, '', 1, ?) ON CONFLICT (name) DO UPDATE SET "
                    "token_sha256 = excluded.token_sha256, admin = 1",
                    (ADMIN, key, time.time()),
                )
                return before is not None

        return self._with(put)

    def authenticate(self, token: str) -> Identity | None:
        """The identity of ``token``, or None if it is unknown or revoked."""
        key = digest(token)

        def look(db: Conn) -> Identity | None:
            version = self._version_of(db)  # before the lookup: a change after it shows next
            if version != self._version:  # another connection changed the table
                self._known.clear()
                self._version = version
            if (known := self._known.get(key)) is not None:
                return known
            row = db.one(
                "SELECT name, groups, admin FROM identities WHERE token_sha256 = ?", (key,)
            )
            if row is None:
                return None
            identity = self._identity(row[0], row[1], row[2])
            if len(self._known) < MAX_CACHED:
                self._known[key] = identity
            return identity

        return self._with(look)

    def list(self) -> list[Identity]:
        rows = self._with(
            lambda db: db.all("SELECT name, groups, admin FROM identities ORDER BY name")
        )
        return [self._identity(n, gs, a) for n, gs, a in rows]

    def _identity(self, name: str, groups: str, admin: int) -> Identity:
        """A stored identity; a reserved group stored before it was reserved is ignored."""
        claimed = tuple(g for g in groups.split(",") if g and g not in self.reserved)
        return Identity(name, claimed, bool(admin))

    def revoke(self, name: str) -> bool:
        """Delete an identity: its token stops working at once. False if there was none."""
        if name == ADMIN:
            raise InvalidRequest("the admin identity cannot be revoked (set a new admin token)")
        deleted = self._with(
            lambda db: self._write(db, "DELETE FROM identities WHERE name = ?", (name,))
        )
        return deleted > 0

    def import_file(self, path: str | Path) -> int:
        """Copy the agents of an identity file of older versions (a SQLite file with an
        ``identities`` table) into this database, only while this one has no identities at
        all: the first start on a new database. The admin identity is not copied (its token
        is set at every start). The number of agents copied; 0 without the file or the table."""
        path = Path(path)
        if not path.is_file() or self._with(lambda db: db.one("SELECT 1 FROM identities LIMIT 1")):
            return 0
        try:  # read-only: the old file stays as it was
            old = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True)
            try:
                if not old.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'identities'"
                ).fetchone():
                    return 0
                rows = old.execute(
                    "SELECT name, token_sha256, groups, admin, created FROM identities "
                    "WHERE name != ? ORDER BY name",
                    (ADMIN,),
                ).fetchall()
            finally:
                old.close()
        except sqlite3.Error as e:
            raise ConfigError(f"cannot read the old identity file {path}: {e}") from None

        def copy(db: Conn) -> int:
            copied = 0
            with db.transaction():
                db.lock(_IMPORT_LOCK)
                if db.one("SELECT 1 FROM identities LIMIT 1"):
                    return 0  # another kernel got there first
                for row in rows:
                    copied += db.run(
                        "INSERT INTO identities (name, token_sha256, groups, admin, created) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                        tuple(row),
                    )
                if copied and db.dialect == "postgres":
                    db.run("UPDATE identities_version SET n = n + 1 WHERE id = 1")
            self._changed()
            return copied

        return self._with(copy) if rows else 0
