"""Processes over HTTP (routes/processes.py): spawn and wait, kill a running agent
program or an agent's session (cancelling its calls), and the routes' errors.
"""

from __future__ import annotations

import concurrent.futures

from servers import CHAT, REPLY, Harness, chat, check_envelope_error, inflight_of, wait_for


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
