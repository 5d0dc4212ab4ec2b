"""Configuration: frozen dataclasses, validated on construction, built once and passed in."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from aios.errors import ConfigError

POLICIES = ("fifo",)


@dataclass(frozen=True)
class CoreConfig:
    """One embedded LLM core: a model loaded once, serving ``slots`` sequences in one batch.

    ``model`` is a built-in model name (see ``aios.llm.models``) or a path to a GGUF file.
    ``context_tokens`` is the KV cache shared by all slots; ``max_sequence_tokens`` caps one
    sequence (prompt + output). ``batch_tokens`` is the token budget of one decode step: decode
    tokens of running sequences first, then chunks of prompts being prefilled.
    """

    name: str = "smollm2"
    model: str = "smollm2-135m"
    slots: int = 16
    context_tokens: int = 16384
    max_sequence_tokens: int = 4096
    batch_tokens: int = 512
    threads: int = 0  # 0: one per CPU core
    default_max_tokens: int = 256
    max_queue: int = 4096

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
        if self.threads < 0:
            raise ConfigError(f"core {self.name!r}: threads must be >= 0")
        if self.max_sequence_tokens > self.context_tokens:
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
    def n_threads(self) -> int:
        return self.threads or os.cpu_count() or 1


@dataclass(frozen=True)
class KernelConfig:
    """The kernel: its LLM cores, the scheduling policy and the default syscall deadline."""

    cores: tuple[CoreConfig, ...] = field(default_factory=lambda: (CoreConfig(),))
    policy: str = "fifo"
    syscall_timeout: float = 600.0

    def __post_init__(self) -> None:
        if not self.cores:
            raise ConfigError("the kernel needs at least one LLM core")
        names = [c.name for c in self.cores]
        if len(set(names)) != len(names):
            raise ConfigError(f"core names must be unique, got {names}")
        if self.policy not in POLICIES:
            raise ConfigError(
                f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}"
            )
        if not self.syscall_timeout > 0:
            raise ConfigError("syscall_timeout must be > 0 seconds")

    @property
    def default_model(self) -> str:
        return self.cores[0].name
