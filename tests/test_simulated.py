"""The SIMULATED core (aios.llm.simulated): cost model, determinism, KV bookkeeping, running out
of memory, a kernel on it and the no-kernel server, and the calibration file.

Nothing here sleeps for real except one timing check: engines get ``time_scale=0`` or an
injected ``sleep`` that records what it was asked to sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeEngine, PreemptAt, prompt_call

from aios.config import CoreConfig, KernelConfig
from aios.context import SnapshotStore
from aios.errors import AIOSError, ConfigError, CoreError
from aios.kernel import Kernel
from aios.llm.core import LLMCore, standalone
from aios.llm.engine import BatchItem, KVCopy, Sampled, SeqRestore, SeqSave, SeqStart, StepPlan
from aios.llm.simulated import (
    EOG,
    CostModel,
    Generation,
    OutOfMemory,
    SimulatedEngine,
    SimulatedServer,
    tokenize,
    tokenize_chat,
)
from aios.scheduler import FIFO
from aios.syscall import Completion, LLMCall, Message, SamplingParams

CALIBRATION = (
    Path(__file__).resolve().parents[1] / "bench" / "results" / "simulated_calibration.json"
)
FREE = CostModel(time_scale=0.0)  # the calibrated machine, never sleeping


def config(**overrides: Any) -> CoreConfig:
    values: dict[str, Any] = {
        "name": "sim",
        "model": "simulated",
        "slots": 4,
        "cache_slots": 4,
        "kv_unified": True,
        "context_tokens": 1024,
        "max_sequence_tokens": 512,
        "batch_tokens": 64,
        "default_max_tokens": 32,
    }
    return CoreConfig(**{**values, **overrides})


def engine(cost: CostModel = FREE, **overrides: Any) -> SimulatedEngine:
    return SimulatedEngine(config(**overrides), cost)


class SleepLog:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


def params(**kw: Any) -> SamplingParams:
    return SamplingParams(**kw)


def run_to_end(
    eng: SimulatedEngine, slot: int, prompt: list[int], store: SnapshotStore
) -> list[int]:
    """Start ``slot``, prefill ``prompt`` in one item and decode until end of generation."""
    out = eng.step(
        StepPlan(starts=[SeqStart(slot, params())], items=[BatchItem(slot, prompt, 0, True)]),
        store,
    )
    tokens = []
    pos = len(prompt)
    while not out[0].eog:
        tokens.append(out[0].token)
        out = eng.step(StepPlan(items=[BatchItem(slot, [out[0].token], pos, True)]), store)
        pos += 1
    return tokens


# -- the cost model -----------------------------------------------------------------------------
def test_decode_time_goes_through_the_measured_points() -> None:
    cost = CostModel.calibrated()
    for batch, rate in cost.decode_tokens_per_s:
        assert cost.decode_seconds(batch) == pytest.approx(batch / rate)
    # Linear between points, the last segment's slope beyond them.
    assert cost.decode_seconds(6) == pytest.approx((4 / 160 + 8 / 188) / 2)
    slope = (16 / 192 - 8 / 188) / 8
    assert cost.decode_seconds(32) == pytest.approx(16 / 192 + 16 * slope)
    assert cost.decode_seconds(0) == 0.0
    times = [cost.decode_seconds(b) for b in range(1, 300)]
    assert times == sorted(times)  # a bigger batch never takes less time
    assert cost.step_seconds(0, 0) == 0.0
    assert cost.step_seconds(4, 100) == pytest.approx(4 / 160 + 100 / 280)
    with_overhead = CostModel(step_overhead_s=0.002)
    assert with_overhead.step_seconds(1, 0) == pytest.approx(0.002 + 1 / 128)


@pytest.mark.parametrize(
    "bad",
    [
        {"decode_tokens_per_s": ()},
        {"decode_tokens_per_s": ((4, 100.0), (2, 100.0))},  # batch sizes out of order
        {"decode_tokens_per_s": ((1, 100.0), (2, 400.0))},  # two sequences faster than one
        {"decode_tokens_per_s": ((1, 0.0),)},
        {"prefill_s_per_token": -1.0},
        {"time_scale": float("nan")},
        {"kv_cells": 0},
        {"slots": True},
    ],
)
def test_invalid_cost_models_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="cost model"):
        CostModel(**bad)


def test_step_sleeps_the_modeled_time_scaled() -> None:
    """The step lasts the modeled time: it sleeps for what its own bookkeeping left of it (a
    large time scale makes that bookkeeping negligible; the sleep is injected)."""
    sleep = SleepLog()
    cost = CostModel(time_scale=100.0)
    eng = SimulatedEngine(config(), cost, sleep=sleep, record=True)
    store = SnapshotStore(2**30)
    prompts = {slot: tokenize(f"prompt number {slot} with a few words") for slot in range(4)}
    out = eng.step(
        StepPlan(
            starts=[SeqStart(s, params()) for s in prompts],
            items=[BatchItem(s, p, 0, True) for s, p in prompts.items()],
        ),
        store,
    )
    n_prompt = sum(len(p) for p in prompts.values())
    assert sleep.calls == [pytest.approx(100 * n_prompt / 280, rel=0.01)]
    start, end, _ = eng.stats.busy[0]
    assert end - start == pytest.approx(100 * n_prompt / 280)
    assert eng.stats.prefill_tokens == n_prompt and eng.stats.decode_tokens == 0

    # Three decodes and a prefill chunk of 10 in one step.
    items = [BatchItem(s.slot, [s.token], len(prompts[s.slot]), True) for s in out[:3]]
    eng.step(
        StepPlan(starts=[SeqStart(4, params())], items=[*items, BatchItem(4, [7] * 10, 0, False)]),
        store,
    )
    step = cost.decode_seconds(3) + 10 / 280
    assert sleep.calls[-1] == pytest.approx(100 * step, rel=0.01)
    assert eng.stats.modeled_seconds == pytest.approx(n_prompt / 280 + step)
    assert eng.stats.busy[-1][2]  # it decoded tokens sampled in the step before

    # A save costs its length in save time, a restore its length in restore time.
    n = eng.kv_tokens(3)
    eng.step(StepPlan(saves=[SeqSave(3, "k")]), store)
    assert sleep.calls[-1] == pytest.approx(100 * n * cost.save_s_per_token, rel=0.01)
    eng.step(StepPlan(restores=[SeqRestore(3, "k")]), store)
    assert sleep.calls[-1] == pytest.approx(100 * n * cost.restore_s_per_token, rel=0.01)
    # Releases, copies and trims are free: nothing to sleep.
    before = len(sleep.calls)
    eng.step(StepPlan(releases=[0], copies=[KVCopy(1, 0, 2)], trims=[(1, 1)]), store)
    assert len(sleep.calls) == before


def test_time_scale_zero_never_sleeps_and_real_sleep_is_scaled() -> None:
    sleep = SleepLog()
    eng = SimulatedEngine(config(), FREE, sleep=sleep)
    run_to_end(eng, 0, tokenize("a b c"), SnapshotStore(2**20))
    assert sleep.calls == [] and eng.stats.modeled_seconds > 0

    # Real time: 280 tokens at time_scale 0.05 is 50 ms.
    real = engine(CostModel(time_scale=0.05), context_tokens=1024, batch_tokens=512)
    t0 = time.perf_counter()
    real.step(
        StepPlan(starts=[SeqStart(0, params())], items=[BatchItem(0, [7] * 280, 0, False)]),
        SnapshotStore(0),
    )
    assert 0.05 <= time.perf_counter() - t0 < 0.5


# -- tokens and determinism --------------------------------------------------------------------
def test_tokenization_is_cheap_deterministic_and_prefix_stable() -> None:
    assert tokenize("abcdefgh ij") == tokenize("abcdefgh  ij")  # whitespace is not a token
    assert len(tokenize("abcdefgh ij")) == 3  # ~4 characters per token
    history = [Message("system", "You are brief."), Message("user", "Plan a garden.")]
    first = tokenize_chat(history)
    longer = tokenize_chat([*history, Message("assistant", " the plan"), Message("user", "More")])
    assert longer[: len(first) - 1] == first[:-1]  # all but the assistant-turn marker


def test_same_plan_same_tokens_and_text_round_trips() -> None:
    prompt = tokenize("Write a story about a lighthouse keeper.")
    a = run_to_end(engine(), 0, prompt, SnapshotStore(2**20))
    b = run_to_end(engine(), 2, prompt, SnapshotStore(2**20))
    other = run_to_end(engine(), 0, tokenize("Write a poem instead."), SnapshotStore(2**20))
    assert a == b and a != other
    assert 8 <= len(a) <= 256  # the reply length comes from the prompt
    eng = engine()
    store = SnapshotStore(2**20)
    out = eng.step(
        StepPlan(starts=[SeqStart(0, params())], items=[BatchItem(0, prompt, 0, True)]), store
    )
    pieces = [out[0].piece]
    for pos in range(len(prompt), len(prompt) + 5):
        out = eng.step(StepPlan(items=[BatchItem(0, [out[0].token], pos, True)]), store)
        pieces.append(out[0].piece)
    assert tokenize(b"".join(pieces).decode()) == a[:6]  # a reply's text re-tokenizes exactly


def test_ignore_eos_never_ends() -> None:
    eng, store = engine(), SnapshotStore(2**20)
    prompt = tokenize("go on forever")
    out = eng.step(
        StepPlan(
            starts=[SeqStart(0, params(ignore_eos=True))], items=[BatchItem(0, prompt, 0, True)]
        ),
        store,
    )
    for pos in range(len(prompt), len(prompt) + 300):
        assert not out[0].eog and out[0].token != EOG
        out = eng.step(StepPlan(items=[BatchItem(0, [out[0].token], pos, True)]), store)


# -- KV bookkeeping ------------------------------------------------------------------------------
def test_copies_share_cells_trims_and_releases_free_them() -> None:
    eng, store = engine(), SnapshotStore(2**20)
    eng.step(
        StepPlan(starts=[SeqStart(0, params())], items=[BatchItem(0, [9] * 40, 0, False)]), store
    )
    assert eng.used_cells == 40
    eng.step(StepPlan(copies=[KVCopy(0, 1, 30)], starts=[SeqStart(1, params())]), store)
    assert (eng.kv_tokens(1), eng.used_cells) == (30, 40)  # shared, not duplicated
    eng.step(StepPlan(items=[BatchItem(1, [5] * 5, 30, False)]), store)
    assert eng.used_cells == 45
    eng.step(StepPlan(trims=[(0, 10)]), store)  # frees 30..39; 10..29 are slot 1's too
    assert (eng.kv_tokens(0), eng.used_cells) == (10, 35)
    eng.step(StepPlan(releases=[1]), store)
    assert eng.used_cells == 10
    eng.step(StepPlan(releases=[0]), store)
    assert eng.used_cells == 0


def test_save_puts_bytes_of_the_modeled_size_and_restore_continues_exactly() -> None:
    prompt = tokenize("Tell me about the sea and the ships on it.")
    alone = run_to_end(engine(), 0, prompt, SnapshotStore(2**20))
    eng, store = engine(), SnapshotStore(2**30)
    out = eng.step(
        StepPlan(starts=[SeqStart(0, params())], items=[BatchItem(0, prompt, 0, True)]), store
    )
    tokens, pos = [out[0].token], len(prompt)
    for _ in range(3):
        out = eng.step(StepPlan(items=[BatchItem(0, [tokens[-1]], pos, True)]), store)
        tokens.append(out[0].token)
        pos += 1
    eng.step(StepPlan(saves=[SeqSave(0, "ctx")]), store)
    assert eng.used_cells == 0 and eng.kv_tokens(0) == 0
    assert store.stats.saved_bytes == pos * FREE.snapshot_bytes_per_token
    eng.step(StepPlan(restores=[SeqRestore(3, "ctx")]), store)  # into another slot
    assert eng.kv_tokens(3) == pos and len(store) == 0
    while True:
        out = eng.step(StepPlan(items=[BatchItem(3, [tokens[-1]], pos, True)]), store)
        pos += 1
        if out[0].eog:
            break
        tokens.append(out[0].token)
    assert tokens == alone


@pytest.mark.parametrize(
    ("plan", "error"),
    [
        (StepPlan(items=[BatchItem(2, [1], 0, True)]), "without a start"),
        (
            StepPlan(starts=[SeqStart(0, SamplingParams())], items=[BatchItem(0, [1], 3, True)]),
            "at 3",
        ),
        (StepPlan(copies=[KVCopy(1, 0, 1)]), "no 1 positions"),
        (StepPlan(copies=[KVCopy(0, 0, 1)]), "holds KV"),
        (StepPlan(saves=[SeqSave(5, "x")]), "has no sequence"),
        (StepPlan(trims=[(6, 0)]), "trim of empty"),
        (StepPlan(starts=[SeqStart(99, SamplingParams())]), "no slot 99"),
    ],
)
def test_inconsistent_plans_are_core_errors(plan: StepPlan, error: str) -> None:
    eng, store = engine(), SnapshotStore(2**20)
    eng.step(
        StepPlan(starts=[SeqStart(0, params())], items=[BatchItem(0, [9, 9], 0, False)]), store
    )
    with pytest.raises(CoreError, match=error):
        eng.step(plan, store)


class Tee:
    """An engine that runs every plan on a FakeEngine (whose tokens it returns) and on a
    SimulatedEngine, and checks after each step that both hold the same KV in every slot."""

    def __init__(self, cfg: CoreConfig) -> None:
        self.fake = FakeEngine(cfg, reply=lambda p: "reply " * (len(p) % 4 + 1))
        self.sim = SimulatedEngine(cfg, CostModel(time_scale=0.0))
        self.fake_store = SnapshotStore(2**30)
        self.model_name, self.description = "tee", "fake + simulated"
        self.slots, self.context_tokens = cfg.kv_sequences, cfg.context_tokens
        self.max_sequence_tokens = cfg.max_sequence_tokens
        self.checked = 0

    def tokenize(self, text: str) -> list[int]:
        return self.fake.tokenize(text)

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        return self.fake.tokenize_chat(messages)

    def step(self, plan: StepPlan, store: Any) -> list[Sampled]:
        out = self.fake.step(plan, self.fake_store)
        self.sim.step(plan, store)
        for slot in range(self.slots):
            seq = self.fake._seqs.get(slot)
            assert self.sim.kv_tokens(slot) == (len(seq.tokens) if seq else 0), slot
        assert self.sim.used_cells <= sum(len(s.tokens) for s in self.fake._seqs.values())
        self.checked += 1
        return out

    def close(self) -> None:
        self.fake.close()
        self.sim.close()


async def test_kv_bookkeeping_follows_the_fake_engines_rules() -> None:
    """Pre-emptions (saves, restores), KV reuse (copies, trims), releases: the simulated
    engine's KV matches the fake's after every step of a busy core."""
    cfg = config(slots=2, cache_slots=2, batch_tokens=32)
    tee = Tee(cfg)
    async with running_core(cfg, tee, PreemptAt([2, 5])) as core:
        shared = "a shared system prompt of some length: " * 2
        calls = [prompt_call(shared + f"agent {i} asks {i}") for i in range(6)]
        requests = [core.submit(f"agent{i % 3}", call) for i, call in enumerate(calls)]
        await asyncio.gather(*(r.future for r in requests))
        again = [core.submit("agent0", prompt_call(shared + "agent 0 asks 0 reply"))]
        await asyncio.gather(*(r.future for r in again))
        assert core.stats.preemptions > 0 and core.stats.prefix_hits > 0
    assert tee.checked > 10 and tee.fake.violations == []
    assert any(p.copies for p in tee.fake.plans) and any(p.saves for p in tee.fake.plans)


@contextlib.asynccontextmanager
async def running_core(cfg: CoreConfig, eng: Any, policy: Any = None) -> AsyncIterator[LLMCore]:
    async with asyncio.timeout(10), standalone(LLMCore(cfg, lambda: eng, policy or FIFO())) as core:
        yield core


async def test_preempted_requests_continue_exactly_on_the_simulated_core() -> None:
    cfg = config()
    call = prompt_call("a long story please", max_tokens=40, ignore_eos=True)
    async with running_core(cfg, SimulatedEngine(cfg, FREE)) as core:
        alone: Completion = await core.submit("a", call).future
    policy = PreemptAt([3, 9, 20])
    async with running_core(cfg, SimulatedEngine(cfg, FREE), policy) as core:
        again: Completion = await core.submit("a", call).future
        assert core.stats.preemptions == 3
    assert again.text == alone.text and again.usage == alone.usage


# -- out of memory -------------------------------------------------------------------------------
def test_out_of_memory_exactly_when_capacity_is_exceeded() -> None:
    eng, store = engine(context_tokens=64, max_sequence_tokens=64), SnapshotStore(2**30)
    eng.step(
        StepPlan(starts=[SeqStart(0, params())], items=[BatchItem(0, [3] * 60, 0, False)]), store
    )
    eng.step(StepPlan(items=[BatchItem(0, [3] * 4, 60, False)]), store)  # exactly full: fine
    assert eng.used_cells == 64
    eng.step(StepPlan(copies=[KVCopy(0, 1, 64)], starts=[SeqStart(1, params())]), store)
    with pytest.raises(OutOfMemory, match="needs 1 new KV cells but 64 of 64"):
        eng.step(StepPlan(items=[BatchItem(1, [3], 64, False)]), store)
    assert eng.used_cells == 64  # nothing was fed
    eng.step(StepPlan(saves=[SeqSave(0, "a")], trims=[(1, 8)]), store)
    assert eng.used_cells == 8
    eng.step(StepPlan(items=[BatchItem(1, [4] * 50, 8, False)]), store)
    with pytest.raises(OutOfMemory, match="restoring a context of 64 tokens"):
        eng.step(StepPlan(restores=[SeqRestore(2, "a")]), store)
    assert issubclass(OutOfMemory, CoreError)


def test_the_engine_must_fit_the_simulated_hardware() -> None:
    assert "simulated" in engine().description  # never mistaken for a real model
    assert "simulated" in SimulatedServer(FREE).description
    with pytest.raises(ConfigError, match="KV cache"):
        SimulatedEngine(config(context_tokens=4096), CostModel(kv_cells=2048))
    with pytest.raises(ConfigError, match="sequences"):
        SimulatedEngine(config(slots=8, cache_slots=8), CostModel(slots=8))


# -- a kernel on it, and the server without one -------------------------------------------------
SYSTEM = "You are one of many agents. Answer the current step briefly and stay consistent. " * 3


def agent_turns(i: int) -> list[tuple[str, int]]:
    return [(f"Agent {i}: first step of task {i}.", 16 + i % 17), (f"Next step for {i}.", 24)]


async def test_kernel_runs_50_agents_where_the_server_runs_out_of_memory() -> None:
    cost = CostModel(kv_cells=2048, time_scale=0.0)
    cfg = config(slots=8, cache_slots=8, context_tokens=2048, batch_tokens=256)
    kernel = Kernel(KernelConfig(cores=(cfg,)), engine_factory=lambda c: SimulatedEngine(c, cost))
    failures: list[AIOSError] = []
    first_replies: dict[int, str] = {}

    async def through_kernel(i: int) -> None:
        process = kernel.register("agent")
        messages = [Message("system", SYSTEM)]
        try:
            for text, max_tokens in agent_turns(i):
                messages.append(Message("user", text))
                call = LLMCall(
                    messages=tuple(messages), params=SamplingParams(max_tokens=max_tokens)
                )
                done = await kernel.llm(process, call)
                first_replies.setdefault(i, done.text)
                messages.append(Message("assistant", done.text))
        except AIOSError as e:
            failures.append(e)
        finally:
            kernel.release(process)

    async with asyncio.timeout(20), kernel:
        await asyncio.gather(*(through_kernel(i) for i in range(50)))
        stats = kernel.cores["sim"].stats
        assert stats.completed == 100 and stats.failed == 0
    assert failures == [] and len(first_replies) == 50

    ooms: list[OutOfMemory] = []
    replies: dict[int, Generation] = {}

    async def direct(server: SimulatedServer, i: int) -> None:
        text, max_tokens = agent_turns(i)[0]
        try:
            replies[i] = await server.generate(
                [Message("system", SYSTEM), Message("user", text)], max_tokens
            )
        except OutOfMemory as e:
            ooms.append(e)

    async with asyncio.timeout(20), SimulatedServer(cost) as server:
        await asyncio.gather(*(direct(server, i) for i in range(50)))
        assert server.stats.oom_errors == len(ooms) > 0
        assert server.stats.wasted_tokens > 0 and server.used_cells == 0
    assert len(replies) + len(ooms) == 50 and replies
    for i, reply in replies.items():  # the same simulated model: the same replies
        assert reply.text == first_replies[i]


async def test_server_frees_a_cancelled_callers_cells() -> None:
    async with asyncio.timeout(5), SimulatedServer(CostModel(time_scale=0.001)) as server:
        task = asyncio.create_task(server.generate("tell me everything", 10_000, ignore_eos=True))
        while server.stats.decode_tokens < 3:
            await asyncio.sleep(0.001)
        assert server.used_cells > 0
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        done = await server.generate("short", 2)
        assert done.completion_tokens == 2 and done.finish_reason == "length"
        assert server.used_cells == 0


async def test_server_refuses_calls_when_not_running() -> None:
    server = SimulatedServer(FREE)
    with pytest.raises(CoreError, match="not running"):
        await server.generate("hello", 4)


# -- the calibration file -----------------------------------------------------------------------
def test_calibration_file_is_the_calibrated_model(tmp_path: Path) -> None:
    assert CostModel.load(CALIBRATION) == CostModel.calibrated()
    assert "bench/throughput.py" in CostModel.calibrated().source
    custom = CostModel.calibrated(time_scale=0.01).scaled(0.02)
    path = tmp_path / "cost.json"
    custom.save(path)
    assert CostModel.load(path) == custom
    assert json.loads(path.read_text())["cost_model"]["time_scale"] == 0.02
    path.write_text(json.dumps({"cost_model": {"prefill_s_per_tok": 1.0}}))
    with pytest.raises(ConfigError, match="unknown fields"):
        CostModel.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        CostModel.load(tmp_path / "missing.json")
