"""Round robin: queue order, and a request that used up its quantum yields to those waiting."""

from __future__ import annotations

from collections.abc import Sequence

from aios.scheduler.admission import admit_in_order, check_quantum
from aios.scheduler.base import Capacity, Decision, R


class RoundRobin:
    """Admit in queue order while the head fits. When the head does not fit, pre-empt running
    requests that have generated at least ``quantum_tokens`` since their admission, the longest
    run first, as many as the head needs (none if even all of them would not make it fit). The
    core puts a pre-empted request at the tail of the queue, so it waits its turn again."""

    name = "rr"

    def __init__(self, quantum_tokens: int = 32) -> None:
        self.quantum_tokens = check_quantum(quantum_tokens)

    def schedule(
        self, now: float, waiting: Sequence[R], running: Sequence[R], capacity: Capacity
    ) -> Decision[R]:
        return admit_in_order(waiting, running, capacity, self._victims)

    def _victims(self, request: R, running: Sequence[R]) -> list[R]:
        spent = [r for r in running if r.run_tokens >= self.quantum_tokens]
        return sorted(spent, key=lambda r: -r.run_tokens)  # stable: earlier admission first
