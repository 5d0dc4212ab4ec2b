"""Calls waiting for an approval (``access`` policy ``ask``), listed and decided by the admin:
``GET /api/v1/approvals``, ``POST /api/v1/approvals/{id}/{allow|deny}``."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from aios.errors import NotFound
from aios.server.session import Caller, Server


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    @api.get("/api/v1/approvals", tags=["access"], summary="Calls waiting for approval (admin)")
    async def list_approvals(identity: Caller) -> Response:
        server.require_admin(identity)
        return JSONResponse([p.to_json() for p in kernel.access.pending.values()])

    @api.post(
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

    return api
