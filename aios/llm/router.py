"""A router: one model name served by several cores (embedded or remote), with the core surface.

This is how a deployment outgrows one engine: agents call one model name, the router spreads
their calls over the cores that serve it.

- Least loaded: a call goes to the core with the lowest (queued + active) / capacity, where
  capacity is its slots (embedded) or its in-flight bound (remote); ties go to the core fewer
  agents are pinned to, then to config order.
- Session affinity: an agent stays on the core it used last, which holds its KV cache (its
  conversation so far, on an embedded core or in a server's prefix cache), unless that core's
  load exceeds the lightest one's by more than ``affinity_slack`` or it is down.
- Failover: a call whose core fails (``CoreError``: the server is unreachable, the core's loop
  died, a step failed; or ``Overloaded``) is resubmitted to another core it has not failed on,
  from the start (a partial answer from another server is not continued). A core that is
  unreachable, or refuses calls because it died, is skipped for ``down_seconds``, then tried
  again by real traffic. The caller's request resolves exactly once; its future only ever sees
  the final outcome. Other errors (invalid request, shutdown) are the call's own and propagate.

The router owns no engine and runs no loop: it acts when a call is submitted and when a
member's request ends (a future callback). It does not own its members either: whoever built
them (the kernel) starts, runs and closes them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aios.config import RouterConfig
from aios.errors import (
    AIOSError,
    ConfigError,
    CoreError,
    CoreUnavailable,
    EngineCrashed,
    KernelShutdown,
    Overloaded,
)
from aios.llm.base import Core, capacity_of
from aios.syscall import Completion, LLMCall, LLMRequest, Status

log = logging.getLogger(__name__)


@dataclass
class RouterStats:
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    failovers: int = 0  # calls resubmitted after their core failed them
    routed: Counter[str] = field(default_factory=Counter)  # placements per member core


class RoutedRequest(LLMRequest):
    """The caller's side of a routed call. ``inner`` is the request on the member core that
    runs it now; while the call is unfinished, its status and text are the inner one's."""

    def __init__(
        self, agent: str, now: float, call: LLMCall, *, priority: int = 0, kind: str = ""
    ) -> None:
        self.inner: LLMRequest | None = None
        self.tried: list[str] = []  # member cores that failed or refused it
        self._status = Status.QUEUED
        self._text = ""
        super().__init__(agent, now, call, [], 0, priority=priority)
        self.program = kind

    @property  # the base class stores it; here it is derived from the inner request
    def status(self) -> Status:
        inner = self.inner
        if self._status.finished or inner is None:
            return self._status
        # Its inner request ended but the callback that resolves this one has not run yet.
        return Status.RUNNING if inner.status.finished else inner.status

    @status.setter
    def status(self, value: Status) -> None:
        self._status = value

    @property
    def text(self) -> str:
        inner = self.inner
        return self._text if inner is None or self._status.finished else inner.text

    @text.setter
    def text(self, value: str) -> None:
        self._text = value

    def watch(self) -> asyncio.Event:
        event = super().watch()
        if self.inner is not None:
            self.inner.changed = event
        return event

    @property
    def member(self) -> Core | None:
        """The member core running ``inner`` (``core`` is the router that accepted the call)."""
        return None if self.inner is None else self.inner.core

    @property
    def own_status(self) -> Status:
        """The router's record: QUEUED until the call ends, then how it ended."""
        return self._status


class Router:
    """Routes LLM syscalls for one model name over several cores (see the module docstring)."""

    def __init__(
        self,
        config: RouterConfig,
        cores: Sequence[Core],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if [c.name for c in cores] != list(config.cores):
            raise ConfigError(
                f"router {config.name!r} expects cores {list(config.cores)}, "
                f"got {[c.name for c in cores]}"
            )
        self.config = config
        self.name = config.name
        self.cores = list(cores)
        self.stats = RouterStats()
        self._clock = clock
        self._affinity: dict[str, str] = {}  # agent -> the member core it used last
        self._pins: Counter[str] = Counter()  # member core -> agents whose affinity it is
        self._down_until: dict[str, float] = {}
        self._live: set[RoutedRequest] = set()
        self._closed = False
        self._stopped = asyncio.Event()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Nothing to acquire: the members are started by their owner."""

    async def run(self) -> None:
        """A router has no loop (it acts in submit and in its members' callbacks); this
        returns when the router closes."""
        await self._stopped.wait()

    async def close(self) -> None:
        """Fail the calls still routed with KernelShutdown and withdraw them from the
        members (which stay open: their owner closes them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        error = KernelShutdown("the kernel shut down before the call finished")
        for request in list(self._live):
            self._withdraw(request)
            self._end(request, error)
        self._stopped.set()

    # -- syscall entry ---------------------------------------------------------------------
    def submit(
        self, agent: str, call: LLMCall, *, priority: int = 0, kind: str = ""
    ) -> RoutedRequest:
        """Place the call on a member core; raise a typed error if none can take it."""
        if self._closed:
            raise KernelShutdown("the kernel is shutting down")
        request = RoutedRequest(agent, self._clock(), call, priority=priority, kind=kind)
        request.core = self
        self._place(request)
        self._live.add(request)
        return request

    def cancel(self, request: LLMRequest) -> None:
        """Withdraw a routed call from the core running it. Idempotent."""
        assert isinstance(request, RoutedRequest), "not a request of a router"
        if request.own_status.finished:
            return
        self._withdraw(request)
        request.cancel(self._clock())
        self.stats.cancelled += 1
        self._live.discard(request)

    def forget(self, agent: str) -> None:
        """``agent`` exited: drop its affinity, and tell the members."""
        home = self._affinity.pop(agent, None)
        if home is not None:
            self._pins[home] -= 1
        for core in self.cores:
            core.forget(agent)

    # -- placement -------------------------------------------------------------------------
    def load(self, core: Core) -> float:
        """Requests queued and running on ``core``, per unit of its capacity."""
        return (core.queued + core.active) / capacity_of(core)

    def home_of(self, agent: str) -> str | None:
        """The member core ``agent`` used last (where its KV is)."""
        return self._affinity.get(agent)

    def _candidates(self, request: RoutedRequest) -> list[Core]:
        """Member cores to try, best first."""
        now = self._clock()
        pool = [c for c in self.cores if c.name not in request.tried]
        up = [c for c in pool if self._down_until.get(c.name, 0.0) <= now] or pool
        if not up:
            return []
        loads = {c.name: self.load(c) for c in up}
        order = sorted(up, key=lambda c: (loads[c.name], self._pins[c.name]))
        home = next((c for c in up if c.name == self._affinity.get(request.agent)), None)
        if home is not None and loads[home.name] - loads[order[0].name] <= (
            self.config.affinity_slack
        ):
            order.remove(home)
            order.insert(0, home)
        return order

    def _place(self, request: RoutedRequest) -> None:
        """Submit the call to the best member core that takes it, or raise."""
        refusals: list[AIOSError] = []
        for core in self._candidates(request):
            try:
                inner = core.submit(
                    request.agent, request.call, priority=request.priority, kind=request.program
                )
            except (CoreError, Overloaded) as e:  # that core cannot take it now: next one
                if isinstance(e, CoreError):  # a dead core refuses every call: skip it a while
                    self._mark_down(core)
                request.tried.append(core.name)
                refusals.append(e)
                continue
            request.inner = inner  # its member core set ``inner.core``
            inner.changed = request.changed  # a streamed call hears its inner call's tokens
            request.prompt_tokens, request.max_tokens = inner.prompt_tokens, inner.max_tokens
            self._pin(request.agent, core.name)
            self.stats.routed[core.name] += 1
            inner.future.add_done_callback(functools.partial(self._inner_done, request, inner))
            return
        reasons = "; ".join(str(e) for e in refusals) or f"every core failed it ({request.tried})"
        message = f"router {self.name!r}: no core can take the call: {reasons}"
        if refusals and all(isinstance(e, Overloaded) for e in refusals):
            raise Overloaded(message)
        raise CoreUnavailable(message)

    def _pin(self, agent: str, core: str) -> None:
        old = self._affinity.get(agent)
        if old != core:
            if old is not None:
                self._pins[old] -= 1
            self._affinity[agent] = core
            self._pins[core] += 1

    def _mark_down(self, core: Core) -> None:
        self._down_until[core.name] = self._clock() + self.config.down_seconds

    # -- endings ---------------------------------------------------------------------------
    def _inner_done(
        self, request: RoutedRequest, inner: LLMRequest, future: asyncio.Future[Any]
    ) -> None:
        """A member's request ended: resolve the caller's, or resubmit it elsewhere."""
        error = None if future.cancelled() else future.exception()  # also marks it retrieved
        if request.inner is not inner or request.own_status.finished:
            return  # withdrawn (cancel, close) before it ended
        core = inner.core
        assert core is not None
        if future.cancelled():  # withdrawn on the member directly: the call is off
            request.inner = None
            request.cancel(self._clock())
            self.stats.cancelled += 1
            self._live.discard(request)
            return
        if error is None:
            self._down_until.pop(core.name, None)
            completion: Completion = future.result()
            request.output_tokens = inner.output_tokens
            request.finish_reason = inner.finish_reason
            request.timings.admitted = inner.timings.admitted
            request.timings.first_token = inner.timings.first_token
            request.inner = None
            request.text = inner.text
            self.stats.completed += 1
            self._live.discard(request)
            request.complete(
                self._clock(),
                dataclasses.replace(completion, syscall_id=request.id, timings=request.timings),
            )
            return
        # A call that crashed its engine would crash the next one too: it is not moved.
        moves = isinstance(error, (CoreError, Overloaded)) and not isinstance(error, EngineCrashed)
        if moves and not self._closed:
            if isinstance(error, CoreUnavailable):
                self._mark_down(core)
            request.tried.append(core.name)
            log.warning(
                "router %r: %s failed on core %r (%s); resubmitting",
                self.name,
                request.id,
                core.name,
                error,
            )
            try:
                self._place(request)
            except (CoreError, Overloaded) as e:
                error = CoreUnavailable(f"{error}; no other core took the call over: {e}")
            except AIOSError as e:  # e.g. the members are shutting down
                error = e
            else:
                self.stats.failovers += 1
                return
        request.inner = None
        self._end(request, error if isinstance(error, AIOSError) else CoreError(str(error)))

    def _withdraw(self, request: RoutedRequest) -> None:
        inner = request.inner
        request.inner = None  # its callback is stale from now on
        if inner is not None and inner.core is not None:
            inner.core.cancel(inner)

    def _end(self, request: RoutedRequest, error: AIOSError) -> None:
        self.stats.failed += 1
        self._live.discard(request)
        request.fail(self._clock(), error)

    # -- introspection -------------------------------------------------------------------------
    @property
    def live(self) -> list[RoutedRequest]:
        """The calls routed and not finished yet (``request.member`` says where each runs)."""
        return list(self._live)

    @property
    def queued(self) -> int:
        return sum(1 for r in self._live if r.status is Status.QUEUED)

    @property
    def active(self) -> int:
        return sum(1 for r in self._live if r.status is Status.RUNNING)
