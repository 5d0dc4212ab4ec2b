"""The sandbox for code tools: a separate process with no network, a minimal read-only view of
the system, a private writable workspace, and CPU, memory, process-count, output and wall-time
limits.

Which isolation this machine supports is detected once (:meth:`Sandbox.detect`, which runs the
interpreter inside it for real) and reported (``aios tools sandbox``):

  bubblewrap   bwrap: new network, PID, IPC and UTS namespaces (and a user namespace unless the
               kernel runs as root). The file system is a fresh, read-only root holding only
               what the interpreter needs: ``/usr`` (with ``/bin``, ``/lib``... as on the host),
               a few ``/etc`` files (the loader cache, the time zone, alternatives), and the
               interpreter's own prefix, stdlib and site-packages directories, exactly those
               (never the rest of a home directory); ``/dev`` and ``/proc`` of its own; a private
               ``/tmp``; the workspace (``/tmp/workspace``) the only other writable place. The
               kernel's data directory, database and spill directories (:func:`default_hidden`
               plus what the caller passes) are never visible: an interpreter inside one of them
               makes code tools refuse to run, and one inside a bound directory is covered by an
               empty file system. Debian: ``apt-get install bubblewrap``.
  namespaces   util-linux ``unshare``: no network and its own PID namespace, but the host's file
               system is visible and writable wherever the user may write. Code tools are OFF
               with it unless an operator opts in, accepting that: ``AIOS_UNSAFE_SANDBOX=1``.
  none         nothing to isolate with: code tools are off.

Limits come from rlimits set in the child (CPU seconds, address space, file size, open files), a
process limit (``RLIMIT_NPROC`` through ``prlimit``, see :func:`_confine`), and a wall-clock
deadline after which the whole process group is killed. Under bubblewrap, when the kernel runs
as root, the code runs as ``nobody`` (root is exempt from ``RLIMIT_NPROC``); under ``unshare``
as root the process limit does not hold.
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
import sysconfig
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aios.errors import ToolError

Kind = Literal["bubblewrap", "namespaces", "none"]
WORKSPACE = "/tmp/workspace"  # where the workspace appears inside a bubblewrap sandbox
UNSAFE_ENV = "AIOS_UNSAFE_SANDBOX"  # "1": run code tools under `unshare` (host writes possible)
NOBODY = 65534  # the uid and gid code runs as when the kernel runs as root
SYSTEM_DIRS = ("/usr",)
TOP_LEVEL = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # often links into /usr
ETC_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
             "/etc/alternatives")  # fmt: skip
INSTALL_HINT = "install bubblewrap: apt-get install bubblewrap"
NO_SANDBOX = f"code tools are off: no sandbox works on this machine ({INSTALL_HINT})"
UNSAFE_OFF = (
    "code tools are off: only the 'namespaces' (unshare) sandbox works here, and it cannot keep "
    f"code from reading and writing the host's files; {INSTALL_HINT} (or, accepting that risk, "
    f"an operator can opt in with {UNSAFE_ENV}=1)"
)


@dataclass(frozen=True)
class Limits:
    cpu_seconds: int = 5
    memory_mb: int = 512
    wall_seconds: float = 10.0
    output_bytes: int = 64 << 10  # per stream; more is cut (and says so)
    file_mb: int = 64
    processes: int = 32  # processes and threads the code may have at once


@dataclass(frozen=True)
class Outcome:
    exit_code: int | None  # None: killed at the wall-clock limit
    stdout: str
    stderr: str
    timed_out: bool = False
    truncated: bool = False

    def to_json(self) -> dict[str, object]:
        return self.__dict__.copy()


def default_hidden() -> tuple[str, ...]:
    """What code must never see: the kernel's data directory (``$AIOS_DATA_DIR``, the default
    one, and ``~/.local/share/aios``) and the directory of ``$AIOS_DATABASE`` (SQLite)."""
    from aios.config import default_data_dir

    paths = [default_data_dir(), os.path.join(os.path.expanduser("~"), ".local", "share", "aios")]
    paths += [p for p in (os.environ.get("AIOS_DATA_DIR"), _database_dir()) if p]
    return _normalized(paths)


def _database_dir() -> str | None:
    database = os.environ.get("AIOS_DATABASE", "")
    if database.startswith("sqlite:///"):
        database = database.removeprefix("sqlite:///")
    elif "://" in database:
        return None
    return os.path.dirname(os.path.abspath(os.path.expanduser(database))) if database else None


def _normalized(paths: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(os.path.abspath(os.path.expanduser(p)) for p in paths))


def _opted_in() -> bool:
    return os.environ.get(UNSAFE_ENV) == "1"


@dataclass(frozen=True)
class Sandbox:
    kind: Kind
    hidden: tuple[str, ...] = field(default_factory=default_hidden)
    unsafe_opt_in: bool = field(default_factory=_opted_in)  # namespaces only: run code anyway

    @property
    def isolated(self) -> bool:
        return self.kind != "none"

    @property
    def enabled(self) -> bool:
        return self.problem() is None

    @staticmethod
    def detect(hidden: Iterable[str] = ()) -> Sandbox:
        """The strongest isolation that works here (tried for real, not just looked up)."""
        secret = _normalized((*default_hidden(), *hidden))
        if shutil.which("bwrap") and shutil.which("prlimit"):
            found = Sandbox("bubblewrap", secret)
            if found.problem() is not None or found.works():
                return found  # a problem (an exposed data directory) is reported, not bypassed
        if shutil.which("unshare") and shutil.which("prlimit"):
            found = Sandbox("namespaces", secret)
            if found.works():
                return found
        return Sandbox("none", secret)

    def problem(self) -> str | None:
        """Why code tools refuse to run in this sandbox; None when they run."""
        if self.kind == "none":
            return NO_SANDBOX
        if self.kind == "namespaces" and not self.unsafe_opt_in:
            return UNSAFE_OFF
        if self.kind == "bubblewrap":
            try:
                _view(self.hidden)
            except ToolError as e:
                return str(e)
        return None

    def describe(self) -> str:
        text = {
            "bubblewrap": "bubblewrap: no network, a minimal read-only view of the system (no "
            "home directories, no kernel data), private /tmp and workspace, process limit",
            "namespaces": "namespaces (unshare): no network, but the host's files are NOT "
            "hidden or read-only",
            "none": "none: no isolation available",
        }[self.kind]
        if self.kind == "namespaces" and self.unsafe_opt_in:
            return f"{text}; code tools are ON because {UNSAFE_ENV}=1 (unsafe)"
        problem = self.problem()
        return text if problem is None else f"{text}; {problem}"

    def works(self) -> bool:
        """Whether this interpreter really starts inside (``python -I -c pass``)."""
        with tempfile.TemporaryDirectory(prefix="aios-sandbox-") as workspace:
            try:
                command, cwd = self._command(workspace, python_argv("pass"), Limits())
                done = subprocess.run(
                    command, capture_output=True, timeout=10, check=False, cwd=cwd,
                    env=_env(workspace),
                )  # fmt: skip
            except (OSError, subprocess.SubprocessError, ToolError):
                return False
            return done.returncode == 0

    async def run(self, argv: list[str], limits: Limits, stdin: bytes = b"") -> Outcome:
        """Run ``argv`` in a fresh workspace; its exit code and (capped) output."""
        if (problem := self.problem()) is not None:
            raise ToolError(problem)
        with tempfile.TemporaryDirectory(prefix="aios-sandbox-") as workspace:
            command, cwd = self._command(workspace, argv, limits)
            proc = await asyncio.create_subprocess_exec(
                *command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
                env=_env(workspace),
                start_new_session=True,  # its own process group: killed as a whole
                preexec_fn=_limiter(limits),
            )
            return await _collect(proc, stdin, limits)

    def _command(self, workspace: str, argv: list[str], limits: Limits) -> tuple[list[str], str]:
        """The command line that runs ``argv`` confined, and the directory to start it in."""
        if self.kind != "bubblewrap":
            return [*_unshare_prefix(), *_confine(limits, as_nobody=False), *argv], workspace
        as_nobody = os.getuid() == 0
        if as_nobody:
            os.chown(workspace, NOBODY, NOBODY)
        inner = [*_confine(limits, as_nobody), *argv]
        return [*_bwrap_prefix(workspace, self.hidden), *inner], workspace


def _env(workspace: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "HOME": workspace, "LANG": "C.UTF-8"}


@dataclass(frozen=True)
class _View:
    """The file system a bubblewrap sandbox sees, besides /dev, /proc, /tmp and the workspace."""

    binds: list[tuple[str, str]]  # (host source, path inside), read-only
    links: list[tuple[str, str]]  # (target, path inside)
    masks: list[tuple[str, str]]  # (host path, path inside): hidden, inside a bound directory

    def dirs(self) -> list[str]:
        """Directories to create first: the parents of the mount points and links."""
        wanted = {str(p) for _, dest in [*self.binds, *self.links] for p in Path(dest).parents}
        return sorted(d for d in wanted - {"/", "/tmp"} if not _inside_any(d, self.binds))

    def args(self) -> list[str]:
        binds = sorted(self.binds, key=lambda b: len(Path(b[1]).parts))
        masks = [arg for host, inside in self.masks for arg in _mask(host, inside)]
        return [
            *(arg for d in self.dirs() for arg in ("--perms", "0755", "--dir", d)),
            *(arg for src, dest in binds for arg in ("--ro-bind", src, dest)),
            *(arg for target, dest in self.links for arg in ("--symlink", target, dest)),
            *masks,
        ]


def _view(hidden: Iterable[str]) -> _View:
    """What the interpreter needs and nothing else; a ToolError if that would expose a hidden
    path."""
    binds: list[tuple[str, str]] = [(d, d) for d in SYSTEM_DIRS if os.path.isdir(d)]
    links: list[tuple[str, str]] = []
    for top in TOP_LEVEL:
        if os.path.islink(top):
            links.append((os.readlink(top), top))
        elif os.path.isdir(top):
            binds.append((top, top))
    binds += [(f, f) for f in ETC_FILES if os.path.exists(f)]
    binds += _interpreter_binds(binds)
    links += [link for link in _executable_links() if not _inside_any(link[1], binds)]
    return _View(binds, links, _masks(binds, hidden))


def _interpreter_binds(system: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """This interpreter's prefixes, stdlib and site-packages, each at its own path (and at its
    real path when that differs), without the ones already visible."""
    info = sysconfig.get_paths()
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    paths |= {info[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in info}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    pairs: set[tuple[str, str]] = set()
    for path in (os.path.abspath(p) for p in paths if os.path.isdir(p)):
        real = os.path.realpath(path)
        pairs |= {(real, real), (real, path)}
    pairs -= set(system)
    return sorted(p for p in pairs if not _covered(p, [*system, *(q for q in pairs if q != p)]))


def _covered(pair: tuple[str, str], others: Iterable[tuple[str, str]]) -> bool:
    """Whether ``pair`` is visible already through one of ``others`` (the same tree, deeper)."""
    src, dest = pair
    return any(
        _within(dest, other_dest)
        and (dest, src) != (other_dest, other_src)
        and os.path.normpath(os.path.join(other_src, os.path.relpath(dest, other_dest))) == src
        for other_src, other_dest in others
    )


def _executable_links() -> list[tuple[str, str]]:
    """The symbolic links ``sys.executable`` goes through, as (target, link)."""
    links: list[tuple[str, str]] = []
    path = os.path.abspath(sys.executable)
    while os.path.islink(path) and len(links) < 40:
        target = os.readlink(path)
        links.append((target, path))
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    return links


def _masks(binds: list[tuple[str, str]], hidden: Iterable[str]) -> list[tuple[str, str]]:
    """Hidden paths that lie inside a bound directory (on the host, and where to cover them up
    inside); a ToolError if a bound path is a hidden one or lies inside one."""
    masks: list[tuple[str, str]] = []
    for secret in hidden:
        forms = {os.path.abspath(secret), os.path.realpath(secret)}
        for src, dest in binds:
            if exposed := next((f for f in forms if _within(src, f) or _within(dest, f)), None):
                raise ToolError(
                    f"code tools refuse to run: the sandbox would have to show {dest}, which "
                    f"lies in {exposed}, a directory code must never see (the kernel's data, "
                    "database or spill directory); install the interpreter (its virtual "
                    "environment) outside it"
                )
            real = os.path.realpath(secret)
            if os.path.lexists(real) and _within(real, src):
                masks.append((real, os.path.join(dest, os.path.relpath(real, src))))
    return sorted(set(masks))


def _mask(host: str, inside: str) -> list[str]:
    if os.path.isdir(host):
        return ["--perms", "0000", "--tmpfs", inside, "--remount-ro", inside]
    return ["--ro-bind", "/dev/null", inside]


def _within(path: str, parent: str) -> bool:
    return Path(path) == Path(parent) or Path(path).is_relative_to(parent)


def _inside_any(path: str, binds: Iterable[tuple[str, str]]) -> bool:
    return any(_within(path, dest) for _, dest in binds)


def _bwrap_prefix(workspace: str, hidden: Iterable[str]) -> list[str]:
    return [
        "bwrap", "--dev", "/dev", "--proc", "/proc", "--perms", "1777", "--tmpfs", "/tmp",
        *_view(hidden).args(),
        "--bind", workspace, WORKSPACE, "--remount-ro", "/", *_bwrap_namespaces(),
        "--die-with-parent", "--new-session", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
        "--setenv", "HOME", WORKSPACE, "--setenv", "LANG", "C.UTF-8", "--chdir", WORKSPACE, "--",
    ]  # fmt: skip


def _bwrap_namespaces() -> list[str]:
    shared = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts",
              "--unshare-cgroup-try"]  # fmt: skip
    if os.getuid() != 0:
        return ["--unshare-user", *shared]
    # As root, no user namespace (inside one, uid 0 stays root, exempt from RLIMIT_NPROC): only
    # what setpriv needs to become nobody.
    caps = ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_READ_SEARCH")  # the last: --chdir
    return [*shared, "--cap-drop", "ALL", *(arg for c in caps for arg in ("--cap-add", c))]


def _unshare_prefix() -> list[str]:
    return [
        "unshare",
        "--user",
        "--map-root-user",
        "--net",
        "--pid",
        "--fork",
        "--kill-child",
        "--",
    ]


def _confine(limits: Limits, as_nobody: bool) -> list[str]:
    """``prlimit`` (and ``setpriv`` to nobody) in front of the command.

    ``RLIMIT_NPROC`` counts the tasks (processes and threads) of the real uid: since Linux 5.14
    within the user namespace only, so inside the sandbox's own namespace exactly
    ``limits.processes``. Where the count is system-wide (older kernels; nobody, which has no
    namespace of its own) the uid's current tasks are added, so others of that uid starting or
    ending meanwhile move the limit. Root is exempt from it: under ``unshare`` as root (no
    setpriv there: nobody may not reach the interpreter) the limit does not hold."""
    if not as_nobody:
        base = 0 if _nproc_per_namespace() or os.getuid() == 0 else _tasks_of(os.getuid())
        return ["prlimit", f"--nproc={base + limits.processes}", "--"]
    drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
            "--inh-caps=-all", "--bounding-set=-all", "--"]  # fmt: skip
    return [*drop, "prlimit", f"--nproc={_tasks_of(NOBODY) + limits.processes}", "--"]


def _nproc_per_namespace() -> bool:
    release = os.uname().release.split("-")[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (5, 14)
    except (IndexError, ValueError):
        return False


def _tasks_of(uid: int) -> int:
    """Processes and threads whose real uid is ``uid`` (as far as this /proc shows)."""
    count = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                count += _threads_if_owned(Path(entry.path, "status"), uid)
    return count


def _threads_if_owned(status: Path, uid: int) -> int:
    try:
        lines = status.read_text().splitlines()
    except OSError:
        return 0
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    try:
        owned = int(fields["Uid"].split()[0]) == uid
        return int(fields["Threads"]) if owned else 0
    except (KeyError, IndexError, ValueError):
        return 0


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
