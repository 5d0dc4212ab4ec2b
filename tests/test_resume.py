"""``kill -9`` of a real ``aios serve`` process (tests/durable_server.py) while 8 spawned agents
are mid-run: six chains of dependent LLM calls, one agent waiting for a person's approval, one
inside a tool call. The server restarts on the same data directory and database; every agent
ends with the result an uninterrupted run gets, the pending approval is still there (same id)
to allow, and the LLM calls the restarted server runs are exactly those the journal did not
hold (none is repeated). The tool call that was running is made once more (at-least-once for
the call in flight), and finishes once.

On SQLite and PostgreSQL with the deterministic fake engine (paced, so the kill lands mid-run);
on SQLite with the real embedded model (greedy). Then the property: kills at random points,
several in a row, never change a result or repeat a journalled call.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from aios.storage.db import Database

TESTS = Path(__file__).parent
LAUNCHER = TESTS / "durable_server.py"
JOBS = [("chain", f"c{i}") for i in range(6)] + [("guarded", "g0"), ("slow", "s0")]
LLM_CALLS = {"chain": 4, "guarded": 2, "slow": 2}  # what each agent makes in a whole run
TOTAL = sum(LLM_CALLS[agent] for agent, _ in JOBS)
START_S = 180.0  # for a server to listen (a model loads)
RUN_S = 300.0  # for every agent to end
CONFIG = """
[kernel.access]
approve = ["storage.delete:*"]
approval_timeout = 600.0
[kernel.durable]
lease_seconds = 2.0
"""
# The real model runs one sequence at a time with no KV kept between calls: llama.cpp's batched
# greedy decoding is not bit-identical to decoding alone (tests/test_model.py), and which calls
# share a batch differs between two runs, so only unbatched results can be compared exactly.
CORE = {"fake": "", "model": '[[core]]\nname = "default"\nslots = 1\ncache_slots = 0\n'}


class Served:
    """One life of ``aios serve`` on a data directory (and database)."""

    def __init__(self, data: Path, engine: str, database: str, log: Path) -> None:
        self.data, self.engine, self.database, self.log = data, engine, database, log
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""

    def __enter__(self) -> Served:
        config = self.data.parent / "aios.toml"
        config.write_text(CONFIG + CORE[self.engine])
        env = {
            **os.environ,
            "AIOS_DATA_DIR": str(self.data),
            "AIOS_PORT": "0",
            "AIOS_CONFIG": str(config),
            "AIOS_DATABASE": self.database,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
            "SLOW_TOOL_LOG": str(self.log),
            "FAKE_STEP_S": "0.05",
        }
        with (self.data.parent / "server.log").open("a") as errors:
            self.proc = subprocess.Popen(
                [sys.executable, str(LAUNCHER), self.engine],
                env=env,
                stdout=subprocess.PIPE,
                stderr=errors,
                text=True,
            )
        port = _ready(self.proc, START_S, self.data.parent / "server.log")
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"authorization": f"Bearer {token}"}, timeout=30.0
        )

    @property
    def admin(self) -> str:
        return (self.data / "admin.token").read_text().strip()


def _ready(proc: subprocess.Popen[str], timeout: float, log: Path) -> int:
    """The port once the server prints READY (its log in the error if it never does)."""
    found: list[int] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("READY "):
                found.append(int(line.split()[1]))
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    if not found:
        proc.kill()
        raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")
    return found[0]


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def spawn_all(served: Served) -> tuple[str, list[str]]:
    """An agent identity and its 8 processes."""
    with served.client(served.admin) as admin:
        made = admin.post("/api/v1/agents", json={"name": "alice"})
        assert made.status_code == 201, made.text
        token: str = made.json()["token"]
    with served.client(token) as alice:
        ids = []
        for agent, task in JOBS:
            spawned = alice.post("/api/v1/processes", json={"agent": agent, "task": task})
            assert spawned.status_code == 202, spawned.text
            ids.append(spawned.json()["id"])
    return token, ids


def approve_waiting(served: Served) -> list[str]:
    """Allow every waiting call; their ids."""
    with served.client(served.admin) as admin:
        waiting = [p["id"] for p in admin.get("/api/v1/approvals").json()]
        for ident in waiting:
            admin.post(f"/api/v1/approvals/{ident}/allow")
    return waiting


def finish(served: Served, token: str, ids: list[str]) -> dict[str, str]:
    """Allow what waits for approval until every process ended; their results by task."""
    deadline = time.monotonic() + RUN_S
    results: dict[str, str] = {}
    with served.client(token) as alice:
        while len(results) < len(ids):
            assert time.monotonic() < deadline, f"unfinished: {set(ids) - set(results)}"
            approve_waiting(served)
            for pid in ids:
                if pid in results:
                    continue
                body = alice.get(f"/api/v1/processes/{pid}", params={"wait": 0.2}).json()
                if body["state"] in ("done", "failed"):
                    assert body["error"] is None, f"{pid}: {body['error']}"
                    results[pid] = body["result"]
    return results


def llm_calls_run(served: Served) -> int:
    with served.client(served.admin) as admin:
        (core,) = admin.get("/api/v1/cores").json()
        return int(core["completed"])


def journalled_llm_calls(database: str) -> int:
    conn = Database.open(database).connect()
    try:
        count = conn.scalar("SELECT COUNT(*) FROM journal WHERE value LIKE ?", ('{"completion"%',))
        return int(count)
    finally:
        conn.close()


def tool_log(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@contextlib.contextmanager
def life(tmp: Path, name: str, engine: str, database: str) -> Iterator[Served]:
    data = tmp / name / "data"
    data.mkdir(parents=True, exist_ok=True)
    with Served(data, engine, database, tmp / name / "tool.log") as served:
        yield served


def reference(tmp: Path, engine: str) -> list[str]:
    """The results of an uninterrupted run, in JOBS order."""
    database = str(tmp / "reference" / "aios.db")
    with life(tmp, "reference", engine, database) as served:
        token, ids = spawn_all(served)
        results = finish(served, token, ids)
        assert llm_calls_run(served) == TOTAL
    return [results[pid] for pid in ids]


def kill_mid_run_and_resume(tmp: Path, engine: str, database: str) -> None:
    expected = reference(tmp, engine)
    log = tmp / "run" / "tool.log"
    with life(tmp, "run", engine, database) as served:
        token, ids = spawn_all(served)

        def mid_run() -> bool:
            with served.client(served.admin) as admin:
                asked = admin.get("/api/v1/approvals").json()
            return bool(asked) and tool_log(log) == ["start"]

        wait_for(mid_run, 60.0, "an approval asked and the tool running")
        with served.client(served.admin) as admin:
            (waiting,) = [p["id"] for p in admin.get("/api/v1/approvals").json()]
        served.kill9()
    journalled = journalled_llm_calls(database)
    assert 0 < journalled < TOTAL  # mid-run: some calls done, some not
    assert tool_log(log) == ["start"]  # the tool was cut off
    with life(tmp, "run", engine, database) as again:
        ident = wait_for(lambda: approve_waiting(again), 60.0, "the approval asked again")
        assert ident == [waiting]  # the same approval, still answerable
        results = finish(again, token, ids)
        assert [results[pid] for pid in ids] == expected
        assert llm_calls_run(again) == TOTAL - journalled  # no journalled call ran again
    assert journalled_llm_calls(database) == TOTAL
    assert tool_log(log) == ["start", "start", "ran"]  # re-run once, finished once


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "run" / "data" / "aios.db")
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


def test_kill_9_mid_run_then_every_agent_resumes_without_repeating_a_call(
    tmp_path: Path, database: str
) -> None:
    kill_mid_run_and_resume(tmp_path, "fake", database)


@pytest.mark.model
def test_kill_9_mid_run_on_the_real_model(tmp_path: Path) -> None:
    kill_mid_run_and_resume(tmp_path, "model", str(tmp_path / "run" / "data" / "aios.db"))


def test_a_second_server_on_postgresql_takes_over_a_dead_ones_agents(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Two ``aios serve`` on one PostgreSQL, each with its own data directory (so its own
    kernel id): the first is killed mid-run, the second takes its processes over once their
    leases expire, with the first's identities, and each agent completes once."""
    expected = reference(tmp_path, "fake")
    with life(tmp_path, "first", "fake", pg_dsn) as first:
        token, ids = spawn_all(first)
        wait_for(lambda: journalled_llm_calls(pg_dsn) >= 4, 60.0, "calls journalled")
        first.kill9()
        killed = time.monotonic()
    journalled = journalled_llm_calls(pg_dsn)
    with life(tmp_path, "second", "fake", pg_dsn) as second:
        results = finish(second, token, ids)  # alice's token: identities are in the database
        assert time.monotonic() - killed >= 2.0  # not before the first kernel's lease expired
        assert [results[pid] for pid in ids] == expected
        assert llm_calls_run(second) == TOTAL - journalled
    conn = Database.open(pg_dsn).connect()
    try:
        kernels = conn.all("SELECT DISTINCT kernel FROM processes")
    finally:
        conn.close()
    second_id = (tmp_path / "second" / "data" / "kernel.id").read_text().strip()
    assert kernels == [(second_id,)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kills_at_random_points_never_change_a_result(tmp_path: Path, seed: int) -> None:
    """Property: up to two kill -9s at random moments, then a life that runs to the end: the
    results are those of an uninterrupted run, each journalled call ran once, and the last life
    ran exactly the calls the journal did not hold."""
    rng = random.Random(seed)
    expected = reference(tmp_path, "fake")
    database = str(tmp_path / "run" / "data" / "aios.db")
    token, ids = "", []
    for kill in range(rng.randint(1, 2)):
        with life(tmp_path, "run", "fake", database) as served:
            if kill == 0:
                token, ids = spawn_all(served)
            stop = time.monotonic() + rng.uniform(0.2, 2.0)
            while time.monotonic() < stop:
                approve_waiting(served)
                time.sleep(0.05)
            served.kill9()
    journalled = journalled_llm_calls(database)
    with life(tmp_path, "run", "fake", database) as served:
        results = finish(served, token, ids)
        assert [results[pid] for pid in ids] == expected
        assert llm_calls_run(served) == TOTAL - journalled
    assert journalled_llm_calls(database) == TOTAL
