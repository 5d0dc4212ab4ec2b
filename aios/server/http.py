"""ASGI plumbing the routes share: a body-size limit, cancellation when the client goes away,
and a Server-Sent Events response that always closes its event source."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from typing import Any

from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ClientGone(Exception):
    """The client closed the connection; the work done for it was cancelled."""


@asynccontextmanager
async def cancel_on_disconnect(receive: Receive) -> AsyncIterator[None]:
    """Run the body; if the client disconnects meanwhile, cancel it and raise ClientGone.
    (Like ``asyncio.timeout``, with the client's disconnect as the deadline.) Call only after
    the request body was read: the watcher consumes the ASGI receive channel."""
    task = asyncio.current_task()
    assert task is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        task.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    except asyncio.CancelledError:
        if gone and task.uncancel() == 0:
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()


class EventStream(Response):
    """``text/event-stream`` from an async generator of ready-made SSE frames. Nothing is sent
    until the first frame exists, so an error raised before it (a bad request, a full queue)
    still becomes a normal HTTP error response via ``on_error``. The generator is closed
    (``aclose``) however the response ends: a client that leaves cancels its syscall."""

    media_type = "text/event-stream"

    def __init__(
        self,
        frames: AsyncGenerator[bytes, None],
        on_error: Callable[[Exception], Response],
        headers: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        """``headers``: more response headers, asked for once the first frame exists (what
        they say, a trace id, may be known only then)."""
        # Not Response.__init__: it would declare a Content-Length for an empty body.
        self.status_code = 200
        self.background = None
        self.raw_headers = [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self._frames = frames
        self._on_error = on_error
        self._late = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with aclosing(self._frames) as frames:
            try:
                first = await anext(frames)
            except StopAsyncIteration:
                first = b""
            except Exception as e:  # before any byte went out: a plain HTTP error
                await self._on_error(e)(scope, receive, send)
                return
            headers = list(self.raw_headers)
            if self._late is not None:
                headers += [
                    (k.encode("latin-1"), v.encode("latin-1")) for k, v in self._late().items()
                ]
            try:
                async with cancel_on_disconnect(receive):
                    await send({"type": "http.response.start", "status": 200, "headers": headers})
                    await send({"type": "http.response.body", "body": first, "more_body": True})
                    async for frame in frames:
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            except (ClientGone, OSError):
                return


def sse(data: Any, event: str | None = None) -> bytes:
    """One SSE frame with a JSON payload (or a literal string such as ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body exceeds the server's limit of {limit} bytes")


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413: at once when Content-Length says
    so, else as soon as the streamed body passes the limit (nothing past it is buffered)."""

    def __init__(self, app: ASGIApp, limit: int, reject: Callable[[Scope, str], Response]):
        self.app = app
        self.limit = limit
        self.reject = reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                error = BodyTooLarge(self.limit)
                await self.reject(scope, error.detail)(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited, send)


class TraceContext:
    """A request's W3C ``traceparent`` (and ``tracestate``) header becomes the current trace
    context while it is served, so the spans of the syscalls it makes join the caller's trace.
    Installed only when the kernel traces."""

    HEADERS = (b"traceparent", b"tracestate")

    def __init__(self, app: ASGIApp) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.app = app
        self.propagator = TraceContextTextMapPropagator()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        carrier = {
            name.decode("latin-1"): value.decode("latin-1")
            for name, value in scope.get("headers", ())
            if name in self.HEADERS
        }
        if scope["type"] != "http" or "traceparent" not in carrier:
            await self.app(scope, receive, send)
            return
        from opentelemetry import context

        token = context.attach(self.propagator.extract(carrier))
        try:
            await self.app(scope, receive, send)
        finally:
            context.detach(token)


class ContainErrors:
    """An unexpected exception becomes the response ``respond`` makes of it (a 500 that logs
    it once), instead of reaching the ASGI server, which would log it again and close the
    client's connection. Once a response has started, nothing can be sent: it propagates."""

    def __init__(self, app: ASGIApp, respond: Callable[[Scope, Exception], Response]):
        self.app = app
        self.respond = respond

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as error:
            if started:
                raise
            await self.respond(scope, error)(scope, receive, send)
