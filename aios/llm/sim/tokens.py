"""The SIMULATED model's tokens: a toy tokenizer and the deterministic choice of every
generated token (no model runs).

Text is split on whitespace; a word is one token per 4 characters (the ~4 characters per token
of real BPE vocabularies), ids from a CRC, so tokenization is cheap, deterministic and
prefix-stable at word boundaries. Generated tokens are short words (one token each) chosen by a
hash of the sequence's whole token history, so the same history gives the same continuation,
whoever runs it and however often it was pre-empted; re-tokenizing a reply's text gives back its
tokens (an agent's next prompt can reuse the KV of its last call). A reply ends after a length
derived from its prompt (``reply_tokens`` range), or never when ``ignore_eos``. Sampling
parameters other than ``ignore_eos`` (temperature, grammars) are not modeled.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from aios.errors import ConfigError
from aios.syscall import Message, SamplingParams

EOG = 1  # end of generation
ROLE_TOKENS: dict[str, int] = {"system": 2, "user": 3, "assistant": 4}
END_TURN = 5
WORD_BASE = 16
# Generated words: at most 4 characters each, so each is exactly one token.
_WORDS_TEXT = (
    "the a plan step tool note next then and so it is we can use map list one two ok yes no "
    "done data file read save run test fix add time cost task goal idea good fast slow more "
    "less best both each all some many few new old big low high top end key code text page "
    "item part set get"
)
WORDS: tuple[str, ...] = tuple(_WORDS_TEXT.split())
_WORD_IDS = {w: WORD_BASE + i for i, w in enumerate(WORDS)}
HASH_BASE = WORD_BASE + len(WORDS)
HASH_SPAN = 1 << 20
CHARS_PER_TOKEN = 4
_MOD = (1 << 61) - 1
_MUL = 1_000_003
_MASK64 = (1 << 64) - 1


def tokenize(text: str) -> list[int]:
    """One token per 4 characters of each whitespace-separated word (a known word: one)."""
    out: list[int] = []
    for word in text.split():
        known = _WORD_IDS.get(word)
        if known is not None:
            out.append(known)
            continue
        for i in range(0, len(word), CHARS_PER_TOKEN):
            piece = word[i : i + CHARS_PER_TOKEN].encode()
            out.append(HASH_BASE + zlib.crc32(piece) % HASH_SPAN)
    return out


def tokenize_chat(messages: Sequence[Message]) -> list[int]:
    """``<role> content <end>`` per message, then the assistant's turn marker."""
    out: list[int] = []
    for m in messages:
        out.append(ROLE_TOKENS[m.role])
        out += tokenize(m.content)
        out.append(END_TURN)
    out.append(ROLE_TOKENS["assistant"])
    return out


def _mix(x: int) -> int:
    """splitmix64's finalizer: spreads a history hash over 64 bits."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


@dataclass
class SeqState:
    """One sequence's KV (``cells``: cell ids; ``hashes[i]``: hash of the tokens at positions
    0..i) and its sampler (``params`` None: no sampler). ``pending`` is the token sampled last
    and not fed back yet (feeding it is a decode)."""

    cells: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    params: SamplingParams | None = None
    eog_at: int | None = None  # reply length, fixed at the first sample
    n_sampled: int = 0
    pending: int | None = None

    def feed(self, tokens: Sequence[int]) -> None:
        hashes = self.hashes
        h = hashes[-1] if hashes else 0
        for t in tokens:
            h = (h * _MUL + t + 1) % _MOD
            hashes.append(h)
        self.pending = None

    def sample(self, reply_tokens: tuple[int, int]) -> tuple[int, bytes, bool]:
        """The next token from the history: (token, piece, end of generation)."""
        h = self.hashes[-1] if self.hashes else 0
        if self.eog_at is None:  # the history is the prompt: it sets the reply's length
            lo, hi = reply_tokens
            self.eog_at = lo + _mix(h ^ 0x5EED) % (hi - lo + 1)
        ignore_eos = self.params is not None and self.params.ignore_eos
        self.n_sampled += 1
        if not ignore_eos and self.n_sampled > self.eog_at:
            self.pending = EOG
            return EOG, b"", True
        k = _mix(h) % len(WORDS)
        self.pending = WORD_BASE + k
        return WORD_BASE + k, b" " + WORDS[k].encode(), False


def check_reply_tokens(reply_tokens: tuple[int, int]) -> None:
    """Reject a ``(min, max)`` reply length range that is not ``0 <= min <= max``."""
    lo, hi = reply_tokens
    if not 0 <= lo <= hi:
        raise ConfigError(
            f"reply_tokens must be (min, max) with 0 <= min <= max, got {reply_tokens}"
        )
