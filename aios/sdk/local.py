"""The in-process client: an agent task in the kernel's own event loop."""

from __future__ import annotations

from aios.kernel import Kernel
from aios.process import AgentProcess
from aios.syscall import Completion, LLMCall


class LocalClient:
    """Binds an agent to its process entry; identity comes from the kernel, not the agent."""

    def __init__(self, kernel: Kernel, process: AgentProcess) -> None:
        self._kernel = kernel
        self._process = process

    async def llm(self, call: LLMCall, *, timeout: float | None = None) -> Completion:
        return await self._kernel.llm(self._process, call, timeout=timeout)
