"""The SIMULATED core's cost model (aios.llm.sim.cost): step times through the calibrated
points, validation, and the calibration file and JSON form.

Nothing here sleeps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from aios.errors import ConfigError
from aios.llm.sim import CostModel

CALIBRATION = (
    Path(__file__).resolve().parents[1] / "bench" / "results" / "simulated_calibration.json"
)


def test_decode_time_goes_through_the_measured_points() -> None:
    cost = CostModel.calibrated()
    for batch, rate in cost.decode_tokens_per_s:
        assert cost.decode_seconds(batch) == pytest.approx(batch / rate)
    # Linear between points, the last segment's slope beyond them.
    assert cost.decode_seconds(6) == pytest.approx((4 / 160 + 8 / 188) / 2)
    slope = (16 / 192 - 8 / 188) / 8
    assert cost.decode_seconds(32) == pytest.approx(16 / 192 + 16 * slope)
    assert cost.decode_seconds(0) == 0.0
    times = [cost.decode_seconds(b) for b in range(1, 300)]
    assert times == sorted(times)  # a bigger batch never takes less time
    assert cost.step_seconds(0, 0) == 0.0
    assert cost.step_seconds(4, 100) == pytest.approx(4 / 160 + 100 / 280)
    with_overhead = CostModel(step_overhead_s=0.002)
    assert with_overhead.step_seconds(1, 0) == pytest.approx(0.002 + 1 / 128)


@pytest.mark.parametrize(
    "bad",
    [
        {"decode_tokens_per_s": ()},
        {"decode_tokens_per_s": ((4, 100.0), (2, 100.0))},  # batch sizes out of order
        {"decode_tokens_per_s": ((1, 100.0), (2, 400.0))},  # two sequences faster than one
        {"decode_tokens_per_s": ((1, 0.0),)},
        {"prefill_s_per_token": -1.0},
        {"time_scale": float("nan")},
        {"kv_cells": 0},
        {"slots": True},
    ],
)
def test_invalid_cost_models_are_rejected(bad: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="cost model"):
        CostModel(**bad)


# -- the calibration file -----------------------------------------------------------------------
def test_calibration_file_is_the_calibrated_model(tmp_path: Path) -> None:
    assert CostModel.load(CALIBRATION) == CostModel.calibrated()
    assert "bench/throughput.py" in CostModel.calibrated().source
    custom = CostModel.calibrated(time_scale=0.01).scaled(0.02)
    path = tmp_path / "cost.json"
    custom.save(path)
    assert CostModel.load(path) == custom
    assert json.loads(path.read_text())["cost_model"]["time_scale"] == 0.02
    path.write_text(json.dumps({"cost_model": {"prefill_s_per_tok": 1.0}}))
    with pytest.raises(ConfigError, match="unknown fields"):
        CostModel.load(path)
    with pytest.raises(ConfigError, match="cannot read"):
        CostModel.load(tmp_path / "missing.json")
