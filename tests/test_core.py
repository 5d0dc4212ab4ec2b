"""The LLM core and the kernel, on the fake engine (tests/fakes.py).

Each test runs a kernel for at most a few seconds (``running_kernel``), so a scheduling bug is
a failure, not a hang. Tests that need a step held in flight close the fake's ``gate``.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from typing import Any

import pytest
from fakes import (
    CHAT_MARKER,
    CORE_DEFAULTS,
    FakeEngine,
    PlanRecord,
    Reply,
    ask,
    chat_call,
    detokenize,
    make_kernel,
    prompt_call,
    running_kernel,
    tokenize,
    wait_until,
)

from aios.config import CoreConfig
from aios.context import SnapshotStore
from aios.errors import (
    AIOSError,
    ContextOverflow,
    CoreError,
    DeadlineExceeded,
    InvalidRequest,
    KernelShutdown,
    ModelNotFound,
    Overloaded,
    SyscallCancelled,
)
from aios.kernel import Kernel
from aios.llm.core import LLMCore
from aios.llm.engine import BatchItem, KVCopy, SeqSave, SeqStart, StepPlan
from aios.process import AgentState
from aios.scheduler import FIFO
from aios.sdk import Agent
from aios.syscall import LLMCall, LLMRequest, SamplingParams


def core_of(kernel: Kernel) -> LLMCore:
    return kernel.cores["fake"]


def hold(fake: FakeEngine, from_step: int = 0) -> threading.Event:
    """Make steps from ``from_step`` on wait until the returned gate is set."""
    fake.gate = threading.Event()
    fake.hold_from = from_step
    return fake.gate


def starts_of(plans: list[PlanRecord], slot: int) -> list[int]:
    return [i for i, p in enumerate(plans) if slot in p.starts]


def releases_of(plans: list[PlanRecord], slot: int) -> list[int]:
    return [i for i, p in enumerate(plans) if slot in p.releases]


def by_prompt(replies: dict[str, str], default: str = "ok") -> Reply:
    """A reply function keyed by the prompt's text."""
    return lambda tokens: replies.get(detokenize(tokens), default)


# -- one request ---------------------------------------------------------------------------------


async def test_single_request_completes() -> None:
    async with running_kernel() as (kernel, fake):
        process = kernel.register("solo")
        completion = await ask(kernel, chat_call("hi"), process=process)
    prompt = [*tokenize("user: hi\n"), CHAT_MARKER]
    assert fake.prompts == [prompt]
    assert completion.text == "ok"
    assert completion.finish_reason == "stop"
    assert completion.model == "fake"
    assert completion.usage.prompt_tokens == len(prompt)
    assert completion.usage.completion_tokens == 2  # the end-of-generation token is not counted
    t = completion.timings
    assert t.admitted is not None and t.first_token is not None and t.finished is not None
    assert t.submitted < t.admitted < t.first_token < t.finished  # one clock, the loop's
    assert process.syscalls == 1
    assert (process.prompt_tokens, process.completion_tokens) == (len(prompt), 2)
    stats = core_of(kernel).stats
    assert (stats.completed, stats.failed, stats.cancelled) == (1, 0, 0)
    assert (stats.prefill_tokens, stats.decode_tokens) == (len(prompt), 2)


@pytest.mark.parametrize(
    ("params", "text", "finish_reason", "completion_tokens"),
    [
        ({}, "hello world", "stop", 11),
        ({"stop": (" ",)}, "hello", "stop", 6),
        ({"max_tokens": 3}, "hel", "length", 3),
        ({"max_tokens": 15, "ignore_eos": True}, "hello world", "length", 15),
    ],
)
async def test_finish_reasons(
    params: dict[str, Any], text: str, finish_reason: str, completion_tokens: int
) -> None:
    async with running_kernel(lambda _: "hello world") as (kernel, _fake):
        completion = await ask(kernel, prompt_call("greet", **params))
    assert completion.text == text
    assert completion.finish_reason == finish_reason
    assert completion.usage.completion_tokens == completion_tokens


async def test_max_tokens_defaults_to_the_room_left() -> None:
    async with running_kernel(lambda _: "abcdefgh", max_sequence_tokens=64) as (kernel, _fake):
        completion = await ask(kernel, "x" * 60)
    assert (completion.text, completion.finish_reason) == ("abcd", "length")


# -- continuous batching ---------------------------------------------------------------------------


async def test_concurrent_requests_decode_in_the_same_steps() -> None:
    async with running_kernel(lambda _: "abcdefgh", slots=4) as (kernel, fake):
        completions = await asyncio.gather(*(ask(kernel, f"r{i}") for i in range(4)))
    assert [c.text for c in completions] == ["abcdefgh"] * 4
    assert max(len(p.decode_slots) for p in fake.plans) == 4


async def test_request_is_admitted_between_steps_while_others_decode() -> None:
    replies = {"first": "x" * 10, "late": "second"}
    async with running_kernel(by_prompt(replies), slots=4) as (kernel, fake):
        gate = hold(fake, from_step=3)  # "first" has sampled 3 tokens when step 3 is held
        first = asyncio.create_task(ask(kernel, "first"))
        await wait_until(lambda: fake.blocked)
        late = asyncio.create_task(ask(kernel, "late"))
        await wait_until(lambda: core_of(kernel).queued == 1)
        gate.set()
        assert (await first).text == "x" * 10
        assert (await late).text == "second"
    plans = fake.plans
    assert starts_of(plans, 1) == [4]  # admitted in the very next step...
    assert 0 in plans[4].decode_slots  # ...which also decodes the first request
    assert max(i for i, p in enumerate(plans) if 0 in p.slots) > 4  # still running after


async def test_chunked_prefill_does_not_stall_decoding() -> None:
    replies = {"a": "y" * 40, "p" * 50: "done"}
    async with running_kernel(by_prompt(replies), slots=2, batch_tokens=16) as (kernel, fake):
        gate = hold(fake, from_step=2)
        decoding = asyncio.create_task(ask(kernel, "a"))
        await wait_until(lambda: fake.blocked)
        long_prompt = asyncio.create_task(ask(kernel, "p" * 50))
        await wait_until(lambda: core_of(kernel).queued == 1)
        gate.set()
        assert (await decoding).text == "y" * 40
        assert (await long_prompt).text == "done"
    plans = fake.plans
    assert all(p.n_tokens <= 16 for p in plans)
    prefill = [(i, p.item(1)) for i, p in enumerate(plans) if 1 in p.slots - p.decode_slots]
    steps = [i for i, _ in prefill]
    chunks = [item for _, item in prefill if item is not None]
    assert len(steps) >= 3
    assert steps == list(range(steps[0], steps[0] + len(steps)))  # consecutive steps
    assert sum(c.n_tokens for c in chunks) == 50
    assert [c.pos for c in chunks] == [sum(c.n_tokens for c in chunks[:k]) for k in range(4)]
    assert [c.sample for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all(0 in plans[i].decode_slots for i in steps)  # the decoder never skipped a step


async def test_freed_slot_is_released_then_reused() -> None:
    async with running_kernel(slots=1) as (kernel, fake):
        first, second = await asyncio.gather(ask(kernel, "one"), ask(kernel, "two"))
    assert first.text == second.text == "ok"
    starts, releases = starts_of(fake.plans, 0), releases_of(fake.plans, 0)
    assert len(starts) == 2
    assert any(starts[0] < r <= starts[1] for r in releases)
    assert first.timings.finished is not None and second.timings.admitted is not None
    assert second.timings.admitted >= first.timings.finished


async def test_waiting_request_takes_a_finished_slot_in_the_next_step() -> None:
    replies = {"long": "z" * 20, "short": "ok"}
    async with running_kernel(by_prompt(replies), slots=2) as (kernel, fake):
        await asyncio.gather(ask(kernel, "long"), ask(kernel, "short"), ask(kernel, "waiting"))
    plans = fake.plans
    assert plans[0].starts == (0, 1)  # "long" on slot 0, "short" on slot 1
    assert plans[2].decode_slots == {0, 1}  # "short" samples its end of generation in step 2
    assert starts_of(plans, 1) == [0, 3]  # "waiting" should take slot 1 in step 3


async def test_more_requests_than_slots() -> None:
    async with running_kernel(lambda p: detokenize(p).upper(), slots=2) as (kernel, fake):
        completions = await asyncio.gather(*(ask(kernel, f"req{i}") for i in range(6)))
    assert [c.text for c in completions] == [f"REQ{i}" for i in range(6)]
    assert all(p.slots <= {0, 1} for p in fake.plans)
    assert max(len(p.slots) for p in fake.plans) == 2


async def test_kv_reservation_serializes_requests_that_do_not_fit_together() -> None:
    # Each request reserves 2 + 25 KV cells; two of them do not fit in 40.
    limits: dict[str, Any] = {"context_tokens": 40, "max_sequence_tokens": 40, "batch_tokens": 16}
    async with running_kernel(slots=4, **limits) as (kernel, fake):
        calls = [prompt_call(f"q{i}", max_tokens=25) for i in range(4)]
        completions = await asyncio.gather(*(ask(kernel, c) for c in calls))
    assert [c.text for c in completions] == ["ok"] * 4
    assert all(len(p.slots) <= 1 for p in fake.plans)
    timings = sorted((c.timings for c in completions), key=lambda t: t.submitted)
    for before, after in itertools.pairwise(timings):
        assert before.finished is not None and after.admitted is not None
        assert after.admitted >= before.finished


# -- invalid input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_call", "kwargs", "error"),
    [
        (lambda: prompt_call("x", max_tokens=-1), {}, InvalidRequest),
        (lambda: LLMCall(prompt="x", model="nope"), {}, ModelNotFound),
        (lambda: prompt_call("x" * 64), {}, ContextOverflow),  # no room for one token
        (lambda: prompt_call("x" * 60, max_tokens=5), {}, ContextOverflow),
        (lambda: prompt_call("x"), {"timeout": 0}, InvalidRequest),
    ],
    ids=["negative-max-tokens", "unknown-model", "prompt-too-long", "no-room", "zero-timeout"],
)
async def test_invalid_call_fails_at_once_and_others_still_run(
    make_call: Any, kwargs: dict[str, Any], error: type[AIOSError]
) -> None:
    async with running_kernel(max_sequence_tokens=64) as (kernel, fake):
        gate = hold(fake)
        running = asyncio.create_task(ask(kernel, "fine"))
        await wait_until(lambda: fake.blocked)
        with pytest.raises(error):
            await ask(kernel, make_call(), **kwargs)
        assert (core_of(kernel).queued, core_of(kernel).active) == (0, 1)
        gate.set()
        assert (await running).text == "ok"
        assert (await ask(kernel, prompt_call("x" * 60, max_tokens=4))).text == "ok"  # fits
    assert len(fake.prompts) == 2


# -- cancellation and deadlines ------------------------------------------------------------------


async def test_cancelled_caller_frees_its_slot() -> None:
    async with running_kernel(slots=1) as (kernel, fake):
        gate = hold(fake, from_step=1)  # mid-decode: the first token is sampled
        caller = asyncio.create_task(ask(kernel, "abandoned"))
        await wait_until(lambda: fake.blocked)
        core = core_of(kernel)
        assert core.active == 1
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert core.active == 0
        assert core.stats.cancelled == 1
        gate.set()
        assert (await ask(kernel, "next")).text == "ok"
    starts = starts_of(fake.plans, 0)
    assert len(starts) == 2
    assert any(1 < r <= starts[1] for r in releases_of(fake.plans, 0))


async def test_a_request_knows_its_core_and_another_core_refuses_it() -> None:
    async with running_kernel(slots=1) as (kernel, fake):
        gate = hold(fake)
        caller = asyncio.create_task(ask(kernel, "mine"))
        await wait_until(lambda: fake.blocked)
        core = core_of(kernel)
        (request,) = [s for s, _ in kernel.syscalls.values() if isinstance(s, LLMRequest)]
        assert request.core is core
        other = LLMCore(core.config, lambda: fake, FIFO())
        with pytest.raises(CoreError, match="not a request of core"):
            other.cancel(request)  # a typed error, and the request is untouched
        assert core.active == 1 and not request.status.finished
        kernel.cancel(request)  # the kernel cancels through request.core
        with pytest.raises(SyscallCancelled):
            await caller
        assert core.active == 0 and core.stats.cancelled == 1
        gate.set()


async def test_cancelled_while_queued_never_runs() -> None:
    async with running_kernel(slots=1) as (kernel, fake):
        gate = hold(fake)
        running = asyncio.create_task(ask(kernel, "running"))
        await wait_until(lambda: fake.blocked)
        queued = asyncio.create_task(ask(kernel, "queued"))
        await wait_until(lambda: core_of(kernel).queued == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert core_of(kernel).queued == 0
        gate.set()
        assert (await running).text == "ok"
    assert [detokenize(p) for p in fake.prompts] == ["running"]


@pytest.mark.parametrize(
    ("kernel_kwargs", "call_kwargs"),
    [({}, {"timeout": 0.05}), ({"syscall_timeout": 0.05}, {})],
    ids=["call-timeout", "kernel-default-timeout"],
)
async def test_deadline_exceeded_frees_the_slot(
    kernel_kwargs: dict[str, Any], call_kwargs: dict[str, Any]
) -> None:
    async with running_kernel(slots=1, **kernel_kwargs) as (kernel, fake):
        gate = hold(fake)
        process = kernel.register("impatient")
        with pytest.raises(DeadlineExceeded):
            await ask(kernel, "slow", process=process, **call_kwargs)
        core = core_of(kernel)
        assert (core.active, core.queued, core.stats.cancelled) == (0, 0, 1)
        assert process.state is AgentState.RUNNING and process.syscalls == 1
        gate.set()
        call_kwargs = {"timeout": 5.0}  # the next call must not inherit a tight deadline
        assert (await ask(kernel, "fast", **call_kwargs)).text == "ok"
    assert len(starts_of(fake.plans, 0)) == 2
    assert releases_of(fake.plans, 0)


# -- failures, overload, shutdown ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("raised", "expected", "message"),
    [
        (RuntimeError("boom"), CoreError, "RuntimeError: boom"),
        (ContextOverflow("kv full"), ContextOverflow, "kv full"),  # typed errors pass through
    ],
)
async def test_engine_failure_fails_its_step_and_the_core_keeps_serving(
    raised: Exception, expected: type[AIOSError], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("ERROR", logger="aios.llm.core")
    async with running_kernel(slots=2) as (kernel, fake):
        fake.fail_next = raised
        results = await asyncio.gather(ask(kernel, "a"), ask(kernel, "b"), return_exceptions=True)
        assert fake.plans[0].starts == (0, 1)
        for result in results:
            assert isinstance(result, expected)
            assert message in str(result)
        assert core_of(kernel).stats.failed == 2
        assert (await ask(kernel, "again")).text == "ok"
        assert (core_of(kernel).active, core_of(kernel).queued) == (0, 0)
    # An engine bug is logged with its traceback (its callers only see a CoreError); a typed
    # error is the caller's to see, not a bug.
    logged = [r for r in caplog.records if r.exc_info and r.exc_info[1] is raised]
    assert len(logged) == (0 if isinstance(raised, AIOSError) else 1)


async def test_engine_failure_fails_requests_admitted_without_tokens() -> None:
    # A 10-token prompt takes the whole batch, so the second request starts with no item.
    async with running_kernel(slots=2, batch_tokens=4) as (kernel, fake):
        fake.fail_next = RuntimeError("boom")
        results = await asyncio.gather(
            ask(kernel, "0123456789"), ask(kernel, "b"), return_exceptions=True
        )
        assert fake.plans[0].starts == (0, 1)
        assert fake.plans[0].slots == {0}
        assert [type(r) for r in results] == [CoreError, CoreError]
        assert (await ask(kernel, "again")).text == "ok"


async def test_full_queue_is_overloaded() -> None:
    async with running_kernel(slots=1, max_queue=2) as (kernel, fake):
        gate = hold(fake)
        callers = [asyncio.create_task(ask(kernel, "running"))]
        await wait_until(lambda: fake.blocked)
        callers += [asyncio.create_task(ask(kernel, f"queued{i}")) for i in range(2)]
        await wait_until(lambda: core_of(kernel).queued == 2)
        with pytest.raises(Overloaded):
            await ask(kernel, "one too many")
        gate.set()
        assert [c.text for c in await asyncio.gather(*callers)] == ["ok"] * 3


async def test_process_state_follows_its_syscall() -> None:
    async with running_kernel(slots=1) as (kernel, fake):
        gate = hold(fake)
        generating, queued = kernel.register("a"), kernel.register("b")
        callers = [asyncio.create_task(ask(kernel, "a", process=generating))]
        await wait_until(lambda: fake.blocked)
        callers.append(asyncio.create_task(ask(kernel, "b", process=queued)))
        await wait_until(lambda: core_of(kernel).queued == 1)
        assert (generating.state, queued.state) == (AgentState.GENERATING, AgentState.QUEUED)
        gate.set()
        await asyncio.gather(*callers)
        assert generating.state is queued.state is AgentState.RUNNING  # between syscalls
        assert queued.waited > 0


async def test_shutdown_fails_every_waiting_caller() -> None:
    kernel, factory = make_kernel(slots=1)
    async with asyncio.timeout(5):
        async with kernel:
            fake = factory.engine
            gate = hold(fake)
            callers = [asyncio.create_task(ask(kernel, f"r{i}")) for i in range(3)]
            await wait_until(lambda: fake.blocked and core_of(kernel).queued == 2)

            async def answered_while_step_held() -> bool:
                await asyncio.wait(callers)
                return fake.blocked

            watcher = asyncio.create_task(answered_while_step_held())
            asyncio.get_running_loop().call_later(0.5, gate.set)
        results = await asyncio.gather(*callers, return_exceptions=True)
        assert await watcher  # callers did not wait for the held step to end
    assert [type(r) for r in results] == [KernelShutdown] * 3
    assert fake.closed
    with pytest.raises(KernelShutdown):
        await ask(kernel, "too late")


async def test_llm_before_start_is_refused() -> None:
    kernel, _factory = make_kernel()
    with pytest.raises(KernelShutdown):
        await ask(kernel, "early")


def test_fake_engine_catches_bad_plans() -> None:
    """The fake itself must catch scheduling bugs, or the tests above would prove little."""
    fake = FakeEngine(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS))
    store = SnapshotStore(2**20)
    prompt = BatchItem(0, tokenize("hi"), 0, True)
    (sampled,) = fake.step(StepPlan(starts=[SeqStart(0, SamplingParams())], items=[prompt]), store)
    assert sampled.piece == b"o"
    bad_plans = {
        "fed at 3, expected 2": BatchItem(0, [sampled.token], 3, True),
        "sampled": BatchItem(0, [sampled.token + 1], 2, True),
        "without a start": BatchItem(1, [11], 0, True),
        "batch overrun": BatchItem(0, [sampled.token] * 65, 2, True),
    }
    for error, item in bad_plans.items():
        with pytest.raises(AssertionError, match=error):
            fake.step(StepPlan(items=[item]), store)
    bad_ops = {
        "copy into busy": StepPlan(copies=[KVCopy(0, 0, 1)]),
        "bad copy": StepPlan(copies=[KVCopy(0, 1, 9)]),
        "trim of empty": StepPlan(trims=[(3, 0)]),
        "saved slot 2 has no sequence": StepPlan(saves=[SeqSave(2, "k")]),
    }
    for error, plan in bad_ops.items():
        with pytest.raises(AssertionError, match=error):
            fake.step(plan, store)
    assert len(fake.violations) == len(bad_plans) + len(bad_ops)
    (sampled,) = fake.step(StepPlan(items=[BatchItem(0, [sampled.token], 2, True)]), store)
    assert sampled.piece == b"k"


# -- agents ---------------------------------------------------------------------------------------


def bracket(tokens: list[int]) -> str:
    return f"<{detokenize(tokens).strip()}>"


class TwoCalls(Agent):
    name = "two-calls"

    async def run(self, task: str) -> str:
        first = await self.llm.chat([{"role": "user", "content": task}])
        second = await self.llm.complete(f"{first.text}!")  # depends on the first answer
        return second.text


class Broken(Agent):
    name = "broken"

    async def run(self, task: str) -> str:
        await self.llm.chat([{"role": "user", "content": task}])
        raise ValueError("no luck")


class WrongModel(Agent):
    name = "wrong-model"

    async def run(self, task: str) -> str:
        return (await self.llm.complete(task, model="nope")).text


async def test_agent_makes_dependent_calls() -> None:
    async with running_kernel(bracket) as (kernel, _fake):
        process = await kernel.run_agent(TwoCalls, "hello")
    assert process.result == "<<user: hello>!>"
    assert process.state is AgentState.DONE
    assert process.error is None
    assert process.syscalls == 2
    prompts = len("user: hello\n") + 1 + len("<user: hello>!")
    assert process.prompt_tokens == prompts
    assert process.completion_tokens == len("<user: hello>") + len("<<user: hello>!>")
    assert process.turnaround is not None and process.turnaround >= 0
    assert kernel.processes[process.id] is process


@pytest.mark.parametrize(
    ("agent", "error"),
    [(Broken, "agent error: ValueError: no luck"), (WrongModel, "model_not_found: ")],
)
async def test_failing_agent_does_not_affect_others(agent: type[Agent], error: str) -> None:
    async with running_kernel(bracket) as (kernel, _fake):
        failed, done = await asyncio.gather(
            kernel.run_agent(agent, "x"), kernel.run_agent(TwoCalls, "hello")
        )
    assert failed.state is AgentState.FAILED
    assert failed.error is not None and failed.error.startswith(error)
    assert failed.result is None and failed.finished is not None
    assert done.state is AgentState.DONE
    assert done.result == "<<user: hello>!>"
