"""For developers measuring aios: ``aios bench NAME`` runs bench/NAME.py (from a source
checkout) with the rest of the command line as its arguments."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import typer

from aios.cli.common import bench_app, err

BENCHMARKS: dict[str, str] = {
    "throughput": "Agents with and without the kernel, and raw batched decode.",
    "agents": "The agent workload: direct vs the kernel under each scheduling policy.",
    "context-switch": "KV snapshot and restore vs re-prefill, by context length.",
    "scale": "100-2000 agents on the simulated core, with and without the kernel.",
    "http-overhead": "What the HTTP server adds to a syscall (instant simulated core).",
    "memory-storage": "Memory and storage syscalls, SQLite vs PostgreSQL, 1k-100k notes.",
    "remote-relay": "Kernel CPU per token relayed from a remote core (simulated remote).",
}


def _bench_command(name: str, help_text: str) -> None:
    script_name = name.replace("-", "_") + ".py"

    def command(ctx: typer.Context) -> None:
        script = Path(__file__).resolve().parents[2] / "bench" / script_name  # the checkout
        if not script.is_file():
            err.print(
                f"[red]error:[/red] {script} not found (benchmarks run from a source checkout)"
            )
            raise typer.Exit(2)
        sys.argv = [str(script), *ctx.args]
        sys.path.insert(0, str(script.parent))  # benchmarks import their siblings
        runpy.run_path(str(script), run_name="__main__")

    command.__doc__ = f"{help_text} (bench/{script_name}; --help lists its options)"
    bench_app.command(
        name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
    )(command)


for _name, _help in BENCHMARKS.items():
    _bench_command(_name, _help)
