"""The OpenAI-compatible API (routes/openai.py, openai_api.py): models, completions,
chunk streams with and without usage, strict model names, emulated tool calls, and a
cancelled stream ending in OpenAI's error frame.
"""

from __future__ import annotations

import json

import pytest
from servers import (
    OPENAI_CHAT,
    REPLY,
    USER,
    Harness,
    ServerFactory,
    check_openai_error,
    inflight_of,
    openai_chat,
    sse_frames,
)


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
