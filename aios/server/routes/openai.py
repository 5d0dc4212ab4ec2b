"""The OpenAI-compatible routes: ``GET /v1/models`` and ``POST /v1/chat/completions`` (JSON,
or ``chat.completion.chunk`` frames then ``[DONE]``). How a request becomes a syscall, and
where aios differs from OpenAI: :mod:`aios.server.openai_api`."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from aios.errors import AIOSError, ModelNotFound
from aios.identity import Identity
from aios.server.errors import exception_response, openai_error
from aios.server.http import ClientGone, EventStream, sse
from aios.server.openai_api import ChatCompletionIn, Plan
from aios.server.routes.llm import Outcome, collect
from aios.server.session import Caller, Server, usage_json
from aios.syscall import Completion, LLMRequest
from aios.tracing import traceparent


def trace_header(syscall: LLMRequest | None) -> dict[str, str]:
    """``traceparent`` naming the call's span (an OpenAI client has no envelope to read)."""
    value = traceparent(syscall)
    return {} if value is None else {"traceparent": value}


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    @api.get("/v1/models", tags=["openai"])
    async def models(identity: Caller) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "aios"}
                for name in kernel.cores
            ],
        }

    @api.post("/v1/chat/completions", tags=["openai"])
    async def chat_completions(
        body: ChatCompletionIn,
        identity: Caller,
        request: Request,
    ) -> Response:
        model = body.model if body.model in kernel.cores else None
        if model is None and server.config.strict_models:
            raise ModelNotFound(f"no model {body.model!r}; see GET /v1/models")
        plan = Plan(body, model or kernel.config.default_model)
        process = server.admit(identity, plan.call, body.stream)
        events = kernel.llm_stream(
            process, plan.call, priority=body.priority, deltas=body.stream and not plan.tools
        )
        outcome = Outcome()
        if body.stream:
            return EventStream(
                chunks(server, identity, plan, events, outcome),
                on_error=lambda e: exception_response(request.url.path, e),
                headers=lambda: trace_header(outcome.syscall),
            )
        try:
            outcome = await collect(events, request, outcome)
        except ClientGone:
            return Response(status_code=499)
        assert outcome.completion is not None
        completion = outcome.completion
        message, reason = plan.message(completion)
        return JSONResponse(
            {
                "id": f"chatcmpl-{completion.syscall_id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": completion.model,
                "choices": [
                    {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
                ],
                "usage": usage_json(completion),
                "system_fingerprint": None,
            },
            headers=trace_header(outcome.syscall),
        )

    return api


async def chunks(
    server: Server,
    identity: Identity,
    plan: Plan,
    events: AsyncGenerator[LLMRequest | str | Completion, None],
    outcome: Outcome,
) -> AsyncGenerator[bytes, None]:
    """``chat.completion.chunk`` frames, then ``[DONE]``. An error after the first frame is
    sent as ``{"error": ...}`` (what OpenAI clients raise on). ``outcome.syscall`` names the
    call once it is queued."""
    created = int(time.time())
    head: dict[str, Any] = {}

    def chunk(delta: dict[str, Any], reason: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        return sse({**head, "choices": [choice]})

    async with aclosing(events), server.stream_slot(identity):
        try:
            async for event in events:
                if isinstance(event, LLMRequest):
                    outcome.syscall = event
                    head = {
                        "id": f"chatcmpl-{event.id}",
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": plan.model,
                    }
                    yield chunk({"role": "assistant", "content": ""})
                elif isinstance(event, str):
                    yield chunk({"content": event})
                else:
                    message, reason = plan.message(event)
                    if plan.tools:
                        delta = {k: v for k, v in message.items() if k != "role"}
                        for i, call in enumerate(delta.get("tool_calls", ())):
                            call["index"] = i
                        yield chunk(delta)
                    yield chunk({}, reason)
                    options = plan.body.stream_options
                    if options is not None and options.include_usage:
                        yield sse({**head, "choices": [], "usage": usage_json(event)})
                    yield sse("[DONE]")
        except AIOSError as e:
            if not head:
                raise  # nothing sent yet: a plain HTTP error
            yield sse(openai_error(e.code, str(e)))
