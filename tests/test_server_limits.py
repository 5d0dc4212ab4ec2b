"""The server's admission limits (session.Server.admit and .session): streams and calls
in flight per agent, calls waiting for a quota place, the max_tokens cap, and token
quotas that follow the credential.
"""

from __future__ import annotations

import concurrent.futures
import contextlib

import pytest
from servers import (
    CHAT,
    OPENAI_CHAT,
    REPLY,
    USER,
    ServerFactory,
    chat,
    check_envelope_error,
    check_openai_error,
    inflight_of,
    openai_chat,
    sse_frames,
    wait_for,
)

from aios.errors import (
    QuotaExceeded,
)
from aios.quota import Quota
from aios.sdk.http import AsyncClient


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
