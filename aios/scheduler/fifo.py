"""First come, first served: admit in arrival order while the head of the queue fits."""

from __future__ import annotations

from collections.abc import Sequence

from aios.scheduler.base import Capacity, Decision, R


class FIFO:
    """Strict FIFO. When the oldest waiting request does not fit, nothing behind it is
    admitted either: skipping ahead would starve large requests forever."""

    name = "fifo"

    def schedule(
        self, now: float, waiting: Sequence[R], running: Sequence[R], capacity: Capacity
    ) -> Decision[R]:
        admit: list[R] = []
        for request in waiting:
            if not capacity.fits(request):
                break
            admit.append(request)
            capacity = capacity.minus(request)
        return Decision(admit=tuple(admit))
