"""What a tool is: a typed callable with a JSON Schema of its parameters (from pydantic), a
description, a concurrency limit, a timeout and MCP-style annotations.

    @tool(concurrency=2, timeout=5.0, read_only=True)
    def add(a: float, b: float) -> float:
        '''Add two numbers.'''
        return a + b

A parameter annotated :class:`ToolContext` is not part of the schema: the manager passes the
calling agent's context (its identity, and syscalls made as that agent).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, create_model

from aios.errors import ConfigError
from aios.llm.toolcalls import Tool

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ToolContext:
    """The calling agent, as a tool sees it: its identity and its own syscalls (memory and
    storage, access-checked as that agent)."""

    agent: str
    call: Callable[[str, str, dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Annotations:
    """Hints, as in MCP: only reads; may destroy data; reaches the world outside aios."""

    read_only: bool = False
    destructive: bool = False
    open_world: bool = False

    def to_json(self) -> dict[str, bool]:
        return {
            "readOnlyHint": self.read_only,
            "destructiveHint": self.destructive,
            "openWorldHint": self.open_world,
        }


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    params: type[BaseModel] | None  # the arguments' model (its JSON Schema is the parameters)
    fn: Callable[..., Any]
    concurrency: int = 4  # calls running at once; more wait their turn (never dropped)
    timeout: float = 30.0  # seconds per call
    annotations: Annotations = field(default_factory=Annotations)
    context: str | None = None  # the name of the ToolContext parameter, if any
    source: str = "builtin"  # builtin, entry point, or mcp:SERVER
    json_schema: dict[str, Any] | None = None  # instead of ``params`` (tools from MCP servers)

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise ConfigError(f"tool name must be 1-64 of [A-Za-z0-9_-], got {self.name!r}")
        if not 1 <= self.concurrency <= 1024:
            raise ConfigError(f"tool {self.name!r}: concurrency must be in [1, 1024]")
        if not self.timeout > 0:
            raise ConfigError(f"tool {self.name!r}: timeout must be > 0 seconds")

    @property
    def schema(self) -> dict[str, Any]:
        if self.params is None:
            return dict(self.json_schema or {"type": "object", "properties": {}})
        schema = self.params.model_json_schema()
        schema.pop("title", None)
        return schema

    def openai(self) -> dict[str, Any]:
        """The tool in the OpenAI ``tools`` format."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.schema,
            },
        }

    def llm_tool(self) -> Tool:
        """The tool as the LLM's constrained tool-call emulation takes it."""
        import json

        return Tool(self.name, self.description, json.dumps(self.schema))

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "parameters": self.schema,
            "concurrency": self.concurrency,
            "timeout": self.timeout,
            "annotations": self.annotations.to_json(),
            "source": self.source,
        }


def tool(
    name: str | None = None,
    *,
    description: str | None = None,
    concurrency: int = 4,
    timeout: float = 30.0,
    read_only: bool = False,
    destructive: bool = False,
    open_world: bool = False,
) -> Callable[[Callable[..., Any]], ToolSpec]:
    """Make a :class:`ToolSpec` of a function (sync or async) from its signature and
    docstring; every parameter needs a type annotation."""

    def build(fn: Callable[..., Any]) -> ToolSpec:
        hints = get_type_hints(fn)
        fields: dict[str, Any] = {}
        context = None
        for param in inspect.signature(fn).parameters.values():
            hint = hints.get(param.name)
            if hint is ToolContext:
                context = param.name
                continue
            if hint is None:
                raise ConfigError(f"tool {fn.__name__}: parameter {param.name!r} needs a type")
            default = ... if param.default is inspect.Parameter.empty else param.default
            fields[param.name] = (hint, default)
        params = create_model(
            f"{fn.__name__}_params", __config__=ConfigDict(extra="forbid"), **fields
        )
        doc = inspect.getdoc(fn) or ""
        return ToolSpec(
            name=name or fn.__name__,
            description=description or doc.strip(),
            params=params,
            fn=fn,
            concurrency=concurrency,
            timeout=timeout,
            annotations=Annotations(read_only, destructive, open_world),
            context=context,
        )

    return build
