"""Per-agent quotas (aios.quota): the sliding token window, the cap on calls in flight, and
their place in the kernel's LLM syscall. Time is a fake clock; interleavings are forced with
events, never with sleeps."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fakes import CORE_DEFAULTS, FakeFactory, prompt_call, wait_until

from aios.config import AccessConfig, CoreConfig, KernelConfig
from aios.errors import ConfigError, DeadlineExceeded, QuotaExceeded
from aios.kernel import Kernel
from aios.process import AgentState
from aios.quota import Quota, Quotas


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def settle() -> None:
    """Let every ready task run until all of them block again."""
    for _ in range(10):
        await asyncio.sleep(0)


# -- Quota ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tokens_per_minute": 0},
        {"tokens_per_minute": -5},
        {"max_parallel": 0},
        {"max_parallel": 1.5},
        {"max_parallel": True},
        {"tokens_per_minute": "100"},
    ],
)
def test_invalid_quota_is_a_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="positive integer or None"):
        Quota(**kwargs)  # type: ignore[arg-type]


def test_kernel_config_has_no_quota_by_default() -> None:
    assert KernelConfig().quota == Quota() and Quota().unlimited
    assert not Quota(max_parallel=1).unlimited


def test_most_generous_takes_each_limit_at_its_loosest() -> None:
    tight, wide = Quota(100, 1), Quota(1000, None)
    assert Quota.most_generous([tight, wide]) == Quota(1000, None)
    assert Quota.most_generous([tight, Quota(None, 4)]) == Quota(None, 4)
    assert Quota.most_generous([tight]) == tight and Quota.most_generous([]) == Quota()


async def test_an_agent_with_its_own_quota_is_held_to_it() -> None:
    quotas = Quotas(Quota(max_parallel=1))
    own = Quota(max_parallel=2)
    async with quotas.admit("wide", own), quotas.admit("wide", own):  # two at once: its own
        assert quotas.in_flight("wide") == 2
        async with quotas.admit("narrow"):
            second = asyncio.create_task(quotas.admit("narrow").__aenter__())
            await settle()
            assert not second.done()  # the shared default: one at a time
            second.cancel()
    quotas = Quotas(Quota(tokens_per_minute=10))
    quotas.charge("big", 50, Quota(tokens_per_minute=100))
    async with quotas.admit("big", Quota(tokens_per_minute=100)):
        pass
    with pytest.raises(QuotaExceeded, match="limit of 50 "):
        async with quotas.admit("big", Quota(tokens_per_minute=50)):  # a changed quota applies
            pass


async def test_no_limits_keeps_no_state() -> None:
    quotas = Quotas()
    async with quotas.admit("a"), quotas.admit("a"):
        pass
    quotas.charge("a", 10**9)
    assert len(quotas) == 0 and quotas.used("a") == 0


def test_negative_charge_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        Quotas(Quota(tokens_per_minute=10)).charge("a", -1)


# -- max_parallel ----------------------------------------------------------------------------


async def test_never_more_than_max_parallel_in_flight() -> None:
    quotas = Quotas(Quota(max_parallel=3))
    in_flight = peak = 0
    release = asyncio.Event()

    async def call() -> None:
        nonlocal in_flight, peak
        async with quotas.admit("a"):
            in_flight += 1
            peak = max(peak, in_flight)
            assert quotas.in_flight("a") == in_flight
            await release.wait()
            await asyncio.sleep(0)  # overlap the exits with the next entries
            in_flight -= 1

    async with asyncio.timeout(5), asyncio.TaskGroup() as tg:
        for _ in range(20):
            tg.create_task(call())
        await settle()
        assert (in_flight, peak) == (3, 3)  # the other 17 wait (no polling: they are blocked)
        release.set()
    assert peak == 3 and in_flight == 0
    assert quotas.in_flight("a") == 0 and len(quotas) == 0  # nothing left to remember


async def test_other_agents_do_not_wait_for_a_busy_one() -> None:
    quotas = Quotas(Quota(max_parallel=1))
    async with quotas.admit("busy"):
        async with asyncio.timeout(1), quotas.admit("other"):
            assert quotas.in_flight("other") == 1
        assert quotas.in_flight("busy") == 1


async def test_waiting_calls_enter_in_arrival_order() -> None:
    quotas = Quotas(Quota(max_parallel=1))
    entered: list[int] = []
    holder = quotas.admit("a")
    await holder.__aenter__()

    async def call(i: int) -> None:
        async with quotas.admit("a"):
            entered.append(i)

    tasks = [asyncio.create_task(call(i)) for i in range(5)]
    await settle()
    assert entered == []
    await holder.__aexit__(None, None, None)
    async with asyncio.timeout(5):
        await asyncio.gather(*tasks)
    assert entered == [0, 1, 2, 3, 4]


async def test_cancelled_while_waiting_takes_and_releases_nothing() -> None:
    quotas = Quotas(Quota(max_parallel=1))
    holder = quotas.admit("a")
    await holder.__aenter__()
    entered = asyncio.Event()

    async def call() -> None:
        async with quotas.admit("a"):
            entered.set()

    waiter = asyncio.create_task(call())
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert quotas.in_flight("a") == 1  # still the holder's; the waiter released nothing
    # Exactly one place exists: after the holder leaves, one call enters and the next waits.
    await holder.__aexit__(None, None, None)
    first = quotas.admit("a")
    await first.__aenter__()
    second = asyncio.create_task(call())
    await settle()
    assert not entered.is_set()
    await first.__aexit__(None, None, None)
    async with asyncio.timeout(5):
        await second
    assert entered.is_set() and quotas.in_flight("a") == 0 and len(quotas) == 0


async def test_a_place_handed_to_a_cancelled_waiter_passes_to_the_next() -> None:
    quotas = Quotas(Quota(max_parallel=1))
    holder = quotas.admit("a")
    await holder.__aenter__()
    entered: list[str] = []

    async def call(name: str) -> None:
        async with quotas.admit("a"):
            entered.append(name)

    first = asyncio.create_task(call("first"))
    second = asyncio.create_task(call("second"))
    await settle()
    # The release hands the place to "first"; it is cancelled before it can run.
    await holder.__aexit__(None, None, None)
    first.cancel()
    async with asyncio.timeout(5):
        await asyncio.gather(first, second, return_exceptions=True)
    assert first.cancelled() and entered == ["second"]
    assert quotas.in_flight("a") == 0


async def test_a_failing_body_releases_its_place() -> None:
    quotas = Quotas(Quota(max_parallel=1))
    with pytest.raises(RuntimeError):
        async with quotas.admit("a"):
            raise RuntimeError("boom")
    async with asyncio.timeout(1), quotas.admit("a"):
        assert quotas.in_flight("a") == 1


# -- tokens_per_minute -----------------------------------------------------------------------


async def enter(quotas: Quotas, agent: str) -> None:
    async with quotas.admit(agent):
        pass


async def test_token_window_rejects_at_the_limit_and_recovers_as_it_slides() -> None:
    clock = FakeClock(1000.0)
    quotas = Quotas(Quota(tokens_per_minute=100), clock=clock)
    await enter(quotas, "a")
    quotas.charge("a", 60)  # at 1000
    clock.now = 1010.0
    await enter(quotas, "a")  # 60 < 100
    quotas.charge("a", 40)  # at 1010: 100 in the window
    clock.now = 1020.0
    with pytest.raises(QuotaExceeded) as caught:
        await enter(quotas, "a")
    # Room again when the 60 charged at 1000 leave the window: at 1060, in 40 s.
    assert caught.value.retry_after == pytest.approx(40.0)
    assert caught.value.code == "quota_exceeded"
    message = str(caught.value)
    assert "'a' used 100 tokens in the last 60 s" in message
    assert "limit of 100 tokens per minute" in message and "retry in 40.0 s" in message
    await enter(quotas, "b")  # another agent is unaffected
    clock.now = 1059.9
    with pytest.raises(QuotaExceeded, match=r"retry in 0\.1 s"):
        await enter(quotas, "a")
    clock.now = 1060.0
    await enter(quotas, "a")  # the window slid: 40 left in it
    assert quotas.used("a") == 40
    clock.now = 1070.0
    assert quotas.used("a") == 0


async def test_one_charge_over_the_limit_waits_for_that_charge_to_expire() -> None:
    clock = FakeClock(0.0)
    quotas = Quotas(Quota(tokens_per_minute=50), clock=clock)
    quotas.charge("a", 10)
    clock.now = 5.0
    quotas.charge("a", 500)
    clock.now = 6.0
    with pytest.raises(QuotaExceeded) as caught:
        await enter(quotas, "a")
    assert caught.value.retry_after == pytest.approx(59.0)  # 500 expires at 65; 10 is < 50
    assert "used 510 tokens" in str(caught.value)


async def test_window_is_rechecked_after_waiting_for_a_place() -> None:
    clock = FakeClock(0.0)
    quotas = Quotas(Quota(tokens_per_minute=100, max_parallel=1), clock=clock)
    holder = quotas.admit("a")
    await holder.__aenter__()
    waiter = asyncio.create_task(enter(quotas, "a"))
    await settle()
    await holder.__aexit__(None, None, None)
    quotas.charge("a", 100)  # the holder's call used the whole budget
    with pytest.raises(QuotaExceeded):
        async with asyncio.timeout(5):
            await waiter
    assert quotas.in_flight("a") == 0
    clock.now = 60.0
    async with asyncio.timeout(1), quotas.admit("a"):  # its place was given back
        assert quotas.in_flight("a") == 1


async def test_memory_is_bounded_by_recently_active_agents() -> None:
    clock = FakeClock(0.0)
    quotas = Quotas(Quota(tokens_per_minute=1000, max_parallel=2), clock=clock)
    for i in range(500):
        await enter(quotas, f"agent-{i}")
        quotas.charge(f"agent-{i}", 7)
    assert len(quotas) == 500  # each still has tokens in its window
    long_call = quotas.admit("slow")
    await long_call.__aenter__()
    clock.now = 61.0
    await enter(quotas, "newcomer")
    assert len(quotas) == 1  # only "slow", whose call is still in flight
    assert quotas.in_flight("slow") == 1
    await long_call.__aexit__(None, None, None)
    assert len(quotas) == 0


# -- in the kernel ---------------------------------------------------------------------------


def quota_kernel(quota: Quota, **kernel: object) -> tuple[Kernel, FakeFactory]:
    core = CoreConfig(name="fake", model="fake", **CORE_DEFAULTS)
    factory = FakeFactory()
    config = KernelConfig(cores=(core,), quota=quota, **kernel)  # type: ignore[arg-type]
    return Kernel(config, engine_factory=factory), factory


async def test_kernel_charges_prompt_and_completion_tokens() -> None:
    kernel, _ = quota_kernel(Quota(tokens_per_minute=10_000))
    async with asyncio.timeout(5), kernel:
        process = kernel.register("metered")
        completion = await kernel.llm(process, prompt_call("hello"))
        assert completion.usage.total_tokens > 0
        assert kernel.quotas.used(process.id) == completion.usage.total_tokens


async def test_kernel_rejects_a_call_over_the_token_quota_without_queueing_it() -> None:
    kernel, factory = quota_kernel(Quota(tokens_per_minute=5))
    async with asyncio.timeout(5), kernel:
        process = kernel.register("greedy")
        await kernel.llm(process, prompt_call("hello"))  # under the limit when admitted
        steps = len(factory.engine.plans)
        with pytest.raises(QuotaExceeded, match="retry in"):
            await kernel.llm(process, prompt_call("again"))
        assert len(factory.engine.plans) == steps and kernel.cores["fake"].queued == 0
        other = kernel.register("other")
        assert (await kernel.llm(other, prompt_call("hi"))).text == "ok"


async def test_kernel_gives_a_group_its_own_quota() -> None:
    groups = {"default": ("llm.*",), "bulk": ("llm.*",)}
    access = AccessConfig(groups=groups, quotas={"bulk": Quota(tokens_per_minute=10_000)})
    kernel, _ = quota_kernel(Quota(tokens_per_minute=5), access=access)
    async with asyncio.timeout(5), kernel:
        plain = kernel.register("plain", owner="alice")
        bulk = kernel.register("bulk", owner="bob")
        bulk.groups = frozenset({"bulk"})
        for process in (plain, bulk):
            await kernel.llm(process, prompt_call("hello"))
        with pytest.raises(QuotaExceeded, match="limit of 5 "):
            await kernel.llm(plain, prompt_call("again"))
        assert (await kernel.llm(bulk, prompt_call("again"))).text == "ok"


async def test_kernel_waiting_for_a_place_counts_against_the_deadline() -> None:
    kernel, factory = quota_kernel(Quota(max_parallel=1))
    async with asyncio.timeout(5), kernel:
        gate = threading.Event()
        factory.engine.gate = gate  # the first call's steps wait here
        process = kernel.register("parallel")
        first = asyncio.create_task(kernel.llm(process, prompt_call("first")))
        try:
            await wait_until(lambda: factory.engine.blocked)  # on the core's thread
            with pytest.raises(DeadlineExceeded, match="never started"):
                await kernel.llm(process, prompt_call("second"), timeout=0.05)
            assert kernel.quotas.in_flight(process.id) == 1
            assert process.state is AgentState.GENERATING  # the first call's state is kept
        finally:
            gate.set()
        assert (await first).text == "ok"
        assert (await kernel.llm(process, prompt_call("third"))).text == "ok"
        assert kernel.quotas.in_flight(process.id) == 0
