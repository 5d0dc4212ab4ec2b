"""Durable processes in the kernel (aios.durable, aios.journal), on the fake engine and a real
database: a spawned agent is recorded with a journal of its syscalls; a kernel that starts again
resumes it by replay (no finished LLM call, write or approval is repeated) and gets the result
an uninterrupted run gets; a changed request is ReplayDiverged; a kill is final; approvals keep
their id and are still answerable after a restart; quota windows come back; an expired lease is
taken over by another kernel, and on PostgreSQL two kernels never claim one process.

A kernel that stops here stops the way ``kill -9`` leaves things as far as the database goes:
the process rows stay ``running`` and every result not journalled is lost. tests/test_resume.py
kills real ``aios serve`` processes.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from durable_agents import Branches, Chain, Dice, Guarded
from fakes import CORE_DEFAULTS, FakeFactory, wait_until

from aios.access import Pending
from aios.config import AccessConfig, CoreConfig, DurableConfig, KernelConfig, StorageConfig
from aios.durable import ProcessTable
from aios.errors import ConfigError
from aios.journal import decode, encode
from aios.kernel import Kernel
from aios.quota import Quota
from aios.sdk import Agent
from aios.storage.db import Database
from aios.syscall import Completion

LIMIT = 20.0  # seconds for any one kernel's life here (a hang fails)


def reply(tokens: Sequence[int]) -> str:
    """A deterministic answer that depends on the whole prompt."""
    return "w" + hashlib.sha256(repr(list(tokens)).encode()).hexdigest()[:6]


def make(
    db: str,
    *,
    kernel_id: str = "k1",
    lease: float = 30.0,
    approve: tuple[str, ...] = (),
    quota: Quota | None = None,
) -> tuple[Kernel, FakeFactory]:
    core = CoreConfig(name="fake", model="fake", **CORE_DEFAULTS)
    config = KernelConfig(
        cores=(core,),
        storage=StorageConfig(database=db),
        access=AccessConfig(approve=approve, approval_timeout=60.0),
        durable=DurableConfig(kernel_id=kernel_id, lease_seconds=lease),
        quota=quota or Quota(),
    )
    factory = FakeFactory(reply)
    return Kernel(config, engine_factory=factory), factory


def calls(factory: FakeFactory) -> int:
    """LLM calls the kernel's engine ran (each prompt once)."""
    return len(factory.engine.prompts) if factory.engines else 0


async def rows(db: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    database = Database.open(db)
    await database.start()
    try:
        return await database.run(lambda conn: conn.all(sql, params))
    finally:
        await database.close()


async def finished(kernel: Kernel, process_id: str) -> None:
    runner = kernel.processes[process_id].runner
    assert runner is not None
    await asyncio.wait_for(asyncio.shield(runner), LIMIT)


async def reference(tmp_path: Path, cls: type[Agent], task: str) -> tuple[str | None, int]:
    """An uninterrupted run's result and its LLM calls."""
    kernel, factory = make(str(tmp_path / "reference.db"))
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(cls, task)
        await finished(kernel, process.id)
        return process.result, calls(factory)


@pytest.fixture
def db(url: str) -> str:
    """Each backend's database (conftest's ``url``)."""
    return url


async def test_a_spawned_agent_is_recorded_with_a_journal_of_every_syscall(db: str) -> None:
    kernel, _ = make(db)
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Chain, "alpha", owner="alice", groups=frozenset({"team"}))
        assert process.id.startswith("proc-")
        await finished(kernel, process.id)
    assert process.error is None and process.result is not None
    (row,) = await rows(db, "SELECT n, agent, owner, groups, state, result FROM processes")
    assert f"proc-{row[0]}" == process.id
    assert row[1:] == ("durable_agents:Chain", "alice", "team", "done", process.result)
    journal = await rows(db, "SELECT key, value FROM journal ORDER BY CAST(key AS INTEGER)")
    assert [key for key, _ in journal] == ["0", "1", "2", "3", "4"]  # 4 LLM calls, 1 write
    answers = [decode(value) for _, value in journal]
    assert all(isinstance(a, Completion) for a in answers[:4])
    assert process.result == f"alpha: {answers[3].text}"
    assert answers[4]["path"] == "alpha.txt"


async def test_a_resumed_agent_replays_its_journal_and_ends_as_an_uninterrupted_run(
    db: str, tmp_path: Path
) -> None:
    expected, total = await reference(tmp_path, Chain, "beta")
    assert total == Chain.calls
    kernel, _ = make(db)
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Chain, "beta")
        await wait_until(lambda: kernel.journal.appended >= 2, timeout=LIMIT)
    # Stopped mid-run: the row is still running, the rest of the run is lost.
    journalled = len(await rows(db, "SELECT key FROM journal"))
    assert 2 <= journalled < Chain.calls
    assert await rows(db, "SELECT state FROM processes") == [("running",)]
    again, factory = make(db)
    async with asyncio.timeout(LIMIT), again:
        resumed = again.processes[process.id]  # the same id
        await finished(again, process.id)
    assert resumed.error is None
    assert resumed.result == expected
    assert calls(factory) == Chain.calls - journalled  # no finished call ran again
    assert await rows(db, "SELECT state, result FROM processes") == [("done", expected)]
    versions = await rows(db, "SELECT COUNT(*) FROM versions WHERE path = 'beta.txt'")
    assert versions == [(1,)]


async def test_a_changed_request_is_replay_diverged_and_nothing_runs_again(db: str) -> None:
    kernel, _ = make(db)
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Chain, "gamma")
        await wait_until(lambda: kernel.journal.appended >= 2, timeout=LIMIT)
    await rows(db, "UPDATE processes SET task = 'changed'")  # its input changed meanwhile
    again, factory = make(db)
    async with asyncio.timeout(LIMIT), again:
        await finished(again, process.id)
        failed = again.processes[process.id]
    assert failed.error is not None and failed.error.startswith("replay_diverged:")
    assert "step 0 (llm)" in failed.error
    assert calls(factory) == 0
    ((state, error),) = await rows(db, "SELECT state, error FROM processes")
    assert state == "failed" and error == failed.error


async def test_an_agent_that_ends_before_its_journal_does_is_replay_diverged(db: str) -> None:
    kernel, _ = make(db)
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Chain, "delta")
        await wait_until(lambda: kernel.journal.appended >= 3, timeout=LIMIT)
    # The program now stops after two calls, where it made three before.
    Chain.stop_after = 2
    try:
        again, _ = make(db)
        async with asyncio.timeout(LIMIT), again:
            await finished(again, process.id)
    finally:
        Chain.stop_after = None
    error = again.processes[process.id].error
    assert error is not None and "ended before" in error


async def test_a_killed_process_ends_as_killed_and_is_not_resumed(db: str) -> None:
    kernel, _ = make(db, approve=("storage.delete:*",))
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Guarded, "eps")
        await wait_until(lambda: bool(kernel.access.pending), timeout=LIMIT)
        kernel.kill(process)
        assert process.runner is not None
        await asyncio.wait([process.runner])
        await wait_until(lambda: kernel.journal.db.pending == 0)
    assert await rows(db, "SELECT state, error FROM processes") == [("failed", "killed")]
    again, factory = make(db)
    async with asyncio.timeout(LIMIT), again:
        assert process.id not in again.processes
        found = await again.find(process.id)  # still answerable by its id
        assert found is not None and found.error == "killed" and found.state.finished
    assert calls(factory) == 0


async def test_a_pending_approval_keeps_its_id_across_a_restart_and_runs_once(db: str) -> None:
    kernel, _ = make(db, approve=("storage.delete:*",))
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Dice, "zeta")
        await wait_until(lambda: bool(kernel.access.pending), timeout=LIMIT)
        (before,) = kernel.access.pending
    assert before == f"ap-{process.id}-2"  # step 2: the write and the LLM call came first
    again, factory = make(db, approve=("storage.delete:*",))
    asked: asyncio.Queue[Pending] = asyncio.Queue()
    async with asyncio.timeout(LIMIT), again:
        again.access.on_ask = asked.put_nowait
        pending = await asked.get()
        assert pending.id == before  # the person can still allow it after the restart
        again.access.resolve(before, True)
        await finished(again, process.id)
        done = again.processes[process.id]
    # Dice's prompts hold self.random's draws and self.now(): the replay drew and read the same.
    assert done.error is None and done.result is not None and "removed 1" in done.result
    assert calls(factory) == 1  # only the call after the delete
    history = await rows(db, "SELECT op FROM versions WHERE path = 'zeta.tmp' ORDER BY id")
    assert [op for (op,) in history] == ["write", "delete"]  # the write was not repeated


async def test_an_approved_call_is_not_asked_again_after_a_restart(db: str) -> None:
    """Allowed, then the kernel stopped before the call's result was journalled: the resumed
    call runs without asking the person a second time."""
    journal_decision = encode(True)
    kernel, _ = make(db, approve=("storage.delete:*",))
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Guarded, "eta")
        await wait_until(lambda: bool(kernel.access.pending), timeout=LIMIT)
    await rows(
        db,
        "INSERT INTO journal (process, key, fingerprint, value, tokens, at, delivered) "
        "VALUES (?, '2/approval', 'approval', ?, 0, 0, -1)",
        (process.id, journal_decision),
    )
    again, _ = make(db, approve=("storage.delete:*",))
    async with asyncio.timeout(LIMIT), again:
        again.access.on_ask = lambda p: pytest.fail(f"asked again: {p.id}")
        await finished(again, process.id)
    assert again.processes[process.id].error is None


async def test_a_resumed_agent_gets_its_quota_window_back(db: str) -> None:
    quota = Quota(tokens_per_minute=1_000_000)
    kernel, _ = make(db, quota=quota)
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Chain, "theta")
        await wait_until(lambda: kernel.journal.appended >= 2, timeout=LIMIT)
    again, _ = make(db, quota=quota)
    async with asyncio.timeout(LIMIT), again:
        await finished(again, process.id)
        assert again.processes[process.id].error is None
        used = again.quotas.used(process.id)
    # Every call is in the window once: the replayed ones restored, the live ones charged.
    assert used == (await rows(db, "SELECT SUM(tokens) FROM journal"))[0][0] > 0


async def test_an_expired_lease_is_taken_over_by_another_kernel(db: str) -> None:
    first, _ = make(db, kernel_id="first", lease=0.6, approve=("storage.delete:*",))
    async with asyncio.timeout(LIMIT), first:
        process = await first.spawn(Guarded, "iota")
        await wait_until(lambda: bool(first.access.pending), timeout=LIMIT)
    second, factory = make(db, kernel_id="second", lease=0.6, approve=("storage.delete:*",))
    asked: asyncio.Queue[Pending] = asyncio.Queue()
    async with asyncio.timeout(LIMIT), second:
        second.access.on_ask = asked.put_nowait
        pending = await asked.get()  # once the first kernel's lease expired
        second.access.resolve(pending.id, True)
        await finished(second, process.id)
    assert second.processes[process.id].error is None
    assert await rows(db, "SELECT state, kernel FROM processes") == [("done", "second")]
    assert calls(factory) == 1


async def test_two_kernels_on_postgresql_never_claim_one_process(pg_dsn: str) -> None:
    databases = [Database.open(pg_dsn) for _ in range(2)]
    for database in databases:
        await database.start()
    try:
        await databases[0].run(
            lambda conn: conn.many(
                "INSERT INTO processes (agent, name, task, owner, groups, seed, state, created, "
                "kernel, lease_until) VALUES ('m:A', 'a', ?, NULL, '', 1, 'running', 0, 'gone', 0)",
                [(f"t{i}",) for i in range(300)],
            )
        )
        tables = [ProcessTable(d, f"k{i}", 30.0) for i, d in enumerate(databases)]
        claims = await asyncio.gather(*(t.claim(own=False) for t in tables for _ in range(3)))
        taken = [row.n for claim in claims for row in claim]
        assert len(taken) == len(set(taken)) == 300
        owners = await databases[0].run(
            lambda conn: conn.all("SELECT kernel, COUNT(*) FROM processes GROUP BY kernel")
        )
        assert sum(count for _, count in owners) == 300
        assert {kernel for kernel, _ in owners} <= {"k0", "k1"}
    finally:
        for database in databases:
            await database.close()


async def test_an_agent_class_a_restart_could_not_import_is_refused_at_spawn(
    tmp_path: Path,
) -> None:
    class Local(Agent):  # defined in a function: no restarted kernel can import it
        name = "local"

        async def run(self, task: str) -> str:
            return task

    db = str(tmp_path / "aios.db")
    kernel, _ = make(db)
    async with asyncio.timeout(LIMIT), kernel:
        with pytest.raises(ConfigError, match="module level"):
            await kernel.spawn(Local, "x")
    assert await rows(db, "SELECT COUNT(*) FROM processes") == [(0,)]
    # With durable processes off it runs as before, lost with the kernel.
    core = CoreConfig(name="fake", model="fake", **CORE_DEFAULTS)
    config = KernelConfig(cores=(core,), durable=DurableConfig(enabled=False))
    async with asyncio.timeout(LIMIT), Kernel(config, engine_factory=FakeFactory(reply)) as k:
        process = await k.spawn(Local, "y")
        await finished(k, process.id)
        assert process.result == "y" and process.id.startswith("agent-")


async def test_a_start_claims_every_process_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More processes to resume than one claim takes: all are resumed, and the claim ends."""
    monkeypatch.setattr("aios.durable.CLAIM_BATCH", 3)
    db = str(tmp_path / "aios.db")
    for i in range(8):  # this kernel id's, leases not expired
        await rows(
            db,
            "INSERT INTO processes (agent, name, task, owner, groups, seed, state, created, "
            "kernel, lease_until) VALUES ('durable_agents:Chain', 'chain', ?, NULL, '', 1, "
            "'running', 0, 'k1', 1e12)",
            (f"p{i}",),
        )
    kernel, factory = make(db)
    async with asyncio.timeout(LIMIT), kernel:
        assert len(kernel.processes) == 8
        for process_id in list(kernel.processes):
            await finished(kernel, process_id)
    assert await rows(db, "SELECT DISTINCT state FROM processes") == [("done",)]
    assert calls(factory) == 8 * Chain.calls


async def test_concurrent_branches_with_several_calls_each_resume(db: str, tmp_path: Path) -> None:
    expected, total = await reference(tmp_path, Branches, "kappa")
    kernel, _ = make(db)
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Branches, "kappa")
        await wait_until(lambda: kernel.journal.appended >= 3, timeout=LIMIT)
    journalled = (await rows(db, "SELECT COUNT(*) FROM journal WHERE tokens > 0"))[0][0]
    again, factory = make(db)
    async with asyncio.timeout(LIMIT), again:
        await finished(again, process.id)
    resumed = again.processes[process.id]
    assert resumed.error is None and resumed.result == expected
    assert calls(factory) == total - journalled


async def test_a_kernel_that_lost_a_lease_records_nothing_more_for_it(db: str) -> None:
    kernel, _ = make(db, approve=("storage.delete:*",))
    async with asyncio.timeout(LIMIT), kernel:
        process = await kernel.spawn(Guarded, "lam")
        await wait_until(lambda: bool(kernel.access.pending), timeout=LIMIT)
        await rows(db, "UPDATE processes SET kernel = 'another'")  # taken over meanwhile
        (ident,) = kernel.access.pending
        kernel.access.resolve(ident, True)
        assert process.runner is not None
        await asyncio.wait([process.runner])
    assert process.error is not None and process.error.startswith("lease_lost:")
    keys = [key for (key,) in await rows(db, "SELECT key FROM journal ORDER BY key")]
    assert keys == ["0", "1"]  # neither the decision nor the delete's result
    assert await rows(db, "SELECT state, kernel FROM processes") == [("running", "another")]
