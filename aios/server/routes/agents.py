"""Identities: ``GET /api/v1/whoami`` for any token; listing, creating (which returns the new
token, once) and revoking agents with the admin token."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from aios.errors import NotFound
from aios.identity import Identity
from aios.server.schemas import AgentIn, AgentOut
from aios.server.session import Caller, Server


def router(server: Server) -> APIRouter:
    identities = server.identities
    api = APIRouter()

    @api.get("/api/v1/whoami", response_model=AgentOut, tags=["agents"])
    async def whoami(identity: Caller) -> Response:
        return JSONResponse(agent_json(identity))

    @api.get("/api/v1/agents", response_model=list[AgentOut], tags=["agents"])
    async def list_agents(identity: Caller) -> Response:
        server.require_admin(identity)
        return JSONResponse([agent_json(i) for i in identities.list()])

    @api.post("/api/v1/agents", response_model=AgentOut, status_code=201, tags=["agents"])
    async def create_agent(body: AgentIn, identity: Caller) -> Response:
        server.require_admin(identity)
        created, token = identities.create(body.name, tuple(body.groups))
        return JSONResponse(agent_json(created, token), status_code=201)

    @api.delete("/api/v1/agents/{name}", status_code=204, tags=["agents"])
    async def revoke_agent(name: str, identity: Caller) -> Response:
        server.require_admin(identity)
        if not identities.revoke(name):
            raise NotFound(f"no agent named {name!r}")
        return Response(status_code=204)

    return api


def agent_json(identity: Identity, token: str | None = None) -> dict[str, Any]:
    return {
        "name": identity.name,
        "groups": list(identity.groups),
        "admin": identity.admin,
        "token": token,
    }
