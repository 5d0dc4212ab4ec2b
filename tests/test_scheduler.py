"""The FIFO policy and Capacity, driven with a fake clock and fabricated requests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest

from aios.errors import ConfigError
from aios.scheduler import FIFO, Capacity, Decision, make_policy
from aios.syscall import Timings


class FakeClock:
    def __init__(self, start: float = 100.0) -> None:
        self.now = start

    def tick(self, seconds: float = 1.0) -> float:
        self.now += seconds
        return self.now


@dataclass(frozen=True)
class Req:
    """Just what a policy may look at (the Schedulable protocol)."""

    id: str
    kv_need: int
    timings: Timings
    agent: str = "agent-1"
    priority: int = 0


@dataclass
class Queue:
    """Requests arriving one per clock tick."""

    clock: FakeClock = field(default_factory=FakeClock)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def arrive(self, *kv_needs: int) -> list[Req]:
        return [
            Req(f"r{next(self._ids)}", kv, Timings(submitted=self.clock.tick())) for kv in kv_needs
        ]


def ids(decision: Decision[Req]) -> list[str]:
    return [r.id for r in decision.admit]


@pytest.fixture
def queue() -> Queue:
    return Queue()


def test_admits_in_arrival_order(queue: Queue) -> None:
    waiting = queue.arrive(10, 20, 30)
    decision = FIFO().schedule(queue.clock.now, waiting, [], Capacity(8, 1000))
    assert ids(decision) == ["r1", "r2", "r3"]


def test_stops_at_first_request_that_does_not_fit(queue: Queue) -> None:
    # r2 needs more KV than is left after r1; r3 would fit but must not skip ahead.
    waiting = queue.arrive(40, 80, 5)
    decision = FIFO().schedule(queue.clock.now, waiting, [], Capacity(8, 100))
    assert ids(decision) == ["r1"]


def test_head_of_queue_too_big_admits_nothing(queue: Queue) -> None:
    waiting = queue.arrive(200, 1, 1)
    assert ids(FIFO().schedule(queue.clock.now, waiting, [], Capacity(8, 100))) == []


@pytest.mark.parametrize(("free_slots", "admitted"), [(0, 0), (1, 1), (2, 2), (5, 4)])
def test_respects_free_slots(queue: Queue, free_slots: int, admitted: int) -> None:
    waiting = queue.arrive(1, 1, 1, 1)
    decision = FIFO().schedule(queue.clock.now, waiting, [], Capacity(free_slots, 1000))
    assert ids(decision) == [r.id for r in waiting[:admitted]]


def test_respects_free_kv_exactly(queue: Queue) -> None:
    waiting = queue.arrive(30, 30, 40, 1)
    assert ids(FIFO().schedule(0.0, waiting, [], Capacity(8, 100))) == ["r1", "r2", "r3"]
    assert ids(FIFO().schedule(0.0, waiting, [], Capacity(8, 99))) == ["r1", "r2"]


def test_empty_queue_gives_empty_decision() -> None:
    decision: Decision[Req] = FIFO().schedule(0.0, [], [], Capacity(8, 1000))
    assert decision == Decision()
    assert decision.admit == () and decision.preempt == ()


def test_never_preempts_even_when_the_queue_is_stuck(queue: Queue) -> None:
    running = queue.arrive(90, 90)
    waiting = queue.arrive(500)
    decision = FIFO().schedule(queue.clock.tick(60.0), waiting, running, Capacity(0, 0))
    assert decision.admit == () and decision.preempt == ()


def test_decision_does_not_depend_on_time_or_running(queue: Queue) -> None:
    policy = FIFO()
    running = queue.arrive(5)
    waiting = queue.arrive(10, 10)
    first = policy.schedule(queue.clock.now, waiting, running, Capacity(1, 100))
    later = policy.schedule(queue.clock.tick(3600.0), waiting, [], Capacity(1, 100))
    assert ids(first) == ids(later) == ["r2"]


def test_does_not_mutate_its_inputs(queue: Queue) -> None:
    waiting = queue.arrive(1, 2)
    snapshot = list(waiting)
    FIFO().schedule(0.0, waiting, [], Capacity(1, 10))
    assert waiting == snapshot


def test_make_policy() -> None:
    policy = make_policy("fifo")
    assert isinstance(policy, FIFO)
    assert policy.name == "fifo"
    with pytest.raises(ConfigError, match="nope"):
        make_policy("nope")


class TestCapacity:
    def test_fits_needs_a_slot_and_enough_kv(self, queue: Queue) -> None:
        (request,) = queue.arrive(50)
        assert Capacity(1, 50).fits(request)
        assert not Capacity(1, 49).fits(request)
        assert not Capacity(0, 1000).fits(request)

    def test_minus_takes_one_slot_and_the_kv_need(self, queue: Queue) -> None:
        (request,) = queue.arrive(30)
        assert Capacity(3, 100).minus(request) == Capacity(2, 70)

    def test_is_immutable(self) -> None:
        capacity = Capacity(1, 1)
        with pytest.raises(AttributeError):
            capacity.free_slots = 2  # type: ignore[misc]
