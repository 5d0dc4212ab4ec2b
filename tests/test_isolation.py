"""Engine isolation: a native crash in the engine fails the calls it touched, not the kernel.

The fake-engine tests run :class:`~crashers.CrashingEngine` (a labelled test double that really
aborts or segfaults the process it runs in) behind a real :class:`IsolatedEngine`, through a
real kernel. The ``model`` tests send the request that aborted llama.cpp itself (a JSON
grammar at temperature 1e-40) straight to an isolated llama.cpp engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from crashers import BUG, CRASH, OVERLOAD, CrashingEngine, FakeTokenizer, IsolatedFactory, answer
from fakes import (
    CORE_DEFAULTS,
    FakeEngine,
    PreemptAt,
    ask,
    detokenize,
    prompt_call,
    tokenize,
    wait_until,
)

from aios.config import CoreConfig, KernelConfig
from aios.context import SnapshotStore
from aios.errors import (
    ConfigError,
    CoreError,
    EngineCrashed,
    ModelLoadError,
    Overloaded,
    error_classes,
)
from aios.kernel import Kernel, llamacpp_engine
from aios.llm.core import LLMCore
from aios.llm.engine import (
    BatchItem,
    ContextStore,
    Sampled,
    SeqRestore,
    SeqSave,
    SeqStart,
    StepPlan,
)
from aios.llm.isolated import IsolatedEngine, Phase
from aios.scheduler import FIFO
from aios.syscall import LLMCall, Message, SamplingParams

STEP = 0.005  # seconds per fake step: long enough to catch calls in flight
LONG = "a question long enough that its answer takes a while to generate"


def fake_config(**overrides: Any) -> CoreConfig:
    settings = {**CORE_DEFAULTS, "slots": 3, "default_max_tokens": 200, **overrides}
    return CoreConfig(name="fake", model="fake", **settings)


@contextlib.asynccontextmanager
async def isolated_kernel(
    *, limit: float = 60.0, loads: int | None = None, **engine_args: Any
) -> AsyncIterator[tuple[Kernel, IsolatedFactory]]:
    """A kernel whose one core runs a crashing fake engine in a child process."""
    factory = IsolatedFactory(loads=loads, **{"step_seconds": STEP, **engine_args})
    kernel = Kernel(KernelConfig(cores=(fake_config(),)), engine_factory=factory)
    async with asyncio.timeout(limit), kernel:
        yield kernel, factory
    for engine in factory.engines:  # every child is gone, with its private directory
        assert engine._process is not None and engine._process.returncode is not None
        assert not engine._spill.exists()


def expected(text: str) -> str:
    return answer(tokenize(text))


async def decoding(kernel: Kernel, tokens: int) -> None:
    """Wait until the core decoded ``tokens`` more tokens (calls are in flight)."""
    core = kernel.cores["fake"]
    assert isinstance(core, LLMCore)
    target = core.stats.decode_tokens + tokens
    await wait_until(lambda: core.stats.decode_tokens >= target, timeout=30)


def call(kernel: Kernel, text: str) -> asyncio.Task[Any]:
    return asyncio.create_task(ask(kernel, prompt_call(text), process=kernel.register(text[:8])))


# -- through a kernel ----------------------------------------------------------------------------
@pytest.mark.parametrize(("how", "signal"), [("abort", "SIGABRT"), ("segfault", "SIGSEGV")])
async def test_a_crash_fails_its_call_and_every_other_call_completes(how: str, signal: str) -> None:
    async with isolated_kernel(how=how) as (kernel, factory):
        core = kernel.cores["fake"]
        assert isinstance(core, LLMCore)
        b, c = call(kernel, f"bravo {LONG}"), call(kernel, f"charlie {LONG}")
        await decoding(kernel, 6)  # b and c are running, with output nobody has seen
        a = call(kernel, f"{CRASH} alpha")  # takes the last slot and crashes at its sample
        d = call(kernel, "delta")  # queued behind it: no slot left
        with pytest.raises(EngineCrashed, match=f"died of {signal} while sampling slot") as e:
            await a
        assert isinstance(e.value, CoreError) and e.value.slot is not None
        assert (await b).text == expected(f"bravo {LONG}")
        assert (await c).text == expected(f"charlie {LONG}")
        assert (await d).text == expected("delta")
        after = await ask(kernel, "echo")
        assert after.text == expected("echo")
        assert (core.stats.crashes, core.stats.restarts, core.stats.retried) == (1, 1, 2)
        assert core.stats.failed == 1
        first, second = factory.engines
        assert first.pid != second.pid and core.engine is second


async def test_a_streamed_call_in_flight_fails_instead_of_starting_again() -> None:
    async with isolated_kernel() as (kernel, _):
        streamed: list[str] = []
        seen = asyncio.Event()

        async def stream() -> None:
            events = kernel.llm_stream(kernel.register("s"), prompt_call(f"sierra {LONG}"))
            async with aclosing(events) as it:
                async for event in it:
                    if isinstance(event, str):
                        streamed.append(event)
                        seen.set()

        reader = asyncio.create_task(stream())
        await seen.wait()
        with pytest.raises(EngineCrashed):
            await call(kernel, f"{CRASH} alpha")
        with pytest.raises(CoreError, match="SIGABRT"):
            await reader  # the caller saw part of an answer that will never be finished
        assert streamed and expected(f"sierra {LONG}").startswith("".join(streamed))
        assert (await ask(kernel, "echo")).text == expected("echo")


async def test_two_crashes_in_a_row_are_contained_and_a_call_runs_again_only_once() -> None:
    async with isolated_kernel() as (kernel, _):
        core = kernel.cores["fake"]
        assert isinstance(core, LLMCore)
        long = call(kernel, f"bravo {LONG} {LONG}")
        for n in range(2):
            await decoding(kernel, 3)
            with pytest.raises(EngineCrashed):
                await call(kernel, f"{CRASH} {n}")
        with pytest.raises(EngineCrashed):
            await long  # run again after the first crash, lost again in the second
        assert (await ask(kernel, "echo")).text == expected("echo")  # on a third engine
        assert (core.stats.crashes, core.stats.restarts, core.stats.retried) == (2, 2, 1)


async def test_a_crash_in_a_batch_wide_call_fails_every_call_in_the_step() -> None:
    async with isolated_kernel(phase=Phase.DECODE) as (kernel, _):
        b = call(kernel, f"bravo {LONG}")
        await decoding(kernel, 3)
        a = call(kernel, f"{CRASH} alpha")
        with pytest.raises(EngineCrashed, match="while decoding the batch") as e:
            await a
        assert e.value.slot is None
        with pytest.raises(EngineCrashed):
            await b  # it was in the batch: it may be what crashed it
        assert (await ask(kernel, "echo")).text == expected("echo")


async def test_a_core_whose_engine_cannot_restart_goes_dead() -> None:
    async with isolated_kernel(loads=1) as (kernel, _):
        core = kernel.cores["fake"]
        b = call(kernel, f"bravo {LONG}")
        await decoding(kernel, 3)
        with pytest.raises(EngineCrashed):
            await call(kernel, f"{CRASH} alpha")
        with pytest.raises(CoreError, match="no longer loads"):
            await b
        with pytest.raises(CoreError, match="no longer loads"):
            await ask(kernel, "echo")  # refused at submit: a router would skip this core
        assert isinstance(core, LLMCore) and core.stats.restarts == 0


async def test_tokenization_is_served_while_the_engine_restarts() -> None:
    async with isolated_kernel(load_seconds=0.5) as (kernel, _):
        core = kernel.cores["fake"]
        assert isinstance(core, LLMCore)
        crash = call(kernel, f"{CRASH} alpha")
        await wait_until(lambda: core.stats.crashes == 1, timeout=30)
        assert core.stats.restarts == 0  # the fresh engine is still loading
        request = core.submit("late", prompt_call("late"))  # tokenized by the old engine's parent
        assert request.prompt_tokens == tokenize("late")
        assert (await request.future).text == expected("late")
        with pytest.raises(EngineCrashed):
            await crash


# -- the core's recovery, on an in-process stand-in -------------------------------------------
Dies = Callable[[StepPlan], EngineCrashed | None]


class DyingFake(FakeEngine):
    """In-process stand-in for an isolated engine whose child dies: raises what ``dies(plan)``
    returns (deterministic, so the core's bookkeeping can be checked step by step)."""

    def __init__(self, config: CoreConfig, dies: Dies) -> None:
        super().__init__(config, long_reply)
        self.dies = dies

    def step(self, plan: StepPlan, store: ContextStore) -> list[Sampled]:
        error = self.dies(plan)
        if error is not None:
            raise error
        return super().step(plan, store)


def long_reply(prompt: list[int]) -> str:
    return "abcdefghijklmnopqrstuvwxyz0123456789"


def dies_saving(plan: StepPlan) -> EngineCrashed | None:
    save = plan.saves[0] if plan.saves else None
    if save is None:
        return None
    return EngineCrashed("died while saving", slot=save.slot, key=save.key)


def dies_on_crash(plan: StepPlan) -> EngineCrashed | None:
    item = next((i for i in plan.items if CRASH in detokenize(i.tokens)), None)
    return None if item is None else EngineCrashed("died while sampling", slot=item.slot)


@contextlib.asynccontextmanager
async def dying_core(
    dies: Dies, policy: Any, **overrides: Any
) -> AsyncIterator[tuple[LLMCore, list[DyingFake]]]:
    config = fake_config(**overrides)
    fakes: list[DyingFake] = []

    def factory() -> DyingFake:
        fakes.append(DyingFake(config, dies))
        return fakes[-1]

    core = LLMCore(config, factory, policy)
    async with asyncio.timeout(10):
        await core.start()
        loop = asyncio.create_task(core.run())
        try:
            yield core, fakes
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            await core.close()
    assert all(f.closed and not f.violations for f in fakes)


async def test_a_crash_while_saving_fails_the_call_being_saved_and_restarts_the_others() -> None:
    async with dying_core(dies_saving, PreemptAt([3]), slots=2) as (core, fakes):
        x, y = core.submit("x", prompt_call("x")), core.submit("y", prompt_call("y"))
        done = await asyncio.gather(x.future, y.future, return_exceptions=True)
        failed = [r for r, d in zip((x, y), done, strict=True) if isinstance(d, EngineCrashed)]
        assert len(failed) == 1  # the first of the two saved in that step
        (ok,) = [d for d in done if not isinstance(d, BaseException)]
        assert ok.text == long_reply([])  # from scratch: nothing of the lost run is left
        assert (core.stats.crashes, core.stats.restarts, core.stats.retried) == (1, 1, 1)
        assert len(fakes) == 2 and core.engine is fakes[1]


async def test_a_call_preempted_before_the_crash_runs_again_from_scratch() -> None:
    async with dying_core(dies_on_crash, PreemptAt([3]), slots=1) as (core, _):
        x = core.submit("x", prompt_call("x"))  # pre-empted at 3 tokens for the next one
        y = core.submit("y", prompt_call(f"{CRASH} y"))
        with pytest.raises(EngineCrashed):
            await y.future
        assert x.restarts == 1 and x.snapshot is None
        assert (await x.future).text == long_reply([])
        assert core.stats.preemptions == 1 and core.stats.retried == 1
        assert len(core.snapshots) == 0  # the dead engine's snapshot of x was dropped
        assert (core.active, core.queued, core.cached) == (0, 0, 1)


# -- the isolated engine itself --------------------------------------------------------------------
def isolated(**engine_args: Any) -> IsolatedEngine:
    config = fake_config()
    return IsolatedEngine(
        config, functools.partial(CrashingEngine, config, **engine_args), FakeTokenizer()
    )


def start(slot: int, text: str) -> StepPlan:
    return StepPlan(
        starts=[SeqStart(slot, SamplingParams())], items=[BatchItem(slot, tokenize(text), 0, True)]
    )


def test_steps_cross_the_socket_as_they_run_in_process() -> None:
    config = fake_config()
    local, store = CrashingEngine(config), SnapshotStore(2**20)
    engine, parent_store = isolated(), SnapshotStore(0)
    try:
        assert (engine.slots, engine.max_sequence_tokens) == (local.slots, 256)
        assert engine.description == local.description
        plans = [
            start(0, "hello"),
            StepPlan(saves=[SeqSave(0, "k")]),
            StepPlan(restores=[SeqRestore(1, "k")]),
        ]
        for plan in plans:
            assert engine.step(plan, parent_store) == local.step(plan, store)
        assert len(parent_store) == 0  # the snapshot lived in the child's store ...
        assert parent_store.stats.saved == parent_store.stats.restored == 1  # ... seen here
    finally:
        engine.close()
    assert engine._process is not None and engine._process.returncode == 0
    assert not engine._spill.exists()


def test_engine_errors_cross_as_themselves_or_as_core_errors() -> None:
    engine = isolated()
    try:
        with pytest.raises(Overloaded) as e:
            engine.step(start(0, OVERLOAD), SnapshotStore(0))
        assert e.value.retry_after == 7.0
        with pytest.raises(CoreError, match="ZeroDivisionError: a bug in the engine"):
            engine.step(start(1, BUG), SnapshotStore(0))
        assert engine.step(start(2, "fine"), SnapshotStore(0))  # the engine is still up
    finally:
        engine.close()


def test_a_crash_while_loading_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="died of SIGABRT while loading the model"):
        isolated(die_on_load=True)


def test_a_dead_engine_refuses_steps_and_still_closes() -> None:
    engine = isolated()
    with pytest.raises(EngineCrashed):
        engine.step(start(0, CRASH), SnapshotStore(0))
    with pytest.raises(CoreError, match="the engine process is gone"):
        engine.step(start(1, "again"), SnapshotStore(0))
    assert engine.tokenize("hi") == tokenize("hi")  # the parent's tokenizer still serves
    engine.close()
    engine.close()  # idempotent


def test_the_child_exits_when_its_parent_is_gone() -> None:
    engine = isolated()
    process = engine._process
    assert process is not None
    engine._conn.close()  # what the parent's death does to the child's socket
    assert process.wait(10) == 0
    engine.close()


def test_the_error_is_typed_and_configurable() -> None:
    assert error_classes()["engine_crashed"] is EngineCrashed
    assert issubclass(EngineCrashed, CoreError)
    assert CoreConfig().isolate is True
    with pytest.raises(ConfigError, match="isolate"):
        CoreConfig(isolate="no")  # type: ignore[arg-type]


# -- the real model ----------------------------------------------------------------------------
def grammar_abort_call() -> LLMCall:
    """The attack run's request, past the validation that now makes such a temperature greedy:
    llama.cpp's grammar sampler throws an uncaught std::runtime_error on it."""
    params = SamplingParams(json=True, max_tokens=8)
    object.__setattr__(params, "temperature", 1e-40)
    return LLMCall(messages=(Message("user", "Give me a JSON object."),), params=params)


def chat(text: str, max_tokens: int) -> LLMCall:
    return LLMCall(messages=(Message("user", text),), params=SamplingParams(max_tokens=max_tokens))


@pytest.mark.model
async def test_the_grammar_abort_is_contained_on_the_real_model() -> None:
    config = KernelConfig(cores=(CoreConfig(name="m", slots=2),))
    async with asyncio.timeout(120), Kernel(config) as kernel:
        core = kernel.cores["m"]
        assert isinstance(core, LLMCore) and isinstance(core.engine, IsolatedEngine)
        proc = kernel.register("attack")
        bad, other = await asyncio.gather(
            kernel.llm(proc, grammar_abort_call()),
            kernel.llm(kernel.register("other"), chat("Name three colors.", 16)),
            return_exceptions=True,
        )
        assert isinstance(bad, EngineCrashed), bad
        assert "died of SIGABRT while sampling slot" in str(bad)
        assert not isinstance(other, BaseException) and other.text
        after = await kernel.llm(proc, chat("What is the capital of France?", 16))
        assert "Paris" in after.text
        assert (core.stats.crashes, core.stats.restarts) == (1, 1)


@pytest.mark.model
async def test_isolated_greedy_decoding_is_identical_to_in_process() -> None:
    outputs = {}
    for isolate in (False, True):
        config = CoreConfig(name="m", slots=2, isolate=isolate)
        core = LLMCore(config, lambda config=config: llamacpp_engine(config), FIFO())
        await core.start()
        loop = asyncio.create_task(core.run())
        try:
            story = LLMCall(
                messages=(Message("user", "Tell me a story about a lighthouse keeper."),),
                params=SamplingParams(max_tokens=48, ignore_eos=True),
            )
            request = core.submit("a", story)
            await asyncio.wait_for(request.future, 60)
            outputs[isolate] = (request.prompt_tokens, request.output_tokens)
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            await core.close()
    assert outputs[True] == outputs[False]
    assert len(outputs[True][1]) == 48


def test_the_private_directory_is_made_under_spill_dir(tmp_path: Path) -> None:
    config = fake_config(spill_dir=str(tmp_path / "spill"))
    engine = IsolatedEngine(config, functools.partial(CrashingEngine, config), FakeTokenizer())
    assert engine._spill.parent == tmp_path / "spill"
    engine.close()
    assert os.listdir(tmp_path / "spill") == []


async def test_a_router_does_not_move_a_call_that_crashed_its_engine() -> None:
    """The crashing call fails where it crashed (on another core it would crash that one
    too); the router's other calls still complete."""
    from aios.config import RouterConfig

    factory = IsolatedFactory(step_seconds=STEP)
    a, b = (dataclasses.replace(fake_config(), name=name) for name in ("a", "b"))
    cores = (a, b, RouterConfig(name="pool", cores=("a", "b")))
    async with asyncio.timeout(60), Kernel(KernelConfig(cores=cores), engine_factory=factory) as k:
        p = k.register("agent")
        crash = k.llm(p, LLMCall(prompt=f"{CRASH} alpha", model="pool"))
        other = k.llm(p, LLMCall(prompt="bravo", model="pool"))
        results = await asyncio.gather(crash, other, return_exceptions=True)
        assert isinstance(results[0], EngineCrashed)
        assert not isinstance(results[1], BaseException) and results[1].text == expected("bravo")
        crashes = [c.stats.crashes for c in (k.cores["a"], k.cores["b"]) if isinstance(c, LLMCore)]
        assert sorted(crashes) == [0, 1]
