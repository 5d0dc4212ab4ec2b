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


@dataclass(frozen=True)
class Decision(Generic[T]):
    """What to admit now (in this order), and what to pre-empt to make room."""

    admit: tuple[T, ...] = ()
    preempt: tuple[T, ...] = ()


class Policy(Protocol):
    """A scheduling policy. ``waiting`` is in arrival order, ``running`` in admission order.

    The caller admits the returned requests in order while they fit, so a policy that
    over-admits cannot overcommit the core.
    """

    name: str

    def schedule(
        self, now: float, waiting: Sequence[R], running: Sequence[R], capacity: Capacity
    ) -> Decision[R]: ...
