"""The OpenAI-compatible API's request body, and how a chat completion request becomes an
LLM syscall and its completion an assistant message (the routes, ``GET /v1/models`` and
``POST /v1/chat/completions``, are :mod:`aios.server.routes.openai`).

Any OpenAI client or agent framework works unchanged with ``base_url=http://HOST:PORT/v1`` and
an agent token as ``api_key``: its calls are LLM syscalls of that agent, scheduled, metered and
access-checked like any other. Differences from OpenAI, all deliberate:

- ``model``: a core name; an unknown name is served by the default core (the response's
  ``model`` says which), unless the server sets ``strict_models``.
- ``tools``: emulated on every core (:mod:`aios.llm.toolcalls`): the output is constrained to a
  valid call of a listed tool, so even a 135M model never emits a malformed call. Tool results
  go back to the model as user turns; with tools, content is not streamed token by token.
- ``priority`` (an extension): a scheduling hint for the ``priority`` policy.
- ``n > 1``, ``logprobs`` and non-text content parts are rejected with 400.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aios.errors import InvalidRequest
from aios.llm.toolcalls import Tool, answer_schema, instructions, parse_answer
from aios.syscall import Completion, LLMCall, Message, SamplingParams


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields aios does not use


class ContentPart(_Open):
    type: str
    text: str | None = None


class FunctionCall(_Open):
    name: str
    arguments: str


class ToolCallIn(_Open):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(_Open):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolDef(_Open):
    type: Literal["function"]
    function: FunctionDef


class ToolName(_Open):
    name: str


class NamedToolChoice(_Open):
    type: Literal["function"]
    function: ToolName


class JSONSchemaFormat(_Open):
    name: str = "output"
    schema_: dict[str, Any] = Field(alias="schema")


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(_Open):
    include_usage: bool = False


class ChatCompletionIn(_Open):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=10)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    logprobs: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    response_format: ResponseFormat | None = None
    priority: int = Field(0, ge=-1000, le=1000, description="aios: priority policy hint")


class Plan:
    """A chat completion request as a syscall: the call, and how to read its answer."""

    def __init__(self, body: ChatCompletionIn, model: str) -> None:
        if body.n != 1:
            raise InvalidRequest("n must be 1 (one choice per request)")
        if body.logprobs:
            raise InvalidRequest("logprobs are not supported")
        self.body = body
        self.model = model
        tools = tuple(
            Tool(t.function.name, t.function.description, json.dumps(t.function.parameters))
            for t in body.tools or ()
        )
        choice = body.tool_choice
        self.choice: str | None = (
            None
            if not tools or choice == "none"
            else "auto"
            if choice is None
            else choice
            if isinstance(choice, str)
            else choice.function.name
        )
        messages = _messages(body.messages)
        fmt = body.response_format
        schema: str | None = None
        if self.choice is not None:
            schema = answer_schema(tools, self.choice)
            note = instructions(tools, self.choice)
            if messages and messages[0].role == "system":
                messages[0] = Message("system", f"{messages[0].content}\n\n{note}")
            else:
                messages.insert(0, Message("system", note))
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise InvalidRequest("response_format json_schema needs a 'json_schema' object")
            schema = json.dumps(fmt.json_schema.schema_)
        stop = body.stop
        self.call = LLMCall(
            messages=tuple(messages),
            model=model,
            params=SamplingParams(
                max_tokens=body.max_completion_tokens or body.max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=body.seed,
                stop=() if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
                json=fmt is not None and fmt.type == "json_object",
                json_schema=schema,
            ),
        )

    @property
    def tools(self) -> bool:
        return self.choice is not None

    def message(self, completion: Completion) -> tuple[dict[str, Any], str]:
        """The assistant message and finish reason of a completion."""
        text, reason = completion.text, str(completion.finish_reason)
        if not self.tools:
            return {"role": "assistant", "content": text}, reason
        content, calls = parse_answer(text)
        message: dict[str, Any] = {"role": "assistant", "content": content}
        if calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{completion.syscall_id.removeprefix('sc-')}_{i}",
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
                }
                for i, c in enumerate(calls)
            ]
            reason = "tool_calls"
        return message, reason


def _messages(history: list[ChatMessage]) -> list[Message]:
    """OpenAI messages as the kernel's: developer -> system, text parts joined, an assistant's
    tool calls as the JSON it answered with, tool results as user turns naming the tool."""
    names: dict[str, str] = {}
    out: list[Message] = []
    for m in history:
        text = _text(m.content)
        if m.role == "assistant" and m.tool_calls:
            calls = []
            for call in m.tool_calls:
                names[call.id] = call.function.name
                try:
                    arguments = json.loads(call.function.arguments)
                except ValueError:
                    raise InvalidRequest(
                        f"tool call {call.id!r}: arguments must be a JSON string"
                    ) from None
                calls.append({"name": call.function.name, "arguments": arguments})
            out.append(Message("assistant", json.dumps({"tool_calls": calls})))
        elif m.role == "tool":
            name = names.get(m.tool_call_id or "", "a tool")
            out.append(Message("user", f"Result of {name}: {text}"))
        else:
            role = "system" if m.role == "developer" else m.role
            out.append(Message(role, text))
    return out


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise InvalidRequest(f"only text content parts are supported, got {part.type!r}")
        parts.append(part.text)
    return "".join(parts)
