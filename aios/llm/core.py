"""An LLM core: one engine, its queue, its scheduling policy and its single decode loop.

The loop is nano-vllm's three calls: ``_schedule()`` builds a step plan (pre-emptions and
admissions chosen by the policy, KV reuse, decode tokens of running sequences, chunks of prompts
being prefilled), ``engine.step(plan)`` runs it on the core's own thread, ``_postprocess()``
applies the sampled tokens. All request state lives on the event loop; the thread only touches
the model and the snapshot store. When there is nothing to do the loop waits on an event: it
never polls.

Slots and KV. The core's ``KVCache`` (``aios.llm.kvcache``) owns the engine's slots and the
sequences in them: which request runs where, the cached slots an agent's next call (or anyone
sharing a prefix) can reuse, the idle contexts *stashed* out of the cache, placement, eviction
and the KV accounting. The core asks it for capacity, to allocate, restore, pre-empt and free,
and assembles the plan from the operations it records.

Pre-emption. A pre-empted request's KV is saved into the snapshot store (RAM, spilling to
disk) as its *snapshot*, with its sampler parked in the engine; re-admitted, it is restored
into any free slot and goes on exactly where it stopped (the token sampled last is never in the
KV yet, so no logits are lost).

Crashes. An engine in a process of its own (``aios.llm.isolated``) raises ``EngineCrashed`` when
that process dies mid-step: the call it was working on fails, the others that had KV in it go
back to the head of the queue to start again from scratch (once, and only if their caller has
seen nothing of the answer yet), and the core builds a fresh engine with its factory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
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
)
from aios.llm.base import CoreQueue
from aios.llm.engine import BatchItem, Engine, Sampled, SeqStart, StepPlan
from aios.llm.grammar import json_grammar
from aios.llm.kvcache import KVCache, KVUsage
from aios.scheduler import Policy
from aios.syscall import Completion, LLMCall, LLMRequest, Status

log = logging.getLogger(__name__)

# A prefill token costs about this many decode tokens of core time: SmolLM2 on the 2-core
# reference machine prefills ~280 tok/s and decodes ~190 tok/s batched. Used for agents' service.
PREFILL_WEIGHT = 0.7


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
    parked: int = 0  # idle contexts stashed out of the KV cache (aios.llm.kvcache)
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


class LLMCore(CoreQueue[LLMRequest]):
    """Schedules LLM syscalls onto one engine with continuous batching."""

    def __init__(
        self,
        config: CoreConfig,
        engine_factory: Callable[[], Engine],
        policy: Policy,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(clock)
        self.config: CoreConfig = config
        self.name = config.name
        self.policy = policy
        self.stats: CoreStats = CoreStats()
        self._engine_factory = engine_factory
        self._engine: Engine | None = None
        self._retired: list[Engine] = []  # crashed engines, closed once a fresh one took over
        # One thread owns the model: llama.cpp contexts are not thread-safe, and two
        # inference threads on a small machine fight for the same cores.
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"aios-core-{self.name}"
        )
        spill = Path(config.spill_dir) if config.spill_dir else None
        self.snapshots = SnapshotStore(config.snapshot_ram_mb * 2**20, spill)  # core thread only
        self._kv = KVCache(config, self.stats)  # the slots, the sequences in them, KV reuse

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

    def _check_started(self) -> None:
        self.engine  # noqa: B018  (raises CoreError before start)

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
        self._admissible()
        engine = self.engine
        if call.params.json_schema is not None:  # the engine compiles it (cached) at start
            json_grammar(call.params.json_schema)
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
        return self._enqueue(request, kind)

    def forget(self, agent: str) -> None:
        """``agent`` exited: free the KV it left cached or stashed and its scheduling ledger."""
        self._book.forget(agent)
        self._kv.forget(agent)
        self._wake.set()

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """The decode loop; runs until cancelled (kernel shutdown)."""
        try:
            await self._loop()
        except Exception as e:  # a bug in the loop itself: no caller may be left hanging
            self._stopped(e)

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
                log.exception("core %r: the engine failed a step", self.name)
                self._fail_plan(plan, CoreError(f"{type(e).__name__}: {e}"))
                continue
            finally:
                self.stats.busy_seconds += time.perf_counter() - started
            self._postprocess(plan, sampled)

    def _schedule(self) -> StepPlan | None:
        """The next step's plan (None when there is nothing to do): the KV operations pending
        since the last step, the policy's pre-emptions and admissions, then the batch."""
        now = self._clock()
        plan = self._kv.take_pending()
        capacity = self._kv.capacity()
        decision = self.policy.schedule(now, list(self._waiting), self._kv.running, capacity)
        for request in decision.preempt:
            if request.status is Status.RUNNING and self._kv.is_running(request):
                self._preempt(request, plan)
                capacity = capacity.plus(request)
        sources = self._kv.running  # KV of these is complete before this step's operations
        for request in decision.admit:
            # In order: never let a later request jump one that does not fit. The KV manager's
            # own count also holds back a slot a copy of this step still reads.
            fits = capacity.fits(request) and self._kv.capacity().fits(request)
            if request.status is not Status.QUEUED or not fits:
                break
            capacity = capacity.minus(request)
            self._admit(request, plan, sources, now)
        for request in self._kv.copy_deferred(plan):
            self.stats.prefix_hits += 1
            self.stats.reused_tokens += request.defer_n
        self._batch(plan)
        return None if plan.empty else plan

    def _batch(self, plan: StepPlan) -> None:
        """Add the batch to ``plan``: one decode token per running sequence, then prompt chunks
        (chunked prefill) with what is left of the ``batch_tokens`` budget."""
        running = self._kv.running
        budget = self.config.batch_tokens
        for request in running:
            if not request.prefilling:
                assert request.slot is not None
                pos = len(request.prompt_tokens) + len(request.output_tokens) - 1
                plan.items.append(BatchItem(request.slot, request.output_tokens[-1:], pos, True))
                request.kv_len = pos + 1
                budget -= 1
        for request in running:
            if request.prefilling and budget > 0 and request.defer_on is None:
                assert request.slot is not None
                start = request.n_prefilled
                chunk = request.prompt_tokens[start : start + budget]
                request.n_prefilled += len(chunk)
                request.kv_len = request.n_prefilled
                budget -= len(chunk)
                plan.items.append(BatchItem(request.slot, chunk, start, not request.prefilling))

    # -- admission, pre-emption ------------------------------------------------------------
    def _admit(
        self, request: LLMRequest, plan: StepPlan, sources: list[LLMRequest], now: float
    ) -> None:
        """Take ``request`` off the queue onto a slot: its snapshot restored if it was
        pre-empted, else a fresh start on the KV prefix the KV manager found for it."""
        self._waiting.remove(request)
        if request.snapshot is not None:
            self._kv.restore(request, plan)
            self.stats.restores += 1
        else:
            slot = self._kv.allocate(request, plan, sources)
            plan.starts.append(SeqStart(slot, request.params))
            self.stats.admissions += 1
            self.stats.prompt_tokens += len(request.prompt_tokens)
            if request.reused_tokens:
                self.stats.prefix_hits += 1
                self.stats.reused_tokens += request.reused_tokens
        request.admit(now)

    def _preempt(self, request: LLMRequest, plan: StepPlan) -> None:
        """Save ``request``'s context as its snapshot and put it back at the tail of the
        queue."""
        self._kv.preempt(request, plan)
        request.preempt()
        self._waiting.append(request)
        self.stats.preemptions += 1

    # -- results ---------------------------------------------------------------------------
    def _postprocess(self, plan: StepPlan, sampled: list[Sampled]) -> None:
        now = self._clock()
        stats = self.stats
        stats.steps += 1
        for item in plan.items:
            request = self._kv.request_at(item.slot)
            if request is not None and item.pos >= len(request.prompt_tokens):
                stats.decode_tokens += 1
                weight = 1.0
            else:
                stats.prefill_tokens += len(item.tokens)
                weight = PREFILL_WEIGHT * len(item.tokens)
            if request is not None:
                request.ledger.service += weight
        for s in sampled:
            request = self._kv.request_at(s.slot)
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
        """``request`` is done: its slot keeps its KV cached for its agent's next call (with
        KV reuse on), and its future gets the completion."""
        self._kv.free(request, reusable=True)
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

    def _fail_all(self, error: AIOSError) -> None:
        """Fail every queued and running request (the core is closing or dead)."""
        now = self._clock()
        for request in [*self._waiting, *self._kv.running]:
            request.fail(now, error)
        self._waiting.clear()
        self._kv.abandon()

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
            request = self._kv.request_at(slot)
            if request is not None:
                self._fail(request, now, error)
        saved = {s.key for s in plan.saves}
        for request in [r for r in self._waiting if r.snapshot in saved]:
            self._fail(request, now, error)
        self._kv.invalidate(saved)

    def _fail(self, request: LLMRequest, now: float, error: AIOSError) -> None:
        """Take ``request`` off the core and fail it with ``error``."""
        self._withdraw(request)
        self.stats.failed += 1
        request.fail(now, error)

    def _withdraw(self, request: LLMRequest) -> None:
        """Take a queued or running request off the core (its slot or its snapshot freed)."""
        if request.status is Status.QUEUED:
            self._waiting.remove(request)
            self._kv.drop_snapshot(request)
        else:
            self._kv.free(request)

    def _recover(self, plan: StepPlan, error: EngineCrashed) -> None:
        """The engine's process died running ``plan``: every slot, cached KV and snapshot is
        gone. The call that crashed it fails (every call in the plan when the engine could not
        say which), the others that had KV in it run again (``_retry_lost``), queued calls
        that never ran are untouched, and the core forgets every cached and stashed context."""
        now, failed = self._clock(), self.stats.failed
        self.stats.crashes += 1
        culprit = self._culprit(plan, error)
        if culprit is not None:
            self._fail(culprit, now, error)
        elif error.slot is None and error.key is None:  # no telling who: the whole step fails
            self._fail_plan(plan, error)
        retried = self._retry_lost(now, error)
        self._kv.reset()
        # Every slot is empty again and nothing is reserved.
        assert len(self._kv.empty) == self.config.kv_sequences and not self._kv.reserved_cells
        log.warning("%s; %d calls run again, %d failed", error, retried, self.stats.failed - failed)

    def _retry_lost(self, now: float, error: EngineCrashed) -> int:
        """Calls that had KV in the dead engine (running, or pre-empted with a snapshot) go
        back to the head of the queue to start from scratch, once, if their caller has seen
        nothing of the answer yet; the others fail with ``error``. Returns how many retry."""
        lost = [*self._kv.running, *(r for r in self._waiting if r.snapshot is not None)]
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
            return self._kv.request_at(error.slot)
        return None

    # -- introspection -------------------------------------------------------------------------
    @property
    def active(self) -> int:
        """Requests running on a slot."""
        return len(self._kv.running)

    @property
    def cached(self) -> int:
        """Idle slots holding an agent's KV for its next call."""
        return len(self._kv.cached)

    def kv_usage(self) -> KVUsage:
        """Its sequences and KV cells now."""
        return self._kv.usage(sum(1 for r in self._waiting if r.snapshot is not None))


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
