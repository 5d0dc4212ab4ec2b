"""The kernel server (aios serve) over real sockets, on the fake engine (tests/fakes.py).

Each server runs on its own thread and event loop (``BackgroundServer``); the tests talk to it
only over HTTP (httpx or the SDK). A call is held in flight by closing the fake engine's
``gate``; waits are bounded polls over HTTP, so a bug is a failure, never a hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import CORE_DEFAULTS, FakeEngine, FakeFactory

from aios.config import AccessConfig, CoreConfig, KernelConfig, StorageConfig
from aios.errors import (
    ConfigError,
    InvalidRequest,
    QuotaExceeded,
    SyscallCancelled,
    Unauthenticated,
    Unreachable,
)
from aios.identity import Identities, Identity, digest
from aios.quota import Quota
from aios.sdk import Agent
from aios.sdk.http import AsyncClient, Client
from aios.server.config import ServerConfig, Settings, load_settings
from aios.server.main import ADMIN_TOKEN_FILE, BackgroundServer, open_identities
from aios.syscall import Completion, LLMCall, Message, SamplingParams

REPLY = "hello world, this is fake"  # the fake emits one token per byte
USER = [{"role": "user", "content": "hi"}]
CHAT = "/api/v1/llm/chat"
OPENAI_CHAT = "/v1/chat/completions"


# -- harness ---------------------------------------------------------------------------------


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


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start a server with non-default settings: ``make_server(server={...}, **core)``."""
    with contextlib.ExitStack() as stack:
        count = iter(range(100))

        def start(reply: str = REPLY, **kw: Any) -> Harness:
            return stack.enter_context(serve(tmp_path / f"data{next(count)}", reply, **kw))

        yield start


@pytest.fixture
def server(make_server: ServerFactory) -> Harness:
    return make_server()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """One server for the tests that change nothing but their own agents."""
    with serve(tmp_path_factory.mktemp("shared")) as harness:
        yield harness


@pytest.fixture(scope="module")
def shared_token(shared: Harness) -> str:
    return shared.agent("prober")


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


# -- 1. authentication -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", CHAT, chat()),
        ("POST", CHAT, {"messages": "not even valid"}),  # 401 before any validation
        ("GET", "/api/v1/processes", None),
        ("GET", "/api/v1/whoami", None),
        ("GET", "/api/v1/agents", None),
        ("GET", "/api/v1/syscalls/sc-1", None),
    ],
)
@pytest.mark.parametrize(
    "auth", [None, "Bearer", "Bearer aios_madeup0000000000000000000", "Basic eDp5", "aios_x"]
)
def test_api_without_a_valid_token_is_401(
    shared: Harness, method: str, path: str, body: Any, auth: str | None
) -> None:
    headers = {} if auth is None else {"authorization": auth}
    response = shared.client().request(method, path, json=body, headers=headers)
    check_envelope_error(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["agent"] is None


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("GET", "/v1/models", None), ("POST", OPENAI_CHAT, openai_chat())],
)
@pytest.mark.parametrize("token", [None, "aios_madeup0000000000000000000"])
def test_openai_routes_without_a_valid_token_are_401_in_openai_shape(
    shared: Harness, method: str, path: str, body: Any, token: str | None
) -> None:
    response = shared.client(token).request(method, path, json=body)
    check_openai_error(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"] == "Bearer"
    assert "status" not in response.json()  # not the syscall envelope


def test_agent_token_on_admin_routes_is_403(shared: Harness, shared_token: str) -> None:
    agent = shared.client(shared_token)
    check_envelope_error(agent.get("/api/v1/agents"), 403, "permission_denied")
    check_envelope_error(
        agent.post("/api/v1/agents", json={"name": "sneaky"}), 403, "permission_denied"
    )
    check_envelope_error(agent.delete("/api/v1/agents/prober"), 403, "permission_denied")
    # nothing was created, and the agent still works
    names = [a["name"] for a in shared.client(shared.admin).get("/api/v1/agents").json()]
    assert "sneaky" not in names and "prober" in names
    assert agent.get("/api/v1/whoami").json() == {
        "name": "prober",
        "groups": [],
        "admin": False,
        "token": None,
    }


def test_revoked_token_is_401(server: Harness) -> None:
    token = server.agent("carol")
    carol = server.client(token)
    assert carol.post(CHAT, json=chat()).status_code == 200
    admin = server.client(server.admin)
    assert admin.delete("/api/v1/agents/carol").status_code == 204
    check_envelope_error(carol.post(CHAT, json=chat()), 401, "unauthenticated")
    check_envelope_error(carol.get("/api/v1/whoami"), 401, "unauthenticated")
    check_openai_error(carol.post(OPENAI_CHAT, json=openai_chat()), 401, "unauthenticated")
    check_envelope_error(admin.delete("/api/v1/agents/carol"), 404, "not_found")
    check_envelope_error(admin.delete("/api/v1/agents/admin"), 400, "invalid_request")
    # a new token for the same name works; the old one stays dead
    fresh = server.agent("carol")
    assert server.client(fresh).get("/api/v1/whoami").json()["name"] == "carol"
    check_envelope_error(carol.get("/api/v1/whoami"), 401, "unauthenticated")


def test_admin_manages_agents(server: Harness) -> None:
    admin = server.client(server.admin)
    created = admin.post("/api/v1/agents", json={"name": "dave", "groups": ["ops"]})
    assert created.status_code == 201
    assert created.json()["token"].startswith("aios_")
    listed = {a["name"]: a for a in admin.get("/api/v1/agents").json()}
    assert listed["dave"] == {"name": "dave", "groups": ["ops"], "admin": False, "token": None}
    assert listed["admin"]["admin"] is True
    check_envelope_error(
        admin.post("/api/v1/agents", json={"name": "dave"}), 400, "invalid_request"
    )
    for bad in ("Dave", "admin", "a b", ""):
        response = admin.post("/api/v1/agents", json={"name": bad})
        assert response.status_code == 400, (bad, response.text)


# -- 2. isolation ------------------------------------------------------------------------------


def test_agents_cannot_see_or_touch_each_other(server: Harness) -> None:
    alice, bob = server.client(server.agent("alice")), server.client(server.agent("bob"))
    admin = server.client(server.admin)
    done = alice.post(CHAT, json=chat())
    assert done.status_code == 200
    syscall_id = done.json()["id"]
    assert bob.post(CHAT, json=chat()).status_code == 200
    spawned = alice.post("/api/v1/processes", json={"agent": "planner", "task": "x"}).json()
    assert alice.get(f"/api/v1/processes/{spawned['id']}", params={"wait": 10}).json()["state"] == (
        "done"
    )

    # alice and the admin see alice's syscall; bob gets what an unknown id gets
    assert alice.get(f"/api/v1/syscalls/{syscall_id}").json()["result"]["text"] == REPLY
    assert admin.get(f"/api/v1/syscalls/{syscall_id}").json()["agent"] == "alice"
    unknown = bob.get("/api/v1/syscalls/sc-999999")
    check_envelope_error(unknown, 404, "not_found")
    check_envelope_error(bob.get(f"/api/v1/syscalls/{syscall_id}"), 404, "not_found")
    check_envelope_error(bob.post(f"/api/v1/syscalls/{syscall_id}/cancel"), 404, "not_found")

    # processes: each agent sees its own; the admin sees all
    def ids(client: httpx.Client) -> set[str]:
        return {p["id"] for p in client.get("/api/v1/processes").json()}

    assert ids(alice) == {"@alice", spawned["id"]}
    assert ids(bob) == {"@bob"}
    assert ids(admin) >= {"@alice", "@bob", spawned["id"]}
    for process_id in ("@alice", spawned["id"]):
        check_envelope_error(bob.get(f"/api/v1/processes/{process_id}"), 404, "not_found")
        check_envelope_error(bob.delete(f"/api/v1/processes/{process_id}"), 404, "not_found")
        assert alice.get(f"/api/v1/processes/{process_id}").status_code == 200
    assert alice.get("/api/v1/processes/@alice").json()["syscalls"] == 1
    assert admin.get("/api/v1/processes/@bob").json()["owner"] == "bob"


def test_agent_cannot_cancel_another_agents_call_in_flight(server: Harness) -> None:
    alice_token, bob_token = server.agent("alice"), server.agent("bob")
    bob = server.client(bob_token)
    gate = server.hold()
    with server.client(alice_token).stream("POST", CHAT, json=chat(stream=True)) as response:
        frames = sse_frames(response.iter_lines())
        event, data = next(frames)
        assert event == "syscall"
        check_envelope_error(bob.post(f"/api/v1/syscalls/{data['id']}/cancel"), 404, "not_found")
        check_envelope_error(bob.delete("/api/v1/processes/@alice"), 404, "not_found")
        gate.set()
        rest = list(frames)
    assert rest[-1][0] == "result"
    assert rest[-1][1]["status"] == "done"
    assert server.core()["cancelled"] == 0


# -- 3. identity comes from the token only -------------------------------------------------------


def test_payload_cannot_claim_another_identity(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    server.agent("bob")
    admin = server.client(server.admin)

    # the syscall API is strict: fields naming someone else are rejected, nothing is queued
    for extra in ({"agent": "bob"}, {"user": "bob"}, {"owner": "bob"}, {"process": "@bob"}):
        response = alice.post(CHAT, json=chat(**extra))
        check_envelope_error(response, 422, "invalid_request")
    assert server.process(server.admin, "@alice") is None
    assert server.process(server.admin, "@bob") is None

    own = alice.post(CHAT, json=chat(), params={"agent": "bob"})
    assert own.status_code == 200 and own.json()["agent"] == "alice"
    # the OpenAI API ignores `user` (and other unknown fields): still alice's call
    response = alice.post(OPENAI_CHAT, json=openai_chat(user="bob", agent="bob"))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == REPLY

    alice_process = admin.get("/api/v1/processes/@alice").json()
    assert alice_process["owner"] == "alice"
    assert alice_process["syscalls"] == 2
    assert alice_process["completion_tokens"] == 2 * len(REPLY)
    check_envelope_error(admin.get("/api/v1/processes/@bob"), 404, "not_found")
    assert all(p["owner"] != "bob" for p in admin.get("/api/v1/processes").json())


# -- 4. malformed input ---------------------------------------------------------------------------

JSON = {"content-type": "application/json"}

BAD_OWN: list[tuple[str, dict[str, Any]]] = [
    ("invalid json", {"content": b'{"messages": [', "headers": JSON}),
    ("not utf-8", {"content": b"\xff\xfe\xfa", "headers": JSON}),
    (
        "NaN temperature",
        {
            "content": b'{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
            "headers": JSON,
        },
    ),
    ("text/plain body", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
    ("empty body", {"content": b"", "headers": JSON}),
    ("json array", {"json": [USER]}),
    ("json string", {"json": "hi"}),
    ("json null", {"json": None}),
    ("no messages", {"json": {}}),
    ("messages as string", {"json": {"messages": "hi"}}),
    ("messages of strings", {"json": {"messages": ["hi"]}}),
    ("empty messages", {"json": {"messages": []}}),
    ("role wizard", {"json": {"messages": [{"role": "wizard", "content": "hi"}]}}),
    ("content int", {"json": {"messages": [{"role": "user", "content": 5}]}}),
    ("content missing", {"json": {"messages": [{"role": "user"}]}}),
    ("max_tokens ten", {"json": chat(max_tokens="ten")}),
    ("max_tokens str digits", {"json": chat(max_tokens="10")}),
    ("max_tokens 0", {"json": chat(max_tokens=0)}),
    ("max_tokens float", {"json": chat(max_tokens=1.5)}),
    ("max_tokens huge", {"json": chat(max_tokens=10**30)}),
    ("temperature -1", {"json": chat(temperature=-1)}),
    ("temperature string", {"json": chat(temperature="hot")}),
    ("top_p 0", {"json": chat(top_p=0)}),
    ("seed -1", {"json": chat(seed=-1)}),
    ("seed 2**32", {"json": chat(seed=2**32)}),
    ("stop 100 strings", {"json": chat(stop=["x"] * 100)}),
    ("stop empty string", {"json": chat(stop=[""])}),
    ("stop int", {"json": chat(stop=5)}),
    ("json_schema list", {"json": chat(json_schema=[1, 2])}),
    ("json_schema string", {"json": chat(json_schema="object")}),
    ("json_schema bogus", {"json": chat(json_schema={"type": "bogus"})}),
    ("json not bool", {"json": chat(json="yes")}),
    ("timeout 0", {"json": chat(timeout=0)}),
    ("timeout -1", {"json": chat(timeout=-1)}),
    ("priority huge", {"json": chat(priority=10**6)}),
    ("stream string", {"json": chat(stream="yes")}),
    ("unknown field", {"json": chat(frobnicate=True)}),
    ("model unknown", {"json": chat(model="nope")}),
    ("prompt too long", {"json": chat(messages=[{"role": "user", "content": "x" * 300}])}),
]

BAD_OPENAI: list[tuple[str, dict[str, Any]]] = [
    ("invalid json", {"content": b'{"model": "fake", "messages": [', "headers": JSON}),
    ("not utf-8", {"content": b"\xff\xfe\xfa", "headers": JSON}),
    ("json array", {"json": [openai_chat()]}),
    ("no model", {"json": {"messages": USER}}),
    ("no messages", {"json": {"model": "fake"}}),
    ("messages as string", {"json": openai_chat(messages="hi")}),
    ("empty messages", {"json": openai_chat(messages=[])}),
    ("role wizard", {"json": openai_chat(messages=[{"role": "wizard", "content": "hi"}])}),
    (
        "image content part",
        {
            "json": openai_chat(
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]
            )
        },
    ),
    ("max_tokens ten", {"json": openai_chat(max_tokens="ten")}),
    ("max_tokens 0", {"json": openai_chat(max_tokens=0)}),
    ("max_tokens huge", {"json": openai_chat(max_tokens=10**9)}),
    ("temperature -1", {"json": openai_chat(temperature=-1)}),
    ("seed -1", {"json": openai_chat(seed=-1)}),
    ("stop 100 strings", {"json": openai_chat(stop=["x"] * 100)}),
    ("n 2", {"json": openai_chat(n=2)}),
    ("logprobs", {"json": openai_chat(logprobs=True)}),
    ("response_format bogus", {"json": openai_chat(response_format={"type": "xml"})}),
    (
        "json_schema missing",
        {"json": openai_chat(response_format={"type": "json_schema"})},
    ),
    (
        "json_schema not an object",
        {
            "json": openai_chat(
                response_format={"type": "json_schema", "json_schema": {"schema": "x"}}
            )
        },
    ),
    (
        "json_schema bogus",
        {
            "json": openai_chat(
                response_format={"type": "json_schema", "json_schema": {"schema": {"type": 3}}}
            )
        },
    ),
    (
        "tool with a bad name",
        {"json": openai_chat(tools=[{"type": "function", "function": {"name": "bad name!"}}])},
    ),
    (
        "tool of another type",
        {"json": openai_chat(tools=[{"type": "retrieval", "function": {"name": "f"}}])},
    ),
    (
        "tool_choice bogus",
        {
            "json": openai_chat(
                tools=[{"type": "function", "function": {"name": "f"}}], tool_choice="always"
            )
        },
    ),
    (
        "tool_choice names a missing tool",
        {
            "json": openai_chat(
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            )
        },
    ),
    (
        "tool call arguments not JSON",
        {
            "json": openai_chat(
                messages=[
                    *USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "c1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{"},
                            }
                        ],
                    },
                ]
            )
        },
    ),
    (
        "stream_options bogus",
        {"json": openai_chat(stream=True, stream_options={"include_usage": "x"})},
    ),
]


def check_rejected(response: httpx.Response, openai: bool) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert "Traceback" not in response.text
    body = response.json()
    if openai:
        error = body["error"]
        assert {"message", "type", "code"} <= set(error)
        assert error["message"]
    else:
        assert body["status"] == "rejected", body
        assert body["error"]["type"] and body["error"]["message"]


@pytest.mark.parametrize(("case", "request_kw"), BAD_OWN, ids=[c for c, _ in BAD_OWN])
def test_malformed_syscall_is_a_4xx(
    shared: Harness, shared_token: str, case: str, request_kw: dict[str, Any]
) -> None:
    check_rejected(shared.client(shared_token).post(CHAT, **request_kw), openai=False)


@pytest.mark.parametrize(("case", "request_kw"), BAD_OPENAI, ids=[c for c, _ in BAD_OPENAI])
def test_malformed_openai_request_is_a_4xx(
    shared: Harness, shared_token: str, case: str, request_kw: dict[str, Any]
) -> None:
    check_rejected(shared.client(shared_token).post(OPENAI_CHAT, **request_kw), openai=True)


@pytest.mark.parametrize(("path", "openai"), [(CHAT, False), (OPENAI_CHAT, True)])
def test_huge_body_is_413(shared: Harness, shared_token: str, path: str, openai: bool) -> None:
    client = shared.client(shared_token)
    huge = json.dumps(chat(model="fake", messages=[{"role": "user", "content": "x" * (1 << 20)}]))
    response = client.post(path, content=huge, headers=JSON)  # with Content-Length
    assert response.status_code == 413
    check_rejected(response, openai)

    def chunks() -> Iterator[bytes]:  # no Content-Length: cut off while it streams in
        for _ in range(17):
            yield b" " * (1 << 16)

    response = client.post(path, content=chunks(), headers=JSON)
    assert response.status_code == 413
    check_rejected(response, openai)


@pytest.mark.parametrize(
    ("method", "path", "status", "openai"),
    [
        ("GET", "/api/v1/nope", 404, False),
        ("GET", "/nope", 404, False),
        ("POST", "/v1/completions", 404, True),
        ("GET", CHAT, 405, False),
        ("DELETE", CHAT, 405, False),
        ("PUT", OPENAI_CHAT, 405, True),
        ("POST", "/v1/models", 405, True),
    ],
)
def test_unknown_route_or_method(
    shared: Harness, shared_token: str, method: str, path: str, status: int, openai: bool
) -> None:
    response = shared.client(shared_token).request(method, path, json={})
    assert response.status_code == status
    check_rejected(response, openai)


def test_valid_params_are_accepted(shared: Harness, shared_token: str) -> None:
    # strict validation still takes JSON integers for float fields, as every client sends them
    client = shared.client(shared_token)
    body = chat(temperature=1, top_p=1, timeout=5, seed=3, stop="zzz", priority=-3, max_tokens=7)
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["result"]["text"] == REPLY[:7]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert client.post(CHAT, json=chat(json_schema=schema)).status_code == 200
    complete = client.post("/api/v1/llm/complete", json={"prompt": "hi", "max_tokens": 2})
    assert complete.status_code == 200 and complete.json()["result"]["text"] == REPLY[:2]
    check_envelope_error(
        client.post("/api/v1/llm/complete", json={"prompt": ""}), 422, "invalid_request"
    )


def test_server_survives_malformed_input(shared: Harness, shared_token: str) -> None:
    # after all of the above, calls still work (nothing leaked a stream or inflight slot)
    client = shared.client(shared_token)
    assert client.post(CHAT, json=chat()).json()["result"]["text"] == REPLY
    assert shared.process(shared_token, "@prober") is not None
    assert shared.core()["active"] == 0


# -- 5. and 6. streaming ------------------------------------------------------------------------


def first_stop(text: str, stops: list[str]) -> str:
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


@pytest.mark.parametrize("stop", [None, "this", "world!", ["fake", ", t"], "h"])
def test_stream_tokens_add_up_to_the_result(server: Harness, stop: str | list[str] | None) -> None:
    alice = server.client(server.agent("alice"))
    body = chat(stream=True) if stop is None else chat(stream=True, stop=stop)
    with alice.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = list(sse_frames(response.iter_lines()))
    events = [event for event, _ in frames]
    assert events[0] == "syscall" and events[-1] == "result"
    assert set(events[1:-1]) <= {"token"}
    assert len(events) > 2 or stop == "h"
    streamed = "".join(data["text"] for event, data in frames if event == "token")
    envelope = frames[-1][1]
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    assert envelope["id"] == frames[0][1]["id"]
    assert envelope["agent"] == "alice" and envelope["status"] == "done"
    assert envelope["result"]["text"] == streamed == first_stop(REPLY, stops)
    assert not any(s in streamed for s in stops)
    assert envelope["result"]["finish_reason"] == "stop"
    # the same call, not streamed, gives the same text
    assert alice.post(CHAT, json={**body, "stream": False}).json()["result"]["text"] == streamed


def test_stream_hits_max_tokens(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    with alice.stream("POST", CHAT, json=chat(stream=True, max_tokens=5)) as response:
        frames = list(sse_frames(response.iter_lines()))
    streamed = "".join(data["text"] for event, data in frames if event == "token")
    assert streamed == REPLY[:5] == frames[-1][1]["result"]["text"]
    assert frames[-1][1]["result"]["finish_reason"] == "length"
    assert frames[-1][1]["result"]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("include_usage", [False, True])
def test_openai_stream(server: Harness, include_usage: bool) -> None:
    alice = server.client(server.agent("alice"))
    body = openai_chat(stream=True, stream_options={"include_usage": include_usage})
    with alice.stream("POST", OPENAI_CHAT, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        frames = list(sse_frames(response.iter_lines()))
    assert all(event == "message" for event, _ in frames)  # plain `data:` frames
    assert frames[-1][1] == "[DONE]"
    chunks = [data for _, data in frames[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["model"] == "fake" for c in chunks)
    with_choices = [c for c in chunks if c["choices"]]
    assert with_choices[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in with_choices)
    assert text == REPLY
    assert with_choices[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in with_choices[:-1])
    usage = [c for c in chunks if not c["choices"]]
    if include_usage:
        assert chunks[-1] is usage[0] and len(usage) == 1
        assert usage[0]["usage"]["completion_tokens"] == len(REPLY)
        assert usage[0]["usage"]["total_tokens"] == (
            usage[0]["usage"]["prompt_tokens"] + len(REPLY)
        )
    else:
        assert usage == [] and all("usage" not in c for c in chunks)


def test_openai_models_and_completion(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    models = alice.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake"]
    response = alice.post(OPENAI_CHAT, json=openai_chat(model="gpt-4o", max_tokens=5)).json()
    assert response["object"] == "chat.completion"
    assert response["model"] == "fake"  # an unknown model name is served by the default core
    assert response["choices"][0]["message"] == {"role": "assistant", "content": REPLY[:5]}
    assert response["choices"][0]["finish_reason"] == "length"
    assert response["usage"]["completion_tokens"] == 5


def test_openai_strict_models(make_server: ServerFactory) -> None:
    harness = make_server(server={"strict_models": True})
    alice = harness.client(harness.agent("alice"))
    check_openai_error(
        alice.post(OPENAI_CHAT, json=openai_chat(model="gpt-4o")), 404, "model_not_found"
    )
    assert alice.post(OPENAI_CHAT, json=openai_chat()).status_code == 200


@pytest.mark.parametrize("path", [CHAT, OPENAI_CHAT])
def test_stream_of_multibyte_text(make_server: ServerFactory, path: str) -> None:
    reply = "héllo wörld — 日本語 🎉!"  # one token per byte: characters split across tokens
    harness = make_server(reply)
    client = harness.client(harness.agent("alice"))
    body = openai_chat(stream=True) if path == OPENAI_CHAT else chat(stream=True)
    with client.stream("POST", path, json=body) as response:
        frames = [data for _, data in sse_frames(response.iter_lines())]
    if path == OPENAI_CHAT:
        pieces = [f["choices"][0]["delta"].get("content") for f in frames[:-1] if f["choices"]]
        streamed = "".join(p or "" for p in pieces)
    else:
        streamed = "".join(f["text"] for f in frames[1:-1])
        assert frames[-1]["result"]["text"] == reply
    assert "\ufffd" not in streamed
    assert streamed == reply


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_REPLY = json.dumps({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_calls(make_server: ServerFactory, stream: bool) -> None:
    harness = make_server(TOOL_REPLY, max_sequence_tokens=1024)  # tool instructions are long
    client = harness.client(harness.agent("alice"))
    body = openai_chat(tools=[WEATHER], stream=stream, max_tokens=100)
    if stream:
        with client.stream("POST", OPENAI_CHAT, json=body) as response:
            assert response.status_code == 200
            frames = [data for _, data in sse_frames(response.iter_lines())]
        assert frames[-1] == "[DONE]"
        deltas = [f["choices"][0] for f in frames[:-1]]
        assert deltas[0]["delta"]["role"] == "assistant"
        (with_calls,) = [d["delta"] for d in deltas if d["delta"].get("tool_calls")]
        calls = with_calls["tool_calls"]
        assert calls[0]["index"] == 0
        reason = deltas[-1]["finish_reason"]
    else:
        response = client.post(OPENAI_CHAT, json=body)
        assert response.status_code == 200, response.text
        (choice,) = response.json()["choices"]
        assert choice["message"]["content"] is None
        calls = choice["message"]["tool_calls"]
        reason = choice["finish_reason"]
    assert reason == "tool_calls"
    (call,) = calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    # the tool's result goes back as a turn the model sees
    follow = openai_chat(
        messages=[
            *USER,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ],
        tools=[WEATHER],
        max_tokens=100,
    )
    assert client.post(OPENAI_CHAT, json=follow).status_code == 200
    assert "Result of get_weather: sunny" in fake_prompt(harness.engine.prompts[-1])


def fake_prompt(tokens: list[int]) -> str:
    return bytes(t - 10 for t in tokens if t >= 10).decode(errors="replace")


# -- 7. and 8. cancellation ------------------------------------------------------------------------


def idle(harness: Harness, token: str, process_id: str) -> bool:
    process = harness.process(token, process_id)
    return process is not None and process["state"] == "idle" and process["inflight"] == []


@pytest.mark.parametrize("path", [CHAT, OPENAI_CHAT])
def test_client_leaving_mid_stream_frees_its_slot(make_server: ServerFactory, path: str) -> None:
    harness = make_server(
        "x" * 5000, max_sequence_tokens=4096, context_tokens=16384, default_max_tokens=3000
    )
    token = harness.agent("alice")
    gate = harness.hold(after=6)  # the prompt step, a few tokens, then the engine waits
    body = openai_chat(stream=True) if path == OPENAI_CHAT else chat(stream=True)
    client = harness.client(token)
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        frames = sse_frames(response.iter_lines())
        pieces = [next(frames) for _ in range(3)]
        assert len(pieces) == 3
        assert harness.usage("@alice")["state"] == "generating"
        assert harness.core()["active"] == 1
    client.close()  # the connection goes away with the response

    wait_for(lambda: idle(harness, token, "@alice"), what="@alice idle")
    core = wait_for(lambda: (c := harness.core())["active"] == 0 and c, what="no active call")
    assert core["cancelled"] >= 1 and core["completed"] == 0
    process = harness.usage("@alice")
    assert process["syscalls"] == 1 and process["completion_tokens"] == 0
    # the slot is free: the next call runs (once the engine moves again)
    gate.set()
    other = harness.client(token).post(CHAT, json=chat(max_tokens=4))
    assert other.status_code == 200 and other.json()["result"]["text"] == "xxxx"


def raw_post(harness: Harness, path: str, token: str, body: dict[str, Any]) -> socket.socket:
    """Send a POST on a bare socket (so the test can drop the connection mid-call)."""
    host, port = harness.url.removeprefix("http://").rsplit(":", 1)
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    sock = socket.create_connection((host, int(port)), timeout=5)
    sock.sendall(head.encode() + data)
    return sock


def test_an_unexpected_error_is_one_500_and_the_connection_stays_open(server: Harness) -> None:
    class Broken(dict[str, Any]):
        def items(self) -> Any:
            raise RuntimeError("a bug in a route")

    kernel_ = server.srv.kernel
    assert kernel_ is not None
    kernel_.cores, cores = Broken(), kernel_.cores
    try:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        head = f"Host: {host}\r\nAuthorization: Bearer {server.admin}\r\n\r\n"
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            replies = []
            for path in ("/api/v1/cores", "/api/v1/whoami"):  # one connection, two requests
                sock.sendall(f"GET {path} HTTP/1.1\r\n{head}".encode())
                replies.append(read_response(sock))
    finally:
        kernel_.cores = cores
    (status, headers, body), (again, _, _) = replies
    assert status == 500 and json.loads(body)["error"]["type"] == "internal_error"
    assert "a bug" not in body and headers.get("connection") != "close"
    assert again == 200


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


@pytest.mark.parametrize("path", [CHAT, OPENAI_CHAT])
def test_client_leaving_a_non_streamed_call_cancels_it(server: Harness, path: str) -> None:
    token = server.agent("alice")
    gate = server.hold()
    body = openai_chat() if path == OPENAI_CHAT else chat()
    with raw_post(server, path, token, body):
        inflight_of(server, token, "@alice")
    wait_for(lambda: idle(server, token, "@alice"), what="@alice idle")
    core = server.core()
    assert core["cancelled"] == 1 and core["active"] == 0 and core["completed"] == 0
    gate.set()
    assert server.client(token).post(CHAT, json=chat()).json()["result"]["text"] == REPLY


@pytest.mark.parametrize("path", [CHAT, OPENAI_CHAT])
def test_cancel_a_call_in_flight(server: Harness, path: str) -> None:
    token = server.agent("alice")
    gate = server.hold()
    body = openai_chat() if path == OPENAI_CHAT else chat()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(server.client(token).post, path, json=body)
        (syscall_id,) = inflight_of(server, token, "@alice")
        cancelled = server.client(token).post(f"/api/v1/syscalls/{syscall_id}/cancel")
        assert cancelled.status_code == 200
        assert cancelled.json()["status"] == "cancelled"
        response = call.result(timeout=5)  # the caller hears at once, the engine still held
        gate.set()
    if path == OPENAI_CHAT:
        check_openai_error(response, 409, "cancelled")
    else:
        body = check_envelope_error(response, 409, "cancelled")
        assert body["id"] == syscall_id and body["status"] == "cancelled"
        assert body["agent"] == "alice"
    assert server.client(token).get(f"/api/v1/syscalls/{syscall_id}").json()["status"] == (
        "cancelled"
    )
    wait_for(lambda: idle(server, token, "@alice"), what="@alice idle")
    # cancelling a finished call changes nothing
    again = server.client(token).post(f"/api/v1/syscalls/{syscall_id}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"
    assert server.core()["cancelled"] == 1


def test_cancel_a_stream_in_flight(server: Harness) -> None:
    token = server.agent("alice")
    server.hold(after=3)
    with server.client(token).stream("POST", CHAT, json=chat(stream=True)) as response:
        frames = sse_frames(response.iter_lines())
        event, data = next(frames)
        assert event == "syscall"
        server.client(token).post(f"/api/v1/syscalls/{data['id']}/cancel")
        rest = list(frames)
    assert rest[-1][0] == "error"
    assert rest[-1][1]["error"]["type"] == "cancelled"
    assert rest[-1][1]["status"] == "cancelled" and rest[-1][1]["id"] == data["id"]
    assert all(event == "token" for event, _ in rest[:-1])


def test_cancel_an_openai_stream_in_flight(server: Harness) -> None:
    token = server.agent("alice")
    server.hold(after=3)
    with server.client(token).stream("POST", OPENAI_CHAT, json=openai_chat(stream=True)) as r:
        frames = sse_frames(r.iter_lines())
        _, first = next(frames)
        assert first["object"] == "chat.completion.chunk"
        (syscall_id,) = inflight_of(server, token, "@alice")
        assert first["id"] == f"chatcmpl-{syscall_id}"
        server.client(token).post(f"/api/v1/syscalls/{syscall_id}/cancel")
        rest = [data for _, data in frames]
    assert "[DONE]" not in rest  # an error ends the stream instead
    error = rest[-1]["error"]
    assert error["type"] == error["code"] == "cancelled" and error["message"]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in rest[:-1])


async def test_sdk_cancel_raises_syscall_cancelled(server: Harness) -> None:
    token = server.agent("alice")
    gate = server.hold()
    async with AsyncClient(server.url, token) as client, asyncio.timeout(10):
        call = asyncio.create_task(client.chat(USER))
        while not (inflight := [p["inflight"] for p in await client.processes() if p["inflight"]]):
            await asyncio.sleep(0.01)
        (syscall_id,) = inflight[0]
        assert (await client.cancel(syscall_id))["status"] == "cancelled"
        with pytest.raises(SyscallCancelled):
            await call
        gate.set()


# -- 9. limits -----------------------------------------------------------------------------------


def test_stream_limit_per_agent(make_server: ServerFactory) -> None:
    harness = make_server(server={"max_streams_per_agent": 1})
    alice, bob = harness.agent("alice"), harness.agent("bob")
    gate = harness.hold()
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(
            harness.client(alice).stream("POST", CHAT, json=chat(stream=True))
        )
        assert first.status_code == 200
        first_frames = sse_frames(first.iter_lines())
        assert next(first_frames)[0] == "syscall"

        for path, body, openai in (
            (CHAT, chat(stream=True), False),
            (OPENAI_CHAT, openai_chat(stream=True), True),
        ):
            second = harness.client(alice).post(path, json=body)
            assert second.status_code == 429
            assert int(second.headers["retry-after"]) >= 1
            if openai:
                check_openai_error(second, 429, "overloaded")
            else:
                check_envelope_error(second, 429, "overloaded")

        # a non-streamed call of the same agent is not a stream
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            plain = pool.submit(harness.client(alice).post, CHAT, json=chat())
            # another agent is not affected
            other = stack.enter_context(
                harness.client(bob).stream("POST", CHAT, json=chat(stream=True))
            )
            assert other.status_code == 200
            gate.set()
            assert plain.result(timeout=5).status_code == 200
        assert list(first_frames)[-1][0] == "result"
        assert list(sse_frames(other.iter_lines()))[-1][0] == "result"

    # the slot is given back when the stream ends
    with harness.client(alice).stream("POST", CHAT, json=chat(stream=True)) as again:
        assert again.status_code == 200
        assert list(sse_frames(again.iter_lines()))[-1][0] == "result"


def test_inflight_limit_per_agent(make_server: ServerFactory) -> None:
    harness = make_server(server={"max_inflight_per_agent": 1})
    alice, bob = harness.agent("alice"), harness.agent("bob")
    gate = harness.hold()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(harness.client(alice).post, CHAT, json=chat())
        inflight_of(harness, alice, "@alice")
        for path, body in ((CHAT, chat()), (CHAT, chat(stream=True)), (OPENAI_CHAT, openai_chat())):
            second = harness.client(alice).post(path, json=body)
            assert second.status_code == 429, second.text
            assert int(second.headers["retry-after"]) >= 1
            assert "error" in second.json()
        other = pool.submit(harness.client(bob).post, CHAT, json=chat())
        inflight_of(harness, bob, "@bob")  # queued, not refused
        gate.set()
        assert first.result(timeout=5).status_code == 200
        assert other.result(timeout=5).status_code == 200
    assert harness.client(alice).post(CHAT, json=chat()).status_code == 200


def test_calls_waiting_for_a_quota_place_are_seen_and_counted(make_server: ServerFactory) -> None:
    """A call waiting for a max_parallel place is in no core's queue: the process shows it as
    quota_waiting, and it counts towards the server's in-flight limit."""
    harness = make_server(server={"max_inflight_per_agent": 2}, quota=Quota(max_parallel=1))
    alice = harness.agent("alice")
    gate = harness.hold()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(harness.client(alice).post, CHAT, json=chat())
        inflight_of(harness, alice, "@alice")
        second = pool.submit(harness.client(alice).post, CHAT, json=chat())
        waiting = wait_for(lambda: harness.usage("@alice")["quota_waiting"], what="a quota wait")
        assert waiting == 1 and harness.core()["queued"] + harness.core()["active"] == 1
        third = harness.client(alice).post(CHAT, json=chat())
        assert third.status_code == 429 and "quota place" in third.text
        gate.set()
        assert first.result(timeout=5).status_code == 200
        assert second.result(timeout=5).status_code == 200
    assert harness.usage("@alice")["quota_waiting"] == 0


def test_max_tokens_cap(make_server: ServerFactory) -> None:
    harness = make_server(server={"max_tokens": 20})
    client = harness.client(harness.agent("alice"))
    check_envelope_error(client.post(CHAT, json=chat(max_tokens=21)), 400, "invalid_request")
    check_openai_error(
        client.post(OPENAI_CHAT, json=openai_chat(max_tokens=21)), 400, "invalid_request"
    )
    check_openai_error(
        client.post(OPENAI_CHAT, json=openai_chat(max_completion_tokens=21)), 400, "invalid_request"
    )
    response = client.post(CHAT, json=chat(max_tokens=21, stream=True))
    check_envelope_error(response, 400, "invalid_request")  # a plain error, not a stream
    assert harness.process(harness.admin, "@alice") is None  # nothing reached the kernel
    ok = client.post(CHAT, json=chat(max_tokens=20))
    assert ok.status_code == 200 and ok.json()["result"]["text"] == REPLY[:20]


async def test_token_quota_follows_the_credential(make_server: ServerFactory) -> None:
    harness = make_server(quota=Quota(tokens_per_minute=30))  # one call uses 35 tokens
    alice, bob = harness.agent("alice"), harness.agent("bob")
    first = harness.client(alice).post(CHAT, json=chat())
    assert first.status_code == 200
    for path, body, openai in (
        (CHAT, chat(), False),
        (CHAT, chat(stream=True), False),
        (OPENAI_CHAT, openai_chat(), True),
        (OPENAI_CHAT, openai_chat(stream=True), True),
    ):
        over = harness.client(alice).post(path, json=body)
        if openai:
            check_openai_error(over, 429, "quota_exceeded")
        else:
            check_envelope_error(over, 429, "quota_exceeded")
        assert 1 <= int(over.headers["retry-after"]) <= 60
    async with AsyncClient(harness.url, alice, retries=0) as client:
        with pytest.raises(QuotaExceeded) as raised:
            await client.chat(USER)
        assert 0 < raised.value.retry_after <= 60
    # another identity has its own window
    assert harness.client(bob).post(CHAT, json=chat()).status_code == 200
    assert harness.usage("@alice")["syscalls"] == 1


def test_killing_an_agents_session_cancels_its_calls(server: Harness) -> None:
    token = server.agent("alice")
    gate = server.hold()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        calls = [pool.submit(server.client(token).post, CHAT, json=chat()) for _ in range(2)]
        wait_for(lambda: len(inflight_of(server, token, "@alice")) == 2, what="two calls")
        killed = server.client(token).delete("/api/v1/processes/@alice")
        assert killed.status_code == 200
        for call in calls:
            check_envelope_error(call.result(timeout=5), 409, "cancelled")
        gate.set()
    session = server.process(token, "@alice")
    assert session is not None and session["state"] == "idle" and session["inflight"] == []
    assert server.core()["cancelled"] == 2
    # the session lives on: the agent can call again
    assert server.client(token).post(CHAT, json=chat()).status_code == 200


# -- 10. the SDK ----------------------------------------------------------------------------------


class Echo(Agent):
    name = "echo"

    async def run(self, task: str) -> str:
        first = await self.llm.chat([{"role": "user", "content": task}], max_tokens=5)
        second = await self.llm.chat([Message("user", first.text)])
        return f"{first.text}|{second.text}"


def sdk_call(**params: Any) -> LLMCall:
    return LLMCall(messages=(Message("user", "hi"),), params=SamplingParams(**params))


async def test_async_client_round_trips(server: Harness) -> None:
    token = server.agent("alice")
    async with AsyncClient(server.url, token) as client, asyncio.timeout(10):
        completion = await client.chat(USER)
        assert completion.text == REPLY and completion.finish_reason == "stop"
        assert completion.usage.completion_tokens == len(REPLY)
        assert completion.syscall_id.startswith("sc-") and completion.model == "fake"

        items = [item async for item in client.stream(sdk_call(stop=("this",)))]
        *pieces, last = items
        assert isinstance(last, Completion)
        texts = [p for p in pieces if isinstance(p, str)]
        assert texts and texts == pieces
        assert "".join(texts) == last.text == "hello world, "

        assert await Echo(client).run("hi") == f"{REPLY[:5]}|{REPLY}"

        process = (await client.spawn("planner", "a task"))["id"]
        finished = await client.wait(process, timeout=10)
        assert finished["state"] == "done" and REPLY in finished["result"]
        mine = {p["id"]: p for p in await client.processes()}
        assert mine["@alice"]["syscalls"] == 4  # chat, stream, and the agent's two calls
        assert set(mine) == {"@alice", process}


def test_blocking_client_round_trips(server: Harness) -> None:
    token = server.agent("alice")
    with Client(server.url, token) as client:
        assert client.chat(USER, max_tokens=3).text == REPLY[:3]
        items = list(client.stream(sdk_call()))
        assert isinstance(items[-1], Completion)
        assert "".join(p for p in items if isinstance(p, str)) == items[-1].text == REPLY
        spawned = client.spawn("writer", "bread")
        assert client.wait(spawned["id"], timeout=10)["state"] == "done"
        assert {p["id"] for p in client.processes()} == {"@alice", spawned["id"]}


async def test_sdk_maps_errors(server: Harness) -> None:
    token = server.agent("alice")
    async with AsyncClient(server.url, "aios_not-a-token-at-all-0000000") as bad:
        with pytest.raises(Unauthenticated):
            await bad.chat(USER)
    with Client(server.url, "aios_not-a-token-at-all-0000000") as blocking:
        with pytest.raises(Unauthenticated):
            blocking.chat(USER)
        with pytest.raises(Unauthenticated):
            list(blocking.stream(sdk_call()))
    async with AsyncClient(server.url, token) as client:
        with pytest.raises(InvalidRequest):
            await client.chat(USER, max_tokens=10**6)
        with pytest.raises(InvalidRequest):
            [item async for item in client.stream(sdk_call(max_tokens=10**6))]


async def test_sdk_unreachable(server: Harness) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    async with AsyncClient(url, "aios_x", retries=1, backoff=0.01) as client:
        with pytest.raises(Unreachable):
            await client.chat(USER)
    with Client(url, "aios_x", retries=1, backoff=0.01) as blocking:
        with pytest.raises(Unreachable):
            blocking.chat(USER)
        with pytest.raises(Unreachable):
            list(blocking.stream(sdk_call()))
    assert time.monotonic() - started < 5


# -- 11. processes ---------------------------------------------------------------------------------


def test_spawn_and_wait(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    spawned = alice.post("/api/v1/processes", json={"agent": "planner", "task": "x"})
    assert spawned.status_code == 202
    process = spawned.json()
    assert process["owner"] == "alice" and process["name"] == "planner"
    assert process["task"] == "x"
    done = alice.get(f"/api/v1/processes/{process['id']}", params={"wait": 10}).json()
    assert done["state"] == "done" and done["error"] is None
    assert done["result"] == f"{REPLY} [check: {REPLY[:8]}]"  # the check has max_tokens=8
    assert done["syscalls"] == 3 and done["turnaround_s"] is not None


def test_kill_a_running_process(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    gate = server.hold()
    process_id = alice.post("/api/v1/processes", json={"agent": "planner", "task": "x"}).json()[
        "id"
    ]

    def busy() -> bool:
        return alice.get(f"/api/v1/processes/{process_id}").json()["state"] in (
            "queued",
            "generating",
        )

    wait_for(busy, what="the spawned agent in a syscall")
    killed = alice.delete(f"/api/v1/processes/{process_id}")
    assert killed.status_code == 200
    ended = alice.get(f"/api/v1/processes/{process_id}", params={"wait": 5}).json()
    assert ended["state"] == "failed" and ended["error"] == "killed"
    assert ended["inflight"] == [] and ended["result"] is None
    gate.set()
    assert wait_for(lambda: server.core()["active"] == 0, what="no active call")
    assert server.core()["cancelled"] == 1


def test_spawn_errors(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    check_envelope_error(
        alice.post("/api/v1/processes", json={"agent": "nope", "task": "x"}), 404, "not_found"
    )
    check_envelope_error(
        alice.post("/api/v1/processes", json={"agent": "planner", "task": ""}),
        422,
        "invalid_request",
    )
    check_envelope_error(alice.get("/api/v1/processes/agent-999999"), 404, "not_found")
    check_envelope_error(
        alice.get("/api/v1/processes/@alice", params={"wait": -1}), 422, "invalid_request"
    )
    assert [p["id"] for p in alice.get("/api/v1/processes").json()] == []


# -- 12. configuration -----------------------------------------------------------------------------

TOML = """
[server]
port = 9123
data_dir = "{data}"
max_streams_per_agent = 2

[kernel]
policy = "fair"
syscall_timeout = 30

[kernel.quota]
tokens_per_minute = 1000

[[core]]
name = "small"
model = "fake"
slots = 2
batch_tokens = 64
"""


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "aios.toml"
    path.write_text(text.replace("{data}", str(tmp_path / "data")))
    return path


def test_load_settings_from_toml(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path, TOML), env={})
    assert settings.server.port == 9123
    assert settings.server.data_path == tmp_path / "data"
    assert settings.server.max_streams_per_agent == 2
    assert settings.server.max_tokens == ServerConfig().max_tokens
    assert settings.kernel.policy == "fair" and settings.kernel.syscall_timeout == 30.0
    assert settings.kernel.quota.tokens_per_minute == 1000
    (core,) = settings.kernel.cores
    assert isinstance(core, CoreConfig)
    assert (core.name, core.model, core.slots, core.batch_tokens) == ("small", "fake", 2, 64)


def test_env_overrides_the_file(tmp_path: Path) -> None:
    path = write_config(tmp_path, TOML)
    env = {"AIOS_PORT": "9999", "AIOS_POLICY": "rr", "AIOS_MODEL": "other"}
    settings = load_settings(path, env=env)
    assert settings.server.port == 9999 and settings.kernel.policy == "rr"
    assert settings.kernel.cores[0].model == "other"  # type: ignore[union-attr]
    assert load_settings(env={"AIOS_CONFIG": str(path)}).server.port == 9123
    defaults = load_settings(env={})
    assert defaults.server.port == 8080 and defaults.kernel.cores[0].name == "default"


@pytest.mark.parametrize(
    ("text", "env", "mentions"),
    [
        ("[server]\nbogus = 1\n", {}, "bogus"),
        ("[nope]\n", {}, "nope"),
        ("[kernel]\nfrobs = 2\n", {}, "frobs"),
        ("[kernel.quota]\nper_hour = 2\n", {}, "per_hour"),
        ("[[core]]\nname = 'a'\nmodel = 'fake'\nsize = 3\n", {}, "size"),
        ("[server]\nport = '80'\n", {}, "port"),
        ("[server]\nport = true\n", {}, "port"),
        ("[server]\nport = 70000\n", {}, "port"),
        ("[server]\nmax_tokens = 1.5\n", {}, "max_tokens"),
        ("[kernel]\npolicy = 'lottery'\n", {}, "policy"),
        ("[kernel]\nsyscall_timeout = 'soon'\n", {}, "syscall_timeout"),
        ("[[core]]\nname = 'a'\nslots = '2'\n", {}, "slots"),
        ("[[core]]\ntype = 'quantum'\nname = 'a'\n", {}, "type"),
        ("core = 5\n", {}, "core"),
        ("server = 5\n", {}, "server"),
        ("this is not toml", {}, "TOML"),
        ("", {"AIOS_PORT": "eighty"}, "AIOS_PORT"),
    ],
)
def test_bad_config_is_a_config_error(
    tmp_path: Path, text: str, env: dict[str, str], mentions: str
) -> None:
    with pytest.raises(ConfigError, match=mentions):
        load_settings(write_config(tmp_path, text), env=env)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", env={})


# -- 13. OpenAPI -----------------------------------------------------------------------------------


def test_openapi_schema(shared: Harness) -> None:
    response = shared.client().get("/openapi.json")
    assert response.status_code == 200
    schema = response.json()
    assert {CHAT, OPENAI_CHAT, "/api/v1/processes", "/v1/models"} <= set(schema["paths"])
    chat_in = schema["components"]["schemas"]["ChatIn"]
    assert "messages" in chat_in["required"]
    assert chat_in["additionalProperties"] is False
    assert schema["paths"]["/api/v1/processes"]["post"]["responses"].keys() >= {"202"}
    health = shared.client().get("/healthz").json()
    assert health["status"] == "ok" and health["cores"] == ["fake"]


# -- 14. the identity store ------------------------------------------------------------------------


def db_bytes(directory: Path) -> bytes:
    """Every byte SQLite wrote (the database and its WAL)."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


def test_tokens_are_stored_hashed(tmp_path: Path) -> None:
    identities = Identities(tmp_path / "db" / "aios.db")
    try:
        identity, token = identities.create("alice", ("ops",))
        assert identity.name == "alice" and identity.groups == ("ops",)
        assert token.startswith("aios_") and len(token) >= 40
        stored = db_bytes(tmp_path / "db")
        assert digest(token).encode() in stored  # we read the right bytes...
        assert token.encode() not in stored  # ...and the token is not among them
        assert token.removeprefix("aios_").encode() not in stored
        assert identities.authenticate(token) == identity
        assert identities.authenticate(token + "x") is None
        assert identities.authenticate("") is None
    finally:
        identities.close()
    reopened = Identities(tmp_path / "db" / "aios.db")
    try:
        assert reopened.authenticate(token) == identity
    finally:
        reopened.close()


def test_known_tokens_are_cached_but_a_revoke_anywhere_ends_them_at_once(tmp_path: Path) -> None:
    server = Identities(tmp_path / "aios.db")  # the server's connection
    cli = Identities(tmp_path / "aios.db")  # `aios agent ...` in another process
    try:
        _, alice = cli.create("alice", ("ops",))
        _, bob = server.create("bob")
        server.set_admin_token("a" * 24)
        for _ in range(2):  # the second round is served from the cache
            assert server.authenticate(alice) == Identity("alice", ("ops",))
            assert server.authenticate(bob) == Identity("bob")
            assert server.authenticate("a" * 24) == Identity("admin", (), True)
        assert cli.revoke("alice")  # another connection's write
        assert server.authenticate(alice) is None
        assert server.revoke("bob")  # the server's own write
        assert server.authenticate(bob) is None
        cli.set_admin_token("b" * 24)  # a new admin token from the command line
        assert server.authenticate("a" * 24) is None
        assert server.authenticate("b" * 24) == Identity("admin", (), True)
        _, alice = cli.create("alice", ("other",))  # a new identity with the old name
        assert server.authenticate(alice) == Identity("alice", ("other",))
        for i in range(50):  # unknown tokens are never remembered
            assert server.authenticate(f"aios_guess{i}") is None
        assert len(server._known) <= 3
    finally:
        server.close()
        cli.close()


def test_identity_rules(tmp_path: Path) -> None:
    identities = Identities(tmp_path / "aios.db")
    try:
        _, token = identities.create("alice")
        with pytest.raises(InvalidRequest, match="exists"):
            identities.create("alice")
        for bad in ("", "Alice", "a b", "-x", "_x", "x" * 65, "a/b", "é", "a\n"):
            with pytest.raises(InvalidRequest):
                identities.create(bad)
        with pytest.raises(InvalidRequest):
            identities.create("bob", ("Bad Group",))
        with pytest.raises(InvalidRequest, match="reserved"):
            identities.create("admin")
        with pytest.raises(InvalidRequest):
            identities.revoke("admin")
        assert identities.create("x" * 64)[0].name == "x" * 64
        assert [i.name for i in identities.list()] == ["alice", "x" * 64]

        assert identities.revoke("alice") is True
        assert identities.authenticate(token) is None
        assert identities.revoke("alice") is False
        _, fresh = identities.create("alice")
        assert identities.authenticate(fresh) is not None
        assert identities.authenticate(token) is None

        with pytest.raises(ConfigError):
            identities.set_admin_token("short")
        identities.set_admin_token("a" * 32)
        admin = identities.authenticate("a" * 32)
        assert admin is not None and admin.admin and admin.name == "admin"
        identities.set_admin_token("b" * 32)  # a new admin token replaces the old one
        assert identities.authenticate("a" * 32) is None
        assert identities.authenticate("b" * 32) == admin
    finally:
        identities.close()


def test_open_identities_admin_token(tmp_path: Path) -> None:
    settings = Settings(ServerConfig(data_dir=str(tmp_path)))
    identities = open_identities(settings, env={})
    try:
        path = tmp_path / ADMIN_TOKEN_FILE
        assert path.stat().st_mode & 0o777 == 0o600
        token = path.read_text().strip()
        assert identities.authenticate(token) is not None
        assert token.encode() not in db_bytes(tmp_path).replace(path.read_bytes(), b"")
    finally:
        identities.close()
    # the same file is read again; the environment wins over it
    again = open_identities(settings, env={})
    try:
        assert again.authenticate(token) is not None
    finally:
        again.close()
    from_env = open_identities(settings, env={"AIOS_ADMIN_TOKEN": "e" * 30})
    try:
        assert from_env.authenticate("e" * 30) is not None
        assert from_env.authenticate(token) is None
    finally:
        from_env.close()


@pytest.mark.parametrize("submit", [False, True])
def test_aios_run_against_a_server(make_server: ServerFactory, submit: bool) -> None:
    """`aios run --url`: the example agents as HTTP clients (each its own), or in the kernel."""
    from typer.testing import CliRunner

    from aios.cli import app

    server = make_server()
    args = ["run", "--url", server.url, "--token", server.agent("runner"), "--agents", "4"]
    result = CliRunner().invoke(app, args + (["--submit"] if submit else []))
    assert result.exit_code == 0, result.output
    assert "4 agents via" in result.output
    assert ("in the kernel" if submit else "as HTTP clients") in result.output
    assert result.output.count("hello world") >= 3  # the fake model's answers
