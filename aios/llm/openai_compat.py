"""A remote LLM core: any OpenAI-compatible server (vLLM, SGLang, Ollama, llama-server,
llama-cpp-python's server, OpenAI) under the kernel's scheduler.

The server batches and holds the KV cache; the kernel still decides *who goes next*. The core
keeps its own queue and calls the same pure :class:`~aios.scheduler.Policy` as the embedded
core, with ``Capacity(free in-flight slots, unbounded KV)``: at most ``max_inflight`` HTTP
requests are in flight at once (the HTTP connection pool has the same bound), so FIFO, round
robin, priority and fair share order the calls even though the server batches whatever it gets.
Each admitted request is served by one asyncio task (``max_inflight`` at most, all owned by the
core and cancelled when it closes) that streams ``chat/completions`` (or ``completions`` for a
raw prompt) as server-sent events. Nothing polls: the loop sleeps on an event that submissions,
cancellations, finished tasks and streamed chunks (when someone waits) set.

Tokens. A remote core has no tokenizer. A prompt counts ``len(text) // 4`` tokens for
scheduling; each streamed chunk counts one output token (llama.cpp and vLLM send one token per
chunk unless they coalesce). The :class:`~aios.syscall.Completion` reports the server's own
``usage`` when the server sends it (``stream_options.include_usage``; llama-cpp-python's server
does not, and then the estimates stand in).

Failures become typed errors, never a traceback: connection errors, 429 and 5xx are retried
with exponential backoff and jitter (``Retry-After`` is honoured, capped at ``max_backoff``); a
server that cannot be reached, stops answering (read timeout) or returns 502/503/504 raises
:class:`~aios.errors.CoreUnavailable` (and the calls queued behind it fail at once, so a router
moves them elsewhere without waiting); 429 becomes ``Overloaded``, 400 ``InvalidRequest`` (or
``ContextOverflow``), 404 ``ModelNotFound``, anything else ``CoreError``. A retry never starts
the answer over: once tokens have streamed, every retry resumes from the text snapshot below.

Pre-emption is a text snapshot. When the policy pre-empts a request, its stream is cancelled
(the server frees the sequence when the connection closes) and the partial text is kept. On
re-admission the request resumes: the conversation is sent again plus an assistant message
holding the partial text, with ``max_tokens`` reduced by what was generated, and the new tokens
are appended, so the final text is partial + continuation. How exact the continuation is
depends on the server:

- exact: vLLM and SGLang with ``chat_resume="continue_final_message"`` (sends
  ``continue_final_message: true, add_generation_prompt: false``: the chat template leaves the
  final assistant message open); llama.cpp's llama-server, which treats a trailing assistant
  message as a prefill by default (and accepts the same two flags in recent versions); and raw
  prompt calls on any server (``completions`` with prompt + partial text, like llama-server's
  ``/completion`` with a raw prompt). Re-tokenizing the partial text may split it into other
  tokens than were sampled, so greedy output can differ after the cut on rare near-ties.
- approximate: plain chat APIs (OpenAI, Ollama, llama-cpp-python's server) close the assistant
  message and open a new turn, so the model writes a fresh reply that sees its own partial one;
  it may repeat or rephrase.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx

from aios.config import RemoteCoreConfig
from aios.errors import (
    AIOSError,
    ConfigError,
    ContextOverflow,
    CoreError,
    CoreUnavailable,
    InvalidRequest,
    KernelShutdown,
    ModelNotFound,
    Overloaded,
)
from aios.llm.base import CoreQueue
from aios.scheduler import Capacity, Policy
from aios.syscall import Completion, LLMCall, LLMRequest, Status, Usage

log = logging.getLogger(__name__)

KV_UNBOUNDED = 1 << 60  # the server manages its own KV cache: only in-flight slots limit us
CHARS_PER_TOKEN = 4  # prompt-size estimate for scheduling (remote cores have no tokenizer)
# A prompt token costs about this many output tokens of server time (batched prefill is far
# cheaper than decode); used only to charge agents' service for fair share.
PREFILL_WEIGHT = 0.2


@dataclass
class RemoteStats:
    """Counters since the core started."""

    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    http_requests: int = 0
    retries: int = 0
    resumes: int = 0  # HTTP requests that continued a partial answer
    preemptions: int = 0
    prompt_tokens: int = 0  # of completed calls (server's count when it sent one)
    completion_tokens: int = 0


class RemoteRequest(LLMRequest):
    """An LLM call on a remote core: the server holds the tokens, this holds the text.

    ``prompt_tokens`` is a placeholder as long as the estimated prompt, so policies see a size;
    ``output_tokens`` gets one entry per streamed chunk. A *leg* is one HTTP request: the first,
    or a resume after a pre-emption or a broken connection.
    """

    def __init__(
        self,
        agent: str,
        now: float,
        call: LLMCall,
        estimate: int,
        max_tokens: int,
        *,
        priority: int = 0,
    ) -> None:
        super().__init__(agent, now, call, [0] * estimate, max_tokens, priority=priority)
        self.task: asyncio.Task[None] | None = None  # the task serving it while admitted
        self.server_prompt_tokens: int | None = None
        self.counted_tokens = 0  # output tokens of legs that ended
        self.leg_chunks = 0  # chunks streamed by the current leg
        self.leg_usage: int | None = None  # output tokens of the current leg, as the server says

    def end_leg(self) -> None:
        self.counted_tokens += self.leg_usage if self.leg_usage is not None else self.leg_chunks
        self.leg_chunks, self.leg_usage = 0, None

    @property
    def usage(self) -> Usage:
        prompt = self.server_prompt_tokens
        leg = self.leg_usage if self.leg_usage is not None else self.leg_chunks
        return Usage(
            len(self.prompt_tokens) if prompt is None else prompt, self.counted_tokens + leg
        )


class _Retry(Exception):
    """A failure worth another attempt; ``error`` is what the caller gets when none is left."""

    def __init__(self, error: AIOSError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


class RemoteCore(CoreQueue[RemoteRequest]):
    """Schedules LLM syscalls onto an OpenAI-compatible server (see the module docstring)."""

    def __init__(
        self,
        config: RemoteCoreConfig,
        policy: Policy,
        clock: Callable[[], float] = time.monotonic,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        super().__init__(clock)
        self.config: RemoteCoreConfig = config
        self.name = config.name
        self.policy = policy
        self.stats: RemoteStats = RemoteStats()
        self._transport = transport  # tests pass an in-process fake server
        self._sleep = sleep
        self._jitter = jitter
        self._client: httpx.AsyncClient | None = None
        self._running: list[RemoteRequest] = []
        # Tasks still alive, including pre-empted ones still closing their connection: a slot
        # is free only when its task has ended, so the server never sees more than the bound.
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the HTTP client (no request is sent: a server that is down fails calls, not
        the kernel's start-up). Reads the API key from ``api_key_env``."""
        config = self.config
        headers = {}
        if config.api_key_env:
            key = os.environ.get(config.api_key_env)
            if not key:
                raise ConfigError(
                    f"core {self.name!r}: environment variable {config.api_key_env} "
                    "(its api_key_env) is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(
                connect=config.connect_timeout,
                read=config.read_timeout,
                write=config.read_timeout,
                pool=config.connect_timeout,
            ),
            limits=httpx.Limits(
                max_connections=config.max_inflight,
                max_keepalive_connections=config.max_inflight,
            ),
            transport=self._transport,
        )

    async def close(self) -> None:
        """Fail everything queued or in flight, cancel the streams, close the client."""
        if self._closed:
            return
        self._closed = True
        self._fail_all(KernelShutdown("the kernel shut down before the call finished"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- syscall entry ---------------------------------------------------------------------
    def submit(
        self, agent: str, call: LLMCall, *, priority: int = 0, kind: str = ""
    ) -> RemoteRequest:
        """Enqueue an LLM call; raise a typed error if it cannot be queued."""
        self._admissible()
        text = call.prompt if call.prompt is not None else "".join(m.content for m in call.messages)
        max_tokens = call.params.max_tokens or self.config.default_max_tokens
        request = RemoteRequest(
            agent,
            self._clock(),
            call,
            max(1, len(text) // CHARS_PER_TOKEN),
            max_tokens,
            priority=priority,
        )
        return self._enqueue(request, kind)

    def _check_started(self) -> None:
        if self._client is None:
            raise CoreError(f"core {self.name!r} is not started")

    def _withdraw(self, request: RemoteRequest) -> None:
        """Off the queue, or off the server: its stream is closed, which tells the server to
        stop generating."""
        if request.status is Status.QUEUED:
            self._waiting.remove(request)
        else:
            self._unbind(request)

    def forget(self, agent: str) -> None:
        """``agent`` exited: drop its scheduling ledger (the server keeps no KV of ours)."""
        self._book.forget(agent)

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """The scheduling loop; runs until cancelled (kernel shutdown)."""
        try:
            while True:
                self._wake.clear()
                self._schedule()
                await self._wake.wait()
        except Exception as e:  # a bug in the loop itself: no caller may be left hanging
            self._stopped(e)
        finally:
            # Cancelled without close(): still never leave a caller hanging on a dead stream.
            self._fail_all(KernelShutdown(f"core {self.name!r} stopped before the call finished"))
            for task in self._tasks:
                task.cancel()

    def _schedule(self) -> None:
        if not self._waiting:  # policies pre-empt only to make room for someone waiting
            return
        now = self._clock()
        decision = self.policy.schedule(
            now, list(self._waiting), list(self._running), self._capacity()
        )
        for request in decision.preempt:
            if request.status is Status.RUNNING and request.finish_reason is None:
                self._preempt(request)
        capacity = self._capacity()  # a pre-empted stream frees its slot once it has closed
        for request in decision.admit:
            if request.status is not Status.QUEUED or not capacity.fits(request):
                continue
            capacity = capacity.minus(request)
            self._admit(request, now)

    def _capacity(self) -> Capacity:
        return Capacity(self.config.max_inflight - len(self._tasks), KV_UNBOUNDED)

    def _admit(self, request: RemoteRequest, now: float) -> None:
        self._waiting.remove(request)
        if request.preemptions == 0:
            request.ledger.service += PREFILL_WEIGHT * len(request.prompt_tokens)
        request.admit(now)
        self._running.append(request)
        task = asyncio.create_task(self._serve(request), name=f"{self.name}:{request.id}")
        request.task = task
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _preempt(self, request: RemoteRequest) -> None:
        """Take the request's slot back: its stream is cancelled, its partial text kept."""
        self._unbind(request)
        request.end_leg()
        request.preempt()
        self._waiting.append(request)
        self.stats.preemptions += 1

    def _unbind(self, request: RemoteRequest) -> None:
        self._running.remove(request)
        if request.task is not None:
            request.task.cancel()
            request.task = None

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()
        if not task.cancelled() and task.exception() is not None:  # _serve catches everything
            log.error("core %r: request task failed", self.name, exc_info=task.exception())

    # -- one request's task ----------------------------------------------------------------
    async def _serve(self, request: RemoteRequest) -> None:
        """Stream the request to the end: completed, failed, or cancelled (pre-emption,
        withdrawal, shutdown), in which case whoever cancelled it has updated its state."""
        try:
            attempt = 0
            while True:
                try:
                    await self._leg(request)
                    return
                except _Retry as retry:
                    if attempt >= self.config.retries:
                        raise retry.error from None
                    attempt += 1
                    self.stats.retries += 1
                    request.end_leg()
                    await self._sleep(self._delay(attempt, retry.retry_after))
        except AIOSError as e:
            self._fail(request, e)
        except Exception as e:  # a bug here must not leave the caller hanging
            log.exception("core %r: %s failed", self.name, request.id)
            self._fail(request, CoreError(f"core {self.name!r}: {type(e).__name__}: {e}"))

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        """Exponential backoff with jitter (half fixed, half random, so retries of many
        requests spread out but none comes back immediately)."""
        base = min(self.config.max_backoff, self.config.backoff * 2.0 ** (attempt - 1))
        delay = base * (0.5 + 0.5 * self._jitter())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.config.max_backoff))
        return delay

    async def _leg(self, request: RemoteRequest) -> None:
        """One HTTP request. Returns when the request completed; raises _Retry or AIOSError."""
        assert self._client is not None
        path, body = self._body(request)
        self.stats.http_requests += 1
        if request.text:
            self.stats.resumes += 1
        base = self.config.base_url
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    raise self._status_error(response)
                if response.headers.get("content-type", "").startswith("application/json"):
                    self._apply(request, json.loads(await response.aread()))  # not streamed
                else:
                    await self._consume(request, response)
                if request.finish_reason is None:
                    raise _Retry(  # e.g. a server that cuts streams short under load
                        CoreError(f"core {self.name!r}: {base} ended the stream early")
                    )
                self._finish(request)
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise _Retry(
                CoreUnavailable(f"core {self.name!r}: cannot connect to {base}: {_why(e)}")
            ) from None
        except httpx.ReadTimeout:
            raise CoreUnavailable(
                f"core {self.name!r}: {base} sent nothing for {self.config.read_timeout:g}s "
                "(read timeout)"
            ) from None
        except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
            raise _Retry(
                CoreUnavailable(f"core {self.name!r}: connection to {base} lost: {_why(e)}")
            ) from None
        except httpx.HTTPError as e:
            raise CoreError(f"core {self.name!r}: HTTP error with {base}: {_why(e)}") from None
        except ValueError as e:  # malformed JSON from the server
            raise CoreError(f"core {self.name!r}: {base} sent malformed JSON: {e}") from None

    def _body(self, request: RemoteRequest) -> tuple[str, dict[str, Any]]:
        """The path and JSON body of the request's next leg, resuming from its partial text."""
        params, call = request.params, request.call
        body: dict[str, Any] = {
            "model": self.config.model,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": request.max_tokens - request.generated,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": json.loads(params.json_schema)},
            }
        elif params.json:
            body["response_format"] = {"type": "json_object"}
        if params.ignore_eos:  # an extension (vLLM, SGLang, llama-server); sent only when asked
            body["ignore_eos"] = True
        if call.prompt is not None:
            body["prompt"] = call.prompt + request.text
            return "completions", body
        messages = [{"role": m.role, "content": m.content} for m in call.messages]
        if request.text:
            messages.append({"role": "assistant", "content": request.text})
            if self.config.chat_resume == "continue_final_message":
                body["continue_final_message"] = True
                body["add_generation_prompt"] = False
        body["messages"] = messages
        return "chat/completions", body

    async def _consume(self, request: RemoteRequest, response: httpx.Response) -> None:
        """Apply streamed chunks until the call finishes (a stop string or JSON completed on
        our side: stop reading, closing the stream stops the server) or the stream ends."""
        server_done = False  # after the server's finish_reason, read on for its usage
        async for data in sse_events(response.aiter_lines()):
            if data == "[DONE]":
                return
            server_done |= self._apply(request, json.loads(data))
            if request.finish_reason == "stop" and not server_done:
                return

    def _apply(self, request: RemoteRequest, chunk: Any) -> bool:
        """Apply one chunk (or a whole non-streamed answer) to the request; True if the
        server said the call finished."""
        if not isinstance(chunk, dict):
            raise CoreError(f"core {self.name!r}: unexpected answer {str(chunk)[:200]!r}")
        if "error" in chunk:
            raise CoreError(f"core {self.name!r}: server error: {_detail(chunk)}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            if request.server_prompt_tokens is None and isinstance(usage.get("prompt_tokens"), int):
                request.server_prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                request.leg_usage = usage["completion_tokens"]
        for choice in (chunk.get("choices") or [])[:1]:
            reason = choice.get("finish_reason")
            if request.finish_reason is not None:  # finished on our side already
                return bool(reason)
            message = choice.get("delta") or choice.get("message") or {}
            piece = message.get("content") if "content" in message else choice.get("text")
            if isinstance(piece, str) and piece:
                self._append(request, piece)
            if reason and request.finish_reason is None:
                request.finish_reason = "length" if reason == "length" else "stop"
            return bool(reason)
        return False

    def _append(self, request: RemoteRequest, piece: str) -> None:
        if request.timings.first_token is None:
            request.timings.first_token = self._clock()
        request.n_prefilled = len(request.prompt_tokens)
        request.append(0, piece.encode())  # applies stop strings, JSON mode and max_tokens
        request.leg_chunks += 1
        request.ledger.service += 1.0
        if self._waiting:  # a policy may pre-empt by tokens run (round robin's quantum)
            self._wake.set()

    def _status_error(self, response: httpx.Response) -> Exception:
        code = response.status_code
        where = (
            f"core {self.name!r}: {self.config.base_url} answered HTTP {code}: "
            f"{_detail(_json_or_text(response))}"
        )
        retry_after = _seconds(response.headers.get("retry-after"))
        if code == 429:
            return _Retry(Overloaded(where), retry_after)
        if code in (502, 503, 504):
            return _Retry(CoreUnavailable(where), retry_after)
        if code == 408 or code >= 500:
            return _Retry(CoreError(where), retry_after)
        if code in (401, 403):
            env = self.config.api_key_env
            hint = f"check the key in ${env}" if env else "the server wants a key: set api_key_env"
            return CoreError(f"{where} ({hint})")
        if code == 404:
            return ModelNotFound(
                f"{where} (is {self.config.model!r} the server's model id, and the base_url "
                "its API root, e.g. http://host:8000/v1?)"
            )
        if code in (400, 413, 422):
            lowered = where.lower()
            if "context" in lowered and any(w in lowered for w in ("length", "exceed", "token")):
                return ContextOverflow(where)
            return InvalidRequest(where)
        return CoreError(where)

    # -- endings ---------------------------------------------------------------------------
    def _finish(self, request: RemoteRequest) -> None:
        if request.task is not asyncio.current_task() or request.status is not Status.RUNNING:
            return  # pre-empted or withdrawn meanwhile: whoever did it owns the request now
        assert request.finish_reason is not None
        self._running.remove(request)
        request.task = None
        request.end_leg()
        usage = request.usage
        self._book.learn(request)
        self.stats.completed += 1
        self.stats.prompt_tokens += usage.prompt_tokens
        self.stats.completion_tokens += usage.completion_tokens
        request.complete(
            self._clock(),
            Completion(
                text=request.text,
                finish_reason=request.finish_reason,
                usage=usage,
                timings=request.timings,
                model=self.name,
                syscall_id=request.id,
            ),
        )

    def _fail(self, request: RemoteRequest, error: AIOSError) -> None:
        if request.task is not asyncio.current_task() or request.status is not Status.RUNNING:
            return
        self._running.remove(request)
        request.task = None
        self.stats.failed += 1
        request.fail(self._clock(), error)
        if isinstance(error, CoreUnavailable):
            # The server is gone: the calls queued behind this one would only find out one
            # retry budget at a time. Fail them now so a router can move them.
            self._fail_waiting(error)

    def _fail_waiting(self, error: AIOSError) -> None:
        now = self._clock()
        for request in self._waiting:
            self.stats.failed += 1
            request.fail(now, error)
        self._waiting.clear()

    def _fail_all(self, error: AIOSError) -> None:
        self._fail_waiting(error)
        now = self._clock()
        for request in list(self._running):
            self._unbind(request)
            self.stats.failed += 1
            request.fail(now, error)

    # -- introspection -------------------------------------------------------------------------
    @property
    def active(self) -> int:
        return len(self._running)


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """The data of each server-sent event: ``data:`` lines joined by newlines; comments
    (``: ping``) and other fields skipped; an event ends at a blank line or the stream's end."""
    data: list[str] = []
    async for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _why(error: Exception) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _detail(payload: Any) -> str:
    """The server's error message (OpenAI shape ``{"error": {"message": ...}}`` or any text),
    shortened: error text goes into messages and logs."""
    if isinstance(payload, dict):
        error = payload.get("error", payload.get("detail", payload))
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            payload = error["message"]
        else:
            payload = error
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return text[:300] or "(empty body)"


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (the HTTP-date form is ignored)."""
    try:
        return None if value is None else max(0.0, float(value))
    except ValueError:
        return None
