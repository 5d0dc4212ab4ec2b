"""Memory and storage: per-syscall latency and throughput, SQLite vs PostgreSQL, 1k-100k notes.

Every measured operation goes through ``Resources.call`` (what the kernel runs for a memory or
storage syscall: argument binding, a database worker thread, the manager), one caller at a time,
so latency is the syscall's own cost. Both backends are real: SQLite (WAL, synchronous=FULL) in
a temporary file, and a PostgreSQL 15 server this script starts itself (tests/postgres.py).

Per arm (sqlite, postgres), interleaved per repeat, for each notes count N (one agent holds N
notes of Zipf-distributed words; the fill itself is not measured):
  memory.add            add one note (durable on return)
  memory.get hot        get a note that is resident in the RAM tier (a hit: no database)
  memory.get fault      get with a RAM budget too small to keep anything: every get faults
                        from the database and evicts (the eviction overhead)
  memory.search         2-3 word queries, top 5 (BM25 / PostgreSQL full text)
  memory.search filter  the same with a metadata filter
  storage.write / read  4 KB files (MB/s from the same runs)
  storage.rollback      a file with 100 versions back to a random one
Reported: p50/p95 ms and ops/s (1 / mean latency) per op, medians over repeats. Target: memory
search p95 < 50 ms at 10,000 notes.

    python bench/memory_storage.py --notes 1000 10000 100000 --repeats 2
Writes bench/results/memory_storage.json and memory_storage.png; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import markdown, percentile

from aios.config import MemoryConfig, StorageConfig
from aios.resources import Resources
from aios.storage.db import Conn, Job
from aios.storage.files import Principal

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from postgres import PostgresServer, schema_dsn

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = ("sqlite", "postgres")
AGENT = Principal("bench")
TOPICS = [f"topic{i}" for i in range(10)]
OPS = (
    "memory.add",
    "memory.get hot",
    "memory.get fault",
    "memory.search",
    "memory.search filter",
    "storage.write 4KB",
    "storage.read 4KB",
    "storage.rollback",
)


def vocabulary(n: int = 2000, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    return sorted(words)


class Text:
    """Sentences of Zipf-distributed words (a few words are everywhere, most are rare)."""

    def __init__(self, seed: int) -> None:
        self.words = vocabulary()
        self.weights = [1.0 / (rank + 1) for rank in range(len(self.words))]
        self.rng = random.Random(seed)

    def sentence(self, n: int) -> str:
        return " ".join(self.rng.choices(self.words, self.weights, k=n))

    def query(self) -> str:
        # Mid-frequency words: what a query about something specific looks like.
        return " ".join(self.rng.choice(self.words[20:600]) for _ in range(self.rng.randint(2, 3)))


async def timed(count: int, op: Callable[[int], Awaitable[Any]]) -> dict[str, float]:
    latencies = []
    for i in range(count):
        start = time.perf_counter()
        await op(i)
        latencies.append(time.perf_counter() - start)
    return {
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p95_ms": 1000 * percentile(latencies, 0.95),
        "ops_per_s": len(latencies) / sum(latencies),
    }


def fill(conn: Conn, n: int, text: Text) -> list[int]:
    """N notes for the agent, in one transaction (not measured)."""
    rows = [
        (AGENT.name, text.sentence(text.rng.randint(8, 40)),
         json.dumps({"topic": text.rng.choice(TOPICS)}), time.time(), time.time())
        for _ in range(n)
    ]  # fmt: skip
    sql = "INSERT INTO notes (owner, text, metadata, created, updated) VALUES (?, ?, ?, ?, ?)"
    if conn.dialect == "postgres":
        sql = sql.replace("?", "%s")
    with conn.transaction():
        cursor = conn.raw.cursor()
        cursor.executemany(sql, rows)
        cursor.close()
    return [int(r[0]) for r in conn.all("SELECT id FROM notes WHERE owner = ?", (AGENT.name,))]


async def measure(url: str, notes: int, seed: int, samples: int) -> dict[str, dict[str, float]]:
    text = Text(seed)
    out: dict[str, dict[str, float]] = {}
    hot = Resources(StorageConfig(database=url), MemoryConfig())
    await hot.start()
    try:
        ids = await hot.db.run(lambda conn: fill(conn, notes, text))

        def call(kind: str, op: str, args: dict[str, Any], r: Resources = hot) -> Awaitable[Any]:
            return r.call(AGENT, kind, op, args, Job())

        out["memory.add"] = await timed(
            samples, lambda i: call("memory", "add", {"text": text.sentence(20)})
        )
        resident = [text.rng.choice(ids) for _ in range(50)]
        for note_id in resident:  # make them resident
            await call("memory", "get", {"id": note_id})
        out["memory.get hot"] = await timed(
            samples * 2, lambda i: call("memory", "get", {"id": resident[i % 50]})
        )
        out["memory.search"] = await timed(
            samples, lambda i: call("memory", "search", {"query": text.query(), "limit": 5})
        )
        out["memory.search filter"] = await timed(
            samples,
            lambda i: call(
                "memory",
                "search",
                {"query": text.query(), "limit": 5, "where": {"topic": TOPICS[i % 10]}},
            ),
        )
        content = bytes(text.rng.getrandbits(8) for _ in range(4096))
        out["storage.write 4KB"] = await timed(
            samples,
            lambda i: call(
                "storage", "write", {"path": f"w/{i}.bin", "content": content + b"%d" % i}
            ),
        )
        out["storage.read 4KB"] = await timed(
            samples, lambda i: call("storage", "read", {"path": f"w/{i % samples}.bin"})
        )
        for v in range(100):
            await call("storage", "write", {"path": "versions.txt", "content": f"v{v} " * 200})
        history = await call("storage", "history", {"path": "versions.txt", "limit": 100})
        versions = [h["id"] for h in history]
        out["storage.rollback"] = await timed(
            max(20, samples // 4),
            lambda i: call(
                "storage",
                "rollback",
                {"path": "versions.txt", "version": text.rng.choice(versions)},
            ),
        )
    finally:
        await hot.close()
    # Faults: a RAM tier that can hold nothing useful, on the same database.
    cold = Resources(StorageConfig(database=url), MemoryConfig(ram_bytes=1, agent_ram_bytes=1))
    await cold.start()
    try:
        stats = cold.memory.stats
        out["memory.get fault"] = await timed(
            samples,
            lambda i: cold.call(AGENT, "memory", "get", {"id": text.rng.choice(ids)}, Job()),
        )
        assert stats.hits == 0 and stats.faults >= samples, stats
    finally:
        await cold.close()
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with PostgresServer() as pg, tempfile.TemporaryDirectory(prefix="aios-bench-") as tmp:
        import psycopg

        for repeat in range(args.repeats):
            for notes in args.notes:
                arms = ARMS if (repeat + notes) % 2 == 0 else ARMS[::-1]  # rotate the order
                for arm in arms:
                    if arm == "sqlite":
                        url = str(Path(tmp) / f"{uuid.uuid4().hex}.db")
                    else:
                        schema = f"b_{uuid.uuid4().hex}"
                        with psycopg.connect(pg.dsn, autocommit=True) as conn:
                            conn.execute(f"CREATE SCHEMA {schema}")
                        url = schema_dsn(pg.dsn, schema)
                    started = time.perf_counter()
                    ops = await measure(
                        url, notes, seed=repeat * 1000 + notes, samples=args.samples
                    )
                    runs.append({"arm": arm, "notes": notes, "repeat": repeat, "ops": ops})
                    print(
                        f"{arm:8} {notes:>7} notes, repeat {repeat}: "
                        f"search p95 {ops['memory.search']['p95_ms']:.2f} ms "
                        f"({time.perf_counter() - started:.0f} s)",
                        file=sys.stderr,
                    )
    summary = []
    for notes in args.notes:
        for arm in ARMS:
            mine = [r["ops"] for r in runs if r["arm"] == arm and r["notes"] == notes]
            for op in OPS:
                row = {"arm": arm, "notes": notes, "op": op}
                for key in ("p50_ms", "p95_ms", "ops_per_s"):
                    row[key] = statistics.median(m[op][key] for m in mine)
                if op.startswith("storage.") and "4KB" in op:
                    row["mb_per_s"] = row["ops_per_s"] * 4096 / 1e6
                summary.append(row)
    target = [
        r
        for r in summary
        if r["op"] == "memory.search" and r["arm"] == "sqlite" and r["notes"] == 10_000
    ]
    return {
        "benchmark": "memory_storage",
        "command": " ".join(["python", "bench/memory_storage.py", *sys.argv[1:]]),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "notes": args.notes,
        "repeats": args.repeats,
        "samples": args.samples,
        "target": {
            "memory.search p95 at 10k notes, sqlite (ms)": target[0]["p95_ms"] if target else None,
            "met (< 50 ms)": bool(target) and target[0]["p95_ms"] < 50,
        },
        "summary": summary,
        "runs": runs,
    }


def table(result: dict[str, Any]) -> str:
    header = ["op", "notes"] + [f"{arm} {m}" for arm in ARMS for m in ("p50 ms", "p95 ms", "ops/s")]
    by = {(r["arm"], r["notes"], r["op"]): r for r in result["summary"]}
    rows = [
        [op, notes] + [f"{by[(arm, notes, op)][k]:{f}}" for arm in ARMS
                       for k, f in (("p50_ms", ".2f"), ("p95_ms", ".2f"), ("ops_per_s", ".0f"))]
        for op in OPS
        for notes in result["notes"]
    ]  # fmt: skip
    return markdown(header, rows, "l")


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, arm in zip(axes, ARMS, strict=True):
        for op in OPS:
            rows = [r for r in result["summary"] if r["arm"] == arm and r["op"] == op]
            ax.plot([r["notes"] for r in rows], [r["p95_ms"] for r in rows], marker="o", label=op)
        ax.axhline(50, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("notes held by the agent")
        ax.set_title(arm)
    axes[0].set_ylabel("p95 latency per syscall (ms)")
    axes[1].legend(fontsize=7)
    fig.suptitle("aios memory and storage syscalls (dotted: 50 ms search target)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--notes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--samples", type=int, default=200, help="Operations per measurement.")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_storage.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "memory_storage.png")
    print(table(result))


if __name__ == "__main__":
    main()
