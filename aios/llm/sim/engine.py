"""The SIMULATED engine: an :class:`~aios.llm.engine.Engine` for the kernel's core that runs
the cost model (:mod:`aios.llm.sim.cost`) in place of a model, and its stats.

Each ``step`` lasts the modeled time of its plan (scaled by ``time_scale``) on the core's
thread: it sleeps for what its own bookkeeping left of it. It tracks every slot's KV exactly as
a unified llama.cpp cache would (cells shared by copies, trimmed, saved into the context store
as bytes of the modeled size, restored) and raises :class:`~aios.llm.sim.kv.OutOfMemory` when a
step would need more KV cells than it has. A saved context is that many zero bytes (real
memory, as a real kernel holds; the RSS counts them once the allocator touches their pages;
``stats.peak_snapshot_bytes`` always); the sequence's own state (token history, sampler) stays
in the engine under the same key, as LlamaCppEngine keeps a pre-empted sampler. Tokens and
replies come from :mod:`aios.llm.sim.tokens`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aios.config import CoreConfig
from aios.errors import ConfigError, CoreError
from aios.llm.engine import ContextStore, Sampled, StepPlan
from aios.llm.sim.cost import CostModel
from aios.llm.sim.kv import KVPool
from aios.llm.sim.tokens import SeqState, check_reply_tokens, tokenize, tokenize_chat
from aios.syscall import Message


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
        check_reply_tokens(reply_tokens)
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
        self._pool = KVPool(config.context_tokens)
        self._seqs: dict[int, SeqState] = {}
        # Saved sequences' state, by context key (the store holds their modeled bytes), as
        # LlamaCppEngine keeps a pre-empted sequence's sampler.
        self._saved: dict[str, SeqState] = {}
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
                dst = seqs[copy.dst] = SeqState()
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
                seqs[start.slot] = SeqState(params=start.params)
            else:  # keeps the KV the plan's copies, trims or a cached sequence left
                seqs[start.slot] = SeqState(kv.cells, kv.hashes, start.params)

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
