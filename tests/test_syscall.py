"""Syscall payloads, their validation, and the generation state of an LLM request."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from aios.errors import InvalidRequest
from aios.sdk.llm import LLM
from aios.syscall import (
    Completion,
    LLMCall,
    LLMRequest,
    Message,
    SamplingParams,
    Status,
    Timings,
    Usage,
)

# -- SamplingParams ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"max_tokens": -1},
        {"max_tokens": 2.5},
        {"temperature": -0.1},
        {"temperature": 10.01},
        {"temperature": math.nan},
        {"top_p": 0.0},
        {"top_p": -0.5},
        {"top_p": 1.01},
        {"seed": -1},
        {"seed": 2**32},
        {"stop": ("",)},
        {"stop": ("ok", "")},
        {"stop": tuple(str(i) for i in range(9))},
        {"stop": (3,)},
    ],
    ids=repr,
)
def test_sampling_params_rejects(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequest):
        SamplingParams(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"max_tokens": 1},
        {"temperature": 0.0},
        {"temperature": 10.0},
        {"top_p": 1.0},
        {"top_p": 0.01},
        {"seed": 0},
        {"seed": 2**32 - 1},
        {"stop": tuple(str(i) for i in range(8))},
    ],
    ids=repr,
)
def test_sampling_params_accepts_boundaries(kwargs: dict[str, Any]) -> None:
    SamplingParams(**kwargs)


def test_sampling_params_rejects_a_non_integer_seed() -> None:
    with pytest.raises(InvalidRequest):
        SamplingParams(seed=1.5)  # type: ignore[arg-type]


def test_greedy_means_temperature_zero() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(temperature=0.7).greedy


# -- LLMCall and Message ----------------------------------------------------------------------


def test_llm_call_needs_exactly_one_of_messages_or_prompt() -> None:
    with pytest.raises(InvalidRequest, match="exactly one"):
        LLMCall()
    with pytest.raises(InvalidRequest, match="exactly one"):
        LLMCall(messages=(Message("user", "hi"),), prompt="hi")
    with pytest.raises(InvalidRequest, match="empty"):
        LLMCall(prompt="")
    assert LLMCall(prompt="hi").messages == ()
    assert LLMCall(messages=(Message("user", "hi"),)).prompt is None


def test_message_coerce_accepts_dicts_and_messages() -> None:
    assert Message.coerce({"role": "system", "content": "be brief"}) == Message(
        "system", "be brief"
    )
    message = Message("assistant", "")
    assert Message.coerce(message) is message


@pytest.mark.parametrize(
    "value",
    [
        "user: hi",
        ("user", "hi"),
        None,
        {"content": "hi"},
        {"role": "robot", "content": "hi"},
        {"role": None, "content": "hi"},
        {"role": "user"},
        {"role": "user", "content": None},
        {"role": "user", "content": 3},
        {"role": "user", "content": ["hi"]},
    ],
    ids=repr,
)
def test_message_coerce_rejects(value: Any) -> None:
    with pytest.raises(InvalidRequest):
        Message.coerce(value)


@pytest.mark.parametrize("role", [["user"], {"user": 1}])
def test_message_coerce_rejects_unhashable_role(role: Any) -> None:
    with pytest.raises(InvalidRequest):
        Message.coerce({"role": role, "content": "hi"})


class RecordingClient:
    def __init__(self) -> None:
        self.calls: list[LLMCall] = []

    async def llm(self, call: LLMCall, *, timeout: float | None = None) -> Completion:
        self.calls.append(call)
        return Completion("", "stop", Usage(), Timings(0.0), model="m", syscall_id="s")


async def test_sdk_builds_the_call() -> None:
    client = RecordingClient()
    await LLM(client).chat([{"role": "user", "content": "hi"}], max_tokens=5, stop=["\n"])
    await LLM(client).complete("once upon", model="other", json=True)
    chat, completion = client.calls
    assert chat.messages == (Message("user", "hi"),)
    assert chat.params == SamplingParams(max_tokens=5, stop=("\n",))
    assert completion.prompt == "once upon"
    assert completion.model == "other"
    assert completion.params.json


async def test_sdk_stop_given_as_one_string() -> None:
    client = RecordingClient()
    await LLM(client).complete("x", stop="###")
    assert client.calls[0].params.stop == ("###",)


# -- LLMRequest: generation state ----------------------------------------------------------------


def request(max_tokens: int = 100, prompt_tokens: int = 3, **params: Any) -> LLMRequest:
    call = LLMCall(prompt="p", params=SamplingParams(**params))
    return LLMRequest("agent-1", 10.0, call, list(range(prompt_tokens)), max_tokens)


def feed(req: LLMRequest, *pieces: str | bytes) -> list[str | None]:
    """Append pieces (one token each); the finish reason after each one."""
    reasons: list[str | None] = []
    for piece in pieces:
        assert req.finish_reason is None, "fed past the finish"
        req.append(7, piece.encode() if isinstance(piece, str) else piece)
        reasons.append(req.finish_reason)
    return reasons


async def test_request_starts_queued_with_reservation() -> None:
    req = request(max_tokens=20, prompt_tokens=5)
    assert req.status is Status.QUEUED
    assert req.kv_need == 25
    assert req.prefilling
    req.n_prefilled = 5
    assert not req.prefilling
    assert req.usage.prompt_tokens == 5 and req.usage.completion_tokens == 0


async def test_plain_text_accumulates_until_max_tokens() -> None:
    req = request(max_tokens=3)
    assert feed(req, "a", "b", "c") == [None, None, "length"]
    assert req.text == "abc"
    assert req.output_tokens == [7, 7, 7]
    assert req.usage.total_tokens == 6


async def test_stop_string_inside_one_piece_truncates_before_it() -> None:
    req = request(stop=("END",))
    assert feed(req, "hello ", "wor", "ld END and more") == [None, None, "stop"]
    assert req.text == "hello world "


async def test_stop_string_split_across_pieces() -> None:
    req = request(stop=("<|end|>",))
    assert feed(req, "answer<", "|en", "d|>") == [None, None, "stop"]
    assert req.text == "answer"


async def test_stop_string_at_the_very_start() -> None:
    req = request(stop=("\n",))
    assert feed(req, "\nrest") == ["stop"]
    assert req.text == ""


async def test_stop_wins_over_length_on_the_last_token() -> None:
    req = request(max_tokens=2, stop=("!",))
    assert feed(req, "hi", "!") == [None, "stop"]
    assert req.text == "hi"


async def test_any_of_several_stop_strings() -> None:
    req = request(stop=("STOP", "\n\n"))
    assert feed(req, "line\n", "\nnext") == [None, "stop"]
    assert req.text == "line"


async def test_earliest_stop_string_wins() -> None:
    req = request(stop=("b", "a"))
    feed(req, "xab")
    assert req.text == "x"


async def test_a_partial_stop_string_is_kept() -> None:
    req = request(max_tokens=2, stop=("END",))
    assert feed(req, "EN", "x") == [None, "length"]
    assert req.text == "ENx"


async def test_json_mode_finishes_exactly_at_a_complete_object() -> None:
    req = request(json=True)
    assert feed(req, '{"a": {"b"', ": 1}", ', "c": "}"', "}") == [None, None, None, "stop"]
    assert req.text == '{"a": {"b": 1}, "c": "}"}'


async def test_json_mode_allows_surrounding_whitespace() -> None:
    req = request(json=True)
    assert feed(req, ' {"k": [1, 2]', "} ") == [None, "stop"]


async def test_without_json_mode_a_closing_brace_does_not_finish() -> None:
    req = request(max_tokens=10)
    assert feed(req, "{}") == [None]


@pytest.mark.parametrize("text", ["é", "€uro", "naïve 🙂 ok", "日本語"])
async def test_multibyte_utf8_split_across_pieces(text: str) -> None:
    req = request()
    data = text.encode()
    for i in range(len(data)):  # one byte per token: every character is split
        feed(req, data[i : i + 1])
        assert "\ufffd" not in req.text
        assert text.startswith(req.text)
    assert req.text == text


async def test_stop_string_made_of_a_split_multibyte_character() -> None:
    req = request(stop=("€",))
    data = "5€ each".encode()
    assert feed(req, data[:2], data[2:3], data[3:]) == [None, None, "stop"]
    assert req.text == "5"


# -- Status transitions ------------------------------------------------------------------------


def test_status_finished() -> None:
    assert {s for s in Status if s.finished} == {Status.DONE, Status.FAILED, Status.CANCELLED}


async def test_complete() -> None:
    req = request()
    req.admit(11.0)
    assert req.status is Status.RUNNING and req.timings.admitted == 11.0
    req.complete(12.5, "result")
    assert req.status.value == "done" and req.timings.finished == 12.5
    assert await req.future == "result"
    assert req.timings.waited == pytest.approx(1.0)


async def test_fail_sets_the_error_on_the_future() -> None:
    req = request()
    error = InvalidRequest("bad")
    req.fail(10.5, error)
    assert req.status is Status.FAILED and req.error is error
    assert req.timings.waited == pytest.approx(0.5)  # never admitted: waited until it ended
    with pytest.raises(InvalidRequest):
        await req.future


async def test_cancel_cancels_the_future() -> None:
    req = request()
    req.admit(10.0)
    req.cancel(11.0)
    assert req.status is Status.CANCELLED
    assert req.future.cancelled()
    with pytest.raises(asyncio.CancelledError):
        await req.future


async def test_transitions_are_checked() -> None:
    req = request()
    req.admit(10.0)
    with pytest.raises(AssertionError):
        req.admit(10.0)
    req.complete(11.0, "once")
    with pytest.raises(AssertionError, match="already done"):
        req.complete(12.0, "twice")
    with pytest.raises(AssertionError, match="already done"):
        req.fail(12.0, InvalidRequest("late"))
    with pytest.raises(AssertionError, match="already done"):
        req.cancel(12.0)
    assert req.status.value == "done" and req.timings.finished == 11.0
    assert await req.future == "once"


async def test_ids_are_unique() -> None:
    assert len({request().id for _ in range(50)}) == 50


@pytest.mark.parametrize(
    ("schema", "says"),
    [
        ({"type": "string", "maxLength": 10**7}, "maxLength must be <= 8192"),
        ({"type": "array", "items": {"type": "string", "minLength": 10**9}}, "minLength"),
        ({"type": "object", "properties": {"a": {"type": "array", "maxItems": 9000}}}, "maxItems"),
    ],
)
def test_a_schema_whose_grammar_would_be_huge_is_refused_at_once(
    schema: dict[str, Any], says: str
) -> None:
    """Such a grammar was built on the event loop (maxLength 10**7: 80 MB, the server stalled);
    the bound is checked on the schema, before anything is built."""
    import json

    with pytest.raises(InvalidRequest, match=says):
        SamplingParams(json_schema=json.dumps(schema))
    assert SamplingParams(json_schema=json.dumps({"type": "string", "maxLength": 64})).json_output
