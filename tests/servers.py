"""The harness of the server tests (tests/test_server_*.py) and of the other tests that
start one: a kernel server (aios serve) over real sockets, on the fake engine
(tests/fakes.py). Fixtures on it (``make_server``, ``server``, ``shared``,
``shared_token``) are in tests/conftest.py.

Each server runs on its own thread and event loop (``BackgroundServer``); the tests talk to it
only over HTTP (httpx or the SDK). A call is held in flight by closing the fake engine's
``gate``; waits are bounded polls over HTTP, so a bug is a failure, never a hang.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from fakes import CORE_DEFAULTS, FakeEngine, FakeFactory

from aios.config import (
    AccessConfig,
    CoreConfig,
    DurableConfig,
    KernelConfig,
    ObservabilityConfig,
    StorageConfig,
)
from aios.quota import Quota
from aios.server.config import ServerConfig, Settings
from aios.server.main import BackgroundServer

REPLY = "hello world, this is fake"  # the fake emits one token per byte
USER = [{"role": "user", "content": "hi"}]
CHAT = "/api/v1/llm/chat"
OPENAI_CHAT = "/v1/chat/completions"


class Harness:
    """A running server on a fake engine, with helpers for tokens, clients and the gate."""

    def __init__(self, srv: BackgroundServer, factory: FakeFactory) -> None:
        self.srv = srv
        self.factory = factory
        self.url = srv.url
        self.admin = srv.admin_token
        self._clients: list[httpx.Client] = []
        self._readers: dict[str, httpx.Client] = {}
        self._gates: list[threading.Event] = []

    @property
    def engine(self) -> FakeEngine:
        return self.factory.engine

    def client(self, token: str | None = None) -> httpx.Client:
        """A new httpx client (closed when the server stops), with ``token`` as its bearer."""
        headers = {} if token is None else {"authorization": f"Bearer {token}"}
        client = httpx.Client(base_url=self.url, headers=headers, timeout=10.0)
        self._clients.append(client)
        return client

    def reader(self, token: str) -> httpx.Client:
        """One client per token for the helpers' reads (polls reuse its connection)."""
        if token not in self._readers:
            self._readers[token] = self.client(token)
        return self._readers[token]

    def agent(self, name: str) -> str:
        """Create an agent with the admin token; its token."""
        response = self.reader(self.admin).post("/api/v1/agents", json={"name": name})
        assert response.status_code == 201, response.text
        token: str = response.json()["token"]
        return token

    def hold(self, after: int = 0) -> threading.Event:
        """Make the engine's steps wait, from ``after`` steps from now on, until the returned
        gate is set (opened anyway when the server stops)."""
        gate = threading.Event()
        self.engine.hold_from = len(self.engine.plans) + after
        self.engine.gate = gate
        self._gates.append(gate)
        return gate

    def process(self, token: str, process_id: str) -> dict[str, Any] | None:
        listed = self.reader(token).get("/api/v1/processes")
        assert listed.status_code == 200, listed.text
        return next((p for p in listed.json() if p["id"] == process_id), None)

    def usage(self, process_id: str) -> dict[str, Any]:
        """A process as the admin sees it (it must exist)."""
        process = self.process(self.admin, process_id)
        assert process is not None, f"no process {process_id}"
        return process

    def core(self) -> dict[str, Any]:
        (core,) = self.reader(self.admin).get("/api/v1/cores").json()
        assert isinstance(core, dict)
        return core

    def close(self) -> None:
        for gate in self._gates:
            gate.set()
        for client in self._clients:
            client.close()


ServerFactory = Callable[..., Harness]


@contextlib.contextmanager
def serve(
    data_dir: Path,
    reply: str = REPLY,
    *,
    server: dict[str, Any] | None = None,
    quota: Quota | None = None,
    access: AccessConfig | None = None,
    observability: ObservabilityConfig | None = None,
    durable: DurableConfig | None = None,
    keep: bool = False,
    **core: Any,
) -> Iterator[Harness]:
    """A server on a fake engine replying ``reply``; ``server`` and ``core`` override the
    ServerConfig and the CoreConfig (CORE_DEFAULTS) fields, ``quota`` is each agent's,
    ``access`` the policy; ``keep``: memory, storage and audit in DATA_DIR/aios.db (else a
    private database that goes with the server)."""
    settings = Settings(
        ServerConfig(port=0, data_dir=str(data_dir), shutdown_grace=2.0, **(server or {})),
        KernelConfig(
            cores=(CoreConfig(name="fake", model="fake", **{**CORE_DEFAULTS, **core}),),
            syscall_timeout=30.0,
            quota=quota or Quota(),
            access=access or AccessConfig(),
            observability=observability or ObservabilityConfig(),
            durable=durable or DurableConfig(),
            storage=StorageConfig(database=str(data_dir / "aios.db") if keep else ""),
        ),
    )
    factory = FakeFactory(lambda prompt: reply)
    with BackgroundServer(settings, engine_factory=factory) as srv:
        harness = Harness(srv, factory)
        try:
            yield harness
        finally:
            harness.close()
    assert factory.engine.closed
    assert factory.engine.violations == []


def wait_for(check: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``check`` (HTTP reads) until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


def inflight_of(harness: Harness, token: str, process_id: str) -> list[str]:
    """The syscall ids ``process_id`` has in flight, once it has any."""

    def check() -> list[str]:
        process = harness.process(token, process_id)
        return [] if process is None else list(process["inflight"])

    ids: list[str] = wait_for(check, what=f"a syscall of {process_id} in flight")
    return ids


def sse_frames(lines: Iterator[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) of each SSE frame; data is JSON, or the literal ``[DONE]``."""
    event = "message"
    for line in lines:
        if line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")
            yield event, data if data == "[DONE]" else json.loads(data)
            event = "message"


def chat(**fields: Any) -> dict[str, Any]:
    return {"messages": USER, **fields}


def openai_chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fake", "messages": USER, **fields}


def check_openai_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["type"] == code and error["code"] == code
    assert isinstance(error["message"], str) and error["message"]


def check_envelope_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["error"]["type"] == code, body
    assert body["status"] in ("rejected", "failed", "cancelled")
    return body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def raw_post(
    harness: Harness,
    path: str,
    token: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> socket.socket:
    """Send a POST on a bare socket (so the test can drop the connection mid-call)."""
    host, port = harness.url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n{extra}"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(head.encode() + data)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], str]:
    """One HTTP/1.1 response with a Content-Length: status, headers, body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    while len(rest) < int(headers["content-length"]):
        rest += sock.recv(65536)
    return int(lines[0].split()[1]), headers, rest.decode()


EVERYTHING = ("llm.*", "memory.*", "storage.*", "tools.list", "tools.call:*")


@contextlib.contextmanager
def serve_approving(data_dir: Path, approval_timeout: float) -> Iterator[Harness]:
    """A server whose agents may do everything, and where a ``storage.delete`` waits for the
    admin's approval (denied after ``approval_timeout`` seconds)."""
    policy = AccessConfig(
        groups={"default": EVERYTHING},
        approve=("storage.delete:*",),
        approval_timeout=approval_timeout,
    )
    with serve(data_dir, access=policy) as harness:
        yield harness
