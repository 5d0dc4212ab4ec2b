"""Priority with aging: a waiting request gains one priority level per ``aging_seconds``."""

from __future__ import annotations

from collections.abc import Sequence

from aios.scheduler.admission import admit_in_order, check_aging, check_quantum
from aios.scheduler.base import Capacity, Decision, R, Schedulable


class PriorityAging:
    """Effective priority = ``priority + (now - submitted) / aging_seconds``; higher runs first,
    ties in queue order. Admit best first while the best fits (never skip past it: that would
    starve big requests). When the best does not fit, pre-empt running requests whose effective
    priority is at least 1 below it and that have run ``quantum_tokens`` since admission (so a
    request is not pre-empted again right after it starts), lowest effective priority first.

    No starvation: every request ages at the same rate, so a request submitted at ``t`` with
    priority ``p`` outranks every request submitted after ``t + (p' - p) * aging_seconds`` with
    priority ``p'``. It waits at most for the finitely many requests ahead of it.
    ``aging_seconds=math.inf`` is strict priority (which can starve).
    """

    name = "priority"

    def __init__(self, aging_seconds: float = 5.0, *, quantum_tokens: int = 32) -> None:
        self.aging_seconds = check_aging(aging_seconds)
        self.quantum_tokens = check_quantum(quantum_tokens)

    def effective(self, request: Schedulable, now: float) -> float:
        return request.priority + (now - request.timings.submitted) / self.aging_seconds

    def schedule(
        self, now: float, waiting: Sequence[R], running: Sequence[R], capacity: Capacity
    ) -> Decision[R]:
        order = sorted(waiting, key=lambda r: -self.effective(r, now))  # stable: queue order

        def victims(request: R, running: Sequence[R]) -> list[R]:
            bar = self.effective(request, now) - 1
            lower = [
                r
                for r in running
                if r.run_tokens >= self.quantum_tokens and self.effective(r, now) <= bar
            ]
            return sorted(lower, key=lambda r: (self.effective(r, now), -r.run_tokens))

        return admit_in_order(order, running, capacity, victims)
