"""Agent programs for the durable-process tests, importable by name (``durable_agents:Chain``)
so that a restarted kernel, or a second one, can resume them. Their results depend on every
answer they got and on ``self.random``, so a replay that returned anything else, or a draw
that differed, shows in the result (or as a divergence)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from aios.sdk import Agent
from aios.tools.spec import tool

SLOW_TOOL_S = 1.0


class Chain(Agent):
    """``calls`` dependent LLM calls, each fed by the previous answer, then a file write."""

    name = "chain"
    calls = 4
    stop_after: int | None = None  # return after this many calls (a changed program)

    async def run(self, task: str) -> str:
        text = task
        for i in range(self.calls):
            reply = await self.llm.complete(f"step {i} of {task}: {text}", max_tokens=6)
            text = reply.text.strip() or f"empty{i}"
            if self.stop_after == i + 1:
                return text
        await self.storage.write(f"{task}.txt", text)
        return f"{task}: {text}"


class Guarded(Agent):
    """An LLM call, a delete that needs a person's approval, another LLM call."""

    name = "guarded"

    async def run(self, task: str) -> str:
        await self.storage.write(f"{task}.tmp", "x")
        first = await self.llm.complete(f"guard {task}{self.draw()}", max_tokens=6)
        removed = await self.storage.delete(f"{task}.tmp")
        second = await self.llm.complete(f"after {first.text}{self.draw()}", max_tokens=6)
        return f"{task}: removed {removed}, {second.text.strip()}"

    def draw(self) -> str:
        return ""


class Dice(Guarded):
    """Guarded, with a random number and the time in each prompt: a replay that drew another
    number or read another time would diverge."""

    name = "dice"

    def draw(self) -> str:
        return f" {self.random.randint(0, 10**9)} at {self.now()!r}"


class Slow(Agent):
    """An LLM call, then the ``slow`` tool (which takes its time), then an LLM call."""

    name = "slow"

    async def run(self, task: str) -> str:
        first = await self.llm.complete(f"slow {task}", max_tokens=6)
        waited = await self.tools.call("slow", seconds=SLOW_TOOL_S)
        second = await self.llm.complete(f"then {first.text} {waited}", max_tokens=6)
        return f"{task}: {second.text.strip()}"


@tool(read_only=True, timeout=120.0)
def slow(seconds: float) -> str:
    """Wait, then say so; $SLOW_TOOL_LOG gets a line ``start`` as each run starts and ``ran``
    as it ends (runs are counted)."""
    log = os.environ.get("SLOW_TOOL_LOG")
    if log:
        with Path(log).open("a") as f:
            f.write("start\n")
    time.sleep(seconds)
    if log:
        with Path(log).open("a") as f:
            f.write("ran\n")
    return f"waited {seconds:g}s"


class Branches(Agent):
    """Two concurrent branches (asyncio.gather), each an LLM call, a write and an LLM call:
    their calls interleave, so a replay must hand results back in their original order."""

    name = "branches"

    async def run(self, task: str) -> str:
        async def branch(label: str) -> str:
            first = await self.llm.complete(f"{task} {label} one", max_tokens=6)
            await self.storage.write(f"{task}-{label}.txt", first.text)
            second = await self.llm.complete(f"{task} {label} two {first.text}", max_tokens=6)
            return second.text.strip()

        left, right = await asyncio.gather(branch("left"), branch("right"))
        return f"{task}: {left} {right}"
