"""Traces of what the kernel does: OpenTelemetry spans after the GenAI semantic conventions.

    invoke_agent researcher        one per agent process the kernel runs
      chat smollm2                 an LLM syscall (gen_ai.* and aios.* attributes)
      execute_tool python          a tool call
        storage.write              a syscall the tool made as its caller
      memory.search                memory and storage calls: internal spans

A syscall of an agent outside the kernel (HTTP) is a child of the caller's span when its request
carries a W3C ``traceparent`` header, so an agent framework's trace and the kernel's are one
(an unsampled parent is honoured: nothing is recorded below it).

Off unless configured (:class:`aios.config.ObservabilityConfig`, or a span processor given to
the kernel): the kernel then holds no :class:`Tracing` and pays one ``is None`` check per
syscall state change. Message text is recorded only with ``capture_content`` (the
conventions' opt-in ``gen_ai.input.messages`` / ``gen_ai.output.messages``). The kernel owns
its processors: nothing here touches OpenTelemetry's global tracer provider.

Spans are the SDK's own (``ReadableSpan``, handed to SDK span processors and exporters), built
once when the call ends from a small :class:`SpanRecord` kept on the call, instead of through
``Tracer.start_span``: that costs about 95 us a span here (sampler, locks, attribute checks
per value), a tenth of a syscall on the instant simulated core; a record costs about 9 us.
The attribute values are ours and of valid types, so they need no checking.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanProcessor,
    SynchronousMultiSpanProcessor,
)
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from aios import __version__
from aios.config import CoreConfig, KernelConfig
from aios.errors import AIOSError, ConfigError
from aios.resources import ResourceCall
from aios.syscall import LLMRequest, Syscall

if TYPE_CHECKING:
    from aios.llm.base import Core
    from aios.process import AgentProcess

OTLP_ENV = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET = Status(StatusCode.UNSET)


class SpanRecord:
    """A span being recorded: what the SDK's span will hold, until it ends."""

    __slots__ = ("attributes", "context", "events", "kind", "name", "parent", "start", "status")
    events: list[Event] | None

    def __init__(
        self,
        name: str,
        kind: SpanKind,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: dict[str, Any],
    ) -> None:
        self.name = name
        self.kind = kind
        self.context = context
        self.parent = parent
        self.attributes = attributes
        self.events = None
        self.status = UNSET
        self.start = time.time_ns()

    def event(self, name: str) -> None:
        if self.events is None:
            self.events = []
        self.events.append(Event(name, timestamp=time.time_ns()))

    def fail(self, code: str, description: str) -> None:
        self.attributes["error.type"] = code
        self.status = Status(StatusCode.ERROR, description[:200])

    @contextlib.contextmanager
    def current(self) -> Iterator[None]:
        """This span is the current one in the body (the parent of spans opened there)."""
        token = otel_context.attach(trace.set_span_in_context(NonRecordingSpan(self.context)))
        try:
            yield
        finally:
            otel_context.detach(token)


class Tracing:
    """The kernel's spans: one per agent process it runs, one per syscall (see the module's
    docstring). The kernel calls :meth:`opened` when a syscall is queued, :meth:`changed` at
    each of its state changes, :meth:`agent` around an agent's ``run``. Ended spans go to
    :attr:`processor` (add exporters' processors to it)."""

    def __init__(
        self,
        *processors: SpanProcessor,
        service_name: str = "aios",
        capture_content: bool = False,
        policy: str = "",
    ) -> None:
        self.processor = SynchronousMultiSpanProcessor()  # type: ignore[no-untyped-call]
        for processor in processors:
            self.processor.add_span_processor(processor)
        # What holds for every span of this kernel is said once, on the resource.
        self.resource = Resource.create({"service.name": service_name, "aios.policy": policy})
        self.scope = InstrumentationScope("aios", __version__)
        self.capture_content = capture_content
        self._ids = RandomIdGenerator()
        self._cores: dict[Core | None, tuple[str, str, SpanKind]] = {}  # see _core

    @classmethod
    def configure(
        cls,
        config: KernelConfig,
        env: Mapping[str, str] | None = None,
        processor: SpanProcessor | None = None,
    ) -> Tracing | None:
        """The tracing ``config.observability`` asks for (None: off). With an OTLP endpoint
        (the config's, else the standard environment variables) spans are batched to it. A
        ``processor`` (an application's, a test's) turns tracing on and gets every span."""
        settings = config.observability
        env = os.environ if env is None else env
        endpoint = settings.otlp_endpoint
        traces_url = endpoint.rstrip("/") + "/v1/traces" if endpoint else ""
        if not traces_url:  # an explicit config wins over the environment
            traces_url = env.get(OTLP_ENV[0], "") or (
                env[OTLP_ENV[1]].rstrip("/") + "/v1/traces" if env.get(OTLP_ENV[1]) else ""
            )
        if processor is None and (
            settings.tracing is False or (settings.tracing is None and not traces_url)
        ):
            return None
        tracing = cls(
            *(() if processor is None else (processor,)),
            service_name=settings.service_name,
            capture_content=settings.capture_content,
            policy=config.policy,
        )
        if traces_url:
            try:
                import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
            except ImportError:
                raise ConfigError(
                    f"traces are to be sent to {traces_url}, and the OTLP exporter is not "
                    "installed: pip install 'aios[otlp]'"
                ) from None
            from opentelemetry.sdk.trace.export import BatchSpanProcessor

            from aios.span_export import ChildExporter

            exporter = ChildExporter(traces_url, tracing.resource, tracing.scope)
            tracing.processor.add_span_processor(BatchSpanProcessor(exporter))
        return tracing

    def close(self) -> None:
        """Send what is batched and stop the processors."""
        self.processor.shutdown()

    def _open(self, name: str, kind: SpanKind, attributes: dict[str, Any]) -> SpanRecord:
        """A span, a child of the current one (the caller's, or a remote parent's)."""
        parent: SpanContext | None = trace.get_current_span().get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            context = SpanContext(
                self._ids.generate_trace_id(), self._ids.generate_span_id(), False, SAMPLED
            )
        else:
            context = SpanContext(
                parent.trace_id, self._ids.generate_span_id(), False, parent.trace_flags,
                parent.trace_state,
            )  # fmt: skip
        return SpanRecord(name, kind, context, parent, attributes)

    def _close(self, record: SpanRecord) -> None:
        if not record.context.trace_flags.sampled:  # an unsampled parent: nothing recorded
            return
        self.processor.on_end(
            ReadableSpan(
                name=record.name,
                context=record.context,
                parent=record.parent,
                resource=self.resource,
                attributes=record.attributes,
                events=record.events or (),
                kind=record.kind,
                status=record.status,
                start_time=record.start,
                end_time=time.time_ns(),
                instrumentation_scope=self.scope,
            )
        )

    # -- agents ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def agent(self, process: AgentProcess) -> Iterator[None]:
        """``invoke_agent {name}`` around an agent's run; its syscalls' spans nest inside."""
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": process.name,
            "gen_ai.agent.id": process.id,
            "gen_ai.conversation.id": process.id,
            "aios.agent": process.principal.name,
        }
        if self.capture_content:
            attributes["gen_ai.input.messages"] = _messages([("user", process.task)])
        span = self._open(f"invoke_agent {process.name}", SpanKind.INTERNAL, attributes)
        try:
            with span.current():
                yield
        finally:
            attributes |= {
                "gen_ai.usage.input_tokens": process.prompt_tokens,
                "gen_ai.usage.output_tokens": process.completion_tokens,
                "aios.syscalls": process.syscalls,
                "aios.queue_s": process.waited,
            }
            if process.error is not None:
                span.fail(process.error.split(":", 1)[0], process.error)
            elif self.capture_content and process.result is not None:
                attributes["gen_ai.output.messages"] = _messages([("assistant", process.result)])
            self._close(span)

    # -- syscalls --------------------------------------------------------------------------
    def opened(self, process: AgentProcess, syscall: Syscall) -> None:
        """A syscall was queued: its span starts, a child of the caller's current span."""
        agent = process.owner or process.name  # (its principal's name)
        if isinstance(syscall, LLMRequest):
            call, params = syscall.call, syscall.params
            core_name, provider, kind = self._core(syscall.core)
            operation = "chat" if call.messages else "text_completion"
            attributes: dict[str, Any] = {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": provider,
                "gen_ai.request.model": call.model or core_name,
                "gen_ai.request.max_tokens": syscall.max_tokens,
                "gen_ai.request.temperature": params.temperature,
                "gen_ai.request.top_p": params.top_p,
                "gen_ai.conversation.id": process.id,
                "gen_ai.response.id": syscall.id,
                "aios.agent": agent,
                "aios.core": core_name,
            }
            if params.seed is not None:
                attributes["gen_ai.request.seed"] = params.seed
            if self.capture_content:
                turns: list[tuple[str, str]] = [(m.role, m.content) for m in call.messages]
                attributes["gen_ai.input.messages"] = _messages(
                    turns or [("user", call.prompt or "")]
                )
            name = f"{operation} {core_name}"
        elif isinstance(syscall, ResourceCall) and (syscall.kind, syscall.op) == ("tools", "call"):
            name, kind = f"execute_tool {syscall.resource}", SpanKind.INTERNAL
            attributes = {
                "gen_ai.operation.name": "execute_tool",
                "gen_ai.tool.name": syscall.resource,
                "gen_ai.tool.call.id": syscall.id,
                "gen_ai.tool.type": "function",
                "gen_ai.conversation.id": process.id,
                "aios.agent": agent,
            }
        else:
            op = syscall.op if isinstance(syscall, ResourceCall) else ""
            name, kind = f"{syscall.kind}.{op}", SpanKind.INTERNAL
            attributes = {
                "aios.syscall.id": syscall.id,
                "aios.resource": getattr(syscall, "resource", ""),
                "gen_ai.conversation.id": process.id,
                "aios.agent": agent,
            }
        syscall.span = self._open(name, kind, attributes)

    def _core(self, core: Core | None) -> tuple[str, str, SpanKind]:
        """A core's name, ``gen_ai.provider.name`` and span kind (computed once per core).
        The provider is llama.cpp for an embedded core, aios for one reached over HTTP or
        routed (the server behind it is not known to be any named provider); the kind is
        INTERNAL for a model in this process, CLIENT over the network (the conventions)."""
        known = self._cores.get(core)
        if known is None:
            embedded = core is not None and isinstance(core.config, CoreConfig)
            known = (
                core.name if core is not None else "",
                "llama.cpp" if embedded else "aios",
                SpanKind.INTERNAL if embedded else SpanKind.CLIENT,
            )
            self._cores[core] = known
        return known

    def changed(self, syscall: Syscall, state: str) -> None:
        """A syscall's state changed: admitted (its slot), pre-empted, restarted, or ended."""
        span = syscall.span
        if span is None:
            return
        if state == "running" and isinstance(syscall, LLMRequest):
            if syscall.slot is not None:
                span.attributes["aios.slot"] = syscall.slot
        elif state in ("preempted", "restarted"):
            span.event(f"aios.{state}")
        elif syscall.status.finished:
            self._end(syscall, span, state)

    def approval(self, syscall: Syscall, state: str) -> None:
        """The call waits for a person (``asked``), or was ``allowed`` / ``denied``."""
        if syscall.span is not None:
            syscall.span.event(f"aios.approval.{state}")

    def _end(self, syscall: Syscall, span: SpanRecord, state: str) -> None:
        timings = syscall.timings
        attributes = span.attributes
        attributes["aios.queue_s"] = timings.waited
        if isinstance(syscall, LLMRequest):
            usage = syscall.usage  # (a remote core's: the server's count)
            attributes |= {
                "gen_ai.response.model": attributes["aios.core"],
                "gen_ai.usage.input_tokens": usage.prompt_tokens,
                "gen_ai.usage.output_tokens": usage.completion_tokens,
                "gen_ai.usage.cache_read.input_tokens": syscall.reused_tokens,
                "aios.preemptions": syscall.preemptions,
            }
            if syscall.finish_reason is not None:
                attributes["gen_ai.response.finish_reasons"] = (syscall.finish_reason,)
            if timings.first_token is not None:
                attributes["aios.time_to_first_token_s"] = timings.first_token - timings.submitted
            if self.capture_content and state == "done":
                attributes["gen_ai.output.messages"] = _messages([("assistant", syscall.text)])
        elif isinstance(syscall, ResourceCall):
            attributes["aios.decision"] = syscall.decision
        if state == "failed":
            error = syscall.error
            span.fail(
                error.code if isinstance(error, AIOSError) else type(error).__name__, str(error)
            )
        elif state == "cancelled":
            span.fail("cancelled", "cancelled")
        self._close(span)

    @contextlib.contextmanager
    def inside(self, syscall: Syscall) -> Iterator[None]:
        """The syscall's span is the current one (a tool's own syscalls nest inside it)."""
        with syscall.span.current() if syscall.span else contextlib.nullcontext():
            yield


def trace_id(syscall: Syscall | None) -> str | None:
    """The W3C trace id (32 hex digits) of a traced syscall, else None."""
    context = _span_context(syscall)
    return None if context is None else format(context.trace_id, "032x")


def traceparent(syscall: Syscall | None) -> str | None:
    """A ``traceparent`` header value naming the syscall's span, else None."""
    context = _span_context(syscall)
    if context is None:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def _span_context(syscall: Syscall | None) -> SpanContext | None:
    span = None if syscall is None else syscall.span
    return None if span is None else span.context


def _messages(turns: Sequence[tuple[str, str]]) -> str:
    """Messages in the conventions' JSON shape (role and text parts)."""
    return json.dumps(
        [{"role": role, "parts": [{"type": "text", "content": text}]} for role, text in turns]
    )
