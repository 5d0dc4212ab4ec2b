"""Shared fixtures: a real throwaway PostgreSQL server (tests/postgres.py), a database on
both backends (``url``) and memory and storage managers on it (``resources``)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from postgres import PostgresServer, schema_dsn
from psycopg import sql

from aios.config import MemoryConfig, StorageConfig
from aios.resources import Resources


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session, started on first use."""
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A connection string to a fresh schema ``t_<uuid hex>`` (its ``search_path``) of the
    session's server; the schema is dropped (CASCADE) afterwards."""
    schema = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        yield schema_dsn(postgres_server.dsn, schema)
    finally:
        with psycopg.connect(postgres_server.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database on each backend: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "aios.db")
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


@pytest.fixture
async def resources(url: str) -> AsyncIterator[Resources]:
    """Memory and storage managers (default limits) on ``url``."""
    r = Resources(StorageConfig(database=url), MemoryConfig())
    await r.start()
    yield r
    await r.close()
