"""Agent processes: list, spawn an agent program, get (optionally waiting for its end) and
kill. Each agent sees its own processes (its session ``@name`` among them); the admin all."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response

from aios.agents import AGENTS
from aios.errors import NotFound
from aios.server.schemas import ProcessOut, SpawnIn
from aios.server.session import Caller, Server


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    @api.get("/api/v1/processes", response_model=list[ProcessOut], tags=["processes"])
    async def list_processes(identity: Caller) -> Response:
        visible = [
            server.process_json(p)
            for p in kernel.processes.values()
            if identity.admin or p.owner == identity.name
        ]
        return JSONResponse(visible)

    @api.post("/api/v1/processes", response_model=ProcessOut, status_code=202, tags=["processes"])
    async def spawn(body: SpawnIn, identity: Caller) -> Response:
        agent = AGENTS.get(body.agent)
        if agent is None:
            raise NotFound(f"no agent program {body.agent!r}; available: {', '.join(AGENTS)}")
        groups = frozenset(identity.groups) | ({"admin"} if identity.admin else set())
        process = await kernel.spawn(agent, body.task, owner=identity.name, groups=groups)
        return JSONResponse(server.process_json(process), status_code=202)

    @api.get("/api/v1/processes/{process_id}", response_model=ProcessOut, tags=["processes"])
    async def get_process(
        process_id: str,
        identity: Caller,
        wait: Annotated[
            float, Query(ge=0, le=300, description="Seconds to wait for it to end")
        ] = 0,
    ) -> Response:
        process = server.owned(identity, await kernel.find(process_id))
        if wait and process.runner is not None and not process.runner.done():
            await asyncio.wait([process.runner], timeout=wait)
        return JSONResponse(server.process_json(process))

    @api.delete("/api/v1/processes/{process_id}", response_model=ProcessOut, tags=["processes"])
    async def kill_process(process_id: str, identity: Caller) -> Response:
        process = server.owned(identity, await kernel.find(process_id))
        kernel.kill(process)
        return JSONResponse(server.process_json(process))

    return api
