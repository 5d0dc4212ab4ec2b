"""The ``Agent`` base class."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from aios.sdk.llm import LLM, SyscallClient
from aios.sdk.resources import Memory, Storage, Tools


class Agent(ABC):
    """Subclass, set ``name``, and implement ``run``; every LLM, memory (``self.memory``) and
    storage (``self.storage``) call is a syscall through the kernel.

    class Echo(Agent):
        name = "echo"

        async def run(self, task: str) -> str:
            reply = await self.llm.chat([{"role": "user", "content": task}])
            return reply.text
    """

    name: ClassVar[str] = "agent"
    description: ClassVar[str] = ""

    def __init__(self, client: SyscallClient) -> None:
        self.llm = LLM(client)
        self.memory = Memory(client)
        self.storage = Storage(client)
        self.tools = Tools(client)

    @abstractmethod
    async def run(self, task: str) -> str:
        """Do the task; return the final answer."""
