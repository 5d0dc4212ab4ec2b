"""The tool manager: runs tool calls with validation, per-tool concurrency limits and timeouts.

Arguments are validated against the tool's schema before anything runs (a clear
``InvalidRequest``, never an exception inside the kernel). A call waits on its tool's own
semaphore: a busy tool delays its callers (up to their deadline), it never drops them, and it
never delays another tool. A call that raises becomes a :class:`~aios.errors.ToolError`; one
that runs past its timeout a :class:`~aios.errors.ToolTimeout`. An async tool is cancelled at
its timeout; a sync tool runs on a worker thread, which Python cannot stop, so its slot stays
taken until it returns (a hung sync tool holds its own slots, no one else's). Code that may
hang or misbehave belongs in the sandbox (a separate process), not in a sync tool.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from aios.errors import AIOSError, InvalidRequest, ToolError, ToolTimeout
from aios.storage.db import Job
from aios.tools.registry import ToolRegistry
from aios.tools.spec import ToolContext, ToolSpec


@dataclass
class ToolStats:
    calls: int = 0
    running: int = 0
    peak: int = 0  # most calls running at once
    errors: int = 0
    timeouts: int = 0

    def to_json(self) -> dict[str, int]:
        return self.__dict__.copy()


class ToolManager:
    def __init__(self, registry: ToolRegistry) -> None:
        self.registry = registry
        self._slots: dict[str, asyncio.Semaphore] = {}
        self.stats: dict[str, ToolStats] = {}
        self._threads: ThreadPoolExecutor | None = None  # sync tools (created on first use)

    def list(self) -> list[dict[str, Any]]:
        return [spec.to_json() for spec in self.registry]

    async def call(
        self, ctx: ToolContext, name: str, arguments: dict[str, Any] | None, job: Job
    ) -> Any:
        """Run tool ``name`` with ``arguments`` for ``ctx``'s agent; its result as JSON."""
        spec = self.registry.get(name)
        params = validate(spec, arguments or {})
        slots = self._slots.setdefault(spec.name, asyncio.Semaphore(spec.concurrency))
        stats = self.stats.setdefault(spec.name, ToolStats())
        stats.calls += 1
        remaining = job.remaining()
        try:
            async with asyncio.timeout(None if remaining is None else max(0.0, remaining)):
                await slots.acquire()
        except TimeoutError:
            stats.timeouts += 1
            raise ToolTimeout(
                f"tool {name!r} was busy ({spec.concurrency} calls running) until the call's "
                "deadline; it never ran"
            ) from None
        if job.withdrawn:
            slots.release()
            raise ToolError(f"the call of {name!r} was withdrawn before it ran")
        job.started = job.clock()
        stats.running += 1
        stats.peak = max(stats.peak, stats.running)
        released = handed_off = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                stats.running -= 1
                slots.release()

        try:
            limit = spec.timeout
            if (left := job.remaining()) is not None:
                limit = min(limit, left)
            work, done = self._start(spec, params, ctx)
            try:
                async with asyncio.timeout(max(0.0, limit)):
                    result = await asyncio.shield(work)
            except (TimeoutError, asyncio.CancelledError) as e:
                if isinstance(e, TimeoutError):
                    stats.timeouts += 1
                work.cancel()  # stops an async tool; a thread runs on, holding its slot
                done(release)
                handed_off = True  # released when the tool really ends
                if isinstance(e, asyncio.CancelledError):
                    raise
                raise ToolTimeout(f"tool {name!r} ran past its {limit:.3g}s timeout") from None
            result = jsonable(spec.name, result)
        except ToolTimeout:
            raise
        except AIOSError:
            stats.errors += 1
            raise
        except asyncio.CancelledError:
            raise
        except Exception as e:
            stats.errors += 1
            raise ToolError(f"tool {name!r} failed: {type(e).__name__}: {e}") from None
        finally:
            if not handed_off:
                release()
        return result

    def _start(
        self, spec: ToolSpec, params: BaseModel | dict[str, Any], ctx: ToolContext
    ) -> tuple[asyncio.Future[Any], Callable[[Callable[[], None]], None]]:
        """Start the tool: the future of its result, and how to run a callback once the tool
        has really ended (for a thread: when the thread returns, not when we stop waiting)."""
        if isinstance(params, dict):
            kwargs = dict(params)
        else:
            kwargs = {k: getattr(params, k) for k in type(params).model_fields}
        if spec.context is not None:
            kwargs[spec.context] = ctx
        loop = asyncio.get_running_loop()
        if inspect.iscoroutinefunction(spec.fn):
            task = asyncio.ensure_future(spec.fn(**kwargs))
            return task, lambda callback: task.add_done_callback(lambda _: callback())
        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=32, thread_name_prefix="aios-tool")
        thread = self._threads.submit(functools.partial(spec.fn, **kwargs))

        def when_done(callback: Callable[[], None]) -> None:
            thread.add_done_callback(lambda _: loop.call_soon_threadsafe(callback))

        return asyncio.wrap_future(thread), when_done

    def close(self) -> None:
        """Stop taking tool threads (running ones finish on their own)."""
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)
            self._threads = None


def validate(spec: ToolSpec, arguments: Any) -> BaseModel | dict[str, Any]:
    """The tool's arguments, checked against its schema; InvalidRequest says what is wrong."""
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"tool {spec.name!r}: arguments must be an object")
    if spec.params is None:  # a raw JSON Schema (an MCP server's tool)
        import jsonschema

        try:
            jsonschema.validate(arguments, spec.schema)
        except jsonschema.ValidationError as e:
            where = ".".join(str(x) for x in e.absolute_path) or "arguments"
            raise InvalidRequest(
                f"tool {spec.name!r}: invalid arguments: {where}: {e.message}"
            ) from None
        except jsonschema.SchemaError:
            raise ToolError(f"tool {spec.name!r} has an invalid schema") from None
        return arguments
    try:
        return spec.params.model_validate(arguments)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in p['loc']) or 'arguments'}: {p['msg']}" for p in e.errors()
        )
        raise InvalidRequest(f"tool {spec.name!r}: invalid arguments: {problems}") from None


def jsonable(name: str, value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ToolError(f"tool {name!r} returned {type(value).__name__}, not JSON") from None
    return value
