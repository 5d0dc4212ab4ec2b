"""Durable agent processes: the agents a kernel spawns survive its death.

An agent spawned in the kernel (``Kernel.spawn``, ``POST /api/v1/processes``, ``aios run
--submit``) gets a row in the ``processes`` table of the kernel's database: its program (an
importable ``module:Class``), task, owner and groups, a random seed, its state, and a lease
(which kernel runs it, until when). Its id, ``proc-N``, is the row's number, the same after a
restart. Every syscall it makes goes through a :class:`ReplayClient`, which records the result
in the journal (aios.journal) before the agent sees it.

When a kernel starts it claims the processes that were running (its own, by its kernel id, and
any whose lease expired) and runs their ``run()`` again from the start: each syscall whose
request matches the journal's entry at that step returns the recorded result at once (no LLM
call, no tool call, no write is repeated); the first one past the journal runs live. A request
that differs from the recorded one fails the process with :class:`ReplayDiverged`. A kernel
renews its leases every third of ``lease_seconds`` and takes over expired ones; on PostgreSQL
the claim is ``SELECT ... FOR UPDATE SKIP LOCKED``, so two kernels never claim one process.

The rules an agent follows to be resumable (Temporal's model):

- Every effect goes through a syscall (``self.llm``, ``self.memory``, ``self.storage``,
  ``self.tools``); the agent's own code between them is re-run on replay.
- Randomness from ``self.random`` (seeded per process), time from ``self.now()`` (the time of
  the agent's last syscall result, the same on replay), never ``random`` or ``time`` directly.
- The same syscalls in the same order for the same task: an LLM call at temperature > 0 is fine
  (its answer is recorded), but reading the environment, the network or a file outside the
  kernel to decide what to call next is not.
- The call in flight when the kernel died is made again on resume (it may have been applied
  once already): tools should tolerate that.
"""

from __future__ import annotations

import asyncio
import importlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aios.errors import AIOSError, ConfigError, KernelShutdown, ReplayDiverged, SyscallCancelled
from aios.journal import Entry, Journal, decode, encode, fingerprint, llm_fingerprint
from aios.storage.db import Conn, Database
from aios.syscall import Completion, LLMCall, MemoryUse

if TYPE_CHECKING:
    from aios.kernel import Kernel
    from aios.process import AgentProcess
    from aios.sdk.agent import Agent

T = TypeVar("T")
PREFIX = "proc-"
CLAIM_BATCH = 1000  # processes claimed per query
QUIET = 3  # event-loop passes without a new syscall before a replayed result is handed back
_COLUMNS = (
    "n, agent, name, task, owner, groups, seed, state, result, error, created, finished, "
    "kernel, lease_until"
)


@dataclass(frozen=True)
class ProcessRow:
    n: int
    agent: str  # module:qualname of its class
    name: str
    task: str
    owner: str | None
    groups: str  # comma-separated
    seed: int
    state: str  # running, done, failed
    result: str | None
    error: str | None
    created: float  # wall clock
    finished: float | None
    kernel: str | None
    lease_until: float | None

    @property
    def id(self) -> str:
        return f"{PREFIX}{self.n}"


def agent_ref(cls: type[Agent]) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def load_agent(ref: str) -> type[Agent]:
    """The agent class a process row names (``module:qualname``)."""
    from aios.sdk.agent import Agent

    module_name, _, qualname = ref.partition(":")
    try:
        found: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            found = getattr(found, part)
    except (ImportError, AttributeError) as e:
        raise ConfigError(
            f"cannot import the agent program {ref!r} to resume it ({e}); an agent class must "
            "be importable by its module and name (defined at module level, on sys.path)"
        ) from None
    if not (isinstance(found, type) and issubclass(found, Agent)):
        raise ConfigError(f"{ref!r} is not an Agent class")
    return found


def process_number(process_id: str) -> int | None:
    """N of ``proc-N``; None for any other id."""
    digits = process_id.removeprefix(PREFIX)
    return int(digits) if process_id.startswith(PREFIX) and digits.isdigit() else None


class ProcessTable:
    """The ``processes`` table as one kernel sees it: ``kernel_id`` names its leases."""

    def __init__(self, db: Database, kernel_id: str, lease_seconds: float) -> None:
        self.db = db
        self.kernel_id = kernel_id
        self.lease_seconds = lease_seconds

    async def create(
        self, agent: str, name: str, task: str, owner: str | None, groups: frozenset[str]
    ) -> ProcessRow:
        """Record a new process, leased to this kernel (committed when this returns)."""
        now = time.time()
        values = (
            agent, name, task, owner, ",".join(sorted(groups)), secrets.randbits(62), "running",
            now, self.kernel_id, now + self.lease_seconds,
        )  # fmt: skip

        def insert(conn: Conn) -> ProcessRow:
            with conn.transaction():
                row = conn.one(
                    "INSERT INTO processes (agent, name, task, owner, groups, seed, state, "
                    "created, kernel, lease_until) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    f"RETURNING {_COLUMNS}",
                    values,
                )
            assert row is not None
            return ProcessRow(*row)

        return await self.db.run(insert)

    async def get(self, n: int) -> ProcessRow | None:
        row = await self.db.run(
            lambda conn: conn.one(f"SELECT {_COLUMNS} FROM processes WHERE n = ?", (n,))
        )
        return None if row is None else ProcessRow(*row)

    async def finish(self, n: int, state: str, result: str | None, error: str | None) -> bool:
        """Record a process's end, if this kernel still holds its lease."""
        changed = await self.db.run(
            lambda conn: conn.run(
                "UPDATE processes SET state = ?, result = ?, error = ?, finished = ?, "
                "lease_until = NULL WHERE n = ? AND kernel = ? AND state = 'running'",
                (state, result, error, time.time(), n, self.kernel_id),
            )
        )
        return changed > 0

    async def claim(self, *, own: bool, after: int = 0) -> list[ProcessRow]:
        """Take the lease of running processes nobody holds any more (their lease expired),
        and with ``own`` those this kernel id held before it restarted: at most CLAIM_BATCH,
        numbered above ``after``."""
        now = time.time()

        def take(conn: Conn) -> list[ProcessRow]:
            lock = " FOR UPDATE SKIP LOCKED" if conn.dialect == "postgres" else ""
            with conn.transaction():
                rows = conn.all(
                    f"SELECT {_COLUMNS} FROM processes WHERE state = 'running' AND n > ? "
                    "AND (lease_until < ? OR kernel = ?) ORDER BY n LIMIT ?" + lock,
                    (after, now, self.kernel_id if own else "", CLAIM_BATCH),
                )
                conn.many(
                    "UPDATE processes SET kernel = ?, lease_until = ? WHERE n = ?",
                    [(self.kernel_id, now + self.lease_seconds, row[0]) for row in rows],
                )
            return [ProcessRow(*row) for row in rows]

        return await self.db.run(take)

    async def renew(self, running: set[int]) -> set[int]:
        """Extend the leases of the processes this kernel runs; those it still holds. Only
        these: a row this kernel holds but does not run (its run stopped on a database error)
        expires, and is claimed again (here or elsewhere)."""
        now = time.time()

        def extend(conn: Conn) -> set[int]:
            held: set[int] = set()
            numbers = sorted(running)
            with conn.transaction():
                for start in range(0, len(numbers), 500):
                    chunk = numbers[start : start + 500]
                    marks = ", ".join("?" * len(chunk))
                    where = f"kernel = ? AND state = 'running' AND n IN ({marks})"
                    conn.run(
                        f"UPDATE processes SET lease_until = ? WHERE {where}",
                        (now + self.lease_seconds, self.kernel_id, *chunk),
                    )
                    rows = conn.all(
                        f"SELECT n FROM processes WHERE {where}", (self.kernel_id, *chunk)
                    )
                    held.update(int(row[0]) for row in rows)
            return held

        return await self.db.run(extend)


class ReplayClient:
    """A durable process's syscall client: a syscall the journal holds at this step returns
    the recorded result (or raises the recorded error); the others run live on the kernel and
    are recorded before they return.

    Steps are numbered as the agent makes its calls; recorded results are handed back in the
    order they were handed back when they ran (each entry's ``delivered``), so an agent whose
    concurrent branches make several calls each (``asyncio.gather``) makes the same calls in
    the same order on replay. A result that waits for its turn longer than the call's deadline
    means the program now makes its calls differently: ReplayDiverged."""

    def __init__(
        self,
        kernel: Kernel,
        process: AgentProcess,
        journal: Journal,
        entries: dict[str, Entry],
        *,
        seed: int,
        started: float,
        lease: int | None = None,
    ) -> None:
        self._kernel = kernel
        self._process = process
        self._journal = journal
        self._lease = lease
        self._entries = entries
        self._issued = 0  # steps numbered so far (the next one's number)
        recorded = sorted((e for e in entries.values() if e.delivered >= 0), key=_delivery)
        self._order = [entry.key for entry in recorded]  # keys, in the order handed back
        self._next = 0  # index in _order of the next recorded result to hand back
        self._turn = asyncio.Condition()
        self._delivered = len(recorded)  # the next live result's place in that order
        self.seed = seed
        self._now = started
        self.replayed = 0  # syscalls answered from the journal
        self.diverged: ReplayDiverged | None = None
        self.broken: AIOSError | None = None  # the journal could not record a result

    def now(self) -> float:
        """Wall-clock time of the agent's last syscall result (of its start before any)."""
        return self._now

    @property
    def unreplayed(self) -> int:
        """Journalled results no syscall of this run asked for (yet)."""
        return len(self._order) - self._next

    async def llm(
        self, call: LLMCall, *, timeout: float | None = None, memory: MemoryUse | None = None
    ) -> Completion:
        result: Completion = await self._step(
            "llm",
            llm_fingerprint(call, memory),
            timeout,
            lambda _: self._kernel.llm(self._process, call, timeout=timeout, memory=memory),
        )
        return result

    async def call(
        self, kind: str, op: str, args: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        return await self._step(
            f"{kind}.{op}",
            fingerprint(kind, op, args),
            timeout,
            lambda step: self._kernel.resource(
                self._process, kind, op, args, timeout=timeout, step=step
            ),
        )

    async def _step(
        self, what: str, digest: str, timeout: float | None, live: Callable[[str], Awaitable[T]]
    ) -> T:
        if self.broken is not None:  # nothing more runs here (the process resumes later)
            raise self.broken
        if self.diverged is not None:  # the agent caught it: nothing it asks runs any more
            raise self.diverged
        key = str(self._issued)
        self._issued += 1
        entry = self._entries.pop(key, None)
        if entry is not None:
            if entry.fingerprint != digest:
                raise self._diverge(
                    f"at step {key} ({what}): the journal recorded a different request there"
                )
            await self._wait_turn(key, what, timeout or self._kernel.config.syscall_timeout)
            self.replayed += 1
            self._now = entry.at
            result: T = decode(entry.value)
            return result
        try:
            value = await live(key)
        except KernelShutdown:
            raise  # the kernel's end, not the call's outcome: made again on resume
        except SyscallCancelled as e:
            task = asyncio.current_task()
            if self._process.killed or (task is not None and task.cancelling()):
                raise  # a kill: the process ends anyway
            await self._record(key, digest, encode(error=e), 0)  # the agent sees it: recorded
            raise
        except AIOSError as e:
            await self._record(key, digest, encode(error=e), 0)
            raise
        tokens = value.usage.total_tokens if isinstance(value, Completion) else 0
        await self._record(key, digest, encode(value), tokens)
        return value

    async def _wait_turn(self, key: str, what: str, limit: float) -> None:
        """Hand a recorded result back in its place in the original order, and only once the
        agent's other branches that can run have made their calls (as they had, live, while
        the call ran): then the steps the agent numbers next are the ones it numbered live."""
        try:
            async with asyncio.timeout(limit):
                while True:
                    if self._order[self._next] == key:
                        await self._settle()
                        if self._order[self._next] == key:
                            break
                    async with self._turn:
                        await self._turn.wait_for(lambda: self._order[self._next] == key)
        except TimeoutError:
            raise self._diverge(
                f"at step {key} ({what}): its concurrent calls came in another order "
                f"(the recorded result waited {limit:g}s for its turn)"
            ) from None
        self._next += 1
        async with self._turn:
            self._turn.notify_all()

    async def _settle(self) -> None:
        """Let the event loop run until QUIET passes in a row make no new syscall."""
        quiet = 0
        while quiet < QUIET:
            issued = self._issued
            await asyncio.sleep(0)
            quiet = quiet + 1 if self._issued == issued else 0

    async def _record(self, key: str, digest: str, value: str, tokens: int) -> None:
        delivered, self._delivered = self._delivered, self._delivered + 1
        try:
            self._now = await self._journal.append(
                self._process.id, key, digest, value, tokens, delivered=delivered,
                lease=self._lease,
            )  # fmt: skip
        except AIOSError as e:
            self.broken = e
            raise

    def _diverge(self, where: str) -> ReplayDiverged:
        self.diverged = ReplayDiverged(
            f"{self._process.id} diverged from its journal {where}, so its code, task or "
            "inputs changed since it ran. Nothing was re-run; spawn it again to start over"
        )
        return self.diverged


def _delivery(entry: Entry) -> int:
    return entry.delivered


async def recorded_decision(journal: Journal, process: str, step: str) -> bool | None:
    """A journalled approval decision for a durable process's step (None: none yet)."""
    entry = await journal.get(process, f"{step}/approval")
    return None if entry is None else bool(decode(entry.value))


async def record_decision(
    journal: Journal, process: str, step: str, allowed: bool, lease: int | None
) -> None:
    await journal.append(process, f"{step}/approval", "approval", encode(allowed), lease=lease)


def new_kernel_id() -> str:
    return f"kernel-{secrets.token_hex(6)}"
