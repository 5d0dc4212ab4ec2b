"""The KV manager of one embedded core: the engine's slots and the sequences in them.

A slot is *running* (bound to a request), *cached* (idle, holding the KV of an agent's finished
call, kept for its next call or for anyone sharing its prefix) or *empty*. Three kinds of saved
context have three names here:

- a *stashed* context is an idle agent's KV saved out of the cache into the snapshot store
  when its cached slot is evicted (by agent, least recently used first; restored, "unstashed",
  for the agent's next call);
- a *snapshot* is a pre-empted request's KV saved under its id (``LLMRequest.snapshot``),
  restored when it is re-admitted;
- the engine keeps the sampler of a saved context under the same key (its *parked samplers*).

The verbs, in the spirit of nano-vllm's block manager: ``capacity`` (what can be allocated),
``allocate`` (a fresh request: KV reuse and placement), ``restore`` (a pre-empted request from
its snapshot), ``preempt`` (take a snapshot), ``free`` (a request leaves its slot, its KV
cached or cleared), and ``forget`` / ``invalidate`` / ``reset`` for exits, failed steps and
crashes. Each verb records the KV operations it implies (saves, releases, drops, restores,
copies, trims) in the step plan being built, or, between steps, in the pending plan that the
core takes at the start of its next step. KV accounting is derived from the sequences: the
cells reserved by running requests and the cells held by cached slots.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol

from aios.config import CoreConfig
from aios.llm.engine import KVCopy, SeqRestore, SeqSave, StepPlan
from aios.scheduler import Capacity
from aios.syscall import LLMRequest, Status

MIN_REUSE = 4  # shorter common prefixes are not worth a KV operation
# A request whose prompt shares at least this many more tokens with a prompt still being
# prefilled waits for that prefill and copies it (agents that start together share their
# system prompt's prefill instead of each computing it).
MIN_DEFER = 32
MIN_STASH = 64  # shorter idle contexts are dropped rather than stashed


@dataclass(frozen=True)
class CachedSeq:
    """Idle KV left by ``agent``'s last call: ``tokens`` at positions 0..len-1."""

    agent: str
    tokens: list[int]


@dataclass(frozen=True)
class StashedSeq(CachedSeq):
    """An idle context saved out of the cache into the snapshot store under ``key``."""

    key: str


class StashCounts(Protocol):
    """Where the KV manager counts stashes (the core's ``CoreStats``)."""

    parked: int  # idle contexts stashed out of the KV cache
    unparked: int  # ... and restored for their agent's next call


@dataclass(frozen=True)
class KVUsage:
    """A core's sequences and KV cells now (for metrics and ``aios top``)."""

    running: int
    cached: int  # idle KV kept in a slot for its agent's next call
    parked: int  # idle contexts stashed out of the KV cache
    preempted: int  # waiting requests whose context is saved
    cells_used: int  # cells holding KV: running sequences' positions plus cached slots'
    cells_reserved: int  # cells running requests may grow into (prompt plus max tokens each)
    cells_total: int


@dataclass(frozen=True)
class _Source:
    """The best KV prefix found for a fresh request: ``n`` tokens of slot ``slot`` (cached or
    running), or of the agent's stashed context ``stashed``; neither when ``n`` is 0."""

    slot: int | None = None
    n: int = 0
    stashed: StashedSeq | None = None


class KVCache:
    """The slots of one engine and the sequences in them (see the module docstring)."""

    def __init__(self, config: CoreConfig, counts: StashCounts) -> None:
        self.config = config
        self._counts = counts
        self._running: dict[int, LLMRequest] = {}  # slot -> request, in admission order
        self._cached: dict[int, CachedSeq] = {}  # idle slots with KV, least recently used first
        # Empty slots, oldest freed first (so a restored context usually lands elsewhere).
        self._empty: deque[int] = deque(range(config.kv_sequences))
        self._stashed: OrderedDict[str, StashedSeq] = OrderedDict()  # by agent, LRU first
        self._stash_keys = itertools.count(1)
        self._pending = StepPlan()  # KV operations decided between steps, run in the next one
        self._step = StepPlan()  # the plan being built (from take_pending on)
        # Cached slots a copy of this step reads and that were evicted: cleared by a trim
        # after the copies, so empty only once this step has run (take_pending).
        self._cooling: list[int] = []

    # -- state -----------------------------------------------------------------------------
    @property
    def running(self) -> list[LLMRequest]:
        """Requests bound to a slot, in admission order."""
        return list(self._running.values())

    @property
    def cached(self) -> Mapping[int, CachedSeq]:
        """Cached slots and their idle KV, least recently used first (read-only)."""
        return MappingProxyType(self._cached)

    @property
    def stashed(self) -> Mapping[str, StashedSeq]:
        """Stashed idle contexts by agent, least recently used first (read-only)."""
        return MappingProxyType(self._stashed)

    @property
    def empty(self) -> list[int]:
        """Empty slots, the one to be taken first first."""
        return list(self._empty)

    @property
    def clearing(self) -> list[int]:
        """Slots the planned step clears after its copies (a copy reads them first): empty
        from the next step on."""
        return list(self._cooling)

    @property
    def reserved_cells(self) -> int:
        """KV cells reserved by running requests (each its prompt plus its max tokens)."""
        return sum(r.kv_need for r in self._running.values())

    @property
    def cached_cells(self) -> int:
        """KV cells held by cached slots."""
        return sum(len(c.tokens) for c in self._cached.values())

    def usage(self, preempted: int) -> KVUsage:
        return KVUsage(
            running=len(self._running),
            cached=len(self._cached),
            parked=len(self._stashed),
            preempted=preempted,
            cells_used=sum(r.kv_len for r in self._running.values()) + self.cached_cells,
            cells_reserved=self.reserved_cells,
            cells_total=self.config.kv_cells,
        )

    def request_at(self, slot: int) -> LLMRequest | None:
        """The request running in ``slot``, if any."""
        return self._running.get(slot)

    def is_running(self, request: LLMRequest) -> bool:
        """Whether ``request``'s slot is bound (it can be pre-empted)."""
        return request.slot is not None and request.slot in self._running

    def capacity(self) -> Capacity:
        """What can be allocated now: slots for ``config.slots`` running requests at most (an
        empty or cached slot each) and the KV cells not reserved by running requests."""
        usable = len(self._empty) + sum(1 for s in self._cached if not _read(s, self._step))
        free = min(self.config.slots - len(self._running), usable)
        return Capacity(free, self.config.kv_cells - self.reserved_cells)

    def take_pending(self) -> StepPlan:
        """The KV operations decided since the last step: the start of the next step's plan
        (the one the verbs are given until the next call). The slots the last step cleared
        after its copies are empty now."""
        self._empty.extend(self._cooling)
        self._cooling.clear()
        self._step, self._pending = self._pending, StepPlan()
        return self._step

    # -- admission -------------------------------------------------------------------------
    def allocate(self, request: LLMRequest, plan: StepPlan, sources: Sequence[LLMRequest]) -> int:
        """Bind a fresh ``request`` to a slot, reusing the longest KV prefix it can find among
        cached slots, ``sources`` (running requests whose KV is complete before this step's
        operations) and its agent's stashed context; sets its prefill progress. Returns the
        slot."""
        self._make_room(request, plan)
        slot = self._place(request, plan, sources)
        self._bind(request, slot)
        return slot

    def restore(self, request: LLMRequest, plan: StepPlan) -> int:
        """Bind a pre-empted ``request`` to an empty slot and restore its snapshot there.
        Returns the slot."""
        assert request.snapshot is not None
        self._make_room(request, plan)
        slot = self._empty_slot(plan, keep=None)
        plan.restores.append(SeqRestore(slot, request.snapshot))
        request.snapshot = None
        self._bind(request, slot)
        return slot

    def copy_deferred(self, plan: StepPlan) -> list[LLMRequest]:
        """Requests waiting for another's prefill copy it once it is in the KV cache (as of
        the last step: copies run before this step's batch). Returns those that copied."""
        copied = []
        for request in self._running.values():
            src = request.defer_on
            if src is None:
                continue
            if src.status is Status.RUNNING and src.slot is not None:
                if src.kv_len < request.defer_n:
                    continue  # not there yet
                assert request.slot is not None
                plan.copies.append(KVCopy(src.slot, request.slot, request.defer_n))
                request.n_prefilled = request.kv_len = request.reused_tokens = request.defer_n
                copied.append(request)
            request.defer_on = None  # copied, or the source is gone: prefill alone
        return copied

    def _bind(self, request: LLMRequest, slot: int) -> None:
        request.slot = slot
        self._running[slot] = request

    def _make_room(self, request: LLMRequest, plan: StepPlan) -> None:
        """Evict cached slots until running reservations, cached KV and ``request`` fit."""
        limit = self.config.kv_cells - self.reserved_cells - request.kv_need
        while self.cached_cells > limit:
            self._evict(self._eviction_victim(request.agent), plan)

    def _eviction_victim(self, agent: str) -> int:
        """Least recently used cached slot, the requesting agent's own last."""
        return next(
            (s for s, c in self._cached.items() if c.agent != agent), next(iter(self._cached))
        )

    def _place(self, request: LLMRequest, plan: StepPlan, sources: Sequence[LLMRequest]) -> int:
        """Pick the slot for a fresh request and the KV prefix it starts with."""
        source = self._best_source(request, sources) if self.config.kv_reuse else _Source()
        request.n_prefilled = request.kv_len = request.reused_tokens = source.n
        if source.stashed is not None:
            return self._unstash(source.stashed, source.n, plan)
        if self.config.kv_reuse and self._defer(request, source.n):
            return self._empty_slot(plan, keep=None)
        cached = self._cached.get(source.slot) if source.slot is not None else None
        if (
            source.slot is not None
            and cached is not None
            and (cached.agent == request.agent or not self._empty)
        ):
            # Take the cached slot over: keep its first n positions, drop the rest.
            del self._cached[source.slot]
            plan.trims.append((source.slot, source.n))
            return source.slot
        slot = self._empty_slot(plan, keep=source.slot)
        if source.slot is not None and source.n:
            plan.copies.append(KVCopy(source.slot, slot, source.n))
        return slot

    def _best_source(self, request: LLMRequest, sources: Sequence[LLMRequest]) -> _Source:
        """The longest common prefix with ``request``'s prompt held by a cached slot, a running
        source (ties go to the request's own agent) or the agent's stashed context."""
        prompt = request.prompt_tokens
        src, n = None, 0
        candidates = [(s, c.tokens, c.agent) for s, c in self._cached.items()]
        candidates += [
            (r.slot, [*r.prompt_tokens, *r.output_tokens][: r.kv_len], r.agent)
            for r in sources
            if r.slot is not None and r.status is Status.RUNNING and r.kv_len
        ]
        for slot, tokens, agent in candidates:
            common = _common_prefix(tokens, prompt)
            if common > n or (common == n and common and agent == request.agent):
                src, n = slot, common
        stashed = self._stashed.get(request.agent)
        unstash = stashed is not None and _common_prefix(stashed.tokens, prompt) > n
        if unstash:
            assert stashed is not None
            src, n = None, _common_prefix(stashed.tokens, prompt)
        n = min(n, len(prompt) - 1)  # the last prompt token must be decoded for logits
        if n < MIN_REUSE:
            return _Source()
        return _Source(src, n, stashed if unstash else None)

    def _unstash(self, stashed: StashedSeq, n: int, plan: StepPlan) -> int:
        """Bring the agent's stashed KV back into an empty slot and keep its first n
        positions."""
        del self._stashed[stashed.agent]
        slot = self._empty_slot(plan, keep=None)
        plan.restores.append(SeqRestore(slot, stashed.key))
        plan.trims.append((slot, n))
        self._counts.unparked += 1
        return slot

    def _defer(self, request: LLMRequest, n: int) -> bool:
        """Make ``request`` wait for a running prefill that shares at least ``MIN_DEFER`` more
        tokens with its prompt than the ``n`` reusable now (it copies them later)."""
        prompt = request.prompt_tokens
        best = max(
            self._running.values(),
            key=lambda r: _common_prefix(r.prompt_tokens, prompt),
            default=None,
        )
        if best is None:
            return False
        m = min(_common_prefix(best.prompt_tokens, prompt), len(prompt) - 1)
        if m < n + MIN_DEFER:
            return False
        request.n_prefilled = request.kv_len = request.reused_tokens = 0
        request.defer_on, request.defer_n = best, m
        return True

    def _empty_slot(self, plan: StepPlan, keep: int | None) -> int:
        """An empty slot, evicting the least recently used cached one (never ``keep``, nor
        one a copy of this step reads: that one is not empty before the step has run)."""
        if not self._empty:
            victim = next(s for s in self._cached if s != keep and not _read(s, plan))
            self._evict(victim, plan)
        return self._empty.popleft()

    # -- leaving a slot --------------------------------------------------------------------
    def preempt(self, request: LLMRequest, plan: StepPlan) -> None:
        """Take running ``request`` off its slot, saving its KV as a snapshot under its id (or,
        with nothing computed yet, clearing the slot so that it starts afresh)."""
        slot = self._unbind(request)
        self._empty.append(slot)
        request.defer_on = None
        if request.kv_len:
            plan.saves.append(SeqSave(slot, request.id))
            request.snapshot = request.id
        else:
            plan.releases.append(slot)
            request.n_prefilled = 0

    def free(self, request: LLMRequest, *, reusable: bool = False) -> None:
        """Take running ``request`` off its slot. A ``reusable`` one (it finished) leaves its
        KV cached for its agent's next call when KV reuse is on; otherwise the slot is cleared
        in the next step, and free for the very next admission (the release runs first)."""
        slot = self._unbind(request)
        if reusable and self.config.kv_reuse and request.kv_len:
            tokens = [*request.prompt_tokens, *request.output_tokens][: request.kv_len]
            self._cached[slot] = CachedSeq(request.agent, tokens)
            # In a unified pool idle cells cost every decode step attention work: keep few.
            while self.config.kv_unified and self.cached_cells > self.config.cache_tokens:
                self._evict(next(iter(self._cached)))
        else:
            self._empty.append(slot)
            self._pending.releases.append(slot)

    def drop_snapshot(self, request: LLMRequest) -> None:
        """Discard a queued request's snapshot, if it has one (in the next step)."""
        if request.snapshot is not None:
            self._pending.drops.append(request.snapshot)
            request.snapshot = None

    def abandon(self) -> None:
        """Unbind every running request without planning anything: the core is closing or
        dead, and no step follows."""
        self._empty.extend([*self._running, *self._cooling])
        self._running.clear()
        self._cooling.clear()

    def _unbind(self, request: LLMRequest) -> int:
        """Remove ``request`` from its slot's binding; returns the slot."""
        slot = request.slot
        assert slot is not None
        del self._running[slot]
        return slot

    # -- eviction --------------------------------------------------------------------------
    def forget(self, agent: str) -> None:
        """``agent`` exited: clear its cached slots and drop its stashed context."""
        for slot in [s for s, c in self._cached.items() if c.agent == agent]:
            self._evict(slot, stash=False)
        stashed = self._stashed.pop(agent, None)
        if stashed is not None:
            self._pending.drops.append(stashed.key)

    def invalidate(self, saved: set[str]) -> None:
        """A step failed and may have left copies or trims half done: cached KV is suspect, and
        the contexts it was saving (keys ``saved``) may not have reached the store."""
        self._clear_cached()
        for agent in [a for a, s in self._stashed.items() if s.key in saved]:
            del self._stashed[agent]
        for slot in self._cooling:  # its trim may not have run: clear it in the next step
            self._empty.append(slot)
            self._pending.releases.append(slot)
        self._cooling.clear()

    def reset(self) -> None:
        """The engine died: its KV went with it. Cached slots are cleared and stashed contexts
        forgotten; of the operations pending, only the drops remain (plus a drop of every
        stashed context), so that a store shared with the core forgets what the dead engine
        saved."""
        self._clear_cached()
        drops = [*self._pending.drops, *(s.key for s in self._stashed.values())]
        self._stashed.clear()
        self._pending = StepPlan(drops=drops)
        self._empty.extend(self._cooling)
        self._cooling.clear()

    def _clear_cached(self) -> None:
        for slot in list(self._cached):
            self._evict(slot, stash=False)

    def _evict(self, slot: int, plan: StepPlan | None = None, *, stash: bool = True) -> None:
        """Free a cached slot (in ``plan``, else in the next step). Its KV is stashed (saved
        into the snapshot store, restored on the agent's next call at ~1% of the cost of a
        prefill) unless ``stash`` is false or it is too short to be worth it."""
        cached = self._cached.pop(slot)
        target = plan if plan is not None else self._pending
        if plan is not None and _read(slot, plan):
            # A copy in this very step reads this slot: clear it after the copies (a trim),
            # not before them (saves and releases run first), and hand it out only after.
            plan.trims.append((slot, 0))
            self._cooling.append(slot)
            return
        self._empty.append(slot)
        if not (stash and len(cached.tokens) >= MIN_STASH and self.config.max_parked):
            target.releases.append(slot)
            return
        self._stash(slot, cached, target)

    def _stash(self, slot: int, cached: CachedSeq, plan: StepPlan) -> None:
        """Save ``cached`` (leaving ``slot``) as its agent's stashed context, replacing any
        older one and dropping the least recently used beyond ``config.max_parked``."""
        key = f"stash-{next(self._stash_keys)}"
        plan.saves.append(SeqSave(slot, key))
        old = self._stashed.pop(cached.agent, None)
        self._stashed[cached.agent] = StashedSeq(cached.agent, cached.tokens, key)
        if old is not None:
            plan.drops.append(old.key)
        while len(self._stashed) > self.config.max_parked:
            plan.drops.append(self._stashed.popitem(last=False)[1].key)
        self._counts.parked += 1


def _read(slot: int, plan: StepPlan) -> bool:
    """A copy of ``plan`` reads ``slot`` (so it is cleared only after the copies)."""
    return any(copy.src == slot for copy in plan.copies)


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix (binary search over C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
