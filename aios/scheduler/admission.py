"""The admission loop the policies share: admit in the policy's order, pre-empting to make room.

A policy supplies two things: the order in which waiting requests should run, and, for a
waiting request that does not fit, which running requests it may displace (most displaceable
first). The loop never skips past a request that cannot be made to fit (skipping would starve
large requests), never pre-empts for a request that would still not fit, and never pre-empts a
request twice or for nothing: the admitted requests fit what is free after the pre-emptions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aios.errors import ConfigError
from aios.scheduler.base import Capacity, Decision, R

# (candidate, running requests not pre-empted yet) -> those it may displace, best victim first.
Victims = Callable[[R, Sequence[R]], Sequence[R]]


def admit_in_order(
    order: Sequence[R],
    running: Sequence[R],
    capacity: Capacity,
    victims: Victims[R] | None = None,
) -> Decision[R]:
    """Admit ``order`` while each request fits, pre-empting victims (if any) to make it fit.
    Stops at the first request that cannot be made to fit."""
    admit: list[R] = []
    preempt: list[R] = []
    left = list(running)
    for request in order:
        if not capacity.fits(request):
            if victims is None:
                break
            chosen = make_room(request, victims(request, left), capacity)
            if chosen is None:
                break
            for victim in chosen:
                capacity = capacity.plus(victim)
                preempt.append(victim)
            # By identity: fake requests in tests may compare equal by value.
            left = [r for r in left if all(r is not v for v in chosen)]
        admit.append(request)
        capacity = capacity.minus(request)
    return Decision(admit=tuple(admit), preempt=tuple(preempt))


def make_room(request: R, candidates: Sequence[R], capacity: Capacity) -> list[R] | None:
    """The victims, taken from ``candidates`` in order until ``request`` fits, less any that a
    larger later victim made unnecessary; ``None`` when even all of them are not enough."""
    chosen: list[R] = []
    for victim in candidates:
        if capacity.fits(request):
            break
        chosen.append(victim)
        capacity = capacity.plus(victim)
    if not capacity.fits(request):
        return None
    # Every pre-emption costs a context save and restore: keep running what need not stop.
    for i in range(len(chosen) - 2, -1, -1):
        if capacity.minus(chosen[i]).fits(request):
            capacity = capacity.minus(chosen[i])
            del chosen[i]
    return chosen


def check_quantum(quantum_tokens: int) -> int:
    """Validate a quantum (tokens a request runs before it may be pre-empted)."""
    if not isinstance(quantum_tokens, int) or isinstance(quantum_tokens, bool):
        raise ConfigError(f"quantum_tokens must be an integer, got {quantum_tokens!r}")
    if quantum_tokens < 1:
        raise ConfigError(f"quantum_tokens must be >= 1, got {quantum_tokens}")
    return quantum_tokens


def check_aging(aging_seconds: float) -> float:
    """Validate an aging period (``math.inf``: no aging)."""
    if not isinstance(aging_seconds, int | float) or isinstance(aging_seconds, bool):
        raise ConfigError(f"aging_seconds must be a number, got {aging_seconds!r}")
    if not aging_seconds > 0:  # also rejects NaN
        raise ConfigError(f"aging_seconds must be > 0, got {aging_seconds!r}")
    return float(aging_seconds)
