"""The kernel's event stream over HTTP: ``GET /api/v1/events`` (Server-Sent Events), one
``ready`` frame, then one frame per event (its kind as the SSE event name, its JSON as data:
see aios.events). An agent's token sees the events of its own agent only; the admin's, all.
A client that reads too slowly drops events and is told (a ``dropped`` frame with the count);
it never slows the kernel. The stream ends when the kernel stops."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from fastapi import APIRouter, Request
from fastapi.responses import Response

from aios.events import Subscription
from aios.identity import Identity
from aios.server.errors import exception_response
from aios.server.http import EventStream, sse
from aios.server.session import Caller, Server


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    async def frames(subscription: Subscription, identity: Identity) -> AsyncGenerator[bytes, None]:
        async with subscription, server.stream_slot(identity):
            yield sse({"principals": sorted(subscription.principals or ())}, "ready")
            async for event in subscription:
                yield sse(event.to_json(), event.kind)

    @api.get(
        "/api/v1/events",
        tags=["events"],
        summary="The kernel's events as they happen (SSE): the caller's agent's, or all (admin)",
    )
    async def events(request: Request, identity: Caller) -> Response:
        principals = None if identity.admin else {identity.name}
        subscription = kernel.events.subscribe(principals=principals)
        stream = frames(subscription, identity)
        return EventStream(stream, on_error=lambda e: exception_response(request.url.path, e))

    return api
