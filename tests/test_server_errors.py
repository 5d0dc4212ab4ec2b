"""Errors as HTTP (aios/server/errors.py, http.py's BodyLimit and ContainErrors):
malformed input on both APIs is a 4xx in the shape each expects, bodies over the limit
are 413, unknown routes 404/405, an unexpected exception one logged 500.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import (
    CHAT,
    OPENAI_CHAT,
    REPLY,
    USER,
    Harness,
    chat,
    check_envelope_error,
    openai_chat,
    read_response,
)

# -- malformed input -------------------------------------------------------------------------------

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
    ("timeout under a millisecond", {"json": chat(timeout=5e-324)}),
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


# -- unexpected errors -----------------------------------------------------------------------------


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
