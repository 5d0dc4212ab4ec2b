"""The kernel's HTTP face: the versioned syscall API (``/api/v1``), the OpenAI-compatible API
(``/v1``) and management routes, one router per concern (:mod:`aios.server.routes`), around
one :class:`aios.server.session.Server`.

Identity comes only from the bearer token (:mod:`aios.identity`); nothing in a body can claim
to be another agent. Every error is JSON (:mod:`aios.server.errors`): the syscall envelope
under ``/api/v1``, OpenAI's error object under ``/v1``; never a traceback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from aios import __version__
from aios.identity import Identities
from aios.kernel import Kernel
from aios.server.config import ServerConfig
from aios.server.errors import contained, install_error_handlers, too_large
from aios.server.http import BodyLimit, ContainErrors, TraceContext
from aios.server.routes import (
    agents,
    approvals,
    console,
    events,
    llm,
    metrics,
    openai,
    processes,
    resources,
    status,
    syscalls,
)
from aios.server.session import Server


def create_app(
    kernel: Kernel, identities: Identities, config: ServerConfig, *, own_kernel: bool = True
) -> FastAPI:
    """The ASGI app. With ``own_kernel`` its lifespan starts and stops the kernel."""
    server = Server(kernel, identities, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not own_kernel:
            yield
            return
        async with kernel:
            yield

    app = FastAPI(
        title="aios",
        version=__version__,
        summary="The aios kernel: LLM syscalls for agents, scheduled and metered per agent.",
        lifespan=lifespan,
    )
    app.state.server = server  # what the Caller dependency authenticates with
    install_error_handlers(app)
    for router in (
        llm.router,
        resources.router,
        approvals.router,
        events.router,
        syscalls.router,
        processes.router,
        agents.router,
        status.router,
        metrics.router,
        openai.router,
        console.router,
    ):  # in this order: the OpenAPI document lists the routes so
        app.include_router(router(server))
    app.add_middleware(BodyLimit, limit=config.max_body_bytes, reject=too_large)
    if kernel.tracing is not None:  # (no cost when the kernel does not trace)
        app.add_middleware(TraceContext)
    app.add_middleware(ContainErrors, respond=contained)
    return app
