"""The SIMULATED engine (aios.llm.sim.engine, on aios.llm.sim's cost model, tokens and KV
pool): step timing, determinism, KV bookkeeping, running out of memory, and a core on it.

Nothing here sleeps for real except one timing check: engines get ``time_scale=0`` or an
injected ``sleep`` that records what it was asked to sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from fakes import FakeEngine, PreemptAt, prompt_call

from aios.config import CoreConfig
from aios.context import SnapshotStore
from aios.errors import ConfigError, CoreError
from aios.llm.core import LLMCore, standalone
from aios.llm.engine import BatchItem, KVCopy, Sampled, SeqRestore, SeqSave, SeqStart, StepPlan
from aios.llm.sim import EOG, CostModel, OutOfMemory, SimulatedEngine, tokenize, tokenize_chat
from aios.scheduler import FIFO
from aios.syscall import Completion, Message, SamplingParams

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


# -- step timing -----------------------------------------------------------------------------------
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
    with pytest.raises(ConfigError, match="KV cache"):
        SimulatedEngine(config(context_tokens=4096), CostModel(kv_cells=2048))
    with pytest.raises(ConfigError, match="sequences"):
        SimulatedEngine(config(slots=8, cache_slots=8), CostModel(slots=8))
