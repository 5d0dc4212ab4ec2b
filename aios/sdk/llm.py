"""``self.llm``: typed LLM calls that become syscalls on whatever client the agent runs on."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from json import dumps
from typing import Any, Protocol

from aios.syscall import Completion, LLMCall, MemoryUse, Message, SamplingParams


class SyscallClient(Protocol):
    """How an agent reaches a kernel: in-process today, over HTTP with the same interface."""

    async def llm(
        self, call: LLMCall, *, timeout: float | None = None, memory: MemoryUse | None = None
    ) -> Completion: ...

    async def call(
        self, kind: str, op: str, args: dict[str, Any], *, timeout: float | None = None
    ) -> Any:
        """A memory or storage syscall (see :mod:`aios.sdk.resources`)."""
        ...


class LLM:
    def __init__(self, client: SyscallClient) -> None:
        self._client = client

    async def chat(
        self,
        messages: Sequence[Message | dict[str, Any]],
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Iterable[str] = (),
        json: bool = False,
        json_schema: dict[str, Any] | None = None,
        timeout: float | None = None,
        history: bool = False,
        recall: int = 0,
        remember: bool = False,
    ) -> Completion:
        """Chat completion with the model's chat template. Greedy unless ``temperature > 0``;
        ``json=True`` constrains the output to a JSON object, ``json_schema`` to one matching
        that JSON Schema (a grammar on the embedded core).

        Memory: ``history=True`` puts this agent's conversation history before ``messages``
        (the most recent turns that fit), ``recall=k`` adds its k notes most relevant to the
        last user message, ``remember=True`` appends ``messages`` (not system ones) and the
        answer to the history. The kernel fits it into the context; ``Completion.context``
        says what was used and dropped."""
        call = chat_call(
            messages, model, max_tokens, temperature, top_p, seed, stop, json, json_schema
        )
        memory = MemoryUse(history, recall, remember)
        if memory == MemoryUse():  # clients that predate memory need not know the keyword
            return await self._client.llm(call, timeout=timeout)
        return await self._client.llm(call, timeout=timeout, memory=memory)

    async def complete(
        self,
        prompt: str,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Iterable[str] = (),
        json: bool = False,
        timeout: float | None = None,
    ) -> Completion:
        """Raw text completion (for base models without a chat template)."""
        params = SamplingParams(max_tokens, temperature, top_p, seed, _stops(stop), json)
        call = LLMCall(prompt=prompt, model=model, params=params)
        return await self._client.llm(call, timeout=timeout)


def chat_call(
    messages: Sequence[Message | dict[str, Any]],
    model: str | None = None,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: str | Iterable[str] = (),
    json: bool = False,
    json_schema: dict[str, Any] | None = None,
) -> LLMCall:
    """The LLM call of a chat request (shared by the async and the blocking clients)."""
    schema = None if json_schema is None else dumps(json_schema)
    return LLMCall(
        messages=tuple(Message.coerce(m) for m in messages),
        model=model,
        params=SamplingParams(
            max_tokens, temperature, top_p, seed, _stops(stop), json, json_schema=schema
        ),
    )


def _stops(stop: str | Iterable[str]) -> tuple[str, ...]:
    """One string is one stop string (OpenAI style), not a set of characters."""
    return (stop,) if isinstance(stop, str) else tuple(stop)
