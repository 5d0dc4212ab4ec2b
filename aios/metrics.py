"""The kernel's Prometheus metrics, served at ``GET /metrics`` in the text format.

Two kinds. What happens to each syscall is counted as it ends (a counter and three
histograms, in plain Python: a few microseconds a call). The state of the cores, tools,
approvals, quotas and the audit writer is read only when a scraper asks
(:class:`KernelCollector`), from the counters the kernel keeps anyway, so it costs nothing
between scrapes. Each kernel has its own registry:
nothing here registers in prometheus_client's global one.

Names follow Prometheus conventions: ``aios_`` prefix, base units (seconds, tokens, cells),
``_total`` for counters. Rates (decode tokens/s, syscalls/s) are a query's ``rate()``.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections import Counter as Tally
from collections import defaultdict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from aios.llm.core import CoreStats, LLMCore
from aios.syscall import LLMRequest, Syscall

if TYPE_CHECKING:
    from aios.kernel import Kernel
    from aios.llm.base import Core

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Seconds: from a cached storage read (ms) to a long generation (minutes).
LATENCY = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Histogram:
    """Fixed buckets, counted in plain Python (a bisect and two additions an observation: the
    prometheus_client objects take a lock per label lookup and per bucket, ~10x the cost on
    this hot path). Exported cumulatively at scrape time. ``lock``: for observations made on
    other threads (the database's workers)."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY, lock: bool = False) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0
        self._lock = threading.Lock() if lock else None

    def observe(self, value: float) -> None:
        if self._lock is None:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value
            return
        with self._lock:
            self.counts[bisect.bisect_left(self.bounds, value)] += 1
            self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last."""
        total, out = 0, []
        for bound, count in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += count
            out.append(("+Inf" if bound == math.inf else repr(float(bound)), float(total)))
        return out


class Metrics:
    """One kernel's metrics: :meth:`counted` (every syscall's audit record), :meth:`ended`
    (a syscall that was queued ends) and :meth:`job` (a database job's times) update plain
    counters and histograms; :meth:`render` is the scrape (which reads the rest of the
    kernel's state then: :class:`KernelCollector`)."""

    def __init__(self, kernel: Kernel) -> None:
        self.syscalls: Tally[tuple[str, str, str]] = Tally()  # (kind, outcome, agent)
        self.duration: defaultdict[str, Histogram] = defaultdict(Histogram)  # by kind
        self.queue_wait: defaultdict[str, Histogram] = defaultdict(Histogram)  # by core
        self.ttft: defaultdict[str, Histogram] = defaultdict(Histogram)  # by core
        self.db_waited = Histogram(lock=True)
        self.db_ran = Histogram(lock=True)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(KernelCollector(kernel, self))

    def counted(self, kind: str, outcome: str, agent: str) -> None:
        self.syscalls[kind, outcome.removeprefix("failed:"), agent] += 1

    def ended(self, syscall: Syscall) -> None:
        t = syscall.timings
        if t.finished is not None:
            self.duration[syscall.kind].observe(t.finished - t.submitted)
        if isinstance(syscall, LLMRequest) and syscall.core is not None:
            core = syscall.core.name
            if t.admitted is not None:
                self.queue_wait[core].observe(t.admitted - t.submitted)
            if t.first_token is not None:
                self.ttft[core].observe(t.first_token - t.submitted)

    def job(self, waited: float, ran: float) -> None:
        """A database job ended (called on the worker's thread)."""
        self.db_waited.observe(waited)
        self.db_ran.observe(ran)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def families(self) -> Iterator[Metric]:
        """The counters and histograms kept here, as Prometheus metric families."""
        syscalls = CounterMetricFamily(
            "aios_syscalls",
            "Syscalls by kind, outcome (done, cancelled, abandoned or an error code, rejections "
            "included) and agent (its identity)",
            labels=["kind", "outcome", "agent"],
        )
        for key, count in sorted(self.syscalls.items()):
            syscalls.add_metric(list(key), count)
        yield syscalls
        for name, text, label, table in (
            ("aios_syscall_duration_seconds", "Syscalls from queued to ended (queued ones only)",
             "kind", self.duration),
            ("aios_core_queue_wait_seconds", "LLM calls' time queued on their core before "
             "admission", "core", self.queue_wait),
            ("aios_llm_time_to_first_token_seconds", "LLM calls from queued to their first "
             "token", "core", self.ttft),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, text, labels=[label])
            for value, histogram in sorted(table.items()):
                family.add_metric([value], histogram.buckets(), histogram.sum)
            yield family
        jobs = HistogramMetricFamily(
            "aios_database_job_seconds",
            "Database jobs (memory, storage, audit): time waiting for a worker, and running",
            labels=["phase"],
        )
        for phase, histogram in (("waited", self.db_waited), ("ran", self.db_ran)):
            jobs.add_metric([phase], histogram.buckets(), histogram.sum)
        yield jobs


def core_state(name: str, core: Core) -> dict[str, Any]:
    """One reading of a core: its queue and counters, and an embedded core's KV cache and
    token counts (what ``GET /api/v1/cores``, ``aios top`` and the metrics show)."""
    stats = core.stats
    state: dict[str, Any] = {
        "name": name,
        "kind": type(core).__name__,
        "queued": core.queued,
        "active": core.active,
        "completed": stats.completed,
        "failed": stats.failed,
        "cancelled": stats.cancelled,
        "preemptions": getattr(stats, "preemptions", 0),  # (a router pre-empts nothing)
    }
    if isinstance(core, LLMCore) and isinstance(stats, CoreStats):
        kv = core.kv_usage()
        state |= {
            "slots": core.config.slots,
            "cached": kv.cached,
            "parked": kv.parked,
            "preempted": kv.preempted,
            "kv_cells_used": kv.cells_used,
            "kv_cells_reserved": kv.cells_reserved,
            "kv_cells": kv.cells_total,
            "prefill_tokens": stats.prefill_tokens,
            "reused_tokens": stats.reused_tokens,
            "decode_tokens": stats.decode_tokens,
            "busy_seconds": stats.busy_seconds,
            "engine_crashes": stats.crashes,
        }
    return state


class KernelCollector:
    """The kernel's state at scrape time."""

    def __init__(self, kernel: Kernel, metrics: Metrics) -> None:
        self.kernel = kernel
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        kernel = self.kernel
        yield from self.metrics.families()
        yield from self._cores(kernel)
        yield from self._tools(kernel)
        agents = GaugeMetricFamily("aios_agents", "Agent processes by state", labels=["state"])
        states: Tally[str] = Tally(p.state.value for p in kernel.processes.values())
        for state, n in sorted(states.items()):
            agents.add_metric([state], n)
        yield agents
        yield GaugeMetricFamily(
            "aios_approvals_pending", "Calls waiting for a person", value=len(kernel.access.pending)
        )
        yield CounterMetricFamily(
            "aios_quota_rejections",
            "LLM calls refused because their agent's token window was full",
            value=kernel.quotas.rejections,
        )
        audit = kernel.audit
        yield GaugeMetricFamily(
            "aios_audit_pending_records",
            "Audit records not yet written (the writer's lag)",
            value=audit.pending,
        )
        yield CounterMetricFamily(
            "aios_audit_records_written", "Audit records written", value=audit.written
        )
        yield CounterMetricFamily(
            "aios_audit_refused_syscalls",
            "Syscalls refused while the audit writer was too far behind",
            value=audit.refused,
        )
        yield GaugeMetricFamily(
            "aios_event_subscribers", "Watchers of the event stream", value=kernel.events.watchers
        )

    @staticmethod
    def _cores(kernel: Kernel) -> Iterator[Metric]:
        queue = GaugeMetricFamily("aios_core_queue_length", "LLM calls waiting", labels=["core"])
        running = GaugeMetricFamily(
            "aios_core_sequences",
            "Sequences on a core: running, cached (idle KV kept in a slot), parked (an idle "
            "context saved out of the KV cache), preempted (waiting with its context saved)",
            labels=["core", "state"],
        )
        cells = GaugeMetricFamily(
            "aios_core_kv_cells", "KV cache cells: used, reserved, total", labels=["core", "state"]
        )
        calls = CounterMetricFamily(
            "aios_core_calls", "LLM calls ended by a core", labels=["core", "outcome"]
        )
        prefill = CounterMetricFamily(
            "aios_core_prompt_tokens",
            "Prompt tokens of admitted calls: computed (prefilled) or reused from the KV cache",
            labels=["core", "source"],
        )
        decode = CounterMetricFamily("aios_core_decode_tokens", "Tokens generated", labels=["core"])
        preemptions = CounterMetricFamily(
            "aios_core_preemptions", "Running calls pre-empted", labels=["core"]
        )
        busy = CounterMetricFamily(
            "aios_core_busy_seconds", "Time the engine spent in decode steps", labels=["core"]
        )
        crashes = CounterMetricFamily(
            "aios_core_engine_crashes", "Engine processes that died mid-step", labels=["core"]
        )
        for name, core in kernel.cores.items():
            c = core_state(name, core)
            queue.add_metric([name], c["queued"])
            for outcome in ("completed", "failed", "cancelled"):
                calls.add_metric([name, outcome], c[outcome])
            running.add_metric([name, "running"], c["active"])
            preemptions.add_metric([name], c["preemptions"])
            if "kv_cells" not in c:  # (an embedded core's only)
                continue
            for state in ("cached", "parked", "preempted"):
                running.add_metric([name, state], c[state])
            cells.add_metric([name, "used"], c["kv_cells_used"])
            cells.add_metric([name, "reserved"], c["kv_cells_reserved"])
            cells.add_metric([name, "total"], c["kv_cells"])
            prefill.add_metric([name, "computed"], c["prefill_tokens"])
            prefill.add_metric([name, "reused"], c["reused_tokens"])
            decode.add_metric([name], c["decode_tokens"])
            busy.add_metric([name], c["busy_seconds"])
            crashes.add_metric([name], c["engine_crashes"])
        yield from (queue, running, cells, calls, prefill, decode, preemptions, busy, crashes)

    @staticmethod
    def _tools(kernel: Kernel) -> Iterator[Metric]:
        in_use = GaugeMetricFamily("aios_tool_calls_in_use", "Tool calls running", labels=["tool"])
        limit = GaugeMetricFamily(
            "aios_tool_concurrency_limit", "Calls a tool may run at once", labels=["tool"]
        )
        calls = CounterMetricFamily("aios_tool_calls", "Tool calls made", labels=["tool"])
        errors = CounterMetricFamily("aios_tool_errors", "Tool calls that failed", labels=["tool"])
        timeouts = CounterMetricFamily(
            "aios_tool_timeouts", "Tool calls that ran (or waited) past their time", labels=["tool"]
        )
        stats = kernel.tool_stats
        for spec in kernel.tools:
            limit.add_metric([spec.name], spec.concurrency)
            s = stats.get(spec.name)
            in_use.add_metric([spec.name], 0 if s is None else s.running)
            if s is not None:
                calls.add_metric([spec.name], s.calls)
                errors.add_metric([spec.name], s.errors)
                timeouts.add_metric([spec.name], s.timeouts)
        yield from (in_use, limit, calls, errors, timeouts)
