"""The engine interface: what an LLM core asks of the thing that actually runs the model.

An engine is driven by exactly one thread (the core's). Each ``step`` receives a plan (which
sequences start, which tokens to feed at which positions, which slots to release) and returns
the tokens sampled for the sequences that asked for one. The engine never sees requests,
queues or clocks; the core never touches the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from aios.syscall import Message, SamplingParams


@dataclass(frozen=True)
class SeqStart:
    """A new sequence takes ``slot``: set up its sampler from ``params``."""

    slot: int
    params: SamplingParams


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
    releases: list[int] = field(default_factory=list)
    starts: list[SeqStart] = field(default_factory=list)
    items: list[BatchItem] = field(default_factory=list)

    @property
    def n_tokens(self) -> int:
        return sum(len(i.tokens) for i in self.items)


@dataclass(frozen=True)
class Sampled:
    slot: int
    token: int
    piece: bytes
    eog: bool  # end of generation (EOS/EOT) token


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

    def step(self, plan: StepPlan) -> list[Sampled]:
        """Run one batched step (blocking; called on the core's thread only)."""
        ...

    def close(self) -> None:
        """Free the model and context (on the core's thread)."""
        ...
