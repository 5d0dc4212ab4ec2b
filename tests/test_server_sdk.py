"""The SDK's HTTP clients (aios/sdk/http.py) against a real server: round trips, agents,
error mapping, cancellation, an unreachable server, and `aios run --url`.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from servers import REPLY, USER, Harness, ServerFactory, free_port

from aios.errors import (
    InvalidRequest,
    SyscallCancelled,
    Unauthenticated,
    Unreachable,
)
from aios.sdk import Agent
from aios.sdk.http import AsyncClient, Client
from aios.syscall import Completion, LLMCall, Message, SamplingParams


class Echo(Agent):
    name = "echo"

    async def run(self, task: str) -> str:
        first = await self.llm.chat([{"role": "user", "content": task}], max_tokens=5)
        second = await self.llm.chat([Message("user", first.text)])
        return f"{first.text}|{second.text}"


def sdk_call(**params: Any) -> LLMCall:
    return LLMCall(messages=(Message("user", "hi"),), params=SamplingParams(**params))


async def test_async_client_round_trips(server: Harness) -> None:
    token = server.agent("alice")
    async with AsyncClient(server.url, token) as client, asyncio.timeout(10):
        completion = await client.chat(USER)
        assert completion.text == REPLY and completion.finish_reason == "stop"
        assert completion.usage.completion_tokens == len(REPLY)
        assert completion.syscall_id.startswith("sc-") and completion.model == "fake"

        items = [item async for item in client.stream(sdk_call(stop=("this",)))]
        *pieces, last = items
        assert isinstance(last, Completion)
        texts = [p for p in pieces if isinstance(p, str)]
        assert texts and texts == pieces
        assert "".join(texts) == last.text == "hello world, "

        assert await Echo(client).run("hi") == f"{REPLY[:5]}|{REPLY}"

        process = (await client.spawn("planner", "a task"))["id"]
        finished = await client.wait(process, timeout=10)
        assert finished["state"] == "done" and REPLY in finished["result"]
        mine = {p["id"]: p for p in await client.processes()}
        assert mine["@alice"]["syscalls"] == 4  # chat, stream, and the agent's two calls
        assert set(mine) == {"@alice", process}


def test_blocking_client_round_trips(server: Harness) -> None:
    token = server.agent("alice")
    with Client(server.url, token) as client:
        assert client.chat(USER, max_tokens=3).text == REPLY[:3]
        items = list(client.stream(sdk_call()))
        assert isinstance(items[-1], Completion)
        assert "".join(p for p in items if isinstance(p, str)) == items[-1].text == REPLY
        spawned = client.spawn("writer", "bread")
        assert client.wait(spawned["id"], timeout=10)["state"] == "done"
        assert {p["id"] for p in client.processes()} == {"@alice", spawned["id"]}


async def test_sdk_maps_errors(server: Harness) -> None:
    token = server.agent("alice")
    async with AsyncClient(server.url, "aios_not-a-token-at-all-0000000") as bad:
        with pytest.raises(Unauthenticated):
            await bad.chat(USER)
    with Client(server.url, "aios_not-a-token-at-all-0000000") as blocking:
        with pytest.raises(Unauthenticated):
            blocking.chat(USER)
        with pytest.raises(Unauthenticated):
            list(blocking.stream(sdk_call()))
    async with AsyncClient(server.url, token) as client:
        with pytest.raises(InvalidRequest):
            await client.chat(USER, max_tokens=10**6)
        with pytest.raises(InvalidRequest):
            [item async for item in client.stream(sdk_call(max_tokens=10**6))]


async def test_sdk_unreachable(server: Harness) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    async with AsyncClient(url, "aios_x", retries=1, backoff=0.01) as client:
        with pytest.raises(Unreachable):
            await client.chat(USER)
    with Client(url, "aios_x", retries=1, backoff=0.01) as blocking:
        with pytest.raises(Unreachable):
            blocking.chat(USER)
        with pytest.raises(Unreachable):
            list(blocking.stream(sdk_call()))
    assert time.monotonic() - started < 5


async def test_sdk_cancel_raises_syscall_cancelled(server: Harness) -> None:
    token = server.agent("alice")
    gate = server.hold()
    async with AsyncClient(server.url, token) as client, asyncio.timeout(10):
        call = asyncio.create_task(client.chat(USER))
        while not (inflight := [p["inflight"] for p in await client.processes() if p["inflight"]]):
            await asyncio.sleep(0.01)
        (syscall_id,) = inflight[0]
        assert (await client.cancel(syscall_id))["status"] == "cancelled"
        with pytest.raises(SyscallCancelled):
            await call
        gate.set()


@pytest.mark.parametrize("submit", [False, True])
def test_aios_run_against_a_server(make_server: ServerFactory, submit: bool) -> None:
    """`aios run --url`: the example agents as HTTP clients (each its own), or in the kernel."""
    from typer.testing import CliRunner

    from aios.cli import app

    server = make_server()
    args = ["run", "--url", server.url, "--token", server.agent("runner"), "--agents", "4"]
    result = CliRunner().invoke(app, args + (["--submit"] if submit else []))
    assert result.exit_code == 0, result.output
    assert "4 agents via" in result.output
    assert ("in the kernel" if submit else "as HTTP clients") in result.output
    assert result.output.count("hello world") >= 3  # the fake model's answers
