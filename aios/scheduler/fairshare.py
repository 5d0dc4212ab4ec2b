"""Fair share: the agent that has received the least service runs first (least attained
service at the agent level, as Autellix's PLAS)."""

from __future__ import annotations

from collections.abc import Sequence

from aios.scheduler.admission import admit_in_order, check_quantum
from aios.scheduler.base import Capacity, Decision, R


class FairShare:
    """Waiting requests run in order of their agent's attained service (ties in queue order),
    admitted while the first fits. When it does not fit, pre-empt running requests whose agent
    has attained more than ``quantum_tokens`` more service than the waiting request's agent and
    that have run ``quantum_tokens`` since admission, most-served agent first.

    The margin and the quantum keep two agents from trading a slot back and forth every step:
    with one slot and both agents always waiting, their attained service differs by at most
    ``quantum_tokens + 1`` tokens of decode.
    """

    name = "fair"

    def __init__(self, quantum_tokens: int = 32) -> None:
        self.quantum_tokens = check_quantum(quantum_tokens)

    def schedule(
        self, now: float, waiting: Sequence[R], running: Sequence[R], capacity: Capacity
    ) -> Decision[R]:
        order = sorted(waiting, key=lambda r: r.agent_service)  # stable: queue order
        return admit_in_order(order, running, capacity, self._victims)

    def _victims(self, request: R, running: Sequence[R]) -> list[R]:
        bar = request.agent_service + self.quantum_tokens
        richer = [
            r for r in running if r.run_tokens >= self.quantum_tokens and r.agent_service > bar
        ]
        return sorted(richer, key=lambda r: (-r.agent_service, -r.run_tokens))
