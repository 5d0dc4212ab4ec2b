"""The kernel's HTTP face: the versioned syscall API (``/api/v1``), the OpenAI-compatible API
(``/v1``, see :mod:`aios.server.openai_api`) and management routes.

Identity comes only from the bearer token (:mod:`aios.identity`); nothing in a body can claim
to be another agent. Each identity's syscalls run under one kernel process (``@name``), so its
quota, fair share and KV reuse follow the credential. Every error is JSON: the syscall envelope
here, OpenAI's error object under ``/v1``; never a traceback.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException
from starlette.types import Scope

from aios import __version__
from aios.agents import AGENTS
from aios.errors import (
    AIOSError,
    Conflict,
    CoreError,
    CoreUnavailable,
    DeadlineExceeded,
    InvalidRequest,
    KernelShutdown,
    ModelNotFound,
    NotFound,
    Overloaded,
    PermissionDenied,
    QuotaExceeded,
    StorageError,
    StorageFull,
    SyscallCancelled,
    ToolError,
    ToolTimeout,
    Unauthenticated,
)
from aios.identity import Identities, Identity
from aios.kernel import Kernel
from aios.process import AgentProcess
from aios.resources import MEMORY_OPS, STORAGE_OPS, TOOL_OPS
from aios.server.config import ServerConfig
from aios.server.http import (
    BodyLimit,
    ClientGone,
    ContainErrors,
    EventStream,
    cancel_on_disconnect,
    sse,
)
from aios.server.schemas import (
    AgentIn,
    AgentOut,
    ChatIn,
    CompleteIn,
    CoreOut,
    ProcessOut,
    SpawnIn,
    SyscallOut,
)
from aios.syscall import Completion, LLMCall, LLMRequest, Syscall

log = logging.getLogger("aios.server")

STATUS: tuple[tuple[type[AIOSError], int], ...] = (  # most specific first
    (Unauthenticated, 401),
    (PermissionDenied, 403),
    (NotFound, 404),
    (ModelNotFound, 404),
    (InvalidRequest, 400),
    (SyscallCancelled, 409),
    (Conflict, 409),
    (StorageFull, 507),
    (StorageError, 503),
    (QuotaExceeded, 429),
    (Overloaded, 429),
    (CoreUnavailable, 503),
    (KernelShutdown, 503),
    (CoreError, 502),
    (ToolTimeout, 504),
    (ToolError, 502),
    (DeadlineExceeded, 504),
)


def http_status(error: AIOSError) -> int:
    return next((status for cls, status in STATUS if isinstance(error, cls)), 500)


def retry_after(error: BaseException) -> float | None:
    if isinstance(error, QuotaExceeded | Overloaded):
        return max(0.0, error.retry_after)
    return None


def openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(
    path: str,
    status: int,
    code: str,
    message: str,
    *,
    retry: float | None = None,
    envelope: dict[str, Any] | None = None,
) -> JSONResponse:
    """The error body a client of ``path`` expects: OpenAI's under /v1, the envelope else."""
    headers = {}
    if retry is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry)))
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    if openai_path(path):
        body: dict[str, Any] = {
            "error": {"message": message, "type": code, "param": None, "code": code}
        }
    else:
        body = envelope or {"id": None, "kind": "request", "agent": None, "status": "rejected"}
        body["error"] = {"type": code, "message": message}
    return JSONResponse(body, status_code=status, headers=headers)


class Server:
    """What every route needs: the kernel, the identities, the limits, and the streams each
    identity holds open."""

    def __init__(self, kernel: Kernel, identities: Identities, config: ServerConfig) -> None:
        self.kernel = kernel
        self.identities = identities
        self.config = config
        self.streams: Counter[str] = Counter()

    # -- identity ----------------------------------------------------------------------------
    def identify(self, credentials: HTTPAuthorizationCredentials | None) -> Identity:
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise Unauthenticated("missing credentials: send 'Authorization: Bearer <token>'")
        identity = self.identities.authenticate(credentials.credentials.strip())
        if identity is None:
            raise Unauthenticated("invalid or revoked token")
        return identity

    @staticmethod
    def require_admin(identity: Identity) -> None:
        if not identity.admin:
            raise PermissionDenied("this route needs the admin token")

    def owned(self, identity: Identity, process: AgentProcess | None) -> AgentProcess:
        """``process`` if the caller may see it; NotFound otherwise (never "forbidden", so
        other agents' ids cannot be probed)."""
        if process is None or not (identity.admin or process.owner == identity.name):
            raise NotFound("no such process")
        return process

    # -- LLM syscalls ------------------------------------------------------------------------
    def admit(self, identity: Identity, call: LLMCall, stream: bool) -> AgentProcess:
        """Apply the server's limits before anything is queued; the caller's process."""
        cap = self.config.max_tokens
        if call.params.max_tokens is not None and call.params.max_tokens > cap:
            raise InvalidRequest(f"max_tokens must be <= {cap} on this server")
        process = self.session(identity)
        if stream and self.streams[identity.name] >= self.config.max_streams_per_agent:
            raise Overloaded(
                f"agent {identity.name!r} has {self.streams[identity.name]} streams open "
                f"(limit {self.config.max_streams_per_agent}); retry when one ends"
            )
        return process

    def session(self, identity: Identity) -> AgentProcess:
        """The caller's process, under its in-flight limit (calls waiting for a quota place
        count: they hold a connection and a deadline, though no core sees them yet); its
        groups as the credential says now."""
        process = self.kernel.session(identity.name)
        process.groups = frozenset(identity.groups) | ({"admin"} if identity.admin else set())
        held = len(process.inflight) + self.kernel.quotas.waiting(process.id)
        if held >= self.config.max_inflight_per_agent:
            raise Overloaded(
                f"agent {identity.name!r} has {held} syscalls in flight or waiting for a quota "
                f"place (limit {self.config.max_inflight_per_agent}); retry when one ends"
            )
        return process

    @asynccontextmanager
    async def stream_slot(self, identity: Identity) -> AsyncIterator[None]:
        self.streams[identity.name] += 1
        try:
            yield
        finally:
            self.streams[identity.name] -= 1
            if not self.streams[identity.name]:
                del self.streams[identity.name]

    def envelope(
        self,
        syscall: Syscall | None,
        identity: str | None,
        received: float,
        *,
        completion: Completion | None = None,
        result: Any = None,
        error: BaseException | None = None,
        kind: str = "llm",
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": None,
            "kind": kind,
            "agent": identity,
            "status": "rejected",
            "result": None,
            "error": None,
            "timings": None,
        }
        if syscall is not None:
            t = syscall.timings
            end = t.finished if t.finished is not None else self.kernel.clock()
            body |= {
                "id": syscall.id,
                "kind": syscall.kind,
                "status": syscall.status.value,
                "timings": {
                    "queued_s": max(0.0, t.submitted - received),
                    "waited_s": t.waited,
                    "ran_s": None if t.admitted is None else end - t.admitted,
                    "total_s": end - received,
                },
            }
        if completion is not None:
            body["result"] = completion_json(completion)
        elif result is not None:
            body["result"] = encode_bytes(result)
        if error is not None:
            code = error.code if isinstance(error, AIOSError) else "internal_error"
            body["error"] = {"type": code, "message": str(error)}
            if body["status"] not in ("failed", "cancelled"):
                body["status"] = "failed" if syscall is not None else "rejected"
        return body

    def syscall_json(self, syscall: Syscall, process: AgentProcess) -> dict[str, Any]:
        value = None
        future = syscall.future
        if future.done() and not future.cancelled() and future.exception() is None:
            value = future.result()
        return self.envelope(
            syscall,
            process.owner,
            syscall.timings.submitted,
            completion=value if isinstance(value, Completion) else None,
            result=None if isinstance(value, Completion) else value,
            error=syscall.error,
        )

    def process_json(self, process: AgentProcess) -> dict[str, Any]:
        now = self.kernel.clock()
        return {
            "id": process.id,
            "name": process.name,
            "owner": process.owner,
            "state": process.state.value,
            "task": process.task[:200],
            "syscalls": process.syscalls,
            "prompt_tokens": process.prompt_tokens,
            "completion_tokens": process.completion_tokens,
            "waited_s": process.waited,
            "age_s": now - process.started,
            "turnaround_s": process.turnaround,
            "inflight": [s.id for s in process.inflight],
            "quota_waiting": self.kernel.quotas.waiting(process.id),
            "result": None if process.result is None else process.result[:2000],
            "error": process.error,
        }


def encode_bytes(value: Any) -> Any:
    """A result as JSON: bytes (file content) become ``{"base64": ...}``."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: encode_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [encode_bytes(v) for v in value]
    return value


def completion_json(completion: Completion) -> dict[str, Any]:
    usage = completion.usage
    return {
        "context": completion.context,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
        },
        "model": completion.model,
    }


async def caller(
    request: Request,
    credentials: Annotated[
        HTTPAuthorizationCredentials | None,
        Depends(HTTPBearer(auto_error=False, description="An agent token or the admin token.")),
    ],
) -> Identity:
    """The calling agent, from its bearer token (the only source of identity). Async, so it
    runs on the event loop (a sync dependency would cost every request a thread hop)."""
    server: Server = request.app.state.server
    return server.identify(credentials)


Caller = Annotated[Identity, Depends(caller)]


def create_app(
    kernel: Kernel, identities: Identities, config: ServerConfig, *, own_kernel: bool = True
) -> FastAPI:
    """The ASGI app. With ``own_kernel`` its lifespan starts and stops the kernel."""
    server = Server(kernel, identities, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not own_kernel:
            yield
            return
        async with kernel:
            yield

    app = FastAPI(
        title="aios",
        version=__version__,
        summary="The aios kernel: LLM syscalls for agents, scheduled and metered per agent.",
        lifespan=lifespan,
    )
    app.state.server = server
    install_error_handlers(app, server)

    # -- LLM syscalls ---------------------------------------------------------------------
    async def llm(body: ChatIn | CompleteIn, identity: Identity, request: Request) -> Response:
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
                syscall_events(server, identity, events, received),
                on_error=lambda e: exception_response(request.url.path, e),
            )
        outcome = Outcome()
        try:
            outcome = await collect(events, request, outcome)
        except ClientGone:
            return Response(status_code=499)
        except AIOSError as e:
            envelope = server.envelope(outcome.syscall, identity.name, received, error=e)
            return error_response(
                request.url.path,
                http_status(e),
                e.code,
                str(e),
                retry=retry_after(e),
                envelope=envelope,
            )
        return JSONResponse(
            server.envelope(outcome.syscall, identity.name, received, completion=outcome.completion)
        )

    responses: dict[int | str, dict[str, Any]] = {
        code: {"model": SyscallOut, "description": text}
        for code, text in (
            (400, "Invalid request"),
            (401, "Missing or invalid token"),
            (429, "Over a limit or quota (see Retry-After)"),
            (504, "Deadline exceeded"),
        )
    }

    @app.post(
        "/api/v1/llm/chat",
        response_model=SyscallOut,
        responses=responses,
        tags=["syscalls"],
        summary="LLM chat syscall (JSON result, or SSE with stream=true)",
    )
    async def llm_chat(body: ChatIn, identity: Caller, request: Request) -> Response:
        return await llm(body, identity, request)

    @app.post(
        "/api/v1/llm/complete",
        response_model=SyscallOut,
        responses=responses,
        tags=["syscalls"],
        summary="LLM completion syscall on a raw prompt",
    )
    async def llm_complete(body: CompleteIn, identity: Caller, request: Request) -> Response:
        return await llm(body, identity, request)

    # -- memory and storage syscalls ------------------------------------------------------
    async def resource(kind: str, op: str, identity: Identity, request: Request) -> Response:
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
            async with cancel_on_disconnect(request.receive):
                result = await kernel.settle(process, call)
        except ClientGone:
            return Response(status_code=499)
        except AIOSError as e:
            envelope = server.envelope(call, identity.name, received, error=e)
            return error_response(
                request.url.path,
                http_status(e),
                e.code,
                str(e),
                retry=retry_after(e),
                envelope=envelope,
            )
        return JSONResponse(server.envelope(call, identity.name, received, result=result))

    resource_doc = (
        "The body is a JSON object of the operation's arguments; ``?timeout=`` seconds. File "
        'content travels as text or as {"base64": "..."}.'
    )

    operations = {
        "memory": ("Memory syscall", tuple(MEMORY_OPS)),
        "storage": ("Storage syscall", STORAGE_OPS),
        "tools": ('Tool syscall ({"name": ..., "arguments": {...}} for call)', TOOL_OPS),
    }
    for kind, (what, ops) in operations.items():
        app.post(
            f"/api/v1/{kind}/{{op}}",
            response_model=SyscallOut,
            responses=responses,
            tags=[kind],
            summary=f"{what}: {', '.join(ops)}",
            description=resource_doc,
            name=f"{kind}_op",
        )(resource_route(resource, kind))

    @app.get("/api/v1/approvals", tags=["access"], summary="Calls waiting for approval (admin)")
    async def list_approvals(identity: Caller) -> Response:
        server.require_admin(identity)
        return JSONResponse([p.to_json() for p in kernel.access.pending.values()])

    @app.post(
        "/api/v1/approvals/{approval_id}/{verdict}",
        tags=["access"],
        summary="Allow or deny a waiting call (admin); verdict is allow or deny",
    )
    async def decide_approval(approval_id: str, verdict: str, identity: Caller) -> Response:
        server.require_admin(identity)
        if verdict not in ("allow", "deny"):
            raise NotFound("the verdict is 'allow' or 'deny'")
        pending = kernel.access.resolve(approval_id, verdict == "allow")
        return JSONResponse({**pending.to_json(), "verdict": verdict})

    def find_syscall(identity: Identity, syscall_id: str) -> tuple[Syscall, AgentProcess]:
        found = kernel.syscall(syscall_id)
        if found is None or not (identity.admin or found[1].owner == identity.name):
            raise NotFound(f"no syscall {syscall_id!r}")
        return found

    @app.get("/api/v1/syscalls/{syscall_id}", response_model=SyscallOut, tags=["syscalls"])
    async def get_syscall(syscall_id: str, identity: Caller) -> Response:
        syscall, process = find_syscall(identity, syscall_id)
        return JSONResponse(server.syscall_json(syscall, process))

    @app.post("/api/v1/syscalls/{syscall_id}/cancel", response_model=SyscallOut, tags=["syscalls"])
    async def cancel_syscall(syscall_id: str, identity: Caller) -> Response:
        syscall, process = find_syscall(identity, syscall_id)
        kernel.cancel(syscall)
        return JSONResponse(server.syscall_json(syscall, process))

    # -- processes ----------------------------------------------------------------------
    @app.get("/api/v1/processes", response_model=list[ProcessOut], tags=["processes"])
    async def list_processes(identity: Caller) -> Response:
        visible = [
            server.process_json(p)
            for p in kernel.processes.values()
            if identity.admin or p.owner == identity.name
        ]
        return JSONResponse(visible)

    @app.post("/api/v1/processes", response_model=ProcessOut, status_code=202, tags=["processes"])
    async def spawn(body: SpawnIn, identity: Caller) -> Response:
        agent = AGENTS.get(body.agent)
        if agent is None:
            raise NotFound(f"no agent program {body.agent!r}; available: {', '.join(AGENTS)}")
        process = kernel.spawn(agent, body.task, owner=identity.name)
        return JSONResponse(server.process_json(process), status_code=202)

    @app.get("/api/v1/processes/{process_id}", response_model=ProcessOut, tags=["processes"])
    async def get_process(
        process_id: str,
        identity: Caller,
        wait: Annotated[
            float, Query(ge=0, le=300, description="Seconds to wait for it to end")
        ] = 0,
    ) -> Response:
        process = server.owned(identity, kernel.processes.get(process_id))
        if wait and process.runner is not None and not process.runner.done():
            await asyncio.wait([process.runner], timeout=wait)
        return JSONResponse(server.process_json(process))

    @app.delete("/api/v1/processes/{process_id}", response_model=ProcessOut, tags=["processes"])
    async def kill_process(process_id: str, identity: Caller) -> Response:
        process = server.owned(identity, kernel.processes.get(process_id))
        kernel.kill(process)
        return JSONResponse(server.process_json(process))

    # -- identities and status ----------------------------------------------------------------
    @app.get("/api/v1/whoami", response_model=AgentOut, tags=["agents"])
    async def whoami(identity: Caller) -> Response:
        return JSONResponse(agent_json(identity))

    @app.get("/api/v1/agents", response_model=list[AgentOut], tags=["agents"])
    async def list_agents(identity: Caller) -> Response:
        server.require_admin(identity)
        return JSONResponse([agent_json(i) for i in identities.list()])

    @app.post("/api/v1/agents", response_model=AgentOut, status_code=201, tags=["agents"])
    async def create_agent(body: AgentIn, identity: Caller) -> Response:
        server.require_admin(identity)
        created, token = identities.create(body.name, tuple(body.groups))
        return JSONResponse(agent_json(created, token), status_code=201)

    @app.delete("/api/v1/agents/{name}", status_code=204, tags=["agents"])
    async def revoke_agent(name: str, identity: Caller) -> Response:
        server.require_admin(identity)
        if not identities.revoke(name):
            raise NotFound(f"no agent named {name!r}")
        return Response(status_code=204)

    @app.get("/api/v1/cores", response_model=list[CoreOut], tags=["status"])
    async def cores(identity: Caller) -> Response:
        return JSONResponse(
            [
                {
                    "name": name,
                    "kind": type(core).__name__,
                    "queued": core.queued,
                    "active": core.active,
                    "completed": core.stats.completed,
                    "failed": core.stats.failed,
                    "cancelled": core.stats.cancelled,
                }
                for name, core in kernel.cores.items()
            ]
        )

    @app.get("/healthz", tags=["status"], summary="Liveness (no token needed)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "cores": list(kernel.cores)}

    from aios.server.openai_api import install_openai_routes

    install_openai_routes(app, server)

    def reject(scope: Scope, message: str) -> Response:
        return error_response(scope["path"], 413, "payload_too_large", message)

    app.add_middleware(BodyLimit, limit=config.max_body_bytes, reject=reject)
    app.add_middleware(ContainErrors, respond=lambda scope, e: exception_response(scope["path"], e))
    return app


@dataclass
class Outcome:
    """What a non-streamed syscall came to: its request (once queued) and its completion."""

    syscall: LLMRequest | None = None
    completion: Completion | None = None


async def collect(
    events: AsyncGenerator[LLMRequest | str | Completion, None],
    request: Request,
    outcome: Outcome,
) -> Outcome:
    """Run a non-streamed syscall to its end, cancelling it if the client disconnects
    (ClientGone). Typed errors propagate; ``outcome.syscall`` tells the caller which call ended
    (None: nothing was queued)."""
    async with aclosing(events), cancel_on_disconnect(request.receive):
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
) -> AsyncGenerator[bytes, None]:
    """SSE frames of one syscall: ``syscall`` (its id), ``token``..., then ``result`` or
    ``error`` (both carry the envelope)."""
    syscall: LLMRequest | None = None
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
                    yield sse(body, "result")
        except AIOSError as e:
            if syscall is None:
                raise  # nothing sent yet: a plain HTTP error
            yield sse(server.envelope(syscall, identity.name, received, error=e), "error")


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


def agent_json(identity: Identity, token: str | None = None) -> dict[str, Any]:
    return {
        "name": identity.name,
        "groups": list(identity.groups),
        "admin": identity.admin,
        "token": token,
    }


def exception_response(path: str, error: Exception) -> Response:
    if isinstance(error, AIOSError):
        return error_response(
            path, http_status(error), error.code, str(error), retry=retry_after(error)
        )
    log.error("unexpected error on %s", path, exc_info=error)
    return error_response(path, 500, "internal_error", "internal error (logged by the server)")


def install_error_handlers(app: FastAPI, server: Server) -> None:
    @app.exception_handler(AIOSError)
    async def aios_error(request: Request, error: AIOSError) -> Response:
        return exception_response(request.url.path, error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
        code = codes.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        return error_response(request.url.path, error.status_code, code, message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> Response:
        problems = error.errors()
        if any(p.get("type") == "json_invalid" for p in problems):
            return error_response(
                request.url.path, 400, "invalid_json", "the request body is not valid JSON"
            )
        parts = [
            f"{'.'.join(str(x) for x in p.get('loc', ()) if x != 'body') or 'body'}: "
            f"{p.get('msg', 'invalid')}"
            for p in problems[:10]
        ]
        return error_response(request.url.path, 422, "invalid_request", "; ".join(parts))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        return exception_response(request.url.path, error)
