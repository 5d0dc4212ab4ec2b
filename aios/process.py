"""The process table: one entry per agent the kernel serves, with its state and usage.

Two kinds of entries: an agent program the kernel runs as a task (``agent-N`` from
``run_agent``; ``proc-N``, durable, from ``spawn``: see aios.durable), and an agent outside
the kernel that makes syscalls over HTTP with its credential (``@name``, one entry per
identity, created on its first syscall).
"""

from __future__ import annotations

import asyncio
import enum
import itertools
from dataclasses import dataclass, field

from aios.storage.files import Principal
from aios.syscall import Completion, Status, Syscall


class AgentState(enum.Enum):
    RUNNING = "running"  # the agent's own code runs (between syscalls)
    IDLE = "idle"  # an agent outside the kernel with no syscall in flight
    QUEUED = "queued"  # blocked on a syscall that waits for a resource
    GENERATING = "generating"  # blocked on an LLM syscall the core is running
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (AgentState.DONE, AgentState.FAILED)


_pids = itertools.count(1)


@dataclass
class AgentProcess:
    """An agent as the kernel sees it. Its ``id`` is its identity for every syscall it makes;
    ``owner`` is the credential it runs under (None: the kernel's own, in-process caller)."""

    name: str
    task: str
    started: float
    id: str = field(default_factory=lambda: f"agent-{next(_pids)}")
    owner: str | None = None
    groups: frozenset[str] = frozenset()  # the owner's groups (from its credential)
    external: bool = False  # lives outside the kernel (an HTTP client); never exits
    finished: float | None = None
    result: str | None = None
    error: str | None = None
    syscalls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    waited: float = 0.0  # total time its syscalls spent queued
    inflight: list[Syscall] = field(default_factory=list)
    runner: asyncio.Task[AgentProcess] | None = None  # the task running it (spawned agents)
    killed: bool = False  # stopped by a kill (not by the kernel's shutdown)
    _done: bool = False
    _failed: bool = False

    @property
    def principal(self) -> Principal:
        """Whose memory and files its syscalls use: its credential's identity, or for an
        agent the kernel runs without one, its program name."""
        return Principal(self.owner or self.name, self.groups)

    @property
    def current(self) -> Syscall | None:
        """Its most recent syscall in flight."""
        return self.inflight[-1] if self.inflight else None

    @property
    def state(self) -> AgentState:
        if self._failed:
            return AgentState.FAILED
        if self._done:
            return AgentState.DONE
        statuses = {s.status for s in self.inflight}
        if Status.RUNNING in statuses:
            return AgentState.GENERATING
        if Status.QUEUED in statuses:
            return AgentState.QUEUED
        return AgentState.IDLE if self.external else AgentState.RUNNING

    @property
    def turnaround(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    def account(self, syscall: Syscall, completion: Completion | None) -> None:
        """Charge a finished syscall to this agent."""
        self.inflight.remove(syscall)
        self.syscalls += 1
        self.waited += syscall.timings.waited
        if completion is not None:
            self.prompt_tokens += completion.usage.prompt_tokens
            self.completion_tokens += completion.usage.completion_tokens

    def exit(self, now: float, *, result: str | None = None, error: str | None = None) -> None:
        self.finished = now
        self.result = result
        self.error = error
        if error is None:
            self._done = True
        else:
            self._failed = True
