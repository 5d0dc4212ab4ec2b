"""Traces: the span tree and GenAI attributes of agents' syscalls (in-memory exporter), no
message text unless opted in, an incoming ``traceparent`` joins the caller's trace, and
tracing is off (no Tracing at all) unless configured."""

from __future__ import annotations

import asyncio
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
from fakes import CORE_DEFAULTS, FakeFactory
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from servers import EVERYTHING, Harness, serve

from aios.config import AccessConfig, CoreConfig, KernelConfig, ObservabilityConfig, StorageConfig
from aios.errors import ConfigError
from aios.kernel import Kernel
from aios.sdk.agent import Agent
from aios.server.config import load_settings
from aios.tools.spec import ToolContext, tool
from aios.tracing import Tracing

REPLY = "the answer"


@tool(timeout=10.0)
async def stash(text: str, ctx: ToolContext) -> str:
    """Keeps text in its caller's files (a syscall of its own, inside the tool's span)."""
    await ctx.call("storage", "write", {"path": "stash.txt", "content": text})
    return "kept"


@tool(timeout=10.0)
async def broken() -> str:
    """Always fails."""
    raise RuntimeError("out of order")


class Worker(Agent):
    name = "worker"

    async def run(self, task: str) -> str:
        reply = await self.llm.chat([{"role": "user", "content": task}], max_tokens=32)
        await self.tools.call("stash", text=reply.text)
        await self.memory.add(f"did {task}")
        return reply.text


def traced_kernel(tmp_path: Path, *, content: bool = False) -> tuple[Kernel, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    config = KernelConfig(
        cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
        policy="fair",
        storage=StorageConfig(database=str(tmp_path / "aios.db")),
        access=AccessConfig(groups={"default": EVERYTHING}),
        observability=ObservabilityConfig(capture_content=content),
    )
    k = Kernel(
        config,
        engine_factory=FakeFactory(lambda p: REPLY),
        span_processor=SimpleSpanProcessor(exporter),
    )
    k.tools.register(stash)
    k.tools.register(broken)
    return k, exporter


def tree(spans: tuple[ReadableSpan, ...], root: ReadableSpan) -> list[Any]:
    """(name, [children...]) below ``root``, children in start order."""
    children = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == _id(root)),
        key=lambda s: s.start_time or 0,
    )
    return [root.name, [tree(spans, c) for c in children]]


def _id(span: ReadableSpan) -> int:
    assert span.context is not None
    return span.context.span_id


def content_keys(spans: tuple[ReadableSpan, ...]) -> set[str]:
    return {
        key
        for span in spans
        for key in (span.attributes or {})
        if key in ("gen_ai.input.messages", "gen_ai.output.messages")
        or (key.startswith("gen_ai.tool.call.") and key != "gen_ai.tool.call.id")
    }


async def test_two_agents_give_one_trace_each_with_the_expected_spans(tmp_path: Path) -> None:
    k, exporter = traced_kernel(tmp_path)
    async with k:
        one, two = await asyncio.gather(k.run_agent(Worker, "task one"), k.run_agent(Worker, "two"))
    assert one.result == two.result == REPLY
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert sorted(r.name for r in roots) == ["invoke_agent worker"] * 2
    assert len({r.context.trace_id for r in roots if r.context}) == 2  # one trace per agent
    for root in roots:
        assert tree(spans, root) == [
            "invoke_agent worker",
            [
                ["chat fake", []],
                ["execute_tool stash", [["storage.write", []]]],
                ["memory.add", []],
            ],
        ]
    assert len(spans) == 2 * 5
    by_process = {r.attributes["gen_ai.agent.id"]: r for r in roots if r.attributes}
    assert set(by_process) == {one.id, two.id}
    root = by_process[one.id]
    assert root.attributes is not None
    assert root.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert root.attributes["gen_ai.conversation.id"] == one.id
    assert root.attributes["gen_ai.usage.input_tokens"] == one.prompt_tokens > 0
    assert root.attributes["gen_ai.usage.output_tokens"] == one.completion_tokens > 0
    assert root.attributes["aios.syscalls"] == 4  # the tool's storage.write is its too

    trace_of_one = root.context.trace_id if root.context else 0
    mine = {s.name: s for s in spans if s.context and s.context.trace_id == trace_of_one}
    chat = mine["chat fake"].attributes
    assert chat is not None
    assert chat["gen_ai.operation.name"] == "chat"
    assert chat["gen_ai.provider.name"] == "llama.cpp"  # an embedded core
    assert chat["gen_ai.request.model"] == chat["gen_ai.response.model"] == "fake"
    assert chat["gen_ai.request.max_tokens"] == 32
    assert chat["gen_ai.request.temperature"] == 0.0
    assert chat["gen_ai.response.finish_reasons"] == ("stop",)
    assert chat["gen_ai.usage.input_tokens"] == one.prompt_tokens
    assert chat["gen_ai.usage.output_tokens"] == one.completion_tokens
    assert chat["gen_ai.usage.cache_read.input_tokens"] == 0  # its first call: nothing cached
    assert chat["gen_ai.conversation.id"] == one.id
    assert chat["aios.core"] == "fake"
    assert mine["chat fake"].resource.attributes["aios.policy"] == "fair"
    assert chat["aios.preemptions"] == 0 and chat["aios.queue_s"] >= 0
    assert chat["aios.slot"] in range(4)
    assert chat["aios.agent"] == "worker" and chat["gen_ai.response.id"].startswith("sc-")
    tool_span = mine["execute_tool stash"].attributes
    assert tool_span is not None
    assert tool_span["gen_ai.operation.name"] == "execute_tool"
    assert tool_span["gen_ai.tool.name"] == "stash"
    assert tool_span["aios.decision"] == "allowed"
    assert (mine["storage.write"].attributes or {})["aios.resource"] == "stash.txt"
    assert all(s.status.status_code is not StatusCode.ERROR for s in spans)
    assert content_keys(spans) == set()  # no message text unless opted in


async def test_content_is_recorded_only_when_opted_in(tmp_path: Path) -> None:
    k, exporter = traced_kernel(tmp_path, content=True)
    async with k:
        await k.run_agent(Worker, "secret task")
    spans = {s.name: s for s in exporter.get_finished_spans()}
    chat = spans["chat fake"].attributes or {}
    assert json.loads(str(chat["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": "secret task"}]}
    ]
    assert json.loads(str(chat["gen_ai.output.messages"]))[0]["parts"][0]["content"] == REPLY
    root = spans["invoke_agent worker"].attributes or {}
    assert "secret task" in str(root["gen_ai.input.messages"])


async def test_a_failed_call_and_a_killed_agent_are_errors(tmp_path: Path) -> None:
    class Breaks(Agent):
        name = "breaks"

        async def run(self, task: str) -> str:
            await self.tools.call("broken")
            return "unreachable"

    k, exporter = traced_kernel(tmp_path)
    async with k:
        process = await k.run_agent(Breaks, "t")
    assert process.error is not None
    spans = {s.name: s for s in exporter.get_finished_spans()}
    failed = spans["execute_tool broken"]
    assert failed.status.status_code is StatusCode.ERROR
    assert (failed.attributes or {})["error.type"] == "tool_error"
    agent = spans["invoke_agent breaks"]
    assert agent.status.status_code is StatusCode.ERROR
    assert (agent.attributes or {})["error.type"] == "tool_error"


def test_tracing_is_off_unless_configured(tmp_path: Path) -> None:
    assert Kernel(KernelConfig(), llm=False).tracing is None
    plain = KernelConfig()
    assert Tracing.configure(plain, env={}) is None
    assert (
        Tracing.configure(
            KernelConfig(observability=ObservabilityConfig(tracing=False)),
            env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
        )
        is None
    )
    on = Tracing.configure(plain, env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert on is not None
    on.close()
    explicit = Tracing.configure(KernelConfig(observability=ObservabilityConfig(tracing=True)))
    assert explicit is not None  # spans recorded, sent nowhere
    explicit.close()
    config = tmp_path / "aios.toml"
    config.write_text('[observability]\notlp_endpoint = "http://collector:4318"\n')
    settings = load_settings(config, env={})
    assert settings.kernel.observability.otlp_endpoint == "http://collector:4318"
    config.write_text('[observability]\notlp_endpoint = "collector:4318"\n')
    with pytest.raises(ConfigError, match="http"):
        load_settings(config, env={})
    config.write_text('[observability]\nmetrics_token = "s3cret-s3cret-s3cret"\n')
    assert "s3cret" not in repr(load_settings(config, env={}))


@pytest.fixture
def traced_server(tmp_path: Path) -> Iterator[tuple[Harness, InMemorySpanExporter]]:
    with serve(
        tmp_path,
        access=AccessConfig(groups={"default": EVERYTHING}),
        observability=ObservabilityConfig(tracing=True),
    ) as harness:
        kernel = harness.srv.kernel
        assert kernel is not None and kernel.tracing is not None
        exporter = InMemorySpanExporter()
        kernel.tracing.processor.add_span_processor(SimpleSpanProcessor(exporter))
        yield harness, exporter


TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"


def test_an_incoming_traceparent_joins_the_callers_trace(
    traced_server: tuple[Harness, InMemorySpanExporter],
) -> None:
    server, exporter = traced_server
    token = server.agent("alice")
    client = server.client(token)
    joined = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
    message = [{"role": "user", "content": "hi"}]
    envelope = client.post("/api/v1/llm/chat", json={"messages": message}, headers=joined).json()
    assert envelope["status"] == "done" and envelope["trace_id"] == TRACE
    write = {"path": "a.txt", "content": "x"}
    written = client.post("/api/v1/storage/write", json=write, headers=joined).json()
    assert written["trace_id"] == TRACE
    fresh = client.post("/api/v1/llm/chat", json={"messages": message}).json()
    assert fresh["trace_id"] not in (None, TRACE)  # no header: a trace of its own
    body = {"model": "fake", "messages": message}
    openai = client.post("/v1/chat/completions", json=body, headers=joined)
    assert openai.status_code == 200 and openai.headers["traceparent"].startswith(f"00-{TRACE}-")
    with client.stream(
        "POST", "/v1/chat/completions", json={**body, "stream": True}, headers=joined
    ) as streamed:
        assert streamed.headers["traceparent"].startswith(f"00-{TRACE}-")
        assert any("[DONE]" in line for line in streamed.iter_lines())
    spans = exporter.get_finished_spans()
    joined_spans = [s for s in spans if s.context and format(s.context.trace_id, "032x") == TRACE]
    assert sorted(s.name for s in joined_spans) == ["chat fake"] * 3 + ["storage.write"]
    assert all(s.parent is not None and s.parent.span_id == int(PARENT, 16) for s in joined_spans)
    assert all(s.parent.is_remote for s in joined_spans if s.parent)
    untraced = httpx.post(
        f"{server.url}/api/v1/llm/chat",
        json={"messages": message},
        headers={"authorization": f"Bearer {token}", "traceparent": "garbage"},
    ).json()
    assert untraced["status"] == "done" and untraced["trace_id"] not in (None, TRACE)


def test_an_unsampled_parent_records_nothing(
    traced_server: tuple[Harness, InMemorySpanExporter],
) -> None:
    server, exporter = traced_server
    client = server.client(server.agent("alice"))
    unsampled = {"traceparent": f"00-{TRACE}-{PARENT}-00"}
    message = [{"role": "user", "content": "hi"}]
    envelope = client.post("/api/v1/llm/chat", json={"messages": message}, headers=unsampled)
    assert envelope.json()["status"] == "done" and envelope.json()["trace_id"] == TRACE
    assert exporter.get_finished_spans() == ()


class Sink(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP collector that keeps what it is sent."""

    received: ClassVar[list[tuple[str, str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.received.append((self.path, self.headers.get("content-type", ""), body))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


async def test_spans_reach_an_otlp_collector_from_the_export_process(tmp_path: Path) -> None:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    collector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=collector.serve_forever, daemon=True).start()
    Sink.received.clear()
    try:
        config = KernelConfig(
            cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
            storage=StorageConfig(database=str(tmp_path / "aios.db")),
            access=AccessConfig(groups={"default": EVERYTHING}),
            observability=ObservabilityConfig(
                otlp_endpoint=f"http://127.0.0.1:{collector.server_port}", service_name="agents-1"
            ),
        )
        k = Kernel(config, engine_factory=FakeFactory(lambda p: REPLY))
        k.tools.register(stash)
        async with k:
            process = await k.run_agent(Worker, "exported")
        assert process.result == REPLY  # the kernel's exit flushed the batch to the child
    finally:
        collector.shutdown()
        collector.server_close()
    assert Sink.received, "the collector got nothing"
    assert {(path, kind) for path, kind, _ in Sink.received} == {
        ("/v1/traces", "application/x-protobuf")
    }
    names, services = [], set()
    for _, _, body in Sink.received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            services.add(attributes["service.name"])
            names += [s.name for scope in resource_spans.scope_spans for s in scope.spans]
    assert services == {"agents-1"}
    assert sorted(names) == sorted(
        ["invoke_agent worker", "chat fake", "execute_tool stash", "storage.write", "memory.add"]
    )
