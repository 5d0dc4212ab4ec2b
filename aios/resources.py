"""Memory and storage syscalls: one request object per call, one table of operations, and
their results as JSON values (plus ``bytes`` for file content).

    resources = Resources(config.storage, config.memory)
    await resources.start()
    write = resources.prepare("storage", "write", {"path": "a.txt", "content": "hi"})
    stat = await write.run(principal, Job())

:meth:`Resources.prepare` checks and binds the arguments once (an unknown operation or
arguments that do not fit raise before anything runs); the kernel then decides on the call and
runs it as a :class:`ResourceCall` (queued, timed, in the process table, cancellable), exactly
as it wraps an LLM call in an ``LLMRequest``.
"""

from __future__ import annotations

import inspect
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from aios.config import MemoryConfig, StorageConfig
from aios.errors import InvalidRequest, NotFound
from aios.identity import check_name
from aios.memory.manager import MemoryManager
from aios.storage.db import Database, Job
from aios.storage.files import Files, Principal
from aios.syscall import Status, Syscall
from aios.tools.builtin import builtin_tools
from aios.tools.manager import ToolManager
from aios.tools.registry import ToolRegistry
from aios.tools.spec import ToolContext

Kind = Literal["memory", "storage", "tools"]
KINDS: tuple[Kind, ...] = ("memory", "storage", "tools")
Op = Callable[..., Awaitable[Any]]

# operation -> the manager's method
MEMORY_OPS = {op: op for op in ("add", "get", "update", "delete", "search", "remember", "history",
                                "forget", "usage")} | {"list": "list_notes"}  # fmt: skip
TOOL_OPS = ("call", "list")
STORAGE_OPS = ("write", "read", "stat", "ls", "delete", "mkdir", "move", "history", "rollback",
               "share", "unshare", "shares", "search", "usage")  # fmt: skip


class ResourceCall(Syscall):
    """A memory, storage or tool syscall: ``kind`` "memory", "storage" or "tools", ``op`` the
    operation. One future (the caller's, :attr:`future`), one deadline (its :attr:`job`'s, what
    the worker that runs it sees) and one set of timings: the job's start is the call's
    admission."""

    def __init__(
        self,
        agent: str,
        now: float,
        kind: str,
        op: str,
        *,
        deadline: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        resource: str = "",
    ) -> None:
        super().__init__(agent, now)
        self.kind = kind
        self.op = op
        self.job = Job(deadline, clock)
        self.resource = resource  # what it touches, for the audit log (see target)
        self.decision = "allowed"  # the access manager's: allowed, exempt, approved, rejected

    @property
    def deadline(self) -> float | None:
        return self.job.deadline

    @property
    def started(self) -> bool:
        """A worker took it: cancelled now, it may still have been applied."""
        return self.job.started is not None

    def cancel(self, now: float) -> None:
        """The caller gets :class:`SyscallCancelled`; a call no worker took never runs."""
        self.job.withdrawn = True
        super().cancel(now)

    def _end(self, status: Status, now: float) -> None:
        self.timings.admitted = self.job.started
        super()._end(status, now)


@dataclass(frozen=True)
class Operation:
    """One memory, storage or tool operation with its arguments checked and bound."""

    kind: str
    name: str
    fn: Op
    bound: inspect.BoundArguments

    async def run(self, who: Principal, job: Job, context: ToolContext | None = None) -> Any:
        """Its result as JSON values (and bytes). A tool call gets the ``context`` the kernel
        made for its caller, whose own syscalls go through the access check again."""
        extra = {"context": context} if (self.kind, self.name) == ("tools", "call") else {}
        return jsonable(await self.fn(who, *self.bound.args, job=job, **self.bound.kwargs, **extra))


class Resources:
    """The database, and the memory and storage managers on it."""

    def __init__(
        self,
        storage: StorageConfig,
        memory: MemoryConfig,
        tools: ToolRegistry | None = None,
        *,
        hidden: Iterable[str] = (),
    ) -> None:
        """``hidden``: paths the built-in code tools must never show (besides the database's
        directory); used when ``tools`` is not given."""
        self._tmp: Path | None = None
        url = storage.database
        if not url:  # a real SQLite database, private to this kernel's lifetime (created at start)
            self._tmp = Path(tempfile.gettempdir()) / f"aios-db-{secrets.token_hex(8)}"
            url = str(self._tmp / "aios.db")
        self.db = Database.open(
            url, workers=storage.workers or None, synchronous=storage.sqlite_synchronous
        )
        self.files = Files(storage)
        self.memory = MemoryManager(self.db, memory)
        secret = [*hidden, *([str(self.db.path.parent)] if self.db.path is not None else [])]
        self.tools = ToolManager(tools or ToolRegistry(builtin_tools(secret)))
        self._ops: dict[tuple[str, str], Op] = {}

    @property
    def ephemeral(self) -> bool:
        """The database goes away with the kernel (no ``storage.database`` configured)."""
        return self._tmp is not None

    async def start(self) -> None:
        await self.db.start()

    async def close(self) -> None:
        self.tools.close()
        await self.db.close()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def op(self, kind: str, name: str) -> Op:
        """The coroutine function of ``kind``.``name`` (who first, then the arguments), built
        once per operation (the kernel looks it up twice per syscall: check, then call)."""
        found = self._ops.get((kind, name))
        if found is None:
            found = self._ops[kind, name] = self._build(kind, name)
        return found

    def _build(self, kind: str, name: str) -> Op:
        if kind == "memory" and name in MEMORY_OPS:
            method = getattr(self.memory, MEMORY_OPS[name])

            async def memory_op(who: Principal, *args: Any, job: Job, **kwargs: Any) -> Any:
                return await method(who.name, *args, job=job, **kwargs)

            memory_op.__signature__ = _tail(inspect.signature(method))  # type: ignore[attr-defined]
            return memory_op
        if kind == "storage" and name in STORAGE_OPS:
            method = getattr(self.files, name)
            db = self.db

            async def storage_op(who: Principal, *args: Any, job: Job, **kwargs: Any) -> Any:
                return await db.run(lambda conn: method(conn, who, *args, **kwargs), job)

            storage_op.__signature__ = _tail(inspect.signature(method))  # type: ignore[attr-defined]
            return storage_op
        if kind == "tools" and name in TOOL_OPS:
            return self._tool_op(name)
        ops = {"memory": tuple(MEMORY_OPS), "storage": STORAGE_OPS, "tools": TOOL_OPS}.get(kind, ())
        if not ops:
            raise NotFound(f"no syscall kind {kind!r}; kinds: {', '.join(KINDS)}")
        raise NotFound(f"no {kind} operation {name!r}; operations: {', '.join(ops)}")

    def _tool_op(self, name: str) -> Op:
        tools = self.tools
        if name == "list":

            async def list_tools(who: Principal, *, job: Job) -> Any:
                return tools.list()

            list_tools.__signature__ = _tail(inspect.signature(list_tools))  # type: ignore[attr-defined]
            return list_tools

        async def call_tool(
            who: Principal,
            name: str,
            arguments: dict[str, Any] | None = None,
            *,
            job: Job,
            context: ToolContext,
        ) -> Any:
            return await tools.call(context, name, arguments, job)

        call_tool.__signature__ = _tail(inspect.signature(call_tool))  # type: ignore[attr-defined]
        return call_tool

    def prepare(self, kind: str, name: str, args: Any) -> Operation:
        """``kind``.``name`` with ``args`` bound, ready to run; raises, and nothing runs, for an
        unknown operation or arguments that do not fit it (the kernel prepares a call before
        deciding on it or asking anyone)."""
        fn = self.op(kind, name)
        bound = bind(f"{kind}.{name}", fn, args)
        if kind == "storage":
            owner = bound.arguments.get("owner")
            if owner is not None:
                check_name(owner, "owner")
            if name == "write":
                bound.arguments["content"] = content(bound.arguments.get("content"))
        return Operation(kind, name, fn, bound)

    async def call(
        self,
        who: Principal,
        kind: str,
        name: str,
        args: dict[str, Any],
        job: Job,
        context: ToolContext | None = None,
    ) -> Any:
        """Prepare and run one operation, without the kernel (its tests and benchmarks)."""
        return await self.prepare(kind, name, args).run(who, job, context)


def target(kind: str, op: str, args: dict[str, Any]) -> str:
    """What a memory, storage or tool call touches, for the audit log (never content)."""
    if not isinstance(args, dict):
        return ""
    if kind == "tools":
        return str(args.get("name", ""))[:100]
    owner = args.get("owner")
    place = args.get("path", args.get("src", ""))
    if "dst" in args:
        place = f"{place} -> {args['dst']}"
    if kind == "memory":
        place = args.get("id", "")
    text = str(place)[:200]
    return f"{owner}:{text}" if owner else text


def _tail(signature: inspect.Signature) -> inspect.Signature:
    """An operation's parameters as a caller gives them (without conn/who/owner-self/job)."""
    params = list(signature.parameters.values())
    skip = {"self", "conn", "who", "job", "context"}
    if params and params[0].name == "owner" and params[0].default is inspect.Parameter.empty:
        params = params[1:]  # memory: the owner is always the caller
    return signature.replace(parameters=[p for p in params if p.name not in skip])


def bind(name: str, fn: Op, args: Any) -> inspect.BoundArguments:
    """``args`` bound to ``fn``'s parameters, or a clear error naming what is wrong."""
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise InvalidRequest(f"{name}: arguments must be an object")
    signature = inspect.signature(fn)
    allowed = [
        p for p in signature.parameters if p not in ("who", "args", "kwargs", "job", "context")
    ]
    extra = sorted(set(args) - set(allowed))
    if extra:
        raise InvalidRequest(
            f"{name}: unknown argument(s) {', '.join(extra)}; it takes {', '.join(allowed)}"
        )
    try:
        return signature.bind(**args)
    except TypeError as e:
        raise InvalidRequest(f"{name}: {e}; it takes {', '.join(allowed)}") from None


def content(value: Any) -> bytes:
    """File content: bytes, text (stored as UTF-8), or ``{"base64": ...}`` from JSON."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return value.encode()
        except UnicodeEncodeError:
            raise InvalidRequest("content is not valid Unicode (a lone surrogate)") from None
    if isinstance(value, dict) and set(value) == {"base64"} and isinstance(value["base64"], str):
        import base64
        import binascii

        try:
            return base64.b64decode(value["base64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("content.base64 is not valid base64") from None
    raise InvalidRequest("content must be text, bytes, or {'base64': '...'}")


def jsonable(value: Any) -> Any:
    """Results as JSON values: dataclasses through ``to_json``; bytes stay bytes."""
    if hasattr(value, "to_json"):
        return jsonable(value.to_json())
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value
