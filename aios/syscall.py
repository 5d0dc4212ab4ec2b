"""Syscall objects: typed payloads and the one request object that carries a call's state.

A :class:`Syscall` is created by the kernel for every call an agent makes. It holds everything
about that call: payload, status, timestamps, usage, and the future its caller awaits. Status
changes only through the named transitions below, so "finished" is derived, never guessed.
"""

from __future__ import annotations

import asyncio
import codecs
import enum
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from aios.errors import InvalidRequest

if TYPE_CHECKING:
    from aios.llm.base import Core
    from aios.tracing import SpanRecord

Role = Literal["system", "user", "assistant"]
ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})


class Status(enum.Enum):
    """Life of a syscall: QUEUED -> RUNNING -> one of DONE, FAILED, CANCELLED."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED)


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    @staticmethod
    def coerce(value: Message | dict[str, Any]) -> Message:
        """Accept a Message or an OpenAI-style dict; reject anything else clearly."""
        if isinstance(value, Message):
            return value
        if not isinstance(value, dict):
            raise InvalidRequest(
                f"a message must be a dict with 'role' and 'content', got {value!r}"
            )
        role, content = value.get("role"), value.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequest(f"message role must be one of {sorted(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise InvalidRequest(f"message content must be a string, got {type(content).__name__}")
        return Message(role, content)  # type: ignore[arg-type]  # checked against ROLES


# Below this a temperature is greedy (0): at 1e-4, logits 0.01 apart already differ in
# probability by e^100, so sampling could only differ from greedy on exact ties, while far
# smaller values overflow float32 logits (1e-40 made llama.cpp's grammar sampler abort).
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class SamplingParams:
    """How to generate. ``max_tokens=None`` means: as many as the context allows, up to the
    core's default. ``temperature=0`` is greedy decoding (deterministic), and so is any
    temperature below ``MIN_TEMPERATURE`` (normalized to 0 here, on every route)."""

    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    json: bool = False
    ignore_eos: bool = False
    # A JSON Schema (serialized) the output must match; implies JSON output. The embedded core
    # compiles it to a grammar, remote cores send it as ``response_format`` ``json_schema``.
    json_schema: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise InvalidRequest(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        for name in ("temperature", "top_p"):
            if not isinstance(getattr(self, name), int | float) or isinstance(
                getattr(self, name), bool
            ):
                raise InvalidRequest(f"{name} must be a number, got {getattr(self, name)!r}")
        if not 0.0 <= self.temperature <= 10.0:
            raise InvalidRequest(f"temperature must be in [0, 10], got {self.temperature!r}")
        if self.temperature < MIN_TEMPERATURE:
            object.__setattr__(self, "temperature", 0.0)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
            raise InvalidRequest(f"seed must be in [0, 2**32), got {self.seed!r}")
        if len(self.stop) > 8 or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop must be at most 8 non-empty strings")
        if self.json_schema is not None:
            try:
                schema = json.loads(self.json_schema)
            except (TypeError, ValueError):
                raise InvalidRequest(
                    "json_schema must be a JSON Schema serialized as a string"
                ) from None
            if not isinstance(schema, dict):
                raise InvalidRequest("json_schema must be a JSON object (a JSON Schema)")
            from aios.llm.grammar import check_schema

            check_schema(schema)  # an embedded core compiles it when it accepts the call

    @property
    def json_output(self) -> bool:
        """The output is constrained to JSON (an object, or one matching ``json_schema``)."""
        return self.json or self.json_schema is not None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class LLMCall:
    """Payload of an LLM syscall: chat ``messages`` (rendered with the model's chat template)
    or a raw ``prompt`` (completion, for base models), exactly one of the two."""

    messages: tuple[Message, ...] = ()
    prompt: str | None = None
    model: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)

    def __post_init__(self) -> None:
        if bool(self.messages) == (self.prompt is not None):
            raise InvalidRequest("give exactly one of 'messages' (chat) or 'prompt' (completion)")
        if self.prompt is not None and not self.prompt:
            raise InvalidRequest("prompt must not be empty")


@dataclass(frozen=True)
class MemoryUse:
    """How a chat call uses its agent's memory. ``history``: put the agent's conversation
    history before the call's messages (the most recent turns that fit); ``recall``: add the
    agent's ``recall`` notes most relevant to the last user message; ``remember``: append the
    call's new messages and the answer to the history. The kernel fits it all into the
    model's context and reports what it dropped (``Completion.context``)."""

    history: bool = False
    recall: int = 0
    remember: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.recall) or not 0 <= self.recall <= 50:
            raise InvalidRequest(f"recall must be an integer in [0, 50], got {self.recall!r}")
        for name in ("history", "remember"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequest(f"{name} must be true or false")

    @property
    def fits(self) -> bool:
        """The call's prompt is built from memory (and fitted to the context)."""
        return self.history or self.recall > 0


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Timings:
    """Monotonic clock readings (seconds). ``None`` until the event happens."""

    submitted: float
    admitted: float | None = None
    first_token: float | None = None
    finished: float | None = None

    @property
    def waited(self) -> float:
        """Time spent queued before admission (so far, if never admitted)."""
        end = self.admitted if self.admitted is not None else self.finished
        return 0.0 if end is None else end - self.submitted


@dataclass(frozen=True)
class Completion:
    """Result of an LLM syscall."""

    text: str
    finish_reason: Literal["stop", "length"]
    usage: Usage
    timings: Timings
    model: str
    syscall_id: str
    # With memory: what went into the prompt, and what was dropped (see aios.memory.fit).
    context: dict[str, Any] | None = None


_ids = itertools.count(1)


@dataclass
class AgentLedger:
    """Per-agent service attained on a core, in token-equivalents (decode tokens, plus prefill
    tokens weighted by their relative cost). Shared by all of that agent's requests."""

    service: float = 0.0
    calls: int = 0


class Syscall:
    """Base request object: identity, status, timings and the caller's future."""

    kind: str = "syscall"

    def __init__(self, agent: str, now: float, *, priority: int = 0) -> None:
        self.id = f"sc-{next(_ids)}"
        self.agent = agent
        self.priority = priority
        self.status = Status.QUEUED
        self.timings = Timings(submitted=now)
        self.error: BaseException | None = None
        self.future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.changed: asyncio.Event | None = None  # see watch()
        # Told of each state change (the kernel publishes it on its event bus: aios.events).
        self.observer: Callable[[Syscall, str], None] | None = None
        self.span: SpanRecord | None = None  # its trace span, when the kernel traces (aios.tracing)

    def watch(self) -> asyncio.Event:
        """An event set whenever the call makes progress (a token) or ends; the watcher
        clears it. Only watched calls pay for the notifications."""
        if self.changed is None:
            self.changed = asyncio.Event()
            if self.status.finished:
                self.changed.set()
        return self.changed

    # -- transitions ---------------------------------------------------------------------
    def admit(self, now: float) -> None:
        assert self.status is Status.QUEUED, self.status
        self.status = Status.RUNNING
        if self.timings.admitted is None:  # a re-admission after pre-emption keeps the first
            self.timings.admitted = now
        if self.observer is not None:
            self.observer(self, "running")

    def preempt(self) -> None:
        """RUNNING -> QUEUED: the resource was taken back; the call waits to be re-admitted."""
        assert self.status is Status.RUNNING, self.status
        self.status = Status.QUEUED
        if self.observer is not None:
            self.observer(self, "preempted")

    def complete(self, now: float, result: Any) -> None:
        self._end(Status.DONE, now)
        if not self.future.done():
            self.future.set_result(result)

    def fail(self, now: float, error: BaseException) -> None:
        self.error = error
        self._end(Status.FAILED, now)
        if not self.future.done():
            self.future.set_exception(error)

    def cancel(self, now: float) -> None:
        self._end(Status.CANCELLED, now)
        self.future.cancel()

    def _end(self, status: Status, now: float) -> None:
        assert not self.status.finished, f"{self.id} already {self.status.value}"
        self.status = status
        self.timings.finished = now
        if self.changed is not None:
            self.changed.set()
        if self.observer is not None:
            self.observer(self, status.value)


class LLMRequest(Syscall):
    """An LLM syscall and all of its generation state on a core."""

    kind = "llm"

    def __init__(
        self,
        agent: str,
        now: float,
        call: LLMCall,
        prompt_tokens: list[int],
        max_tokens: int,
        *,
        priority: int = 0,
    ) -> None:
        super().__init__(agent, now, priority=priority)
        self.call = call
        self.params = call.params
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        self.output_tokens: list[int] = []
        self.text = ""
        self.finish_reason: Literal["stop", "length"] | None = None
        self.slot: int | None = None
        self.n_prefilled = 0  # prompt tokens already in the KV cache
        # Scheduling inputs, maintained by the core (see aios.scheduler.base.Schedulable).
        self.ledger = AgentLedger()  # replaced by the core with the agent's shared ledger
        self.predicted_tokens = max_tokens
        self.admitted_at_output = 0  # len(output_tokens) at the last admission
        self.preemptions = 0
        self.snapshot: str | None = None  # key of its saved context while pre-empted
        self.reused_tokens = 0  # prompt tokens found in the KV cache at admission
        self.kv_len = 0  # positions of this request in its slot's KV after the planned step
        self.program = ""  # the agent's program name (keys the output-length predictor)
        self.defer_on: LLMRequest | None = None  # waits for this one's prefill to copy it
        self.defer_n = 0  # ... up to this many tokens
        self.call_index = 0  # how many calls its agent made on this core before this one
        self.core: Core | None = None  # the core that accepted it (set by the core at submit)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def kv_need(self) -> int:
        """KV cells this request may occupy at most (reserved on admission)."""
        return len(self.prompt_tokens) + self.max_tokens

    def admit(self, now: float) -> None:
        super().admit(now)
        self.admitted_at_output = len(self.output_tokens)

    def preempt(self) -> None:
        super().preempt()
        self.preemptions += 1
        self.slot = None

    restarts = 0  # times restart() ran (a core restarts a call at most once)

    def restart(self) -> None:
        """Back to the queue to run again from scratch: the engine that held its KV, and
        everything it generated, is gone. Keeps its submit and first admission times."""
        assert not self.status.finished, self.status
        self.status = Status.QUEUED
        if self.observer is not None:
            self.observer(self, "restarted")
        self.restarts += 1
        self.output_tokens = []
        self.text = ""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.finish_reason = None
        self.n_prefilled = self.kv_len = self.reused_tokens = 0
        self.slot = None
        self.snapshot = None
        self.defer_on = None
        self.defer_n = 0
        self.admitted_at_output = 0
        self.timings.first_token = None

    @property
    def run_tokens(self) -> int:
        """Tokens generated since the last admission (what a round-robin quantum counts)."""
        return len(self.output_tokens) - self.admitted_at_output

    @property
    def generated(self) -> int:
        return len(self.output_tokens)

    @property
    def agent_service(self) -> float:
        """LLM service the request's agent has received on this core so far."""
        return self.ledger.service

    @property
    def prefilling(self) -> bool:
        return self.n_prefilled < len(self.prompt_tokens)

    @property
    def usage(self) -> Usage:
        return Usage(len(self.prompt_tokens), len(self.output_tokens))

    def stream_end(self) -> int:
        """How much of ``text`` is final: all of it once the call ended; before that, all but
        a tail that could still become a stop string (and be cut off)."""
        text = self.text
        if self.status.finished or not self.params.stop:
            return len(text)
        longest = min(len(text), max(len(s) for s in self.params.stop) - 1)
        for keep in range(longest, 0, -1):
            tail = text[-keep:]
            if any(stop.startswith(tail) for stop in self.params.stop):
                return len(text) - keep
        return len(text)

    def append(self, token: int, piece: bytes) -> None:
        """Record one sampled token and its text, then apply stop strings and JSON mode."""
        self.output_tokens.append(token)
        if self.changed is not None:
            self.changed.set()
        before = len(self.text)
        self.text += self._utf8.decode(piece)
        # Search only where a new match can start (the new text plus a stop-length overlap);
        # the earliest match in the text wins, whatever the order of the stop strings.
        hits = [
            at
            for stop in self.params.stop
            if (at := self.text.find(stop, max(0, before - len(stop) + 1))) >= 0
        ]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"
            return
        if self.params.json_output and self.text.rstrip().endswith("}") and _is_json(self.text):
            self.finish_reason = "stop"
        elif len(self.output_tokens) >= self.max_tokens:
            self.finish_reason = "length"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
