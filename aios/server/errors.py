"""Every error as HTTP, in one place: the status of each kernel error, ``Retry-After``, the
body a client of the path expects (OpenAI's error object under ``/v1``, the syscall envelope
elsewhere), and the app's exception handlers. No traceback ever reaches a client."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.types import Scope

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


def openai_error(code: str, message: str) -> dict[str, Any]:
    """OpenAI's error object: a ``/v1`` error body, or the last frame of a failed stream."""
    return {"error": {"message": message, "type": code, "param": None, "code": code}}


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
        body = openai_error(code, message)
    else:
        body = envelope or {"id": None, "kind": "request", "agent": None, "status": "rejected"}
        body["error"] = {"type": code, "message": message}
    return JSONResponse(body, status_code=status, headers=headers)


def exception_response(
    path: str, error: Exception, *, envelope: dict[str, Any] | None = None
) -> Response:
    """A kernel error as its status (in ``envelope``, the syscall it ended, if given); any
    other exception as a 500 that is logged here and says nothing of its cause."""
    if isinstance(error, AIOSError):
        return error_response(
            path,
            http_status(error),
            error.code,
            str(error),
            retry=retry_after(error),
            envelope=envelope,
        )
    log.error("unexpected error on %s", path, exc_info=error)
    return error_response(path, 500, "internal_error", "internal error (logged by the server)")


def too_large(scope: Scope, message: str) -> Response:
    """The 413 of a body over the server's limit (for :class:`aios.server.http.BodyLimit`)."""
    return error_response(scope["path"], 413, "payload_too_large", message)


def contained(scope: Scope, error: Exception) -> Response:
    """The response to an exception that escaped the app (for ``ContainErrors``)."""
    return exception_response(scope["path"], error)


def install_error_handlers(app: FastAPI) -> None:
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
