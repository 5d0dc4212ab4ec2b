"""Real-model tests: the embedded llama.cpp core on SmolLM2-135M (and Gemma 3 270M).

Batched greedy decoding in llama.cpp is not bit-identical to single-sequence decoding: once a
step carries more than ~64 tokens (prefill chunks of several prompts) llama.cpp switches matmul
kernels and logits move by up to ~0.6, which flips near-ties. It is content-independent (a
sequence's logits do not depend on what the other sequences contain, only on the batch size);
``test_logits_do_not_depend_on_other_sequences`` asserts that exactly, and
``test_batched_agrees_with_alone`` asserts the measured agreement rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest
from fakes import PreemptAt

from aios.config import CoreConfig, KernelConfig
from aios.context import SnapshotStore
from aios.errors import ContextOverflow, InvalidRequest, ModelNotFound
from aios.kernel import Kernel, llamacpp_engine
from aios.llm.core import LLMCore, standalone
from aios.llm.engine import BatchItem, SeqStart, StepPlan
from aios.scheduler import FIFO
from aios.syscall import Completion, LLMCall, Message, SamplingParams, Status

pytestmark = pytest.mark.model

PROMPTS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is the largest planet?",
    "Why is the sky blue?",
    "Give me a tip for learning to cook.",
    "What do bees make?",
    "Describe a cat in one sentence.",
]


def chat(prompt: str, **params: object) -> LLMCall:
    return LLMCall(messages=(Message("user", prompt),), params=SamplingParams(**params))  # type: ignore[arg-type]


def kernel(slots: int = 8, model: str = "smollm2-135m", **core: int) -> Kernel:
    return Kernel(KernelConfig(cores=(CoreConfig(name="m", model=model, slots=slots, **core),)))


async def generate(slots: int, prompts: list[str], *, together: bool, max_tokens: int) -> list[str]:
    async with kernel(slots) as k:
        proc = k.register("test")
        if together:
            done = await asyncio.gather(
                *(k.llm(proc, chat(p, max_tokens=max_tokens)) for p in prompts)
            )
            return [c.text for c in done]
        return [(await k.llm(proc, chat(p, max_tokens=max_tokens))).text for p in prompts]


async def test_batched_agrees_with_alone() -> None:
    alone = await generate(1, PROMPTS, together=False, max_tokens=24)
    batched = await generate(8, PROMPTS, together=True, max_tokens=24)
    again = await generate(8, PROMPTS, together=True, max_tokens=24)
    assert batched == again, "batched greedy decoding must be deterministic"
    same = sum(a == b for a, b in zip(alone, batched, strict=True))
    # Measured on this machine (llama-cpp-python 0.3.36, SmolLM2 Q4_1, 24 tokens, 8 prompts
    # prefilled in one ~140-token batch): 3/8 identical, mean shared prefix 48% of the text.
    # The others diverge at a near-tie. Assert that agreement does not get worse.
    assert same >= 3, list(zip(alone, batched, strict=True))
    prefix = [
        len(_common_prefix(a, b)) / max(len(a), 1) for a, b in zip(alone, batched, strict=True)
    ]
    assert sum(prefix) / len(prefix) >= 0.45


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


async def test_logits_do_not_depend_on_other_sequences() -> None:
    """Exact: a sequence's first-token logits are bit-identical whatever its batch neighbour
    contains (same batch size), so sequences never see each other's KV cells."""
    import llama_cpp as lc
    import numpy as np

    from aios.llm.llamacpp import LlamaCppEngine

    engine = LlamaCppEngine(CoreConfig(slots=2))
    store = SnapshotStore(0)
    try:
        a = engine.tokenize_chat([Message("user", "Give me a tip for learning to cook.")])
        other1 = engine.tokenize("zebra " * 100)[:100]
        other2 = engine.tokenize("apple pie and custard " * 50)[:100]
        n_vocab = lc.llama_vocab_n_tokens(engine._vocab)

        def first_logits(other: list[int]) -> np.ndarray:  # type: ignore[type-arg]
            greedy = SamplingParams()
            plan = StepPlan(
                starts=[SeqStart(0, greedy), SeqStart(1, greedy)],
                items=[BatchItem(0, a, 0, True), BatchItem(1, other, 0, True)],
            )
            engine.step(plan, store)
            ptr = lc.llama_get_logits_ith(engine._ctx, len(a) - 1)
            out = np.ctypeslib.as_array(ptr, shape=(n_vocab,)).copy()
            engine.step(StepPlan(releases=[0, 1]), store)
            return out

        assert len(other1) == len(other2) == 100
        assert np.array_equal(first_logits(other1), first_logits(other2))
    finally:
        engine.close()


async def test_admitted_mid_decode_matches_its_solo_run() -> None:
    solo = (await generate(1, [PROMPTS[3]], together=False, max_tokens=24))[0]
    async with kernel(4) as k:
        proc = k.register("test")
        long = asyncio.create_task(
            k.llm(proc, chat("Tell me a long story about a dragon.", max_tokens=120))
        )
        core = k.cores["m"]
        async with asyncio.timeout(30):
            while core.stats.decode_tokens < 10:  # the long one is decoding
                await asyncio.sleep(0.01)
        late = await k.llm(proc, chat(PROMPTS[3], max_tokens=24))
        story = await long
    assert late.text == solo  # one short prompt joining a decode batch: small steps, exact
    assert story.usage.completion_tokens > 24
    assert late.timings.finished is not None and story.timings.finished is not None
    assert late.timings.finished < story.timings.finished


async def test_invalid_requests_fail_fast_and_block_nothing() -> None:
    async with kernel(4) as k:
        proc = k.register("test")
        running = asyncio.create_task(k.llm(proc, chat("Write a poem about rain.", max_tokens=48)))
        await asyncio.sleep(0)
        with pytest.raises(InvalidRequest):
            chat("hi", max_tokens=-1)
        with pytest.raises(ModelNotFound):
            await k.llm(proc, LLMCall(messages=(Message("user", "hi"),), model="no-such-model"))
        with pytest.raises(ContextOverflow):
            await k.llm(proc, chat("word " * 5000))
        with pytest.raises(ContextOverflow):
            await k.llm(proc, chat("hi", max_tokens=5000))
        result = await running
    assert result.finish_reason in ("stop", "length") and result.text


async def test_cancel_frees_the_slot() -> None:
    async with kernel(1) as k:
        proc = k.register("test")
        core = k.cores["m"]
        endless = asyncio.create_task(
            k.llm(proc, chat("Count to a thousand.", max_tokens=2000, ignore_eos=True))
        )
        async with asyncio.timeout(30):
            while core.stats.decode_tokens < 5:
                await asyncio.sleep(0.01)
        request = proc.current
        assert core.active == 1
        endless.cancel()
        with pytest.raises(asyncio.CancelledError):
            await endless
        assert request is not None and request.status is Status.CANCELLED
        assert core.active == 0
        # The only slot is free again: a new call runs and finishes.
        reply = await asyncio.wait_for(k.llm(proc, chat(PROMPTS[0], max_tokens=16)), 30)
    assert "Paris" in reply.text


async def test_json_mode_returns_valid_json() -> None:
    async with kernel(2) as k:
        reply = await k.llm(
            k.register("test"),
            chat(
                "Give a JSON object with keys name and age for Bob, 30.", max_tokens=64, json=True
            ),
        )
    assert isinstance(json.loads(reply.text), dict)
    assert reply.finish_reason == "stop"


async def test_stop_strings_and_seeded_sampling() -> None:
    async with kernel(4) as k:
        proc = k.register("test")
        listed = await k.llm(
            proc, chat("List three colors, numbered.", max_tokens=48, stop=("2.",))
        )
        assert "2." not in listed.text and listed.finish_reason == "stop"
        sampled = [
            await k.llm(proc, chat("Write a haiku.", max_tokens=24, temperature=0.9, seed=7))
            for _ in range(2)
        ]
        assert sampled[0].text == sampled[1].text  # same seed, same text


async def test_gemma_base_model_loads_and_completes() -> None:
    async with kernel(2, model="gemma3-270m") as k:
        proc = k.register("test")
        reply = await k.llm(
            proc,
            LLMCall(
                prompt="Q: What is 2 + 2?\nA: 4\nQ: What is the capital of Italy?\nA:",
                params=SamplingParams(max_tokens=8, stop=("\n",)),
            ),
        )
        assert reply.text.strip()
        with pytest.raises(InvalidRequest, match="no chat template"):
            await k.llm(proc, chat("hi"))


# -- context switch and KV reuse on the real model ------------------------------------------------


def real_core(
    policy: Any = None, **overrides: Any
) -> contextlib.AbstractAsyncContextManager[LLMCore]:
    """An embedded core on SmolLM2 with a given policy (FIFO by default)."""
    config = CoreConfig(name="m", **{"slots": 4, **overrides})
    return standalone(LLMCore(config, lambda: llamacpp_engine(config), policy or FIFO()))


STORY = chat("Write a long story about a lighthouse keeper.", max_tokens=60, ignore_eos=True)


@pytest.fixture(scope="module")
def uninterrupted() -> str:
    async def run() -> str:
        async with real_core() as core:
            result: Completion = await core.submit("a", STORY).future
            return result.text

    return asyncio.run(run())


@pytest.mark.parametrize(
    ("points", "ram_mb"),
    [([20], 512), ([10, 25, 40], 512), (list(range(5, 55, 5)), 512), ([15, 30, 45], 0)],
    ids=["k1", "k3", "k10", "k3-disk"],
)
async def test_preempted_generation_is_bit_exact(
    uninterrupted: str, points: list[int], ram_mb: int
) -> None:
    """Pre-empted and restored k times (into other slots; once all through the disk spill),
    greedy decoding yields exactly the uninterrupted text."""
    policy = PreemptAt(points)
    async with real_core(policy, snapshot_ram_mb=ram_mb) as core:
        result: Completion = await core.submit("a", STORY).future
        assert core.stats.preemptions == core.stats.restores == len(points)
        stats = core.snapshots.stats
        assert stats.spilled == (len(points) if ram_mb == 0 else 0)
        assert stats.saved_bytes > 0
    assert len(set(policy.slots)) == len(points)  # restored into a different slot each time
    assert result.usage.completion_tokens == 60
    assert result.text == uninterrupted


async def test_kv_reuse_continues_a_conversation_like_a_fresh_prefill() -> None:
    """An agent's second call reuses its first call's KV (only the new turn is prefilled),
    from a cached slot or from a context parked in the snapshot store, and answers as a fresh
    prefill of the whole conversation does."""
    first = [
        Message("system", "You are a helpful assistant who knows fruit. " * 8),
        Message("user", "Name a fruit that is yellow."),
    ]
    answers = {}
    setups: dict[str, dict[str, Any]] = {
        "cached": {},
        "parked": {"kv_unified": True, "context_tokens": 8192, "cache_tokens": 0},
        "off": {"kv_reuse": False},
    }
    for name, setup in setups.items():
        async with real_core(**setup) as core:
            r1: Completion = await core.submit("a", chat_messages(first, 24)).future
            second = [*first, Message("assistant", r1.text), Message("user", "And a red one?")]
            request = core.submit("a", chat_messages(second, 24))
            r2: Completion = await request.future
            answers[name] = (r1.text, r2.text)
            if name == "off":
                assert request.reused_tokens == 0
            else:
                assert request.reused_tokens > len(request.prompt_tokens) // 2
            assert core.stats.unparked == (name == "parked")
    assert answers["cached"] == answers["off"] == answers["parked"]


def chat_messages(messages: list[Message], max_tokens: int) -> LLMCall:
    return LLMCall(messages=tuple(messages), params=SamplingParams(max_tokens=max_tokens))


async def test_json_at_a_temperature_too_small_to_sample_from_is_greedy() -> None:
    """The in-process route of the attack run's request (it aborted the process before)."""
    async with kernel(2) as k:
        proc = k.register("tiny")
        asked = chat("Give me a JSON object.", json=True, temperature=1e-40, max_tokens=8)
        assert asked.params.greedy
        tiny, normal = await asyncio.gather(
            k.llm(proc, asked), k.llm(proc, chat("Name three colors.", max_tokens=8))
        )
        assert tiny.text and normal.text
