"""Identities in the kernel's database (aios/identity.py, schema migration 6): two kernels on one
database (two ``Identities`` objects) see each other's changes at once, on SQLite and on
PostgreSQL; an identity file of older versions is adopted (SQLite, same file) or imported once
(another database); errors stay typed."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import psycopg
import pytest

from aios.config import KernelConfig, StorageConfig
from aios.errors import ConfigError, InvalidRequest, StorageError
from aios.identity import Identities, Identity, digest
from aios.server.config import ServerConfig, Settings
from aios.server.main import DB_FILE, open_identities
from aios.storage.db import Database
from aios.storage.schema import MIGRATIONS

OLD_SCHEMA = """CREATE TABLE IF NOT EXISTS identities (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    groups TEXT NOT NULL DEFAULT '',
    admin INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL
);"""
OLD_TOKEN = "aios_" + "o" * 43  # an agent's token issued by an older version


def old_identity_file(path: Path) -> None:
    """An identity file as older versions left it: only the identities table (WAL), with
    alice (group ops) and an admin row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(OLD_SCHEMA)
        db.execute(
            "INSERT INTO identities VALUES (?, ?, ?, ?, ?), (?, ?, ?, ?, ?)",
            ("alice", digest(OLD_TOKEN), "ops", 0, 1.0, "admin", digest("x" * 30), "", 1, 1.0),
        )
    finally:
        db.close()


def settings_on(data_dir: Path, database: str) -> Settings:
    return Settings(
        ServerConfig(data_dir=str(data_dir)),
        KernelConfig(storage=StorageConfig(database=database)),
    )


# -- two kernels, one database ---------------------------------------------------------------------
def test_two_kernels_on_one_database_see_each_others_changes_at_once(url: str) -> None:
    one, two = Identities(url), Identities(url)
    try:
        _, alice = one.create("alice", ("ops",))
        for _ in range(2):  # the second round comes from two's cache
            assert two.authenticate(alice) == Identity("alice", ("ops",))
        assert digest(alice) in two._known
        assert [i.name for i in two.list()] == ["alice"]
        with pytest.raises(InvalidRequest, match="an agent named 'alice' exists"):
            two.create("alice")  # the unique violation, from either backend

        assert one.revoke("alice")  # one's write ends two's cached token at once
        assert two.authenticate(alice) is None
        assert not two.revoke("alice")

        _, bob = two.create("bob")
        assert one.authenticate(bob) == Identity("bob")
        assert two.authenticate(bob) == Identity("bob")
        one.set_admin_token("a" * 24)
        assert two.authenticate("a" * 24) == Identity("admin", (), True)
        assert two.set_admin_token("b" * 24)  # replaced one's admin token...
        assert not two.set_admin_token("b" * 24)  # ...and the same token again changes nothing
        assert one.authenticate("a" * 24) is None
        assert one.authenticate("b" * 24) == Identity("admin", (), True)
    finally:
        one.close()
        two.close()


def test_postgres_writes_bump_the_identities_version(pg_dsn: str) -> None:
    identities = Identities(pg_dsn)
    watcher = Database.open(pg_dsn).connect()
    try:

        def version() -> int:
            n: int = watcher.scalar("SELECT n FROM identities_version")
            return n

        assert version() == 0
        _, token = identities.create("alice")
        assert version() == 1
        with pytest.raises(InvalidRequest):
            identities.create("alice")  # rolled back, bump and all
        assert version() == 1
        identities.set_admin_token("a" * 24)
        identities.set_admin_token("a" * 24)  # unchanged: no write
        assert version() == 2
        assert not identities.revoke("nobody")  # nothing deleted: nothing to see
        assert version() == 2
        assert identities.revoke("alice")
        assert version() == 3
        # a change made behind the object's back, with its bump, shows at once too
        _, token = identities.create("bob")
        assert identities.authenticate(token) == Identity("bob")
        with watcher.transaction():
            watcher.run("UPDATE identities SET groups = 'team' WHERE name = 'bob'")
            watcher.run("UPDATE identities_version SET n = n + 1")
        assert identities.authenticate(token) == Identity("bob", ("team",))
    finally:
        watcher.close()
        identities.close()


def test_a_broken_postgres_connection_is_replaced(pg_dsn: str) -> None:
    identities = Identities(pg_dsn)
    try:
        _, token = identities.create("alice")
        db = identities._db
        assert db is not None
        with psycopg.connect(pg_dsn, autocommit=True) as admin:  # the server ends the session
            admin.execute("SELECT pg_terminate_backend(%s)", (db.raw.info.backend_pid,))
        with pytest.raises(StorageError, match="identity database error"):
            identities.authenticate(token)
        assert identities.authenticate(token) == Identity("alice")  # on a new connection
    finally:
        identities.close()
    with pytest.raises(StorageError, match="closed"):
        identities.list()


def test_a_database_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"identity database .*\*\*\*") as raised:
        Identities("postgresql://aios:s3cret@127.0.0.1:1/aios?connect_timeout=5")
    assert "s3cret" not in str(raised.value)
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(ConfigError, match="identity database"):
        Identities(tmp_path / "dir.db")


# -- identities of older versions ----------------------------------------------------------------
def test_the_old_identity_file_is_adopted_as_the_kernel_database(tmp_path: Path) -> None:
    path = tmp_path / DB_FILE
    old_identity_file(path)
    identities = open_identities(settings_on(tmp_path, str(path)), env={})
    try:
        assert identities.authenticate(OLD_TOKEN) == Identity("alice", ("ops",))
        assert [i.name for i in identities.list()] == ["admin", "alice"]
    finally:
        identities.close()
    db = Database.open(str(path)).connect()  # the kernel's own connection: every table there
    try:
        versions = db.all("SELECT version FROM aios_migrations ORDER BY version")
        assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]
        assert db.scalar("SELECT COUNT(*) FROM identities") == 2
        assert db.scalar("SELECT COUNT(*) FROM blobs") == 0
    finally:
        db.close()


def test_the_old_identity_file_is_imported_once_into_another_database(
    url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    old_identity_file(data / DB_FILE)
    caplog.set_level(logging.WARNING, logger="aios.server")
    env = {"AIOS_ADMIN_TOKEN": "t" * 30}
    identities = open_identities(settings_on(data, url), env=env)
    try:
        assert identities.authenticate(OLD_TOKEN) == Identity("alice", ("ops",))
        assert identities.authenticate("x" * 30) is None  # the old admin token is not copied
        assert identities.authenticate("t" * 30) == Identity("admin", (), True)
        assert identities.revoke("alice")
    finally:
        identities.close()
    imported = [r.getMessage() for r in caplog.records if "imported" in r.getMessage()]
    assert len(imported) == 1 and imported[0].startswith("imported 1 agent identities from")
    caplog.clear()
    again = open_identities(settings_on(data, url), env=env)  # not empty now: no import
    try:
        assert again.authenticate(OLD_TOKEN) is None  # the revoke stands
    finally:
        again.close()
    assert not [r for r in caplog.records if "imported" in r.getMessage()]
    old = sqlite3.connect(data / DB_FILE)  # the old file is left as it was
    try:
        assert old.execute("SELECT COUNT(*) FROM identities").fetchone() == (2,)
        tables = old.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        assert tables == [("identities",)]
    finally:
        old.close()


def test_a_new_database_without_an_old_file_imports_nothing(pg_dsn: str, tmp_path: Path) -> None:
    data = tmp_path / "fresh"  # does not exist yet: made for the admin token
    identities = open_identities(settings_on(data, pg_dsn), env={})
    try:
        token = (data / "admin.token").read_text().strip()
        assert identities.authenticate(token) == Identity("admin", (), True)
        assert [i.name for i in identities.list()] == ["admin"]
        (data / DB_FILE).write_bytes(b"")  # an empty file, and the table is no longer empty
        assert identities.import_file(data / DB_FILE) == 0
    finally:
        identities.close()


def test_kernels_with_different_admin_tokens_on_postgres_are_warned(
    pg_dsn: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="aios.server")
    first = open_identities(settings_on(tmp_path / "a", pg_dsn), env={"AIOS_ADMIN_TOKEN": "a" * 30})
    second = open_identities(
        settings_on(tmp_path / "b", pg_dsn), env={"AIOS_ADMIN_TOKEN": "a" * 30}
    )
    second.close()
    assert not [r for r in caplog.records if "admin token" in r.getMessage()]
    third = open_identities(settings_on(tmp_path / "c", pg_dsn), env={"AIOS_ADMIN_TOKEN": "c" * 30})
    try:
        assert first.authenticate("a" * 30) is None  # one admin identity per database
        assert first.authenticate("c" * 30) == Identity("admin", (), True)
    finally:
        first.close()
        third.close()
    assert [r for r in caplog.records if "replaced another admin token" in r.getMessage()]
