"""The interface between a resource's queue and its scheduling policy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from aios.syscall import Timings


class Schedulable(Protocol):
    """What a policy may look at in a request (an :class:`~aios.syscall.LLMRequest` is one)."""

    @property
    def id(self) -> str: ...
    @property
    def agent(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def kv_need(self) -> int: ...
    @property
    def timings(self) -> Timings: ...
    @property
    def run_tokens(self) -> int:
        """Tokens generated since its last admission (a round-robin quantum counts these)."""
        ...

    @property
    def generated(self) -> int:
        """Tokens generated so far in all."""
        ...

    @property
    def predicted_tokens(self) -> int:
        """Predicted total output length (from the agent's history; max_tokens when unknown)."""
        ...

    @property
    def agent_service(self) -> float:
        """Service (token-equivalents) the request's agent has attained on this core."""
        ...


R = TypeVar("R", bound=Schedulable)
T = TypeVar("T")


@dataclass(frozen=True)
class Capacity:
    """Free resources of a core at the moment of the decision."""

    free_slots: int
    free_kv: int

    def fits(self, request: Schedulable) -> bool:
        return self.free_slots >= 1 and self.free_kv >= request.kv_need

    def minus(self, request: Schedulable) -> Capacity:
        return Capacity(self.free_slots - 1, self.free_kv - request.kv_need)

    def plus(self, request: Schedulable) -> Capacity:
        """Capacity after ``request`` (running) is pre-empted."""
        return Capacity(self.free_slots + 1, self.free_kv + request.kv_need)


@dataclass(frozen=True)
class Decision(Generic[T]):
    """What to admit now (in this order), and what to pre-empt to make room."""

    admit: tuple[T, ...] = ()
    preempt: tuple[T, ...] = ()


class Policy(Protocol):
    """A scheduling policy. ``waiting`` is in queue order (arrival order; a pre-empted request
    re-enters at the tail), ``running`` in admission order.

    The caller first pre-empts ``Decision.preempt`` (their context is saved and restored on
    re-admission; a request the core cannot pre-empt right now is left running), then admits
    ``Decision.admit`` in order while they fit, so a policy that over-admits cannot overcommit
    the core. ``capacity`` is what is free before any pre-emption.
    """

    name: str

    def schedule(
        self, now: float, waiting: Sequence[R], running: Sequence[R], capacity: Capacity
    ) -> Decision[R]: ...
