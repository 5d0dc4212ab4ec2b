"""Span export in a child process: OTLP encoding never holds the kernel's GIL.

The OTLP exporter encodes spans in Python, about 200 us a span here (a KeyValue message per
attribute): on the kernel's process that is half a syscall on the instant simulated core, taken
from the event loop by the export thread. :class:`ChildExporter` is the exporter the batch
processor calls; it only flattens each span to plain values (a tuple, a dict) and pickles the
batch down a pipe, and a child process rebuilds the spans and runs the real exporter there.

If the child dies, exports fail (the batch processor logs it) and the kernel goes on: tracing
never takes the kernel down. A slow child fills the pipe and then the batch processor's queue,
which drops spans (bounded, never blocking the kernel). ``shutdown`` tells the child to send
what it holds and waits up to 5 s for it (then stops it: a collector that is down loses them).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

log = logging.getLogger(__name__)
Flat = tuple[Any, ...]


def flatten(span: ReadableSpan) -> Flat:
    """A span as plain values (cheap to pickle)."""
    context, parent = span.context, span.parent
    assert context is not None  # (every span the kernel makes has one)
    return (
        span.name,
        context.trace_id,
        context.span_id,
        int(context.trace_flags),
        None if parent is None else (parent.trace_id, parent.span_id, parent.is_remote),
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        [(e.name, e.timestamp) for e in span.events],
        span.status.status_code.value,
        span.status.description,
    )


def rebuild(flat: Flat, resource: Resource, scope: InstrumentationScope) -> ReadableSpan:
    name, trace_id, span_id, flags, parent, kind, start, end, attributes, events, code, text = flat
    return ReadableSpan(
        name=name,
        context=SpanContext(trace_id, span_id, False, TraceFlags(flags)),
        parent=None if parent is None else SpanContext(parent[0], parent[1], parent[2]),
        resource=resource,
        attributes=attributes,
        events=[Event(n, timestamp=t) for n, t in events],
        kind=SpanKind(kind),
        status=Status(StatusCode(code), text),
        start_time=start,
        end_time=end,
        instrumentation_scope=scope,
    )


def otlp_child(conn: Connection, endpoint: str, resource: dict[str, Any], scope: str) -> None:
    """The child's loop: batches in, exported over OTLP/HTTP; ``None`` ends it."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint)
    spans_resource = Resource.create(resource)
    scope_name, _, scope_version = scope.partition(" ")
    instrumentation = InstrumentationScope(scope_name, scope_version)
    try:
        while True:
            try:
                batch = conn.recv()
            except EOFError:  # the kernel is gone
                break
            if batch is None:
                break
            exporter.export([rebuild(f, spans_resource, instrumentation) for f in batch])
    finally:
        exporter.shutdown()  # type: ignore[no-untyped-call]


class ChildExporter(SpanExporter):
    """Exports to an OTLP/HTTP ``endpoint`` from a child process (see the module)."""

    def __init__(self, endpoint: str, resource: Resource, scope: InstrumentationScope) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a threaded kernel
        self._conn, child = context.Pipe()
        self._process = context.Process(
            target=otlp_child,
            args=(child, endpoint, dict(resource.attributes), f"{scope.name} {scope.version}"),
            name="aios-span-export",
            daemon=True,
        )
        self._process.start()
        child.close()
        self._lock = threading.Lock()  # export and shutdown come from the processor's threads
        self._closed = False

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._lock:
            if self._closed:
                return SpanExportResult.FAILURE
            try:  # blocks (this thread, not the kernel's loop) while the pipe is full
                self._conn.send([flatten(s) for s in spans])
            except OSError:
                log.warning("the span export process is gone; spans are dropped")
                self._closed = True
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                with contextlib.suppress(OSError):
                    self._conn.send(None)
            self._conn.close()
        self._process.join(timeout=5)  # a collector that is down does not hold the kernel
        if self._process.is_alive():
            self._process.kill()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True  # what was handed to the child is the child's to send
