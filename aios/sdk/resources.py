"""``self.memory`` and ``self.storage``: an agent's memory and files, as syscalls on whatever
client the agent runs on (in the kernel's process or over HTTP, the same results)."""

from __future__ import annotations

import builtins
from typing import Any, Protocol

from aios.memory.notes import Scalar


class ResourceClient(Protocol):
    async def call(
        self, kind: str, op: str, args: dict[str, Any], *, timeout: float | None = None
    ) -> Any: ...


def _args(**kwargs: Any) -> dict[str, Any]:
    """Arguments given (None means: the operation's default)."""
    return {k: v for k, v in kwargs.items() if v is not None}


class Memory:
    """Notes (text + metadata, searchable) and the conversation history of this agent."""

    def __init__(self, client: ResourceClient) -> None:
        self._client = client

    async def _call(self, op: str, **kwargs: Any) -> Any:
        timeout = kwargs.pop("timeout", None)
        return await self._client.call("memory", op, _args(**kwargs), timeout=timeout)

    async def add(self, text: str, metadata: dict[str, Scalar] | None = None) -> dict[str, Any]:
        """Store a note; the note (with its ``id``)."""
        result: dict[str, Any] = await self._call("add", text=text, metadata=metadata)
        return result

    async def get(self, id: int) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("get", id=id)
        return result

    async def update(
        self, id: int, text: str | None = None, metadata: dict[str, Scalar] | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("update", id=id, text=text, metadata=metadata)
        return result

    async def delete(self, id: int) -> bool:
        return bool(await self._call("delete", id=id))

    async def list(
        self, where: dict[str, Scalar] | None = None, limit: int = 50
    ) -> builtins.list[dict[str, Any]]:
        """Notes, newest first, whose metadata has every key of ``where`` equal to its value."""
        result: builtins.list[dict[str, Any]] = await self._call("list", where=where, limit=limit)
        return result

    async def search(
        self, query: str, where: dict[str, Scalar] | None = None, limit: int = 5
    ) -> builtins.list[dict[str, Any]]:
        """Notes matching any word of ``query``, best first: ``[{"note": ..., "score": ...}]``."""
        result: builtins.list[dict[str, Any]] = await self._call(
            "search", query=query, where=where, limit=limit
        )
        return result

    async def remember(
        self, turns: builtins.list[tuple[str, str]]
    ) -> builtins.list[dict[str, Any]]:
        """Append (role, content) turns to the conversation history."""
        result: builtins.list[dict[str, Any]] = await self._call(
            "remember", turns=[list(t) for t in turns]
        )
        return result

    async def history(self, limit: int = 50) -> builtins.list[dict[str, Any]]:
        """The most recent turns, oldest first."""
        result: builtins.list[dict[str, Any]] = await self._call("history", limit=limit)
        return result

    async def forget(self) -> int:
        """Clear the conversation history (notes stay)."""
        return int(await self._call("forget"))

    async def usage(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("usage")
        return result


class Storage:
    """This agent's versioned files (and files other agents shared with it: ``owner=``)."""

    def __init__(self, client: ResourceClient) -> None:
        self._client = client

    async def _call(self, op: str, **kwargs: Any) -> Any:
        return await self._client.call("storage", op, _args(**kwargs))

    async def write(
        self, path: str, content: str | bytes, *, mode: str = "overwrite", owner: str | None = None
    ) -> dict[str, Any]:
        """Create, overwrite (``mode="overwrite"``), create only (``"create"``) or append
        (``"append"``); folders are created as needed. The file's stat."""
        result: dict[str, Any] = await self._call(
            "write", path=path, content=content, mode=mode, owner=owner
        )
        return result

    async def read(
        self, path: str, *, version: int | None = None, owner: str | None = None
    ) -> bytes:
        result = await self._call("read", path=path, version=version, owner=owner)
        return bytes(result["content"])

    async def read_text(
        self, path: str, *, version: int | None = None, owner: str | None = None
    ) -> str:
        return (await self.read(path, version=version, owner=owner)).decode()

    async def stat(self, path: str, *, owner: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("stat", path=path, owner=owner)
        return result

    async def ls(
        self, path: str = "", *, recursive: bool = False, owner: str | None = None
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call(
            "ls", path=path, recursive=recursive, owner=owner
        )
        return result

    async def delete(self, path: str, *, recursive: bool = False, owner: str | None = None) -> int:
        return int(await self._call("delete", path=path, recursive=recursive, owner=owner))

    async def mkdir(self, path: str, *, owner: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("mkdir", path=path, owner=owner)
        return result

    async def move(self, src: str, dst: str, *, owner: str | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("move", src=src, dst=dst, owner=owner)
        return result

    async def history(
        self, path: str, *, limit: int = 100, owner: str | None = None
    ) -> list[dict[str, Any]]:
        """The file's versions, newest first."""
        result: list[dict[str, Any]] = await self._call(
            "history", path=path, limit=limit, owner=owner
        )
        return result

    async def rollback(
        self,
        path: str,
        *,
        version: int | None = None,
        at: float | None = None,
        owner: str | None = None,
    ) -> dict[str, Any] | None:
        """Back to a version id, or to the newest version at or before UNIX time ``at``."""
        result: dict[str, Any] | None = await self._call(
            "rollback", path=path, version=version, at=at, owner=owner
        )
        return result

    async def share(self, path: str, grantee: str, mode: str = "r") -> dict[str, Any]:
        """Share with ``agent:NAME`` or ``group:NAME``, ``"r"`` or ``"rw"``."""
        result: dict[str, Any] = await self._call("share", path=path, grantee=grantee, mode=mode)
        return result

    async def unshare(self, path: str, grantee: str) -> bool:
        return bool(await self._call("unshare", path=path, grantee=grantee))

    async def shares(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("shares")
        return result

    async def search(
        self, query: str, *, folder: str = "", limit: int = 10, owner: str | None = None
    ) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call(
            "search", query=query, folder=folder, limit=limit, owner=owner
        )
        return result

    async def usage(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("usage")
        return result


class Tools:
    """The kernel's tools: ``await self.tools.call("calculator", expression="12*7")``."""

    def __init__(self, client: ResourceClient) -> None:
        self._client = client

    async def call(self, name: str, /, **arguments: Any) -> Any:
        """Run a tool; its result (a typed error if the arguments are invalid, the tool
        fails or it runs past its timeout)."""
        return await self._client.call("tools", "call", {"name": name, "arguments": arguments})

    async def list(self) -> builtins.list[dict[str, Any]]:
        """Every tool: name, description, JSON Schema of its parameters, limits, annotations."""
        result: builtins.list[dict[str, Any]] = await self._client.call("tools", "list", {})
        return result
