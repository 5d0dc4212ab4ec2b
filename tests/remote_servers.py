"""OpenAI-compatible servers for the remote-core tests: real local ones, network helpers and an
in-process fake.

:func:`start_server` runs llama-cpp-python's own server (``python -m llama_cpp.server``) on
SmolLM2-135M in a subprocess on a free port; :func:`wait_ready` waits (bounded) until it
answers. It serves one request at a time; ``--interrupt_requests False`` stops it from cutting a
running stream short whenever another request arrives (its default).

:class:`CountingProxy` is a TCP proxy that counts the HTTP requests in flight through it (from
the request line to the ``[DONE]`` of its event stream, or the connection's end), so a test can
check what the server side saw. :class:`SilentServer` accepts connections and never answers.

:class:`FakeServer` is an in-process fake server for ``httpx.MockTransport``: it records the
requests and answers with a test's handler (``reply``, ``gated`` streams); :func:`remote_core`
runs a :class:`RemoteCore` on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from aios.config import RemoteCoreConfig
from aios.llm.models import resolve_model
from aios.llm.openai_compat import RemoteCore
from aios.scheduler import FIFO, Policy

MODEL_ID = "smollm2"  # the id the servers answer to
READY_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def kill(self) -> None:
        """SIGKILL: no goodbye, open connections just break."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


def start_server(log_dir: Path, *, api_key: str | None = None) -> Server:
    port = free_port()
    log = log_dir / f"llama-server-{port}.log"
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(resolve_model("smollm2-135m")),
        "--model_alias",
        MODEL_ID,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "2048",
        "--n_threads",
        "1",
        "--n_threads_batch",
        "1",
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]
    if api_key is not None:
        command += ["--api_key", api_key]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(port, process, log, api_key)


def wait_ready(server: Server, timeout: float = READY_TIMEOUT) -> None:
    """Poll ``GET /v1/models`` until the server answers; fail with its log if it exits or
    does not come up in time."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {server.api_key}"} if server.api_key else {}
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"server on port {server.port} exited:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.base_url}/models", headers=headers, timeout=2).is_success:
                return
        if time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"server on port {server.port} not ready:\n{server.log_tail()}")
        time.sleep(0.2)


class CountingProxy:
    """Forwards 127.0.0.1:port to the target port and counts HTTP requests in flight."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self._server: asyncio.Server | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        active = False

        def begin() -> None:
            nonlocal active
            if not active:
                active = True
                self.requests += 1
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def end() -> None:
            nonlocal active
            if active:
                active = False
                self.in_flight -= 1

        async def upstream() -> None:
            while data := await reader.read(65536):
                if data.startswith((b"POST ", b"GET ")):
                    begin()
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            tail = b""
            while data := await up_reader.read(65536):
                if b"[DONE]" in tail + data:
                    end()
                tail = data[-8:]
                writer.write(data)
                await writer.drain()

        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        tasks = [asyncio.create_task(upstream()), asyncio.create_task(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            end()
            for w in (writer, up_writer):
                w.close()


class SilentServer:
    """Accepts connections, reads whatever comes, never answers (a hung server)."""

    def __init__(self) -> None:
        self.port = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> SilentServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:  # Python 3.11 leaves accepted connections open
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(Exception):
            while await reader.read(65536):
                pass
        writer.close()


# -- an in-process fake OpenAI-compatible server ----------------------------------------------

Handler = Callable[[dict[str, Any]], Awaitable[httpx.Response]]
SSE = {"content-type": "text/event-stream"}


def chunk(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "object": "chat.completion.chunk",
        "choices": [{"delta": delta, "finish_reason": finish}],
    }


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events
    )


def streamed(*pieces: str, finish: str = "stop", usage: tuple[int, int] | None = None) -> bytes:
    events: list[dict[str, Any] | str] = [chunk(p) for p in pieces]
    events.append(chunk(finish=finish))
    if usage is not None:
        events.append(
            {"choices": [], "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}}
        )
    events.append("[DONE]")
    return sse(*events)


def reply(*pieces: str, **kw: Any) -> httpx.Response:
    return httpx.Response(200, headers=SSE, content=streamed(*pieces, **kw))


class FakeServer:
    """Records every request (path, headers, JSON body), answers with ``handler`` and counts
    requests in flight: from arrival until the response stream ends or is closed."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []
        self.bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        body = json.loads(request.content)
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            response = await self.handler(body)
        except BaseException:
            self.in_flight -= 1
            raise
        stream = response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Tracked(self, stream)
        )


class _Tracked(httpx.AsyncByteStream):
    """A response body that counts as in flight until the client closes it (read to the end,
    cancelled, or abandoned after a stop string)."""

    def __init__(self, server: FakeServer, stream: httpx.AsyncByteStream) -> None:
        self.server = server
        self.stream = stream
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self.stream:
            yield part

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.in_flight -= 1
            await self.stream.aclose()


def gated(pieces: Sequence[str], gate: asyncio.Event, *, after: int) -> httpx.Response:
    """A streamed answer that sends ``after`` pieces, waits for ``gate``, then the rest."""

    async def stream() -> AsyncIterator[bytes]:
        for i, piece in enumerate(pieces):
            if i == after:
                await gate.wait()
            yield sse(chunk(piece))
        yield sse(chunk(finish="stop"), "[DONE]")

    return httpx.Response(200, headers=SSE, content=stream())


async def record_sleep(delays: list[float], d: float) -> None:
    delays.append(d)


@contextlib.asynccontextmanager
async def remote_core(
    handler: Handler,
    *,
    name: str = "r",
    policy: Policy | None = None,
    limit: float = 5.0,
    **overrides: Any,
) -> AsyncIterator[tuple[RemoteCore, FakeServer, list[float]]]:
    """A started RemoteCore on a fake server, its loop running, for at most ``limit`` s.
    Backoff sleeps are recorded, not slept; jitter is fixed at 0.5."""
    server = FakeServer(handler)
    delays: list[float] = []
    settings: dict[str, Any] = {"backoff": 0.1, "max_backoff": 1.0, "retries": 2, **overrides}
    config = RemoteCoreConfig(name=name, base_url="http://fake:8000/v1", model="m", **settings)
    core = RemoteCore(
        config,
        policy or FIFO(),
        transport=httpx.MockTransport(server),
        sleep=lambda d: record_sleep(delays, d),
        jitter=lambda: 0.5,
    )
    async with asyncio.timeout(limit):
        await core.start()
        loop = asyncio.create_task(core.run())
        try:
            yield core, server, delays
        finally:
            loop.cancel()
            await core.close()
            with contextlib.suppress(asyncio.CancelledError):
                await loop
