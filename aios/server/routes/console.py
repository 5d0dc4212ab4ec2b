"""The web console: ``GET /`` and its files under ``/console/`` (static, shipped in the
package, no build step). It holds no data: everything it shows comes from the documented API
with the token the person logs in with (aios/server/console/console.js)."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import Response

from aios.errors import NotFound
from aios.server.session import Server

FILES = {"console.js": "text/javascript", "console.css": "text/css", "index.html": "text/html"}


def router(server: Server) -> APIRouter:
    api = APIRouter()
    folder = resources.files("aios.server") / "console"
    headers = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}

    def send(name: str) -> Response:
        media = FILES.get(name)
        if media is None:
            raise NotFound(f"no console file {name!r}")
        body = (folder / name).read_bytes()
        return Response(body, media_type=f"{media}; charset=utf-8", headers=headers)

    @api.get("/", include_in_schema=False)
    async def index() -> Response:
        return send("index.html")

    @api.get("/console/{name}", include_in_schema=False)
    async def console_file(name: str) -> Response:
        return send(name)

    return api
