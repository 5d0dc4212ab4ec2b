"""The engine interface: what an LLM core asks of the thing that actually runs the model.

An engine is driven by exactly one thread (the core's). Each ``step`` receives a plan: KV
operations (save a sequence's context and free its slot, release, restore a saved context, copy
a prefix from one slot to another, trim), then which sequences start and which tokens to feed at
which positions. It returns the tokens sampled for the sequences that asked for one. The engine
never sees requests, queues or clocks; the core never touches the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aios.syscall import Message, SamplingParams


@dataclass(frozen=True)
class SeqStart:
    """A new sequence takes ``slot``: set up its sampler from ``params`` (replacing any old
    one). The slot's KV is left as the plan's other operations made it."""

    slot: int
    params: SamplingParams


@dataclass(frozen=True)
class SeqSave:
    """Pre-empt ``slot``: put its KV state into the context store under ``key``, park its
    sampler (grammar and RNG state included) under the same key, and clear the slot."""

    slot: int
    key: str


@dataclass(frozen=True)
class SeqRestore:
    """Load the context saved under ``key`` into the empty ``slot`` and give it back its
    sampler. Positions are unchanged, so feeding continues where it stopped."""

    slot: int
    key: str


@dataclass(frozen=True)
class KVCopy:
    """Give the empty slot ``dst`` the first ``n`` positions of ``src`` (shared cells, no
    copy in a unified cache)."""

    src: int
    dst: int
    n: int


@dataclass(frozen=True)
class BatchItem:
    """Feed ``tokens`` to ``slot`` at positions ``pos, pos+1, ...``; sample after the last one
    if ``sample``."""

    slot: int
    tokens: Sequence[int]
    pos: int
    sample: bool


@dataclass
class StepPlan:
    """One step. The engine applies the fields in declaration order: saves, releases, drops,
    restores, copies, trims, starts, then decodes ``items`` in one batch."""

    saves: list[SeqSave] = field(default_factory=list)
    releases: list[int] = field(default_factory=list)  # clear the slot's KV and sampler
    drops: list[str] = field(default_factory=list)  # discard saved contexts (and samplers)
    restores: list[SeqRestore] = field(default_factory=list)
    copies: list[KVCopy] = field(default_factory=list)
    trims: list[tuple[int, int]] = field(default_factory=list)  # (slot, keep): drop pos >= keep
    starts: list[SeqStart] = field(default_factory=list)
    items: list[BatchItem] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.saves
            or self.releases
            or self.drops
            or self.copies
            or self.trims
            or self.restores
            or self.starts
            or self.items
        )

    @property
    def n_tokens(self) -> int:
        return sum(len(i.tokens) for i in self.items)


@dataclass(frozen=True)
class Sampled:
    slot: int
    token: int
    piece: bytes
    eog: bool  # end of generation (EOS/EOT) token


class ContextStore(Protocol):
    """Where saved sequence contexts live while their request is pre-empted."""

    def put(self, key: str, data: bytes) -> None: ...
    def take(self, key: str) -> bytes: ...
    def drop(self, key: str) -> None: ...


class Engine(Protocol):
    """Runs one model for up to ``slots`` concurrent sequences."""

    model_name: str
    description: str
    slots: int
    context_tokens: int
    max_sequence_tokens: int

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        """Render ``messages`` with the model's chat template (adding the assistant turn)."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Tokenize a raw completion prompt."""
        ...

    def step(self, plan: StepPlan, store: ContextStore) -> list[Sampled]:
        """Run one batched step (blocking; called on the core's thread only). Saves go to and
        restores come from ``store``."""
        ...

    def close(self) -> None:
        """Free the model and context (on the core's thread)."""
        ...
