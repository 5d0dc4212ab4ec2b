"""What every route needs, apart from the app: the :class:`Server` (the kernel, the
identities, the limits, the streams each identity holds open, the syscall envelope) and the
``Caller`` dependency, the identity of a request's bearer token.

Identity comes only from the bearer token (:mod:`aios.identity`); nothing in a body can claim
to be another agent. Each identity's syscalls run under one kernel process (``@name``), so its
quota, fair share and KV reuse follow the credential.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aios.errors import (
    AIOSError,
    InvalidRequest,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
)
from aios.identity import Identities, Identity
from aios.kernel import Kernel
from aios.process import AgentProcess
from aios.server.config import ServerConfig
from aios.server.idempotency import Idempotency
from aios.server.schemas import SyscallOut
from aios.syscall import Completion, LLMCall, Syscall
from aios.tracing import trace_id


class Server:
    """What every route needs: the kernel, the identities, the limits, and the streams each
    identity holds open."""

    def __init__(self, kernel: Kernel, identities: Identities, config: ServerConfig) -> None:
        self.kernel = kernel
        self.identities = identities
        self.config = config
        self.streams: Counter[str] = Counter()
        self.idempotency = Idempotency(kernel)  # Idempotency-Key on syscall routes

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
            "trace_id": trace_id(syscall),
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


def envelope_responses() -> dict[int | str, dict[str, Any]]:
    """The error statuses a syscall route documents, each answered with the envelope."""
    return {
        code: {"model": SyscallOut, "description": text}
        for code, text in (
            (400, "Invalid request"),
            (401, "Missing or invalid token"),
            (429, "Over a limit or quota (see Retry-After)"),
            (504, "Deadline exceeded"),
        )
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


def usage_json(completion: Completion) -> dict[str, int]:
    usage = completion.usage
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def completion_json(completion: Completion) -> dict[str, Any]:
    return {
        "context": completion.context,
        "text": completion.text,
        "finish_reason": completion.finish_reason,
        "usage": usage_json(completion),
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
