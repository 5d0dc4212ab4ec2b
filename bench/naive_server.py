"""The no-kernel baseline of bench/scale.py (SIMULATED): what agents hit *without* a kernel.

:class:`SimulatedServer` is a naive continuously batching server that takes every request that
arrives, with no admission control, so when the sequences' KV outgrows the cache the unlucky
requests fail with :class:`~aios.llm.sim.OutOfMemory`. It runs on the same simulated hardware
as the kernel's SIMULATED engine (:mod:`aios.llm.sim`: cost model, tokens, KV pool), so the two
arms of the benchmark differ only in the kernel. No model runs; it is a benchmark baseline,
never part of aios.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal

from aios.errors import ConfigError, CoreError, InvalidRequest
from aios.llm.sim import (
    CostModel,
    KVPool,
    OutOfMemory,
    SeqState,
    SimStats,
    check_reply_tokens,
    tokenize,
    tokenize_chat,
)
from aios.syscall import Message, SamplingParams


@dataclass(frozen=True)
class Generation:
    """A reply of the simulated server."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass
class ServerStats(SimStats):
    """What the simulated server did: the hardware's stats, its requests and their failures."""

    requests: int = 0
    completed: int = 0
    oom_errors: int = 0
    wasted_tokens: int = 0  # computed for requests that then failed
    peak_sequences: int = 0


@dataclass
class _Job:
    prompt: list[int]
    max_tokens: int
    future: asyncio.Future[Generation]
    seq: SeqState
    fed: int = 0  # prompt tokens in the KV
    output: list[bytes] = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.prompt)


class SimulatedServer:
    """What agents hit without a kernel (SIMULATED): ``await server.generate(prompt, n)``,
    called by every agent directly and concurrently.

    A naive continuously batching server on the same :class:`CostModel` as the engine: every
    request that arrives joins the batch (up to ``cost.slots`` sequences, the only limit it
    enforces; later ones wait for a sequence id), with no admission control on KV. A step
    decodes one token of every sequence past its prompt, then prefills prompt chunks in arrival
    order while ``batch_tokens`` allows. A step's new KV cells go to the decoding sequences
    first, then the prompt chunks, each in arrival order; a sequence whose cells do not fit
    fails with :class:`OutOfMemory`, its cells are freed (its work is lost) and the rest go on.
    It keeps no prompt cache between requests. Replies are the engine's (same history, same
    tokens).

        async with SimulatedServer(CostModel.calibrated(0.01)) as server:
            reply = await server.generate(messages, max_tokens=64)
    """

    def __init__(
        self,
        cost: CostModel,
        *,
        batch_tokens: int = 512,
        reply_tokens: tuple[int, int] = (8, 256),
        sleep: Callable[[float], None] = time.sleep,
        record: bool = False,
    ) -> None:
        if batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
        check_reply_tokens(reply_tokens)
        self.cost = cost
        self.batch_tokens = batch_tokens
        self.reply_tokens = reply_tokens
        self.stats = ServerStats()
        self.description = (
            f"simulated server (no admission control, time_scale {cost.time_scale:g})"
        )
        self._sleep = sleep
        self._record = record
        self._pool = KVPool(cost.kv_cells)
        self._pending: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread: ThreadPoolExecutor | None = None

    @property
    def used_cells(self) -> int:
        return self._pool.used

    async def __aenter__(self) -> SimulatedServer:
        # One thread sleeps the steps, as the kernel's core thread does: the same hand-off cost.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aios-sim-server")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-server")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stopped = CoreError("the simulated server stopped")
        for job in [*self._pending, *self._active]:
            if not job.future.done():
                job.future.set_exception(stopped)
        self._pending.clear()
        self._active.clear()
        if self._thread is not None:
            self._thread.shutdown(wait=True)

    async def generate(
        self, prompt: str | Sequence[Message], max_tokens: int, *, ignore_eos: bool = False
    ) -> Generation:
        """Generate up to ``max_tokens`` tokens for a completion ``prompt`` or chat
        ``messages``; raise :class:`OutOfMemory` when the KV cache overflows under it."""
        if self._task is None:
            raise CoreError("the simulated server is not running")
        tokens = tokenize(prompt) if isinstance(prompt, str) else tokenize_chat(prompt)
        if not tokens:
            raise InvalidRequest("the prompt is empty after tokenization")
        if max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}")
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        self._pending.append(_Job(tokens, max_tokens, future, SeqState(params=params)))
        self.stats.requests += 1
        self._wake.set()
        return await future  # a cancelled caller cancels the future: the loop drops the job

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            while self._pending and len(self._active) < self.cost.slots:
                self._active.append(self._pending.popleft())
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.stats.peak_sequences = max(self.stats.peak_sequences, len(self._active))
            entered = time.perf_counter()
            step = self._plan()
            if not step:
                continue  # every sequence in it ran out of memory
            decode = sum(1 for job, _ in step if job.decoding)
            prefill = sum(n for job, n in step if not job.decoding)
            modeled = self.cost.step_seconds(decode, prefill)
            scaled = modeled * self.cost.time_scale
            work = time.perf_counter() - entered  # as the engine: planning is inside the step
            if scaled > work:
                await loop.run_in_executor(self._thread, self._sleep, scaled - work)
            else:
                await asyncio.sleep(0)  # let agents submit between steps
            continuous = any(job.decoding and job.output for job, _ in step)
            if self._record:
                self.stats.busy.append((entered, entered + max(scaled, work), continuous))
            stats = self.stats
            stats.steps += 1
            stats.decode_tokens += decode
            stats.prefill_tokens += prefill
            stats.modeled_seconds += modeled
            self._apply(step)

    def _plan(self) -> list[tuple[_Job, int]]:
        """This step's (job, new tokens), cells allocated; jobs that do not fit fail."""
        budget = self.batch_tokens
        step: list[tuple[_Job, int]] = []
        for job in self._active:
            if job.decoding:
                step.append((job, 1))
                budget -= 1
        for job in self._active:
            if not job.decoding and budget > 0:
                n = min(budget, len(job.prompt) - job.fed)
                step.append((job, n))
                budget -= n
        fitted = []
        for job, n in step:
            try:
                self._pool.check(n, "the sequence's next tokens")
            except OutOfMemory as e:
                self._fail(job, e)
                continue
            job.seq.cells.extend(self._pool.alloc(n))
            fitted.append((job, n))
        self.stats.peak_cells = self._pool.peak
        return fitted

    def _apply(self, step: list[tuple[_Job, int]]) -> None:
        for job, n in step:
            if job.future.done():  # cancelled while the step ran
                continue
            seq = job.seq
            if job.decoding:
                assert seq.pending is not None
                seq.feed([seq.pending])
            else:
                seq.feed(job.prompt[job.fed : job.fed + n])
                job.fed += n
                if not job.decoding:
                    continue
            _, piece, eog = seq.sample(self.reply_tokens)
            if eog:
                self._finish(job, "stop")
                continue
            job.output.append(piece)
            if len(job.output) >= job.max_tokens:
                self._finish(job, "length")

    def _finish(self, job: _Job, reason: Literal["stop", "length"]) -> None:
        self._release(job)
        self.stats.completed += 1
        text = b"".join(job.output).decode()
        job.future.set_result(Generation(text, len(job.prompt), len(job.output), reason))

    def _fail(self, job: _Job, error: OutOfMemory) -> None:
        self.stats.oom_errors += 1
        self.stats.wasted_tokens += len(job.seq.cells)
        self._release(job)
        if not job.future.done():
            job.future.set_exception(error)

    def _release(self, job: _Job) -> None:
        self._active.remove(job)
        self._pool.free(job.seq.cells)
        job.seq.cells = []

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._active if j.future.done()]:
            self._release(job)
        if any(j.future.done() for j in self._pending):
            self._pending = deque(j for j in self._pending if not j.future.done())
