"""ReAct agents: think -> call tools -> read the results -> answer, on the embedded model.

Each step is one LLM call whose output is constrained to JSON that is either tool calls (names
and arguments valid for the agent's tools, by construction) or a final answer; tool calls of
one step run in parallel as tool syscalls, and their results (or errors) go back to the model.
The last allowed step may only answer. A 135M model cannot be trusted to decide well when to
stop, so the step budget is small and the prompts are short.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any, ClassVar

from aios.errors import AIOSError
from aios.llm.toolcalls import Tool, ToolCall, answer_schema, instructions, parse_answer
from aios.sdk import Agent

ANSWER_ONLY = {
    "type": "object",
    "properties": {"content": {"type": "string"}},
    "required": ["content"],
    "additionalProperties": False,
}


class ReActAgent(Agent):
    """Subclass: set ``name``, ``uses`` (tool names), ``persona``; ``run`` does the loop."""

    uses: ClassVar[tuple[str, ...]] = ()
    persona: ClassVar[str] = "You are a helpful assistant."
    example: ClassVar[str] = ""  # a worked example for the system prompt (small models need it)
    # Narrower parameter schemas for the model (a subset of what the tool accepts: the tool
    # still validates every call against its own schema).
    narrow: ClassVar[dict[str, dict[str, Any]]] = {}
    max_calls: ClassVar[int] = 2  # tool calls per step
    max_steps: ClassVar[int] = 3
    max_tokens: ClassVar[int] = 96

    async def run(self, task: str) -> str:
        listed = {t["name"]: t for t in await self.tools.list()}
        tools = tuple(
            Tool(
                name,
                listed[name]["description"],
                json.dumps(self.narrow.get(name, listed[name]["parameters"])),
            )
            for name in self.uses
        )
        system = "\n".join(filter(None, [self.persona, instructions(tools, "auto"), self.example]))
        messages: list[dict[str, str]] = [
            {"role": "system", "content": system},
            {"role": "user", "content": task},
        ]
        self.trace: list[dict[str, Any]] = []
        for step in range(self.max_steps):
            last = step == self.max_steps - 1
            schema = (
                ANSWER_ONLY if last else json.loads(answer_schema(tools, "auto", self.max_calls))
            )
            reply = await self.llm.chat(messages, json_schema=schema, max_tokens=self.max_tokens)
            content, calls = parse_answer(reply.text)
            if not calls:
                self.trace.append({"answer": content})
                return (content or "").strip()
            results = await asyncio.gather(*(self._call(c) for c in calls))
            self.trace.append({"calls": [c.__dict__ for c in calls], "results": results})
            messages.append({"role": "assistant", "content": reply.text})
            observed = "\n".join(
                f"{c.name}({json.dumps(c.arguments)}) = {r}"
                for c, r in zip(calls, results, strict=True)
            )
            messages.append(
                {"role": "user", "content": f"Tool results:\n{observed}\nNow answer the question."}
            )
        return ""  # unreachable: the last step can only answer

    async def _call(self, call: ToolCall) -> str:
        try:
            return json.dumps(await self.tools.call(call.name, **call.arguments))
        except AIOSError as e:  # the model sees the error and may correct itself
            return f"error: {e}"


class MathAgent(ReActAgent):
    """Answers arithmetic questions with the calculator (SmolLM2's own arithmetic is wrong)."""

    name = "math"
    description = "answers arithmetic word problems, computing with the calculator tool"
    uses = ("calculator",)
    persona = "You solve arithmetic. Always compute with the calculator, never in your head."
    example = (
        "Example. Question: What is 12 * 7?\n"
        'You: {"tool_calls": [{"name": "calculator", "arguments": {"expression": "12 * 7"}}]}\n'
        "Tool results: calculator = 84\n"
        'You: {"content": "84"}'
    )
    narrow: ClassVar[dict[str, dict[str, Any]]] = {
        "calculator": {
            "type": "object",
            "properties": {
                "expression": {"type": "string", "pattern": "^[0-9][0-9 +*/().-]{0,60}$"}
            },
            "required": ["expression"],
            "additionalProperties": False,
        }
    }
    max_calls = 1
    tasks: ClassVar[tuple[str, ...]] = (
        "What is 347 * 29?",
        "What is 1234 + 5678?",
        "What is 9876 - 5432?",
        "What is 144 / 12?",
    )


class FileAgent(ReActAgent):
    """Keeps notes in its storage: writes a file, then reads it back to answer."""

    name = "filer"
    description = "saves text to a file in its storage and reads it back"
    uses = ("write_file", "read_file")
    persona = "You manage files. Use the tools to write and read files."
    example = (
        "Example. Question: Save 'call mom' in the file note.txt, then read note.txt.\n"
        'You: {"tool_calls": [{"name": "write_file", "arguments": '
        '{"path": "note.txt", "content": "call mom"}}]}\n'
        'Tool results: write_file = {"path": "note.txt", "size": 8, "version": 1}\n'
        'You: {"tool_calls": [{"name": "read_file", "arguments": {"path": "note.txt"}}]}\n'
        'Tool results: read_file = "call mom"\n'
        'You: {"content": "note.txt contains: call mom"}'
    )
    narrow: ClassVar[dict[str, dict[str, Any]]] = {
        name: {
            "type": "object",
            "properties": {
                "path": {"type": "string", "pattern": "^[a-z0-9_-]{1,20}[.]txt$"},
                **({"content": {"type": "string"}} if name == "write_file" else {}),
            },
            "required": ["path", "content"] if name == "write_file" else ["path"],
            "additionalProperties": False,
        }
        for name in ("write_file", "read_file")
    }
    max_calls = 1
    max_steps = 4
    tasks: ClassVar[tuple[str, ...]] = (
        "Save 'buy milk' in the file todo.txt, then read todo.txt.",
    )


def number_in(text: str) -> float | None:
    """The last number in ``text`` (commas allowed), or None."""
    found = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None
