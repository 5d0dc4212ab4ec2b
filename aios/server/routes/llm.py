"""LLM syscalls: ``POST /api/v1/llm/chat`` and ``/api/v1/llm/complete``, answered with one
JSON envelope, or with ``stream=true`` as Server-Sent Events (``syscall``, ``token``..., then
``result`` or ``error``). :func:`collect` also runs the OpenAI routes' non-streamed calls."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from aios.errors import AIOSError
from aios.identity import Identity
from aios.server.errors import exception_response, http_status
from aios.server.http import ClientGone, EventStream, cancel_on_disconnect, sse
from aios.server.idempotency import Claim
from aios.server.schemas import ChatIn, CompleteIn, SyscallOut
from aios.server.session import Caller, Server, envelope_responses
from aios.syscall import Completion, LLMRequest


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    async def llm(body: ChatIn | CompleteIn, identity: Identity, request: Request) -> Response:
        claim = await server.idempotency.begin(identity, request)
        if isinstance(claim, Response):
            return claim
        streamed = False
        try:
            response = await run(body, identity, request, claim)
            streamed = isinstance(response, EventStream)  # the stream records and releases
            if claim is not None and not streamed:
                await claim.record_response(response)
            return response
        finally:
            if claim is not None and not streamed:
                claim.release()

    async def run(
        body: ChatIn | CompleteIn, identity: Identity, request: Request, claim: Claim | None
    ) -> Response:
        received = kernel.clock()
        call = body.call()
        process = server.admit(identity, call, body.stream)
        memory = body.memory.use() if isinstance(body, ChatIn) and body.memory else None
        events = kernel.llm_stream(
            process,
            call,
            timeout=body.timeout,
            priority=body.priority,
            deltas=body.stream,
            memory=memory,
        )
        if body.stream:
            return EventStream(
                syscall_events(server, identity, events, received, claim),
                on_error=lambda e: exception_response(request.url.path, e),
            )
        outcome = Outcome()
        try:
            outcome = await collect(events, request, outcome, watch=claim is None)
        except ClientGone:
            return Response(status_code=499)
        except AIOSError as e:
            envelope = server.envelope(outcome.syscall, identity.name, received, error=e)
            return exception_response(request.url.path, e, envelope=envelope)
        return JSONResponse(
            server.envelope(outcome.syscall, identity.name, received, completion=outcome.completion)
        )

    @api.post(
        "/api/v1/llm/chat",
        response_model=SyscallOut,
        responses=envelope_responses(),
        tags=["syscalls"],
        summary="LLM chat syscall (JSON result, or SSE with stream=true)",
    )
    async def llm_chat(body: ChatIn, identity: Caller, request: Request) -> Response:
        return await llm(body, identity, request)

    @api.post(
        "/api/v1/llm/complete",
        response_model=SyscallOut,
        responses=envelope_responses(),
        tags=["syscalls"],
        summary="LLM completion syscall on a raw prompt",
    )
    async def llm_complete(body: CompleteIn, identity: Caller, request: Request) -> Response:
        return await llm(body, identity, request)

    return api


@dataclass
class Outcome:
    """What a non-streamed syscall came to: its request (once queued) and its completion."""

    syscall: LLMRequest | None = None
    completion: Completion | None = None


async def collect(
    events: AsyncGenerator[LLMRequest | str | Completion, None],
    request: Request,
    outcome: Outcome,
    *,
    watch: bool = True,
) -> Outcome:
    """Run a non-streamed syscall to its end, cancelling it if the client disconnects
    (ClientGone; not with ``watch`` off: a call under an idempotency key). Typed errors
    propagate; ``outcome.syscall`` tells the caller which call ended (None: nothing was
    queued)."""
    watcher = cancel_on_disconnect(request.receive) if watch else contextlib.nullcontext()
    async with aclosing(events), watcher:
        async for event in events:
            if isinstance(event, LLMRequest):
                outcome.syscall = event
            elif isinstance(event, Completion):
                outcome.completion = event
    return outcome


async def syscall_events(
    server: Server,
    identity: Identity,
    events: AsyncGenerator[LLMRequest | str | Completion, None],
    received: float,
    claim: Claim | None = None,
) -> AsyncGenerator[bytes, None]:
    """SSE frames of one syscall: ``syscall`` (its id), ``token``..., then ``result`` or
    ``error`` (both carry the envelope). Under an idempotency ``claim`` the final envelope is
    recorded before it is sent."""
    syscall: LLMRequest | None = None
    try:
        async with aclosing(events), server.stream_slot(identity):
            try:
                async for event in events:
                    if isinstance(event, LLMRequest):
                        syscall = event
                        yield sse({"id": event.id}, "syscall")
                    elif isinstance(event, str):
                        yield sse({"text": event}, "token")
                    else:
                        body = server.envelope(syscall, identity.name, received, completion=event)
                        if claim is not None:
                            await claim.record(200, body)
                        yield sse(body, "result")
            except AIOSError as e:
                if syscall is None:
                    raise  # nothing sent yet: a plain HTTP error
                body = server.envelope(syscall, identity.name, received, error=e)
                if claim is not None:
                    await claim.record(http_status(e), body)
                yield sse(body, "error")
    finally:
        if claim is not None:
            claim.release()
