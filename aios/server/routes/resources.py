"""Memory, storage and tool syscalls: ``POST /api/v1/{memory,storage,tools}/{op}``, the body
a JSON object of the operation's arguments, ``?timeout=`` seconds."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from aios.errors import AIOSError, InvalidRequest
from aios.identity import Identity
from aios.resources import MEMORY_OPS, STORAGE_OPS, TOOL_OPS
from aios.server.errors import exception_response
from aios.server.http import ClientGone, cancel_on_disconnect
from aios.server.schemas import SyscallOut
from aios.server.session import Caller, Server, envelope_responses

DOC = (
    "The body is a JSON object of the operation's arguments; ``?timeout=`` seconds. File "
    'content travels as text or as {"base64": "..."}.'
)


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    async def resource(kind: str, op: str, identity: Identity, request: Request) -> Response:
        claim = await server.idempotency.begin(identity, request)
        if isinstance(claim, Response):
            return claim
        try:
            response = await run(kind, op, identity, request, keyed=claim is not None)
            if claim is not None:
                await claim.record_response(response)
            return response
        finally:
            if claim is not None:
                claim.release()

    async def run(
        kind: str, op: str, identity: Identity, request: Request, *, keyed: bool
    ) -> Response:
        received = kernel.clock()
        timeout = _timeout(request.query_params.get("timeout"))
        raw = await request.body()
        try:
            args = json.loads(raw) if raw.strip() else {}
        except ValueError:
            args = None
        if not isinstance(args, dict):
            raise InvalidRequest("the body must be a JSON object of the operation's arguments")
        process = server.session(identity)
        call = kernel.submit(process, kind, op, args, timeout=timeout)
        try:
            # Under an idempotency key a disconnect does not cancel: the answer is recorded.
            watch = contextlib.nullcontext() if keyed else cancel_on_disconnect(request.receive)
            async with watch:
                result = await kernel.settle(process, call)
        except ClientGone:
            return Response(status_code=499)
        except AIOSError as e:
            envelope = server.envelope(call, identity.name, received, error=e)
            return exception_response(request.url.path, e, envelope=envelope)
        return JSONResponse(server.envelope(call, identity.name, received, result=result))

    operations = {
        "memory": ("Memory syscall", tuple(MEMORY_OPS)),
        "storage": ("Storage syscall", STORAGE_OPS),
        "tools": ('Tool syscall ({"name": ..., "arguments": {...}} for call)', TOOL_OPS),
    }
    for kind, (what, ops) in operations.items():
        api.post(
            f"/api/v1/{kind}/{{op}}",
            response_model=SyscallOut,
            responses=envelope_responses(),
            tags=[kind],
            summary=f"{what}: {', '.join(ops)}",
            description=DOC,
            name=f"{kind}_op",
        )(resource_route(resource, kind))
    return api


def resource_route(
    resource: Callable[[str, str, Identity, Request], Awaitable[Response]], kind: str
) -> Callable[..., Awaitable[Response]]:
    """The route of one kind of resource syscall (``/api/v1/KIND/{op}``)."""

    async def route(op: str, identity: Caller, request: Request) -> Response:
        return await resource(kind, op, identity, request)

    return route


def _timeout(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise InvalidRequest(f"timeout must be a positive number of seconds, got {value!r}")
    return seconds
