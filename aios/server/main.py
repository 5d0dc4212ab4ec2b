"""Running the server: ``aios serve``, and a background server for tests and benchmarks.

The kernel starts before the HTTP socket opens (a model that fails to load is a clear error,
not a half-started server) and stops after it closes: on SIGINT/SIGTERM uvicorn stops
accepting connections and gives requests in flight ``shutdown_grace`` seconds to finish; then
the kernel ends whatever is left with a clear ``kernel_shutdown`` error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import socket
import threading
from collections.abc import Callable
from pathlib import Path

import uvicorn

from aios.errors import ConfigError
from aios.identity import TOKEN_PREFIX, Identities
from aios.kernel import EngineFactory, Kernel, llamacpp_engine
from aios.server.app import create_app
from aios.server.config import Settings
from aios.storage.db import Database
from aios.tools.registry import ToolRegistry

log = logging.getLogger("aios.server")
ADMIN_TOKEN_FILE = "admin.token"
DB_FILE = "aios.db"
KERNEL_ID_FILE = "kernel.id"


def open_identities(settings: Settings, env: dict[str, str] | None = None) -> Identities:
    """The identity table in the kernel's database (``[kernel.storage] database``; unset:
    ``DATA_DIR/aios.db``), with the admin token installed: from ``$AIOS_ADMIN_TOKEN``, else
    from ``DATA_DIR/admin.token`` (created, mode 0600, on first use). The token itself is
    never logged. A database with no identities yet (a kernel's first start on PostgreSQL)
    first gets the agents of ``DATA_DIR/aios.db``, where older versions kept them."""
    env = dict(os.environ) if env is None else env
    data = settings.server.data_path
    storage = settings.kernel.storage
    database = Database.open(
        storage.database or str(data / DB_FILE), synchronous=storage.sqlite_synchronous
    )
    identities = Identities(database, settings.kernel.access.exempt)
    try:
        old = data / DB_FILE
        elsewhere = database.path is None or database.path.resolve() != old.resolve()
        if elsewhere and (imported := identities.import_file(old)):
            log.warning(
                "imported %d agent identities from %s into %s",
                imported,
                old,
                database.redacted(),
            )
        token = env.get("AIOS_ADMIN_TOKEN") or read_admin_token(data)
        if token is None:
            token = TOKEN_PREFIX + secrets.token_urlsafe(32)
            path = data / ADMIN_TOKEN_FILE
            try:
                data.mkdir(parents=True, exist_ok=True)  # on PostgreSQL nothing else made it
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(token + "\n")
            except OSError as e:
                raise ConfigError(f"cannot create the admin token file {path}: {e}") from None
            log.warning("created the admin token in %s (mode 0600)", path)
        if identities.set_admin_token(token) and database.dialect == "postgres":
            log.warning(
                "replaced another admin token in %s: the kernels on one database share one "
                "admin identity, so give them all the same $AIOS_ADMIN_TOKEN (or admin.token)",
                database.redacted(),
            )
    except BaseException:
        identities.close()
        raise
    return identities


def kernel_id(settings: Settings) -> str:
    """This server's name in the process leases (aios.durable), kept in DATA_DIR/kernel.id:
    a server restarted on the same data directory takes its own processes back at once."""
    path = settings.server.data_path / KERNEL_ID_FILE
    try:
        known = path.read_text().strip()
    except FileNotFoundError:
        known = ""
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    if known:
        return known
    made = f"{socket.gethostname()[:40]}-{secrets.token_hex(6)}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(made + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e}") from None
    return made


def read_admin_token(data_dir: Path) -> str | None:
    try:
        return (data_dir / ADMIN_TOKEN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read the admin token: {e}") from None


class _Server(uvicorn.Server):
    """uvicorn's server, telling ``on_ready`` once its socket listens."""

    def __init__(self, config: uvicorn.Config, on_ready: Callable[[_Server], None]) -> None:
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._on_ready(self)


async def serve(
    settings: Settings,
    *,
    engine_factory: EngineFactory = llamacpp_engine,
    on_ready: Callable[[uvicorn.Server, Kernel], None] | None = None,
    tools: ToolRegistry | None = None,
) -> None:
    """Start the kernel, serve HTTP until told to stop (SIGINT/SIGTERM, or
    ``server.should_exit``), then stop the kernel. ``tools``: the kernel's tools (default:
    the built-in ones and the ``aios.tools`` entry points)."""
    identities = open_identities(settings)
    try:
        hidden = (str(settings.server.data_path),)  # tokens and identities: never in a sandbox
        config = settings.kernel
        if not config.durable.kernel_id:  # a restart on this data directory is this kernel
            durable = dataclasses.replace(config.durable, kernel_id=kernel_id(settings))
            config = dataclasses.replace(config, durable=durable)
        kernel = Kernel(config, engine_factory=engine_factory, hidden=hidden, tools=tools)
        async with kernel:
            app = create_app(kernel, identities, settings.server, own_kernel=False)
            http = uvicorn.Config(
                app,
                host=settings.server.host,
                port=settings.server.port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=int(settings.server.shutdown_grace) or None,
                lifespan="off",
            )
            server = _Server(http, lambda s: on_ready(s, kernel) if on_ready else None)
            await server.serve()
            if not server.started:
                host, port = settings.server.host, settings.server.port
                raise ConfigError(f"could not listen on {host}:{port} (see the log above)")
    finally:
        identities.close()


def bound_port(server: uvicorn.Server) -> int:
    return int(server.servers[0].sockets[0].getsockname()[1])


class BackgroundServer:
    """``aios serve`` on a thread with its own event loop (tests, benchmarks): blocking and
    async clients in the calling thread talk to it over real sockets."""

    def __init__(self, settings: Settings, *, engine_factory: EngineFactory = llamacpp_engine):
        self.settings = settings
        self._engine_factory = engine_factory
        self._ready = threading.Event()
        self._server: uvicorn.Server | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="aios-server", daemon=True)
        self.url = ""
        self.kernel: Kernel | None = None

    @property
    def admin_token(self) -> str:
        token = read_admin_token(self.settings.server.data_path)
        assert token is not None
        return token

    def start(self, timeout: float = 120.0) -> BackgroundServer:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the server did not start in time")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _main(self) -> None:
        def ready(server: uvicorn.Server, kernel: Kernel) -> None:
            self._server = server
            self.kernel = kernel
            self.url = f"http://{self.settings.server.host}:{bound_port(server)}"
            self._ready.set()

        try:
            asyncio.run(
                serve(
                    self.settings,
                    engine_factory=self._engine_factory,
                    on_ready=ready,
                )
            )
        except BaseException as e:
            self._error = e
        finally:
            self._ready.set()
