"""Agent identities: who is calling, derived from a bearer token and nothing else.

``aios agent create NAME`` issues a token (``aios_`` + 43 random URL-safe characters, 256 bits);
only its SHA-256 is stored, so the database never holds a usable credential. A random 256-bit
token needs no salt or slow hash: nothing can be guessed from its digest. Identities live in one
SQLite file in the data directory (WAL, so the CLI can add agents while a server runs). The admin
token belongs to the reserved identity ``admin``.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from aios.errors import ConfigError, InvalidRequest

ADMIN = "admin"
TOKEN_PREFIX = "aios_"
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

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise ConfigError(f"cannot open the identity database {self.path}: {e}") from None

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
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            self._db.execute(
                "INSERT INTO identities (name, token_sha256, groups, admin, created) "
                "VALUES (?, ?, ?, ?, ?)",
                (name, digest(token), ",".join(groups), int(admin), time.time()),
            )
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

    def authenticate(self, token: str) -> Identity | None:
        row = self._db.execute(
            "SELECT name, groups, admin FROM identities WHERE token_sha256 = ?", (digest(token),)
        ).fetchone()
        if row is None:
            return None
        return Identity(row[0], tuple(g for g in row[1].split(",") if g), bool(row[2]))

    def list(self) -> list[Identity]:
        rows = self._db.execute("SELECT name, groups, admin FROM identities ORDER BY name")
        return [Identity(n, tuple(g for g in gs.split(",") if g), bool(a)) for n, gs, a in rows]

    def revoke(self, name: str) -> bool:
        """Delete an identity: its token stops working at once. False if there was none."""
        if name == ADMIN:
            raise InvalidRequest("the admin identity cannot be revoked (set a new admin token)")
        cursor = self._db.execute("DELETE FROM identities WHERE name = ?", (name,))
        return cursor.rowcount > 0
