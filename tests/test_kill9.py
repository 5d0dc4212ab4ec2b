"""Durability: kill -9 a process in the middle of a stream of acknowledged writes; after a
restart every acknowledged write is there, intact, and no file is half-written (every version's
content checks against the hash it carries inside itself). Both backends."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from aios.config import MemoryConfig, StorageConfig
from aios.resources import Resources
from aios.storage.db import Job
from aios.storage.files import Principal

WRITER = """
import asyncio, hashlib, sys
from aios.config import MemoryConfig, StorageConfig
from aios.resources import Resources
from aios.storage.db import Job
from aios.storage.files import Principal

def body(i: int) -> bytes:
    # 2-20 KB of deterministic bytes, then the SHA-256 of those bytes: self-verifying
    payload = hashlib.sha256(str(i).encode()).digest() * (64 + (i * 37) % 576)
    return payload + hashlib.sha256(payload).hexdigest().encode()

async def main() -> None:
    store = Resources(StorageConfig(database=sys.argv[1]), MemoryConfig())
    await store.start()
    who = Principal("writer")
    call = lambda kind, op, args: store.call(who, kind, op, args, Job())
    i = 0
    while True:
        data = body(i)
        stat = await call("storage", "write", {"path": f"f{i % 20}.bin", "content": data})
        digest = hashlib.sha256(data).hexdigest()
        print("ACK file", stat["path"], stat["version"], digest, flush=True)
        note = await call("memory", "add", {"text": f"note {i} " + "x" * (i % 300)})
        digest = hashlib.sha256(note["text"].encode()).hexdigest()
        print("ACK note", note["id"], digest, flush=True)
        i += 1

asyncio.run(main())
"""


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "aios.db")
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


def self_verifies(data: bytes) -> bool:
    payload, digest = data[:-64], data[-64:]
    return hashlib.sha256(payload).hexdigest().encode() == digest


def test_acknowledged_writes_survive_kill_9(url: str, tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    child = subprocess.Popen(
        [sys.executable, str(script), url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    acks: list[list[str]] = []
    deadline = time.monotonic() + 60
    try:
        assert child.stdout is not None
        while len(acks) < 300:
            line = child.stdout.readline()
            assert line, f"the writer died early: {child.stderr.read() if child.stderr else ''}"
            acks.append(line.split())
            assert time.monotonic() < deadline, "the writer is too slow (hang?)"
        os.kill(child.pid, signal.SIGKILL)  # in the middle of the stream: no clean shutdown
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    assert child.returncode == -signal.SIGKILL
    asyncio.run(check_after_restart(url, acks))


async def check_after_restart(url: str, acks: list[list[str]]) -> None:
    store = Resources(StorageConfig(database=url), MemoryConfig())
    await store.start()  # a restart: migrations find the schema intact
    who = Principal("writer")

    async def call(kind: str, op: str, **args: object) -> object:
        return await store.call(who, kind, op, dict(args), Job())

    try:
        files = [a for a in acks if a[1] == "file"]
        notes = [a for a in acks if a[1] == "note"]
        assert len(files) >= 100 and len(notes) >= 100
        for _, _, path, version, digest in files:
            got = await call("storage", "read", path=path, version=int(version))
            assert isinstance(got, dict)
            assert hashlib.sha256(got["content"]).hexdigest() == digest
        for _, _, note_id, digest in notes:
            note = await call("memory", "get", id=int(note_id))
            assert isinstance(note, dict)
            assert hashlib.sha256(note["text"].encode()).hexdigest() == digest
        # No half-written file: the current content and every version self-verify, and the
        # tree points at the newest version of each file.
        listing = await call("storage", "ls")
        assert isinstance(listing, list) and len(listing) == 20
        for entry in listing:
            history = await call("storage", "history", path=entry["path"], limit=1000)
            assert isinstance(history, list) and history[0]["id"] == entry["version"]
            for version in history:
                got = await call("storage", "read", path=entry["path"], version=version["id"])
                assert isinstance(got, dict) and self_verifies(got["content"])
        usage = await call("storage", "usage")
        assert isinstance(usage, dict) and usage["files"] == 20
        assert usage["bytes"] == sum(e["size"] for e in listing)
    finally:
        await store.close()
