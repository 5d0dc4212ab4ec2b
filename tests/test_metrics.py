"""Prometheus metrics: after a known workload the counters equal what happened, the text
parses with Prometheus's own parser, and ``GET /metrics`` needs the admin or metrics token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fakes import CORE_DEFAULTS, FakeFactory, asked
from prometheus_client.parser import text_string_to_metric_families
from servers import Harness, serve

from aios.config import AccessConfig, CoreConfig, KernelConfig, ObservabilityConfig, StorageConfig
from aios.errors import PermissionDenied, QuotaExceeded
from aios.kernel import Kernel
from aios.quota import Quota
from aios.syscall import LLMCall, Message, SamplingParams
from aios.tools.spec import tool

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@tool(concurrency=3)
async def double(n: int) -> int:
    """Twice n."""
    return 2 * n


def parse(text: str) -> Samples:
    """Every sample, by name and labels (the parser is Prometheus's own)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def kernel(tmp_path: Path, **config: object) -> Kernel:
    policy = AccessConfig(
        groups={"default": ("llm.*", "storage.write", "storage.read", "tools.call:*")},
        approve=("storage.read:secret*",),
    )
    k = Kernel(
        KernelConfig(
            cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
            storage=StorageConfig(database=str(tmp_path / "aios.db")),
            access=policy,
            **config,  # type: ignore[arg-type]
        ),
        engine_factory=FakeFactory(lambda p: "four"),
    )
    k.tools.register(double)
    return k


def chat(text: str) -> LLMCall:
    return LLMCall(messages=(Message("user", text),), params=SamplingParams(max_tokens=16))


async def test_counters_equal_a_known_workload(tmp_path: Path) -> None:
    async with kernel(tmp_path) as k:
        alice, bob = k.register("a", owner="alice"), k.register("b", owner="bob")
        done = [await k.llm(alice, chat(f"question {i}")) for i in range(3)]
        done.append(await k.llm(bob, chat("another")))
        for i in range(2):
            await k.resource(alice, "storage", "write", {"path": f"f{i}", "content": "x"})
        with pytest.raises(PermissionDenied):
            await k.resource(alice, "storage", "delete", {"path": "f0"})
        assert await k.resource(bob, "tools", "call", {"name": "double", "arguments": {"n": 2}})
        approvals = asked(k)
        waiting = asyncio.ensure_future(k.resource(bob, "storage", "read", {"path": "secret"}))
        pending = await approvals.get()
        during = parse(k.metrics.render().decode())
        k.access.resolve(pending.id, allow=False)
        with pytest.raises(PermissionDenied):
            await waiting
        await k.audit.drain()
        after = parse(k.metrics.render().decode())

    assert value(during, "aios_approvals_pending") == 1
    assert value(after, "aios_approvals_pending") == 0
    assert value(after, "aios_syscalls_total", kind="llm", outcome="done", agent="alice") == 3
    assert value(after, "aios_syscalls_total", kind="llm", outcome="done", agent="bob") == 1
    assert value(after, "aios_syscalls_total", kind="storage", outcome="done", agent="alice") == 2
    denied = {"kind": "storage", "agent": "alice", "outcome": "permission_denied"}
    assert value(after, "aios_syscalls_total", **denied) == 1  # refused before it was queued
    rejected = {"kind": "storage", "agent": "bob", "outcome": "permission_denied"}
    assert value(after, "aios_syscalls_total", **rejected) == 1  # a person said no
    assert value(after, "aios_syscalls_total", kind="tools", outcome="done", agent="bob") == 1
    # Durations count the calls that were queued: 4 LLM, 3 storage (2 writes, the read).
    assert value(after, "aios_syscall_duration_seconds_count", kind="llm") == 4
    assert value(after, "aios_syscall_duration_seconds_count", kind="storage") == 3
    assert value(after, "aios_llm_time_to_first_token_seconds_count", core="fake") == 4
    assert value(after, "aios_core_queue_wait_seconds_count", core="fake") == 4
    assert value(after, "aios_core_calls_total", core="fake", outcome="completed") == 4
    assert value(after, "aios_core_queue_length", core="fake") == 0
    assert value(after, "aios_core_sequences", core="fake", state="running") == 0
    prompt = sum(c.usage.prompt_tokens for c in done)
    computed = value(after, "aios_core_prompt_tokens_total", core="fake", source="computed")
    reused = value(after, "aios_core_prompt_tokens_total", core="fake", source="reused")
    assert computed + reused == prompt  # every prompt token was computed or reused, once
    assert reused > 0  # alice's later calls reuse her earlier calls' KV
    generated = sum(c.usage.completion_tokens for c in done)
    assert value(after, "aios_core_decode_tokens_total", core="fake") == generated
    assert value(after, "aios_core_kv_cells", core="fake", state="total") == 1024
    assert value(after, "aios_tool_calls_total", tool="double") == 1
    assert value(after, "aios_tool_concurrency_limit", tool="double") == 3
    assert value(after, "aios_tool_calls_in_use", tool="double") == 0
    records = 4 + 2 + 1 + 1 + 1  # every syscall, the refused ones too
    assert value(after, "aios_audit_records_written_total") == records
    assert value(after, "aios_audit_pending_records") == 0
    # Database jobs: the storage calls' and the audit writer's, both timed.
    assert value(after, "aios_database_job_seconds_count", phase="ran") >= 3
    assert value(after, "aios_agents", state="running") == 2


async def test_quota_rejections_are_counted(tmp_path: Path) -> None:
    async with kernel(tmp_path, quota=Quota(tokens_per_minute=10)) as k:
        p = k.register("a", owner="alice")
        await k.llm(p, chat("a long enough question"))
        for _ in range(2):
            with pytest.raises(QuotaExceeded):
                await k.llm(p, chat("again"))
        samples = parse(k.metrics.render().decode())
    assert value(samples, "aios_quota_rejections_total") == 2


@pytest.fixture
def metered(tmp_path: Path) -> Harness:
    with serve(
        tmp_path, observability=ObservabilityConfig(metrics_token="scraper-token-0123")
    ) as h:
        yield h  # type: ignore[misc]


def test_metrics_route_needs_the_admin_or_the_metrics_token(metered: Harness) -> None:
    agent = metered.agent("alice")
    assert (
        metered.client(agent)
        .post("/api/v1/llm/chat", json={"messages": [{"role": "user", "content": "hi"}]})
        .is_success
    )
    response = metered.client(metered.admin).get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = parse(response.text)
    assert value(samples, "aios_syscalls_total", kind="llm", outcome="done", agent="alice") == 1
    scraped = metered.client("scraper-token-0123").get("/metrics")
    assert scraped.status_code == 200 and "aios_core_queue_length" in scraped.text
    assert metered.client(agent).get("/metrics").status_code == 403
    assert metered.client().get("/metrics").status_code == 401
    assert metered.client("wrong").get("/metrics").status_code == 401
    # The metrics token reads metrics, nothing else.
    assert metered.client("scraper-token-0123").get("/api/v1/processes").status_code == 401
