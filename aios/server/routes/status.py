"""The kernel's state: ``GET /api/v1/cores`` (queues and counters of each LLM core) and
``GET /healthz`` (liveness, no token needed)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from aios import __version__
from aios.server.schemas import CoreOut
from aios.server.session import Caller, Server


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    @api.get("/api/v1/cores", response_model=list[CoreOut], tags=["status"])
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

    @api.get("/healthz", tags=["status"], summary="Liveness (no token needed)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "cores": list(kernel.cores)}

    return api
