"""The process table: one entry per agent the kernel runs, with its state and usage."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from aios.syscall import Completion, Status, Syscall


class AgentState(enum.Enum):
    RUNNING = "running"  # the agent's own code runs (between syscalls)
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
    """An agent as the kernel sees it. Its ``id`` is its identity for every syscall it makes."""

    name: str
    task: str
    started: float
    id: str = field(default_factory=lambda: f"agent-{next(_pids)}")
    finished: float | None = None
    result: str | None = None
    error: str | None = None
    syscalls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    waited: float = 0.0  # total time its syscalls spent queued
    current: Syscall | None = None
    _done: bool = False
    _failed: bool = False

    @property
    def state(self) -> AgentState:
        if self._failed:
            return AgentState.FAILED
        if self._done:
            return AgentState.DONE
        if self.current is None or self.current.status.finished:
            return AgentState.RUNNING
        return AgentState.QUEUED if self.current.status is Status.QUEUED else AgentState.GENERATING

    @property
    def turnaround(self) -> float | None:
        return None if self.finished is None else self.finished - self.started

    def account(self, syscall: Syscall, completion: Completion | None) -> None:
        """Charge a finished syscall to this agent."""
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
