"""Scheduling policies: pure, synchronous objects that decide what runs next.

A policy sees request objects, free capacity and the time, and returns a :class:`Decision`. It
does no I/O and keeps no clock of its own, so tests drive it with a fake clock.
"""

from aios.errors import ConfigError
from aios.scheduler.base import Capacity, Decision, Policy, Schedulable
from aios.scheduler.fairshare import FairShare
from aios.scheduler.fifo import FIFO
from aios.scheduler.priority import PriorityAging
from aios.scheduler.rr import RoundRobin
from aios.scheduler.spf import ShortestPredictedFirst

__all__ = [
    "FIFO",
    "POLICY_NAMES",
    "Capacity",
    "Decision",
    "FairShare",
    "Policy",
    "PriorityAging",
    "RoundRobin",
    "Schedulable",
    "ShortestPredictedFirst",
    "make_policy",
]

POLICY_NAMES = ("fifo", "rr", "priority", "fair", "spf")


def make_policy(name: str, *, quantum_tokens: int = 32, aging_seconds: float = 5.0) -> Policy:
    """Build a policy by its config name. ``quantum_tokens`` is what a request runs before it
    may be pre-empted (rr, priority, fair); ``aging_seconds`` sets how fast waiting requests
    gain rank (priority, spf)."""
    if name == "fifo":
        return FIFO()
    if name == "rr":
        return RoundRobin(quantum_tokens)
    if name == "priority":
        return PriorityAging(aging_seconds, quantum_tokens=quantum_tokens)
    if name == "fair":
        return FairShare(quantum_tokens)
    if name == "spf":
        return ShortestPredictedFirst(aging_seconds, quantum_tokens=quantum_tokens)
    raise ConfigError(
        f"unknown scheduling policy {name!r}; choose one of {', '.join(POLICY_NAMES)}"
    )
