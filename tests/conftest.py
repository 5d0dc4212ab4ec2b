"""Shared fixtures: a real throwaway PostgreSQL server (tests/postgres.py), a database on
both backends (``url``) and memory and storage managers on it (``resources``); kernel servers
on the fake engine (tests/servers.py): ``make_server``, ``server``, and per module ``shared``
with an agent token on it, ``shared_token``."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres import PostgresServer, schema_dsn
from psycopg import sql
from servers import REPLY, Harness, ServerFactory, serve

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


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start a server with non-default settings: ``make_server(server={...}, **core)``."""
    with contextlib.ExitStack() as stack:
        count = iter(range(100))

        def start(reply: str = REPLY, **kw: Any) -> Harness:
            return stack.enter_context(serve(tmp_path / f"data{next(count)}", reply, **kw))

        yield start


@pytest.fixture
def server(make_server: ServerFactory) -> Harness:
    return make_server()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """One server for the tests that change nothing but their own agents."""
    with serve(tmp_path_factory.mktemp("shared")) as harness:
        yield harness


@pytest.fixture(scope="module")
def shared_token(shared: Harness) -> str:
    return shared.agent("prober")
