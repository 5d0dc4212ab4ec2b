"""The sandbox for code tools: a separate process with no network, a read-only view of the
system, a private writable workspace, and CPU, memory, output and wall-time limits.

Which isolation this machine supports is detected once (:meth:`Sandbox.detect`) and reported:
  bubblewrap   bwrap: new user, network, PID, IPC and UTS namespaces; / read-only; /tmp private;
               the workspace the only writable place (Debian: ``apt-get install bubblewrap``).
  namespaces   util-linux ``unshare``: no network and its own PID namespace, but the file system
               is NOT read-only (only the limits and the working directory confine writes).
  none         nothing to isolate with: code tools refuse to run.
Limits come from rlimits set in the child (CPU seconds, address space, file size, open files)
and a wall-clock deadline after which the whole process group is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aios.errors import ToolError

Kind = Literal["bubblewrap", "namespaces", "none"]
WORKSPACE = "/tmp/workspace"  # where the workspace appears inside a bubblewrap sandbox


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 5
    memory_mb: int = 512
    wall_seconds: float = 10.0
    output_bytes: int = 64 << 10  # per stream; more is cut (and says so)
    file_mb: int = 64


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None  # None: killed at the wall-clock limit
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False

    def to_json(self) -> dict[str, object]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Sandbox:
    kind: Kind

    @property
    def isolated(self) -> bool:
        return self.kind != "none"

    @staticmethod
    def detect() -> Sandbox:
        """The strongest isolation that works here (tried for real, not just looked up)."""
        if shutil.which("bwrap") and _works(_bwrap_prefix("/")):
            return Sandbox("bubblewrap")
        if shutil.which("unshare") and _works(_unshare_prefix()):
            return Sandbox("namespaces")
        return Sandbox("none")

    def describe(self) -> str:
        return {
            "bubblewrap": "bubblewrap: no network, read-only system, private workspace",
            "namespaces": "namespaces (unshare): no network; the file system is NOT read-only",
            "none": "none: no isolation available; code tools are disabled",
        }[self.kind]

    async def run(self, argv: list[str], limits: Limits, stdin: bytes = b"") -> Outcome:
        """Run ``argv`` in a fresh workspace; its exit code and (capped) output."""
        if not self.isolated:
            raise ToolError("no sandbox is available on this machine (install bubblewrap)")
        with tempfile.TemporaryDirectory(prefix="aios-sandbox-") as workspace:
            if self.kind == "bubblewrap":
                command = [*_bwrap_prefix(workspace), *argv]
                cwd = None
            else:
                command = [*_unshare_prefix(), *argv]
                cwd = workspace
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env={"PATH": "/usr/bin:/bin", "HOME": workspace, "LANG": "C.UTF-8"},
                start_new_session=True,  # its own process group: killed as a whole
                preexec_fn=_limiter(limits),
            )
            return await _collect(proc, stdin, limits)


def _bwrap_prefix(workspace: str) -> list[str]:
    # /tmp is private (a fresh tmpfs); the interpreter stays visible (read-only) if it lives
    # there (a virtual environment in a temporary checkout).
    keep = sorted(
        {p for p in (sys.prefix, sys.base_prefix) if Path(p).resolve().is_relative_to("/tmp")}
    )
    exposed = [arg for p in keep for arg in ("--ro-bind", p, p)]
    return [
        "bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
        *exposed,
        "--bind", workspace, WORKSPACE, "--unshare-all", "--die-with-parent", "--new-session",
        "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", WORKSPACE,
        "--chdir", WORKSPACE, "--",
    ]  # fmt: skip


def _unshare_prefix() -> list[str]:
    return ["unshare", "--user", "--map-root-user", "--net", "--pid", "--fork", "--"]


def _works(prefix: list[str]) -> bool:
    try:
        done = subprocess.run([*prefix, "true"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def _limiter(limits: Limits) -> Callable[[], None]:
    def apply() -> None:  # runs in the child, before exec
        mb = 1 << 20
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))
        resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mb * mb, limits.memory_mb * mb))
        resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_mb * mb, limits.file_mb * mb))
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    return apply


async def _collect(proc: asyncio.subprocess.Process, stdin: bytes, limits: Limits) -> Outcome:
    truncated = False

    async def read(stream: asyncio.StreamReader | None) -> bytes:
        """The stream, up to the cap; past it the process is killed (and we say so)."""
        nonlocal truncated
        assert stream is not None
        data = b""
        while chunk := await stream.read(1 << 16):  # to EOF: the pipe must be drained
            room = limits.output_bytes - len(data)
            data += chunk[:room]
            if len(chunk) > room and not truncated:
                truncated = True
                _kill(proc)
        return data

    async def feed() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(stdin)
            await proc.stdin.drain()
        proc.stdin.close()

    timed_out = False
    try:
        async with asyncio.timeout(limits.wall_seconds):
            _, out, err, code = await asyncio.gather(
                feed(), read(proc.stdout), read(proc.stderr), proc.wait()
            )
    except TimeoutError:
        timed_out = True
        _kill(proc)
        await proc.wait()
        out = err = b""
        code = None
    finally:
        if proc.returncode is None:
            _kill(proc)
            await proc.wait()
    return Outcome(
        exit_code=None if timed_out else code,
        stdout=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        timed_out=timed_out,
        truncated=truncated,
    )


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def python_argv(code: str) -> list[str]:
    """Run ``code`` with this interpreter in isolated mode (no user site, no env vars)."""
    return [sys.executable, "-I", "-c", code]
