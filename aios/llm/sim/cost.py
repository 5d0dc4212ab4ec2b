"""The SIMULATED core's cost model: what a step of the simulated hardware costs, calibrated on
the reference machine (``CALIBRATION_SOURCE``; the file bench/results/simulated_calibration.json
holds the same model), and its JSON form. Never a default; figures made with it are simulated.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from aios.errors import ConfigError

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
            "about": "Cost model of the SIMULATED LLM core (aios.llm.sim.cost.CostModel). "
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
