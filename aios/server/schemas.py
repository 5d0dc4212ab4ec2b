"""The syscall API's request and response bodies (these models are the OpenAPI schema)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from aios.syscall import LLMCall, MemoryUse, Message, SamplingParams


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class MessageIn(_Strict):
    role: Literal["system", "user", "assistant"]
    content: str


class LLMParams(_Strict):
    model: str | None = Field(None, description="Core name; the kernel's default if omitted.")
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=10, description="0 is greedy (deterministic).")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stop: str | list[str] = Field(default_factory=list, description="At most 8 stop strings.")
    json_mode: bool = Field(False, alias="json", description="Constrain the output to JSON.")
    json_schema: dict[str, Any] | None = Field(None, description="A JSON Schema to match.")
    priority: int = Field(0, ge=-1000, le=1000, description="Hint for the priority policy.")
    timeout: float | None = Field(None, gt=0, description="Deadline in seconds.")
    stream: bool = Field(False, description="Server-Sent Events: syscall, token..., result.")

    def sampling(self) -> SamplingParams:
        import json

        return SamplingParams(
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            seed=self.seed,
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop),
            json=self.json_mode,
            json_schema=None if self.json_schema is None else json.dumps(self.json_schema),
        )


class MemoryIn(_Strict):
    history: bool = Field(False, description="Put your conversation history first.")
    recall: int = Field(0, ge=0, le=50, description="Add this many of your relevant notes.")
    remember: bool = Field(False, description="Append this call and its answer to history.")

    def use(self) -> MemoryUse:
        return MemoryUse(self.history, self.recall, self.remember)


class ChatIn(LLMParams):
    messages: list[MessageIn] = Field(min_length=1)
    memory: MemoryIn | None = Field(None, description="Use your memory (fitted to the context).")

    def call(self) -> LLMCall:
        messages = tuple(Message(m.role, m.content) for m in self.messages)
        return LLMCall(messages=messages, model=self.model, params=self.sampling())


class CompleteIn(LLMParams):
    prompt: str = Field(min_length=1)

    def call(self) -> LLMCall:
        return LLMCall(prompt=self.prompt, model=self.model, params=self.sampling())


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class LLMResultOut(BaseModel):
    text: str
    finish_reason: Literal["stop", "length"]
    usage: UsageOut
    model: str


class ErrorOut(BaseModel):
    type: str = Field(description="A stable code: invalid_request, quota_exceeded, ...")
    message: str


class TimingsOut(BaseModel):
    queued_s: float | None = Field(
        None,
        description="From receipt to the core's queue: validation (a json_schema is compiled "
        "here), memory fitting, the wait for a max_parallel quota place, tokenization. Not "
        "seen by /api/v1/cores (see quota_waiting in /api/v1/processes).",
    )
    waited_s: float | None = Field(None, description="In the core's queue (its queued count).")
    ran_s: float | None = Field(None, description="On the core, admission to the end.")
    total_s: float | None = Field(None, description="From receipt to the end.")


class SyscallOut(BaseModel):
    """Every syscall result and every error of this API has this shape."""

    id: str | None = Field(description="The syscall id (null when nothing was queued).")
    kind: str
    agent: str | None
    status: Literal["queued", "running", "done", "failed", "cancelled", "rejected"]
    result: LLMResultOut | None = None
    error: ErrorOut | None = None
    timings: TimingsOut | None = None
    trace_id: str | None = Field(
        None, description="The W3C trace id of the syscall's span, when the kernel traces."
    )


class SpawnIn(_Strict):
    agent: str = Field(description="An agent program the kernel knows (see `aios agents`).")
    task: str = Field(min_length=1, max_length=100_000)


class ProcessOut(BaseModel):
    id: str
    name: str
    owner: str | None
    state: Literal["running", "idle", "queued", "generating", "done", "failed"]
    task: str
    syscalls: int
    prompt_tokens: int
    completion_tokens: int
    waited_s: float
    age_s: float
    turnaround_s: float | None
    inflight: list[str]
    quota_waiting: int = Field(
        description="LLM calls waiting for a max_parallel quota place: not yet in any core's "
        "queue, so neither in inflight nor in /api/v1/cores."
    )
    result: str | None
    error: str | None


class AgentIn(_Strict):
    name: str
    groups: list[str] = Field(default_factory=list)


class AgentOut(BaseModel):
    name: str
    groups: list[str]
    admin: bool
    token: str | None = Field(None, description="Shown once, when the agent is created.")


class CoreOut(BaseModel):
    name: str
    kind: str
    queued: int
    active: int
    completed: int
    failed: int
    cancelled: int
    preemptions: int
    # An embedded core's only:
    slots: int | None = None
    cached: int | None = None
    parked: int | None = None
    preempted: int | None = None
    kv_cells_used: int | None = None
    kv_cells_reserved: int | None = None
    kv_cells: int | None = None
    prefill_tokens: int | None = None
    reused_tokens: int | None = None
    decode_tokens: int | None = None
    busy_seconds: float | None = None
    engine_crashes: int | None = None
