"""One syscall by id, of any kind: ``GET /api/v1/syscalls/{id}`` (its envelope) and
``POST /api/v1/syscalls/{id}/cancel``. Another agent's syscall answers 404, like an unknown
id."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from aios.errors import NotFound
from aios.identity import Identity
from aios.process import AgentProcess
from aios.server.schemas import SyscallOut
from aios.server.session import Caller, Server
from aios.syscall import Syscall


def router(server: Server) -> APIRouter:
    kernel = server.kernel
    api = APIRouter()

    def find_syscall(identity: Identity, syscall_id: str) -> tuple[Syscall, AgentProcess]:
        found = kernel.syscall(syscall_id)
        if found is None or not (identity.admin or found[1].owner == identity.name):
            raise NotFound(f"no syscall {syscall_id!r}")
        return found

    @api.get("/api/v1/syscalls/{syscall_id}", response_model=SyscallOut, tags=["syscalls"])
    async def get_syscall(syscall_id: str, identity: Caller) -> Response:
        syscall, process = find_syscall(identity, syscall_id)
        return JSONResponse(server.syscall_json(syscall, process))

    @api.post("/api/v1/syscalls/{syscall_id}/cancel", response_model=SyscallOut, tags=["syscalls"])
    async def cancel_syscall(syscall_id: str, identity: Caller) -> Response:
        syscall, process = find_syscall(identity, syscall_id)
        kernel.cancel(syscall)
        return JSONResponse(server.syscall_json(syscall, process))

    return api
