"""The syscall journal: what each durable process's syscalls returned, in the kernel's database.

A row is ``(process, key, fingerprint, value, tokens, at)``: for a spawned agent the key is the
syscall's step number in its program (0, 1, 2...), for an HTTP agent's call with an
``Idempotency-Key`` it is ``idem:`` and that key. ``fingerprint`` is a digest of the request
(kind, operation, arguments; for an LLM call its messages, sampling parameters and memory
use), ``value`` the result as JSON (a completion, a resource result with its bytes in base64,
or the typed error the call ended with), ``tokens`` what an LLM call was charged (so a resumed
agent's quota window is whole again), ``at`` the wall-clock time it was recorded.

Appends are group-committed: :meth:`Journal.append` queues a row and waits until the writer
task (one, owned by the kernel's TaskGroup) has committed it, together with every row queued
meanwhile, in one transaction. So a result is durable before the agent sees it, and many
agents' results share one commit.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any

from aios.errors import AIOSError, KernelShutdown, LeaseLost, Overloaded, error_classes
from aios.storage.db import Conn, Database
from aios.syscall import Completion, LLMCall, MemoryUse, Timings, Usage

IDEMPOTENCY = "idem:"  # the key prefix of an HTTP syscall's Idempotency-Key


@dataclass(frozen=True)
class Entry:
    key: str
    fingerprint: str
    value: str  # JSON, see encode()
    tokens: int
    at: float  # wall clock (seconds since the epoch)
    delivered: int  # the order its result was handed to the agent in (-1: not a result)


# -- what is recorded ---------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """JSON values, with bytes tagged (``{"$bytes": base64}``) and tuples as lists."""
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _unplain(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and "$bytes" in value:
            return base64.b64decode(value["$bytes"])
        return {k: _unplain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unplain(v) for v in value]
    return value


def _digest(request: Any) -> str:
    text = json.dumps(request, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _fields(value: Any) -> list[Any]:
    """A flat dataclass's field values (shallow: cheaper than dataclasses.asdict)."""
    return [getattr(value, f.name) for f in dataclasses.fields(value)]


def fingerprint(kind: str, op: str, args: dict[str, Any]) -> str:
    """A memory, storage or tool call's request, digested."""
    return _digest([kind, op, _plain(args)])


def llm_fingerprint(call: LLMCall, memory: MemoryUse | None) -> str:
    """An LLM call's request, digested (its messages, prompt, model, sampling, memory use)."""
    messages = [[m.role, m.content] for m in call.messages]
    use = None if memory is None else _fields(memory)
    return _digest(["llm", messages, call.prompt, call.model, _fields(call.params), use])


def encode(value: Any = None, *, error: BaseException | None = None) -> str:
    """A result (or the typed error a call ended with) as the journal's JSON."""
    if error is not None:
        code = error.code if isinstance(error, AIOSError) else "aios_error"
        record: dict[str, Any] = {"error": code, "message": str(error)}
        retry = getattr(error, "retry_after", None)
        if isinstance(retry, int | float):
            record["retry_after"] = retry
        return json.dumps(record)
    if isinstance(value, Completion):
        usage = value.usage
        body = {
            "text": value.text,
            "finish_reason": value.finish_reason,
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
            },
            "model": value.model,
            "syscall_id": value.syscall_id,
            "context": value.context,
        }
        return json.dumps({"completion": body})
    return json.dumps({"value": _plain(value)})


def decode(text: str) -> Any:
    """A recorded result; a recorded error is raised again (its type, its message)."""
    record = json.loads(text)
    if "completion" in record:
        body = record["completion"]
        return Completion(
            text=body["text"],
            finish_reason=body["finish_reason"],
            usage=Usage(**body["usage"]),
            timings=Timings(submitted=0.0),
            model=body["model"],
            syscall_id=body["syscall_id"],
            context=body.get("context"),
        )
    if "error" in record:
        cls = error_classes().get(record["error"], AIOSError)
        try:
            error = (
                cls(record["message"], retry_after=record["retry_after"])  # type: ignore[call-arg]
                if "retry_after" in record
                else cls(record["message"])
            )
        except TypeError:
            error = AIOSError(record["message"])
        raise error
    return _unplain(record["value"])


# -- the table ------------------------------------------------------------------------------
_INSERT = (
    "INSERT INTO journal (process, key, fingerprint, value, tokens, at, delivered) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (process, key) DO NOTHING"
)
_SELECT = "SELECT key, fingerprint, value, tokens, at, delivered FROM journal"
RETRIES = 6  # a batch the database refuses as overloaded is tried again, backing off


@dataclass
class _Append:
    row: tuple[Any, ...]
    lease: int | None  # the process row whose lease this kernel must hold (durable processes)
    done: asyncio.Future[None]


class Journal:
    """Rows of the ``journal`` table, appended through one group-committing writer. A durable
    process's row is written only while ``kernel_id`` holds the process's lease (checked in
    the same transaction, the row locked against a takeover until it commits)."""

    def __init__(self, db: Database, kernel_id: str) -> None:
        self.db = db
        self.kernel_id = kernel_id
        self._queue: list[_Append] = []
        self._wake: asyncio.Event | None = None
        self.appended = 0  # rows committed
        self.commits = 0  # transactions that committed them

    async def run(self) -> None:
        """The writer: commits whatever is queued, one transaction per batch (until cancelled;
        what is queued then fails with the cancellation)."""
        self._wake = asyncio.Event()
        batch: list[_Append] = []
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                batch, self._queue = self._queue, []
                try:
                    lost = await self._commit(batch)
                except Exception as e:
                    for item in batch:
                        if not item.done.done():
                            item.done.set_exception(e)
                    continue
                for item in batch:
                    if item.done.done():
                        continue
                    if item.lease in lost:
                        item.done.set_exception(
                            LeaseLost(f"{item.row[0]} is held by another kernel now")
                        )
                    else:
                        item.done.set_result(None)
                batch = []
        finally:
            self._wake = None
            for item in [*batch, *self._queue]:
                item.done.cancel()
            self._queue = []

    async def _commit(self, batch: list[_Append]) -> set[int]:
        """Write a batch (retrying while the database is overloaded); the leases found lost."""
        work = functools.partial(_write, batch=batch, kernel_id=self.kernel_id)
        for attempt in range(RETRIES):
            try:
                lost = await self.db.run(work)
            except Overloaded:
                if attempt == RETRIES - 1:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)
                continue
            self.appended += len(batch) - sum(1 for item in batch if item.lease in lost)
            self.commits += 1
            return lost
        raise AssertionError("unreachable")

    async def append(
        self,
        process: str,
        key: str,
        fingerprint: str,
        value: str,
        tokens: int = 0,
        *,
        delivered: int = -1,
        lease: int | None = None,
    ) -> float:
        """Record one result; returns once it is committed (the time it was recorded).
        ``lease``: the durable process's row number (LeaseLost if this kernel no longer
        holds it: nothing is written)."""
        if self._wake is None:
            raise KernelShutdown("the journal's writer is not running")
        at = time.time()
        done = asyncio.get_running_loop().create_future()
        row = (process, key, fingerprint, value, tokens, at, delivered)
        self._queue.append(_Append(row, lease, done))
        self._wake.set()
        await done
        return at

    async def entries(self, process: str) -> dict[str, Entry]:
        """A process's recorded results, by key."""
        rows = await self.db.run(lambda conn: conn.all(f"{_SELECT} WHERE process = ?", (process,)))
        return {row[0]: Entry(*row) for row in rows}

    async def get(self, process: str, key: str) -> Entry | None:
        row = await self.db.run(
            lambda conn: conn.one(f"{_SELECT} WHERE process = ? AND key = ?", (process, key))
        )
        return None if row is None else Entry(*row)

    async def expire(self, before: float) -> int:
        """Drop idempotency records older than ``before`` (wall clock); how many."""
        return await self.db.run(
            lambda conn: conn.run(
                "DELETE FROM journal WHERE at < ? AND key LIKE ?", (before, IDEMPOTENCY + "%")
            )
        )


def _write(conn: Conn, *, batch: list[_Append], kernel_id: str) -> set[int]:
    """One transaction: the leases the batch needs, checked (and share-locked on PostgreSQL,
    so a takeover waits for this commit), then the rows of the processes still held."""
    with conn.transaction():
        needed = sorted({item.lease for item in batch if item.lease is not None})
        held: set[int] = set()
        lock = " FOR SHARE" if conn.dialect == "postgres" else ""
        for start in range(0, len(needed), 500):
            chunk = needed[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = conn.all(
                f"SELECT n FROM processes WHERE n IN ({marks}) AND kernel = ? "
                "AND state = 'running'" + lock,
                (*chunk, kernel_id),
            )
            held.update(int(row[0]) for row in rows)
        lost = set(needed) - held
        conn.many(_INSERT, [item.row for item in batch if item.lease not in lost])
    return lost
