"""``aios top``: the view's model (tokens/s from two snapshots, sorting, what the recent list
keeps), one frame against a real server, and the live view in a real terminal (tmux)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console
from servers import Harness, serve_approving, wait_for

from aios.cli.top import Top


def process(pid: str, state: str, tokens: int, **fields: Any) -> dict[str, Any]:
    return {
        "id": pid, "name": pid.strip("@"), "owner": pid.strip("@"), "state": state,
        "inflight": [], "syscalls": 1, "prompt_tokens": tokens, "completion_tokens": 0,
        "waited_s": 0.0, "age_s": 1.0, **fields,
    }  # fmt: skip


def core(decode_tokens: int) -> dict[str, Any]:
    return {
        "name": "smol", "kind": "LLMCore", "queued": 2, "active": 3, "completed": 5,
        "failed": 0, "cancelled": 0, "preemptions": 1, "slots": 16, "cached": 1, "parked": 0,
        "preempted": 0, "kv_cells_used": 512, "kv_cells": 2048, "decode_tokens": decode_tokens,
    }  # fmt: skip


def text(top: Top) -> str:
    console = Console(width=160, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(top.render())
    console.file.close()
    return console.export_text()


def test_the_view_rates_sorts_and_keeps_what_matters() -> None:
    top = Top(sort="tokens")
    agents = [process("@a", "idle", 10), process("@b", "generating", 900, inflight=["sc-7"])]
    top.update(10.0, [core(1000)], agents)
    assert "smol" not in top.rates  # one snapshot: no rate yet
    top.update(12.0, [core(1100)], agents)
    assert top.rates == {"smol": 50.0}
    top.event({"kind": "syscall", "state": "running", "syscall": "sc-1"})  # routine: not kept
    top.event({"kind": "syscall", "state": "preempted", "syscall": "sc-7", "principal": "b",
               "process": "@b", "data": {"kind": "llm", "op": "smol"}})  # fmt: skip
    top.event({"kind": "dropped", "data": {"count": 3}})
    assert [e.get("state", e["kind"]) for e in top.recent] == ["preempted", "dropped"]
    shown = text(top)
    assert "3/16" in shown and "512/2048 25%" in shown and "50.0" in shown
    assert shown.index("@b") < shown.index("@a")  # by tokens, most first
    assert "sc-7" in shown and "preempted" in shown
    top.sort = "name"
    shown = text(top)
    assert shown.index("@a") < shown.index("@b")
    with pytest.raises(ValueError, match="sort must be"):
        Top(sort="colour")


@pytest.fixture
def live(tmp_path: Path) -> Iterator[Harness]:
    with serve_approving(tmp_path, 2.0) as harness:
        yield harness


def aios(*args: str) -> list[str]:
    return [sys.executable, "-m", "aios.cli", *args]


def chat(harness: Harness, token: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert harness.client(token).post("/api/v1/llm/chat", json=body).is_success


def test_one_frame_of_a_real_server(live: Harness) -> None:
    alice = live.agent("alice")
    chat(live, alice)
    env = {**os.environ, "COLUMNS": "200"}
    mine = subprocess.run(
        aios("top", "--once", "--url", live.url, "--token", alice),
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert mine.returncode == 0, mine.stderr
    assert "fake" in mine.stdout and "@alice" in mine.stdout and "LLMCore" in mine.stdout
    bob = live.agent("bob")
    chat(live, bob)
    seen = subprocess.run(
        aios("top", "--once", "--url", live.url, "--token", alice),
        capture_output=True, text=True, timeout=60, env=env,
    ).stdout  # fmt: skip
    assert "@bob" not in seen  # an agent's token sees its own agent only
    everything = subprocess.run(
        aios("top", "--once", "--sort", "name", "--url", live.url, "--token", live.admin),
        capture_output=True, text=True, timeout=60, env=env,
    ).stdout  # fmt: skip
    assert everything.index("@alice") < everything.index("@bob")
    wrong = subprocess.run(
        aios("top", "--once", "--url", live.url, "--token", "nope"),
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert wrong.returncode == 1 and "Traceback" not in wrong.stderr
    assert "invalid or revoked token" in wrong.stderr


def test_the_live_view_in_a_terminal(live: Harness) -> None:
    assert shutil.which("tmux"), "tmux is installed by .ci/install-system"
    socket = f"aios-top-{uuid.uuid4().hex[:8]}"
    tmux = ["tmux", "-L", socket]
    alice = live.agent("alice")
    chat(live, alice)
    command = " ".join(aios("top", "--interval", "0.2", "--url", live.url, "--token", live.admin))
    subprocess.run([*tmux, "new-session", "-d", "-x", "180", "-y", "50", command], check=True)

    def screen() -> str:
        return subprocess.run(
            [*tmux, "capture-pane", "-p"], capture_output=True, text=True, timeout=10
        ).stdout

    try:
        wait_for(lambda: "@alice" in screen(), 30, "the view to show alice")
        calls = lambda: next(line for line in screen().splitlines() if "@alice" in line)  # noqa: E731
        before = calls()
        chat(live, alice)
        chat(live, alice)
        wait_for(lambda: calls() != before, 10, "the view to refresh alice's calls")
        assert " 3 " in calls()
        # A call waiting for approval shows in the recent list (then its denial).
        deleting = threading.Thread(
            target=lambda: live.client(alice).post("/api/v1/storage/delete", json={"path": "x.txt"})
        )
        deleting.start()
        wait_for(lambda: "asked" in screen(), 10, "the approval to show")
        assert "storage.delete:x.txt" in screen()
        deleting.join(15)
        wait_for(lambda: "denied" in screen(), 10, "the denial to show")
        subprocess.run([*tmux, "send-keys", "C-c"], check=True)
        wait_for(
            lambda: subprocess.run([*tmux, "has-session"], capture_output=True).returncode != 0,
            10,
            "aios top to quit on Ctrl-C",
        )
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
