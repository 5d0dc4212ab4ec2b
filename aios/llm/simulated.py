"""A SIMULATED LLM core: a deterministic cost model in place of a model.

For unit tests and scale experiments beyond this machine. It is never a default: nothing in
aios builds it unless asked (``Kernel(config, engine_factory=lambda cfg: SimulatedEngine(cfg,
CostModel.calibrated()))``), its ``description`` says "simulated", and every figure made with
it must say so too.

Two things run on one :class:`CostModel` (the same simulated hardware):

- :class:`SimulatedEngine`, an :class:`~aios.llm.engine.Engine` for the kernel's core. Each
  ``step`` lasts the modeled time of its plan (scaled by ``time_scale``) on the core's thread:
  it sleeps for what its own bookkeeping left of it. It tracks every slot's KV exactly as a
  unified llama.cpp cache would (cells shared by copies, trimmed, saved into the context store
  as bytes of the modeled size, restored) and raises :class:`OutOfMemory` when a step would
  need more KV cells than it has. A saved context is that many zero bytes (real memory, as a
  real kernel holds; the RSS counts them once the allocator touches their pages;
  ``stats.peak_snapshot_bytes`` always); the sequence's own state (token history, sampler)
  stays in the engine under the same key, as LlamaCppEngine keeps a pre-empted sampler.
- :class:`SimulatedServer`, what agents hit *without* a kernel: a naive continuously batching
  server that takes every request that arrives, with no admission control, so when the
  sequences' KV outgrows the cache the unlucky requests fail with :class:`OutOfMemory`.

Tokens. Text is split on whitespace; a word is one token per 4 characters (the ~4 characters per
token of real BPE vocabularies), ids from a CRC, so tokenization is cheap, deterministic and
prefix-stable at word boundaries. Generated tokens are short words (one token each) chosen by a
hash of the sequence's whole token history, so the same history gives the same continuation,
whoever runs it and however often it was pre-empted; re-tokenizing a reply's text gives back its
tokens (an agent's next prompt can reuse the KV of its last call). A reply ends after a length
derived from its prompt (``reply_tokens`` range), or never when ``ignore_eos``. Sampling
parameters other than ``ignore_eos`` (temperature, grammars) are not modeled.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from aios.config import CoreConfig
from aios.errors import ConfigError, CoreError, InvalidRequest
from aios.llm.engine import ContextStore, Sampled, StepPlan
from aios.syscall import Message, SamplingParams

# -- the calibrated machine ---------------------------------------------------------------------
CALIBRATION_SOURCE = (
    "SmolLM2-135M-Instruct Q4_1 on the embedded llama.cpp core, 2-core x86_64 CPU, 2026-11-22. "
    "Prefill: ~280 tokens/s for any chunk of 64-512 tokens (bench/context_switch.py prefill, "
    "bench/throughput.py). Decode: aggregate tokens/s of one llama_batch of N sequences "
    "(bench/throughput.py, 'limit' arm): 1 -> 128, 4 -> 160, 8 -> 188, 16 -> 192; these are whole "
    "steps, so llama.cpp's fixed per-step cost is inside them and step_overhead_s adds nothing. "
    "Snapshot of one sequence (bench/context_switch.py, llama_state_seq_get/set_data, 2048 "
    "tokens): 47.2 MB, save 68 ms, restore 42 ms. kv_cells: the 32768-cell cache "
    "bench/agents.py gives the kernel (737 MB of KV at this size per token); slots: llama.cpp's "
    "limit of 256 sequences per context."
)


@dataclass(frozen=True)
class CostModel:
    """What one step of the simulated core costs. Times are seconds of the calibrated machine;
    the engine sleeps ``time_scale`` times as long (1.0: real time; 0.01: a machine 100x
    faster, for scale runs; 0: no sleeping at all, for tests).

    A step that decodes ``b`` sequences and prefills ``p`` prompt tokens takes
    ``step_overhead_s + decode_seconds(b) + p * prefill_s_per_token``, plus
    ``save_s_per_token`` / ``restore_s_per_token`` times the length of every sequence it saves
    or restores. ``decode_seconds`` is piecewise linear in ``b`` through the measured points
    ``decode_tokens_per_s`` ((batch size, aggregate tokens/s), step time ``b / rate``) and
    extrapolated with the last segment's slope. A snapshot takes ``snapshot_bytes_per_token``
    bytes per position. The KV cache holds ``kv_cells`` cells over at most ``slots`` sequences.
    """

    prefill_s_per_token: float = 1 / 280
    decode_tokens_per_s: tuple[tuple[int, float], ...] = (
        (1, 128.0),
        (4, 160.0),
        (8, 188.0),
        (16, 192.0),
    )
    step_overhead_s: float = 0.0
    save_s_per_token: float = 0.068 / 2048
    restore_s_per_token: float = 0.042 / 2048
    snapshot_bytes_per_token: int = 23052  # 47_211_240 bytes / 2048 tokens
    kv_cells: int = 32768
    slots: int = 256
    time_scale: float = 1.0
    source: str = CALIBRATION_SOURCE

    def __post_init__(self) -> None:
        for name in (
            "prefill_s_per_token",
            "step_overhead_s",
            "save_s_per_token",
            "restore_s_per_token",
            "time_scale",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"cost model: {name} must be a finite number >= 0, got {value!r}")
        for name in ("snapshot_bytes_per_token", "kv_cells", "slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"cost model: {name} must be an integer >= 1, got {value!r}")
        points = self.decode_tokens_per_s
        if not points:
            raise ConfigError("cost model: decode_tokens_per_s needs at least one point")
        last_batch, last_time = 0, 0.0
        for batch, rate in points:
            if not isinstance(batch, int) or batch <= last_batch:
                raise ConfigError(
                    "cost model: decode_tokens_per_s batch sizes must be integers >= 1 in "
                    f"increasing order, got {[b for b, _ in points]}"
                )
            if not (isinstance(rate, int | float) and math.isfinite(rate) and rate > 0):
                raise ConfigError(f"cost model: decode rate at batch {batch} must be > 0")
            if batch / rate < last_time:
                raise ConfigError(
                    f"cost model: a decode step of {batch} sequences cannot be faster than one "
                    f"of {last_batch} ({batch / rate:.4f} s < {last_time:.4f} s)"
                )
            last_batch, last_time = batch, batch / rate

    # -- the calibration --------------------------------------------------------------------
    @classmethod
    def calibrated(cls, time_scale: float = 1.0) -> CostModel:
        """The model of the reference machine (the defaults; see ``CALIBRATION_SOURCE``)."""
        return cls(time_scale=time_scale)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"cost model: unknown fields {unknown}; known: {sorted(known)}")
        values = dict(data)
        if "decode_tokens_per_s" in values:
            values["decode_tokens_per_s"] = tuple(
                (int(b), float(r)) for b, r in values["decode_tokens_per_s"]
            )
        return cls(**values)

    def save(self, path: Path) -> None:
        """Write the model as JSON (``{"about": ..., "cost_model": {...}}``)."""
        doc = {
            "about": "Cost model of the SIMULATED LLM core (aios.llm.simulated.CostModel). "
            "Times are seconds of the calibrated machine; figures made with it are simulated.",
            "cost_model": self.to_dict(),
        }
        path.write_text(json.dumps(doc, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> CostModel:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read a cost model from {path}: {e}") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("cost_model"), dict):
            raise ConfigError(f"{path} has no 'cost_model' object")
        return cls.from_dict(doc["cost_model"])

    def scaled(self, time_scale: float) -> CostModel:
        return replace(self, time_scale=time_scale)

    # -- costs --------------------------------------------------------------------------------
    def decode_seconds(self, batch: int) -> float:
        """Modeled time of a decode step of ``batch`` sequences (0 for none)."""
        if batch <= 0:
            return 0.0
        points = [(b, b / rate) for b, rate in self.decode_tokens_per_s]
        b0, t0 = points[0]
        if batch <= b0:
            return t0 * batch / b0
        for (b1, t1), (b2, t2) in itertools.pairwise(points):
            if batch <= b2:
                return t1 + (t2 - t1) * (batch - b1) / (b2 - b1)
        if len(points) == 1:
            return t0 * batch / b0
        (b1, t1), (b2, t2) = points[-2], points[-1]
        return t2 + (t2 - t1) / (b2 - b1) * (batch - b2)

    def step_seconds(self, decode: int, prefill: int) -> float:
        """Modeled time of one batch of ``decode`` sequences and ``prefill`` prompt tokens."""
        if decode <= 0 and prefill <= 0:
            return 0.0
        return (
            self.step_overhead_s + self.decode_seconds(decode) + prefill * self.prefill_s_per_token
        )

    def snapshot_bytes(self, tokens: int) -> int:
        return tokens * self.snapshot_bytes_per_token


class OutOfMemory(CoreError):
    """The simulated KV cache is full: a step needed more cells than it has."""

    code = "out_of_memory"


# -- tokens ---------------------------------------------------------------------------------------
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
class _Seq:
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


class _KVPool:
    """A unified KV cache's cells, reference-counted: a copy shares its prefix's cells."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.peak = 0
        self._refs: dict[int, int] = {}
        self._next = 0

    @property
    def used(self) -> int:
        return len(self._refs)

    def check(self, n: int, what: str) -> None:
        if self.used + n > self.capacity:
            raise OutOfMemory(
                f"out of memory: {what} needs {n} new KV cells but {self.used} of "
                f"{self.capacity} are in use (simulated core)"
            )

    def alloc(self, n: int) -> range:
        cells = range(self._next, self._next + n)
        self._refs.update(dict.fromkeys(cells, 1))
        self._next += n
        self.peak = max(self.peak, len(self._refs))
        return cells

    def share(self, cells: Sequence[int]) -> None:
        refs = self._refs
        for c in cells:
            refs[c] += 1

    def free(self, cells: Sequence[int]) -> None:
        refs = self._refs
        for c in cells:
            r = refs[c] - 1
            if r:
                refs[c] = r
            else:
                del refs[c]


# -- the engine -----------------------------------------------------------------------------------
@dataclass
class SimStats:
    """What the simulated hardware did (engine or server). ``busy`` holds, when recording,
    ``(start, end, continuous)`` per step in ``time.perf_counter`` seconds: from the step's
    start, its modeled (scaled) time or the simulator's own work before sleeping, whichever is
    longer (a wait for the GIL after the sleep is left out). ``continuous``: the step decodes a
    token sampled in the step just before (its driver had work ready)."""

    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    modeled_seconds: float = 0.0  # unscaled: seconds of the calibrated machine
    saves: int = 0
    restores: int = 0
    peak_cells: int = 0
    peak_snapshot_bytes: int = 0  # saved contexts held at once (modeled size)
    busy: list[tuple[float, float, bool]] = field(default_factory=list)


class SimulatedEngine:
    """An :class:`~aios.llm.engine.Engine` on the cost model (see the module docstring).

    It models a unified pool (``config.kv_unified`` must be set): ``config.context_tokens`` is
    the KV capacity it enforces (as llama.cpp's ``n_ctx``) and
    must fit the hardware's ``cost.kv_cells``; ``config.kv_sequences`` must fit
    ``cost.slots``. ``sleep`` is injectable for tests; ``record`` keeps every step's interval
    in ``stats.busy`` (benchmarks).
    """

    def __init__(
        self,
        config: CoreConfig,
        cost: CostModel,
        *,
        reply_tokens: tuple[int, int] = (8, 256),
        sleep: Callable[[float], None] = time.sleep,
        record: bool = False,
    ) -> None:
        if not config.kv_unified:
            raise ConfigError(
                f"core {config.name!r}: the simulated engine models one shared KV pool; "
                "set kv_unified=True"
            )
        if config.context_tokens > cost.kv_cells:
            raise ConfigError(
                f"core {config.name!r}: context_tokens ({config.context_tokens}) exceeds the "
                f"simulated hardware's KV cache ({cost.kv_cells} cells)"
            )
        if config.kv_sequences > cost.slots:
            raise ConfigError(
                f"core {config.name!r}: slots + cache_slots ({config.kv_sequences}) exceeds the "
                f"simulated hardware's {cost.slots} sequences"
            )
        _check_reply_tokens(reply_tokens)
        self.cost = cost
        self.model_name = config.model
        self.description = (
            f"simulated core (cost model, time_scale {cost.time_scale:g}; not a real model)"
        )
        self.slots = config.kv_sequences
        self.context_tokens = config.context_tokens
        self.max_sequence_tokens = config.max_sequence_tokens
        self.reply_tokens = reply_tokens
        self.stats = SimStats()
        self.closed = False
        self._sleep = sleep
        self._record = record
        self._pool = _KVPool(config.context_tokens)
        self._seqs: dict[int, _Seq] = {}
        # Saved sequences' state, by context key (the store holds their modeled bytes), as
        # LlamaCppEngine keeps a pre-empted sequence's sampler.
        self._saved: dict[str, _Seq] = {}
        self._snapshot_bytes = 0

    @property
    def used_cells(self) -> int:
        return self._pool.used

    def kv_tokens(self, slot: int) -> int:
        """Positions in ``slot``'s KV (0 for an empty slot)."""
        seq = self._seqs.get(slot)
        return len(seq.cells) if seq is not None else 0

    def tokenize(self, text: str) -> list[int]:
        return tokenize(text)

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        return tokenize_chat(messages)

    def step(self, plan: StepPlan, store: ContextStore) -> list[Sampled]:
        entered = time.perf_counter()
        cost, pool, seqs = self.cost, self._pool, self._seqs
        modeled = 0.0
        for save in plan.saves:
            seq = seqs.pop(save.slot, None)
            if seq is None or seq.params is None:
                raise CoreError(f"plan error: saved slot {save.slot} has no sequence")
            n = len(seq.cells)
            store.put(save.key, bytes(cost.snapshot_bytes(n)))
            pool.free(seq.cells)
            seq.cells = []
            self._saved[save.key] = seq
            self._snapshot_bytes += cost.snapshot_bytes(n)
            self.stats.peak_snapshot_bytes = max(
                self.stats.peak_snapshot_bytes, self._snapshot_bytes
            )
            modeled += n * cost.save_s_per_token
            self.stats.saves += 1
        for slot in plan.releases:
            released = seqs.pop(slot, None)
            if released is not None:
                pool.free(released.cells)
        for key in plan.drops:
            store.drop(key)
            dropped = self._saved.pop(key, None)
            if dropped is not None:
                self._snapshot_bytes -= cost.snapshot_bytes(len(dropped.hashes))
        for restore in plan.restores:
            busy = seqs.get(restore.slot)
            if busy is not None and busy.cells:
                raise CoreError(f"plan error: restore into slot {restore.slot}, which holds KV")
            data = store.take(restore.key)
            seq = self._saved.pop(restore.key, None)
            n = len(seq.hashes) if seq is not None else 0
            if seq is None or len(data) != cost.snapshot_bytes(n):
                raise CoreError(f"no simulated context was saved under {restore.key!r}")
            self._snapshot_bytes -= len(data)
            pool.check(n, f"restoring a context of {n} tokens")
            seq.cells = list(pool.alloc(n))
            seqs[restore.slot] = seq
            modeled += n * cost.restore_s_per_token
            self.stats.restores += 1
        for copy in plan.copies:
            src, dst = seqs.get(copy.src), seqs.get(copy.dst)
            if src is None or len(src.cells) < copy.n:
                raise CoreError(f"plan error: slot {copy.src} has no {copy.n} positions to copy")
            if dst is not None and dst.cells:
                raise CoreError(f"plan error: copy into slot {copy.dst}, which holds KV")
            if dst is None:  # a started sequence waiting for its prefix keeps its sampler
                dst = seqs[copy.dst] = _Seq()
            dst.cells = src.cells[: copy.n]
            dst.hashes = src.hashes[: copy.n]
            pool.share(dst.cells)
        for slot, keep in plan.trims:
            seq = seqs.get(slot)
            if seq is None:
                raise CoreError(f"plan error: trim of empty slot {slot}")
            pool.free(seq.cells[keep:])
            del seq.cells[keep:]
            del seq.hashes[keep:]
        for start in plan.starts:
            if not 0 <= start.slot < self.slots:
                raise CoreError(f"plan error: no slot {start.slot} (0..{self.slots - 1})")
            kv = seqs.get(start.slot)
            if kv is None:
                seqs[start.slot] = _Seq(params=start.params)
            else:  # keeps the KV the plan's copies, trims or a cached sequence left
                seqs[start.slot] = _Seq(kv.cells, kv.hashes, start.params)

        pool.check(plan.n_tokens, f"a batch of {plan.n_tokens} tokens")
        restored = {r.slot for r in plan.restores}  # their token was sampled steps ago
        decode = prefill = 0
        sampled: list[Sampled] = []
        continuous = False
        for item in plan.items:
            seq = seqs.get(item.slot)
            if seq is None or seq.params is None:
                raise CoreError(f"plan error: slot {item.slot} fed without a start")
            if item.pos != len(seq.cells) or not item.tokens:
                raise CoreError(
                    f"plan error: slot {item.slot} fed {len(item.tokens)} tokens at {item.pos}, "
                    f"its KV ends at {len(seq.cells)}"
                )
            if seq.pending is not None and len(item.tokens) == 1 and item.tokens[0] == seq.pending:
                decode += 1
                continuous = continuous or item.slot not in restored
            else:
                prefill += len(item.tokens)
            seq.feed(item.tokens)
            seq.cells.extend(pool.alloc(len(item.tokens)))
            if item.sample:
                token, piece, eog = seq.sample(self.reply_tokens)
                sampled.append(Sampled(item.slot, token, piece, eog))
        modeled += cost.step_seconds(decode, prefill)

        stats = self.stats
        stats.steps += 1
        stats.decode_tokens += decode
        stats.prefill_tokens += prefill
        stats.modeled_seconds += modeled
        stats.peak_cells = pool.peak
        # The simulated hardware computes while the simulator keeps its books: the step lasts
        # the modeled time, or the bookkeeping if that took longer.
        scaled = modeled * cost.time_scale
        work = time.perf_counter() - entered
        if scaled > work:
            self._sleep(scaled - work)
        if self._record:
            stats.busy.append((entered, entered + max(scaled, work), continuous))
        return sampled

    def close(self) -> None:
        for seq in self._seqs.values():
            self._pool.free(seq.cells)
        self._seqs.clear()
        self._saved.clear()
        self.closed = True


def _check_reply_tokens(reply_tokens: tuple[int, int]) -> None:
    lo, hi = reply_tokens
    if not 0 <= lo <= hi:
        raise ConfigError(
            f"reply_tokens must be (min, max) with 0 <= min <= max, got {reply_tokens}"
        )


# -- the no-kernel path ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Generation:
    """A reply of the simulated server."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass
class ServerStats(SimStats):
    requests: int = 0
    completed: int = 0
    oom_errors: int = 0
    wasted_tokens: int = 0  # computed for requests that then failed
    peak_sequences: int = 0


@dataclass
class _Job:
    prompt: list[int]
    max_tokens: int
    future: asyncio.Future[Generation]
    seq: _Seq
    fed: int = 0  # prompt tokens in the KV
    output: list[bytes] = field(default_factory=list)

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.prompt)


class SimulatedServer:
    """What agents hit without a kernel (SIMULATED): ``await server.generate(prompt, n)``,
    called by every agent directly and concurrently.

    A naive continuously batching server on the same :class:`CostModel` as the engine: every
    request that arrives joins the batch (up to ``cost.slots`` sequences, the only limit it
    enforces; later ones wait for a sequence id), with no admission control on KV. A step
    decodes one token of every sequence past its prompt, then prefills prompt chunks in arrival
    order while ``batch_tokens`` allows. A step's new KV cells go to the decoding sequences
    first, then the prompt chunks, each in arrival order; a sequence whose cells do not fit
    fails with :class:`OutOfMemory`, its cells are freed (its work is lost) and the rest go on.
    It keeps no prompt cache between requests. Replies are the engine's (same history, same
    tokens).

        async with SimulatedServer(CostModel.calibrated(0.01)) as server:
            reply = await server.generate(messages, max_tokens=64)
    """

    def __init__(
        self,
        cost: CostModel,
        *,
        batch_tokens: int = 512,
        reply_tokens: tuple[int, int] = (8, 256),
        sleep: Callable[[float], None] = time.sleep,
        record: bool = False,
    ) -> None:
        if batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be >= 1, got {batch_tokens}")
        _check_reply_tokens(reply_tokens)
        self.cost = cost
        self.batch_tokens = batch_tokens
        self.reply_tokens = reply_tokens
        self.stats = ServerStats()
        self.description = (
            f"simulated server (no admission control, time_scale {cost.time_scale:g})"
        )
        self._sleep = sleep
        self._record = record
        self._pool = _KVPool(cost.kv_cells)
        self._pending: deque[_Job] = deque()
        self._active: list[_Job] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._thread: ThreadPoolExecutor | None = None

    @property
    def used_cells(self) -> int:
        return self._pool.used

    async def __aenter__(self) -> SimulatedServer:
        # One thread sleeps the steps, as the kernel's core thread does: the same hand-off cost.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aios-sim-server")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="sim-server")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        stopped = CoreError("the simulated server stopped")
        for job in [*self._pending, *self._active]:
            if not job.future.done():
                job.future.set_exception(stopped)
        self._pending.clear()
        self._active.clear()
        if self._thread is not None:
            self._thread.shutdown(wait=True)

    async def generate(
        self, prompt: str | Sequence[Message], max_tokens: int, *, ignore_eos: bool = False
    ) -> Generation:
        """Generate up to ``max_tokens`` tokens for a completion ``prompt`` or chat
        ``messages``; raise :class:`OutOfMemory` when the KV cache overflows under it."""
        if self._task is None:
            raise CoreError("the simulated server is not running")
        tokens = tokenize(prompt) if isinstance(prompt, str) else tokenize_chat(prompt)
        if not tokens:
            raise InvalidRequest("the prompt is empty after tokenization")
        if max_tokens < 1:
            raise InvalidRequest(f"max_tokens must be >= 1, got {max_tokens}")
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        self._pending.append(_Job(tokens, max_tokens, future, _Seq(params=params)))
        self.stats.requests += 1
        self._wake.set()
        return await future  # a cancelled caller cancels the future: the loop drops the job

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            while self._pending and len(self._active) < self.cost.slots:
                self._active.append(self._pending.popleft())
            if not self._active:
                self._wake.clear()
                await self._wake.wait()
                continue
            self.stats.peak_sequences = max(self.stats.peak_sequences, len(self._active))
            entered = time.perf_counter()
            step = self._plan()
            if not step:
                continue  # every sequence in it ran out of memory
            decode = sum(1 for job, _ in step if job.decoding)
            prefill = sum(n for job, n in step if not job.decoding)
            modeled = self.cost.step_seconds(decode, prefill)
            scaled = modeled * self.cost.time_scale
            work = time.perf_counter() - entered  # as the engine: planning is inside the step
            if scaled > work:
                await loop.run_in_executor(self._thread, self._sleep, scaled - work)
            else:
                await asyncio.sleep(0)  # let agents submit between steps
            continuous = any(job.decoding and job.output for job, _ in step)
            if self._record:
                self.stats.busy.append((entered, entered + max(scaled, work), continuous))
            stats = self.stats
            stats.steps += 1
            stats.decode_tokens += decode
            stats.prefill_tokens += prefill
            stats.modeled_seconds += modeled
            self._apply(step)

    def _plan(self) -> list[tuple[_Job, int]]:
        """This step's (job, new tokens), cells allocated; jobs that do not fit fail."""
        budget = self.batch_tokens
        step: list[tuple[_Job, int]] = []
        for job in self._active:
            if job.decoding:
                step.append((job, 1))
                budget -= 1
        for job in self._active:
            if not job.decoding and budget > 0:
                n = min(budget, len(job.prompt) - job.fed)
                step.append((job, n))
                budget -= n
        fitted = []
        for job, n in step:
            try:
                self._pool.check(n, "the sequence's next tokens")
            except OutOfMemory as e:
                self._fail(job, e)
                continue
            job.seq.cells.extend(self._pool.alloc(n))
            fitted.append((job, n))
        self.stats.peak_cells = self._pool.peak
        return fitted

    def _apply(self, step: list[tuple[_Job, int]]) -> None:
        for job, n in step:
            if job.future.done():  # cancelled while the step ran
                continue
            seq = job.seq
            if job.decoding:
                assert seq.pending is not None
                seq.feed([seq.pending])
            else:
                seq.feed(job.prompt[job.fed : job.fed + n])
                job.fed += n
                if not job.decoding:
                    continue
            _, piece, eog = seq.sample(self.reply_tokens)
            if eog:
                self._finish(job, "stop")
                continue
            job.output.append(piece)
            if len(job.output) >= job.max_tokens:
                self._finish(job, "length")

    def _finish(self, job: _Job, reason: Literal["stop", "length"]) -> None:
        self._release(job)
        self.stats.completed += 1
        text = b"".join(job.output).decode()
        job.future.set_result(Generation(text, len(job.prompt), len(job.output), reason))

    def _fail(self, job: _Job, error: OutOfMemory) -> None:
        self.stats.oom_errors += 1
        self.stats.wasted_tokens += len(job.seq.cells)
        self._release(job)
        if not job.future.done():
            job.future.set_exception(error)

    def _release(self, job: _Job) -> None:
        self._active.remove(job)
        self._pool.free(job.seq.cells)
        job.seq.cells = []

    def _drop_cancelled(self) -> None:
        for job in [j for j in self._active if j.future.done()]:
            self._release(job)
        if any(j.future.done() for j in self._pending):
            self._pending = deque(j for j in self._pending if not j.future.done())
