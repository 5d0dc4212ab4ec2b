"""``Idempotency-Key`` on HTTP syscalls: an agent outside the kernel that retries a call (its
connection dropped, the server restarted) gets the recorded answer instead of a second run.

A syscall route called with the header records its answer (status and envelope) in the
kernel's journal (aios.journal), under the caller's process (``@name``) and the key, before the
answer is sent. A repeat with the same key and the same request (path, query and body) within
``[kernel.durable] idempotency_hours`` (24 by default) answers with the recorded envelope and
``Idempotent-Replayed: true``, and runs nothing; a repeat while the first still runs waits for
its answer. The same key with another request is a 409. A non-streamed call under a key is not
cancelled when its client disconnects (the client will ask again for its answer). What is
recorded: answers that a retry would repeat (2xx, and 4xx other than 409 and 429); an
overload, a timeout or a kernel error is not recorded, so a retry runs the call. A streamed
call's repeat answers with the recorded envelope as JSON. Keys are per identity: another
agent's key is another key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from aios.errors import AIOSError, Conflict, InvalidRequest
from aios.identity import Identity
from aios.journal import IDEMPOTENCY, decode, encode, fingerprint
from aios.kernel import Kernel

log = logging.getLogger("aios.server")
HEADER = "Idempotency-Key"
REPLAYED = "Idempotent-Replayed"
MAX_KEY = 255


def recordable(status: int) -> bool:
    """Whether a retry would get the same answer (so the first one is kept)."""
    return 200 <= status < 300 or (400 <= status < 500 and status not in (408, 409, 429, 499))


@dataclass
class Claim:
    """A call running under an idempotency key: it records its answer, then lets go."""

    keys: Idempotency
    process: str
    key: str
    digest: str
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    async def record(self, status: int, body: dict[str, Any]) -> None:
        """Record an answer before it is sent. If the database cannot, the answer is sent
        anyway (a repeat then runs the call again), and the failure is logged."""
        if not recordable(status):
            return
        value = encode({"status": status, "body": body})
        try:
            await self.keys.kernel.journal.append(self.process, self.key, self.digest, value)
        except AIOSError as e:
            log.warning("could not record the answer of %s %s: %s", HEADER, self.key, e)

    async def record_response(self, response: Response) -> None:
        if isinstance(response, JSONResponse):
            await self.record(response.status_code, json.loads(bytes(response.body)))

    def release(self) -> None:
        self.keys.running.pop((self.process, self.key), None)
        self.ended.set()


class Idempotency:
    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.running: dict[tuple[str, str], Claim] = {}

    async def begin(self, identity: Identity, request: Request) -> Claim | Response | None:
        """None without the header; the recorded answer of a repeat; else the claim of the
        key (the caller records its answer with it, then releases it). A repeat while the
        first call runs waits for it (up to the server's syscall deadline) and answers as it
        did."""
        key = request.headers.get(HEADER)
        if key is None:
            return None
        if not 0 < len(key) <= MAX_KEY or not key.isascii() or not key.isprintable():
            raise InvalidRequest(f"{HEADER} must be 1-{MAX_KEY} printable ASCII characters")
        process, stored = f"@{identity.name}", IDEMPOTENCY + key
        raw = await request.body()
        try:  # the same JSON, however it is spaced or ordered, is the same request
            body: Any = json.loads(raw) if raw.strip() else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        digest = fingerprint("http", request.url.path, {"query": request.url.query, "body": body})
        first = self.running.get((process, stored))
        if first is not None:  # the same key in flight: its answer, once it has one
            if first.digest != digest:
                raise _reused(key)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.kernel.config.syscall_timeout):
                    await first.ended.wait()
            if (process, stored) in self.running:
                raise Conflict(f"a request with {HEADER} {key!r} is still running; retry later")
        claim = Claim(self, process, stored, digest)  # held before the read: no second run
        self.running[(process, stored)] = claim
        try:
            entry = await self.kernel.journal.get(process, stored)
            hours = self.kernel.config.durable.idempotency_hours
            horizon = time.time() - hours * 3600
            if entry is not None and entry.at <= horizon:  # past its time: the key is new
                await self.kernel.journal.expire(horizon)
                entry = None
        except BaseException:
            claim.release()
            raise
        if entry is None:
            return claim
        claim.release()
        if entry.fingerprint != digest:
            raise _reused(key)
        answer = decode(entry.value)
        return JSONResponse(
            answer["body"], status_code=answer["status"], headers={REPLAYED: "true"}
        )


def _reused(key: str) -> Conflict:
    return Conflict(
        f"{HEADER} {key!r} was used for a different request; use a new key for a new request"
    )
