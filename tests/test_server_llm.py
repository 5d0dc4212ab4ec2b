"""LLM syscalls over HTTP (routes/llm.py, routes/syscalls.py): streams whose tokens add
up to the result, clients that leave (a stream or a plain call), and cancellation by
syscall id, on the syscall API and (where the path is a parameter) the OpenAI API.
"""

from __future__ import annotations

import concurrent.futures

import pytest
from servers import (
    CHAT,
    OPENAI_CHAT,
    REPLY,
    Harness,
    ServerFactory,
    chat,
    check_envelope_error,
    check_openai_error,
    inflight_of,
    openai_chat,
    raw_post,
    sse_frames,
    wait_for,
)

# -- streaming -------------------------------------------------------------------------------------


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


# -- disconnects and cancellation ------------------------------------------------------------------


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
