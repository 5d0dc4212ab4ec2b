"""The kernel's event bus: what happens in the kernel, as it happens, for whoever watches.

    async with kernel.events.subscribe(principals={"alice"}) as events:
        async for event in events:
            print(event.kind, event.syscall, event.state)

Publishers (the kernel's syscall transitions, approvals) call :meth:`EventBus.publish`, which
never blocks and costs one check when nobody subscribes. Each subscriber has its own bounded
queue: when it is full, new events are dropped for that subscriber only, and the next event it
reads is a ``dropped`` event saying how many it missed. A slow watcher never slows the kernel.
Events are published on the event loop's thread only.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from types import TracebackType
from typing import Any

DEFAULT_LIMIT = 1024  # events a subscriber may fall behind before it drops


@dataclass(frozen=True)
class Event:
    """One thing that happened. ``kind``: ``syscall`` (a state change: ``state`` queued,
    running, preempted, restarted, done, failed or cancelled; a memory, storage or tool call
    goes from queued to its end), ``approval`` (``state`` asked, allowed or denied) or
    ``dropped`` (``data["count"]`` events this subscriber missed)."""

    seq: int  # the bus's order (a subscriber that dropped sees a gap)
    at: float  # the kernel's clock
    kind: str
    principal: str = ""  # whose: the agent's identity
    process: str = ""  # its process id
    syscall: str = ""  # the syscall's id (or the approval's)
    state: str = ""
    data: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Subscription:
    """One subscriber's bounded queue of events (an async iterator until closed)."""

    def __init__(self, bus: EventBus, limit: int, principals: Collection[str] | None) -> None:
        self._bus = bus
        self.limit = limit
        self.principals = None if principals is None else frozenset(principals)
        self._queue: deque[Event] = deque()
        self._wake: asyncio.Future[None] | None = None
        self.dropped = 0  # missed and not yet reported
        self.closed = False

    def offer(self, event: Event) -> None:
        if self.principals is not None and event.principal not in self.principals:
            return
        if len(self._queue) >= self.limit:
            self.dropped += 1
            return
        if self.dropped:  # told, in order, before what comes after the gap
            self._queue.append(self._missed())
        self._queue.append(event)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def _missed(self) -> Event:
        count, self.dropped = self.dropped, 0
        return self._bus.event("dropped", data={"count": count})

    async def get(self) -> Event:
        """The next event (a ``dropped`` event first if some were missed); waits for one.
        Raises StopAsyncIteration once closed."""
        while True:
            if self._queue:
                return self._queue.popleft()
            if self.dropped:
                return self._missed()
            if self.closed:
                raise StopAsyncIteration
            self._wake = asyncio.get_running_loop().create_future()
            try:
                await self._wake
            finally:
                self._wake = None

    def close(self) -> None:
        """Stop: the iterator ends once what is queued is read."""
        self.closed = True
        self._bus._subscribers.discard(self)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        return await self.get()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class EventBus:
    """Fan-out of the kernel's events to its subscribers (see the module's docstring)."""

    def __init__(self, clock: Callable[[], float], limit: int = DEFAULT_LIMIT) -> None:
        self.clock = clock
        self.limit = limit
        self._subscribers: set[Subscription] = set()
        self._seq = itertools.count(1)

    @property
    def watched(self) -> bool:
        """Someone subscribes (publishers may skip building an event otherwise)."""
        return bool(self._subscribers)

    @property
    def watchers(self) -> int:
        return len(self._subscribers)

    def event(self, kind: str, **fields: Any) -> Event:
        return Event(next(self._seq), self.clock(), kind, **fields)

    def publish(self, kind: str, **fields: Any) -> None:
        """Hand an event to every subscriber (never blocks; nothing when nobody watches)."""
        if not self._subscribers:
            return
        event = self.event(kind, **fields)
        for subscriber in list(self._subscribers):
            subscriber.offer(event)

    def subscribe(
        self, *, principals: Collection[str] | None = None, limit: int | None = None
    ) -> Subscription:
        """A new subscriber, to the events of ``principals`` (None: all, the admin's view)
        from now on; close it (or use it as an ``async with``) when done."""
        subscription = Subscription(self, limit or self.limit, principals)
        self._subscribers.add(subscription)
        return subscription

    def close(self) -> None:
        """The kernel stops: every subscriber's iterator ends."""
        for subscriber in list(self._subscribers):
            subscriber.close()
