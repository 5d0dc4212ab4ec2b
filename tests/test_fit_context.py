"""Context fitting alone (pure): what is kept, what is dropped, and that nothing overflows."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aios.errors import ContextOverflow
from aios.memory.fit import fit
from aios.syscall import Message


def words(messages: Sequence[Message]) -> int:
    """A fake tokenizer: one token per word, plus two per message (the template)."""
    return sum(len(m.content.split()) + 2 for m in messages)


def turns(n: int, size: int = 5) -> list[Message]:
    return [
        Message("user" if i % 2 == 0 else "assistant", " ".join([f"t{i}"] * size)) for i in range(n)
    ]


CALL = [Message("system", "be brief"), Message("user", "what now")]


def test_everything_fits_when_there_is_room() -> None:
    fitted = fit(CALL, turns(4), [(1, "a note")], words, budget=1000)
    assert fitted.history_used == 4 and fitted.history_dropped == 0
    assert fitted.notes_used == (1,) and fitted.notes_dropped == ()
    assert fitted.messages[0] == CALL[0] and fitted.messages[-1] == CALL[-1]
    assert fitted.messages[1].role == "system" and "a note" in fitted.messages[1].content
    assert [m.content for m in fitted.messages[2:-1]] == [m.content for m in turns(4)]
    assert fitted.prompt_tokens == words(fitted.messages)


def test_oldest_turns_go_first_and_the_call_always_stays() -> None:
    history = turns(10)  # 7 tokens each
    fitted = fit(CALL, history, [], words, budget=words(CALL) + 3 * 7)
    assert fitted.history_used == 3 and fitted.history_dropped == 7
    assert [m.content for m in fitted.messages[1:-1]] == [m.content for m in history[-3:]]
    assert fitted.messages[0] == CALL[0] and fitted.messages[-1] == CALL[-1]


def test_notes_best_first_within_their_share() -> None:
    notes = [(i, " ".join(["w"] * 10)) for i in range(5)]
    budget = 200
    fitted = fit(CALL, [], notes, words, budget=budget, notes_share=0.25)
    kept = len(fitted.notes_used)
    assert 1 <= kept < 5 and fitted.notes_used == tuple(range(kept))  # best first
    assert fitted.notes_dropped == tuple(range(kept, 5))
    assert fitted.prompt_tokens - words(CALL) <= 0.25 * budget


def test_the_call_alone_too_long_is_an_error_not_a_cut() -> None:
    with pytest.raises(ContextOverflow):
        fit(CALL, turns(3), [], words, budget=words(CALL) - 1)


@given(
    n_turns=st.integers(0, 40),
    size=st.integers(1, 30),
    n_notes=st.integers(0, 8),
    slack=st.integers(0, 400),
)
def test_never_over_budget_and_counts_add_up(
    n_turns: int, size: int, n_notes: int, slack: int
) -> None:
    budget = words(CALL) + slack
    notes = [(i, "note " * (i + 1)) for i in range(n_notes)]
    fitted = fit(CALL, turns(n_turns, size), notes, words, budget=budget)
    assert fitted.prompt_tokens == words(fitted.messages) <= budget
    assert fitted.history_used + fitted.history_dropped == n_turns
    assert len(fitted.notes_used) + len(fitted.notes_dropped) == n_notes
    # maximal: one more (older) turn would not have fitted
    if fitted.history_dropped:
        older = turns(n_turns, size)[n_turns - fitted.history_used - 1]
        assert fitted.prompt_tokens + words([older]) > budget
