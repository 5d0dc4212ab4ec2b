"""Context switch and KV reuse in the LLM core, on the fake engine, and the snapshot store.

The fake engine keeps each slot's KV as a token list and its sampler state next to it, and
checks every operation of a plan (a copy into a busy slot, a restore into a busy slot, feeding a
position that is not the next one are violations), so these tests check the bookkeeping; the
real-model tests in test_model.py check that llama.cpp continues bit-exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from fakes import CORE_DEFAULTS, FakeEngine, PreemptAt, prompt_call, tokenize, wait_until

from aios.config import CoreConfig
from aios.context import SnapshotStore
from aios.errors import CoreError
from aios.llm.core import LLMCore
from aios.scheduler import FIFO
from aios.syscall import Completion, LLMCall, Message, SamplingParams, Status


@contextlib.asynccontextmanager
async def running_core(
    policy: Any = None, reply: Any = None, **overrides: Any
) -> AsyncIterator[tuple[LLMCore, FakeEngine]]:
    config = CoreConfig(name="fake", model="fake", **{**CORE_DEFAULTS, **overrides})
    fake = FakeEngine(config, reply)
    core = LLMCore(config, lambda: fake, policy or FIFO())
    async with asyncio.timeout(5):
        await core.start()
        loop = asyncio.create_task(core.run())
        try:
            yield core, fake
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
            await core.close()
    assert fake.violations == []


async def complete(core: LLMCore, agent: str, call: LLMCall) -> Completion:
    request = core.submit(agent, call)
    result: Completion = await request.future
    return result


def long_reply(prompt: list[int]) -> str:
    return "abcdefghijklmnopqrstuvwxyz0123456789"


# -- pre-emption -------------------------------------------------------------------------------


@pytest.mark.parametrize("points", [[5], [3, 9, 20], list(range(2, 32, 3))])
async def test_preempted_request_continues_exactly(points: list[int]) -> None:
    async with running_core(reply=long_reply) as (core, _):
        alone = await complete(core, "a", prompt_call("story"))
    policy = PreemptAt(points)
    async with running_core(policy, reply=long_reply, snapshot_ram_mb=0) as (core, fake):
        result = await complete(core, "a", prompt_call("story"))
        assert core.stats.preemptions == len(points)
        assert core.stats.restores == len(points)
        assert core.snapshots.stats.spilled == len(points)  # ram budget 0: all through disk
        assert len(core.snapshots) == 0
    assert result.text == alone.text
    assert result.usage == alone.usage
    assert len(set(policy.slots)) > 1 or len(points) == 1  # restored into other slots
    assert sum(len(p.saves) for p in fake.plans) == len(points)


async def test_preemption_lets_a_short_request_through() -> None:
    """One slot: the long request is pre-empted, the short one runs and finishes first."""
    async with running_core(
        PreemptAt([4]), reply=lambda p: "x" * (40 if len(p) > 8 else 3), slots=1
    ) as (core, _):
        long = core.submit("a", prompt_call("a long one"))
        await asyncio.sleep(0)
        short = core.submit("b", prompt_call("short"))
        done = []
        for f in asyncio.as_completed([long.future, short.future]):
            done.append((await f).text)
        assert done == ["xxx", "x" * 40]


async def test_cancel_while_preempted_drops_the_snapshot() -> None:
    holder: list[FakeEngine] = []

    def hold_next_step() -> None:  # called while planning the step that saves the context
        fake = holder[0]
        if fake.gate is None:  # only the first pre-emption
            fake.hold_from = len(fake.plans) + 1
            fake.gate = threading.Event()

    async with running_core(PreemptAt([3], hold_next_step), reply=long_reply, slots=1) as (
        core,
        fake,
    ):
        holder.append(fake)
        fake.hold_from = 10**9
        first = core.submit("a", prompt_call("first"))
        other = core.submit("b", prompt_call("second"))
        await wait_until(lambda: fake.blocked)
        # The save step ran; the next one (the second request on the only slot) is held.
        assert first.status is Status.QUEUED and first.snapshot is not None
        assert len(core.snapshots) == 1
        core.cancel(first)
        assert first.status is Status.CANCELLED
        assert fake.gate is not None
        fake.gate.set()
        await other.future
        assert len(core.snapshots) == 0
        assert any(p.drops for p in fake.plans)


async def test_failed_step_fails_a_request_saved_in_it() -> None:
    async with running_core(PreemptAt([3]), reply=long_reply) as (core, fake):
        fake.fail_on_save = True
        request = core.submit("a", prompt_call("x"))
        with pytest.raises(CoreError):
            await request.future
        again = await complete(core, "a", prompt_call("y"))  # the core goes on
        assert again.text


# -- KV reuse ----------------------------------------------------------------------------------


def conversation(system: str, *turns: str) -> LLMCall:
    """A system prompt, then user and assistant turns alternating."""
    messages = [Message("system", system)]
    messages += [Message("user" if i % 2 == 0 else "assistant", t) for i, t in enumerate(turns)]
    return LLMCall(messages=tuple(messages), params=SamplingParams(max_tokens=20))


async def test_agent_second_call_prefills_only_the_new_suffix() -> None:
    async with running_core() as (core, fake):
        first = conversation("You are terse.", "Hello there")
        r1 = await complete(core, "a", first)
        second = conversation("You are terse.", "Hello there", r1.text, "And then?")
        fed_before = sum(p.n_tokens for p in fake.plans)
        r2 = core.submit("a", second)
        await r2.future
        fed = sum(p.n_tokens for p in fake.plans) - fed_before
        assert r2.reused_tokens > 0
        # Only the new suffix, then each generated token (the reply ends with EOG) was fed.
        assert fed == len(r2.prompt_tokens) - r2.reused_tokens + r2.generated
        assert core.stats.prefix_hits == 1
        assert any(p.trims for p in fake.plans)  # took its own cached slot over


async def test_common_prefix_is_copied_for_another_agent() -> None:
    system = "A long shared system prompt with tools and examples. " * 3
    async with running_core() as (core, fake):
        await complete(core, "a", conversation(system, "question one"))
        r = core.submit("b", conversation(system, "another question"))
        await r.future
        assert r.reused_tokens >= len(tokenize(system))
        copies = [c for p in fake.plans for c in p.copies]
        assert len(copies) == 1 and copies[0].n == r.reused_tokens
        assert core.cached == 2  # a's KV stays cached for a


async def test_reuse_never_skips_the_last_prompt_token() -> None:
    async with running_core() as (core, _):
        call = prompt_call("same prompt again")
        first = await complete(core, "a", call)
        r = core.submit("a", call)
        second = await r.future
        assert r.reused_tokens == len(r.prompt_tokens) - 1
        assert second.text == first.text


async def test_cached_kv_is_evicted_under_pressure_and_never_overcommits() -> None:
    # 8 slots (so slots alone never force an eviction), 1024 KV cells. Four agents leave ~40
    # cells cached each; four new calls reserving 230 cells each need 920 + 160 > 1024.
    async with running_core(slots=8, context_tokens=1024, max_sequence_tokens=256) as (
        core,
        fake,
    ):
        for i in range(4):
            await complete(core, f"old{i}", prompt_call(f"old agent {i} " * 3))
        assert core.cached == 4 and core._kv.cached_cells > 104
        new = [core.submit(f"new{i}", prompt_call(f"x{i}" * 15, max_tokens=200)) for i in range(4)]
        await asyncio.gather(*(r.future for r in new))
        releases = [slot for p in fake.plans for slot in p.releases]
        assert releases, "cached KV was never evicted"
        assert all(r.reused_tokens == 0 for r in new)
        # The fake checks the KV in use after every step: no "overcommitted" violation.


async def test_forget_frees_an_exited_agents_kv() -> None:
    async with running_core() as (core, fake):
        await complete(core, "a", prompt_call("hello"))
        assert core.cached == 1
        core.forget("a")
        assert core.cached == 0
        await complete(core, "b", prompt_call("other"))
        assert any(p.releases for p in fake.plans)


async def test_kv_reuse_off_changes_nothing_but_speed() -> None:
    calls = [conversation("sys", "one"), conversation("sys", "one", "ok", "two")]
    results = {}
    for reuse in (True, False):
        async with running_core(kv_reuse=reuse) as (core, _):
            results[reuse] = [(await complete(core, "a", c)).text for c in calls]
            assert (core.stats.reused_tokens > 0) == reuse
    assert results[True] == results[False]


# -- the snapshot store ------------------------------------------------------------------------


def test_store_spills_beyond_its_budget(tmp_path: Path) -> None:
    store = SnapshotStore(ram_budget=10, spill_dir=tmp_path)
    store.put("a", b"12345678")
    store.put("b", b"abcdefgh")  # over budget: to disk
    assert store.stats.ram_bytes == 8 and store.stats.disk_bytes == 8
    assert len(list(tmp_path.iterdir())) == 1
    assert store.take("b") == b"abcdefgh"
    assert store.take("a") == b"12345678"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(CoreError):
        store.take("a")


def test_store_drop_and_close_remove_files() -> None:
    store = SnapshotStore(ram_budget=0)
    store.put("x", b"data")
    store.put("y", b"more")
    store.drop("x")
    store.drop("missing")  # no-op
    assert "x" not in store and "y" in store
    spill = store._dir
    assert spill is not None and spill.exists()
    store.close()
    assert not spill.exists()
    store.put("z", b"1")
    with pytest.raises(CoreError, match="already saved"):
        store.put("z", b"2")


async def test_cache_slots_keep_more_agents_than_run_at_once() -> None:
    async with running_core(slots=2, cache_slots=2) as (core, fake):
        calls = [core.submit(f"agent{i}", prompt_call(f"hello from {i}")) for i in range(4)]
        await asyncio.gather(*(c.future for c in calls))
        assert core.cached == 4  # every agent's KV kept for its next call
        assert max(len(p.slots) for p in fake.plans) == 2  # never more than 2 running
        again = core.submit("agent3", prompt_call("hello from 3, again"))
        await again.future
        assert again.reused_tokens == len(tokenize("hello from 3"))


async def test_agents_starting_together_share_one_system_prompt_prefill() -> None:
    system = "You are one of many agents. Shared instructions follow. " * 2
    async with running_core(batch_tokens=512) as (core, fake):
        calls = [core.submit(f"a{i}", conversation(system, f"task {i}")) for i in range(4)]
        await asyncio.gather(*(c.future for c in calls))
        fed = sum(i.n_tokens for p in fake.plans for i in p.items if not i.decode)
        shared = len(tokenize(system))
        assert all(c.reused_tokens >= shared for c in calls[1:])
        # The system prompt was prefilled once, not four times.
        assert fed == sum(len(c.prompt_tokens) for c in calls) - sum(c.reused_tokens for c in calls)
        assert fed < 2 * len(calls[0].prompt_tokens)
        copies = [c for p in fake.plans for c in p.copies]
        assert len(copies) == 3


async def test_idle_kv_beyond_the_cache_budget_is_parked_and_restored() -> None:
    long = "a fairly long first message that fills the cache " * 2
    async with running_core(cache_tokens=0) as (core, fake):
        first = await complete(core, "a", prompt_call(long))
        assert core.cached == 0 and core.stats.parked == 1  # saved out of the cache at once
        r = core.submit("a", prompt_call(long + first.text + " and more"))
        await r.future
        assert core.stats.unparked == 1
        assert r.reused_tokens == len(tokenize(long + first.text))
        restore_plan = next(p for p in fake.plans if p.restores)
        assert restore_plan.trims and restore_plan.starts
        # Another agent is never given a's parked context.
        other = core.submit("b", prompt_call(long))
        await other.future
        assert core.stats.unparked == 1
        core.forget("a")
        core.forget("b")
        await complete(core, "c", prompt_call("x"))
        assert len(core.snapshots) == 0  # forgotten agents' parked contexts are dropped


async def test_short_idle_contexts_are_dropped_not_parked() -> None:
    async with running_core(cache_tokens=0) as (core, _fake):
        await complete(core, "a", prompt_call("hi"))
        assert core.stats.parked == 0
        assert len(core.snapshots) == 0


async def test_a_cached_slot_copied_from_is_not_evicted_before_the_copy() -> None:
    """Regression: request A copies a prefix from cached slot S; request B, admitted in the
    same step, needs S's KV cells. S must be cleared after the copy, not before it."""
    prefix = "shared instructions for every agent in this test " * 2
    limits: dict[str, Any] = {
        "slots": 2,
        "cache_slots": 1,
        "context_tokens": 1024,
        "max_sequence_tokens": 1024,
    }
    async with running_core(**limits) as (core, fake):
        await complete(core, "x", prompt_call(prefix + "from x"))
        assert core.cached == 1
        a = core.submit("a", prompt_call(prefix + "from a", max_tokens=20))
        b = core.submit("b", prompt_call("b", max_tokens=850))  # 851 + 126 + cached > 1024
        await asyncio.gather(a.future, b.future)
        assert a.reused_tokens >= len(tokenize(prefix))
        plan = next(p for p in fake.plans if p.copies)
        assert plan.trims and plan.trims[-1][1] == 0  # the source cleared after its copy
