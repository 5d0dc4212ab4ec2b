"""A bounded schema fuzz of the HTTP API: schemathesis generates requests from the server's own
OpenAPI schema (``/openapi.json``), valid and invalid, for every operation, as the admin and as
an agent; no answer may be a 5xx, and the server must still serve calls afterwards.

The schema gives a memory, storage or tool syscall as ``POST /api/v1/{kind}/{op}`` with an
undeclared body, so there schemathesis only ever reaches "no such operation"; a second fuzz
sends each real operation JSON arguments named after its parameters, with values of any type.

The server is ``aios serve`` on the fake engine (tests/fakes.py, via ``servers.serve``): LLM
calls cost microseconds and no model is loaded. The run is bounded (``MAX_EXAMPLES`` per
operation, mode and identity; a timeout on every request) and deterministic (``derandomize``):
CI sends the same requests every time. Cases come from ``APIOperation.as_strategy`` under plain
Hypothesis, not from schemathesis's pytest plugin (which sets pytest's private node attributes
and fails on pytest 9.2), so one test runs every operation and reports every failing one.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation as AnyOperation
from schemathesis import BaseSchema, GenerationMode
from schemathesis import Case as AnyCase
from schemathesis.core.result import Ok
from servers import CHAT, USER, Harness, serve

from aios.memory.manager import MemoryManager
from aios.resources import MEMORY_OPS, STORAGE_OPS
from aios.storage.files import Files

MAX_EXAMPLES = 25  # generated requests per operation, mode and identity
REQUEST_TIMEOUT = 15.0  # seconds; a request that hangs fails the run, never stalls it
FUZZ = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.generate],  # no shrinking: a failure is reported as found
    suppress_health_check=list(HealthCheck),
)
IDENTITIES = ("admin", "agent")
Operation = AnyOperation[Any, Any, Any, Any]
Case = AnyCase[Operation]
# json_schema, tools and response_format compile a grammar with llama.cpp's converter
# (aios/llm/grammar.py); without llama-cpp-python every such call fails for that reason alone.
HAS_GRAMMAR = importlib.util.find_spec("llama_cpp") is not None
GRAMMAR_FIELDS = ("json_schema", "tools", "response_format")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """One server for the whole fuzz (every identity); it must survive it."""
    with serve(tmp_path_factory.mktemp("fuzz")) as harness:
        yield harness


@pytest.fixture(scope="module")
def tokens(fuzzed: Harness) -> dict[str, str]:
    return {"admin": fuzzed.admin, "agent": fuzzed.agent("fuzzer")}


@pytest.fixture(scope="module")
def unpooled(fuzzed: Harness) -> Iterator[httpx.Client]:
    """A client that opens a new connection for every request: a 500 closes its connection
    (uvicorn does), and Hypothesis replays the failing call to report it, which must see the
    500 again, not a reset of a pooled connection."""
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=fuzzed.url, limits=limits, timeout=REQUEST_TIMEOUT) as client:
        yield client


# -- the OpenAPI schema ----------------------------------------------------------------------
def load_schema(harness: Harness, token: str) -> BaseSchema:
    """The served schema, every request sent with ``token``."""
    schema = schemathesis.openapi.from_url(f"{harness.url}/openapi.json")
    schema.config.update(headers={"authorization": f"Bearer {token}"})
    if not HAS_GRAMMAR:
        schema.hook("map_body")(without_grammars)
    return schema


def without_grammars(context: schemathesis.HookContext, body: Any) -> Any:
    """(A ``map_body`` hook) the body without the fields that need llama.cpp's converter."""
    if isinstance(body, dict):
        return {k: v for k, v in body.items() if k not in GRAMMAR_FIELDS}
    return body


def send(case: Case) -> None:
    """Send one generated request; AssertionError (with a curl line) on a 5xx, except the
    typed 504 of a deadline the request itself set (a few milliseconds can pass)."""
    response = case.call(timeout=REQUEST_TIMEOUT)
    if response.status_code == 504 and response.json()["error"]["type"] == "deadline_exceeded":
        return
    assert response.status_code < 500, (
        f"{response.status_code}: {response.text[:500]}\n  {case.as_curl_command()}"
    )


def fuzz(schema: BaseSchema, operation: Operation, mode: GenerationMode) -> str | None:
    """Up to ``MAX_EXAMPLES`` requests of ``operation``; the first failure, or None."""

    @FUZZ
    @given(case=operation.as_strategy(mode, hooks=schema.hooks))
    def run(case: Case) -> None:
        send(case)

    try:
        run()
    except AssertionError as e:
        return f"{operation.label} ({mode.value}): {e}"
    except Unsatisfiable:  # nothing in it to make invalid (no parameters, or any string goes)
        assert mode is GenerationMode.NEGATIVE, f"no valid request for {operation.label}"
    return None


@pytest.mark.parametrize("who", IDENTITIES)
def test_no_generated_request_is_a_server_error(
    fuzzed: Harness, tokens: dict[str, str], who: str
) -> None:
    schema = load_schema(fuzzed, tokens[who])
    loaded = list(schema.get_all_operations())
    operations = [result.ok() for result in loaded if isinstance(result, Ok)]
    assert len(operations) == len(loaded) >= 20, "the schema has invalid or lost operations"
    failures = [
        failure
        for operation in operations
        for mode in GenerationMode
        if (failure := fuzz(schema, operation, mode)) is not None
    ]
    assert not failures, "\n".join(failures)


# -- resource syscalls: arguments by parameter name, values of any type ----------------------
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.floats(),  # NaN and infinities too: the body is parsed with json.loads, which takes them
    st.text(max_size=20),
    st.sampled_from(["", ".", "..", "/", "a", "a/b", "d/e.md", "\u202e", "*", "%", "r", "rw",
                     "append", "create", "agent:fuzzer", "group:default", "UTC", "1+2"]),
)  # fmt: skip
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)
SKIPPED = {"self", "conn", "who", "job", "context"}  # given by the kernel, never by the caller
# Tools that answer at once (the python tool runs a sandbox, write_file is left out too).
TOOLS = ["calculator", "current_time", "read_file", "list_files", "recall", "remember", "nope"]
TOOL_ARGUMENTS = ["expression", "timezone", "path", "query", "limit", "text"]
# The deadline of each call (``?timeout=``): a change to another agent's files with no path
# waits for a person's approval until then (and is refused, 403), so it must be short. A 504
# deadline_exceeded is that deadline's answer, not a server error.
RESOURCE_DEADLINE = 0.5
RESOURCE_OPS = [
    *(("memory", op) for op in MEMORY_OPS),
    *(("storage", op) for op in STORAGE_OPS),
    ("tools", "list"),
    ("tools", "call"),
]


def argument_names(kind: str, op: str) -> list[str]:
    """The parameters a caller names for ``kind``.``op`` (as ``Resources.op`` binds them)."""
    if kind == "tools":
        return ["name", "arguments"]
    method = getattr(MemoryManager, MEMORY_OPS[op]) if kind == "memory" else getattr(Files, op)
    names = [n for n in inspect.signature(method).parameters if n not in SKIPPED]
    return names[1:] if kind == "memory" else names  # memory: the owner is the caller


def arguments(kind: str, op: str) -> st.SearchStrategy[dict[str, Any]]:
    """Argument objects of ``kind``.``op``: its parameters' names (and a stray one), any
    values."""
    if (kind, op) == ("tools", "call"):
        return st.fixed_dictionaries(
            {"name": st.sampled_from(TOOLS)},
            optional={"arguments": st.dictionaries(st.sampled_from(TOOL_ARGUMENTS), VALUES)},
        )
    names = [*argument_names(kind, op), "stray"]
    return st.dictionaries(st.sampled_from(names), VALUES, max_size=len(names))


def resource_case(kind: str, op: str, who: str) -> Any:
    return pytest.param(kind, op, who, id=f"{who}-{kind}.{op}")


@pytest.mark.parametrize(
    ("kind", "op", "who"),
    [resource_case(kind, op, who) for who in IDENTITIES for kind, op in RESOURCE_OPS],
)
def test_no_resource_syscall_is_a_server_error(
    unpooled: httpx.Client, tokens: dict[str, str], kind: str, op: str, who: str
) -> None:
    headers = {"authorization": f"Bearer {tokens[who]}", "content-type": "application/json"}
    path = f"/api/v1/{kind}/{op}?timeout={RESOURCE_DEADLINE}"

    @FUZZ
    @given(args=arguments(kind, op))
    def run(args: dict[str, Any]) -> None:
        body = json.dumps(args)
        response = unpooled.post(path, content=body, headers=headers)
        if response.status_code == 504 and response.json()["error"]["type"] == "deadline_exceeded":
            return
        assert response.status_code < 500, f"{body} -> {response.status_code}: {response.text}"

    run()


def test_the_server_still_answers_after_the_fuzz(fuzzed: Harness) -> None:
    """(Runs after the fuzz, on its server.) Alive, idle, and still serving LLM calls."""
    admin = fuzzed.reader(fuzzed.admin)
    assert admin.get("/healthz").json()["status"] == "ok"
    assert admin.get("/api/v1/approvals").json() == []  # every approval wait ended
    reply = fuzzed.client(fuzzed.agent("after-fuzz")).post(CHAT, json={"messages": USER})
    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "done"
    core = fuzzed.core()
    assert core["queued"] == 0 and core["active"] == 0, core
