"""Context-window fitting: an agent's long memory into the model's context, never silently
overflowing. Pure: it sees messages and a token counter, and returns what it kept and what it
dropped. The call's own messages (its system prompt and the new turn) are never dropped: if
they alone do not fit, that is a :class:`~aios.errors.ContextOverflow`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aios.errors import ContextOverflow
from aios.syscall import Message

Counter = Callable[[Sequence[Message]], int]


@dataclass(frozen=True)
class Fitted:
    """What went into the prompt: the messages, and what memory was used and dropped."""

    messages: tuple[Message, ...]
    prompt_tokens: int
    budget: int
    history_used: int = 0
    history_dropped: int = 0
    notes_used: tuple[int, ...] = ()
    notes_dropped: tuple[int, ...] = ()
    exact: bool = True  # counted with the model's tokenizer (else estimated)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = self.__dict__.copy()
        data.pop("messages")
        data.pop("extra")
        data["notes_used"], data["notes_dropped"] = list(self.notes_used), list(self.notes_dropped)
        return data


def notes_message(notes: Sequence[str]) -> Message:
    return Message("system", "Notes from your memory:\n" + "\n".join(f"- {n}" for n in notes))


def fit(
    messages: Sequence[Message],
    history: Sequence[Message],
    notes: Sequence[tuple[int, str]],
    count: Counter,
    budget: int,
    *,
    notes_share: float = 0.25,
    exact: bool = True,
) -> Fitted:
    """The call's leading system messages, then the most relevant notes (best first, within
    ``notes_share`` of the budget), then as many of the most recent ``history`` turns as fit,
    then the rest of the call's messages."""
    system = [m for m in _leading_system(messages)]
    new = list(messages[len(system) :])
    base = count([*system, *new])
    if base > budget:
        raise ContextOverflow(
            f"the call's own messages are {base} tokens; the model's context leaves {budget} "
            "for the prompt (memory cannot make room by dropping them)"
        )
    kept: list[tuple[int, str]] = []
    for note in notes:
        trial = [*kept, note]
        cost = count([*system, notes_message([t for _, t in trial]), *new])
        if cost - base <= notes_share * budget and cost <= budget:
            kept = trial
    head = [*system, notes_message([t for _, t in kept])] if kept else system

    def total(n: int) -> int:
        return count([*head, *history[len(history) - n :], *new]) if n else count([*head, *new])

    low, high = 0, len(history)  # the most recent turns that fit: binary search on count
    while low < high:
        mid = (low + high + 1) // 2
        if total(mid) <= budget:
            low = mid
        else:
            high = mid - 1
    recent = list(history[len(history) - low :]) if low else []
    final = (*head, *recent, *new)
    used = {i for i, _ in kept}
    return Fitted(
        messages=final,
        prompt_tokens=count(final),
        budget=budget,
        history_used=low,
        history_dropped=len(history) - low,
        notes_used=tuple(i for i, _ in kept),
        notes_dropped=tuple(i for i, _ in notes if i not in used),
        exact=exact,
    )


def _leading_system(messages: Sequence[Message]) -> list[Message]:
    system = []
    for m in messages:
        if m.role != "system":
            break
        system.append(m)
    return system


def estimate(messages: Sequence[Message]) -> int:
    """A token count for cores whose tokenizer is not local: about 3 characters a token,
    plus the chat template's few tokens per message (an over-estimate for English)."""
    return sum(len(m.content) // 3 + 8 for m in messages) + 4
