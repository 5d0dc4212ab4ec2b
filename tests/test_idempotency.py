"""``Idempotency-Key`` on HTTP syscalls (aios.server.idempotency): a repeat with the same key
and request answers with the first answer and runs nothing (LLM, write, tool), across a restart
of the server too; another request under the key is a 409, as is a repeat while the first
runs; keys are per agent; a streamed call's repeat is its recorded envelope; a key past its
time runs again; the SDK sends the key and retries a lost connection only when it has one.
"""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path

import httpx
import pytest
from servers import REPLY, Harness, chat, raw_post, serve, sse_frames, wait_for

from aios.config import DurableConfig
from aios.errors import Unreachable
from aios.sdk.http import Client
from aios.syscall import LLMCall, Message

KEY = {"Idempotency-Key": "order-42"}


def write(path: str, content: str) -> dict[str, str]:
    return {"path": path, "content": content}


def test_a_repeated_key_answers_with_the_first_result_and_runs_nothing(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    first = alice.post("/api/v1/llm/chat", json=chat(), headers=KEY)
    assert first.status_code == 200 and first.json()["result"]["text"] == REPLY
    ran = len(server.engine.plans)
    again = alice.post("/api/v1/llm/chat", json=chat(), headers=KEY)
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()  # the same envelope: same syscall id, same result
    assert len(server.engine.plans) == ran  # the model did not run again
    # Without the header every call runs.
    plain = alice.post("/api/v1/llm/chat", json=chat())
    assert plain.json()["id"] != first.json()["id"] and "idempotent-replayed" not in plain.headers


def test_a_write_under_a_key_is_applied_once(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    for _ in range(3):
        done = alice.post("/api/v1/storage/write", json=write("a.txt", "one"), headers=KEY)
        assert done.status_code == 200, done.text
    history = alice.post("/api/v1/storage/history", json={"path": "a.txt"}).json()["result"]
    assert len(history) == 1


def test_the_same_key_for_another_request_is_a_conflict(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    assert alice.post("/api/v1/storage/write", json=write("a", "1"), headers=KEY).is_success
    other = alice.post("/api/v1/storage/write", json=write("a", "2"), headers=KEY)
    assert other.status_code == 409 and other.json()["error"]["type"] == "conflict"
    assert "different request" in other.json()["error"]["message"]
    read = alice.post("/api/v1/storage/read", json={"path": "a"}).json()["result"]
    assert read["content"] == {"base64": "MQ=="}  # "1"


def test_keys_are_per_agent(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    bob = server.client(server.agent("bob"))
    assert alice.post("/api/v1/storage/write", json=write("a", "x"), headers=KEY).is_success
    mine = bob.post("/api/v1/storage/write", json=write("a", "x"), headers=KEY)
    assert mine.is_success and "idempotent-replayed" not in mine.headers
    assert mine.json()["agent"] == "bob"


def test_a_recorded_error_is_answered_again_and_a_bad_key_is_refused(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    missing = alice.post("/api/v1/storage/read", json={"path": "nope"}, headers=KEY)
    assert missing.status_code == 404
    alice.post("/api/v1/storage/write", json=write("nope", "now it exists"))
    again = alice.post("/api/v1/storage/read", json={"path": "nope"}, headers=KEY)
    assert again.status_code == 404 and again.headers["idempotent-replayed"] == "true"
    bad = alice.post("/api/v1/storage/ls", json={}, headers={"Idempotency-Key": "x" * 300})
    assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["error"]["message"]


def test_a_repeat_while_the_first_runs_waits_for_its_answer(server: Harness) -> None:
    token = server.agent("alice")
    alice, second = server.client(token), server.client(token)
    gate = server.hold()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(alice.post, "/api/v1/llm/chat", json=chat(), headers=KEY)
        wait_for(lambda: server.engine.blocked, what="the first call at the gate")
        repeat = pool.submit(second.post, "/api/v1/llm/chat", json=chat(), headers=KEY)
        other = second.post("/api/v1/llm/chat", json=chat(max_tokens=3), headers=KEY)
        assert other.status_code == 409 and "different request" in other.text
        assert not repeat.done()  # it waits for the first one's answer
        gate.set()
        assert first.result().status_code == 200
        assert repeat.result().headers["idempotent-replayed"] == "true"
    assert repeat.result().json() == first.result().json()
    assert len(server.engine.prompts) == 1  # the model ran once


def test_a_call_under_a_key_is_not_cancelled_when_its_client_leaves(server: Harness) -> None:
    token = server.agent("alice")
    gate = server.hold()
    sock = raw_post(server, "/api/v1/llm/chat", token, chat(), headers=KEY)
    wait_for(lambda: server.engine.blocked, what="the call at the gate")
    sock.close()  # the client is gone: without a key the call would be cancelled now
    time.sleep(0.3)
    gate.set()
    alice = server.client(token)
    again = wait_for(
        lambda: (r := alice.post("/api/v1/llm/chat", json=chat(), headers=KEY)).is_success and r,
        what="the recorded answer",
    )
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["status"] == "done" and len(server.engine.prompts) == 1


def test_a_streamed_call_under_a_key_answers_a_repeat_with_its_envelope(server: Harness) -> None:
    alice = server.client(server.agent("alice"))
    with alice.stream("POST", "/api/v1/llm/chat", json=chat(stream=True), headers=KEY) as r:
        frames = list(sse_frames(r.iter_lines()))
    (result,) = [data for event, data in frames if event == "result"]
    ran = len(server.engine.plans)
    again = alice.post("/api/v1/llm/chat", json=chat(stream=True), headers=KEY)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == result and len(server.engine.plans) == ran


def test_a_key_is_remembered_across_a_restart_and_forgotten_after_its_time(
    tmp_path: Path,
) -> None:
    durable = DurableConfig(idempotency_hours=1.5 / 3600)  # 1.5 s
    with serve(tmp_path, keep=True, durable=durable) as first:
        token = first.agent("alice")
        answer = first.client(token).post("/api/v1/llm/chat", json=chat(), headers=KEY).json()
    with serve(tmp_path, keep=True, durable=durable) as second:
        alice = second.client(token)
        again = alice.post("/api/v1/llm/chat", json=chat(), headers=KEY)
        assert again.headers["idempotent-replayed"] == "true" and again.json() == answer
        assert second.engine.plans == []  # this server never ran it
        time.sleep(1.6)
        later = alice.post("/api/v1/llm/chat", json=chat(), headers=KEY)
        assert "idempotent-replayed" not in later.headers and later.json()["id"] != answer["id"]


def test_the_sdk_sends_the_key_and_retries_a_lost_connection_only_with_one(
    server: Harness,
) -> None:
    token = server.agent("alice")
    call = LLMCall(messages=(Message("user", "hi"),))
    with Client(server.url, token) as client:
        first = client.llm(call, idempotency_key="k1")
        assert client.llm(call, idempotency_key="k1").syscall_id == first.syscall_id
        stat = client.call("storage", "write", write("f", "x"), idempotency_key="k2")
        assert client.call("storage", "write", write("f", "x"), idempotency_key="k2") == stat

    class Flaky(httpx.BaseTransport):
        """Drops the first response after the request reached the server."""

        def __init__(self) -> None:
            self.inner = httpx.HTTPTransport()
            self.sent = 0

        def handle_request(self, request: httpx.Request) -> httpx.Response:
            self.sent += 1
            response = self.inner.handle_request(request)
            if self.sent == 1:
                response.read()
                response.close()
                raise httpx.ReadError("connection reset by peer", request=request)
            return response

        def close(self) -> None:
            self.inner.close()

    flaky = Flaky()
    with Client(server.url, token, transport=flaky) as client:
        ran = len(server.engine.prompts)
        done = client.llm(call, idempotency_key="k3")  # retried; answered from the record
        assert flaky.sent == 2 and len(server.engine.prompts) == ran + 1  # it ran once
        assert done.text == REPLY
    with Client(server.url, token, transport=Flaky()) as client, pytest.raises(Unreachable):
        client.llm(call)  # without a key a lost answer is not retried: it may have run
