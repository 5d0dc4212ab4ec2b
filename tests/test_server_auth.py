"""Authentication and isolation over HTTP (routes/agents.py, session.Server's identity
checks): tokens, revocation, admin routes, agents that cannot see each other, identity
from the token only; and the identity store (aios/identity.py) under the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import (
    CHAT,
    OPENAI_CHAT,
    REPLY,
    Harness,
    chat,
    check_envelope_error,
    check_openai_error,
    openai_chat,
    sse_frames,
)

from aios.errors import (
    ConfigError,
    InvalidRequest,
)
from aios.identity import Identities, Identity, digest
from aios.server.config import ServerConfig, Settings
from aios.server.main import ADMIN_TOKEN_FILE, open_identities

# -- authentication --------------------------------------------------------------------------------


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


# -- isolation -------------------------------------------------------------------------------------


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


# -- identity comes from the token only ------------------------------------------------------------


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


# -- the identity store ----------------------------------------------------------------------------


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
