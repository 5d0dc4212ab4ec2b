"""Agent identities: who is calling, derived from a bearer token and nothing else.

``aios agent create NAME`` issues a token (``aios_`` + 43 random URL-safe characters, 256 bits);
only its SHA-256 is stored, so the database never holds a usable credential. A random 256-bit
token needs no salt or slow hash: nothing can be guessed from its digest. Identities live in one
SQLite file in the data directory (WAL, so the CLI can add agents while a server runs). The admin
token belongs to the reserved identity ``admin``.

A server authenticates every request, so known tokens are kept in memory until the table
changes: its own writes clear them, and another process's (``aios agent revoke``) show in
``PRAGMA data_version``, checked on each call; a revoked token stops working at once.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from aios.errors import ConfigError, InvalidRequest

ADMIN = "admin"
# Groups the kernel gives meaning to: everyone's, and the admin identity's (the server grants
# it to the admin token only). A policy's ``exempt`` groups are reserved too.
RESERVED_GROUPS: frozenset[str] = frozenset({"default", ADMIN})
TOKEN_PREFIX = "aios_"
MAX_CACHED = 10_000  # known tokens kept in memory (only valid ones: random tokens add nothing)
_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS identities (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    groups TEXT NOT NULL DEFAULT '',
    admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);
"""


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
    """The identity table (one SQLite file). Short transactions, safe beside a running server."""

    def __init__(self, path: str | Path, exempt: Iterable[str] = ()) -> None:
        """``exempt``: the policy's groups that skip approvals, reserved as well."""
        self.path = Path(path)
        # Groups with powers by their name: no credential may claim them.
        self.reserved = RESERVED_GROUPS | frozenset(exempt)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot open the identity database {self.path}: {e}") from None
        self._known: dict[str, Identity] = {}  # token digest -> identity, while unchanged
        self._version = -1  # PRAGMA data_version when _known was last valid
        self._writes = 0  # this object's writes, so a read racing one is not cached

    def close(self) -> None:
        self._db.close()

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
        try:
            self._db.execute(
                "INSERT INTO identities (name, token_sha256, groups, admin, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, digest(token), ",".join(groups), int(admin), time.time()),
            )
            self._changed()
        except sqlite3.IntegrityError:
            raise InvalidRequest(
                f"an agent named {name!r} exists; revoke it first to issue a new token"
            ) from None
        return Identity(name, tuple(groups), admin), token

    def set_admin_token(self, token: str) -> None:
        """Make ``token`` the admin token (from the environment or the admin token file)."""
        if len(token) < 24:
            raise ConfigError("the admin token must be at least 24 characters")
        self._db.execute(
            "INSERT INTO identities (name, token_sha256, groups, admin, created) "
            "VALUES (?, ?, '', 1, ?) ON CONFLICT(name) DO UPDATE SET "
            "token_sha256 = excluded.token_sha256, admin = 1",
            (ADMIN, digest(token), time.time()),
        )
        self._changed()

    def authenticate(self, token: str) -> Identity | None:
        """The identity of ``token``, or None if it is unknown or revoked."""
        key = digest(token)
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._version:  # another connection changed the table
            self._known.clear()
            self._version = version
        if (known := self._known.get(key)) is not None:
            return known
        writes = self._writes
        row = self._db.execute(
            "SELECT name, groups, admin FROM identities WHERE token_sha256 = ?", (key,)
        ).fetchone()
        if row is None:
            return None
        identity = self._identity(row[0], row[1], row[2])
        if writes == self._writes and len(self._known) < MAX_CACHED:
            self._known[key] = identity
        return identity

    def _changed(self) -> None:
        """After a write on this connection (which ``data_version`` does not count)."""
        self._writes += 1
        self._known.clear()

    def list(self) -> list[Identity]:
        rows = self._db.execute("SELECT name, groups, admin FROM identities ORDER BY name")
        return [self._identity(n, gs, a) for n, gs, a in rows]

    def _identity(self, name: str, groups: str, admin: int) -> Identity:
        """A stored identity; a reserved group stored before it was reserved is ignored."""
        claimed = tuple(g for g in groups.split(",") if g and g not in self.reserved)
        return Identity(name, claimed, bool(admin))

    def revoke(self, name: str) -> bool:
        """Delete an identity: its token stops working at once. False if there was none."""
        if name == ADMIN:
            raise InvalidRequest("the admin identity cannot be revoked (set a new admin token)")
        cursor = self._db.execute("DELETE FROM identities WHERE name = ?", (name,))
        self._changed()
        return cursor.rowcount > 0
