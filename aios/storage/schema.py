"""Schema migrations, in code: each one is applied in a transaction together with its record
in ``aios_migrations``, so a database is always at exactly one version. Several kernels
starting at once on one PostgreSQL database apply each migration once (an advisory lock)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from aios.errors import StorageError
from aios.storage.db import Conn

MIGRATION_LOCK = 0x41494F53  # "AIOS"

_AUDIT = """CREATE TABLE audit (
    seq BIGINT PRIMARY KEY, at {real} NOT NULL, principal TEXT NOT NULL, process TEXT NOT NULL,
    kind TEXT NOT NULL, op TEXT NOT NULL, resource TEXT NOT NULL, decision TEXT NOT NULL,
    outcome TEXT NOT NULL, detail TEXT NOT NULL, prev TEXT NOT NULL, hash TEXT NOT NULL)"""

_ANCHOR = """CREATE TABLE audit_anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq BIGINT NOT NULL, hash TEXT NOT NULL,
    at {real} NOT NULL)"""


_PROCESSES = """CREATE TABLE processes (
    n {serial} PRIMARY KEY, agent TEXT NOT NULL, name TEXT NOT NULL, task TEXT NOT NULL,
    owner TEXT, groups TEXT NOT NULL, seed BIGINT NOT NULL, state TEXT NOT NULL,
    result TEXT, error TEXT, created {real} NOT NULL, finished {real},
    kernel TEXT, lease_until {real})"""

_JOURNAL = """CREATE TABLE journal (
    process TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, value TEXT NOT NULL,
    tokens BIGINT NOT NULL, at {real} NOT NULL, delivered BIGINT NOT NULL,
    PRIMARY KEY (process, key))"""


# The columns are those of the table older versions kept in a file of its own.
_IDENTITIES = """CREATE TABLE {exists}identities (
    name TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL UNIQUE, groups TEXT NOT NULL DEFAULT '',
    admin INTEGER NOT NULL DEFAULT 0, created {real} NOT NULL)"""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "files: content-addressed blobs, versions, the current tree, shares, usage",
        sqlite=(
            "CREATE TABLE blobs (hash TEXT PRIMARY KEY, size INTEGER NOT NULL, data BLOB NOT NULL)",
            """CREATE TABLE versions (
                id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, path TEXT NOT NULL,
                hash TEXT REFERENCES blobs(hash), size INTEGER NOT NULL, op TEXT NOT NULL,
                at REAL NOT NULL, author TEXT NOT NULL)""",
            "CREATE INDEX versions_by_path ON versions (owner, path, id)",
            """CREATE TABLE files (
                owner TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL,
                version INTEGER REFERENCES versions(id), hash TEXT, size INTEGER NOT NULL,
                created REAL NOT NULL, modified REAL NOT NULL, PRIMARY KEY (owner, path))""",
            """CREATE TABLE shares (
                owner TEXT NOT NULL, path TEXT NOT NULL, grantee TEXT NOT NULL,
                mode TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (owner, path, grantee))""",
            "CREATE INDEX shares_by_grantee ON shares (grantee)",
            """CREATE TABLE usage (
                owner TEXT PRIMARY KEY, bytes INTEGER NOT NULL, files INTEGER NOT NULL)""",
            """CREATE VIRTUAL TABLE file_text USING fts5 (
                body, tokenize = 'porter unicode61')""",
        ),
        postgres=(
            "CREATE TABLE blobs (hash TEXT PRIMARY KEY, size BIGINT NOT NULL, data BYTEA NOT NULL)",
            """CREATE TABLE versions (
                id BIGSERIAL PRIMARY KEY, owner TEXT NOT NULL, path TEXT NOT NULL,
                hash TEXT REFERENCES blobs(hash), size BIGINT NOT NULL, op TEXT NOT NULL,
                at DOUBLE PRECISION NOT NULL, author TEXT NOT NULL)""",
            "CREATE INDEX versions_by_path ON versions (owner, path, id)",
            """CREATE TABLE files (
                owner TEXT NOT NULL, path TEXT NOT NULL, kind TEXT NOT NULL,
                version BIGINT REFERENCES versions(id), hash TEXT, size BIGINT NOT NULL,
                created DOUBLE PRECISION NOT NULL, modified DOUBLE PRECISION NOT NULL,
                body TSVECTOR, PRIMARY KEY (owner, path))""",
            "CREATE INDEX files_text ON files USING GIN (body)",
            "CREATE INDEX files_prefix ON files (owner, path text_pattern_ops)",
            """CREATE TABLE shares (
                owner TEXT NOT NULL, path TEXT NOT NULL, grantee TEXT NOT NULL,
                mode TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
                PRIMARY KEY (owner, path, grantee))""",
            "CREATE INDEX shares_by_grantee ON shares (grantee)",
            """CREATE TABLE usage (
                owner TEXT PRIMARY KEY, bytes BIGINT NOT NULL, files BIGINT NOT NULL)""",
        ),
    ),
    Migration(
        2,
        "memory: notes with full-text search, conversation history",
        sqlite=(
            """CREATE TABLE notes (
                id INTEGER PRIMARY KEY AUTOINCREMENT, owner TEXT NOT NULL, text TEXT NOT NULL,
                metadata TEXT NOT NULL, created REAL NOT NULL, updated REAL NOT NULL)""",
            "CREATE INDEX notes_by_owner ON notes (owner, id)",
            """CREATE VIRTUAL TABLE notes_text USING fts5 (
                text, content = 'notes', content_rowid = 'id',
                tokenize = 'porter unicode61')""",
            """CREATE TRIGGER notes_ai AFTER INSERT ON notes BEGIN
                INSERT INTO notes_text (rowid, text) VALUES (new.id, new.text); END""",
            """CREATE TRIGGER notes_ad AFTER DELETE ON notes BEGIN
                INSERT INTO notes_text (notes_text, rowid, text)
                VALUES ('delete', old.id, old.text); END""",
            """CREATE TRIGGER notes_au AFTER UPDATE OF text ON notes BEGIN
                INSERT INTO notes_text (notes_text, rowid, text)
                VALUES ('delete', old.id, old.text);
                INSERT INTO notes_text (rowid, text) VALUES (new.id, new.text); END""",
            """CREATE TABLE history (
                owner TEXT NOT NULL, n INTEGER NOT NULL, role TEXT NOT NULL,
                content TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (owner, n))""",
        ),
        postgres=(
            """CREATE TABLE notes (
                id BIGSERIAL PRIMARY KEY, owner TEXT NOT NULL, text TEXT NOT NULL,
                metadata JSONB NOT NULL, created DOUBLE PRECISION NOT NULL,
                updated DOUBLE PRECISION NOT NULL,
                body TSVECTOR GENERATED ALWAYS AS (to_tsvector('english', text)) STORED)""",
            "CREATE INDEX notes_by_owner ON notes (owner, id)",
            "CREATE INDEX notes_text ON notes USING GIN (body)",
            "CREATE INDEX notes_metadata ON notes USING GIN (metadata jsonb_path_ops)",
            """CREATE TABLE history (
                owner TEXT NOT NULL, n BIGINT NOT NULL, role TEXT NOT NULL,
                content TEXT NOT NULL, at DOUBLE PRECISION NOT NULL, PRIMARY KEY (owner, n))""",
        ),
    ),
    Migration(
        3,
        "audit: the hash-chained log of every syscall",
        sqlite=(_AUDIT.format(real="REAL"),),
        postgres=(_AUDIT.format(real="DOUBLE PRECISION"),),
    ),
    Migration(
        4,
        "audit_anchor: where a pruned audit log's chain resumes",
        sqlite=(_ANCHOR.format(real="REAL"),),
        postgres=(_ANCHOR.format(real="DOUBLE PRECISION"),),
    ),
    Migration(
        5,
        "durable processes: the processes the kernel runs, with leases, and the syscall journal",
        sqlite=(
            _PROCESSES.format(serial="INTEGER", real="REAL").replace(
                "PRIMARY KEY", "PRIMARY KEY AUTOINCREMENT", 1
            ),
            "CREATE INDEX processes_running ON processes (state, lease_until)",
            _JOURNAL.format(real="REAL"),
            "CREATE INDEX journal_by_time ON journal (at)",
        ),
        postgres=(
            _PROCESSES.format(serial="BIGSERIAL", real="DOUBLE PRECISION"),
            "CREATE INDEX processes_running ON processes (state, lease_until)",
            _JOURNAL.format(real="DOUBLE PRECISION"),
            "CREATE INDEX journal_by_time ON journal (at)",
        ),
    ),
    Migration(
        6,
        "identities: agent credentials, shared by every kernel on the database",
        # SQLite: IF NOT EXISTS adopts the table older versions made in DATA_DIR/aios.db.
        sqlite=(_IDENTITIES.format(exists="IF NOT EXISTS ", real="REAL"),),
        # PostgreSQL: every write to identities bumps n in its transaction, so that each
        # kernel's cache of known tokens sees another kernel's change (aios/identity.py).
        postgres=(
            _IDENTITIES.format(exists="", real="DOUBLE PRECISION"),
            """CREATE TABLE identities_version (
                id INTEGER PRIMARY KEY CHECK (id = 1), n BIGINT NOT NULL)""",
            "INSERT INTO identities_version (id, n) VALUES (1, 0)",
        ),
    ),
)


def migrate(conn: Conn, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Bring the database up to the newest version; the versions applied now."""
    conn.run(
        "CREATE TABLE IF NOT EXISTS aios_migrations "
        "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied DOUBLE PRECISION NOT NULL)"
    )
    applied: list[int] = []
    for migration in migrations:
        with conn.transaction():
            if conn.dialect == "postgres":
                conn.run("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            done = conn.scalar(
                "SELECT 1 FROM aios_migrations WHERE version = ?", (migration.version,)
            )
            if done:
                continue
            conn.script(migration.sqlite if conn.dialect == "sqlite" else migration.postgres)
            conn.run(
                "INSERT INTO aios_migrations (version, name, applied) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            applied.append(migration.version)
    newest = conn.scalar("SELECT MAX(version) FROM aios_migrations")
    if newest is not None and newest > migrations[-1].version:
        raise StorageError(
            f"the database is at schema version {newest}, newer than this aios knows "
            f"({migrations[-1].version}); upgrade aios"
        )
    return applied
