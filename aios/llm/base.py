"""What the kernel asks of an LLM core, whatever runs it.

Three kinds satisfy :class:`Core`: the embedded :class:`~aios.llm.core.LLMCore` (llama.cpp in
this process), :class:`~aios.llm.openai_compat.RemoteCore` (an OpenAI-compatible server over
HTTP) and :class:`~aios.llm.router.Router` (one model name over several cores). The kernel
builds them from config, starts them, runs each one's ``run()`` in its task group until
shutdown, and sends every LLM syscall to one of them with ``submit``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

from aios.config import AnyCoreConfig, CoreConfig, RemoteCoreConfig
from aios.errors import AIOSError, CoreError, KernelShutdown, Overloaded
from aios.syscall import AgentLedger, LLMCall, LLMRequest

log = logging.getLogger(__name__)
R = TypeVar("R", bound=LLMRequest)


class AgentBook:
    """What a core keeps per agent for its scheduling policy: each agent's ledger of attained
    service, and an output-length predictor (an EMA of past lengths per agent kind and call
    index, falling back to the kind's EMA over all its calls)."""

    def __init__(self) -> None:
        self._ledgers: dict[str, AgentLedger] = {}
        self._lengths: dict[tuple[str, int], float] = {}

    def enroll(self, request: LLMRequest, kind: str) -> None:
        """Attach ``request`` to its agent's ledger and predict its output length."""
        ledger = self._ledgers.setdefault(request.agent, AgentLedger())
        request.ledger = ledger
        request.program = kind
        request.call_index = ledger.calls
        ledger.calls += 1
        lengths = self._lengths
        predicted = lengths.get((kind, request.call_index)) or lengths.get((kind, -1))
        if predicted is not None:
            request.predicted_tokens = max(1, min(request.max_tokens, round(predicted)))

    def learn(self, request: LLMRequest) -> None:
        """A request finished: fold its output length into the predictor."""
        new = float(request.generated)
        for key in ((request.program, request.call_index), (request.program, -1)):
            old = self._lengths.get(key)
            self._lengths[key] = new if old is None else 0.5 * old + 0.5 * new

    def forget(self, agent: str) -> None:
        self._ledgers.pop(agent, None)


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


class Counted(Protocol):
    """The counters a queueing core updates here."""

    cancelled: int


class CoreQueue(Generic[R]):
    """What the embedded and the remote core share: the queue of waiting requests, the
    per-agent book, the wake event of the loop, the closed and dead states, the checks before
    a call is queued, withdrawal by the caller, and what a crash of the loop leaves. A
    subclass says how a request leaves it (``_withdraw``), how everything fails
    (``_fail_all``) and whether it can take calls yet (``_check_started``)."""

    name: str
    config: CoreConfig | RemoteCoreConfig
    stats: Counted

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._waiting: deque[R] = deque()
        self._book = AgentBook()  # per-agent ledgers and output-length predictions
        self._wake = asyncio.Event()
        self._closed = False
        self._dead: CoreError | None = None

    def _admissible(self) -> None:
        """Raise the error a call gets if it cannot be queued now."""
        if self._closed:
            raise KernelShutdown("the kernel is shutting down")
        if self._dead is not None:
            raise self._dead
        self._check_started()
        if len(self._waiting) >= self.config.max_queue:
            raise Overloaded(
                f"core {self.name!r} has {len(self._waiting)} calls queued; retry later"
            )

    def _enqueue(self, request: R, kind: str) -> R:
        """Queue ``request`` (it knows its core; ``kind`` keys its length prediction)."""
        request.core = self  # type: ignore[assignment]  # every subclass satisfies Core
        self._book.enroll(request, kind)
        self._waiting.append(request)
        self._wake.set()
        return request

    def cancel(self, request: LLMRequest) -> None:
        """Withdraw a request (caller gone or deadline passed); frees what it held.
        Idempotent."""
        if request.status.finished:
            return
        self._withdraw(self._own(request))
        request.cancel(self._clock())
        self.stats.cancelled += 1
        self._wake.set()

    def _stopped(self, error: Exception) -> None:
        """The loop itself failed: the core is dead, and no caller may be left hanging."""
        log.exception("core %r stopped", self.name, exc_info=error)
        self._dead = CoreError(f"core {self.name!r} stopped: {type(error).__name__}: {error}")
        self._fail_all(self._dead)

    def _own(self, request: LLMRequest) -> R:
        """``request``, as one of this core's (a request of another core is a CoreError)."""
        owner: object = request.core
        if owner is not self:
            raise CoreError(f"{request.id} is not a request of core {self.name!r}")
        return request  # type: ignore[return-value]  # it was queued here, as an R

    def _check_started(self) -> None:
        """Raise CoreError if the core cannot take calls yet."""

    def _withdraw(self, request: R) -> None:
        raise NotImplementedError

    def _fail_all(self, error: AIOSError) -> None:
        raise NotImplementedError

    @property
    def queued(self) -> int:
        """Requests waiting in the queue (pre-empted ones included)."""
        return len(self._waiting)


def capacity_of(core: Core) -> int:
    """How many requests the core runs at once (its slots, or its in-flight HTTP requests):
    the unit a router normalizes load by."""
    config = core.config
    if isinstance(config, CoreConfig):
        return config.slots
    if isinstance(config, RemoteCoreConfig):
        return config.max_inflight
    return 1
