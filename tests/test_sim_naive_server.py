"""The no-kernel baseline of bench/scale.py (bench/naive_server.py, SIMULATED): it runs out of
memory where a kernel on the same simulated hardware runs every agent, gives the same replies,
frees a cancelled caller's cells and refuses calls when not running.

bench scripts import each other by name from bench/ (as ``aios bench`` and ``python
bench/scale.py`` run them); this module puts bench/ on the path to do the same.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from aios.config import CoreConfig, KernelConfig
from aios.errors import AIOSError, CoreError
from aios.kernel import Kernel
from aios.llm.sim import CostModel, OutOfMemory, SimulatedEngine
from aios.syscall import LLMCall, Message, SamplingParams

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
from naive_server import Generation, SimulatedServer

FREE = CostModel(time_scale=0.0)  # the calibrated machine, never sleeping


# -- the kernel on the simulated core, and the server without one -------------------------------
SYSTEM = "You are one of many agents. Answer the current step briefly and stay consistent. " * 3


def agent_turns(i: int) -> list[tuple[str, int]]:
    return [(f"Agent {i}: first step of task {i}.", 16 + i % 17), (f"Next step for {i}.", 24)]


async def test_kernel_runs_50_agents_where_the_server_runs_out_of_memory() -> None:
    cost = CostModel(kv_cells=2048, time_scale=0.0)
    cfg = CoreConfig(
        name="sim",
        model="simulated",
        slots=8,
        cache_slots=8,
        kv_unified=True,
        context_tokens=2048,
        max_sequence_tokens=512,
        batch_tokens=256,
        default_max_tokens=32,
    )
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
    assert "simulated" in server.description  # never mistaken for a real model
    with pytest.raises(CoreError, match="not running"):
        await server.generate("hello", 4)
