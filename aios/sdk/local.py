"""The in-process client: an agent task in the kernel's own event loop."""

from __future__ import annotations

from typing import Any

from aios.kernel import Kernel
from aios.process import AgentProcess
from aios.syscall import Completion, LLMCall, MemoryUse


class LocalClient:
    """Binds an agent to its process entry; identity comes from the kernel, not the agent."""

    def __init__(self, kernel: Kernel, process: AgentProcess) -> None:
        self._kernel = kernel
        self._process = process

    async def llm(
        self, call: LLMCall, *, timeout: float | None = None, memory: MemoryUse | None = None
    ) -> Completion:
        return await self._kernel.llm(self._process, call, timeout=timeout, memory=memory)

    async def call(
        self, kind: str, op: str, args: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        return await self._kernel.resource(self._process, kind, op, args, timeout=timeout)
