"""Configuration: frozen dataclasses, validated on construction, built once and passed in."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from aios.errors import ConfigError
from aios.quota import Quota

POLICIES = ("fifo", "rr", "priority", "fair", "spf")


def default_data_dir() -> str:
    """Where a kernel keeps its data unless told otherwise: ``$XDG_DATA_HOME/aios``, else
    ``~/.local/share/aios`` (the server's identities, admin token and database)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return os.path.join(base, "aios")


@dataclass(frozen=True)
class CoreConfig:
    """One embedded LLM core: a model loaded once, serving ``slots`` sequences in one batch.

    ``model`` is a built-in model name (see ``aios.llm.models``) or a path to a GGUF file.
    ``max_sequence_tokens`` caps one sequence (prompt + output). The KV cache has one stream of
    that many cells per sequence (``slots + cache_slots`` of them), so a sequence attends only
    over its own cells; with ``kv_unified`` all sequences share one pool of ``context_tokens``
    cells instead (less memory, but every decode step attends over every used cell: 8 sequences
    of 800 tokens decode 1.4-2.5x slower next to 8K idle cells, measured). ``batch_tokens`` is
    the token budget of one decode step: decode tokens of running sequences first, then chunks
    of prompts being prefilled.
    """

    name: str = "smollm2"
    model: str = "smollm2-135m"
    slots: int = 16
    cache_slots: int = 8  # extra KV sequences that only keep idle agents' KV for reuse
    max_sequence_tokens: int = 2048
    kv_unified: bool = False
    # llama.cpp's automatic choice turns flash attention on for CPU, which decodes 15-30%
    # slower here (SmolLM2, 300-1800 token contexts, measured): off unless asked for.
    flash_attn: bool = False
    # Use llama.cpp's AMX matmul where the library has it and the CPU advertises AMX. Off: in
    # many VMs AMX is advertised but its first instruction faults (aios.llm.cpu), and the
    # default build has no AMX code anyway.
    amx: bool = False
    context_tokens: int = 16384  # the shared pool's size (kv_unified only)
    batch_tokens: int = 512
    threads: int = 0  # 0: one per CPU core
    default_max_tokens: int = 256
    max_queue: int = 4096
    kv_reuse: bool = True  # keep an agent's KV between its calls; share common prefixes
    cache_tokens: int = 2048  # (kv_unified) idle cells kept in the pool; beyond, idle KV is parked
    max_parked: int = 64  # idle contexts kept in the snapshot store (0: drop instead)
    snapshot_ram_mb: int = 512  # pre-empted contexts beyond this spill to disk
    spill_dir: str | None = None  # None: a private temporary directory
    # Run llama.cpp in a child process (aios.llm.isolated): a crash in native code (an abort,
    # a segfault) then fails the calls of the step it hit, and the core reloads the model,
    # instead of killing the kernel and every agent. Costs a socket round trip per step (small
    # against a decode step; see docs/architecture.md) and a model reload per crash.
    isolate: bool = True

    def __post_init__(self) -> None:
        if (
            not self.name
            or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum()
        ):
            raise ConfigError(
                f"core name must be letters, digits, '-', '_' or '.', got {self.name!r}"
            )
        for name in (
            "slots",
            "context_tokens",
            "max_sequence_tokens",
            "batch_tokens",
            "default_max_tokens",
            "max_queue",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"core {self.name!r}: {name} must be >= 1")
        if not 1 <= self.slots <= 256:
            raise ConfigError(f"core {self.name!r}: slots must be in [1, 256], got {self.slots}")
        if not 0 <= self.cache_slots <= 256 - self.slots:
            raise ConfigError(
                f"core {self.name!r}: cache_slots must be in [0, {256 - self.slots}] "
                f"(slots + cache_slots <= 256), got {self.cache_slots}"
            )
        if self.threads < 0:
            raise ConfigError(f"core {self.name!r}: threads must be >= 0")
        if self.cache_tokens < 0 or self.max_parked < 0:
            raise ConfigError(f"core {self.name!r}: cache_tokens and max_parked must be >= 0")
        if self.snapshot_ram_mb < 0:
            raise ConfigError(f"core {self.name!r}: snapshot_ram_mb must be >= 0")
        if not isinstance(self.isolate, bool):
            raise ConfigError(f"core {self.name!r}: isolate must be true or false")
        if self.kv_unified and self.max_sequence_tokens > self.context_tokens:
            raise ConfigError(
                f"core {self.name!r}: max_sequence_tokens ({self.max_sequence_tokens}) exceeds "
                f"context_tokens ({self.context_tokens})"
            )
        if self.batch_tokens < self.slots:
            raise ConfigError(
                f"core {self.name!r}: batch_tokens ({self.batch_tokens}) must be >= slots "
                f"({self.slots}) so every running sequence can decode in one step"
            )

    @property
    def kv_cells(self) -> int:
        """KV cells allocated: the shared pool, or one full-length stream per sequence."""
        if self.kv_unified:
            return self.context_tokens
        return self.kv_sequences * self.max_sequence_tokens

    @property
    def kv_sequences(self) -> int:
        """Sequences in the engine's KV cache: running slots plus cache-only slots."""
        return self.slots + self.cache_slots

    @property
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass(frozen=True)
class RemoteCoreConfig:
    """A remote LLM core: any OpenAI-compatible server (vLLM, SGLang, Ollama, llama-server,
    llama-cpp-python's server, OpenAI).

    ``base_url`` ends where the OpenAI API paths start (``http://host:8000/v1``); ``model`` is
    the server's model id. ``api_key_env`` names the environment variable holding the key (read
    when the core starts; the key itself never appears in a config, a log or an error).
    At most ``max_inflight`` HTTP requests run at once; the rest wait in the core's queue under
    the kernel's scheduling policy. Connection errors, 429 and 5xx are retried ``retries``
    times with exponential backoff (``backoff`` seconds doubling up to ``max_backoff``, with
    jitter). ``chat_resume`` says how a pre-empted chat call resumes from its partial text:
    ``"assistant"`` (a trailing assistant message: exact on servers that treat it as a prefill,
    approximate on plain chat APIs) or ``"continue_final_message"`` (vLLM/SGLang: exact).
    """

    name: str
    base_url: str
    model: str
    api_key_env: str | None = None
    max_inflight: int = 4
    max_queue: int = 4096
    connect_timeout: float = 5.0
    read_timeout: float = 120.0  # longest silence allowed between two streamed chunks
    retries: int = 3
    backoff: float = 0.25
    max_backoff: float = 8.0
    default_max_tokens: int = 256
    chat_resume: str = "assistant"

    def __post_init__(self) -> None:
        _check_core_name(self.name)
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"core {self.name!r}: base_url must start with http:// or https://, "
                f"got {self.base_url!r}"
            )
        if not self.model:
            raise ConfigError(f"core {self.name!r}: model (the server's model id) is required")
        for name in ("max_inflight", "max_queue", "default_max_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"core {self.name!r}: {name} must be >= 1")
        if self.retries < 0:
            raise ConfigError(f"core {self.name!r}: retries must be >= 0")
        for name in ("connect_timeout", "read_timeout", "backoff", "max_backoff"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"core {self.name!r}: {name} must be > 0 seconds")
        if self.chat_resume not in CHAT_RESUME:
            raise ConfigError(
                f"core {self.name!r}: chat_resume must be one of {', '.join(CHAT_RESUME)}, "
                f"got {self.chat_resume!r}"
            )


CHAT_RESUME = ("assistant", "continue_final_message")


@dataclass(frozen=True)
class RouterConfig:
    """A router: one model name served by several cores (embedded or remote, named in
    ``KernelConfig.cores``). Calls go to the least-loaded core, an agent stays on the core it
    used last (which holds its KV) unless that core's load (queued + active, per unit of
    capacity) exceeds the lightest one's by more than ``affinity_slack``, and the calls of a
    core that fails are resubmitted to the others. A failed core is skipped for ``down_seconds``.
    """

    name: str
    cores: tuple[str, ...]
    affinity_slack: float = 1.0
    down_seconds: float = 5.0

    def __post_init__(self) -> None:
        _check_core_name(self.name)
        if not self.cores:
            raise ConfigError(f"router {self.name!r} needs at least one core")
        if len(set(self.cores)) != len(self.cores):
            raise ConfigError(f"router {self.name!r}: core names repeat in {list(self.cores)}")
        if not self.affinity_slack >= 0:
            raise ConfigError(f"router {self.name!r}: affinity_slack must be >= 0")
        if not self.down_seconds >= 0:
            raise ConfigError(f"router {self.name!r}: down_seconds must be >= 0")


AnyCoreConfig = CoreConfig | RemoteCoreConfig | RouterConfig


def _check_core_name(name: str) -> None:
    if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise ConfigError(f"core name must be letters, digits, '-', '_' or '.', got {name!r}")


@dataclass(frozen=True)
class StorageConfig:
    """Where memory and storage live, and each agent's storage quota.

    ``database``: a SQLite file path (or ``sqlite:///PATH``), or a PostgreSQL URL
    (``postgresql://...``). Empty: a temporary SQLite database that lives as long as the kernel
    (``aios serve`` and ``aios run`` use ``DATA_DIR/aios.db``). The quota counts live bytes and
    entries (files and folders), not history."""

    database: str = ""
    workers: int = 0  # database worker threads; 0: 1 for SQLite, 4 for PostgreSQL
    sqlite_synchronous: str = "full"  # full: an acknowledged write survives power loss
    max_bytes: int = 1 << 30
    max_files: int = 100_000
    max_file_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_files", "max_file_bytes"):
            if _bad_int(getattr(self, name), 1):
                raise ConfigError(f"storage {name} must be a positive integer")
        if _bad_int(self.workers, 0) or self.workers > 64:
            raise ConfigError(f"storage workers must be in [0, 64], got {self.workers!r}")
        if self.sqlite_synchronous.lower() not in ("full", "normal", "extra"):
            raise ConfigError(
                f"storage sqlite_synchronous must be full, normal or extra, "
                f"got {self.sqlite_synchronous!r}"
            )


@dataclass(frozen=True)
class MemoryConfig:
    """The memory manager's RAM tier: every note and turn is durable in the database; RAM
    keeps recently used ones, evicting by LRU-K when resident bytes pass ``high_water`` of
    ``ram_bytes`` (all agents) or ``agent_ram_bytes`` (one agent)."""

    ram_bytes: int = 64 << 20
    agent_ram_bytes: int = 8 << 20
    high_water: float = 0.8
    k: int = 2  # LRU-K's K (1 is plain LRU)
    chunk_turns: int = 32  # conversation-history turns per block

    def __post_init__(self) -> None:
        if _bad_int(self.ram_bytes, 0) or _bad_int(self.agent_ram_bytes, 0):
            raise ConfigError("memory ram_bytes and agent_ram_bytes must be integers >= 0")
        if isinstance(self.high_water, bool) or not 0 < self.high_water <= 1:
            raise ConfigError(f"memory high_water must be in (0, 1], got {self.high_water!r}")
        if _bad_int(self.k, 1) or self.k > 8:
            raise ConfigError(f"memory k (LRU-K) must be in [1, 8], got {self.k!r}")
        if _bad_int(self.chunk_turns, 1):
            raise ConfigError("memory chunk_turns must be an integer >= 1")


def _bad_int(value: object, low: int) -> bool:
    return isinstance(value, bool) or not isinstance(value, int) or value < low


def _default_groups() -> dict[str, tuple[str, ...]]:
    return {
        "default": ("llm.*", "memory.*", "storage.*", "tools.list", "tools.call:*"),
        "admin": ("*",),
    }


@dataclass(frozen=True)
class AccessConfig:
    """Which groups may do what, and what needs a person's approval."""

    groups: Mapping[str, tuple[str, ...]] = field(default_factory=_default_groups)
    approve: tuple[str, ...] = ()  # capability patterns that need approval
    # Groups whose members skip approvals (each skip is audited as "exempt"); none by default,
    # the admin's calls included. These names cannot be claimed by a credential.
    exempt: tuple[str, ...] = ()
    approve_destructive_tools: bool = True
    approve_shared_writes: bool = True  # changes to another agent's files
    approval_timeout: float = 300.0  # at most this long in the queue (and the call's deadline)
    # Groups' own LLM quotas; an agent in none of them has the kernel's ``quota``.
    quotas: Mapping[str, Quota] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.quotas, Mapping) or not all(
            isinstance(q, Quota) for q in self.quotas.values()
        ):
            raise ConfigError("access.quotas must map group names to quotas")
        if not isinstance(self.groups, Mapping) or "default" not in self.groups:
            raise ConfigError("access.groups must be a table with a 'default' group")
        for group, patterns in self.groups.items():
            if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
                raise ConfigError(f"access.groups.{group} must be a list of capability patterns")
        if not self.approval_timeout > 0:
            raise ConfigError("access.approval_timeout must be > 0 seconds")
        if isinstance(self.exempt, str) or not all(isinstance(g, str) for g in self.exempt):
            raise ConfigError("access.exempt must be a list of group names")
        if "default" in self.exempt:
            raise ConfigError("access.exempt cannot name 'default' (every agent is in it)")


@dataclass(frozen=True)
class McpServerConfig:
    """An MCP server whose tools the kernel offers (started with the kernel, over stdio)."""

    name: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    concurrency: int = 4
    timeout: float = 30.0

    def __post_init__(self) -> None:
        _check_core_name(self.name.replace("__", "-"))
        if not self.command or not all(isinstance(c, str) and c for c in self.command):
            raise ConfigError(f"mcp server {self.name!r}: command must be a non-empty list")
        if _bad_int(self.concurrency, 1) or not self.timeout > 0:
            raise ConfigError(f"mcp server {self.name!r}: concurrency >= 1 and timeout > 0")


@dataclass(frozen=True)
class DurableConfig:
    """Durable agent processes (see aios.durable): agents the kernel spawns are recorded with
    a journal of their syscalls' results, and resumed by replay after a restart.

    ``enabled``: journal spawned agents (off: they are lost with the kernel, as before).
    ``kernel_id``: this kernel's name in the process leases (``aios serve`` keeps one in its
    data directory, so a restarted server takes its own processes back at once; a library
    kernel without one gets a fresh random name, and takes over only expired leases).
    ``lease_seconds``: how long a kernel that stopped renewing still holds its processes (a
    second kernel on the same PostgreSQL takes them over after that). ``idempotency_hours``:
    how long an HTTP syscall's ``Idempotency-Key`` answers with the recorded result."""

    enabled: bool = True
    kernel_id: str = ""
    lease_seconds: float = 30.0
    idempotency_hours: float = 24.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"durable.enabled must be true or false, got {self.enabled!r}")
        if not self.lease_seconds >= 0.5 or self.lease_seconds == math.inf:
            raise ConfigError(f"durable.lease_seconds must be >= 0.5, got {self.lease_seconds!r}")
        if not self.idempotency_hours > 0:
            raise ConfigError(
                f"durable.idempotency_hours must be > 0, got {self.idempotency_hours!r}"
            )
        if len(self.kernel_id) > 128:
            raise ConfigError("durable.kernel_id must be at most 128 characters")


@dataclass(frozen=True)
class ObservabilityConfig:
    """Traces and metrics (see aios.tracing, aios.metrics).

    ``tracing``: None (the default) turns spans on when an OTLP endpoint is set here or in the
    standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; true
    records spans even with nowhere to send them (a provider passed to the kernel, a test);
    false never. ``otlp_endpoint``: an OTLP/HTTP collector's base URL
    (``http://localhost:4318``; traces go to its ``/v1/traces``). ``capture_content``: record
    prompts and answers on spans (the GenAI conventions' opt-in attributes); off, no message
    text ever leaves the kernel in a span. ``metrics_token``: a bearer token that may read
    ``GET /metrics`` (and nothing else), for a Prometheus scraper; the admin token always may."""

    tracing: bool | None = None
    otlp_endpoint: str = ""
    capture_content: bool = False
    service_name: str = "aios"
    metrics_token: str = ""

    def __post_init__(self) -> None:
        if self.tracing is not None and not isinstance(self.tracing, bool):
            raise ConfigError(f"observability.tracing must be true or false, got {self.tracing!r}")
        if self.otlp_endpoint and not self.otlp_endpoint.startswith(("http://", "https://")):
            raise ConfigError(
                "observability.otlp_endpoint must be an http(s) URL of an OTLP/HTTP collector "
                f"(like http://localhost:4318), got {self.otlp_endpoint!r}"
            )
        if not self.service_name:
            raise ConfigError("observability.service_name must not be empty")
        if self.metrics_token and len(self.metrics_token) < 16:
            raise ConfigError("observability.metrics_token must be at least 16 characters")

    def __repr__(self) -> str:  # the token is a secret: never in a log or a traceback
        token = "***" if self.metrics_token else ""
        return (
            f"ObservabilityConfig(tracing={self.tracing!r}, otlp_endpoint={self.otlp_endpoint!r}, "
            f"capture_content={self.capture_content!r}, service_name={self.service_name!r}, "
            f"metrics_token={token!r})"
        )


@dataclass(frozen=True)
class KernelConfig:
    """The kernel: its LLM cores, the scheduling policy (and its parameters), the default
    syscall deadline and the per-agent quota."""

    cores: tuple[AnyCoreConfig, ...] = field(default_factory=lambda: (CoreConfig(),))
    policy: str = "fifo"
    syscall_timeout: float = 600.0
    quantum_tokens: int = 32  # tokens run before a request may be pre-empted (rr, priority, fair)
    aging_seconds: float = 5.0  # waiting this long gains one priority level (priority, spf)
    quota: Quota = field(default_factory=Quota)  # per agent; default: no limits
    storage: StorageConfig = field(default_factory=StorageConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    mcp: tuple[McpServerConfig, ...] = ()  # MCP servers whose tools the kernel offers
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    durable: DurableConfig = field(default_factory=DurableConfig)

    def __post_init__(self) -> None:
        if not self.cores:
            raise ConfigError("the kernel needs at least one LLM core")
        names = [c.name for c in self.cores]
        if len(set(names)) != len(names):
            raise ConfigError(f"core names must be unique, got {names}")
        for router in self.cores:
            if isinstance(router, RouterConfig):
                kinds = {c.name: c for c in self.cores}
                for member in router.cores:
                    if member not in kinds:
                        raise ConfigError(f"router {router.name!r}: no core named {member!r}")
                    if isinstance(kinds[member], RouterConfig):
                        raise ConfigError(
                            f"router {router.name!r}: member {member!r} is a router itself"
                        )
        if self.policy not in POLICIES:
            raise ConfigError(
                f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}"
            )
        if not self.syscall_timeout > 0:
            raise ConfigError("syscall_timeout must be > 0 seconds")
        if isinstance(self.quantum_tokens, bool) or not isinstance(self.quantum_tokens, int):
            raise ConfigError(f"quantum_tokens must be an integer, got {self.quantum_tokens!r}")
        if self.quantum_tokens < 1:
            raise ConfigError(f"quantum_tokens must be >= 1, got {self.quantum_tokens}")
        if not self.aging_seconds > 0:  # also rejects NaN; math.inf means no aging
            raise ConfigError(f"aging_seconds must be > 0, got {self.aging_seconds!r}")

    @property
    def default_model(self) -> str:
        return self.cores[0].name
