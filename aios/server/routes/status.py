"""The kernel's state: ``GET /api/v1/cores`` (queues and counters of each LLM core),
``GET /api/v1/audit`` (the newest audit records) and ``GET /healthz`` (liveness, no token
needed)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from aios import __version__
from aios.llm.base import Core
from aios.llm.core import CoreStats, LLMCore
from aios.server.schemas import CoreOut
from aios.server.session import Caller, Server


def core_json(name: str, core: Core) -> dict[str, Any]:
    """A core's queue and counters; an embedded core's KV cache and token counts too (what
    ``aios top`` shows)."""
    stats = core.stats
    out: dict[str, Any] = {
        "name": name,
        "kind": type(core).__name__,
        "queued": core.queued,
        "active": core.active,
        "completed": stats.completed,
        "failed": stats.failed,
        "cancelled": stats.cancelled,
        "preemptions": getattr(stats, "preemptions", 0),
    }
    if isinstance(core, LLMCore) and isinstance(stats, CoreStats):
        kv = core.kv_usage()
        out |= {
            "slots": core.config.slots,
            "cached": kv.cached,
            "parked": kv.parked,
            "preempted": kv.preempted,
            "kv_cells_used": kv.cells_used,
            "kv_cells": kv.cells_total,
            "prefill_tokens": stats.prefill_tokens,
            "reused_tokens": stats.reused_tokens,
            "decode_tokens": stats.decode_tokens,
        }
    return out


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    @api.get("/api/v1/cores", response_model=list[CoreOut], tags=["status"])
    async def cores(identity: Caller) -> Response:
        return JSONResponse([core_json(name, core) for name, core in kernel.cores.items()])

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
