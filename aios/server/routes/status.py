"""The kernel's state: ``GET /api/v1/cores`` (queues and counters of each LLM core),
``GET /api/v1/audit`` (the newest audit records) and ``GET /healthz`` (liveness, no token
needed)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from aios import __version__
from aios.metrics import core_state
from aios.server.schemas import CoreOut
from aios.server.session import Caller, Server


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    @api.get("/api/v1/cores", response_model=list[CoreOut], tags=["status"])
    async def cores(identity: Caller) -> Response:
        return JSONResponse([core_state(name, core) for name, core in kernel.cores.items()])

    @api.get("/api/v1/audit", tags=["status"], summary="The newest audit records")
    async def audit(identity: Caller, limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> Response:
        """The newest audit records (oldest first): every syscall's decision and outcome.
        The admin sees everyone's; an agent's token its own identity's."""
        who = None if identity.admin else identity.name
        return JSONResponse(await kernel.audit_tail(limit, who))

    @api.get("/healthz", tags=["status"], summary="Liveness (no token needed)")
    async def healthz() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "cores": list(kernel.cores)}

    return api
