"""Server settings: a TOML file (optional) and environment variables over built-in defaults.

    # aios.toml: every key is optional
    [server]
    host = "127.0.0.1"        # AIOS_HOST
    port = 8080               # AIOS_PORT
    data_dir = "~/.local/share/aios"   # AIOS_DATA_DIR: identities, admin token, aios.db

    [kernel]
    policy = "fifo"           # AIOS_POLICY
    syscall_timeout = 600.0
    [kernel.quota]
    tokens_per_minute = 200000
    max_parallel = 8
    [kernel.storage]          # memory and files; default: DATA_DIR/aios.db (SQLite)
    database = "postgresql://aios@db.example/aios"   # AIOS_DATABASE
    max_bytes = 1073741824    # per agent
    [kernel.memory]
    ram_bytes = 67108864      # the RAM tier of all agents' memory (LRU-K eviction)
    [kernel.durable]          # spawned agents survive a restart (journal + replay)
    lease_seconds = 30.0      # a second kernel on one PostgreSQL takes over after this
    [kernel.access]           # capabilities: deny by default; every agent is in "default"
    approve = ["storage.delete:*"]          # these wait for `aios approve allow ID`
    [kernel.access.groups]
    default = ["llm.*", "memory.*", "storage.*", "tools.list", "tools.call:*"]
    analysts = ["tools.call:python"]
    [kernel.access.quotas.analysts]   # a group's own LLM quota (instead of [kernel.quota])
    tokens_per_minute = 1000000
    [[kernel.mcp]]            # an MCP server's tools join the kernel's (as fs__read_file...)
    name = "fs"
    command = ["npx", "-y", "@modelcontextprotocol/server-filesystem", "/srv/shared"]

    [observability]           # traces (OpenTelemetry) and GET /metrics (Prometheus)
    otlp_endpoint = "http://localhost:4318"   # or OTEL_EXPORTER_OTLP_ENDPOINT
    capture_content = false   # prompts and answers on spans: opt-in
    metrics_token = "..."     # a scraper's token for GET /metrics (the admin's works too)

    [[core]]                  # embedded (the default: SmolLM2; AIOS_MODEL sets its model)
    name = "default"
    model = "smollm2-135m"
    [[core]]                  # remote: any OpenAI-compatible server
    type = "remote"
    name = "vllm"
    base_url = "http://127.0.0.1:8000/v1"
    model = "Qwen/Qwen2.5-7B-Instruct"
    [[core]]
    type = "router"
    name = "pool"
    cores = ["default", "vllm"]

Unknown keys and wrong types are a :class:`~aios.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aios.config import (
    AccessConfig,
    CoreConfig,
    DurableConfig,
    KernelConfig,
    McpServerConfig,
    MemoryConfig,
    ObservabilityConfig,
    RemoteCoreConfig,
    RouterConfig,
    StorageConfig,
    default_data_dir,
)
from aios.errors import ConfigError
from aios.quota import Quota

T = TypeVar("T")


@dataclass(frozen=True)
class ServerConfig:
    """The HTTP server and its limits. ``max_tokens`` caps any one call's output;
    ``max_streams_per_agent`` and ``max_inflight_per_agent`` cap what one identity holds at
    once (beyond: 429 with Retry-After, nothing queued). Bodies over ``max_body_bytes`` get 413.
    On shutdown, requests in flight get ``shutdown_grace`` seconds to finish."""

    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: str = field(default_factory=default_data_dir)
    max_body_bytes: int = 1 << 20
    max_tokens: int = 2048
    max_streams_per_agent: int = 4
    max_inflight_per_agent: int = 64
    shutdown_grace: float = 10.0
    strict_models: bool = False  # /v1: unknown model names are 404 instead of the default core

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port must be in [0, 65535], got {self.port}")
        for name in ("max_body_bytes", "max_tokens", "max_streams_per_agent"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.{name} must be >= 1")
        if self.max_inflight_per_agent < 1:
            raise ConfigError("server.max_inflight_per_agent must be >= 1")
        if self.shutdown_grace < 0:
            raise ConfigError("server.shutdown_grace must be >= 0 seconds")

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()


@dataclass(frozen=True)
class Settings:
    server: ServerConfig = field(default_factory=ServerConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)


ENV = {
    "AIOS_HOST": ("server", "host", str),
    "AIOS_PORT": ("server", "port", int),
    "AIOS_DATA_DIR": ("server", "data_dir", str),
    "AIOS_POLICY": ("kernel", "policy", str),
    "AIOS_DATABASE": ("storage", "database", str),
}


def load_settings(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the TOML file at ``path`` (or ``$AIOS_CONFIG``), then the environment."""
    env = os.environ if env is None else env
    path = path or env.get("AIOS_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).expanduser().read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    _only(data, {"server", "kernel", "core", "observability"}, "the config file")
    server = dict(_table(data, "server"))
    kernel = dict(_table(data, "kernel"))
    for var, (section, key, kind) in ENV.items():
        if var in env:
            target = (
                server
                if section == "server"
                else kernel.setdefault("storage", {})
                if section == "storage"
                else kernel
            )
            try:
                target[key] = kind(env[var])
            except ValueError:
                raise ConfigError(f"{var} must be {kind.__name__}, got {env[var]!r}") from None
    cores = data.get("core", [{"name": "default"}])
    if not isinstance(cores, list) or not cores:
        raise ConfigError("[[core]] must be a non-empty array of tables")
    built = [_core(c, i) for i, c in enumerate(cores)]
    if "AIOS_MODEL" in env:
        first = built[0]
        if not isinstance(first, CoreConfig):
            raise ConfigError("AIOS_MODEL sets the first core's model; it is not embedded")
        built[0] = dataclasses.replace(first, model=env["AIOS_MODEL"])
    tables: dict[str, Any] = {"cores": tuple(built)}
    for name, cls in (
        ("quota", Quota),
        ("storage", StorageConfig),
        ("memory", MemoryConfig),
        ("durable", DurableConfig),
    ):
        tables[name] = _build(cls, _table(kernel, name), f"kernel.{name}")
        kernel.pop(name, None)
    access: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in _table(kernel, "access").items()
    }
    groups = access.get("groups")
    if isinstance(groups, dict):
        access["groups"] = {g: tuple(p) if isinstance(p, list) else p for g, p in groups.items()}
    if "quotas" in access:
        access["quotas"] = {
            group: _build(Quota, _table(access["quotas"], group), f"kernel.access.quotas.{group}")
            for group in _table(access, "quotas")
        }
    tables["access"] = _build(AccessConfig, access, "kernel.access")
    tables["observability"] = _build(
        ObservabilityConfig, _table(data, "observability"), "observability"
    )
    kernel.pop("access", None)
    servers = kernel.pop("mcp", [])
    if not isinstance(servers, list) or not all(isinstance(t, dict) for t in servers):
        raise ConfigError("[[kernel.mcp]] must be an array of tables")
    tables["mcp"] = tuple(
        _build(
            McpServerConfig,
            {k: tuple(v) if k == "command" and isinstance(v, list) else v for k, v in t.items()},
            f"kernel.mcp #{i + 1}",
        )
        for i, t in enumerate(servers)
    )
    server_config = _build(ServerConfig, server, "server")
    if not tables["storage"].database:  # memory and storage live in the data directory
        database = str(server_config.data_path / "aios.db")
        tables["storage"] = dataclasses.replace(tables["storage"], database=database)
    return Settings(
        server=server_config, kernel=_build(KernelConfig, {**kernel, **tables}, "kernel")
    )


def _core(table: Any, index: int) -> CoreConfig | RemoteCoreConfig | RouterConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"core #{index + 1} must be a table")
    table = dict(table)
    kind = table.pop("type", "embedded")
    classes: dict[str, type[CoreConfig] | type[RemoteCoreConfig] | type[RouterConfig]] = {
        "embedded": CoreConfig,
        "remote": RemoteCoreConfig,
        "router": RouterConfig,
    }
    cls = classes.get(kind)
    if cls is None:
        raise ConfigError(f"core #{index + 1}: type must be one of {', '.join(classes)}")
    if "cores" in table and isinstance(table["cores"], list):
        table["cores"] = tuple(table["cores"])
    return _build(cls, table, f"core #{index + 1}")


def _table(data: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{key}] must be a table")
    return value


def _only(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}")


def _build(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """Construct a config dataclass from a table: no unknown keys, simple types checked."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    _only(values, set(fields), f"[{where}]")
    for key, value in values.items():
        default = fields[key].default
        expected = type(default) if default is not dataclasses.MISSING else None
        if default is None or expected is None or expected in (tuple, Quota):
            continue
        ok = isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(f"[{where}] {key} must be {expected.__name__}, got {value!r}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"[{where}]: {e}") from None
