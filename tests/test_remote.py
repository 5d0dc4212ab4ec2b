"""Remote LLM cores (OpenAI-compatible servers) and the router.

Fast unit tests run the :class:`RemoteCore` against an in-process fake server
(``httpx.MockTransport``): SSE parsing, request bodies, retries and backoff, typed errors,
pre-emption with text-snapshot resume, bounded in-flight, and the router's failover and
affinity. Tests marked ``remote`` start real llama-cpp-python servers on SmolLM2-135M
(tests/remote_servers.py) and go through the kernel: chat and streaming, a server that is down,
deadlines and read timeouts, in-flight bounds seen by a counting proxy, API keys, failover
when a server is SIGKILLed mid-run, and session affinity.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import CORE_DEFAULTS, FakeFactory, chat_call, prompt_call, wait_until
from remote_servers import (
    MODEL_ID,
    SSE,
    CountingProxy,
    FakeServer,
    Handler,
    Server,
    SilentServer,
    chunk,
    free_port,
    gated,
    remote_core,
    reply,
    sse,
    start_server,
    wait_ready,
)

from aios.config import CoreConfig, KernelConfig, RemoteCoreConfig, RouterConfig
from aios.errors import (
    AIOSError,
    ConfigError,
    ContextOverflow,
    CoreError,
    CoreUnavailable,
    DeadlineExceeded,
    InvalidRequest,
    KernelShutdown,
    ModelNotFound,
    Overloaded,
)
from aios.kernel import Kernel
from aios.llm.base import Core
from aios.llm.core import LLMCore
from aios.llm.openai_compat import RemoteCore, sse_events
from aios.llm.router import Router
from aios.scheduler import FIFO, Capacity, Decision
from aios.scheduler.base import R
from aios.syscall import Completion, LLMCall, Message, SamplingParams, Status


def chat(text: str, **params: Any) -> LLMCall:
    return chat_call(text, **params)


# -- SSE and request bodies ---------------------------------------------------------------------


async def test_sse_events_joins_data_lines_and_skips_comments() -> None:
    async def lines() -> AsyncIterator[str]:
        for line in [": ping", "data: a", "data: b", "", "event: x", "data:c", "", "", "data: d"]:
            yield line

    assert [e async for e in sse_events(lines())] == ["a\nb", "c", "d"]


async def test_chat_body_streaming_and_server_usage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOS_TEST_KEY", "sk-secret")

    async def handler(body: dict[str, Any]) -> httpx.Response:
        return reply("Par", "is", ".", usage=(21, 3))

    async with remote_core(handler, api_key_env="AIOS_TEST_KEY") as (core, server, _):
        call = LLMCall(
            messages=(Message("system", "Be brief."), Message("user", "Capital of France?")),
            params=SamplingParams(max_tokens=12, stop=("\n",), seed=7, json=False),
        )
        request = core.submit("agent-1", call)
        completion: Completion = await request.future
    assert completion.text == "Paris."
    assert completion.finish_reason == "stop"
    assert completion.usage.prompt_tokens == 21 and completion.usage.completion_tokens == 3
    assert completion.model == "r" and completion.syscall_id == request.id
    t = completion.timings
    assert t.admitted is not None and t.first_token is not None and t.finished is not None
    assert t.submitted <= t.admitted <= t.first_token <= t.finished
    (sent,) = server.requests
    assert sent.url == "http://fake:8000/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-secret"
    assert server.bodies[0] == {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 12,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 7,
        "stop": ["\n"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ],
    }
    assert core.stats.completed == 1 and core.stats.http_requests == 1
    assert (core.queued, core.active) == (0, 0)


async def test_prompt_call_uses_completions_and_estimates_usage() -> None:
    async def handler(body: dict[str, Any]) -> httpx.Response:
        text = [{"choices": [{"text": t, "finish_reason": None}]} for t in (" Paris", ".")]
        end = {"choices": [{"text": "", "finish_reason": "length"}]}
        return httpx.Response(200, headers=SSE, content=sse(*text, end, "[DONE]"))

    async with remote_core(handler, default_max_tokens=2) as (core, server, _):
        completion = await core.submit("a", prompt_call("The capital of France is")).future
    assert server.requests[0].url.path == "/v1/completions"
    assert server.bodies[0]["prompt"] == "The capital of France is"
    assert server.bodies[0]["max_tokens"] == 2
    assert "messages" not in server.bodies[0]
    assert completion.text == " Paris." and completion.finish_reason == "length"
    # No usage from the server: ~4 characters a prompt token, one token a chunk.
    assert completion.usage.prompt_tokens == len("The capital of France is") // 4
    assert completion.usage.completion_tokens == 2


async def test_json_mode_asks_for_a_json_object_and_stops_at_a_complete_value() -> None:
    async def handler(body: dict[str, Any]) -> httpx.Response:
        return reply('{"a"', ": 1}", " trailing", finish="length")

    async with remote_core(handler) as (core, server, _):
        completion = await core.submit("a", chat("json please", json=True)).future
    assert server.bodies[0]["response_format"] == {"type": "json_object"}
    assert completion.text == '{"a": 1}' and completion.finish_reason == "stop"


async def test_stop_string_cuts_the_text_and_closes_the_stream() -> None:
    async def handler(body: dict[str, Any]) -> httpx.Response:
        return reply("one two ", "END three", " four")

    async with remote_core(handler) as (core, _, _):
        completion = await core.submit("a", chat("count", stop=("END",))).future
    assert completion.text == "one two " and completion.finish_reason == "stop"


async def test_missing_api_key_env_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOS_NO_SUCH_KEY", raising=False)
    config = RemoteCoreConfig(
        name="r", base_url="http://x/v1", model="m", api_key_env="AIOS_NO_SUCH_KEY"
    )
    with pytest.raises(ConfigError, match="AIOS_NO_SUCH_KEY"):
        await RemoteCore(config, FIFO()).start()


# -- retries, backoff and typed errors ------------------------------------------------------------


async def test_connection_errors_are_retried_with_exponential_backoff() -> None:
    attempts = 0

    async def handler(body: dict[str, Any]) -> httpx.Response:
        nonlocal attempts
        attempts += 1
        if attempts <= 2:
            raise httpx.ConnectError("[Errno 111] Connection refused")
        return reply("ok")

    async with remote_core(handler, retries=3) as (core, _, delays):
        completion = await core.submit("a", chat("hi")).future
    assert completion.text == "ok"
    # backoff 0.1 doubling, jitter fixed at 0.5: half fixed + half random = 0.75 of the base.
    assert delays == pytest.approx([0.075, 0.15])
    assert core.stats.retries == 2 and core.stats.http_requests == 3


async def test_429_honours_retry_after_then_gives_up_as_overloaded() -> None:
    async def handler(body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(429, headers={"retry-after": "0.5"}, json={"error": "busy"})

    async with remote_core(handler, retries=2) as (core, server, delays):
        with pytest.raises(Overloaded, match="HTTP 429: busy"):
            await core.submit("a", chat("hi")).future
    assert len(server.requests) == 3
    assert delays == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    ("status", "payload", "error", "attempts"),
    [
        (400, {"error": {"message": "bad temperature"}}, InvalidRequest, 1),
        (
            400,
            {"error": {"message": "This model's maximum context length is 2048"}},
            ContextOverflow,
            1,
        ),
        (404, {"error": {"message": "model m not found"}}, ModelNotFound, 1),
        (401, {"error": {"message": "invalid api key"}}, CoreError, 1),
        (500, {"error": {"message": "oops"}}, CoreError, 3),
        (503, {"error": {"message": "loading"}}, CoreUnavailable, 3),
    ],
)
async def test_http_errors_become_typed_errors(
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    payload: dict[str, Any],
    error: type[AIOSError],
    attempts: int,
) -> None:
    monkeypatch.setenv("AIOS_TEST_KEY", "sk-never-shown")

    async def handler(body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(status, json=payload)

    async with remote_core(handler, api_key_env="AIOS_TEST_KEY") as (core, server, _):
        with pytest.raises(error) as caught:
            await core.submit("a", chat("hi")).future
    assert type(caught.value) is error
    assert f"HTTP {status}" in str(caught.value)
    assert "sk-never-shown" not in str(caught.value)
    assert len(server.requests) == attempts
    assert core.stats.failed == 1


async def test_error_event_in_the_stream_is_a_core_error() -> None:
    async def handler(body: dict[str, Any]) -> httpx.Response:
        events = sse(chunk("par"), {"error": {"message": "out of memory"}})
        return httpx.Response(200, headers=SSE, content=events)

    async with remote_core(handler) as (core, server, _):
        with pytest.raises(CoreError, match="out of memory"):
            await core.submit("a", chat("hi")).future
    assert len(server.requests) == 1  # a server-side error is the call's, not retried


async def test_a_broken_stream_resumes_from_its_text_snapshot() -> None:
    """Tokens were streamed, then the connection broke: the retry continues the partial
    answer (conversation + assistant prefix), it never starts over."""

    async def handler(body: dict[str, Any]) -> httpx.Response:
        if len(body["messages"]) == 1:

            async def broken() -> AsyncIterator[bytes]:
                yield sse(chunk("The capital"), chunk(" of France"))
                raise httpx.ReadError("connection reset by peer")

            return httpx.Response(200, headers=SSE, content=broken())
        return reply(" is Paris.", usage=(30, 3))

    async with remote_core(handler) as (core, server, delays):
        completion = await core.submit("a", chat("Capital of France?", max_tokens=10)).future
    assert completion.text == "The capital of France is Paris."
    resumed = server.bodies[1]
    assert resumed["messages"][-1] == {"role": "assistant", "content": "The capital of France"}
    assert resumed["max_tokens"] == 8
    assert "continue_final_message" not in resumed
    assert core.stats.resumes == 1 and len(delays) == 1
    assert completion.usage.completion_tokens == 2 + 3  # chunks of the broken leg + server's


async def test_a_stream_that_ends_without_a_finish_reason_resumes() -> None:
    async def handler(body: dict[str, Any]) -> httpx.Response:
        if len(body["messages"]) == 1:  # e.g. llama-cpp-python interrupting a request
            return httpx.Response(200, headers=SSE, content=sse(chunk("Hel"), "[DONE]"))
        return reply("lo")

    async with remote_core(handler) as (core, _, _):
        completion = await core.submit("a", chat("hi")).future
    assert completion.text == "Hello"


# -- scheduling: bounded in flight, cancel, close, pre-emption ------------------------------------


async def test_never_more_than_max_inflight_requests_at_the_server() -> None:
    gate = asyncio.Event()

    async def handler(body: dict[str, Any]) -> httpx.Response:
        return gated(["a", "b"], gate, after=1)

    async with remote_core(handler, max_inflight=2) as (core, server, _):
        requests = [core.submit(f"agent-{i}", chat(f"q{i}")) for i in range(6)]
        await wait_until(lambda: server.in_flight == 2)
        await asyncio.sleep(0.05)  # nothing else gets through while both are held
        assert (server.in_flight, core.active, core.queued) == (2, 2, 4)
        assert [r.status for r in requests[:2]] == [Status.RUNNING] * 2
        gate.set()
        completions = await asyncio.gather(*(r.future for r in requests))
    assert [c.text for c in completions] == ["ab"] * 6
    assert server.max_in_flight == 2 and len(server.requests) == 6


async def test_cancel_closes_the_stream_and_frees_the_slot() -> None:
    gate = asyncio.Event()

    async def handler(body: dict[str, Any]) -> httpx.Response:
        return gated(["x", "y"], gate, after=1)

    async with remote_core(handler, max_inflight=1) as (core, server, _):
        first = core.submit("a", chat("1"))
        second = core.submit("b", chat("2"))
        await wait_until(lambda: first.text == "x")
        core.cancel(first)
        core.cancel(first)  # idempotent
        assert first.status is Status.CANCELLED and first.future.cancelled()
        await wait_until(lambda: second.text == "x")
        gate.set()
        assert (await second.future).text == "xy"
    assert server.max_in_flight == 1  # the cancelled stream was closed before the next began
    assert core.stats.cancelled == 1


async def test_close_fails_queued_and_running_calls_and_cancels_their_streams() -> None:
    gate = asyncio.Event()

    async def handler(body: dict[str, Any]) -> httpx.Response:
        return gated(["x", "y"], gate, after=1)

    async with remote_core(handler, max_inflight=1) as (core, server, _):
        running = core.submit("a", chat("1"))
        queued = core.submit("b", chat("2"))
        await wait_until(lambda: running.text == "x")
        await core.close()
        assert server.in_flight == 0  # the stream's task was cancelled and awaited
        for request in (running, queued):
            with pytest.raises(KernelShutdown):
                await request.future
        with pytest.raises(KernelShutdown):
            core.submit("c", chat("3"))


class PreemptForPriority:
    """A test policy: admit by priority; when full, pre-empt the lowest-priority running
    request for a higher-priority waiting one."""

    name = "test-preempt"

    def schedule(
        self, now: float, waiting: Sequence[R], running: Sequence[R], capacity: Capacity
    ) -> Decision[R]:
        admit = tuple(sorted(waiting, key=lambda r: -r.priority))
        if capacity.free_slots == 0 and waiting and running:
            low = min(running, key=lambda r: r.priority)
            if admit[0].priority > low.priority:
                return Decision(admit=admit, preempt=(low,))
        return Decision(admit=admit)


@pytest.mark.parametrize("chat_resume", ["assistant", "continue_final_message"])
async def test_preemption_keeps_the_partial_text_and_resumes_from_it(chat_resume: str) -> None:
    gate = asyncio.Event()

    async def handler(body: dict[str, Any]) -> httpx.Response:
        user = body["messages"][0]["content"]
        if user == "urgent":
            return reply("Done.")
        if body["messages"][-1]["role"] == "assistant":
            return reply(", friend.", usage=(40, 2))
        return gated(["Hello", " there", " never sent"], gate, after=2)

    async with remote_core(
        handler, policy=PreemptForPriority(), max_inflight=1, chat_resume=chat_resume
    ) as (core, server, _):
        low = core.submit("slow-agent", chat("greet me", max_tokens=20))
        await wait_until(lambda: low.text == "Hello there")
        high = core.submit("busy-agent", chat("urgent"), priority=5)
        assert (await high.future).text == "Done."
        completion = await low.future
    assert low.preemptions == 1 and core.stats.preemptions == 1
    assert completion.text == "Hello there, friend."  # partial + continuation
    # The pre-empted stream was closed before the urgent one started: one in flight at most.
    assert server.max_in_flight == 1
    resumed = server.bodies[2]
    assert resumed["messages"] == [
        {"role": "user", "content": "greet me"},
        {"role": "assistant", "content": "Hello there"},
    ]
    assert resumed["max_tokens"] == 18
    if chat_resume == "continue_final_message":
        assert resumed["continue_final_message"] is True
        assert resumed["add_generation_prompt"] is False
    else:
        assert "continue_final_message" not in resumed
    assert completion.usage.completion_tokens == 2 + 2
    assert completion.timings.admitted is not None
    assert completion.timings.admitted < completion.timings.finished  # type: ignore[operator]


async def test_server_down_fails_the_queue_fast() -> None:
    async def handler(body: dict[str, Any]) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    async with remote_core(handler, max_inflight=1, retries=1) as (core, server, _):
        requests = [core.submit(f"a{i}", chat("hi")) for i in range(4)]
        for request in requests:
            with pytest.raises(CoreUnavailable, match="cannot connect"):
                await request.future
    assert len(server.requests) == 2  # one call's retry budget, not four
    assert (core.queued, core.active) == (0, 0)


# -- the router on fake servers -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def routed(
    handlers: dict[str, Handler], *, limit: float = 5.0, **router: Any
) -> AsyncIterator[tuple[Router, dict[str, RemoteCore], dict[str, FakeServer]]]:
    async with contextlib.AsyncExitStack() as stack:
        cores: dict[str, RemoteCore] = {}
        servers: dict[str, FakeServer] = {}
        for name, handler in handlers.items():
            core, server, _ = await stack.enter_async_context(
                remote_core(handler, name=name, limit=limit, max_inflight=1, retries=0)
            )
            cores[name], servers[name] = core, server
        r = Router(RouterConfig("pool", tuple(handlers), **router), list(cores.values()))
        try:
            yield r, cores, servers
        finally:
            await r.close()


async def test_router_fails_over_every_call_of_a_dead_core() -> None:
    async def down(body: dict[str, Any]) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    async def up(body: dict[str, Any]) -> httpx.Response:
        return reply("fine")

    async with routed({"a": down, "b": up}) as (router, _, _):
        requests = [router.submit(f"agent-{i}", chat(f"q{i}")) for i in range(5)]
        completions = await asyncio.gather(*(r.future for r in requests))
    assert [c.text for c in completions] == ["fine"] * 5
    assert {c.model for c in completions} == {"b"}
    assert [c.syscall_id for c in completions] == [r.id for r in requests]
    assert router.stats.failovers >= 1 and router.stats.completed == 5
    assert all(r.status is Status.DONE for r in requests)


async def test_router_keeps_an_agent_on_its_core_unless_much_more_loaded() -> None:
    gate = asyncio.Event()

    async def answer(body: dict[str, Any]) -> httpx.Response:
        if body["messages"][0]["content"] == "hold":
            return gated(["held"], gate, after=0)
        return reply("hi")

    async with routed({"a": answer, "b": answer}) as (router, cores, _):
        first = await router.submit("x", chat("hi")).future
        home = first.model
        other = "b" if home == "a" else "a"
        assert (await router.submit("y", chat("hi")).future).model == other  # spread on ties
        for _ in range(2):
            assert (await router.submit("x", chat("again")).future).model == home
        # Load x's home core: one running (capacity 1) and one queued = load 2.0 vs 0.0.
        holders = [cores[home].submit("z", chat("hold")) for _ in range(2)]
        await wait_until(lambda: cores[home].active == 1 and cores[home].queued == 1)
        moved = router.submit("x", chat("now"))
        assert router.home_of("x") == other
        assert (await moved.future).model == other
        gate.set()
        await asyncio.gather(*(h.future for h in holders))


async def test_router_with_every_core_down_fails_with_core_unavailable() -> None:
    async def down(body: dict[str, Any]) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused")

    async with routed({"a": down, "b": down}) as (router, _, _):
        request = router.submit("x", chat("hi"))
        with pytest.raises(CoreUnavailable, match="Connection refused"):
            await request.future
        assert request.status is Status.FAILED and router.stats.failed == 1
        # Both are marked down now; a new call still tries them rather than refusing blindly.
        again = router.submit("x", chat("hi"))
        with pytest.raises(CoreUnavailable):
            await again.future


async def test_router_cancel_withdraws_the_call_from_its_core() -> None:
    gate = asyncio.Event()

    async def slow(body: dict[str, Any]) -> httpx.Response:
        return gated(["x", "y"], gate, after=1)

    async with routed({"a": slow}) as (router, cores, servers):
        request = router.submit("x", chat("hi"))
        await wait_until(lambda: request.text == "x")
        assert request.status is Status.RUNNING and router.active == 1
        router.cancel(request)
        router.cancel(request)
        assert request.status is Status.CANCELLED and request.future.cancelled()
        await wait_until(lambda: servers["a"].in_flight == 0)
        assert cores["a"].active == 0 and router.stats.cancelled == 1


async def test_invalid_calls_are_not_failed_over() -> None:
    async def bad(body: dict[str, Any]) -> httpx.Response:
        return httpx.Response(400, json={"error": {"message": "bad"}})

    async with routed({"a": bad, "b": bad}) as (router, _, servers):
        with pytest.raises(InvalidRequest):
            await router.submit("x", chat("hi")).future
    assert len(servers["a"].requests) + len(servers["b"].requests) == 1


async def test_kernel_routes_over_embedded_cores_and_fails_over_a_failed_step() -> None:
    """Routers work over embedded cores too (the Core protocol): a step that fails on one core
    is resubmitted to the other; the kernel builds routers from RouterConfig."""
    factory = FakeFactory(lambda prompt: "pong")
    config = KernelConfig(
        cores=(
            RouterConfig("pool", ("e1", "e2")),
            CoreConfig(name="e1", model="fake", **CORE_DEFAULTS),
            CoreConfig(name="e2", model="fake", **CORE_DEFAULTS),
        )
    )
    async with asyncio.timeout(5), Kernel(config, engine_factory=factory) as kernel:
        router = kernel.cores["pool"]
        assert isinstance(router, Router) and kernel.config.default_model == "pool"
        assert all(isinstance(c, LLMCore) for c in router.cores)
        process = kernel.register("agent")
        first = await kernel.llm(process, prompt_call("ping"))
        home = first.model
        factory.engines[home].fail_next = RuntimeError("llama_decode failed")
        second = await kernel.llm(process, prompt_call("ping again"))
        assert second.text == "pong" and second.model != home
        assert router.stats.failovers == 1
        assert process.syscalls == 2 and process.completion_tokens == 8


def test_cores_satisfy_the_core_protocol() -> None:
    def accepts(core: Core) -> str:
        return core.name

    config = RemoteCoreConfig(name="r", base_url="http://x/v1", model="m")
    remote = RemoteCore(config, FIFO())
    assert accepts(remote) == "r"
    assert accepts(Router(RouterConfig("p", ("r",)), [remote])) == "p"


def test_remote_and_router_config_validation() -> None:
    with pytest.raises(ConfigError, match="base_url"):
        RemoteCoreConfig(name="r", base_url="localhost:8000", model="m")
    with pytest.raises(ConfigError, match="max_inflight"):
        RemoteCoreConfig(name="r", base_url="http://x/v1", model="m", max_inflight=0)
    with pytest.raises(ConfigError, match="chat_resume"):
        RemoteCoreConfig(name="r", base_url="http://x/v1", model="m", chat_resume="magic")
    with pytest.raises(ConfigError, match="at least one core"):
        RouterConfig("p", ())
    remote = RemoteCoreConfig(name="r", base_url="http://x/v1", model="m")
    with pytest.raises(ConfigError, match="no core named 'gone'"):
        KernelConfig(cores=(remote, RouterConfig("p", ("r", "gone"))))
    with pytest.raises(ConfigError, match="is a router itself"):
        KernelConfig(cores=(remote, RouterConfig("p", ("r",)), RouterConfig("q", ("p",))))
    assert KernelConfig().cores == (CoreConfig(),)  # the embedded default is unchanged


# -- against real local servers (llama-cpp-python's server on SmolLM2-135M) ------------------------

API_KEY = "sk-aios-test"


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """Two real servers for the whole session; the second wants an API key."""
    logs = tmp_path_factory.mktemp("servers")
    a = start_server(logs)
    b = start_server(logs, api_key=API_KEY)
    try:
        wait_ready(a)
        wait_ready(b)
        yield a, b
    finally:
        a.kill()
        b.kill()


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Server]:
    """A server of the test's own, to be killed."""
    server = start_server(tmp_path)
    try:
        wait_ready(server)
        yield server
    finally:
        server.kill()


@pytest.fixture
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("AIOS_TEST_KEY", API_KEY)
    return "AIOS_TEST_KEY"


def remote(name: str, base_url: str, **kw: Any) -> RemoteCoreConfig:
    settings: dict[str, Any] = {"retries": 2, "backoff": 0.05, "connect_timeout": 2.0, **kw}
    return RemoteCoreConfig(name=name, base_url=base_url, model=MODEL_ID, **settings)


def kernel_on(*cores: RemoteCoreConfig | RouterConfig, timeout: float = 60.0) -> Kernel:
    return Kernel(KernelConfig(cores=cores, syscall_timeout=timeout))


QUESTION = "What is the capital of France?"


@pytest.mark.remote
async def test_real_chat_and_completion_through_the_kernel(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    async with asyncio.timeout(60), kernel_on(remote("smol", a.base_url)) as kernel:
        process = kernel.register("asker")
        answer = await kernel.llm(process, chat(QUESTION, max_tokens=16))
        assert answer.text.strip() and answer.model == "smol"
        assert answer.finish_reason in ("stop", "length")
        assert 1 <= answer.usage.completion_tokens <= 16
        assert answer.usage.prompt_tokens == len(QUESTION) // 4  # this server sends no usage
        text = await kernel.llm(process, prompt_call("The capital of France is", max_tokens=8))
        assert text.text and text.usage.completion_tokens <= 8
        data = await kernel.llm(process, chat("Give a JSON object.", max_tokens=24, json=True))
        assert data.text.lstrip().startswith("{")  # grammar-constrained by the server
        assert process.syscalls == 3 and process.completion_tokens > 0


@pytest.mark.remote
async def test_real_streaming_shows_partial_text_before_the_end(
    servers: tuple[Server, Server],
) -> None:
    a, _ = servers
    async with asyncio.timeout(60), kernel_on(remote("smol", a.base_url)) as kernel:
        core = kernel.cores["smol"]
        request = core.submit("watcher", chat("Tell me about Paris.", max_tokens=32))
        seen: list[str] = []
        while not request.status.finished:
            if request.text and (not seen or request.text != seen[-1]):
                seen.append(request.text)
            await asyncio.sleep(0.005)
        completion = await request.future
    assert len(seen) >= 3, seen  # the text grew chunk by chunk while the call ran
    assert all(completion.text.startswith(s) for s in seen)
    t = completion.timings
    assert t.first_token is not None and t.finished is not None and t.first_token < t.finished


@pytest.mark.remote
async def test_real_server_down_is_a_typed_error_before_the_deadline() -> None:
    port = free_port()  # nothing listens there
    async with asyncio.timeout(30), kernel_on(remote("gone", f"http://127.0.0.1:{port}/v1")) as k:
        started = time.monotonic()
        with pytest.raises(CoreUnavailable, match="cannot connect"):
            await k.llm(k.register("a"), chat("hi", max_tokens=4), timeout=10)
        assert time.monotonic() - started < 3  # 3 attempts, 0.05 s backoff: no hang
        assert k.cores["gone"].active == 0


@pytest.mark.remote
async def test_real_deadline_closes_the_stream_and_the_server_keeps_serving(
    servers: tuple[Server, Server],
) -> None:
    a, _ = servers
    async with asyncio.timeout(60), kernel_on(remote("smol", a.base_url)) as kernel:
        process = kernel.register("impatient")
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=r"did not finish within 0\.05s"):
            await kernel.llm(process, chat("Write a long story.", max_tokens=32), timeout=0.05)
        assert time.monotonic() - started < 1
        core = kernel.cores["smol"]
        await wait_until(lambda: core.active == 0, timeout=5)
        after = await kernel.llm(process, chat(QUESTION, max_tokens=8))
        assert after.text


@pytest.mark.remote
async def test_real_read_timeout_on_a_server_that_never_answers() -> None:
    async with SilentServer() as silent:
        config = remote("hung", silent.base_url, read_timeout=0.5)
        async with asyncio.timeout(30), kernel_on(config) as kernel:
            started = time.monotonic()
            with pytest.raises(CoreUnavailable, match="read timeout"):
                await kernel.llm(kernel.register("a"), chat("hi"), timeout=10)
            assert 0.4 < time.monotonic() - started < 3
        assert silent.connections == 1  # a read timeout is not retried


@pytest.mark.remote
async def test_real_in_flight_requests_never_exceed_max_inflight(
    servers: tuple[Server, Server],
) -> None:
    a, _ = servers
    async with CountingProxy(a.port) as proxy:
        config = remote("smol", proxy.base_url, max_inflight=2)
        async with asyncio.timeout(60), kernel_on(config) as kernel:
            core = kernel.cores["smol"]
            calls = [
                kernel.llm(kernel.register(f"a{i}"), chat(f"Say {i}.", max_tokens=6))
                for i in range(5)
            ]
            tasks = [asyncio.create_task(c) for c in calls]
            await wait_until(lambda: core.queued == 3, timeout=5)
            completions = await asyncio.gather(*tasks)
    assert all(c.text for c in completions)
    assert proxy.requests == 5
    assert proxy.max_in_flight == 2  # the bound was reached and never passed


@pytest.mark.remote
async def test_real_api_key_from_the_environment(
    servers: tuple[Server, Server], api_key: str
) -> None:
    _, b = servers
    keyed, keyless = remote("keyed", b.base_url, api_key_env=api_key), remote("keyless", b.base_url)
    async with asyncio.timeout(60), kernel_on(keyed, keyless) as kernel:
        process = kernel.register("a")
        hi, short = (Message("user", "hi"),), SamplingParams(max_tokens=4)
        ok = await kernel.llm(process, LLMCall(messages=hi, params=short, model="keyed"))
        assert ok.text
        with pytest.raises(CoreError, match="HTTP 401") as caught:
            await kernel.llm(process, LLMCall(messages=hi, params=short, model="keyless"))
        assert API_KEY not in str(caught.value)


@pytest.mark.remote
async def test_real_preemption_resumes_the_partial_answer(servers: tuple[Server, Server]) -> None:
    a, _ = servers
    config = remote("smol", a.base_url, max_inflight=1)
    async with asyncio.timeout(60):
        core = RemoteCore(config, PreemptForPriority())
        await core.start()
        loop = asyncio.create_task(core.run())
        try:
            low = core.submit("writer", chat("Tell me about Paris.", max_tokens=24))
            await wait_until(lambda: len(low.output_tokens) >= 3, timeout=20)
            high = core.submit("urgent", chat(QUESTION, max_tokens=6), priority=5)
            await high.future
            partial = low.text
            completion = await low.future
        finally:
            loop.cancel()
            await core.close()
    assert low.preemptions == 1 and core.stats.resumes == 1
    assert partial and completion.text.startswith(partial)
    assert core.stats.http_requests == 3  # low, high, low resumed
    assert completion.usage.completion_tokens <= 24


@pytest.mark.remote
async def test_real_router_fails_over_when_a_server_is_killed_mid_run(
    servers: tuple[Server, Server], victim: Server
) -> None:
    a, _ = servers
    cores = (  # the first core is the default model: the router
        RouterConfig("smol", ("victim", "survivor")),
        remote("victim", victim.base_url, max_inflight=2),
        remote("survivor", a.base_url, max_inflight=2),
    )
    async with asyncio.timeout(120), kernel_on(*cores) as kernel:
        router = kernel.cores["smol"]
        assert isinstance(router, Router)
        on_victim = kernel.cores["victim"]
        tasks = [
            asyncio.create_task(
                kernel.llm(
                    kernel.register(f"agent{i}"),
                    chat(f"Tell me about the number {i}.", max_tokens=24),
                )
            )
            for i in range(6)
        ]
        # Wait until the victim streams tokens, with calls in flight and queued on it.
        await wait_until(
            lambda: any(r.member is on_victim and r.text for r in router.live), timeout=30
        )
        moved = {r.id for r in router.live if r.member is on_victim}
        victim.kill()
        completions = await asyncio.gather(*tasks)
    assert len(moved) >= 2
    assert all(c.text for c in completions)
    assert all(c.model == "survivor" for c in completions if c.syscall_id in moved)
    assert router.stats.failovers >= len(moved)
    assert router.stats.completed == 6 and router.stats.failed == 0
    assert isinstance(on_victim, RemoteCore) and on_victim.stats.failed >= len(moved)


@pytest.mark.remote
async def test_real_router_session_affinity(servers: tuple[Server, Server], api_key: str) -> None:
    a, b = servers
    cores = (
        RouterConfig("smol", ("left", "right")),
        remote("left", a.base_url),
        remote("right", b.base_url, api_key_env=api_key),
    )
    async with asyncio.timeout(60), kernel_on(*cores) as kernel:
        x, y = kernel.register("x"), kernel.register("y")
        served: dict[str, list[str]] = {"x": [], "y": []}
        for _ in range(3):
            for name, process in (("x", x), ("y", y)):
                completion = await kernel.llm(process, chat(QUESTION, max_tokens=4))
                served[name].append(completion.model)
    assert len(set(served["x"])) == 1 and len(set(served["y"])) == 1
    assert served["x"][0] != served["y"][0]  # two agents spread over two idle servers
