"""Tool calling on any core, including small models that were never trained for it.

A call with tools becomes a JSON-constrained call: the tools are described in a system
message, and the output must match a JSON Schema (compiled to a grammar on the embedded core)
that admits exactly ``{"tool_calls": [{"name": <a tool>, "arguments": <its parameters>}]}`` or,
when the model may answer directly, ``{"content": "..."}``. The answer is then always valid JSON
whose tool names exist and whose arguments match each tool's schema, whatever the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aios.errors import InvalidRequest

MAX_CALLS = 4  # tool calls the model may make in one answer


@dataclass(frozen=True)
class Tool:
    name: str
    description: str = ""
    parameters: str = '{"type": "object", "properties": {}}'  # a JSON Schema, serialized


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def answer_schema(tools: tuple[Tool, ...], choice: str | None, max_calls: int = MAX_CALLS) -> str:
    """The JSON Schema of an answer. ``choice``: ``"auto"`` (call tools or answer),
    ``"required"`` (call at least one tool) or the name of the one tool to call; at most
    ``max_calls`` calls in one answer."""
    if not tools:
        raise InvalidRequest("tools must not be empty")
    chosen = tools
    named = choice not in ("auto", "required")
    if named:
        chosen = tuple(t for t in tools if t.name == choice)
        if not chosen:
            raise InvalidRequest(f"tool_choice names {choice!r}, which is not in tools")
    calls = {
        "type": "object",
        "properties": {
            "tool_calls": {
                "type": "array",
                "minItems": 1,
                "maxItems": 1
                if len(chosen) == 1 and choice not in ("auto", "required")
                else max_calls,
                "items": {"anyOf": [_call_schema(t) for t in chosen]},
            }
        },
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if choice != "auto":
        return json.dumps(calls)
    content = {
        "type": "object",
        "properties": {"content": {"type": "string"}},
        "required": ["content"],
        "additionalProperties": False,
    }
    return json.dumps({"anyOf": [calls, content]})


def _call_schema(tool: Tool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": json.loads(tool.parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def instructions(tools: tuple[Tool, ...], choice: str | None) -> str:
    """The system text that tells the model its tools and the answer format."""
    lines = ["You can call these tools:"]
    for tool in tools:
        params = json.loads(tool.parameters).get("properties", {})
        args = ", ".join(f"{name}: {spec.get('type', 'any')}" for name, spec in params.items())
        desc = f": {tool.description}" if tool.description else ""
        lines.append(f"- {tool.name}({args}){desc}")
    example = '{"tool_calls": [{"name": "TOOL", "arguments": {...}}]}'
    if choice == "auto":
        lines.append(f"Answer with JSON only: {example} to call tools, or ")
        lines[-1] += '{"content": "your answer"} to answer directly.'
    elif choice == "required":
        lines.append(f"Answer with JSON only: {example}")
    else:
        lines.append(f"Call the tool {choice} now. Answer with JSON only: {example}")
    return "\n".join(lines)


def parse_answer(text: str) -> tuple[str | None, list[ToolCall]]:
    """Split a constrained answer into (content, tool calls). Text that is not a complete
    answer (output cut off by ``max_tokens``) is returned as content."""
    try:
        answer = json.loads(text)
    except ValueError:
        return text, []
    if not isinstance(answer, dict):
        return text, []
    calls = answer.get("tool_calls")
    if isinstance(calls, list):
        parsed = [
            ToolCall(c["name"], c["arguments"])
            for c in calls
            if isinstance(c, dict)
            and isinstance(c.get("name"), str)
            and isinstance(c.get("arguments"), dict)
        ]
        return None, parsed
    content = answer.get("content")
    return (content if isinstance(content, str) else text), []
