"""Per-agent quotas: a token budget over a sliding minute and a cap on calls in flight.

    quotas = Quotas(Quota(tokens_per_minute=10_000, max_parallel=2), clock=kernel_clock)
    async with quotas.admit(agent_id):  # may raise QuotaExceeded, or wait for a free place
        completion = ...
    quotas.charge(agent_id, completion.usage.total_tokens)

An agent may have its own :class:`Quota` (``admit(agent_id, quota)``: the access policy gives
groups theirs); the one given to ``Quotas`` applies to the others.

The token budget is checked on admission and charged when a call finishes, so an agent can
overshoot its budget by what its calls in flight use; ``max_parallel`` bounds that.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aios.errors import ConfigError, QuotaExceeded

WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class Quota:
    """Limits that apply to each agent on its own; ``None`` means no limit."""

    tokens_per_minute: int | None = None  # prompt + completion tokens in any 60 s window
    max_parallel: int | None = None  # calls in flight at once; more wait their turn

    def __post_init__(self) -> None:
        for name in ("tokens_per_minute", "max_parallel"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"quota {name} must be a positive integer or None, got {value!r}")

    @property
    def unlimited(self) -> bool:
        return self.tokens_per_minute is None and self.max_parallel is None

    @staticmethod
    def most_generous(quotas: Iterable[Quota]) -> Quota:
        """Each limit at its most generous among ``quotas`` (no limit beats any limit)."""
        quotas = list(quotas)

        def loosest(values: list[int | None]) -> int | None:
            return None if not values or None in values else max(v for v in values if v)

        return Quota(
            loosest([q.tokens_per_minute for q in quotas]),
            loosest([q.max_parallel for q in quotas]),
        )


@dataclass
class _Agent:
    """One agent's quota state. Dropped when it is idle and its window is empty."""

    quota: Quota
    touched: float  # last admission, release or charge: no charge in the window is later
    slots: asyncio.Semaphore | None = field(init=False)  # max_parallel places (None: no limit)
    window: deque[tuple[float, int]] = field(default_factory=deque)  # (when, tokens), oldest first
    used: int = 0  # tokens in the window
    in_flight: int = 0
    waiting: int = 0

    def __post_init__(self) -> None:
        self.hold_to(self.quota)

    def hold_to(self, quota: Quota) -> None:
        """Apply ``quota``: its parallel places are a fresh semaphore."""
        places = quota.max_parallel
        self.quota, self.slots = quota, None if places is None else asyncio.Semaphore(places)

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and self.waiting == 0


class Quotas:
    """The quota state of every agent: each under its own :class:`Quota` or the default one."""

    def __init__(
        self, quota: Quota | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.quota = quota or Quota()
        self._clock = clock
        # Least recently touched first, so idle agents are found (and dropped) in O(1) each.
        self._agents: OrderedDict[str, _Agent] = OrderedDict()
        self.rejections = 0  # calls refused with QuotaExceeded (a full token window)

    @asynccontextmanager
    async def admit(self, agent_id: str, quota: Quota | None = None) -> AsyncIterator[None]:
        """Hold one of the agent's places for the body. Raises :class:`QuotaExceeded` when its
        token window is full; waits while it has ``max_parallel`` calls in flight. ``quota``:
        the agent's own (default: the one all agents share)."""
        quota = quota or self.quota
        if quota.unlimited:
            yield
            return
        agent = self._touch(agent_id, self._clock(), quota)
        agent.waiting += 1  # keeps the state alive while it waits
        try:
            self._check(agent_id, agent)
            if agent.slots is not None:
                await agent.slots.acquire()  # cancellation-safe: nothing is taken then
                try:
                    self._check(agent_id, agent)  # the window may have filled while it waited
                except QuotaExceeded:
                    agent.slots.release()
                    raise
            agent.in_flight += 1
        finally:
            agent.waiting -= 1
        try:
            yield
        finally:
            # Synchronous on purpose: a cancellation cannot interrupt the release.
            agent.in_flight -= 1
            if agent.slots is not None:
                agent.slots.release()
            self._touch(agent_id, self._clock(), quota)
            if agent.idle and not agent.window and self._agents.get(agent_id) is agent:
                del self._agents[agent_id]  # nothing left to remember

    def charge(
        self, agent_id: str, tokens: int, quota: Quota | None = None, *, at: float | None = None
    ) -> None:
        """Count ``tokens`` (prompt + completion) against the agent's window, now (or ``at``,
        no later than now and after the agent's other charges: a resumed agent's past)."""
        if tokens < 0:
            raise ValueError(f"cannot charge a negative number of tokens ({tokens})")
        quota = quota or self.quota
        if quota.tokens_per_minute is None or tokens == 0:
            return
        now = self._clock()
        agent = self._touch(agent_id, now, quota)
        when = now if at is None else min(at, now)
        if agent.window and when < agent.window[-1][0]:
            when = agent.window[-1][0]  # the window stays in time order
        agent.window.append((when, tokens))
        agent.used += tokens

    def used(self, agent_id: str) -> int:
        """Tokens the agent was charged in the last 60 seconds."""
        agent = self._agents.get(agent_id)
        if agent is None:
            return 0
        self._expire(agent, self._clock())
        return agent.used

    def in_flight(self, agent_id: str) -> int:
        agent = self._agents.get(agent_id)
        return 0 if agent is None else agent.in_flight

    def waiting(self, agent_id: str) -> int:
        """The agent's calls waiting for a ``max_parallel`` place (not yet on any core)."""
        agent = self._agents.get(agent_id)
        return 0 if agent is None else agent.waiting

    def __len__(self) -> int:
        """Agents with quota state held (for memory checks)."""
        return len(self._agents)

    # -- internals -------------------------------------------------------------------------
    def _check(self, agent_id: str, agent: _Agent) -> None:
        limit = agent.quota.tokens_per_minute
        if limit is None:
            return
        now = self._clock()
        self._expire(agent, now)
        if agent.used < limit:
            return
        retry = self._room_at(agent, limit) - now
        self.rejections += 1
        raise QuotaExceeded(
            f"agent {agent_id!r} used {agent.used} tokens in the last {WINDOW_SECONDS:g} s, "
            f"at or over its limit of {limit} tokens per minute; retry in {retry:.1f} s",
            retry_after=retry,
        )

    @staticmethod
    def _room_at(agent: _Agent, limit: int) -> float:
        """When the window is below ``limit`` again: once enough of its oldest charges expire."""
        left = agent.used
        for when, tokens in agent.window:
            left -= tokens
            if left < limit:
                return when + WINDOW_SECONDS
        raise AssertionError("the window holds every token it counts")

    @staticmethod
    def _expire(agent: _Agent, now: float) -> None:
        horizon = now - WINDOW_SECONDS
        while agent.window and agent.window[0][0] <= horizon:
            agent.used -= agent.window.popleft()[1]

    def _touch(self, agent_id: str, now: float, quota: Quota) -> _Agent:
        """The agent's state (created if needed, under ``quota``), marked as touched now; drops
        idle agents whose every charge has left the window, so memory stays bounded by active
        agents. A changed quota takes over once the agent has nothing in flight or waiting."""
        horizon = now - WINDOW_SECONDS
        while self._agents:
            oldest_id, oldest = next(iter(self._agents.items()))
            if oldest.touched > horizon:
                break
            if oldest.idle:  # untouched for a whole window: its window is empty
                del self._agents[oldest_id]
            else:  # a call in flight (or waiting) for over a minute: still active
                oldest.touched = now
                self._agents.move_to_end(oldest_id)
        agent = self._agents.get(agent_id)
        if agent is not None and agent.quota != quota and agent.idle:
            agent.hold_to(quota)
        if agent is None:
            agent = _Agent(quota, now)
            self._agents[agent_id] = agent
        else:
            agent.touched = now
            self._agents.move_to_end(agent_id)
        return agent
