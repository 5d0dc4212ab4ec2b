"""Test engines that kill the process they run in, for tests/test_isolation.py.

:class:`CrashingEngine` is the :class:`~fakes.FakeEngine` test double plus a way to die: when it
is about to sample the first token for a prompt containing :data:`CRASH`, it marks the phase
and slot (as the real engine does before a native call) and aborts its process (``os.abort``:
SIGABRT, like an uncaught C++ exception) or segfaults it (``ctypes.string_at(0)``: SIGSEGV).

It runs in an isolated engine's child process, which is spawned: the child imports this module
by name, from the tests directory that pytest put on ``sys.path`` (a spawned child starts with
its parent's ``sys.path``). Everything handed to the child (the factory's arguments, the reply
function) is module-level, so it pickles.
"""

from __future__ import annotations

import ctypes
import functools
import os
import time
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

from fakes import CHAT_MARKER, FakeEngine, chat_text, detokenize, tokenize

from aios.config import CoreConfig
from aios.errors import ModelLoadError, Overloaded
from aios.llm.engine import ContextStore, Sampled, StepPlan
from aios.llm.isolated import IsolatedEngine, Mark, Phase, no_mark
from aios.syscall import Message

CRASH = "CRASH"  # a prompt containing this kills the engine at its first sample
OVERLOAD = "OVERLOAD"  # ... raises Overloaded (an AIOSError: crosses the pipe as itself)
BUG = "BUG"  # ... raises ZeroDivisionError (any other exception: becomes a CoreError)

How = Literal["abort", "segfault"]


def answer(prompt: Sequence[int]) -> str:
    """The reply to a prompt: its text, reversed (every call has its own answer)."""
    return "answer: " + detokenize(prompt)[::-1]


def die(how: How) -> NoReturn:
    if how == "abort":
        os.abort()
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    raise AssertionError("still alive after a segfault")


class CrashingEngine(FakeEngine):
    """A fake engine that dies on :data:`CRASH` (see the module docstring). ``phase`` is the
    phase it marks before dying (DECODE: a batch-wide call, no slot); ``step_seconds`` slows
    every step down so tests can catch calls in flight, ``load_seconds`` its start (a model
    load); ``die_on_load`` kills it while loading."""

    def __init__(
        self,
        config: CoreConfig,
        *,
        how: How = "abort",
        phase: Phase = Phase.SAMPLE,
        step_seconds: float = 0.0,
        load_seconds: float = 0.0,
        die_on_load: bool = False,
        mark: Mark = no_mark,
    ) -> None:
        if die_on_load:
            die(how)
        time.sleep(load_seconds)
        super().__init__(config, answer)
        self.description = "crashing fake engine (test double)"
        self.how: How = how
        self.phase = phase
        self.step_seconds = step_seconds
        self.mark = mark

    def step(self, plan: StepPlan, store: ContextStore) -> list[Sampled]:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        return super().step(plan, store)

    def _feed(
        self, index: int, slot: int, tokens: Sequence[int], pos: int, sample: bool
    ) -> Sampled | None:
        seq = self._seqs.get(slot)
        if sample and seq is not None and seq.reply is None:  # the first sample of a prompt
            text = detokenize([*seq.tokens, *tokens])
            if CRASH in text:
                self.mark(self.phase, None if self.phase is Phase.DECODE else slot)
                die(self.how)
            if OVERLOAD in text:
                raise Overloaded("the fake is overloaded", retry_after=7.0)
            if BUG in text:
                raise ZeroDivisionError("a bug in the engine")
        if sample:
            self.mark(Phase.SAMPLE, slot)
        return super()._feed(index, slot, tokens, pos, sample)


class FakeTokenizer:
    """The parent's side of a fake engine: the same tokens as :class:`~fakes.FakeEngine`."""

    def __init__(self) -> None:
        self.closed = False

    def tokenize(self, text: str) -> list[int]:
        return tokenize(text)

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        return [*tokenize(chat_text(messages)), CHAT_MARKER]

    def close(self) -> None:
        self.closed = True


class IsolatedFactory:
    """A kernel engine factory: an :class:`IsolatedEngine` around a :class:`CrashingEngine`
    (``engine_args``). Keeps every engine it made; after ``loads`` engines it refuses (a model
    that no longer loads), if given."""

    def __init__(self, *, loads: int | None = None, **engine_args: Any) -> None:
        self.engine_args = engine_args
        self.loads = loads
        self.engines: list[IsolatedEngine] = []

    def __call__(self, config: CoreConfig) -> IsolatedEngine:
        if self.loads is not None and len(self.engines) >= self.loads:
            raise ModelLoadError("the fake model no longer loads")
        build = functools.partial(CrashingEngine, config, **self.engine_args)
        engine = IsolatedEngine(config, build, FakeTokenizer())
        self.engines.append(engine)
        return engine
