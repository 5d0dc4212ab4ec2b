"""Memory, storage and tool syscalls made on a :class:`Resources` directly, as an agent."""

from __future__ import annotations

from typing import Any, Protocol

import pytest

from aios.errors import AIOSError
from aios.resources import Kind, Resources
from aios.storage.db import Job
from aios.storage.files import Principal


class Call(Protocol):
    async def __call__(self, r: Resources, who: Principal, op: str, **args: Any) -> Any: ...


class Raises(Protocol):
    async def __call__(
        self, error: type[AIOSError], r: Resources, who: Principal, op: str, **args: Any
    ) -> AIOSError: ...


def syscalls(kind: Kind) -> tuple[Call, Raises]:
    """``call(r, who, op, **args)`` and ``raises(error, r, who, op, **args)`` (which asserts
    that the call fails with ``error`` and returns it) for one kind of syscall."""

    async def call(r: Resources, who: Principal, op: str, **args: Any) -> Any:
        return await r.call(who, kind, op, args, Job())

    async def raises(
        error: type[AIOSError], r: Resources, who: Principal, op: str, **args: Any
    ) -> AIOSError:
        with pytest.raises(error) as info:
            await call(r, who, op, **args)
        return info.value

    return call, raises
