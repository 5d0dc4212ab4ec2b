"""The SDK over HTTP: agents outside the kernel's process, with the in-process interface.

    async with AsyncClient("http://127.0.0.1:8080", token) as client:
        answer = await MyAgent(client).run("task")        # the same Agent class as in-process
        async for text in client.stream(call): ...         # tokens as they are generated

    with Client("http://127.0.0.1:8080", token) as client:  # blocking
        print(client.chat([{"role": "user", "content": "hi"}]).text)

Errors come back as the same typed exceptions the kernel raises in-process (mapped from the
error envelope's ``type``); ``QuotaExceeded`` and ``Overloaded`` carry the server's Retry-After.
Connection failures (nothing reached the server) are retried with exponential backoff; a
connection lost mid-call is not (the call may have run): it raises :class:`Unreachable`.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any

import httpx

from aios.errors import (
    AIOSError,
    Overloaded,
    QuotaExceeded,
    Unreachable,
    error_classes,
)
from aios.sdk.llm import chat_call
from aios.syscall import Completion, LLMCall, MemoryUse, Message, Timings, Usage

DEFAULT_TIMEOUT = 600.0


def call_body(
    call: LLMCall, timeout: float | None, stream: bool, memory: MemoryUse | None = None
) -> tuple[str, dict[str, Any]]:
    """The route and JSON body of an LLM syscall."""
    p = call.params
    body: dict[str, Any] = {
        "model": call.model,
        "max_tokens": p.max_tokens,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "seed": p.seed,
        "stop": list(p.stop),
        "json": p.json,
        "stream": stream,
    }
    if p.json_schema is not None:
        body["json_schema"] = json.loads(p.json_schema)
    if timeout is not None:
        body["timeout"] = timeout
    if call.prompt is not None:
        return "/api/v1/llm/complete", {**body, "prompt": call.prompt}
    messages = [{"role": m.role, "content": m.content} for m in call.messages]
    if memory is not None:
        body["memory"] = dataclasses.asdict(memory)
    return "/api/v1/llm/chat", {**body, "messages": messages}


def resource_request(
    kind: str, op: str, args: dict[str, Any], timeout: float | None
) -> tuple[str, dict[str, Any]]:
    """The route and httpx keyword arguments of a memory or storage syscall."""
    content = args.get("content")
    if isinstance(content, bytes | bytearray):
        args = {**args, "content": {"base64": base64.b64encode(content).decode()}}
    params = {} if timeout is None else {"timeout": timeout}
    return f"/api/v1/{kind}/{op}", {"json": args, "params": params}


IDEMPOTENCY_HEADER = "Idempotency-Key"


def keyed(key: str | None) -> dict[str, str]:
    """The headers of a call with an idempotency key (none without one)."""
    return {} if key is None else {IDEMPOTENCY_HEADER: key}


def decode_bytes(value: Any) -> Any:
    """A result from JSON: ``{"base64": ...}`` (file content) becomes bytes again."""
    if isinstance(value, dict):
        if set(value) == {"base64"} and isinstance(value["base64"], str):
            return base64.b64decode(value["base64"])
        return {k: decode_bytes(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_bytes(v) for v in value]
    return value


def completion_of(envelope: dict[str, Any], started: float) -> Completion:
    result, t = envelope["result"], envelope.get("timings") or {}
    admitted = started + (t.get("queued_s") or 0.0) + (t.get("waited_s") or 0.0)
    return Completion(
        text=result["text"],
        finish_reason=result["finish_reason"],
        usage=Usage(result["usage"]["prompt_tokens"], result["usage"]["completion_tokens"]),
        timings=Timings(
            submitted=started,
            admitted=admitted,
            finished=started + (t.get("total_s") or 0.0),
        ),
        model=result["model"],
        syscall_id=envelope["id"],
        context=result.get("context"),
    )


def error_of(status: int, body: Any, headers: httpx.Headers) -> AIOSError:
    """The typed exception of an error response."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return AIOSError(f"HTTP {status}: {str(body)[:200]}")
    code = str(error.get("type") or error.get("code") or "aios_error")
    message = str(error.get("message", ""))
    cls = error_classes().get(code, AIOSError)
    if cls in (QuotaExceeded, Overloaded):
        retry = float(headers.get("retry-after", "1") or 1)
        return cls(message, retry_after=retry)
    return cls(message)


class SSEReader:
    """Reads the syscall stream's SSE lines: token texts, then the completion (or raises
    the stream's error)."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.event = ""

    def feed(self, line: str) -> str | Completion | None:
        if line.startswith("event: "):
            self.event = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            if self.event == "token":
                return str(data["text"])
            if self.event == "result":
                return completion_of(data, self.started)
            if self.event == "error":
                raise error_of(500, data, httpx.Headers())
        return None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


class _Base:
    def __init__(self, base_url: str, token: str, retries: int, backoff: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"authorization": f"Bearer {token}"}
        self.retries = retries
        self.backoff = backoff

    def _retry_delay(self, error: httpx.TransportError, attempt: int, keyed: bool) -> float:
        """Seconds to wait before retrying after ``error``, or raise :class:`Unreachable`:
        a failure to connect (nothing reached the server) is retried, ``retries`` times; so is
        a connection lost mid-call when the call carries an ``Idempotency-Key`` (``keyed``: the
        kernel answers a repeat with the first answer, never a second run)."""
        if not keyed and not isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
            raise Unreachable(f"lost the connection to {self.base_url}: {error}") from None
        if attempt == self.retries:
            raise Unreachable(f"cannot reach the kernel at {self.base_url}: {error}") from None
        return float(min(self.backoff * 2**attempt, 5.0))

    @staticmethod
    def _check(response: httpx.Response) -> Any:
        body = _json(response)
        if response.status_code >= 400:
            raise error_of(response.status_code, body, response.headers)
        return body


class AsyncClient(_Base):
    """An async client of one agent (its token). Implements the SDK's ``SyscallClient``, so
    ``MyAgent(AsyncClient(url, token))`` runs an agent over HTTP unchanged."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, retries, backoff)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kw: Any) -> Any:
        attempt, keyed = 0, IDEMPOTENCY_HEADER in kw.get("headers", {})
        while True:
            try:
                return self._check(await self._http.request(method, path, **kw))
            except httpx.TransportError as e:
                delay = self._retry_delay(e, attempt, keyed)
            await asyncio.sleep(delay)  # backoff before a bounded retry
            attempt += 1

    async def llm(
        self,
        call: LLMCall,
        *,
        timeout: float | None = None,
        memory: MemoryUse | None = None,
        idempotency_key: str | None = None,
    ) -> Completion:
        """An LLM syscall. With ``idempotency_key`` a repeat (a retry after a lost connection,
        or after a restart of the kernel) answers with the first call's result."""
        path, body = call_body(call, timeout, stream=False, memory=memory)
        started = time.monotonic()
        envelope = await self.request("POST", path, json=body, headers=keyed(idempotency_key))
        return completion_of(envelope, started)

    async def call(
        self,
        kind: str,
        op: str,
        args: dict[str, Any],
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """A memory or storage syscall (what ``Agent.memory`` and ``Agent.storage`` use);
        ``idempotency_key`` as for :meth:`llm`."""
        path, kw = resource_request(kind, op, args, timeout)
        envelope = await self.request("POST", path, headers=keyed(idempotency_key), **kw)
        return decode_bytes(envelope["result"])

    async def stream(
        self, call: LLMCall, *, timeout: float | None = None
    ) -> AsyncIterator[str | Completion]:
        """The call's text as it is generated, then its :class:`Completion`. Leaving the loop
        early closes the connection, which cancels the call in the kernel."""
        path, body = call_body(call, timeout, stream=True)
        started = time.monotonic()
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._check(response)
                frames = SSEReader(started)
                async for line in response.aiter_lines():
                    if (item := frames.feed(line)) is not None:
                        yield item
        except httpx.TransportError as e:
            raise Unreachable(f"lost the connection to {self.base_url}: {e}") from None

    async def chat(self, messages: Sequence[Message | dict[str, Any]], **kw: Any) -> Completion:
        timeout = kw.pop("timeout", None)
        return await self.llm(chat_call(messages, **kw), timeout=timeout)

    async def cancel(self, syscall_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", f"/api/v1/syscalls/{syscall_id}/cancel")
        return result

    async def processes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self.request("GET", "/api/v1/processes")
        return result

    async def spawn(self, agent: str, task: str) -> dict[str, Any]:
        body = {"agent": agent, "task": task}
        result: dict[str, Any] = await self.request("POST", "/api/v1/processes", json=body)
        return result

    async def wait(self, process_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The process once it finished (or after ``timeout`` seconds, as it is then)."""
        params = {"wait": timeout}
        result: dict[str, Any] = await self.request(
            "GET", f"/api/v1/processes/{process_id}", params=params, timeout=timeout + 30
        )
        return result

    async def kill(self, process_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("DELETE", f"/api/v1/processes/{process_id}")
        return result


class Client(_Base):
    """The blocking client: the same calls, for scripts and tools without an event loop."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 3,
        backoff: float = 0.2,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(base_url, token, retries, backoff)
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=self._headers,
            timeout=httpx.Timeout(timeout, connect=10.0),
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kw: Any) -> Any:
        attempt, keyed = 0, IDEMPOTENCY_HEADER in kw.get("headers", {})
        while True:
            try:
                return self._check(self._http.request(method, path, **kw))
            except httpx.TransportError as e:
                delay = self._retry_delay(e, attempt, keyed)
            time.sleep(delay)  # a blocking client's backoff before a bounded retry
            attempt += 1

    def llm(
        self, call: LLMCall, *, timeout: float | None = None, idempotency_key: str | None = None
    ) -> Completion:
        path, body = call_body(call, timeout, stream=False)
        started = time.monotonic()
        envelope = self.request("POST", path, json=body, headers=keyed(idempotency_key))
        return completion_of(envelope, started)

    def chat(self, messages: Sequence[Message | dict[str, Any]], **kw: Any) -> Completion:
        timeout = kw.pop("timeout", None)
        return self.llm(chat_call(messages, **kw), timeout=timeout)

    def call(
        self,
        kind: str,
        op: str,
        args: dict[str, Any],
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """A memory or storage syscall: ``client.call("storage", "ls", {"path": ""})``."""
        path, kw = resource_request(kind, op, args, timeout)
        envelope = self.request("POST", path, headers=keyed(idempotency_key), **kw)
        return decode_bytes(envelope["result"])

    def stream(self, call: LLMCall, *, timeout: float | None = None) -> Iterator[str | Completion]:
        path, body = call_body(call, timeout, stream=True)
        started = time.monotonic()
        try:
            with self._http.stream("POST", path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                frames = SSEReader(started)
                for line in response.iter_lines():
                    if (item := frames.feed(line)) is not None:
                        yield item
        except httpx.TransportError as e:
            raise Unreachable(f"lost the connection to {self.base_url}: {e}") from None

    def events(self) -> Iterator[dict[str, Any]]:
        """The kernel's event stream (``GET /api/v1/events``): one dict per event, as they
        happen, until the kernel stops or the iterator is closed. Yours only, unless admin."""
        try:
            with self._http.stream("GET", "/api/v1/events", timeout=None) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                name = ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: ") and name != "ready":
                        yield json.loads(line[6:])
        except httpx.TransportError as e:
            raise Unreachable(f"lost the connection to {self.base_url}: {e}") from None

    def cores(self) -> list[dict[str, Any]]:
        """The kernel's LLM cores: queues, counters, an embedded core's KV cache."""
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/cores")
        return result

    def processes(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", "/api/v1/processes")
        return result

    def spawn(self, agent: str, task: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "POST", "/api/v1/processes", json={"agent": agent, "task": task}
        )
        return result

    def wait(self, process_id: str, timeout: float = 30.0) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            "GET",
            f"/api/v1/processes/{process_id}",
            params={"wait": timeout},
            timeout=timeout + 30,
        )
        return result

    def kill(self, process_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.request("DELETE", f"/api/v1/processes/{process_id}")
        return result
