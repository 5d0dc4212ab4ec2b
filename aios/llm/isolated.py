"""The embedded engine in a process of its own: a native crash fails calls, not the kernel.

llama.cpp is C++. An uncaught ``std::runtime_error`` (a JSON grammar at temperature 1e-40:
"Unexpected empty grammar stack after accepting piece"), a failed assertion or a bad pointer
aborts or segfaults the process that runs it, and no Python ``except`` can catch that. An
:class:`IsolatedEngine` runs the real engine in a child process (as vLLM runs its engine core)
and forwards each step to it; when the child dies, the step raises
:class:`~aios.errors.EngineCrashed` naming the signal and what the child was doing, and the core
replaces the engine with a fresh one (see ``LLMCore._recover``). Tokenization stays in the
parent (a tokenizer without the weights), so submissions are served while the child is busy or
being replaced.

The child is a fresh interpreter (``sys.executable -c``: a process with threads is never
forked), with the parent's ``sys.path``. Not multiprocessing's "spawn": that re-imports the
parent's ``__main__`` in the child, so a script that starts a kernel without an
``if __name__ == "__main__"`` guard would start a second one there, and a heavy main module
would slow every restart. Protocol, pickles over one duplex socket pair:

- parent -> child: ``("boot", _Boot)`` (the engine's builder, the store's budget and paths);
- child -> parent, once loaded: ``("hello", EngineInfo)``, or ``("error", exception)``;
- ``("step", StepPlan)`` -> ``("ok", (list[Sampled], ContextStats | None))`` or
  ``("error", exception)``: :class:`~aios.errors.AIOSError` travels as itself, anything else
  becomes a :class:`~aios.errors.CoreError` with its type and message;
- ``("close", None)`` -> ``("closed", None)``, then the child exits. It also exits when the
  socket closes (the parent is gone).

Who crashed: before each risky native call the engine calls its ``mark`` (a :data:`Mark`) with
the phase and the slot; in the child that writes two integers into a shared memory mapping of
a small file in the child's private directory, which the parent reads once the child is dead.
"""

from __future__ import annotations

import ctypes
import enum
import faulthandler
import mmap
import os
import pickle
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from aios.config import CoreConfig
from aios.context import SnapshotStore
from aios.errors import AIOSError, CoreError, EngineCrashed, ModelLoadError
from aios.llm.engine import ContextStore, Engine, Sampled, StepPlan
from aios.syscall import Message

JOIN_TIMEOUT = 10.0  # seconds a child may take to exit once its socket closed or it was told to
_MARKER = struct.Struct("=ii")  # phase, slot (-1: none)
_BOOT = "import sys; from aios.llm.isolated import _child_main; _child_main(int(sys.argv[1]))"


class Phase(enum.IntEnum):
    """What the engine is doing, as written into the shared marker before a native call."""

    UNKNOWN = -1  # the marker could not be read
    IDLE = 0  # between steps
    LOAD = 1
    SAVE = 2
    RELEASE = 3
    DROP = 4
    RESTORE = 5
    COPY = 6
    TRIM = 7
    START = 8  # creating a sequence's sampler (a JSON grammar is compiled here)
    DECODE = 9
    SAMPLE = 10


# Phases whose slot names the sequence at fault: the call bound to it (for SAVE: the call whose
# context was being saved). A crash in any other phase cannot be pinned on one call.
_BLAMES = {Phase.SAVE, Phase.RESTORE, Phase.COPY, Phase.TRIM, Phase.START, Phase.SAMPLE}
_DOING = {
    Phase.UNKNOWN: "doing something it left no mark of",
    Phase.IDLE: "between steps",
    Phase.LOAD: "loading the model",
    Phase.SAVE: "saving the context of slot {slot}",
    Phase.RELEASE: "releasing slot {slot}",
    Phase.DROP: "dropping a saved context",
    Phase.RESTORE: "restoring a context into slot {slot}",
    Phase.COPY: "copying a prefix into slot {slot}",
    Phase.TRIM: "trimming slot {slot}",
    Phase.START: "creating the sampler of slot {slot}",
    Phase.DECODE: "decoding the batch",
    Phase.SAMPLE: "sampling slot {slot}",
}

Mark = Callable[[Phase, int | None], None]
"""Called by an engine before each risky native call: the phase, and the slot it is about."""


def no_mark(phase: Phase, slot: int | None) -> None:
    """The mark of an engine that runs in-process: nobody is left to read it."""


class EngineBuilder(Protocol):
    """Builds the real engine in the child. It must pickle (a module-level class or function,
    or a ``functools.partial`` of one with picklable arguments)."""

    def __call__(self, *, mark: Mark) -> Engine: ...


class Tokenizer(Protocol):
    """What the parent keeps of the model: its vocabulary and chat template."""

    def tokenize(self, text: str) -> list[int]: ...
    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class EngineInfo:
    """The engine's attributes, sent by the child once the model is loaded."""

    model_name: str
    description: str
    slots: int
    context_tokens: int
    max_sequence_tokens: int

    @classmethod
    def of(cls, engine: Engine) -> EngineInfo:
        return cls(
            engine.model_name,
            engine.description,
            engine.slots,
            engine.context_tokens,
            engine.max_sequence_tokens,
        )


class IsolatedEngine:
    """An :class:`~aios.llm.engine.Engine` whose model runs in a child process.

    ``build`` makes the real engine in the child, called as ``build(mark=...)``; ``tokenizer``
    serves ``tokenize`` and ``tokenize_chat`` here in the parent, and is closed with the engine.
    The constructor blocks until the child has loaded the model (``start_seconds``).

    The ``store`` passed to :meth:`step` is not used: pre-empted contexts must live where the
    KV cache lives, and die with it, so the child keeps its own
    :class:`~aios.context.SnapshotStore` (``snapshot_ram_mb`` of RAM, then files in a private
    temporary directory, under ``spill_dir`` if set, that the parent creates for this child and
    removes on :meth:`close`). Only the child's store statistics are copied into ``store.stats``
    (when ``store`` is a ``SnapshotStore``), so the core's counters stay meaningful.

    When the child dies, :meth:`step` raises :class:`~aios.errors.EngineCrashed` and the engine
    is finished: every later step raises :class:`~aios.errors.CoreError`. The core replaces it.
    """

    def __init__(self, config: CoreConfig, build: EngineBuilder, tokenizer: Tokenizer) -> None:
        self.name = config.name
        self._tokenizer = tokenizer
        self._crash: EngineCrashed | None = None
        self._closed = False
        started = time.perf_counter()
        try:
            self._spill = _private_dir(config)
        except BaseException:
            tokenizer.close()
            raise
        self._marker = self._spill / "marker"
        self._marker.write_bytes(_MARKER.pack(Phase.LOAD, -1))
        ours, theirs = socket.socketpair()
        self._conn = Connection(ours.detach())
        try:
            self._process: subprocess.Popen[bytes] | None = _launch(theirs.fileno())
        except BaseException:
            self._process = None
            self.close()
            raise
        finally:
            theirs.close()  # the child's end: its death must reach us as end-of-file
        boot = _Boot(build, config.snapshot_ram_mb * 2**20, str(self._spill), str(self._marker))
        try:
            self._conn.send_bytes(_dumps(("boot", boot)))
            info = self._hello()
        except BaseException:
            self.close()
            raise
        self.start_seconds = time.perf_counter() - started
        self.pid = self._process.pid
        self.model_name = info.model_name
        self.description = info.description
        self.slots = info.slots
        self.context_tokens = info.context_tokens
        self.max_sequence_tokens = info.max_sequence_tokens

    # -- Engine protocol ------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._tokenizer.tokenize(text)

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        return self._tokenizer.tokenize_chat(messages)

    def step(self, plan: StepPlan, store: ContextStore) -> list[Sampled]:
        """Run ``plan`` in the child (blocking the core's thread until it answers)."""
        if self._crash is not None or self._closed:
            raise CoreError(f"core {self.name!r}: the engine process is gone ({self._crash})")
        try:
            self._conn.send_bytes(_dumps(("step", plan)))
            kind, payload = _loads(self._conn.recv_bytes())
        except (EOFError, OSError):  # the socket closed under us: the child died
            raise self._crashed(plan) from None
        if kind == "error":
            raise payload
        sampled, stats = payload
        if stats is not None and isinstance(store, SnapshotStore):
            store.stats = stats
        assert isinstance(sampled, list)
        return sampled

    def close(self) -> None:
        """Ask the child to free the model and exit (killed if it does not), remove its spill
        directory, free the tokenizer. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._crash is None and self._process is not None:
                try:
                    self._conn.send_bytes(_dumps(("close", None)))
                    self._conn.recv_bytes()  # ("closed", None): the model is freed
                except (EOFError, OSError):
                    pass  # it was never up, or died on the way out: nothing left to free
        finally:
            self._conn.close()  # a child still loading sees end-of-file and exits
            self._reap()
            shutil.rmtree(self._spill, ignore_errors=True)
            self._tokenizer.close()

    # -- internals ----------------------------------------------------------------------------
    def _hello(self) -> EngineInfo:
        try:
            kind, payload = _loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._reap()
            raise ModelLoadError(
                f"core {self.name!r}: the engine process died {self._death()} while {self._doing()}"
            ) from None
        if kind == "error":
            raise payload
        assert isinstance(payload, EngineInfo)
        return payload

    def _crashed(self, plan: StepPlan) -> EngineCrashed:
        """The child is gone: wait for its exit status and say what it was doing."""
        self._reap()
        phase, slot = self._marked()
        culprit = slot if phase in _BLAMES else None
        key = next((s.key for s in plan.saves if s.slot == slot), None)
        self._crash = EngineCrashed(
            f"core {self.name!r}: the engine process died {self._death()} while {self._doing()}",
            slot=culprit,
            key=key if phase is Phase.SAVE else None,
        )
        return self._crash

    def _marked(self) -> tuple[Phase, int | None]:
        """The phase and slot the child marked last (it wrote them into the marker file)."""
        try:
            phase, slot = _MARKER.unpack(self._marker.read_bytes()[: _MARKER.size])
            return Phase(phase), (None if slot < 0 else slot)
        except (OSError, ValueError, struct.error):  # removed under us, or garbage
            return Phase.UNKNOWN, None

    def _doing(self) -> str:
        phase, slot = self._marked()
        return _DOING[phase].format(slot=slot)

    def _death(self) -> str:
        """How the child ended, for a message: "of SIGABRT", "with exit code 1"."""
        code = None if self._process is None else self._process.returncode
        if code is None:
            return "of an unknown cause"
        if code < 0:
            try:
                return f"of {signal.Signals(-code).name}"
            except ValueError:
                return f"of signal {-code}"
        return f"with exit code {code}"

    def _reap(self) -> None:
        """Wait for the child to exit (it does once its socket closed); kill it if it hangs."""
        if self._process is None:
            return  # never started
        try:
            self._process.wait(JOIN_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _private_dir(config: CoreConfig) -> Path:
    parent = Path(config.spill_dir) if config.spill_dir else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"aios-kv-{config.name}-", dir=parent))


def _launch(fd: int) -> subprocess.Popen[bytes]:
    """Start the child interpreter, handing it ``fd`` (its end of the socket pair) and this
    process's ``sys.path`` (so it imports what we import: aios, a test module)."""
    path = os.pathsep.join(p for p in sys.path if p)
    env = {**os.environ, "PYTHONPATH": path}
    try:
        return subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(fd)],
            pass_fds=(fd,),
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except OSError as e:
        raise ModelLoadError(f"could not start the engine process ({sys.executable}): {e}") from e


def _dumps(message: tuple[str, Any]) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def _loads(data: bytes) -> tuple[str, Any]:
    kind, payload = pickle.loads(data)
    return str(kind), payload


# -- the child ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Boot:
    """What the child needs to start (sent pickled, once ``sys.path`` is in place)."""

    build: EngineBuilder
    ram_budget: int
    spill_dir: str
    marker: str


class _SharedMark:
    """A :data:`Mark` writing into the marker file, mapped into memory (a plain store: no
    system call per mark)."""

    def __init__(self, path: str) -> None:
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), _MARKER.size)
        self._cells = (ctypes.c_int * 2).from_buffer(self._map)

    def __call__(self, phase: Phase, slot: int | None) -> None:
        self._cells[0] = phase
        self._cells[1] = -1 if slot is None else slot


def _child_main(fd: int) -> None:
    """The child's entry point (``_BOOT``): serve the engine on the socket ``fd``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    faulthandler.enable()  # a crash prints the child's Python stack to stderr
    conn = Connection(fd)
    try:
        kind, boot = _loads(conn.recv_bytes())
    except (EOFError, OSError):
        return  # the parent gave up before we started
    assert kind == "boot" and isinstance(boot, _Boot)
    _serve(boot, conn)


def _serve(boot: _Boot, conn: Connection) -> None:
    """Load the engine, then run steps until told to close or orphaned."""
    mark = _SharedMark(boot.marker)
    mark(Phase.LOAD, None)
    try:
        engine = boot.build(mark=mark)
    except BaseException as e:
        _reply(conn, ("error", _portable(e)))
        return
    store = SnapshotStore(boot.ram_budget, Path(boot.spill_dir))
    try:
        mark(Phase.IDLE, None)
        if not _reply(conn, ("hello", EngineInfo.of(engine))):
            return
        while True:
            try:
                kind, payload = _loads(conn.recv_bytes())
            except (EOFError, OSError):  # the parent is gone: nobody else will clean up
                shutil.rmtree(boot.spill_dir, ignore_errors=True)
                return
            if kind == "close":
                break
            reply = _step(engine, payload, store)
            mark(Phase.IDLE, None)
            if not _reply(conn, reply):
                return
    finally:
        engine.close()
        store.close()
    _reply(conn, ("closed", None))


def _step(engine: Engine, plan: StepPlan, store: SnapshotStore) -> tuple[str, Any]:
    try:
        sampled = engine.step(plan, store)
    except Exception as e:
        return ("error", _portable(e))
    touched = plan.saves or plan.restores or plan.drops
    return ("ok", (sampled, store.stats if touched else None))


def _reply(conn: Connection, message: tuple[str, Any]) -> bool:
    """Send to the parent; false if it is gone."""
    try:
        conn.send_bytes(_dumps(message))
    except OSError:
        return False
    return True


def _portable(error: BaseException) -> AIOSError:
    """An exception that crosses the socket as itself if it is an AIOSError that pickles, else
    as a CoreError naming its type and message."""
    if isinstance(error, AIOSError):
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            pass
        else:
            return error
    return CoreError(f"{type(error).__name__}: {error}")
