"""Scheduling policies: pure, synchronous objects that decide what runs next.

A policy sees request objects, free capacity and the time, and returns a :class:`Decision`. It
does no I/O and keeps no clock of its own, so tests drive it with a fake clock.
"""

from aios.errors import ConfigError
from aios.scheduler.base import Capacity, Decision, Policy, Schedulable
from aios.scheduler.fifo import FIFO

__all__ = ["FIFO", "Capacity", "Decision", "Policy", "Schedulable", "make_policy"]


def make_policy(name: str) -> Policy:
    """Build a policy by its config name."""
    if name == "fifo":
        return FIFO()
    raise ConfigError(f"unknown scheduling policy {name!r}")
