"""A FAKE engine for tests, and helpers to run a kernel on it.

:class:`FakeEngine` is a test double, not a simulated core: it runs no model, produces canned
replies, and is never used by default (the kernel's default engine factory is llama.cpp). It
implements the :class:`~aios.llm.engine.Engine` protocol closely enough to check the core's
scheduling: it records every step plan and tracks each slot's KV positions like a real engine,
so a plan that feeds a slot out of order, reuses a slot without a start, overruns the batch or
overcommits the KV cache is a recorded violation (and the step raises ``AssertionError``).

Tokens: one per UTF-8 byte, token id = byte value + 10, so ids below 10 are free for the chat
marker and the end-of-generation token. The reply of a sequence is ``reply(prompt_tokens)``
(the prompt being every token fed to the slot before its first sample), sampled byte by byte,
then an end-of-generation token.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from aios.access import Pending
from aios.config import CoreConfig, KernelConfig
from aios.errors import CoreError
from aios.kernel import Kernel
from aios.llm.engine import ContextStore, KVCopy, Sampled, StepPlan
from aios.process import AgentProcess
from aios.scheduler import FIFO, Capacity, Decision
from aios.scheduler.base import R
from aios.syscall import Completion, LLMCall, Message, SamplingParams

EOG = 1  # end-of-generation token
CHAT_MARKER = 2  # appended by tokenize_chat (the "assistant turn" of a chat template)
BYTE_OFFSET = 10
GATE_TIMEOUT = 10.0

Reply = Callable[[list[int]], str]


def tokenize(text: str) -> list[int]:
    return [b + BYTE_OFFSET for b in text.encode()]


def detokenize(tokens: Sequence[int]) -> str:
    """The text of ``tokens``, skipping the special (non-byte) ones."""
    return bytes(t - BYTE_OFFSET for t in tokens if t >= BYTE_OFFSET).decode(errors="replace")


def chat_text(messages: Sequence[Message]) -> str:
    return "".join(f"{m.role}: {m.content}\n" for m in messages)


@dataclass(frozen=True)
class ItemRecord:
    slot: int
    n_tokens: int
    pos: int
    sample: bool
    decode: bool  # feeds back the token sampled for this sequence in the previous step


@dataclass(frozen=True)
class PlanRecord:
    """A copy of one :class:`StepPlan` as the fake received it."""

    releases: tuple[int, ...]
    starts: tuple[int, ...]  # slots
    items: tuple[ItemRecord, ...]
    saves: tuple[int, ...] = ()  # slots
    restores: tuple[int, ...] = ()  # slots
    copies: tuple[KVCopy, ...] = ()
    trims: tuple[tuple[int, int], ...] = ()
    drops: tuple[str, ...] = ()

    @property
    def n_tokens(self) -> int:
        return sum(i.n_tokens for i in self.items)

    @property
    def slots(self) -> set[int]:
        """Slots that got tokens in this step."""
        return {i.slot for i in self.items}

    @property
    def decode_slots(self) -> set[int]:
        return {i.slot for i in self.items if i.decode}

    def item(self, slot: int) -> ItemRecord | None:
        return next((i for i in self.items if i.slot == slot), None)


@dataclass
class _Seq:
    """What the fake knows about the sequence in one slot: its KV (``tokens`` at positions
    0..len-1) and its sampler (``params`` and reply state; ``None`` params: no sampler)."""

    tokens: list[int]
    params: SamplingParams | None = None
    reply: bytes | None = None  # set at the first sample
    n_sampled: int = 0
    last_sampled: int | None = None


class FakeEngine:
    """A test double for :class:`~aios.llm.engine.Engine` (see the module docstring).

    Hooks a test may set: ``fail_next`` (raised by the next step), ``gate`` (steps wait until it
    is set, at most 10 s; with ``hold_from`` only steps from that index on wait).
    """

    def __init__(self, config: CoreConfig, reply: Reply | None = None) -> None:
        self.model_name = config.model
        self.description = "fake engine (test double)"
        self.slots = config.kv_sequences
        self.context_tokens = config.kv_cells
        self.unified = config.kv_unified
        self.stream_tokens = config.max_sequence_tokens
        self.max_sequence_tokens = config.max_sequence_tokens
        self.batch_tokens = config.batch_tokens
        self.reply: Reply = reply or (lambda prompt: "ok")
        self.plans: list[PlanRecord] = []
        self.prompts: list[list[int]] = []  # every prompt seen, in order of first sample
        self.violations: list[str] = []
        self.fail_next: Exception | None = None
        self.fail_on_save = False  # the next step that saves a context raises CoreError
        self.gate: threading.Event | None = None
        self.hold_from = 0
        self.blocked = False  # a step is waiting at the gate
        self.closed = False
        self._seqs: dict[int, _Seq] = {}

    # -- Engine protocol ------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return tokenize(text)

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        return [*tokenize(chat_text(messages)), CHAT_MARKER]

    def step(self, plan: StepPlan, store: ContextStore) -> list[Sampled]:
        index = len(self.plans)
        starts = tuple(s.slot for s in plan.starts)
        restores = tuple(r.slot for r in plan.restores)
        self.plans.append(
            PlanRecord(
                releases=tuple(plan.releases),
                starts=starts,
                items=tuple(
                    ItemRecord(
                        i.slot,
                        len(i.tokens),
                        i.pos,
                        i.sample,
                        i.slot in restores or self._decoding(i.slot, starts),
                    )
                    for i in plan.items
                ),
                saves=tuple(s.slot for s in plan.saves),
                restores=restores,
                copies=tuple(plan.copies),
                trims=tuple(plan.trims),
                drops=tuple(plan.drops),
            )
        )
        self._wait_at_gate(index)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        self._check(plan.n_tokens <= self.batch_tokens, f"step {index}: batch overrun")
        self._check(
            len({i.slot for i in plan.items}) == len(plan.items), f"step {index}: slot twice"
        )
        if self.fail_on_save and plan.saves:
            self.fail_on_save = False
            raise CoreError("injected failure while saving a context")
        for save in plan.saves:
            seq = self._seqs.pop(save.slot, None)
            if seq is None or seq.params is None:
                self._violation(f"step {index}: saved slot {save.slot} has no sequence")
            store.put(save.key, pickle.dumps(seq))
        for slot in plan.releases:
            self._seqs.pop(slot, None)
        for key in plan.drops:
            store.drop(key)
        for restore in plan.restores:
            busy = self._seqs.get(restore.slot)
            self._check(
                busy is None or not busy.tokens, f"step {index}: restore into busy {restore.slot}"
            )
            self._seqs[restore.slot] = pickle.loads(store.take(restore.key))
        for copy in plan.copies:
            src, dst = self._seqs.get(copy.src), self._seqs.get(copy.dst)
            self._check(dst is None or not dst.tokens, f"step {index}: copy into busy {copy.dst}")
            self._check(
                src is not None and len(src.tokens) >= copy.n, f"step {index}: bad copy {copy}"
            )
            assert src is not None
            if dst is None:
                self._seqs[copy.dst] = _Seq(src.tokens[: copy.n])
            else:  # a started sequence waiting for its prefix: keeps its sampler
                dst.tokens = src.tokens[: copy.n]
        for slot, keep in plan.trims:
            seq = self._seqs.get(slot)
            self._check(seq is not None, f"step {index}: trim of empty slot {slot}")
            assert seq is not None
            del seq.tokens[keep:]
        for start in plan.starts:
            self._check(0 <= start.slot < self.slots, f"step {index}: bad slot {start.slot}")
            kv = self._seqs.get(start.slot)
            self._seqs[start.slot] = _Seq(kv.tokens if kv is not None else [], start.params)
        sampled = [
            self._feed(index, item.slot, item.tokens, item.pos, item.sample) for item in plan.items
        ]
        if self.unified:
            used = sum(len(s.tokens) for s in self._seqs.values())
            self._check(used <= self.context_tokens, f"step {index}: KV cache overcommitted")
        else:
            longest = max((len(s.tokens) for s in self._seqs.values()), default=0)
            self._check(longest <= self.stream_tokens, f"step {index}: KV stream overrun")
        return [s for s in sampled if s is not None]

    def close(self) -> None:
        self.closed = True

    # -- internals --------------------------------------------------------------------------
    def _decoding(self, slot: int, starts: tuple[int, ...]) -> bool:
        seq = self._seqs.get(slot)
        return slot not in starts and seq is not None and seq.reply is not None

    def _wait_at_gate(self, index: int) -> None:
        gate = self.gate
        if gate is None or index < self.hold_from:
            return
        self.blocked = True
        try:
            opened = gate.wait(GATE_TIMEOUT)
        finally:
            self.blocked = False
        self._check(opened, f"step {index}: the gate never opened")

    def _check(self, ok: bool, what: str) -> None:
        if not ok:
            self._violation(what)

    def _violation(self, what: str) -> NoReturn:
        self.violations.append(what)
        raise AssertionError(what)

    def _feed(
        self, index: int, slot: int, tokens: Sequence[int], pos: int, sample: bool
    ) -> Sampled | None:
        seq = self._seqs.get(slot)
        if seq is None or seq.params is None:
            self._violation(f"step {index}: slot {slot} fed without a start")
        self._check(len(tokens) > 0, f"step {index}: empty item for slot {slot}")
        self._check(
            pos == len(seq.tokens),
            f"step {index}: slot {slot} fed at {pos}, expected {len(seq.tokens)}",
        )
        if seq.reply is not None:  # decoding: the token fed must be the one just sampled
            self._check(
                list(tokens) == [seq.last_sampled],
                f"step {index}: slot {slot} fed {list(tokens)}, sampled {seq.last_sampled}",
            )
        seq.tokens.extend(tokens)
        if not sample:
            return None
        if seq.reply is None:
            self.prompts.append(list(seq.tokens))
            seq.reply = self.reply(list(seq.tokens)).encode()
        if seq.n_sampled < len(seq.reply):
            byte = seq.reply[seq.n_sampled]
            token, piece, eog = byte + BYTE_OFFSET, bytes([byte]), False
        else:
            token, piece, eog = EOG, b"", True
        seq.n_sampled += 1
        seq.last_sampled = token
        return Sampled(slot, token, piece, eog)


class PreemptAt:
    """A test policy: FIFO, plus pre-empt a running request each time its output reaches one
    of ``points`` tokens. Records the slot each pre-emption took the request from."""

    name = "preempt-at"

    def __init__(self, points: Sequence[int], on_preempt: Any = None) -> None:
        self.points = set(points)
        self.on_preempt = on_preempt
        self.seen: set[tuple[str, int]] = set()
        self.slots: list[int | None] = []

    def schedule(
        self, now: float, waiting: Sequence[R], running: Sequence[R], capacity: Capacity
    ) -> Decision[R]:
        preempt = []
        for r in running:
            key = (r.id, r.generated)
            if r.generated in self.points and key not in self.seen:
                self.seen.add(key)
                preempt.append(r)
                self.slots.append(getattr(r, "slot", None))
                if self.on_preempt is not None:
                    self.on_preempt()
        admit = FIFO().schedule(now, waiting, running, capacity).admit
        return Decision(admit=admit, preempt=tuple(preempt))


class FakeFactory:
    """An engine factory for :class:`Kernel` that keeps the fakes it made, by core name."""

    def __init__(self, reply: Reply | None = None) -> None:
        self.reply = reply
        self.engines: dict[str, FakeEngine] = {}

    def __call__(self, config: CoreConfig) -> FakeEngine:
        engine = FakeEngine(config, self.reply)
        self.engines[config.name] = engine
        return engine

    @property
    def engine(self) -> FakeEngine:
        (engine,) = self.engines.values()
        return engine


CORE_DEFAULTS: dict[str, Any] = {
    "slots": 4,
    "cache_slots": 0,  # slot numbers in tests are those of the running slots
    "kv_unified": True,  # one pool of context_tokens cells: reservations are tested
    "context_tokens": 1024,
    "max_sequence_tokens": 256,
    "batch_tokens": 64,
    "default_max_tokens": 64,
}


def make_kernel(
    reply: Reply | None = None,
    *,
    syscall_timeout: float = 600.0,
    **core_overrides: Any,
) -> tuple[Kernel, FakeFactory]:
    """A kernel with one core named "fake" on a :class:`FakeEngine` (made when it starts)."""
    core = CoreConfig(name="fake", model="fake", **{**CORE_DEFAULTS, **core_overrides})
    factory = FakeFactory(reply)
    config = KernelConfig(cores=(core,), syscall_timeout=syscall_timeout)
    return Kernel(config, engine_factory=factory), factory


@contextlib.asynccontextmanager
async def running_kernel(
    reply: Reply | None = None, *, limit: float = 5.0, **kernel_args: Any
) -> AsyncIterator[tuple[Kernel, FakeEngine]]:
    """Run a kernel on a fake engine for at most ``limit`` seconds (a hang is a failure);
    ``kernel_args`` go to :func:`make_kernel`.

    On the way out the gate is opened (so shutdown never waits on a held step) and the fake
    must have seen no scheduling violation."""
    kernel, factory = make_kernel(reply, **kernel_args)
    async with asyncio.timeout(limit):
        async with kernel:
            fake = factory.engine
            try:
                yield kernel, fake
            finally:
                if fake.gate is not None:
                    fake.gate.set()
    assert fake.closed
    assert fake.violations == []


def prompt_call(text: str, **params: Any) -> LLMCall:
    return LLMCall(prompt=text, params=SamplingParams(**params))


def chat_call(text: str, **params: Any) -> LLMCall:
    return LLMCall(messages=(Message("user", text),), params=SamplingParams(**params))


async def ask(
    kernel: Kernel, call: LLMCall | str, *, process: AgentProcess | None = None, **kw: Any
) -> Completion:
    """Make one LLM syscall (a str is a completion prompt) for a fresh or given process."""
    if isinstance(call, str):
        call = prompt_call(call)
    return await kernel.llm(process or kernel.register("test"), call, **kw)


async def wait_until(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Poll ``predicate`` (state that changes on the core's thread) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.001)


def asked(kernel: Kernel) -> asyncio.Queue[Pending]:
    """Each approval the kernel asks for from now on, as it is asked (no polling)."""
    queue: asyncio.Queue[Pending] = asyncio.Queue()
    kernel.access.on_ask = queue.put_nowait
    return queue
