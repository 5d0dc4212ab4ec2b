"""Built-in tools: a calculator (safe: an expression tree walked by hand, never ``eval``), the
current time, the calling agent's own files and notes (through the storage and memory
managers, access-checked as that agent), and Python in the sandbox. None of them reaches the
network."""

from __future__ import annotations

import ast
import asyncio
import datetime
import logging
import math
import operator
from collections.abc import Callable, Iterable
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aios.tools.sandbox import Limits, Sandbox, python_argv
from aios.tools.spec import ToolContext, ToolSpec, tool

log = logging.getLogger(__name__)

MAX_EXPRESSION = 500
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e300

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {
    ast.UAdd: operator.pos,
    ast.USub: operator.neg,
}
_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max, "log": math.log,
    "log10": math.log10, "exp": math.exp, "sin": math.sin, "cos": math.cos, "tan": math.tan,
    "floor": math.floor, "ceil": math.ceil,
}  # fmt: skip
_CONSTANTS = {"pi": math.pi, "e": math.e}


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % **, parentheses, the
    functions and constants above. Anything else is a ValueError saying what."""
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"the expression is longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.replace("^", "**").replace("×", "*"), mode="eval")
    except SyntaxError:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from None
    value: int | float = _eval(tree.body)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is not a finite number")
    return value


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and (
            abs(right) > MAX_EXPONENT
            or (abs(left) > 1 and abs(right) * math.log10(abs(left)) > 300)
        ):
            raise ValueError("the power is too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        if abs(value) > MAX_MAGNITUDE:
            raise ValueError("the result is too large")
        return value
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in _FUNCTIONS
        and not node.keywords
        and len(node.args) <= 4
    ):
        try:
            return _FUNCTIONS[node.func.id](*(_eval(a) for a in node.args))
        except (OverflowError, TypeError) as e:
            raise ValueError(f"{node.func.id}: {e}") from None
    raise ValueError(f"not allowed in an expression: {ast.unparse(node)!r}")


def calculator(expression: str) -> int | float:
    """Evaluate an arithmetic expression exactly, e.g. "12*7" or "sqrt(2)/3". Use it for any
    arithmetic instead of guessing."""
    return evaluate(expression)


def current_time(timezone: str = "UTC") -> str:
    """The current date and time (ISO 8601) in an IANA timezone such as "Europe/Paris"."""
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {timezone!r}") from None
    return datetime.datetime.now(zone).isoformat(timespec="seconds")


async def read_file(path: str, ctx: ToolContext) -> str:
    """Read one of your text files."""
    found = await ctx.call("storage", "read", {"path": path})
    return bytes(found["content"]).decode(errors="replace")


async def write_file(path: str, content: str, ctx: ToolContext) -> dict[str, Any]:
    """Write (create or overwrite) one of your text files; the old version stays in its
    history."""
    stat: dict[str, Any] = await ctx.call("storage", "write", {"path": path, "content": content})
    return {"path": stat["path"], "size": stat["size"], "version": stat["version"]}


async def list_files(ctx: ToolContext, path: str = "") -> list[str]:
    """List one of your folders (the root by default)."""
    entries = await ctx.call("storage", "ls", {"path": path})
    return [e["path"] + ("/" if e["kind"] == "dir" else "") for e in entries]


async def remember(text: str, ctx: ToolContext) -> int:
    """Save a note in your memory; its id."""
    note = await ctx.call("memory", "add", {"text": text})
    return int(note["id"])


async def recall(query: str, ctx: ToolContext, limit: int = 3) -> list[str]:
    """Your notes most relevant to a query."""
    hits = await ctx.call("memory", "search", {"query": query, "limit": limit})
    return [hit["note"]["text"] for hit in hits]


def python_tool(
    limits: Limits | None = None, sandbox: Sandbox | None = None, hidden: Iterable[str] = ()
) -> ToolSpec:
    """The sandboxed Python tool. The sandbox is ``sandbox``, else detected on the first call;
    ``hidden``: more paths code must never see (besides :func:`default_hidden`'s)."""
    limits = limits or Limits()
    found: list[Sandbox] = [sandbox] if sandbox else []
    secret = tuple(hidden)

    async def python(code: str) -> dict[str, object]:
        """Run Python 3 code in a sandbox (no network, a minimal read-only system, a private
        scratch folder, CPU/memory/process/time limits) and get its exit code, stdout and
        stderr. Print what you want to see."""
        if not found:
            found.append(await asyncio.to_thread(Sandbox.detect, secret))
            level = logging.INFO if found[0].enabled else logging.WARNING
            log.log(level, "sandbox for code tools: %s", found[0].describe())
        return (await found[0].run(python_argv(code), limits)).to_json()

    return tool(concurrency=2, timeout=limits.wall_seconds + 5)(python)


def builtin_tools(hidden: Iterable[str] = ()) -> list[ToolSpec]:
    """The built-in tools, with their limits and annotations; ``hidden``: paths the code tools
    must never see (the kernel's data directory, database and spill directories)."""
    return [
        tool(concurrency=64, timeout=2.0, read_only=True)(calculator),
        tool(concurrency=64, timeout=1.0, read_only=True)(current_time),
        tool(read_only=True, timeout=10.0)(read_file),
        tool(timeout=10.0)(write_file),  # not destructive: the old version stays in history
        tool(read_only=True, timeout=10.0)(list_files),
        tool(timeout=10.0)(remember),
        tool(read_only=True, timeout=10.0)(recall),
        python_tool(hidden=hidden),
    ]
