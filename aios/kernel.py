"""The kernel: owns the LLM cores through a lifespan and is the one entry point for syscalls.

    async with Kernel(KernelConfig()) as kernel:
        proc = await kernel.run_agent(MyAgent, "task")

Every syscall ends with a result or a typed error before its deadline: the kernel awaits the
request's future under a timeout and withdraws the request (freeing its slot) when the deadline
passes or the caller goes away.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from aios.config import CoreConfig, KernelConfig, RemoteCoreConfig, RouterConfig
from aios.errors import AIOSError, DeadlineExceeded, InvalidRequest, KernelShutdown, ModelNotFound
from aios.llm.base import Core
from aios.llm.core import LLMCore
from aios.llm.engine import Engine
from aios.llm.router import Router
from aios.process import AgentProcess
from aios.quota import Quotas
from aios.scheduler import make_policy
from aios.syscall import Completion, LLMCall, LLMRequest

if TYPE_CHECKING:
    from aios.sdk.agent import Agent

EngineFactory = Callable[[CoreConfig], Engine]


def llamacpp_engine(config: CoreConfig) -> Engine:
    """The default engine factory: llama.cpp, imported only when a core starts."""
    from aios.llm.llamacpp import LlamaCppEngine

    return LlamaCppEngine(config)


class Kernel:
    def __init__(
        self,
        config: KernelConfig | None = None,
        *,
        engine_factory: EngineFactory = llamacpp_engine,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or KernelConfig()
        self.cores: dict[str, Core] = {}
        self.processes: dict[str, AgentProcess] = {}
        self._engine_factory = engine_factory
        self._clock = clock
        self.quotas = Quotas(self.config.quota, clock=clock)
        self._tasks: asyncio.TaskGroup | None = None
        self._loops: list[asyncio.Task[None]] = []

    # -- lifespan --------------------------------------------------------------------------
    async def __aenter__(self) -> Kernel:
        try:
            for cfg in self.config.cores:  # load every model before anything runs
                if isinstance(cfg, RouterConfig):
                    continue  # built below, over the cores it names
                core = self._build_core(cfg)
                self.cores[cfg.name] = core
                await core.start()
            for cfg in self.config.cores:
                if isinstance(cfg, RouterConfig):
                    members = [self.cores[name] for name in cfg.cores]
                    self.cores[cfg.name] = Router(cfg, members, self._clock)
        except BaseException:
            await self._close_cores()
            raise
        # One TaskGroup owns the kernel's long-lived tasks (the cores' decode loops).
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        for name, core in self.cores.items():
            self._loops.append(self._tasks.create_task(core.run(), name=f"core-{name}"))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Shutdown is cancellation: stop the loops, fail what is in flight, free the models.
        The body's own exception propagates unchanged (not wrapped in an ExceptionGroup)."""
        tasks, self._tasks = self._tasks, None
        for loop in self._loops:
            loop.cancel()
        await self._close_cores()
        if tasks is not None:
            await tasks.__aexit__(None, None, None)

    def _build_core(self, cfg: CoreConfig | RemoteCoreConfig) -> Core:
        policy = make_policy(
            self.config.policy,
            quantum_tokens=self.config.quantum_tokens,
            aging_seconds=self.config.aging_seconds,
        )
        if isinstance(cfg, RemoteCoreConfig):
            from aios.llm.openai_compat import RemoteCore  # httpx only when a remote core runs

            return RemoteCore(cfg, policy, self._clock)
        embedded: CoreConfig = cfg
        return LLMCore(embedded, lambda: self._engine_factory(embedded), policy, self._clock)

    async def _close_cores(self) -> None:
        # Routers (built last) close first: their calls end with KernelShutdown instead of
        # failing over when their members close.
        for core in reversed(self.cores.values()):
            await core.close()

    # -- processes -------------------------------------------------------------------------
    def register(self, name: str, task: str = "") -> AgentProcess:
        """Create a process-table entry; its id is the identity of every syscall it makes."""
        process = AgentProcess(name=name, task=task, started=self._clock())
        self.processes[process.id] = process
        return process

    async def run_agent(
        self, agent_cls: type[Agent], task: str, *, name: str | None = None
    ) -> AgentProcess:
        """Run one agent to completion. Its failure is recorded, never raised: one broken
        agent must not take the others down."""
        from aios.sdk.local import LocalClient

        process = self.register(name or agent_cls.name, task)
        agent = agent_cls(LocalClient(self, process))
        try:
            result = await agent.run(task)
        except AIOSError as e:
            process.exit(self._clock(), error=f"{e.code}: {e}")
        except Exception as e:
            process.exit(self._clock(), error=f"agent error: {type(e).__name__}: {e}")
        else:
            process.exit(self._clock(), result=result)
        finally:
            self.release(process)
        return process

    def release(self, process: AgentProcess) -> None:
        """An agent is gone: its cores drop the KV they kept for its next call."""
        for core in self.cores.values():
            core.forget(process.id)

    # -- syscalls --------------------------------------------------------------------------
    def core_for(self, model: str | None) -> Core:
        if self._tasks is None:
            raise KernelShutdown("the kernel is not running")
        name = model or self.config.default_model
        core = self.cores.get(name)
        if core is None:
            raise ModelNotFound(f"no LLM core named {name!r}; available: {', '.join(self.cores)}")
        return core

    async def llm(
        self,
        process: AgentProcess,
        call: LLMCall,
        *,
        timeout: float | None = None,
        priority: int = 0,
    ) -> Completion:
        """The LLM syscall: queue ``call`` for ``process`` and wait for its completion.
        ``priority`` is a hint for the priority policy (higher runs first)."""
        if timeout is not None and not timeout > 0:
            raise InvalidRequest(f"timeout must be > 0 seconds, got {timeout!r}")
        core = self.core_for(call.model)
        request: LLMRequest | None = None
        completion: Completion | None = None
        try:
            # Waiting for a place under the agent's quota counts against the deadline.
            async with (
                asyncio.timeout(timeout or self.config.syscall_timeout),
                self.quotas.admit(process.id),
            ):
                request = core.submit(process.id, call, priority=priority, kind=process.name)
                process.current = request
                result: Completion = await asyncio.shield(request.future)
            completion = result
            return result
        except TimeoutError:
            if request is None:
                raise DeadlineExceeded(
                    f"{process.id} had {self.quotas.in_flight(process.id)} LLM calls in flight "
                    f"(its max_parallel quota) for {timeout or self.config.syscall_timeout:g}s; "
                    "this call never started"
                ) from None
            core.cancel(request)
            raise DeadlineExceeded(
                f"{request.id} did not finish within {timeout or self.config.syscall_timeout:g}s "
                f"({request.status.value}); its slot was released"
            ) from None
        except asyncio.CancelledError:
            if request is not None:
                core.cancel(request)  # the caller went away: free the slot now
            raise
        finally:
            if request is not None:
                process.current = None
                process.account(request, completion)
                # Prompt + completion tokens, once the call reached the model.
                if completion is not None or request.timings.admitted is not None:
                    self.quotas.charge(process.id, request.usage.total_tokens)
