"""Durability after SIGKILL: a child process writes files and memory notes through
``Resources.call`` and prints one line per acknowledged call; the test kills it (SIGKILL, no
clean shutdown) in the middle of the stream, opens the database again ("after restart") and
checks that everything acknowledged is there and intact. Both backends: SQLite (a file, the
default ``sqlite_synchronous="full"``) and a real PostgreSQL server.

Every file version and note carries the SHA-256 of its own content, so a torn write (half a
blob, half a note) is detectable even for versions that were committed but never acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from aios.config import MemoryConfig, StorageConfig
from aios.resources import Resources
from aios.storage.db import Conn, Job
from aios.storage.files import Principal
from aios.storage.schema import MIGRATIONS

ACKS = 150  # acknowledged calls read before the kill
ACK_TIMEOUT = 90.0  # seconds for all of them (a hang fails instead of hanging)
FILES = 20
AGENT = "writer"

# The child: ``python writer.py DATABASE_URL``. Content functions are shared with the parent
# (the same source is exec'd here), so both sides agree on what a version looks like.
CONTENT = '''
import hashlib

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima".split()


def file_content(i: int) -> bytes:
    """2-20 KB of deterministic bytes that embed ``i``, then the SHA-256 of all before it."""
    size = 2048 + (i * 7919) % (18 * 1024)
    block = hashlib.sha256(b"block %d" % i).hexdigest().encode()
    payload = b"file %d\\n" % i + (block * (size // len(block) + 1))[:size]
    return payload + b"\\nsha256=" + hashlib.sha256(payload).hexdigest().encode() + b"\\n"


def note_text(i: int) -> str:
    """A note that embeds ``i`` (and a word ``tokI`` unique to it) and its own SHA-256."""
    words = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(20 + (i * 13) % 200))
    body = f"note {i} tok{i} {words}"
    return body + " sha256=" + hashlib.sha256(body.encode()).hexdigest()
'''

WRITER = (
    CONTENT
    + """
import asyncio
import sys
import time

from aios.config import MemoryConfig, StorageConfig
from aios.resources import Resources
from aios.storage.db import Job
from aios.storage.files import Principal


async def main(url: str) -> None:
    resources = Resources(StorageConfig(database=url), MemoryConfig())
    await resources.start()
    who = Principal("writer")
    stop = time.monotonic() + 300  # never outlive a test run that lost track of us
    i = 0
    while time.monotonic() < stop:
        data = file_content(i)
        args = {"path": f"f{i % 20}.txt", "content": data, "mode": "overwrite"}
        stat = await resources.call(who, "storage", "write", args, Job())
        digest = hashlib.sha256(data).hexdigest()
        print(f"ACK file {stat['path']} {stat['version']} {digest}", flush=True)
        if i % 2 == 0:
            text = note_text(i)
            args = {"text": text, "metadata": {"i": i}}
            note = await resources.call(who, "memory", "add", args, Job())
            digest = hashlib.sha256(text.encode()).hexdigest()
            print(f"ACK note {note['id']} {digest}", flush=True)
        i += 1
    await resources.close()


asyncio.run(main(sys.argv[1]))
"""
)

_shared: dict[str, Any] = {}
exec(CONTENT, _shared)
file_content = _shared["file_content"]
note_text = _shared["note_text"]


@dataclass(frozen=True)
class FileAck:
    path: str
    version: int
    sha256: str


@dataclass(frozen=True)
class NoteAck:
    id: int
    sha256: str


def parse(line: bytes) -> FileAck | NoteAck | None:
    """An acknowledgement line, or None for anything else (a line cut short by the kill)."""
    if not line.endswith(b"\n"):
        return None
    fields = line.decode().split()
    if fields[:2] == ["ACK", "file"] and len(fields) == 5:
        return FileAck(fields[2], int(fields[3]), fields[4])
    if fields[:2] == ["ACK", "note"] and len(fields) == 4:
        return NoteAck(int(fields[2]), fields[3])
    raise AssertionError(f"the writer printed something unexpected: {line!r}")


def file_index(data: bytes) -> int:
    """The ``i`` a file version was written for, after checking that it self-verifies."""
    payload, sep, rest = data.rpartition(b"\nsha256=")
    assert sep and rest.endswith(b"\n"), f"no trailer: a torn file ({len(data)} bytes)"
    assert hashlib.sha256(payload).hexdigest().encode() == rest[:-1], "a torn file"
    i = int(payload.split(b"\n", 1)[0].removeprefix(b"file "))
    assert data == file_content(i)
    return i


def note_index(text: str) -> int:
    """The ``i`` a note was written for, after checking that it self-verifies."""
    body, sep, digest = text.rpartition(" sha256=")
    assert sep and hashlib.sha256(body.encode()).hexdigest() == digest, "a torn note"
    i = int(body.split()[1])
    assert text == note_text(i)
    return i


async def run_and_kill(url: str, tmp_path: Path) -> tuple[list[FileAck | NoteAck], float]:
    """Start the writer, read ACKS acknowledgements, SIGKILL it; every acknowledgement it
    printed (also those after the last one read) and the time of the kill."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    errors = tmp_path / "writer.err"
    with errors.open("wb") as stderr:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            url,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert child.stdout is not None
    acks: list[FileAck | NoteAck] = []
    try:
        async with asyncio.timeout(ACK_TIMEOUT):
            while len(acks) < ACKS:
                line = await child.stdout.readline()
                if not line:
                    status = await child.wait()
                    pytest.fail(
                        f"the writer exited (status {status}) after {len(acks)} acks:\n"
                        + errors.read_text(errors="replace")[-3000:]
                    )
                ack = parse(line)
                assert ack is not None
                acks.append(ack)
        killed = time.time()
        os.kill(child.pid, signal.SIGKILL)  # mid-stream: no clean shutdown
    finally:
        if child.returncode is None:
            # os.kill, not child.kill(): Popen.kill polls first and would reap the zombie
            # itself, so asyncio's child watcher would find no child and report status 255.
            with contextlib.suppress(ProcessLookupError):  # reaped, not yet reported
                os.kill(child.pid, signal.SIGKILL)
        # What it acknowledged before the signal landed counts too.
        async with asyncio.timeout(30):
            for line in (await child.stdout.read()).splitlines(keepends=True):
                ack = parse(line)
                if ack is not None:
                    acks.append(ack)
            await child.wait()
    assert child.returncode == -signal.SIGKILL, errors.read_text(errors="replace")[-3000:]
    return acks, killed


def migrations(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.all("SELECT version, name, applied FROM aios_migrations ORDER BY version")


def integrity(conn: Conn) -> list[tuple[Any, ...]]:
    return conn.all("PRAGMA integrity_check")


async def test_acknowledged_writes_survive_sigkill(url: str, tmp_path: Path) -> None:
    acks, killed = await run_and_kill(url, tmp_path)
    files = [a for a in acks if isinstance(a, FileAck)]
    notes = [a for a in acks if isinstance(a, NoteAck)]
    assert len(files) >= ACKS // 2 and len(notes) >= ACKS // 4

    resources = Resources(StorageConfig(database=url), MemoryConfig())
    await resources.start()  # the restart: opens the database, applies no migration
    who = Principal(AGENT)

    async def call(kind: str, op: str, **args: Any) -> Any:
        return await resources.call(who, kind, op, args, Job())

    try:
        # The migration table: every migration, once, applied before the kill (none again).
        rows = await resources.db.run(migrations)
        assert [(r[0], r[1]) for r in rows] == [(m.version, m.name) for m in MIGRATIONS]
        assert all(r[2] < killed for r in rows)
        if resources.db.dialect == "sqlite":
            assert await resources.db.run(integrity) == [("ok",)]

        # Every acknowledged version: in its file's history, with the acknowledged bytes.
        newest: dict[str, FileAck] = {}
        for ack in files:
            newest[ack.path] = max(newest.get(ack.path, ack), ack, key=lambda a: a.version)
        histories: dict[str, list[dict[str, Any]]] = {}
        for path in newest:
            histories[path] = await call("storage", "history", path=path, limit=10_000)
        for ack in files:
            assert ack.version in {v["id"] for v in histories[ack.path]}, ack
            got = await call("storage", "read", path=ack.path, version=ack.version)
            assert hashlib.sha256(got["content"]).hexdigest() == ack.sha256, ack
            file_index(got["content"])

        # The current content of every file: its newest acknowledged version or a later,
        # complete one; every version in its history is complete (no torn write anywhere).
        listing = await call("storage", "ls")
        assert {e["path"] for e in listing} >= set(newest)
        assert len(listing) <= FILES
        for entry in listing:
            path = entry["path"]
            history = histories.get(path) or await call("storage", "history", path=path)
            assert history[0]["id"] == entry["version"]  # the tree points at the newest
            current = await call("storage", "read", path=path)
            assert current["stat"]["version"] == entry["version"]
            assert current["stat"]["size"] == len(current["content"])
            i = file_index(current["content"])
            if path in newest:
                acked = newest[path]
                assert entry["version"] >= acked.version
                acked_bytes = await call("storage", "read", path=path, version=acked.version)
                assert i >= file_index(acked_bytes["content"])
                if entry["version"] == acked.version:
                    assert entry["hash"] == acked.sha256
            for version in history:
                got = await call("storage", "read", path=path, version=version["id"])
                assert hashlib.sha256(got["content"]).hexdigest() == version["hash"]
                file_index(got["content"])
        usage = await call("storage", "usage")
        assert usage["files"] == len(listing)
        assert usage["bytes"] == sum(e["size"] for e in listing)

        # Every acknowledged note: there, with exactly its text and metadata, and searchable.
        for ack in notes:
            note = await call("memory", "get", id=ack.id)
            assert hashlib.sha256(note["text"].encode()).hexdigest() == ack.sha256, ack
            i = note_index(note["text"])
            assert note["metadata"] == {"i": i}
            found = await call("memory", "search", query=f"tok{i}", limit=5)
            assert [hit["note"]["id"] for hit in found] == [ack.id]
        count = (await call("memory", "usage"))["notes"]
        assert len(notes) <= count <= len(notes) + 1  # at most one committed, never acked
        for note in await call("memory", "list", limit=10_000):
            note_index(note["text"])
    finally:
        await resources.close()
