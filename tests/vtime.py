"""Virtual time for tests: an event loop whose clock jumps ahead when every task waits.

The kernel reads one clock, its event loop's (``Kernel.clock``): deadlines, timestamps, quotas
and scheduling. On :class:`VirtualTimeLoop` that clock is real time plus the time skipped:
when the loop has had nothing to do for ``threshold`` real seconds and its next timer is
further away, the clock jumps to that timer (Trio's autojump clock). A test that waits out a
30 s deadline, a 60 s quota window or an approval timeout ends in milliseconds, and it is
deterministic: nothing else could have run in the skipped time, since every task was waiting.

Work in the loop's executor (``run_in_executor``, ``asyncio.to_thread``: the database workers
go through it) holds the clock still until it returns, so a slow query is never skipped over.
Other real work (sockets, a subprocess, a thread of its own) only wakes the loop when it
answers: a wait for it longer than the threshold (a server starting) would be skipped over, so
such tests stay on the real loop.

Tests under ``tests/virtual_time/`` run on it (that folder's conftest.py gives pytest-asyncio
this loop's factory); ``skipped()`` says how far the clock has jumped.
"""

from __future__ import annotations

import asyncio
import selectors
import time
from typing import Any

THRESHOLD = 0.02  # real seconds the loop must be idle before its clock jumps


class _Jumping(selectors.BaseSelector):
    """A selector that, when nothing is ready within ``threshold``, moves its loop's clock to
    the end of the wait instead of sleeping through it."""

    def __init__(self, inner: selectors.BaseSelector, loop: VirtualTimeLoop) -> None:
        self.inner = inner
        self.loop = loop

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        threshold = self.loop.threshold
        if timeout is None or timeout <= threshold or self.loop.working:
            return self.inner.select(timeout)
        events = self.inner.select(threshold)
        if not events:
            self.loop.skipped += timeout - threshold
        return events

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self.inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self.inner.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self.inner.get_map()

    def close(self) -> None:
        self.inner.close()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module's docstring). ``skipped``: the seconds
    its clock has jumped so far."""

    def __init__(self, threshold: float = THRESHOLD) -> None:
        self.threshold = threshold
        self.skipped = 0.0
        self.working = 0  # executor jobs not yet returned: the clock holds still meanwhile
        super().__init__(_Jumping(selectors.DefaultSelector(), self))

    def time(self) -> float:
        return time.monotonic() + self.skipped

    def run_in_executor(self, executor: Any, func: Any, *args: Any) -> asyncio.Future[Any]:
        future = super().run_in_executor(executor, func, *args)
        self.working += 1
        future.add_done_callback(self._returned)
        return future

    def _returned(self, _: asyncio.Future[Any]) -> None:
        self.working -= 1


def skipped() -> float:
    """Seconds the running loop's clock has jumped (0 on a real loop)."""
    loop = asyncio.get_running_loop()
    return loop.skipped if isinstance(loop, VirtualTimeLoop) else 0.0
