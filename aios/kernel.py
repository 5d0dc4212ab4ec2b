"""The kernel: owns the LLM cores through a lifespan and is the one entry point for syscalls.

    async with Kernel(KernelConfig()) as kernel:
        proc = await kernel.run_agent(MyAgent, "task")

Every syscall ends with a result or a typed error before its deadline: the kernel awaits the
request's future under a timeout and withdraws the request (freeing its slot) when the deadline
passes or the caller goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterable
from contextlib import AsyncExitStack, aclosing
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from aios.access import WRITES, Access, Decision, capability
from aios.audit import AuditLog, Record
from aios.config import CoreConfig, KernelConfig, RemoteCoreConfig, RouterConfig
from aios.durable import (
    ProcessRow,
    ProcessTable,
    ReplayClient,
    agent_ref,
    load_agent,
    new_kernel_id,
    process_number,
    record_decision,
    recorded_decision,
)
from aios.errors import (
    AIOSError,
    ConfigError,
    DeadlineExceeded,
    InvalidRequest,
    KernelShutdown,
    ModelNotFound,
    Overloaded,
    PermissionDenied,
    SyscallCancelled,
)
from aios.events import EventBus
from aios.journal import Journal
from aios.llm.base import Core
from aios.llm.core import LLMCore
from aios.llm.engine import Engine
from aios.llm.router import Router
from aios.memory.fit import Counter, Fitted, estimate, fit
from aios.metrics import Metrics
from aios.process import AgentProcess
from aios.quota import Quotas
from aios.resources import ResourceCall, Resources, target
from aios.scheduler import make_policy
from aios.storage.files import Principal
from aios.syscall import Completion, LLMCall, LLMRequest, MemoryUse, Message, Syscall
from aios.tools.manager import ToolStats
from aios.tools.registry import ToolRegistry
from aios.tools.spec import ToolContext
from aios.tracing import Tracing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor

    from aios.sdk.agent import Agent
    from aios.sdk.llm import SyscallClient

log = logging.getLogger("aios.kernel")
EngineFactory = Callable[[CoreConfig], Engine]
V = TypeVar("V")
REMOTE_CONTEXT_TOKENS = 4096  # what memory fitting assumes of a core whose tokenizer is remote
MAX_FINISHED = 4096  # finished processes and syscalls kept for inspection (ps, status)
MIN_TIMEOUT = 1e-3  # seconds: a shorter deadline is a 400, not a certain DeadlineExceeded


def llamacpp_engine(config: CoreConfig) -> Engine:
    """The default engine factory: llama.cpp, imported only when a core starts; in a child
    process of its own unless ``config.isolate`` is off (see aios.llm.isolated)."""
    try:
        import llama_cpp  # noqa: F401  (the engine loads it next anyway)
    except ImportError:  # a client install: `pip install aios`
        raise ConfigError(
            f"core {config.name!r} is an embedded llama.cpp core, and llama-cpp-python is not "
            "installed: pip install 'aios[embedded]' (make builds it for this CPU), or "
            'configure a remote core ([[core]] type = "remote")'
        ) from None
    from aios.llm.llamacpp import LlamaCppEngine, LlamaTokenizer

    if not config.isolate:
        return LlamaCppEngine(config)
    from aios.llm.isolated import IsolatedEngine

    build = functools.partial(LlamaCppEngine, config)
    return IsolatedEngine(config, build, LlamaTokenizer.load(config))


class Kernel:
    def __init__(
        self,
        config: KernelConfig | None = None,
        *,
        engine_factory: EngineFactory = llamacpp_engine,
        tools: ToolRegistry | None = None,
        llm: bool = True,
        hidden: Iterable[str] = (),
        span_processor: SpanProcessor | None = None,
    ) -> None:
        """``llm=False``: start no LLM core (nor MCP server); the kernel serves memory,
        storage and tool syscalls only (the CLI's data commands). ``hidden``: directories the
        built-in code tools' sandbox must never show (the server's data directory); the
        database's directory and the cores' spill directories are always hidden.
        ``span_processor``: trace, and hand each ended span to this OpenTelemetry processor (an
        application's exporter, a test's in-memory one); otherwise ``config.observability``
        says whether and where (aios.tracing)."""
        self.config = config or KernelConfig()
        self._llm = llm
        self.cores: dict[str, Core] = {}
        self.processes: dict[str, AgentProcess] = {}
        self._engine_factory = engine_factory
        self._time: Callable[[], float] = time.monotonic  # the loop's, once running (see clock)
        self.quotas = Quotas(self.config.quota, clock=self.clock)
        self._tasks: asyncio.TaskGroup | None = None
        self._loops: list[asyncio.Task[None]] = []  # the cores' decode loops
        self._writer: asyncio.Task[None] | None = None  # the audit log's
        self._spawned: set[asyncio.Task[AgentProcess]] = set()
        self.syscalls: dict[str, tuple[Syscall, AgentProcess]] = {}
        # The memory, storage and tool managers and their database (a private temporary SQLite
        # file unless ``config.storage.database`` names one). Private: every operation on an
        # agent's data reaches them only through submit(), after the access check.
        spills = [
            c.spill_dir for c in self.config.cores if isinstance(c, CoreConfig) and c.spill_dir
        ]
        self._resources = Resources(
            self.config.storage, self.config.memory, tools, hidden=[*hidden, *spills]
        )
        self.audit = AuditLog(self._resources.db)  # every syscall, hash-chained
        self.access = Access(self.config.access)  # capabilities and approvals
        self.events = EventBus(self.clock)  # what happens, for whoever watches (aios.events)
        # Spans (None: off, and free).
        self.tracing = Tracing.configure(self.config, processor=span_processor)
        self.metrics = Metrics(self)  # GET /metrics (aios.metrics)
        self._resources.db.timed = self.metrics.job
        self._mcp: AsyncExitStack | None = None  # the MCP servers' sessions
        self._calls: dict[str, asyncio.Task[None]] = {}  # resource calls' work, by syscall id
        # Durable processes (aios.durable): the journal of their syscalls (also the record of
        # HTTP calls with an Idempotency-Key) and the process table with its leases.
        durable = self.config.durable
        self.kernel_id = durable.kernel_id or new_kernel_id()
        self.journal = Journal(self._resources.db, self.kernel_id)
        self.durable = (
            ProcessTable(self._resources.db, self.kernel_id, durable.lease_seconds)
            if durable.enabled
            else None
        )
        self._journal_writer: asyncio.Task[None] | None = None
        self._lease_keeper: asyncio.Task[None] | None = None
        self._held: dict[int, AgentProcess] = {}  # durable processes this kernel runs

    def clock(self) -> float:
        """The kernel's one clock, in seconds: the running event loop's time. Deadlines (what
        asyncio waits on), every timestamp the kernel records, quotas and scheduling all read
        it, so a test loop whose time jumps ahead when every task waits moves them together."""
        return self._time()

    @property
    def tools(self) -> ToolRegistry:
        """The tools the kernel runs (register more before agents call them)."""
        return self._resources.tools.registry

    @property
    def tool_stats(self) -> dict[str, ToolStats]:
        return self._resources.tools.stats

    @property
    def database(self) -> str | None:
        """The database memory and storage live in (password redacted); None if it is a
        private temporary one that goes away with the kernel."""
        return None if self._resources.ephemeral else self._resources.db.redacted()

    # -- lifespan --------------------------------------------------------------------------
    async def __aenter__(self) -> Kernel:
        self._time = asyncio.get_running_loop().time
        async with AsyncExitStack() as undo:  # what has started stops again if a step fails
            await self._resources.start()
            undo.push_async_callback(self._resources.close)
            if self.config.mcp and self._llm:  # MCP servers' tools join the registry
                from aios.tools.mcp import connect

                self._mcp = AsyncExitStack()
                undo.push_async_callback(self._mcp.aclose)
                await connect(self.config.mcp, self._resources.tools.registry, self._mcp)
            undo.push_async_callback(self._close_cores)
            for cfg in self.config.cores if self._llm else ():  # every model loads first
                if isinstance(cfg, RouterConfig):
                    continue  # built below, over the cores it names
                core = self._build_core(cfg)
                self.cores[cfg.name] = core
                await core.start()
            for cfg in self.config.cores if self._llm else ():
                if isinstance(cfg, RouterConfig):
                    members = [self.cores[name] for name in cfg.cores]
                    self.cores[cfg.name] = Router(cfg, members, self.clock)
            # One TaskGroup owns every task of the kernel: the audit writer, the cores' decode
            # loops, spawned agents and the memory, storage and tool work of syscalls.
            self._tasks = asyncio.TaskGroup()
            await self._tasks.__aenter__()
            self._writer = self._tasks.create_task(self.audit.run(), name="audit")
            for name, core in self.cores.items():
                self._loops.append(self._tasks.create_task(core.run(), name=f"core-{name}"))
            self._journal_writer = self._tasks.create_task(self.journal.run(), name="journal")
            undo.pop_all()
        if self.durable is not None:  # processes that were running resume now
            try:
                await self._claim(own=True)
            except BaseException as e:
                await self.__aexit__(type(e), e, e.__traceback__)
                raise
            self._lease_keeper = self._tasks.create_task(self._leases(), name="leases")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Shutdown is cancellation: stop the agents, fail what is in flight, write the audit
        records of it all, free the models. The body's own exception propagates unchanged
        (not wrapped in an ExceptionGroup)."""
        tasks, self._tasks = self._tasks, None
        keeper, self._lease_keeper = self._lease_keeper, None  # no process is claimed now
        ending = [*self._loops, *self._spawned, *self._calls.values(), *filter(None, [keeper])]
        for task in ending:
            task.cancel()
        await self._close_cores()
        if ending:
            await asyncio.wait(ending)
        writer, self._journal_writer = self._journal_writer, None
        if writer is not None:  # once no agent can append to the journal any more
            writer.cancel()
            await asyncio.wait([writer])
        if self._writer is not None:
            await self.audit.drain()
            self._writer.cancel()
            self._writer = None
        if tasks is not None:
            await tasks.__aexit__(None, None, None)
        self.events.close()
        if self._mcp is not None:
            await self._mcp.aclose()
        await self._resources.close()
        if self.tracing is not None:  # exports what is batched (a thread: it may wait on I/O)
            await asyncio.to_thread(self.tracing.close)

    def _build_core(self, cfg: CoreConfig | RemoteCoreConfig) -> Core:
        policy = make_policy(
            self.config.policy,
            quantum_tokens=self.config.quantum_tokens,
            aging_seconds=self.config.aging_seconds,
        )
        if isinstance(cfg, RemoteCoreConfig):
            from aios.llm.openai_compat import RemoteCore  # httpx only when a remote core runs

            return RemoteCore(cfg, policy, self.clock)
        embedded: CoreConfig = cfg
        return LLMCore(embedded, lambda: self._engine_factory(embedded), policy, self.clock)

    async def _close_cores(self) -> None:
        # Routers (built last) close first: their calls end with KernelShutdown instead of
        # failing over when their members close.
        for core in reversed(self.cores.values()):
            await core.close()

    # -- processes -------------------------------------------------------------------------
    def register(
        self,
        name: str,
        task: str = "",
        *,
        owner: str | None = None,
        external: bool = False,
        pid: str | None = None,
    ) -> AgentProcess:
        """Create a process-table entry; its id (``pid``, else a fresh one; ``@OWNER`` for an
        external agent) names every syscall it makes in the audit log."""
        process = AgentProcess(
            name=name, task=task, started=self.clock(), owner=owner, external=external
        )
        if external:
            process.id = f"@{owner}"
        elif pid is not None:
            process.id = pid
        self.processes[process.id] = process
        self._prune(self.processes, MAX_FINISHED, lambda p: p.state.finished)
        return process

    def session(self, owner: str) -> AgentProcess:
        """The process of an agent that lives outside the kernel (one per identity)."""
        process = self.processes.get(f"@{owner}")
        if process is None:
            process = self.register(owner, owner=owner, external=True)
        return process

    async def run_agent(
        self,
        agent_cls: type[Agent],
        task: str,
        *,
        name: str | None = None,
        process: AgentProcess | None = None,
        client: SyscallClient | None = None,
    ) -> AgentProcess:
        """Run one agent to completion. Its failure is recorded, never raised: one broken
        agent must not take the others down. Cancellation (``kill``) is recorded, then raised.
        ``client``: how its syscalls reach the kernel (default: directly, in-process)."""
        from aios.sdk.local import LocalClient

        process = process or self.register(name or agent_cls.name, task)
        agent = agent_cls(client or LocalClient(self, process))
        with self.tracing.agent(process) if self.tracing else contextlib.nullcontext():
            try:
                result = await agent.run(task)
            except AIOSError as e:
                process.exit(self.clock(), error=f"{e.code}: {e}")
            except Exception as e:
                process.exit(self.clock(), error=f"agent error: {type(e).__name__}: {e}")
            except asyncio.CancelledError:
                process.exit(self.clock(), error="killed")
                raise
            else:
                process.exit(self.clock(), result=result)
            finally:
                self.release(process)
        return process

    async def spawn(
        self,
        agent_cls: type[Agent],
        task: str,
        *,
        owner: str | None = None,
        groups: frozenset[str] = frozenset(),
    ) -> AgentProcess:
        """Start an agent as a kernel task and return its process once it is recorded: a
        durable one (``proc-N``) resumes after a restart of the kernel (aios.durable). It runs
        as ``owner`` (a credential's name) with that credential's ``groups``."""
        if self._tasks is None:
            raise KernelShutdown("the kernel is not running")
        if self.durable is None:
            process = self.register(agent_cls.name, task, owner=owner)
            process.groups = groups
            self._start(process, self.run_agent(agent_cls, task, process=process))
            return process
        ref = agent_ref(agent_cls)
        try:
            found = load_agent(ref)
        except ConfigError:
            found = None
        if found is not agent_cls:
            raise ConfigError(
                f"{ref} cannot be spawned as a durable process: a restarted kernel could not "
                "import it to resume it. Define the agent class at module level (importable by "
                "its module and name), or run it with run_agent, or turn durable processes off "
                "([kernel.durable] enabled = false)"
            )
        row = await self.durable.create(ref, agent_cls.name, task, owner, groups)
        if self._tasks is None:  # stopped meanwhile: the next start runs it
            raise KernelShutdown(f"the kernel stopped; {row.id} runs when it starts again")
        return self._adopt(row, fresh=True)

    def _start(self, process: AgentProcess, run: Coroutine[Any, Any, AgentProcess]) -> None:
        assert self._tasks is not None
        process.runner = self._tasks.create_task(run, name=process.id)
        self._spawned.add(process.runner)
        process.runner.add_done_callback(self._spawned.discard)

    def _adopt(self, row: ProcessRow, *, fresh: bool) -> AgentProcess:
        """Run a durable process here (new, or resumed by replay)."""
        process = self.register(row.name, row.task, owner=row.owner, pid=row.id)
        process.groups = frozenset(g for g in row.groups.split(",") if g)
        self._held[row.n] = process
        self._start(process, self._run_durable(process, row, fresh))
        return process

    async def _run_durable(
        self, process: AgentProcess, row: ProcessRow, fresh: bool
    ) -> AgentProcess:
        """A durable process's run: replay what its journal holds, run the rest live, record
        its end. Stopped by the kernel's shutdown it stays running in the table (it resumes on
        the next start); killed, it ends there as failed. Stopped by a journal that could not
        record (the database failed, another kernel took its lease) it ends here only: its
        lease is no longer renewed, so a kernel claims it again and resumes it."""
        assert self.durable is not None
        client: ReplayClient | None = None
        try:
            try:
                cls = load_agent(row.agent)
                entries = {} if fresh else await self.journal.entries(process.id)
            except AIOSError as e:
                process.exit(self.clock(), error=f"{e.code}: {e}")
            else:
                self._restore_quota(process, entries.values())
                client = ReplayClient(
                    self, process, self.journal, entries,
                    seed=row.seed, started=row.created, lease=row.n,
                )  # fmt: skip
                await self.run_agent(cls, row.task, process=process, client=client)
                if client.replayed:
                    log.info("%s resumed: %d syscalls replayed", process.id, client.replayed)
        except asyncio.CancelledError:
            if process.killed and self._tasks is not None:  # killed: that is its end
                self._tasks.create_task(self._finish(row, "failed", None, "killed"))
            raise
        finally:
            self._held.pop(row.n, None)
        if client is not None and client.broken is not None:
            error = client.broken
            process.exit(self.clock(), error=f"{error.code}: {error} (it resumes from its journal)")
            log.warning("%s stopped: its journal could not record a result: %s", process.id, error)
            return process
        if client is not None and client.diverged is not None:
            process.exit(self.clock(), error=f"{client.diverged.code}: {client.diverged}")
        elif client is not None and client.unreplayed and process.error is None:
            process.exit(
                self.clock(),
                error=f"replay_diverged: {process.id} ended before the {client.unreplayed} "
                "syscalls its journal still holds (its code, task or inputs changed since it ran)",
            )
        state = "failed" if process.error is not None else "done"
        await self._finish(row, state, process.result, process.error)
        return process

    async def _finish(
        self, row: ProcessRow, state: str, result: str | None, error: str | None
    ) -> None:
        """Record a durable process's end; if the database fails, the row stays running
        (unrenewed) and the process is resumed, replayed to its end and recorded again."""
        assert self.durable is not None
        try:
            await self.durable.finish(row.n, state, result, error)
        except AIOSError as e:
            log.warning("could not record the end of %s (%s); it will be replayed", row.id, e)

    def _restore_quota(self, process: AgentProcess, entries: Iterable[Any]) -> None:
        """Charge a resumed process's quota window with its journalled LLM calls of the last
        minute (the window a restart would otherwise forget)."""
        quota = self.access.quota(process.principal, self.config.quota)
        offset = self.clock() - time.time()  # wall clock -> the kernel's clock
        for entry in sorted(entries, key=lambda e: e.at):
            if entry.tokens:
                self.quotas.charge(process.id, entry.tokens, quota, at=entry.at + offset)

    async def _claim(self, *, own: bool = False) -> None:
        """Take over running processes whose lease expired (and, at start, this kernel id's
        own) and resume them."""
        assert self.durable is not None
        after = 0
        while rows := await self.durable.claim(own=own, after=after):
            if self._tasks is None:  # stopping: they resume at the next start (or elsewhere)
                return
            for row in rows:
                if row.n not in self._held:
                    self._adopt(row, fresh=False)
            after = rows[-1].n

    async def _leases(self) -> None:
        """Renew the leases of the processes this kernel runs every third of their length;
        take over expired ones; drop idempotency records past their time. A process whose
        lease another kernel took (this one stalled past it) stops here, and so does every
        process when this kernel could not renew for a whole lease."""
        assert self.durable is not None
        config = self.config.durable
        renewed = self.clock()
        while True:
            await asyncio.sleep(config.lease_seconds / 3)
            running = dict(self._held)  # (a process adopted during the renewal is not judged)
            try:
                held = await self.durable.renew(set(running))
            except AIOSError as e:
                log.warning("could not renew the process leases: %s", e)
                if self.clock() - renewed > config.lease_seconds:
                    self._stop(running, "its lease expired: the database could not be reached")
                continue
            renewed = self.clock()
            self._stop({n: p for n, p in running.items() if n not in held}, "lost its lease")
            try:
                await self._claim()
                await self.journal.expire(time.time() - config.idempotency_hours * 3600)
            except AIOSError as e:
                log.warning("could not claim expired processes: %s", e)

    def _stop(self, processes: dict[int, AgentProcess], why: str) -> None:
        """Stop durable processes that another kernel may run now (no end is recorded)."""
        for n, process in processes.items():
            if process.runner is not None and not process.runner.done():
                log.warning("%s stops here: %s", process.id, why)
                process.runner.cancel()
            self._held.pop(n, None)

    async def find(self, process_id: str) -> AgentProcess | None:
        """A process by id: in the table in memory, else a durable one that ended (before a
        restart, or on another kernel)."""
        process = self.processes.get(process_id)
        n = process_number(process_id)
        if process is not None or n is None or self.durable is None:
            return process
        row = await self.durable.get(n)
        if row is None:
            return None
        process = AgentProcess(row.name, row.task, self.clock(), id=row.id, owner=row.owner)
        if row.state != "running":
            process.exit(self.clock(), result=row.result, error=row.error)
        return process

    def kill(self, process: AgentProcess) -> None:
        """Stop an agent: cancel its task (a spawned agent) and its syscalls in flight."""
        if process.runner is not None and not process.runner.done():
            process.killed = True
            process.runner.cancel()
        for syscall in list(process.inflight):
            self.cancel(syscall)

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

    def syscall(self, syscall_id: str) -> tuple[Syscall, AgentProcess] | None:
        """A syscall in flight or recently finished, with the process that made it."""
        return self.syscalls.get(syscall_id)

    def cancel(self, syscall: Syscall) -> None:
        """Cancel a syscall in flight (its caller gets :class:`SyscallCancelled`). A memory or
        storage call that has not started never will; one already running finishes (its
        transaction, and the manager's bookkeeping after it). A tool call is stopped where it
        is (a tool in a thread holds its slot until it returns)."""
        if isinstance(syscall, ResourceCall) and not syscall.status.finished:
            syscall.cancel(self.clock())
            task = self._calls.get(syscall.id)
            if syscall.kind == "tools" and task is not None:
                task.cancel()
        if isinstance(syscall, LLMRequest) and not syscall.status.finished and syscall.core:
            syscall.core.cancel(syscall)

    async def resource(
        self,
        process: AgentProcess,
        kind: str,
        op: str,
        args: dict[str, Any],
        *,
        timeout: float | None = None,
        step: str | None = None,
    ) -> Any:
        """A memory or storage syscall: ``kind`` ("memory", "storage"), operation ``op`` with
        ``args``, as ``process``'s principal; its result as JSON values (and bytes for file
        content). ``step``: a durable process's step (its approval is journalled under it)."""
        request = self.submit(process, kind, op, args, timeout=timeout, step=step)
        return await self.settle(process, request)

    def submit(
        self,
        process: AgentProcess,
        kind: str,
        op: str,
        args: dict[str, Any],
        *,
        timeout: float | None = None,
        step: str | None = None,
    ) -> ResourceCall:
        """Queue a memory or storage syscall on the database's workers (see :meth:`settle`).
        An unknown kind or operation raises at once (NotFound); nothing is queued."""
        budget = self._accept(timeout)
        assert self._tasks is not None  # (running: checked by _accept)
        who = process.principal
        try:
            operation = self._resources.prepare(kind, op, args)
            decision, reason = self._decide(who, kind, op, args)
        except AIOSError as e:
            self._audit(process, kind, op, target(kind, op, args), "rejected", e.code)
            raise
        if decision == "denied":
            self._audit(process, kind, op, target(kind, op, args), "denied", "permission_denied")
            raise PermissionDenied(f"{kind}.{op} is not allowed: {reason}")
        now = self.clock()
        request = ResourceCall(
            process.id,
            now,
            kind,
            op,
            deadline=now + budget,
            clock=self.clock,
            resource=target(kind, op, args),
        )
        context = self._tool_context(process, request) if (kind, op) == ("tools", "call") else None
        work = operation.run(who, request.job, context)
        if decision == "approve":
            work = self._approved(process, request, reason, work, args, step)
        elif decision == "exempt":  # the policy lets its group skip the approval: audited so
            request.decision = "exempt"
        task = self._tasks.create_task(self._run(request, work), name=request.id)
        self._calls[request.id] = task
        task.add_done_callback(lambda _: self._calls.pop(request.id, None))
        self._track(process, request)
        return request

    async def _run(self, request: ResourceCall, work: Coroutine[Any, Any, Any]) -> None:
        """The manager's work for ``request``, as a task of the kernel's TaskGroup: it ends
        the call (unless the call was cancelled meanwhile: then its outcome is dropped), and
        never raises (an error here belongs to the call, not to the kernel)."""
        try:
            if self.tracing is not None:  # a tool's own syscalls nest in its span
                with self.tracing.inside(request):
                    result = await work
            else:
                result = await work
        except asyncio.CancelledError:  # the kernel is shutting down
            if not request.status.finished:
                request.fail(self.clock(), KernelShutdown(f"{request.id}: the kernel stopped"))
            raise
        except Exception as e:
            if not request.status.finished:
                request.fail(self.clock(), e)
        else:
            if not request.status.finished:
                request.complete(self.clock(), result)

    def _tool_context(self, process: AgentProcess, request: ResourceCall) -> ToolContext:
        """What a tool called by ``process`` may do as its caller: memory and storage
        syscalls through :meth:`resource` (the same access check, approvals, audit and
        deadline as the agent's own), within what is left of the tool call's deadline."""

        async def syscall(kind: str, op: str, args: dict[str, Any]) -> Any:
            if kind not in ("memory", "storage"):
                raise InvalidRequest("a tool makes memory and storage calls only")
            left = request.job.remaining() or 0.0
            if left < MIN_TIMEOUT:
                raise DeadlineExceeded(f"{request.id} has no time left for {kind}.{op}")
            return await self.resource(process, kind, op, args, timeout=left)

        return ToolContext(process.principal.name, syscall)

    async def settle(self, process: AgentProcess, request: ResourceCall) -> Any:
        """Wait for a submitted memory, storage or tool syscall: its result or its typed
        error. Timed, in the process table and cancellable like an LLM call; the manager's
        own bookkeeping finishes even if the caller leaves (the call is then cancelled)."""
        try:
            return await asyncio.shield(request.future)
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if caller is not None and caller.cancelling():  # the caller left
                self.cancel(request)
                raise
            raise SyscallCancelled(  # cancelled by the kernel (kill, or an explicit cancel)
                f"{request.id} was cancelled"
                + ("; it had started and may have been applied" if request.started else "")
            ) from None
        finally:
            process.account(request, None)
            self._audit(
                process,
                request.kind,
                request.op,
                request.resource,
                request.decision,
                _outcome(request),
            )

    def _decide(
        self, who: Principal, kind: str, op: str, args: dict[str, Any]
    ) -> tuple[Decision, str]:
        """The access manager's decision for a memory, storage or tool call."""
        destructive = shared_write = False
        resource = ""
        if kind == "tools" and op == "call":
            resource = str(args.get("name", ""))
            if resource in self._resources.tools.registry:
                spec = self._resources.tools.registry.get(resource)
                destructive = spec.annotations.destructive
        elif kind == "storage":
            owner = args.get("owner")
            resource = str(args.get("path", args.get("src", "")))
            if owner is not None and owner != who.name:
                resource = f"@{owner}/{resource}"
                shared_write = op in WRITES
        cap = capability(kind, op, resource)
        return self.access.decide(who, cap, destructive=destructive, shared_write=shared_write)

    async def _approved(
        self,
        process: AgentProcess,
        request: ResourceCall,
        reason: str,
        work: Coroutine[Any, Any, Any],
        args: dict[str, Any],
        step: str | None = None,
    ) -> Any:
        """Wait for a person to allow the call (until its deadline: then it is denied). A
        change to another agent's files is first checked against its shares: a person is
        asked only about what the shares would allow. A durable process's approval keeps its
        id (``ap-PROCESS-STEP``) across a restart, and its decision is journalled: the call
        that is made again on resume is not asked twice."""
        cap = f"{request.kind}.{request.op}:{request.resource}"
        who = process.principal
        if request.kind == "storage" and "owner" in args:
            files, owner = self._resources.files, args["owner"]
            places: list[Any] = [args[k] for k in ("path", "src", "dst") if k in args]
            try:
                for place in places:
                    check = functools.partial(files.writable, who=who, owner=owner, path=place)
                    await self._resources.db.run(check, request.job)
            except BaseException:
                work.close()
                raise
        try:
            known = None
            if step is not None:
                known = await recorded_decision(self.journal, process.id, step)
            if known is not None:  # decided before the kernel restarted
                allowed = known
            else:
                ident = None if step is None else f"ap-{process.id}-{step}"
                allowed, reason = await self._ask(process, request, cap, reason, ident)
                if allowed and step is not None:
                    lease = process_number(process.id)
                    await record_decision(self.journal, process.id, step, allowed, lease)
        except BaseException:
            work.close()
            raise
        if not allowed:
            work.close()  # it never starts
        if not allowed:
            request.decision = "rejected"
            raise PermissionDenied(f"{cap} needs approval and was denied: {reason}")
        request.decision = "approved"
        return await work

    async def _ask(
        self, process: AgentProcess, request: ResourceCall, cap: str, reason: str, ident: str | None
    ) -> tuple[bool, str]:
        """Ask a person; whether they allowed it (before the deadline), and why not."""
        who = process.principal
        pending = self.access.ask(who, process.id, cap, reason, ident=ident)
        if self.tracing is not None:
            self.tracing.approval(request, "asked")
        self.events.publish(
            "approval", principal=who.name, process=process.id, syscall=pending.id,
            state="asked", data={"capability": cap, "call": request.id},
        )  # fmt: skip
        limit = min(self.access.config.approval_timeout, request.job.remaining() or 0.0)
        allowed = False
        try:
            async with asyncio.timeout(max(0.0, limit)):
                allowed = await asyncio.shield(pending.decided)
        except TimeoutError:
            reason = f"no one approved it within {limit:.3g}s ({reason})"
        finally:
            if not pending.decided.done():  # timed out, or the caller left: no longer pending
                pending.decided.set_result(False)
        self.events.publish(
            "approval", principal=who.name, process=process.id, syscall=pending.id,
            state="allowed" if allowed else "denied", data={"capability": cap, "call": request.id},
        )  # fmt: skip
        if self.tracing is not None:
            self.tracing.approval(request, "allowed" if allowed else "denied")
        return allowed, reason

    def _audit(
        self, process: AgentProcess, kind: str, op: str, resource: str, decision: str, outcome: str
    ) -> None:
        """Every syscall ends here once, whatever its outcome (rejections included)."""
        who = process.principal.name
        self.metrics.counted(kind, outcome, who)
        self.audit.record(
            Record(
                time.time(),
                who,
                process.id,
                kind,
                op,
                resource,
                decision,
                outcome,
            )
        )

    async def audit_tail(self, limit: int, principal: str | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` audit records written (``principal``'s only, if given): what
        the console and ``GET /api/v1/audit`` show. What is queued for the writer is waited
        for first, up to a second (so a caller sees its own calls)."""
        from aios.audit import tail

        await self.audit.drain(timeout=1.0)
        return await self._resources.db.run(
            functools.partial(tail, limit=limit, principal=principal)
        )

    def _accept(self, timeout: float | None) -> float:
        """Whether the kernel takes a new syscall now, and its time budget (seconds). While the
        audit writer is ``max_pending`` records behind, new calls are refused (the calls in
        flight still end, and are recorded): see aios.audit."""
        if self._tasks is None:
            raise KernelShutdown("the kernel is not running")
        if self.audit.behind:
            self.audit.refused += 1
            raise Overloaded(
                f"the audit log is {self.audit.pending} records behind (its database is slow); "
                "retry shortly"
            )
        if timeout is not None and not timeout >= MIN_TIMEOUT:
            raise InvalidRequest(
                f"timeout must be >= {MIN_TIMEOUT} seconds (no syscall ends sooner), "
                f"got {timeout!r}"
            )
        return timeout or self.config.syscall_timeout

    async def llm(
        self,
        process: AgentProcess,
        call: LLMCall,
        *,
        timeout: float | None = None,
        priority: int = 0,
        memory: MemoryUse | None = None,
    ) -> Completion:
        """The LLM syscall: queue ``call`` for ``process`` and wait for its completion.
        ``priority`` is a hint for the priority policy (higher runs first); ``memory`` builds
        the prompt from the agent's memory and/or records the exchange in it."""
        async with aclosing(
            self.llm_stream(
                process, call, timeout=timeout, priority=priority, deltas=False, memory=memory
            )
        ) as events:
            async for event in events:
                if isinstance(event, Completion):
                    return event
        raise AssertionError("an LLM syscall ends with a completion or an error")

    async def llm_stream(
        self,
        process: AgentProcess,
        call: LLMCall,
        *,
        timeout: float | None = None,
        priority: int = 0,
        deltas: bool = True,
        memory: MemoryUse | None = None,
    ) -> AsyncGenerator[LLMRequest | str | Completion, None]:
        """The LLM syscall, streamed: the request once it is queued (its id names it for a
        cancel), then its text as it becomes final (never a piece a stop string later cuts
        off), then the :class:`Completion`. Errors before the request is queued raise before
        anything is yielded. Closing the iterator early cancels the call and frees its slot."""
        budget = self._accept(timeout)
        deadline = self.clock() + budget
        core = self.core_for(call.model)
        op = "chat" if call.messages else "complete"
        decision, reason = self.access.decide(process.principal, capability("llm", op, core.name))
        if decision == "denied":  # (approval patterns apply to memory, storage and tool calls)
            self._audit(process, "llm", op, core.name, "denied", "permission_denied")
            raise PermissionDenied(f"llm.{op} is not allowed: {reason}")
        quota = self.access.quota(process.principal, self.config.quota)
        fitted: Fitted | None = None
        asked = call
        if memory is not None and memory.fits:
            try:
                async with asyncio.timeout_at(deadline):
                    call, fitted = await self._from_memory(process, core, call, memory, deadline)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"reading {process.id}'s memory took the whole {budget:g}s; "
                    "the call never started"
                ) from None
        request: LLMRequest | None = None
        completion: Completion | None = None
        try:
            async with AsyncExitStack() as held:
                try:  # waiting for a place under the agent's quota counts against the deadline
                    async with asyncio.timeout_at(deadline):
                        await held.enter_async_context(self.quotas.admit(process.id, quota))
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"{process.id} had {self.quotas.in_flight(process.id)} LLM calls in "
                        f"flight (its max_parallel quota) for {budget:g}s; this call never started"
                    ) from None
                request = core.submit(process.id, call, priority=priority, kind=process.name)
                self._track(process, request)
                yield request
                changed = request.watch() if deltas else None
                sent = 0
                while True:
                    if not await _progress(request, changed, deadline):
                        core.cancel(request)
                        raise DeadlineExceeded(
                            f"{request.id} did not finish within {budget:g}s "
                            f"({request.status.value}); its slot was released"
                        )
                    if deltas and (end := request.stream_end()) > sent:
                        yield request.text[sent:end]
                        sent = end
                    if request.future.done():
                        break
                if request.future.cancelled():
                    raise SyscallCancelled(f"{request.id} was cancelled")
                completion = request.future.result()  # or its typed error
            if fitted is not None:
                completion = dataclasses.replace(completion, context=fitted.to_json())
            if memory is not None and memory.remember:
                await self._remember(process, asked, completion, deadline)
            yield completion
        finally:
            if request is not None:
                core.cancel(request)  # no-op once finished; frees the slot if the caller left
                process.account(request, completion)
                self._audit(
                    process,
                    "llm",
                    op,
                    core.name,
                    "allowed",
                    _outcome(request),
                )
                # Prompt + completion tokens, once the call reached the model.
                if completion is not None or request.timings.admitted is not None:
                    self.quotas.charge(process.id, request.usage.total_tokens, quota)

    async def _from_memory(
        self, process: AgentProcess, core: Core, call: LLMCall, memory: MemoryUse, deadline: float
    ) -> tuple[LLMCall, Fitted]:
        """``call`` with the agent's history and recalled notes, fitted to the context. Both
        are ordinary memory syscalls of the agent (access-checked, approved, audited)."""
        if not call.messages:
            raise InvalidRequest("memory works with chat calls (messages), not a raw prompt")

        async def read(op: str, args: dict[str, Any]) -> Any:
            left = max(deadline - self.clock(), MIN_TIMEOUT)
            return await self.resource(process, "memory", op, args, timeout=left)

        turns: list[dict[str, Any]] = []
        if memory.history:
            turns = await read("history", {"limit": 500})
        notes: list[tuple[int, str]] = []
        query = next((m.content for m in reversed(call.messages) if m.role == "user"), "")
        if memory.recall and any(c.isalnum() for c in query):
            found = await read("search", {"query": query, "limit": memory.recall})
            notes = [(hit["note"]["id"], hit["note"]["text"]) for hit in found]
        count, budget, exact = self._measure(core, call)
        fitted = fit(
            call.messages,
            [Message.coerce({"role": t["role"], "content": t["content"]}) for t in turns],
            notes,
            count,
            budget,
            exact=exact,
        )
        return dataclasses.replace(call, messages=fitted.messages), fitted

    def _measure(self, core: Core, call: LLMCall) -> tuple[Counter, int, bool]:
        """How to count a prompt's tokens on ``core``, and how many it may have."""
        config = core.config
        default: int = getattr(config, "default_max_tokens", 256)
        reserve = call.params.max_tokens or default
        if isinstance(core, LLMCore):
            engine = core.engine
            limit = engine.max_sequence_tokens - reserve
            return (lambda messages: len(engine.tokenize_chat(messages))), limit, True
        return estimate, REMOTE_CONTEXT_TOKENS - reserve, False

    async def _remember(
        self, process: AgentProcess, call: LLMCall, completion: Completion, deadline: float
    ) -> None:
        """Append the call's own turns (not its system prompt) and the answer to the agent's
        history (with ``history=True`` a call carries only its new turns)."""
        turns = [(m.role, m.content) for m in call.messages if m.role != "system"]
        if call.prompt is not None:
            turns.append(("user", call.prompt))
        turns.append(("assistant", completion.text))
        left = deadline - self.clock()
        if left < MIN_TIMEOUT:
            raise DeadlineExceeded(
                "the answer came, but no time was left to record it in the history"
            )
        # A caller who leaves does not cut it short: the history stays whole.
        request = self.submit(process, "memory", "remember", {"turns": turns}, timeout=left)
        await asyncio.shield(self.settle(process, request))

    def _track(self, process: AgentProcess, syscall: Syscall) -> None:
        syscall.observer = functools.partial(self._observed, process)
        # An outcome nobody waits for any more (its agent was stopped) is not an asyncio error.
        syscall.future.add_done_callback(_retrieve)
        if self.tracing is not None:
            self.tracing.opened(process, syscall)
        self._observed(process, syscall, syscall.status.value)
        process.inflight.append(syscall)
        self.syscalls[syscall.id] = (syscall, process)
        self._prune(self.syscalls, MAX_FINISHED, lambda entry: entry[0].status.finished)

    def _observed(self, process: AgentProcess, syscall: Syscall, state: str) -> None:
        """A syscall's state change: to its span, the metrics, the event bus."""
        if self.tracing is not None:
            self.tracing.changed(syscall, state)
        if syscall.status.finished:
            self.metrics.ended(syscall)
        if self.events.watched:
            if isinstance(syscall, ResourceCall):
                op = syscall.op
            else:  # an LLM call: which core has it
                core = syscall.core if isinstance(syscall, LLMRequest) else None
                op = core.name if core is not None else ""
            self.events.publish(
                "syscall",
                principal=process.principal.name,
                process=process.id,
                syscall=syscall.id,
                state=state,
                data={"kind": syscall.kind, "op": op},
            )

    @staticmethod
    def _prune(table: dict[str, V], limit: int, finished: Callable[[V], bool]) -> None:
        """Keep at most ``limit`` finished entries (the oldest go first)."""
        if len(table) <= limit:
            return
        done = [key for key, value in table.items() if finished(value)]
        for key in done[: len(done) - limit // 2]:
            del table[key]


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _outcome(request: Syscall) -> str:
    """How a syscall ended, for the audit log."""
    if request.status.finished and request.error is not None:
        code = request.error.code if isinstance(request.error, AIOSError) else "error"
        return f"failed:{code}"
    return request.status.value if request.status.finished else "abandoned"


async def _progress(request: LLMRequest, changed: asyncio.Event | None, deadline: float) -> bool:
    """Wait until ``request`` ends (or, when watched, makes progress); False at the deadline."""
    if request.future.done():
        return True
    if changed is None:
        done, _ = await asyncio.wait(
            [request.future], timeout=max(0.0, deadline - asyncio.get_running_loop().time())
        )
        return bool(done)
    try:
        async with asyncio.timeout_at(deadline):
            await changed.wait()
    except TimeoutError:
        return False
    changed.clear()
    return True
