"""A real throwaway PostgreSQL server for the tests, started by the tests themselves.

:class:`PostgresServer` runs ``initdb`` into a fresh temporary directory and starts the server
with ``pg_ctl`` on a unix socket only (``listen_addresses=''``), in that same directory; on exit
it stops the server (``pg_ctl stop -m fast``) and removes the directory. PostgreSQL refuses to
run as root, so as root both commands run as the ``postgres`` system user (``runuser``).

:func:`find_pg_bin` finds the server binaries: ``initdb`` on ``PATH``, else the newest
``/usr/lib/postgresql/*/bin`` (Debian's ``postgresql`` package, which CI's ``.ci/run``
installs). Without them the tests fail with a clear message; they are never skipped.

:func:`schema_dsn` points a connection string at one schema (``search_path``), so that each
test can work in a fresh schema of the one session-wide server (``pg_dsn`` in conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shlex
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Self

USER = "aios"  # the database superuser initdb creates
SYSTEM_USER = "postgres"  # who runs the server when the tests run as root
DEBIAN_PG_BINS = Path("/usr/lib/postgresql")
COMMAND_TIMEOUT = 120.0  # seconds, for each initdb / pg_ctl run
LOG_TAIL = 3000  # characters of the server log quoted in errors
# The unix socket DIR/.s.PGSQL.PORT must stay under ~100 characters (sun_path is 108 bytes).
MAX_SOCKET_DIR = 80


def find_pg_bin() -> Path:
    """The directory holding ``initdb`` and ``pg_ctl``: ``initdb``'s on ``PATH``, else the newest
    ``/usr/lib/postgresql/*/bin`` that has ``initdb``."""
    found = shutil.which("initdb")
    if found is not None:
        for candidate in (Path(found).parent, Path(found).resolve().parent):
            if (candidate / "pg_ctl").is_file():
                return candidate
    versions: list[tuple[tuple[int, ...], Path]] = []
    if DEBIAN_PG_BINS.is_dir():
        for version_dir in DEBIAN_PG_BINS.iterdir():
            bin_dir = version_dir / "bin"
            if (bin_dir / "initdb").is_file() and (bin_dir / "pg_ctl").is_file():
                key = tuple(int(part) for part in re.findall(r"\d+", version_dir.name))
                versions.append((key, bin_dir))
    if versions:
        return max(versions)[1]
    raise RuntimeError(
        "PostgreSQL's server programs (initdb, pg_ctl) were found neither on PATH nor in "
        f"{DEBIAN_PG_BINS}/*/bin. The tests start a throwaway PostgreSQL server: install "
        "Debian's `postgresql` package (`apt-get install postgresql`; CI's .ci/run does that)."
    )


def schema_dsn(dsn: str, schema: str) -> str:
    """``dsn`` with ``options='-c search_path=SCHEMA'`` appended (libpq conninfo syntax)."""
    # Three levels of quoting: a name other than a plain lower-case identifier is double-quoted
    # in search_path; the server splits `options` at unescaped spaces (backslash escapes); the
    # conninfo value is single-quoted (backslash escapes a quote or a backslash).
    if not re.fullmatch(r"[a-z_][a-z0-9_$]*", schema):
        schema = '"' + schema.replace('"', '""') + '"'
    option = "-c search_path=" + schema.replace("\\", "\\\\").replace(" ", "\\ ")
    quoted = option.replace("\\", "\\\\").replace("'", "\\'")
    return f"{dsn} options='{quoted}'"


def _free_port() -> int:
    # The server listens on no TCP address: the number only names the socket file.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _short_temp_base() -> str | None:
    """Where to make the temporary directory: the default, unless that path is too long for a
    unix socket (then /tmp)."""
    base = tempfile.gettempdir()
    return None if len(base) <= MAX_SOCKET_DIR - 20 else "/tmp"


class PostgresServer:
    """A throwaway PostgreSQL server on a unix socket in a fresh temporary directory.

    ``with PostgresServer() as server:`` starts it (``server.dsn`` connects as superuser
    ``aios`` to database ``postgres``); leaving the block stops it and removes the directory.
    """

    dir: Path
    data_dir: Path
    log: Path
    port: int
    dsn: str

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir if bin_dir is not None else find_pg_bin()
        self._run_as: list[str] = []
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise RuntimeError(
                    f"the tests run as root and PostgreSQL refuses to: they run it as the "
                    f"`{SYSTEM_USER}` system user, which does not exist here (Debian's "
                    f"`postgresql` package creates it), or run the tests as another user"
                ) from None
            runuser = shutil.which("runuser")
            if runuser is None:
                raise RuntimeError(
                    f"the tests run as root and PostgreSQL refuses to: they run it as "
                    f"`{SYSTEM_USER}` with `runuser` (util-linux), which is not on PATH"
                )
            self._run_as = [runuser, "-u", SYSTEM_USER, "--"]
            self._owner = (entry.pw_uid, entry.pw_gid)
        self._started = False

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """initdb into a fresh temporary directory, then start the server (waits until ready)."""
        self.dir = Path(tempfile.mkdtemp(prefix="aios-pg-", dir=_short_temp_base()))
        self.data_dir = self.dir / "data"
        self.log = self.dir / "log"
        self.port = _free_port()
        self.dsn = f"host={self.dir} port={self.port} user={USER} dbname=postgres"
        try:
            if self._owner is not None:
                os.chown(self.dir, *self._owner)  # empty: this is `chown -R`
            self._initdb()
            options = (
                f"-k {shlex.quote(str(self.dir))} -c listen_addresses='' -p {self.port} "
                "-c fsync=on -c max_connections=200"
            )
            result = self._pg(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-w",
                "-t",
                "60",
                "-l",
                str(self.log),
                "start",
                "-o",
                options,
            )
            if result.returncode != 0:
                raise RuntimeError(self._failure("pg_ctl start", result))
            self._started = True
        except BaseException:
            self._stop_quietly()
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def stop(self) -> None:
        """Stop the server (fast shutdown: open sessions are ended) and remove its directory."""
        try:
            if self._started:
                self._started = False
                result = self._pg(
                    "pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"
                )
                if result.returncode != 0:
                    raise RuntimeError(self._failure("pg_ctl stop", result))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-LOG_TAIL:]
        except OSError as e:
            return f"(no server log: {e})"

    def _initdb(self) -> None:
        errors: list[str] = []
        for locale in ("C.UTF-8", "C"):
            result = self._pg(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                USER,
                "-A",
                "trust",
                "--encoding",
                "UTF8",
                "--locale",
                locale,
            )
            if result.returncode == 0:
                return
            errors.append(self._output(f"initdb --locale {locale}", result))
            shutil.rmtree(self.data_dir, ignore_errors=True)  # initdb may leave it behind
        raise RuntimeError("\n\n".join(errors))

    def _pg(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """Run one of the server programs (as `postgres` when we are root), capturing output."""
        return subprocess.run(
            [*self._run_as, str(self.bin_dir / program), *args],
            cwd=self.dir,  # a directory the `postgres` user can enter
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            check=False,
        )

    def _stop_quietly(self) -> None:
        """After a failed start: stop whatever may be running; errors are ignored."""
        if (self.data_dir / "postmaster.pid").exists():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                self._pg("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")

    @staticmethod
    def _output(what: str, result: subprocess.CompletedProcess[str]) -> str:
        output = (result.stdout + result.stderr).strip()
        return f"{what} failed (exit status {result.returncode}):\n{output}"

    def _failure(self, what: str, result: subprocess.CompletedProcess[str]) -> str:
        return f"{self._output(what, result)}\n--- server log ({self.log}), tail ---\n" + (
            self.log_tail()
        )
