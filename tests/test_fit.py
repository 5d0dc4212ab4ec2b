"""Context-window fitting alone (pure), with a fake tokenizer that counts words: the call's own
messages always stay, the most recent history turns are kept and the oldest dropped, notes go
in best first within their share, the report adds up, and nothing ever overflows."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aios.errors import ContextOverflow, InvalidRequest
from aios.memory.fit import Fitted, fit, notes_message
from aios.syscall import Message


def words(messages: Sequence[Message]) -> int:
    """A fake tokenizer: a token per word, plus 2 per message (the chat template)."""
    return sum(len(m.content.split()) + 2 for m in messages)


def text(n: int, tag: str = "w") -> str:
    return " ".join([tag] * n)


def turns(n: int, size: int = 5) -> list[Message]:
    """n history turns of ``size`` words each (size + 2 tokens), alternating roles."""
    return [Message("user" if i % 2 == 0 else "assistant", text(size, f"t{i}")) for i in range(n)]


SYSTEM = Message("system", "be brief")  # 4 tokens
ASK = Message("user", "what now")  # 4 tokens
CALL = [SYSTEM, ASK]


def parts(fitted: Fitted, call: Sequence[Message]) -> tuple[list[Message], list[Message]]:
    """The notes messages and the history turns between the call's leading system messages and
    its other messages."""
    lead = 0
    while lead < len(call) and call[lead].role == "system":
        lead += 1
    tail = len(call) - lead
    middle = list(fitted.messages[lead : len(fitted.messages) - tail])
    assert list(fitted.messages[:lead]) == list(call[:lead])
    assert list(fitted.messages[len(fitted.messages) - tail :]) == list(call[lead:])
    notes = [m for m in middle[:1] if m.role == "system" and m.content.startswith("Notes from")]
    return notes, middle[len(notes) :]


def test_everything_fits_when_there_is_room() -> None:
    history = turns(4)
    fitted = fit(CALL, history, [(7, "a note"), (9, "another")], words, budget=1000)
    assert fitted.messages == (
        SYSTEM, notes_message(["a note", "another"]), *history, ASK,
    )  # fmt: skip
    assert (fitted.history_used, fitted.history_dropped) == (4, 0)
    assert (fitted.notes_used, fitted.notes_dropped) == ((7, 9), ())
    assert fitted.prompt_tokens == words(fitted.messages) and fitted.budget == 1000
    assert fitted.exact and fit(CALL, [], [], words, 100, exact=False).exact is False
    assert fitted.to_json()["notes_used"] == [7, 9] and "messages" not in fitted.to_json()


def test_the_call_alone_is_kept_even_when_memory_takes_nothing() -> None:
    budget = words(CALL)
    fitted = fit(CALL, turns(3), [(1, "note")], words, budget=budget)
    assert fitted.messages == tuple(CALL)
    assert (fitted.history_used, fitted.history_dropped) == (0, 3)
    assert (fitted.notes_used, fitted.notes_dropped) == ((), (1,))
    assert fitted.prompt_tokens == budget


def test_the_call_alone_over_budget_is_a_context_overflow() -> None:
    with pytest.raises(ContextOverflow) as info:
        fit(CALL, [], [], words, budget=words(CALL) - 1)
    assert isinstance(info.value, InvalidRequest)  # a bad request, not a server failure
    long_system = [Message("system", text(50)), ASK]
    with pytest.raises(ContextOverflow):
        fit(long_system, turns(10), [(1, "n")], words, budget=40)
    # without a system message, and with several of them
    assert fit([ASK], [], [], words, budget=4).messages == (ASK,)
    with pytest.raises(ContextOverflow):
        fit([SYSTEM, SYSTEM, ASK], [], [], words, budget=11)


def test_the_most_recent_turns_are_kept_and_the_oldest_dropped() -> None:
    history = turns(10)  # 7 tokens each
    for room in range(0, 11):
        fitted = fit(CALL, history, [], words, budget=words(CALL) + room * 7 + 3)
        assert fitted.history_used == room and fitted.history_dropped == 10 - room
        assert list(fitted.messages[1:-1]) == history[10 - room :]
        assert fitted.messages[0] == SYSTEM and fitted.messages[-1] == ASK
        assert fitted.prompt_tokens == words(CALL) + room * 7 <= fitted.budget


def test_a_long_recent_turn_does_not_let_older_turns_skip_ahead() -> None:
    history = [*turns(5, size=1), Message("user", text(40))]  # the newest turn is long
    fitted = fit(CALL, history, [], words, budget=words(CALL) + 20)
    assert fitted.history_used == 0  # never an older turn without the newer ones
    assert fitted.messages == tuple(CALL)


def test_notes_best_first_within_their_share() -> None:
    notes = [(i, text(10, f"n{i}")) for i in range(6)]  # each costs 11 tokens in the list
    budget = 200  # the share is 50 tokens: the header (4 + 2) and 4 notes (44)
    fitted = fit(CALL, [], notes, words, budget=budget, notes_share=0.25)
    assert fitted.notes_used == (0, 1, 2, 3) and fitted.notes_dropped == (4, 5)
    assert fitted.messages[1] == notes_message([t for _, t in notes[:4]])
    assert words(fitted.messages) - words(CALL) <= 0.25 * budget
    # a later, smaller note still goes in when a bigger one before it does not
    mixed = [(1, text(30)), (2, text(60)), (3, text(5))]
    fitted = fit(CALL, [], mixed, words, budget=200, notes_share=0.25)
    assert fitted.notes_used == (1, 3) and fitted.notes_dropped == (2,)
    # no share, no notes; history then gets the room
    fitted = fit(CALL, turns(3), notes, words, budget=200, notes_share=0.0)
    assert fitted.notes_used == () and fitted.notes_dropped == tuple(range(6))
    assert fitted.history_used == 3


def test_notes_come_before_history_and_history_takes_what_is_left() -> None:
    notes = [(1, text(10))]
    history = turns(10)  # 7 tokens each
    budget = words(CALL) + 17 + 3 * 7  # the note message takes 17 (2 + 4 header + 11)
    fitted = fit(CALL, history, notes, words, budget=budget, notes_share=0.5)
    assert fitted.notes_used == (1,) and fitted.history_used == 3
    assert fitted.messages == (SYSTEM, notes_message([text(10)]), *history[-3:], ASK)
    assert fitted.prompt_tokens == budget


def test_system_messages_after_the_first_user_message_belong_to_the_call() -> None:
    call = [SYSTEM, ASK, Message("system", "late instruction"), Message("user", "go")]
    fitted = fit(call, turns(2), [(5, "note")], words, budget=1000)
    assert fitted.messages[0] == SYSTEM
    assert fitted.messages[-3:] == tuple(call[1:])
    assert fitted.messages[1] == notes_message(["note"])


CONTENT = st.integers(0, 30).map(text)


@settings(max_examples=300, deadline=None)
@given(
    systems=st.lists(CONTENT, max_size=3),
    new=st.lists(CONTENT, min_size=1, max_size=3),
    history=st.lists(CONTENT, max_size=25),
    notes=st.lists(CONTENT, max_size=8),
    budget=st.integers(0, 400),
    share=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
)
def test_fitting_never_overflows_and_reports_what_it_did(
    systems: list[str],
    new: list[str],
    history: list[str],
    notes: list[str],
    budget: int,
    share: float,
) -> None:
    call = [Message("system", s) for s in systems] + [
        Message("user" if i % 2 == 0 else "assistant", s) for i, s in enumerate(new)
    ]
    past = [Message("user" if i % 2 == 0 else "assistant", s) for i, s in enumerate(history)]
    memo = [(100 + i, s) for i, s in enumerate(notes)]
    base = words(call)
    if base > budget:
        with pytest.raises(ContextOverflow):
            fit(call, past, memo, words, budget, notes_share=share)
        return
    fitted = fit(call, past, memo, words, budget, notes_share=share)

    assert fitted.prompt_tokens == words(fitted.messages) <= budget
    note_messages, kept_turns = parts(fitted, call)  # the call is all there, in order
    # history: a suffix (the most recent turns), as many as fit
    assert fitted.history_used == len(kept_turns)
    assert fitted.history_used + fitted.history_dropped == len(past)
    assert kept_turns == past[len(past) - len(kept_turns) :]
    head = [*call[: len(systems)], *note_messages]
    if fitted.history_dropped:
        one_more = past[len(past) - len(kept_turns) - 1 :]
        assert words([*head, *one_more, *call[len(systems) :]]) > budget
    # notes: best first, within the share, greedy (a dropped note did not fit then)
    used, dropped = list(fitted.notes_used), list(fitted.notes_dropped)
    assert sorted(used + dropped) == [i for i, _ in memo]
    assert used == sorted(used) and dropped == sorted(dropped)
    assert (note_messages != []) == (used != [])
    by_id = dict(memo)
    if used:
        assert note_messages == [notes_message([by_id[i] for i in used])]
        assert words([*call, *note_messages]) - base <= share * budget
    for i in dropped:
        before = [by_id[j] for j in used if j < i]
        cost = words([*call, notes_message([*before, by_id[i]])])
        assert cost - base > share * budget or cost > budget
