"""Shortest predicted first: the request with the least predicted work left runs first."""

from __future__ import annotations

import math
from collections.abc import Sequence

from aios.scheduler.admission import Victims, admit_in_order, check_aging, check_quantum
from aios.scheduler.base import Capacity, Decision, R, Schedulable


class ShortestPredictedFirst:
    """Waiting requests run in order of their aged predicted remaining work (ties in queue
    order), admitted while the first fits. A request's remaining work is
    ``max(1, predicted_tokens - generated)``; every ``aging_seconds`` since its submission
    halves what it counts as: aged work = ``remaining * 2 ** (-(now - submitted) / aging_seconds)``.

    No starvation: a new request counts at least 1, so a request with ``n`` tokens left that was
    submitted at ``t`` outranks every request submitted after ``t + log2(n) * aging_seconds``;
    it waits at most for the finitely many requests ahead of it. ``aging_seconds=math.inf``
    is pure shortest-first (which can starve long requests).

    Non-preemptive by default. With ``preemptive=True``, a request that does not fit pre-empts
    running requests with more than twice its aged work that have run ``quantum_tokens`` since
    admission, most work first. (A running request's aged work only shrinks, so the request it
    made room for can never pre-empt it back.)
    """

    name = "spf"

    def __init__(
        self, aging_seconds: float = 5.0, *, preemptive: bool = False, quantum_tokens: int = 32
    ) -> None:
        self.aging_seconds = check_aging(aging_seconds)
        self.quantum_tokens = check_quantum(quantum_tokens)
        self.preemptive = preemptive

    def key(self, request: Schedulable, now: float) -> float:
        """log2 of the aged remaining work (logs, so long waits do not underflow to 0)."""
        remaining = max(1, request.predicted_tokens - request.generated)
        return math.log2(remaining) - (now - request.timings.submitted) / self.aging_seconds

    def schedule(
        self, now: float, waiting: Sequence[R], running: Sequence[R], capacity: Capacity
    ) -> Decision[R]:
        order = sorted(waiting, key=lambda r: self.key(r, now))  # stable: queue order

        def victims(request: R, running: Sequence[R]) -> list[R]:
            bar = self.key(request, now) + 1  # twice the work
            longer = [
                r for r in running if r.run_tokens >= self.quantum_tokens and self.key(r, now) > bar
            ]
            return sorted(longer, key=lambda r: -self.key(r, now))

        chooser: Victims[R] | None = victims if self.preemptive else None
        return admit_in_order(order, running, capacity, chooser)
