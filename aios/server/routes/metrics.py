"""``GET /metrics``: the kernel's Prometheus metrics (aios.metrics), for the admin token or
the scraper's own ``[observability] metrics_token`` (which may read nothing else)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from aios.metrics import CONTENT_TYPE
from aios.server.session import Server

Bearer = Annotated[
    HTTPAuthorizationCredentials | None,
    Depends(HTTPBearer(auto_error=False, description="The admin token or the metrics token.")),
]


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    token = kernel.config.observability.metrics_token.encode()
    api = APIRouter()

    @api.get(
        "/metrics",
        tags=["status"],
        summary="Prometheus metrics (admin or metrics token)",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE: {}}, "description": "The text format"}},
    )
    async def metrics(credentials: Bearer) -> Response:
        given = credentials.credentials.strip().encode() if credentials is not None else b""
        if not (token and credentials is not None and hmac.compare_digest(given, token)):
            server.require_admin(server.identify(credentials))
        return Response(kernel.metrics.render(), media_type=CONTENT_TYPE)

    return api
