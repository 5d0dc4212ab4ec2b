"""What the kernel asks of an LLM core, whatever runs it.

Three kinds satisfy :class:`Core`: the embedded :class:`~aios.llm.core.LLMCore` (llama.cpp in
this process), :class:`~aios.llm.openai_compat.RemoteCore` (an OpenAI-compatible server over
HTTP) and :class:`~aios.llm.router.Router` (one model name over several cores). The kernel
builds them from config, starts them, runs each one's ``run()`` in its task group until
shutdown, and sends every LLM syscall to one of them with ``submit``.
"""

from __future__ import annotations

from typing import Protocol

from aios.config import AnyCoreConfig, CoreConfig, RemoteCoreConfig
from aios.syscall import LLMCall, LLMRequest


class CoreCounters(Protocol):
    """The counters every core keeps (each kind adds its own)."""

    @property
    def completed(self) -> int: ...
    @property
    def failed(self) -> int: ...
    @property
    def cancelled(self) -> int: ...


class Core(Protocol):
    """An LLM core: a queue of LLM syscalls, a scheduling policy and something that runs them.

    ``submit`` validates and enqueues a call and returns its request, whose future resolves
    exactly once with a :class:`~aios.syscall.Completion` or a typed
    :class:`~aios.errors.AIOSError`; it raises at once (nothing queued) when the call can never
    run. ``cancel`` withdraws a request and frees what it held (idempotent). ``forget`` drops
    what the core kept for an agent that exited (cached KV, scheduling ledger).
    """

    @property
    def name(self) -> str: ...
    @property
    def config(self) -> AnyCoreConfig: ...
    @property
    def stats(self) -> CoreCounters: ...
    @property
    def queued(self) -> int:
        """Requests waiting for admission."""
        ...

    @property
    def active(self) -> int:
        """Requests admitted and running (generating, or in flight to a server)."""
        ...

    async def start(self) -> None:
        """Acquire the core's resources (load a model, open an HTTP client)."""
        ...

    async def run(self) -> None:
        """The core's loop; runs until cancelled. An error inside it fails every request it
        holds (never leaves a caller hanging) and marks the core dead."""
        ...

    async def close(self) -> None:
        """Fail what is still queued or running with KernelShutdown; free resources.
        Idempotent."""
        ...

    def submit(
        self, agent: str, call: LLMCall, *, priority: int = 0, kind: str = ""
    ) -> LLMRequest: ...
    def cancel(self, request: LLMRequest) -> None: ...
    def forget(self, agent: str) -> None: ...


def capacity_of(core: Core) -> int:
    """How many requests the core runs at once (its slots, or its in-flight HTTP requests):
    the unit a router normalizes load by."""
    config = core.config
    if isinstance(config, CoreConfig):
        return config.slots
    if isinstance(config, RemoteCoreConfig):
        return config.max_inflight
    return 1
