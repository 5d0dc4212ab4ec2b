"""An LLM core: one engine, its queue, its scheduling policy and its single decode loop.

The loop is nano-vllm's three calls: ``_schedule()`` builds a step plan (admissions chosen by
the policy, decode tokens of running sequences, chunks of prompts being prefilled),
``engine.step(plan)`` runs it on the core's own thread, ``_postprocess()`` applies the sampled
tokens. All request state lives on the event loop; the thread only touches the model. When
there is nothing to do the loop waits on an event: it never polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aios.config import CoreConfig
from aios.errors import (
    AIOSError,
    ContextOverflow,
    CoreError,
    InvalidRequest,
    KernelShutdown,
    Overloaded,
)
from aios.llm.engine import BatchItem, Engine, Sampled, SeqStart, StepPlan
from aios.scheduler import Capacity, Policy
from aios.syscall import Completion, LLMCall, LLMRequest, Status

log = logging.getLogger(__name__)


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
        # One thread owns the model: llama.cpp contexts are not thread-safe, and two
        # inference threads on a small machine fight for the same cores.
        self._thread = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"aios-core-{self.name}"
        )
        self._waiting: deque[LLMRequest] = deque()
        self._running: list[LLMRequest] = []
        self._by_slot: dict[int, LLMRequest] = {}
        self._free_slots: list[int] = list(range(config.slots - 1, -1, -1))
        self._releasing: list[int] = []  # slots whose KV must be cleared before reuse
        self._reserved_kv = 0
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
        # Queued behind any step still running on the thread, so it never races it.
        await asyncio.get_running_loop().run_in_executor(self._thread, self._engine.close)
        self._engine = None
        self._thread.shutdown(wait=True)

    # -- syscall entry ---------------------------------------------------------------------
    def submit(self, agent: str, call: LLMCall, *, priority: int = 0) -> LLMRequest:
        """Validate and enqueue an LLM call; raise a typed error if it can never run."""
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
        self._waiting.append(request)
        self._wake.set()
        return request

    def cancel(self, request: LLMRequest) -> None:
        """Withdraw a request (caller gone or deadline passed); frees its slot. Idempotent."""
        if request.status.finished:
            return
        if request.status is Status.QUEUED:
            self._waiting.remove(request)
        else:
            self._unbind(request)
        request.cancel(self._clock())
        self.stats.cancelled += 1
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
        engine = self.engine
        while True:
            plan = self._schedule()
            if plan is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            try:
                sampled = await loop.run_in_executor(self._thread, engine.step, plan)
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
        plan = StepPlan(releases=self._releasing)
        self._releasing = []
        capacity = Capacity(len(self._free_slots), self.config.context_tokens - self._reserved_kv)
        decision = self.policy.schedule(now, list(self._waiting), list(self._running), capacity)
        for request in decision.admit:
            if request.status is not Status.QUEUED or not capacity.fits(request):
                continue
            capacity = capacity.minus(request)
            self._waiting.remove(request)
            slot = self._free_slots.pop()
            request.slot = slot
            request.admit(now)
            self._running.append(request)
            self._by_slot[slot] = request
            self._reserved_kv += request.kv_need
            plan.starts.append(SeqStart(slot, request.params))

        budget = self.config.batch_tokens
        for request in self._running:  # decode: one token per running sequence
            if not request.prefilling:
                assert request.slot is not None
                pos = len(request.prompt_tokens) + len(request.output_tokens) - 1
                plan.items.append(BatchItem(request.slot, request.output_tokens[-1:], pos, True))
                budget -= 1
        for request in self._running:  # chunked prefill with what is left of the budget
            if request.prefilling and budget > 0:
                assert request.slot is not None
                start = request.n_prefilled
                chunk = request.prompt_tokens[start : start + budget]
                request.n_prefilled += len(chunk)
                budget -= len(chunk)
                plan.items.append(BatchItem(request.slot, chunk, start, not request.prefilling))
        if not plan.items and not plan.releases and not plan.starts:
            return None
        return plan

    def _postprocess(self, plan: StepPlan, sampled: list[Sampled]) -> None:
        now = self._clock()
        stats = self.stats
        stats.steps += 1
        for item in plan.items:
            if item.sample and len(item.tokens) == 1 and item.slot in self._by_slot:
                stats.decode_tokens += 1
            else:
                stats.prefill_tokens += len(item.tokens)
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
                self._unbind(request)
                stats.completed += 1
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
        """Take a running request off its slot. The slot is free for the very next admission
        (the engine clears a slot before starting a sequence on it); the next step also
        releases it eagerly so its KV cells return to the shared pool even if nobody waits."""
        assert request.slot is not None
        self._running.remove(request)
        del self._by_slot[request.slot]
        self._free_slots.append(request.slot)
        self._releasing.append(request.slot)
        self._reserved_kv -= request.kv_need

    def _fail_all(self, error: AIOSError) -> None:
        now = self._clock()
        for request in [*self._waiting, *self._running]:
            request.fail(now, error)
        self._waiting.clear()
        self._running.clear()
        self._by_slot.clear()

    def _fail_plan(self, plan: StepPlan, error: AIOSError) -> None:
        """A step failed: every request in it (fed tokens, or just admitted) fails with
        ``error``; their slots are released."""
        now = self._clock()
        slots = dict.fromkeys([i.slot for i in plan.items] + [s.slot for s in plan.starts])
        for slot in slots:
            request = self._by_slot.get(slot)
            if request is not None:
                self._unbind(request)
                self.stats.failed += 1
                request.fail(now, error)

    # -- introspection -------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return len(self._running)
