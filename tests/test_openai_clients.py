"""Unmodified clients against a live ``aios serve`` on the real embedded model (SmolLM2-135M):
the official ``openai`` package and LangChain's ``ChatOpenAI``, changed in nothing but
``base_url`` and ``api_key`` (an agent token). Marker ``model``: always run in CI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from aios.config import CoreConfig, KernelConfig
from aios.server.config import ServerConfig, Settings
from aios.server.main import BackgroundServer

pytestmark = pytest.mark.model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    data: Path = tmp_path_factory.mktemp("aios-data")
    core = CoreConfig(name="smollm2", slots=4, cache_slots=2, max_sequence_tokens=2048)
    settings = Settings(ServerConfig(port=0, data_dir=str(data)), KernelConfig(cores=(core,)))
    with BackgroundServer(settings) as srv:
        yield srv


def new_agent(server: BackgroundServer, name: str) -> str:
    response = httpx.post(
        f"{server.url}/api/v1/agents",
        json={"name": name},
        headers={"authorization": f"Bearer {server.admin_token}"},
    )
    assert response.status_code == 201, response.text
    token: str = response.json()["token"]
    return token


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key=new_agent(server, "oa")) as c:
        yield c


def usage_of(server: BackgroundServer, name: str) -> tuple[int, int]:
    processes = httpx.get(
        f"{server.url}/api/v1/processes",
        headers={"authorization": f"Bearer {server.admin_token}"},
    ).json()
    mine = [p for p in processes if p["id"] == f"@{name}"]
    return (mine[0]["syscalls"], mine[0]["completion_tokens"]) if mine else (0, 0)


def test_models_lists_the_core(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["smollm2"]


def test_chat(client: openai.OpenAI, server: BackgroundServer) -> None:
    before = usage_of(server, "oa")
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=24,
    )
    text = reply.choices[0].message.content
    assert text and "Paris" in text
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage is not None and reply.usage.completion_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # Metered as the agent whose token it used.
    calls, tokens = usage_of(server, "oa")
    assert calls >= before[0] + 1 and tokens >= reply.usage.completion_tokens


def test_stream_equals_the_unstreamed_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    whole = client.chat.completions.create(
        model="smollm2",
        messages=messages,
        temperature=0,
        max_tokens=32,  # type: ignore[arg-type]
    )
    pieces = []
    usage = None
    for chunk in client.chat.completions.create(
        model="smollm2",
        messages=messages,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=32,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
    assert len([p for p in pieces if p]) > 3  # really streamed, token by token
    assert "".join(pieces) == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_tool_call(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        temperature=0,
        max_tokens=64,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and calls[0].function.name == "get_weather"  # type: ignore[union-attr]
    arguments = json.loads(calls[0].function.arguments)  # type: ignore[union-attr]
    assert isinstance(arguments.get("city"), str) and arguments["city"]

    # The tool's result goes back; with tool_choice none the model answers in text.
    follow = client.chat.completions.create(
        model="smollm2",
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": calls[0].id, "content": "Sunny, 24 C"},
        ],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        temperature=0,
        max_tokens=40,
    )
    assert follow.choices[0].message.content
    assert not follow.choices[0].message.tool_calls


def test_tool_choice_auto_is_always_well_formed(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Weather in Rome, please."}],
        tools=[WEATHER],  # type: ignore[list-item]
        temperature=0,
        max_tokens=64,
    )
    message = reply.choices[0].message
    if message.tool_calls:  # the model chose the tool: the call is valid
        assert message.tool_calls[0].function.name == "get_weather"  # type: ignore[union-attr]
        assert "city" in json.loads(message.tool_calls[0].function.arguments)  # type: ignore[union-attr]
    else:  # it answered: plain text content, not the JSON envelope
        assert message.content and not message.content.lstrip().startswith('{"content"')


def test_json_mode(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give a JSON object with a name and an age."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
    )
    assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_json_schema(client: openai.OpenAI) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
        "required": ["city", "population"],
    }
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "The largest city of Japan, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        temperature=0,
        max_tokens=64,
    )
    answer = json.loads(reply.choices[0].message.content or "")
    assert isinstance(answer["city"], str) and isinstance(answer["population"], int)


def test_errors_are_openai_errors(client: openai.OpenAI, server: BackgroundServer) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "x"}], max_tokens=100_000
        )
    assert "max_tokens" in str(bad.value)
    stranger = openai.OpenAI(base_url=f"{server.url}/v1", api_key="aios_not_a_real_token")
    with stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()


def test_langchain_agent_runs_unchanged(server: BackgroundServer) -> None:
    """A small LangChain tool-using agent, with only base_url and api_key pointed at aios."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return f"It is sunny and 24 C in {city}."

    llm = ChatOpenAI(
        model="gpt-4o-mini",  # any name: aios serves it with its default core
        base_url=f"{server.url}/v1",
        api_key=new_agent(server, "langchain"),  # type: ignore[arg-type]
        temperature=0,
        max_tokens=64,  # type: ignore[call-arg]
    )
    agent = llm.bind_tools([get_weather], tool_choice="get_weather")
    messages: list = [HumanMessage("What is the weather in Paris?")]
    step = agent.invoke(messages)
    assert step.tool_calls and step.tool_calls[0]["name"] == "get_weather"
    messages.append(step)
    for call in step.tool_calls:
        result = get_weather.invoke(call["args"])
        messages.append(ToolMessage(result, tool_call_id=call["id"]))
    final = llm.invoke(messages)
    assert isinstance(final.content, str) and final.content.strip()
    calls, tokens = usage_of(server, "langchain")
    assert calls == 2 and tokens > 0  # both calls scheduled and metered as this agent


TINY = [  # the attack run's requests that aborted the kernel (constrained JSON, t ~ 1e-40)
    ("/api/v1/llm/chat", {"messages": [{"role": "user", "content": "Give me a JSON object."}],
                          "json": True, "temperature": 1e-40, "max_tokens": 8}),
    ("/api/v1/llm/chat", {"messages": [{"role": "user", "content": "A person as JSON."}],
                          "json_schema": {"type": "object",
                                          "properties": {"n": {"type": "string"}}},
                          "temperature": 1e-40, "max_tokens": 8}),
    ("/api/v1/llm/complete", {"prompt": "JSON:", "json": True, "temperature": 1e-42,
                              "max_tokens": 8}),
    ("/v1/chat/completions", {"model": "smollm2", "temperature": 1e-40, "max_tokens": 8,
                              "messages": [{"role": "user", "content": "Give me a JSON object."}],
                              "response_format": {"type": "json_object"}}),
    ("/v1/chat/completions", {"model": "smollm2", "temperature": 1e-40, "max_tokens": 16,
                              "messages": [{"role": "user", "content": "Weather in Paris?"}],
                              "tools": [WEATHER]}),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body"), TINY)
def test_a_temperature_too_small_to_sample_from_is_greedy_on_every_route(
    server: BackgroundServer, path: str, body: dict[str, object]
) -> None:
    token = new_agent(server, f"tiny-{len(path)}-{len(json.dumps(body))}")
    headers = {"authorization": f"Bearer {token}"}
    answered = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)
    assert answered.status_code == 200, answered.text
    assert _answer(answered.json())  # an answer, under the grammar, from greedy decoding
    alive = httpx.get(f"{server.url}/api/v1/cores", headers=headers, timeout=10)
    assert alive.status_code == 200 and alive.json()[0]["queued"] == 0


def _answer(body: dict[str, object]) -> object:
    if "choices" in body:
        (choice,) = body["choices"]  # type: ignore[misc]
        return choice["message"]
    return body["result"]["text"]  # type: ignore[index]
