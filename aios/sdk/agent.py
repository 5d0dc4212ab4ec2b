"""The ``Agent`` base class."""

from __future__ import annotations

import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
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

    A spawned agent is durable (aios.durable): after a restart of the kernel its ``run`` is
    replayed from its journal. So it takes randomness from ``self.random`` (seeded per
    process) and the time from ``self.now()`` (the time of its last syscall's result), which
    are the same on replay, and makes every effect through a syscall.
    """

    name: ClassVar[str] = "agent"
    description: ClassVar[str] = ""

    def __init__(self, client: SyscallClient) -> None:
        self.llm = LLM(client)
        self.memory = Memory(client)
        self.storage = Storage(client)
        self.tools = Tools(client)
        seed: int | None = getattr(client, "seed", None)
        self.random = random.Random(seed)
        clock: Callable[[], float] = getattr(client, "now", time.time)
        self._clock = clock

    def now(self) -> float:
        """Wall-clock seconds (epoch): on a durable process, the time its last syscall's
        result came (of its start before any), the same when it is replayed."""
        return self._clock()

    @abstractmethod
    async def run(self, task: str) -> str:
        """Do the task; return the final answer."""
