"""ReAct agents on the real embedded model: the math agent computes with the calculator (the
model alone gets the same arithmetic wrong), and the file agent uses its storage."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from aios.agents.react import FileAgent, MathAgent, number_in
from aios.config import CoreConfig, KernelConfig
from aios.kernel import Kernel
from aios.sdk.llm import LLM
from aios.sdk.local import LocalClient

pytestmark = pytest.mark.model


@pytest.fixture
async def kernel() -> AsyncIterator[Kernel]:
    config = KernelConfig(cores=(CoreConfig(name="default", slots=4),))
    async with Kernel(config) as k:
        yield k


async def test_math_agent_uses_the_calculator_and_gets_it_right(kernel: Kernel) -> None:
    question = "What is 347 * 29?"
    alone = await LLM(LocalClient(kernel, kernel.register("plain"))).chat(
        [{"role": "user", "content": f"{question} Answer with the number only."}], max_tokens=16
    )
    assert number_in(alone.text) != 10063  # the model alone is wrong (greedy: deterministic)
    agent = MathAgent(LocalClient(kernel, kernel.register("math")))
    answer = await agent.run(question)
    assert number_in(answer) == 10063
    calls = [c for step in agent.trace for c in step.get("calls", [])]
    assert calls and all(c["name"] == "calculator" for c in calls)
    assert kernel.tool_stats["calculator"].calls >= 1


async def test_file_agent_writes_and_reads_its_storage(kernel: Kernel) -> None:
    process = kernel.register("filer", owner="filer-test")
    agent = FileAgent(LocalClient(kernel, process))
    answer = await agent.run("Save 'buy milk' in the file todo.txt, then read todo.txt.")
    found = await kernel.resource(process, "storage", "read", {"path": "todo.txt"})
    assert found["content"] == b"buy milk"
    assert "buy milk" in answer
    names = [c["name"] for step in agent.trace for c in step.get("calls", [])]
    assert "write_file" in names and "read_file" in names
