"""The audit log: every syscall recorded (LLM, memory, storage, tools, rejected ones), and
tampering (edit, delete, reorder, truncate) detected by verify, on both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import CORE_DEFAULTS, FakeFactory
from typer.testing import CliRunner

from aios.audit import Record, append, prune, verify
from aios.cli import app
from aios.config import CoreConfig, KernelConfig, StorageConfig
from aios.errors import NotFound
from aios.kernel import Kernel
from aios.storage.db import Database
from aios.syscall import LLMCall, Message


def records(n: int) -> list[Record]:
    return [
        Record(
            1000.0 + i,
            f"agent{i % 3}",
            f"agent-{i}",
            "storage",
            "write",
            f"f{i}",
            "allowed",
            "done",
        )
        for i in range(n)
    ]


def test_tampering_is_detected(url: str) -> None:
    conn = Database.open(url).connect()
    try:
        head = append(conn, records(5))
        append(conn, records(5))
        good = verify(conn)
        assert good.ok and good.records == 10
        assert verify(conn, head=good.head).ok
        conn.run("UPDATE audit SET outcome = 'failed:x' WHERE seq = 4")  # edit
        bad = verify(conn)
        assert not bad.ok and "record 4 was altered" in bad.problem and bad.records == 3
        conn.run("UPDATE audit SET outcome = 'done' WHERE seq = 4")  # restored: fine again
        assert verify(conn).ok
        saved = conn.all("SELECT * FROM audit WHERE seq IN (5, 6) ORDER BY seq")
        conn.run("DELETE FROM audit WHERE seq = 5")  # delete
        assert "record 5 is missing" in verify(conn).problem
        conn.run("DELETE FROM audit WHERE seq = 6")  # reorder: 6's content as 5, 5's as 6
        marks = ", ".join("?" for _ in saved[0])
        conn.run(f"INSERT INTO audit VALUES ({marks})", (5, *saved[1][1:]))
        conn.run(f"INSERT INTO audit VALUES ({marks})", (6, *saved[0][1:]))
        assert not verify(conn).ok
        conn.run("DELETE FROM audit WHERE seq IN (5, 6)")
        conn.run(f"INSERT INTO audit VALUES ({marks})", saved[0])
        conn.run(f"INSERT INTO audit VALUES ({marks})", saved[1])
        assert verify(conn, head=good.head).ok
        conn.run("DELETE FROM audit WHERE seq > 8")  # truncate the end: only a kept head shows it
        assert verify(conn).ok
        truncated = verify(conn, head=good.head)
        assert not truncated.ok and "removed from the end" in truncated.problem
        assert head != good.head
    finally:
        conn.close()


async def test_every_syscall_is_audited(tmp_path: Path) -> None:
    db = tmp_path / "aios.db"
    config = KernelConfig(
        cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
        storage=StorageConfig(database=str(db)),
    )
    async with Kernel(config, engine_factory=FakeFactory(lambda p: "hi")) as k:
        p = k.register("auditor", owner="alice")
        await k.llm(p, LLMCall(messages=(Message("user", "hello"),)))
        await k.resource(p, "storage", "write", {"path": "a.txt", "content": "secret text"})
        await k.resource(p, "memory", "add", {"text": "a secret note"})
        await k.resource(p, "tools", "call",
                         {"name": "calculator", "arguments": {"expression": "1+1"}})  # fmt: skip
        with pytest.raises(NotFound):
            await k.resource(p, "storage", "read", {"path": "missing"})
        with pytest.raises(NotFound):
            await k.resource(p, "storage", "format", {})
        await k.audit.flush()
    conn = Database.open(str(db)).connect()
    try:
        rows = conn.all(
            "SELECT principal, process, kind, op, resource, decision, outcome FROM audit "
            "ORDER BY seq"
        )
        assert [r[2:] for r in rows] == [
            ("llm", "chat", "fake", "allowed", "done"),
            ("storage", "write", "a.txt", "allowed", "done"),
            ("memory", "add", "", "allowed", "done"),
            ("tools", "call", "calculator", "allowed", "done"),
            ("storage", "read", "missing", "allowed", "failed:not_found"),
            ("storage", "format", "", "rejected", "not_found"),
        ]
        assert {r[0] for r in rows} == {"alice"} and {r[1] for r in rows} == {p.id}
        dump = str(conn.all("SELECT * FROM audit"))
        assert "secret" not in dump  # content never reaches the log
        assert verify(conn).ok
    finally:
        conn.close()
    result = CliRunner().invoke(app, ["audit", "verify", "--database", str(db)])
    assert result.exit_code == 0 and "ok: 6 records" in result.output
    conn = Database.open(str(db)).connect()
    conn.run("UPDATE audit SET principal = 'mallory' WHERE seq = 2")
    conn.close()
    result = CliRunner().invoke(app, ["audit", "verify", "--database", str(db)])
    assert result.exit_code == 1 and "record 2 was altered" in result.output
    tail = CliRunner().invoke(app, ["audit", "tail", "--database", str(db)], env={"COLUMNS": "200"})
    assert tail.exit_code == 0 and "storage.write" in tail.output


def test_pruning_keeps_the_rest_verifiable_and_tampering_detectable(url: str) -> None:
    conn = Database.open(url).connect()
    try:
        assert prune(conn, before=5000.0, by="ops") == 0  # nothing to prune in an empty log
        append(conn, records(10))  # at 1000..1009
        assert prune(conn, before=1004.5, by="ops", dry_run=True) == 5
        assert verify(conn).records == 10  # a dry run changes nothing
        assert prune(conn, before=1004.5, by="ops") == 5
        after = verify(conn)
        assert after.ok and after.pruned == 5 and after.records == 6  # 5 left + the prune's own
        rows = conn.all("SELECT seq, principal, kind, op FROM audit ORDER BY seq")
        assert [r[0] for r in rows] == list(range(6, 12))
        assert rows[-1][1:] == ("ops", "audit", "prune")
        head = append(conn, records(2))  # appending goes on from the head
        assert verify(conn, head=head).ok and verify(conn).records == 8
        assert prune(conn, before=10**12, by="ops") == 7  # the newest record always stays
        assert conn.all("SELECT seq FROM audit ORDER BY seq") == [(13,), (14,)]
        assert verify(conn).ok and verify(conn).pruned == 12
        conn.run("DELETE FROM audit WHERE seq = 13")  # removing past the anchor is caught
        assert "record 13 is missing" in verify(conn).problem
    finally:
        conn.close()


def test_emptying_a_pruned_log_is_detected(url: str) -> None:
    conn = Database.open(url).connect()
    try:
        append(conn, records(3))
        prune(conn, before=10**12, by="ops")  # keeps record 3, adds the prune's record 4
        conn.run("DELETE FROM audit")  # all that is left, removed
        emptied = verify(conn)
        assert not emptied.ok and "every record after the pruned ones (from 3)" in emptied.problem
    finally:
        conn.close()


def test_the_cli_prunes_only_with_yes(tmp_path: Path) -> None:
    db = str(tmp_path / "aios.db")
    conn = Database.open(db).connect()
    try:
        append(conn, records(4))  # timestamps from 1970: older than any number of days
    finally:
        conn.close()
    cli = CliRunner()
    counted = cli.invoke(app, ["audit", "prune", "--older-than", "30", "--database", db])
    assert counted.exit_code == 0 and "3 records are older" in counted.output
    pruned = cli.invoke(app, ["audit", "prune", "--older-than", "30", "--yes", "--database", db])
    assert pruned.exit_code == 0 and "pruned 3 records" in pruned.output
    verified = cli.invoke(app, ["audit", "verify", "--database", db])
    assert verified.exit_code == 0 and "after record 3 (older ones pruned)" in verified.output
    bad = cli.invoke(app, ["audit", "prune", "--older-than", "-1", "--database", db])
    assert bad.exit_code != 0
