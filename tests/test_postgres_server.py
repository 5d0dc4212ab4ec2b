"""The throwaway PostgreSQL server (tests/postgres.py) and its fixtures (conftest.py)."""

from __future__ import annotations

import os
import pwd
import uuid
from pathlib import Path

import psycopg
from postgres import PostgresServer, schema_dsn
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict


def test_connect_and_select(pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_schemas_are_separate(postgres_server: PostgresServer, pg_dsn: str) -> None:
    schema = str(conninfo_to_dict(pg_dsn)["options"]).removeprefix("-c search_path=")
    assert schema.startswith("t_")
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("select current_schema()").fetchone() == (schema,)
        conn.execute("create table t(x int)")
        conn.execute("insert into t values (1)")
        conn.commit()
        assert conn.execute("select x from t").fetchall() == [(1,)]

    other = f"t_{uuid.uuid4().hex}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("create schema {}").format(sql.Identifier(other)))
        try:
            with psycopg.connect(schema_dsn(postgres_server.dsn, other)) as conn:
                assert conn.execute("select current_schema()").fetchone() == (other,)
                assert conn.execute("select to_regclass('t')").fetchone() == (None,)
                conn.execute("create table t(x int)")  # no clash with the first schema's t
                assert conn.execute("select count(*) from t").fetchone() == (0,)
        finally:
            admin.execute(sql.SQL("drop schema {} cascade").format(sql.Identifier(other)))


def test_server_does_not_run_as_root(postgres_server: PostgresServer, pg_dsn: str) -> None:
    with psycopg.connect(pg_dsn) as conn:
        row = conn.execute("select current_setting('data_directory')").fetchone()
    assert row is not None
    data_dir = Path(row[0])
    assert data_dir == postgres_server.data_dir
    owner = data_dir.stat().st_uid
    expected = pwd.getpwnam("postgres").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert owner == expected
    assert owner != 0
    # The postmaster writes its pid file as the user it runs as.
    assert (data_dir / "postmaster.pid").stat().st_uid == expected
