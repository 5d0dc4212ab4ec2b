"""What the benchmarks share."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def markdown(header: Sequence[str], rows: Iterable[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` has one letter per column, ``l`` (left) or ``r`` (right,
    the default for columns it does not cover)."""
    align = align.ljust(len(header), "r")
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "".join("---|" if a == "l" else "---:|" for a in align),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]
    return "\n".join(lines)


def medians(runs: Iterable[dict[str, Any]], keys: Iterable[str], **where: Any) -> dict[str, float]:
    """The median of each of ``keys`` over the runs whose fields equal ``where`` (an arm and
    a level: ``medians(runs, ["p50_ms"], arm="api", clients=10)``)."""
    mine = [r for r in runs if all(r[field] == value for field, value in where.items())]
    return {key: statistics.median(r[key] for r in mine) for key in keys}


def instant_result(
    benchmark: str, args: Any, runs: list[dict[str, Any]], summary: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """The JSON of a benchmark on the instant simulated core: what ran, where, every run."""
    import platform

    return {
        "benchmark": benchmark,
        "core": "SIMULATED instant core (CostModel time_scale=0, 1-token replies)",
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        **fields,
        "clients": args.clients,
        "seconds": args.seconds,
        "repeats": args.repeats,
        "runs": runs,
        "summary": summary,
    }
