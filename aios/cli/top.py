"""``aios top``: a live view of a running kernel over its HTTP API, for a terminal (SSH too).

Cores (slots, KV cache, tokens/s, queue), agents (state, current syscall, tokens, waiting) and
the recent pre-emptions, errors and approvals from the kernel's event stream. Everything comes
from documented routes (``GET /api/v1/cores``, ``/api/v1/processes``, ``/api/v1/events``):
the admin token sees every agent, an agent's token its own.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from aios.cli.common import ConfigOpt, TokenOpt, UrlOpt, _say_error, _token, _url, app, console
from aios.errors import AIOSError

SORTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "state": lambda p: (p["state"] not in ("generating", "queued"), p["state"], p["id"]),
    "tokens": lambda p: -(p["prompt_tokens"] + p["completion_tokens"]),
    "waited": lambda p: -p["waited_s"],
    "calls": lambda p: -p["syscalls"],
    "age": lambda p: -p["age_s"],
    "name": lambda p: (p["name"], p["id"]),
}
SHOWN = {"preempted", "restarted", "failed", "cancelled", "asked", "allowed", "denied"}


class Top:
    """What the view shows, from what the API said (pure: fed dicts, renders rich tables)."""

    def __init__(self, sort: str = "state", recent: int = 8, rows: int = 30) -> None:
        if sort not in SORTS:
            raise ValueError(f"sort must be one of {', '.join(SORTS)}")
        self.sort = sort
        self.rows = rows
        self.cores: list[dict[str, Any]] = []
        self.processes: list[dict[str, Any]] = []
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.rates: dict[str, float] = {}  # decode tokens/s per core, since the last update
        self._last: dict[str, tuple[float, int]] = {}

    def update(
        self, now: float, cores: list[dict[str, Any]], processes: list[dict[str, Any]]
    ) -> None:
        for core in cores:
            tokens = core.get("decode_tokens")
            if tokens is None:
                continue
            before = self._last.get(core["name"])
            if before is not None and now > before[0]:
                self.rates[core["name"]] = (tokens - before[1]) / (now - before[0])
            self._last[core["name"]] = (now, tokens)
        self.cores, self.processes = cores, processes

    def event(self, event: dict[str, Any]) -> None:
        """Keep what an operator looks for: pre-emptions, failures, approvals, drops."""
        if event.get("kind") == "dropped" or event.get("state") in SHOWN:
            self.recent.append(event)

    def render(self) -> Group:
        return Group(self._cores(), self._agents(), self._events())

    def _cores(self) -> Table:
        table = Table(title="cores", title_justify="left", box=None, header_style="bold")
        for column in ("CORE", "KIND", "RUNNING", "QUEUED", "CACHED", "PARKED", "KV USED",
                       "TOK/S", "PREEMPT", "DONE", "FAILED"):  # fmt: skip
            table.add_column(column, justify="left" if column in ("CORE", "KIND") else "right")
        for c in self.cores:
            slots = c.get("slots")
            kv = c.get("kv_cells")
            used = (
                "-" if not kv else f"{c['kv_cells_used']}/{kv} {100 * c['kv_cells_used'] / kv:.0f}%"
            )
            rate = self.rates.get(c["name"])
            table.add_row(
                c["name"],
                c["kind"],
                f"{c['active']}/{slots}" if slots else str(c["active"]),
                str(c["queued"]),
                _dash(c.get("cached")),
                _dash(c.get("parked")),
                used,
                "-" if rate is None else f"{rate:.1f}",
                str(c["preemptions"]),
                str(c["completed"]),
                str(c["failed"]),
            )
        return table

    def _agents(self) -> Table:
        shown = sorted(self.processes, key=SORTS[self.sort])
        title = f"agents ({len(shown)}, by {self.sort})"
        table = Table(title=title, title_justify="left", box=None, header_style="bold")
        for column in ("ID", "NAME", "OWNER", "STATE", "CURRENT", "CALLS", "TOKENS IN",
                       "TOKENS OUT", "WAITED s", "AGE s"):  # fmt: skip
            numeric = column in ("CALLS", "TOKENS IN", "TOKENS OUT", "WAITED s", "AGE s")
            table.add_column(column, justify="right" if numeric else "left")
        for p in shown[: self.rows]:
            state = Text(p["state"], style=_STYLES.get(p["state"], ""))
            table.add_row(
                p["id"],
                p["name"],
                p["owner"] or "-",
                state,
                p["inflight"][-1] if p["inflight"] else "-",
                str(p["syscalls"]),
                str(p["prompt_tokens"]),
                str(p["completion_tokens"]),
                f"{p['waited_s']:.2f}",
                f"{p['age_s']:.0f}",
            )
        if len(shown) > self.rows:
            table.caption = f"... and {len(shown) - self.rows} more"
        return table

    def _events(self) -> Table:
        table = Table(title="recent", title_justify="left", box=None, header_style="bold")
        for column in ("KIND", "STATE", "AGENT", "PROCESS", "SYSCALL", "WHAT"):
            table.add_column(column)
        for e in reversed(self.recent):
            data = e.get("data", {})
            what = data.get("capability") or data.get("op") or str(data.get("count", ""))
            table.add_row(e["kind"], e.get("state", ""), e.get("principal", ""),
                          e.get("process", ""), e.get("syscall", ""), str(what))  # fmt: skip
        return table


_STYLES = {"generating": "green", "queued": "yellow", "failed": "red", "done": "dim"}


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


@contextlib.contextmanager
def watching(url: str, token: str, top: Top, lock: threading.Lock) -> Iterator[None]:
    """The kernel's events into ``top`` from a thread, while the body runs (a lost stream
    just stops the recent list; the tables keep refreshing)."""
    from aios.sdk.http import Client

    client = Client(url, token, retries=0)

    def read() -> None:
        with contextlib.suppress(Exception):  # a lost stream, a closed client
            for event in client.events():
                with lock:
                    top.event(event)

    reader = threading.Thread(target=read, name="aios-top-events", daemon=True)
    reader.start()
    try:
        yield
    finally:
        client.close()


@app.command()
def top(
    url: UrlOpt = None,
    token: TokenOpt = None,
    config: ConfigOpt = None,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes.", min=0.1)] = 1.0,
    sort: Annotated[str, typer.Option(help=f"Order of the agents: {', '.join(SORTS)}.")] = "state",
    once: Annotated[bool, typer.Option("--once", help="Print one view and exit.")] = False,
    screen: Annotated[
        bool, typer.Option(help="Use the terminal's alternate screen (like top).")
    ] = True,
) -> None:
    """A live view of a running kernel: cores, agents, recent pre-emptions and errors.

    Example: aios top --sort tokens   (Ctrl-C quits)
    """
    from aios.sdk.http import Client

    if sort not in SORTS:
        _say_error(f"--sort must be one of {', '.join(SORTS)}")
        raise typer.Exit(2)
    base, secret = _url(url, config), _token(token, config)
    view, lock = Top(sort), threading.Lock()
    try:
        with Client(base, secret, retries=1) as client:

            def refresh() -> Group:
                cores, processes = client.cores(), client.processes()
                with lock:
                    view.update(time.monotonic(), cores, processes)
                    return view.render()

            if once:
                console.print(refresh())
                return
            with (
                watching(base, secret, view, lock),
                Live(refresh(), console=console, screen=screen, auto_refresh=False) as live,
            ):
                while True:
                    time.sleep(interval)  # the CLI's own pacing: one refresh per interval
                    live.update(refresh(), refresh=True)
    except AIOSError as e:
        _say_error(e)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        return
