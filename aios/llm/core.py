"""An LLM core: one engine, its queue, its scheduling policy and its single decode loop.

The loop is nano-vllm's three calls: ``_schedule()`` builds a step plan (pre-emptions and
admissions chosen by the policy, KV reuse, decode tokens of running sequences, chunks of prompts
being prefilled), ``engine.step(plan)`` runs it on the core's own thread, ``_postprocess()``
applies the sampled tokens. All request state lives on the event loop; the thread only touches
the model and the snapshot store. When there is nothing to do the loop waits on an event: it
never polls.

Slots. The engine has ``slots`` sequences. A slot is *running* (bound to a request), *cached*
(idle, holding the KV of a finished call, kept for the next call of its agent or for anyone
sharing its prefix) or *empty*. A new request takes the slot whose KV shares the longest prefix
with its prompt (its agent's own last conversation), or gets that prefix copied into a fresh
slot (a shared system prompt), and prefills only the rest. Cached slots are evicted least
recently used first when a slot or KV cells are needed; an agent's slots go when it exits.

Pre-emption. A pre-empted request's KV is saved into the snapshot store (RAM, spilling to
disk) with its sampler parked; re-admitted, it is restored into any free slot and goes on
exactly where it stopped (the token sampled last is never in the KV yet, so no logits are lost).

Crashes. An engine in a process of its own (``aios.llm.isolated``) raises ``EngineCrashed`` when
that process dies mid-step: the call it was working on fails, the others that had KV in it go
back to the head of the queue to start again from scratch (once, and only if their caller has
seen nothing of the answer yet), and the core builds a fresh engine with its factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from aios.config import CoreConfig
from aios.context import SnapshotStore
from aios.errors import (
    AIOSError,
    ContextOverflow,
    CoreError,
    EngineCrashed,
    InvalidRequest,
    KernelShutdown,
    Overloaded,
)
from aios.llm.base import AgentBook
from aios.llm.engine import (
    BatchItem,
    Engine,
    KVCopy,
    Sampled,
    SeqRestore,
    SeqSave,
    SeqStart,
    StepPlan,
)
from aios.scheduler import Capacity, Policy
from aios.syscall import Completion, LLMCall, LLMRequest, Status

log = logging.getLogger(__name__)

# A prefill token costs about this many decode tokens of core time: SmolLM2 on the 2-core
# reference machine prefills ~280 tok/s and decodes ~190 tok/s batched. Used for agents' service.
PREFILL_WEIGHT = 0.7
MIN_REUSE = 4  # shorter common prefixes are not worth a KV operation
# A request whose prompt shares at least this many more tokens with a prompt still being
# prefilled waits for that prefill and copies it (agents that start together share their
# system prompt's prefill instead of each computing it).
MIN_DEFER = 32
MIN_PARK = 64  # shorter idle contexts are dropped rather than saved


@dataclass
class CoreStats:
    """Counters since the core started (read by the CLI, metrics and benchmarks)."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    busy_seconds: float = 0.0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    admissions: int = 0  # fresh admissions (restores of pre-empted requests not counted)
    prompt_tokens: int = 0  # prompt tokens of fresh admissions
    reused_tokens: int = 0  # of which found in the KV cache (prefill saved)
    prefix_hits: int = 0  # fresh admissions that reused some KV
    preemptions: int = 0
    restores: int = 0
    parked: int = 0  # idle contexts saved out of the KV cache
    unparked: int = 0  # ... and restored for their agent's next call
    crashes: int = 0  # engine processes that died mid-step (isolated engines)
    restarts: int = 0  # fresh engines started after a crash
    retried: int = 0  # calls started again from scratch after a crash

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.admissions if self.admissions else 0.0

    @property
    def prefill_saved(self) -> float:
        """Fraction of admitted prompt tokens that did not need a prefill."""
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class CachedSeq:
    """Idle KV left by ``agent``'s last call: ``tokens`` at positions 0..len-1, in a cached
    slot, or (``key`` set) parked in the snapshot store."""

    agent: str
    tokens: list[int]
    key: str = ""


class LLMCore:
    """Schedules LLM syscalls onto one engine with continuous batching."""

    def __init__(
        self,
        config: CoreConfig,
        engine_factory: Callable[[], Engine],
        policy: Policy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.name = config.name
        self.policy = policy
        self.stats = CoreStats()
        self._engine_factory = engine_factory
        self._clock = clock
        self._engine: Engine | None = None
        self._retired: list[Engine] = []  # crashed engines, closed once a fresh one took over
        # One thread owns the model: llama.cpp contexts are not thread-safe, and two
        # inference threads on a small machine fight for the same cores.
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"aios-core-{self.name}"
        )
        spill = Path(config.spill_dir) if config.spill_dir else None
        self.snapshots = SnapshotStore(config.snapshot_ram_mb * 2**20, spill)  # core thread only
        self._waiting: deque[LLMRequest] = deque()
        self._running: list[LLMRequest] = []
        self._by_slot: dict[int, LLMRequest] = {}
        # Empty slots, oldest freed first (so a restored context usually lands elsewhere).
        self._free_slots: deque[int] = deque(range(config.kv_sequences))
        self._cached: dict[int, CachedSeq] = {}  # idle slots with KV, least recently used first
        self._cached_kv = 0
        self._next = StepPlan()  # KV operations decided between steps, run in the next one
        # Idle agents' KV saved out of the cache (by agent, least recently used first).
        self._parked: OrderedDict[str, CachedSeq] = OrderedDict()
        self._park_keys = itertools.count(1)
        self._reserved_kv = 0
        self._book = AgentBook()  # per-agent ledgers and output-length predictions
        self._wake = asyncio.Event()
        self._closed = False
        self._dead: CoreError | None = None

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the engine on the core's thread."""
        loop = asyncio.get_running_loop()
        self._engine = await loop.run_in_executor(self._thread, self._engine_factory)

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise CoreError(f"core {self.name!r} is not started")
        return self._engine

    async def close(self) -> None:
        """Fail everything still queued or running, then free the engine. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(KernelShutdown("the kernel shut down before the call finished"))
        if self._engine is None:
            # Start-up was cancelled mid-load: never block the event loop waiting for it.
            self._thread.shutdown(wait=False)
            return
        # Queued behind any step (or engine restart) still running on the thread, so it never
        # races it.
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._close_engines)
        await loop.run_in_executor(self._thread, self.snapshots.close)
        self._engine = None
        self._thread.shutdown(wait=True)

    async def _replace_engine(self) -> None:
        """A fresh engine for a crashed one (a model reload, on the core's thread). If it cannot
        start, the error ends the loop and ``run`` marks the core dead."""
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._swap_engine)
        self.stats.restarts += 1
        # Closed only now: a submit tokenizing on the event loop during the reload used it.
        await loop.run_in_executor(self._thread, self._close_engines, False)

    def _swap_engine(self) -> None:
        """(Core's thread.) Build a fresh engine and put it in place of the current one."""
        fresh = self._engine_factory()
        if self._engine is not None:
            self._retired.append(self._engine)
        self._engine = fresh

    def _close_engines(self, current: bool = True) -> None:
        """(Core's thread.) Close the retired engines, and the current one if ``current``."""
        while self._retired:
            self._retired.pop().close()
        if current and self._engine is not None:
            self._engine.close()

    # -- syscall entry ---------------------------------------------------------------------
    def submit(self, agent: str, call: LLMCall, *, priority: int = 0, kind: str = "") -> LLMRequest:
        """Validate and enqueue an LLM call; raise a typed error if it can never run.
        ``kind`` (the agent's program name) keys the output-length predictor."""
        if self._closed:
            raise KernelShutdown("the kernel is shutting down")
        if self._dead is not None:
            raise self._dead
        engine = self.engine
        if len(self._waiting) >= self.config.max_queue:
            raise Overloaded(
                f"core {self.name!r} has {len(self._waiting)} calls queued; retry later"
            )
        if call.messages:
            tokens = engine.tokenize_chat(call.messages)
        else:
            assert call.prompt is not None
            tokens = engine.tokenize(call.prompt)
        if not tokens:
            raise InvalidRequest("the prompt is empty after tokenization")
        limit = engine.max_sequence_tokens
        room = limit - len(tokens)
        if room < 1:
            raise ContextOverflow(
                f"the prompt is {len(tokens)} tokens; model {self.name!r} allows {limit} per "
                "sequence (prompt + output)"
            )
        max_tokens = call.params.max_tokens
        if max_tokens is None:
            max_tokens = min(room, self.config.default_max_tokens)
        elif max_tokens > room:
            raise ContextOverflow(
                f"prompt ({len(tokens)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"{limit} tokens model {self.name!r} allows per sequence"
            )
        request = LLMRequest(agent, self._clock(), call, tokens, max_tokens, priority=priority)
        self._book.enroll(request, kind)
        self._waiting.append(request)
        self._wake.set()
        return request

    def cancel(self, request: LLMRequest) -> None:
        """Withdraw a request (caller gone or deadline passed); frees its slot. Idempotent."""
        if request.status.finished:
            return
        if request.status is Status.QUEUED:
            self._waiting.remove(request)
            self._discard_snapshot(request)
        else:
            self._unbind(request)
        request.cancel(self._clock())
        self.stats.cancelled += 1
        self._wake.set()

    def forget(self, agent: str) -> None:
        """``agent`` exited: free the KV it left cached or parked and its scheduling ledger."""
        self._book.forget(agent)
        for slot in [s for s, c in self._cached.items() if c.agent == agent]:
            self._evict(slot, park=False)
        parked = self._parked.pop(agent, None)
        if parked is not None:
            self._next.drops.append(parked.key)
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """The decode loop; runs until cancelled (kernel shutdown)."""
        try:
            await self._loop()
        except Exception as e:  # a bug in the loop itself: no caller may be left hanging
            log.exception("core %r stopped", self.name)
            self._dead = CoreError(f"core {self.name!r} stopped: {type(e).__name__}: {e}")
            self._fail_all(self._dead)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            plan = self._schedule()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            try:
                sampled = await loop.run_in_executor(
                    self._thread, self.engine.step, plan, self.snapshots
                )
            except EngineCrashed as e:  # the engine's process died: its KV went with it
                self._recover(plan, e)
                await self._replace_engine()
                continue
            except AIOSError as e:
                self._fail_plan(plan, e)
                continue
            except Exception as e:  # an engine bug must not kill the core or hang callers
                self._fail_plan(plan, CoreError(f"{type(e).__name__}: {e}"))
                continue
            finally:
                self.stats.busy_seconds += time.perf_counter() - started
            self._postprocess(plan, sampled)

    def _schedule(self) -> StepPlan | None:
        now = self._clock()
        plan, self._next = self._next, StepPlan()
        free = min(
            self.config.slots - len(self._running), len(self._free_slots) + len(self._cached)
        )
        capacity = Capacity(free, self.config.kv_cells - self._reserved_kv)
        decision = self.policy.schedule(now, list(self._waiting), list(self._running), capacity)
        for request in decision.preempt:
            if request.status is Status.RUNNING and request.slot in self._by_slot:
                self._preempt(request, plan)
                capacity = capacity.plus(request)
        sources = list(self._running)  # KV of these is complete before this step's operations
        for request in decision.admit:
            if request.status is not Status.QUEUED or not capacity.fits(request):
                break  # in order: never let a later request jump one that does not fit
            capacity = capacity.minus(request)
            self._admit(request, plan, sources, now)

        self._resolve_deferred(plan)
        budget = self.config.batch_tokens
        for request in self._running:  # decode: one token per running sequence
            if not request.prefilling:
                assert request.slot is not None
                pos = len(request.prompt_tokens) + len(request.output_tokens) - 1
                plan.items.append(BatchItem(request.slot, request.output_tokens[-1:], pos, True))
                request.kv_len = pos + 1
                budget -= 1
        for request in self._running:  # chunked prefill with what is left of the budget
            if request.prefilling and budget > 0 and request.defer_on is None:
                assert request.slot is not None
                start = request.n_prefilled
                chunk = request.prompt_tokens[start : start + budget]
                request.n_prefilled += len(chunk)
                request.kv_len = request.n_prefilled
                budget -= len(chunk)
                plan.items.append(BatchItem(request.slot, chunk, start, not request.prefilling))
        return None if plan.empty else plan

    # -- admission, KV reuse, pre-emption ----------------------------------------------------
    def _admit(
        self, request: LLMRequest, plan: StepPlan, sources: list[LLMRequest], now: float
    ) -> None:
        self._waiting.remove(request)
        # Physical KV: running reservations + cached sequences + this one must fit.
        limit = self.config.kv_cells - self._reserved_kv - request.kv_need
        while self._cached_kv > limit:
            self._evict(self._eviction_victim(request.agent), plan)
        if request.snapshot is not None:
            slot = self._empty_slot(plan, keep=None)
            plan.restores.append(SeqRestore(slot, request.snapshot))
            request.snapshot = None
            self.stats.restores += 1
        else:
            slot = self._place(request, plan, sources)
            plan.starts.append(SeqStart(slot, request.params))
            self.stats.admissions += 1
            self.stats.prompt_tokens += len(request.prompt_tokens)
            if request.reused_tokens:
                self.stats.prefix_hits += 1
                self.stats.reused_tokens += request.reused_tokens
        request.slot = slot
        request.admit(now)
        self._running.append(request)
        self._by_slot[slot] = request
        self._reserved_kv += request.kv_need

    def _place(self, request: LLMRequest, plan: StepPlan, sources: list[LLMRequest]) -> int:
        """Pick the slot for a fresh request and the KV prefix it starts with."""
        prompt = request.prompt_tokens
        src, n, unpark = None, 0, False
        if self.config.kv_reuse:
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
            parked = self._parked.get(request.agent)
            unpark = parked is not None and _common_prefix(parked.tokens, prompt) > n
            if unpark:
                assert parked is not None
                src, n = None, _common_prefix(parked.tokens, prompt)
            n = min(n, len(prompt) - 1)  # the last prompt token must be decoded for logits
            if n < MIN_REUSE:
                src, n, unpark = None, 0, False
        request.n_prefilled = request.kv_len = request.reused_tokens = n
        if self.config.kv_reuse and unpark:
            # Bring the agent's own saved KV back and keep its first n positions.
            parked = self._parked.pop(request.agent)
            slot = self._empty_slot(plan, keep=None)
            plan.restores.append(SeqRestore(slot, parked.key))
            plan.trims.append((slot, n))
            self.stats.unparked += 1
            return slot
        if self.config.kv_reuse:
            best = max(
                self._running, key=lambda r: _common_prefix(r.prompt_tokens, prompt), default=None
            )
            if best is not None:
                m = min(_common_prefix(best.prompt_tokens, prompt), len(prompt) - 1)
                if m >= n + MIN_DEFER:
                    request.n_prefilled = request.kv_len = request.reused_tokens = 0
                    request.defer_on, request.defer_n = best, m
                    return self._empty_slot(plan, keep=None)
        cached = self._cached.get(src) if src is not None else None
        if (
            src is not None
            and cached is not None
            and (cached.agent == request.agent or not self._free_slots)
        ):
            # Take the cached slot over: keep its first n positions, drop the rest.
            del self._cached[src]
            self._cached_kv -= len(cached.tokens)
            plan.trims.append((src, n))
            return src
        slot = self._empty_slot(plan, keep=src)
        if src is not None and n:
            plan.copies.append(KVCopy(src, slot, n))
        return slot

    def _resolve_deferred(self, plan: StepPlan) -> None:
        """Requests waiting for another's prefill copy it once it is in the KV cache (as of
        the last step: copies run before this step's batch)."""
        for request in self._running:
            src = request.defer_on
            if src is None:
                continue
            if src.status is Status.RUNNING and src.slot is not None:
                if src.kv_len < request.defer_n:
                    continue  # not there yet
                assert request.slot is not None
                plan.copies.append(KVCopy(src.slot, request.slot, request.defer_n))
                request.n_prefilled = request.kv_len = request.reused_tokens = request.defer_n
                self.stats.prefix_hits += 1
                self.stats.reused_tokens += request.defer_n
            request.defer_on = None  # copied, or the source is gone: prefill alone

    def _empty_slot(self, plan: StepPlan, keep: int | None) -> int:
        """An empty slot, evicting the least recently used cached one (never ``keep``)."""
        if not self._free_slots:
            victim = next(s for s in self._cached if s != keep)
            self._evict(victim, plan)
        return self._free_slots.popleft()

    def _eviction_victim(self, agent: str) -> int:
        """Least recently used cached slot, the requesting agent's own last."""
        return next(
            (s for s, c in self._cached.items() if c.agent != agent), next(iter(self._cached))
        )

    def _evict(self, slot: int, plan: StepPlan | None = None, *, park: bool = True) -> None:
        """Free a cached slot. Its KV is parked (saved into the snapshot store, restored on the
        agent's next call at ~1% of the cost of a prefill) unless ``park`` is false."""
        cached = self._cached.pop(slot)
        self._cached_kv -= len(cached.tokens)
        self._free_slots.append(slot)
        target = plan if plan is not None else self._next
        if plan is not None and any(copy.src == slot for copy in plan.copies):
            # A copy in this very step reads this slot: clear it after the copies (a trim),
            # not before them (saves and releases run first).
            plan.trims.append((slot, 0))
            return
        if not (park and len(cached.tokens) >= MIN_PARK and self.config.max_parked):
            target.releases.append(slot)
            return
        key = f"park-{next(self._park_keys)}"
        target.saves.append(SeqSave(slot, key))
        old = self._parked.pop(cached.agent, None)
        self._parked[cached.agent] = CachedSeq(cached.agent, cached.tokens, key)
        if old is not None:
            target.drops.append(old.key)
        while len(self._parked) > self.config.max_parked:
            target.drops.append(self._parked.popitem(last=False)[1].key)
        self.stats.parked += 1

    def _preempt(self, request: LLMRequest, plan: StepPlan) -> None:
        slot = request.slot
        assert slot is not None
        self._running.remove(request)
        del self._by_slot[slot]
        self._reserved_kv -= request.kv_need
        self._free_slots.append(slot)
        request.defer_on = None
        if request.kv_len:
            plan.saves.append(SeqSave(slot, request.id))
            request.snapshot = request.id
        else:  # nothing computed yet: start afresh when re-admitted
            plan.releases.append(slot)
            request.n_prefilled = 0
        request.preempt()
        self._waiting.append(request)
        self.stats.preemptions += 1

    def _discard_snapshot(self, request: LLMRequest) -> None:
        if request.snapshot is not None:
            self._next.drops.append(request.snapshot)
            request.snapshot = None

    # -- results ---------------------------------------------------------------------------
    def _postprocess(self, plan: StepPlan, sampled: list[Sampled]) -> None:
        now = self._clock()
        stats = self.stats
        stats.steps += 1
        for item in plan.items:
            request = self._by_slot.get(item.slot)
            if request is not None and item.pos >= len(request.prompt_tokens):
                stats.decode_tokens += 1
                weight = 1.0
            else:
                stats.prefill_tokens += len(item.tokens)
                weight = PREFILL_WEIGHT * len(item.tokens)
            if request is not None:
                request.ledger.service += weight
        for s in sampled:
            request = self._by_slot.get(s.slot)
            if request is None:  # cancelled while the step ran
                continue
            if request.timings.first_token is None:
                request.timings.first_token = now
            if s.eog and not request.params.ignore_eos:
                request.finish_reason = "stop"
            else:
                request.append(s.token, s.piece)
            if request.finish_reason is not None:
                self._finish(request, now)

    def _finish(self, request: LLMRequest, now: float) -> None:
        slot = request.slot
        assert slot is not None
        self._running.remove(request)
        del self._by_slot[slot]
        self._reserved_kv -= request.kv_need
        if self.config.kv_reuse and request.kv_len:
            tokens = [*request.prompt_tokens, *request.output_tokens][: request.kv_len]
            self._cached[slot] = CachedSeq(request.agent, tokens)
            self._cached_kv += len(tokens)
            # In a unified pool idle cells cost every decode step attention work: keep few.
            while self.config.kv_unified and self._cached_kv > self.config.cache_tokens:
                self._evict(next(iter(self._cached)))
        else:
            self._free_slots.append(slot)
            self._next.releases.append(slot)
        self._book.learn(request)
        self.stats.completed += 1
        request.complete(now, self._completion(request))

    def _completion(self, request: LLMRequest) -> Completion:
        assert request.finish_reason is not None
        return Completion(
            text=request.text,
            finish_reason=request.finish_reason,
            usage=request.usage,
            timings=request.timings,
            model=self.name,
            syscall_id=request.id,
        )

    def _unbind(self, request: LLMRequest) -> None:
        """Take a running request off its slot and clear the slot. The slot is free for the
        very next admission (operations in a plan run in order: the release comes first)."""
        assert request.slot is not None
        self._running.remove(request)
        del self._by_slot[request.slot]
        self._free_slots.append(request.slot)
        self._next.releases.append(request.slot)
        self._reserved_kv -= request.kv_need

    def _fail_all(self, error: AIOSError) -> None:
        now = self._clock()
        for request in [*self._waiting, *self._running]:
            request.fail(now, error)
        self._waiting.clear()
        self._running.clear()
        self._by_slot.clear()

    def _fail_plan(self, plan: StepPlan, error: AIOSError) -> None:
        """A step failed: every request in it (fed tokens, admitted, restored or saved) fails
        with ``error``; their slots are released and their saved contexts dropped."""
        now = self._clock()
        slots = dict.fromkeys(
            [i.slot for i in plan.items]
            + [s.slot for s in plan.starts]
            + [r.slot for r in plan.restores]
        )
        for slot in slots:
            request = self._by_slot.get(slot)
            if request is not None:
                self._fail(request, now, error)
        saved = {s.key for s in plan.saves}
        for request in [r for r in self._waiting if r.snapshot in saved]:
            self._fail(request, now, error)
        # A failed step may have left copies or trims half done: cached KV is suspect, and
        # contexts it was parking may not have reached the store.
        for slot in list(self._cached):
            self._evict(slot, park=False)
        for agent in [a for a, p in self._parked.items() if p.key in saved]:
            del self._parked[agent]

    def _fail(self, request: LLMRequest, now: float, error: AIOSError) -> None:
        self._withdraw(request)
        self.stats.failed += 1
        request.fail(now, error)

    def _withdraw(self, request: LLMRequest) -> None:
        """Take a queued or running request off the core (its slot or its snapshot freed)."""
        if request.status is Status.QUEUED:
            self._waiting.remove(request)
            self._discard_snapshot(request)
        else:
            self._unbind(request)

    def _recover(self, plan: StepPlan, error: EngineCrashed) -> None:
        """The engine's process died running ``plan``: every slot, cached KV and snapshot is
        gone. The call that crashed it fails (every call in the plan when the engine could not
        say which), the others that had KV in it run again (``_retry_lost``), queued calls
        that never ran are untouched, and the core forgets every cached and parked context."""
        now, failed = self._clock(), self.stats.failed
        self.stats.crashes += 1
        culprit = self._culprit(plan, error)
        if culprit is not None:
            self._fail(culprit, now, error)
        elif error.slot is None and error.key is None:  # no telling who: the whole step fails
            self._fail_plan(plan, error)
        retried = self._retry_lost(now, error)
        for slot in list(self._cached):
            self._evict(slot, park=False)
        # The operations planned on the dead engine's KV are void; only the drops remain, so
        # that a store the engine shares with the core forgets what the dead engine saved.
        drops = [*self._next.drops, *(p.key for p in self._parked.values())]
        self._parked.clear()
        self._next = StepPlan(drops=drops)
        assert len(self._free_slots) == self.config.kv_sequences and not self._reserved_kv
        log.warning("%s; %d calls run again, %d failed", error, retried, self.stats.failed - failed)

    def _retry_lost(self, now: float, error: EngineCrashed) -> int:
        """Calls that had KV in the dead engine (running, or pre-empted with a snapshot) go
        back to the head of the queue to start from scratch, once, if their caller has seen
        nothing of the answer yet; the others fail with ``error``. Returns how many retry."""
        lost = [*self._running, *(r for r in self._waiting if r.snapshot is not None)]
        retry = []
        for request in lost:
            self._withdraw(request)
            if request.restarts == 0 and (request.changed is None or not request.text):
                request.restart()
                retry.append(request)
            else:
                self.stats.failed += 1
                request.fail(now, error)
        self._waiting.extendleft(reversed(retry))
        self.stats.retried += len(retry)
        return len(retry)

    def _culprit(self, plan: StepPlan, error: EngineCrashed) -> LLMRequest | None:
        """The call the engine was working on when it died, if it can be told."""
        if error.key is not None:  # saving a pre-empted call's context (or an idle agent's)
            return next((r for r in self._waiting if r.snapshot == error.key), None)
        if error.slot is not None:
            return self._by_slot.get(error.slot)
        return None

    # -- introspection -------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def cached(self) -> int:
        """Idle slots holding an agent's KV for its next call."""
        return len(self._cached)


@contextlib.asynccontextmanager
async def standalone(core: LLMCore) -> AsyncIterator[LLMCore]:
    """A core outside a kernel (tests, benchmarks): started, its loop running, closed at exit."""
    await core.start()
    loop = asyncio.create_task(core.run())
    try:
        yield core
    finally:
        loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loop
        await core.close()


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
