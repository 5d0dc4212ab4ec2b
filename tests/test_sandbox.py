"""The sandbox for code tools, for real: no network, a minimal read-only view (no secrets of the
system, the user's home or the kernel), no writes outside its workspace, limits on CPU, memory,
processes, output and wall time; and the Python tool that runs in it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aios.errors import ToolError
from aios.storage.db import Job
from aios.tools.builtin import builtin_tools, python_tool
from aios.tools.manager import ToolManager
from aios.tools.registry import ToolRegistry
from aios.tools.sandbox import UNSAFE_ENV, Limits, Sandbox, default_hidden, python_argv
from aios.tools.spec import ToolContext

REAL_DATA_DIR = Path.home() / ".local" / "share" / "aios"
REAL_PREFIX = Path(sys.prefix).resolve()


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    found = Sandbox.detect()
    # CI installs bubblewrap (.ci/install-system): a weaker sandbox there is a failure.
    assert found.kind == "bubblewrap", found.describe()
    return found


async def run(sandbox: Sandbox, code: str, **limits: float) -> dict[str, object]:
    return (await sandbox.run(python_argv(code), Limits(**limits))).to_json()  # type: ignore[arg-type]


async def probe(sandbox: Sandbox, paths: list[str]) -> dict[str, str]:
    """What code in the sandbox gets when it reads each path: "absent", "denied" or "READ"."""
    code = f"""
import json, os
seen = {{}}
for path in {paths!r}:
    try:
        if os.path.isdir(path):
            os.listdir(path)
        else:
            open(path, "rb").read(1)
        seen[path] = "READ"
    except FileNotFoundError:
        seen[path] = "absent"
    except OSError:
        seen[path] = "denied"
print(json.dumps(seen))
"""
    result = await run(sandbox, code)
    assert result["exit_code"] == 0, result
    seen: dict[str, str] = json.loads(str(result["stdout"]))
    return seen


async def no_syscalls(kind: str, op: str, args: dict[str, object]) -> object:
    raise AssertionError


@pytest.fixture
def home_secret(tmp_path: Path) -> Iterator[Path]:
    """A secret file in a fresh directory of the user's home (in tmp_path if the home is not
    writable), outside the interpreter's prefix."""
    try:
        folder = Path(tempfile.mkdtemp(prefix="aios-test-secret-", dir=Path.home()))
    except OSError:
        folder = Path(tempfile.mkdtemp(prefix="aios-test-secret-", dir=tmp_path))
    folder.chmod(0o755)  # readable by anyone: only the sandbox's view can keep it hidden
    secret = folder / "secret.txt"
    secret.write_text("s3cret")
    yield secret
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def data_in_prefix() -> Iterator[Path]:
    """A fake kernel data directory (database, admin token) inside the interpreter's prefix,
    which the sandbox does show: the hardest place to hide it from."""
    data = Path(tempfile.mkdtemp(prefix="aios-test-data-", dir=sys.prefix))
    data.chmod(0o755)  # readable by anyone: only the sandbox's view can keep it hidden
    (data / "aios.db").write_text("agents' data")
    (data / "admin.token").write_text("aios_admin_secret")
    yield data
    shutil.rmtree(data, ignore_errors=True)


async def test_code_runs_and_writes_only_its_workspace(sandbox: Sandbox, tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    code = f"""
import os
open("mine.txt", "w").write("ok")
print(sorted(os.listdir(".")))
for target in ({str(outside)!r}, "/etc/aios-evil", "/usr/aios-evil", {str(Path.cwd() / "evil")!r}):
    try:
        open(target, "w").write("x")
        print("WROTE", target)
    except OSError as e:
        print("denied", e.errno)
"""
    result = await run(sandbox, code)
    assert result["exit_code"] == 0, result
    lines = str(result["stdout"]).splitlines()
    assert lines[0] == "['mine.txt']"
    # /etc and /usr: EROFS (30), the system is read-only. The host's tmp_path and checkout:
    # under /tmp they are not even visible (the sandbox has its own /tmp, so a write there
    # lands in that private tmpfs); elsewhere they are read-only. Either way, nothing changes
    # outside the sandbox:
    assert lines[2:4] == ["denied 30", "denied 30"]
    assert not outside.exists() and not (Path.cwd() / "evil").exists()


async def test_no_network(sandbox: Sandbox) -> None:
    code = """
import socket
for host, port in (("1.1.1.1", 53), ("127.0.0.1", 22), ("10.0.0.1", 80)):
    s = socket.socket()
    s.settimeout(2)
    print(s.connect_ex((host, port)) != 0)
try:
    socket.getaddrinfo("pypi.org", 443)
    print("resolved")
except OSError:
    print("no dns")
"""
    result = await run(sandbox, code)
    assert str(result["stdout"]).split() == ["True", "True", "True", "no", "dns"], result


async def test_limits_hold(sandbox: Sandbox) -> None:
    start = time.monotonic()
    spin = await run(sandbox, "while True: pass", cpu_seconds=1, wall_seconds=10)
    assert spin["exit_code"] != 0 and time.monotonic() - start < 5  # killed by RLIMIT_CPU
    sleep = await run(sandbox, "import time; time.sleep(30)", wall_seconds=0.5)
    assert sleep["timed_out"] is True and sleep["exit_code"] is None
    memory = await run(sandbox, "x = bytearray(600 * 2**20); print('got it')", memory_mb=256)
    assert memory["exit_code"] != 0 and "MemoryError" in str(memory["stderr"])
    chatty = await run(sandbox, "print('y' * 10**7)", output_bytes=1000)
    assert chatty["truncated"] is True and len(str(chatty["stdout"])) == 1000
    fork = await run(sandbox, "import os; os.system('sleep 30 &'); print('parent done')")
    assert fork["exit_code"] == 0  # the group is killed afterwards; nothing outlives the call


async def test_no_sandbox_means_no_code() -> None:
    with pytest.raises(ToolError, match="bubblewrap"):
        await Sandbox("none").run(python_argv("print(1)"), Limits())


async def test_the_python_tool(sandbox: Sandbox) -> None:
    manager = ToolManager(ToolRegistry(builtin_tools()))
    ctx = ToolContext("coder", no_syscalls)
    result = await manager.call(ctx, "python", {"code": "print(sum(range(101)))"}, Job())
    assert result["exit_code"] == 0 and result["stdout"].strip() == "5050"
    failed = await manager.call(ctx, "python", {"code": "1/0"}, Job())
    assert failed["exit_code"] == 1 and "ZeroDivisionError" in failed["stderr"]
    manager.close()


def test_the_cli_says_which_sandbox_is_in_use() -> None:
    from typer.testing import CliRunner

    from aios.cli import app

    result = CliRunner().invoke(app, ["tools", "sandbox"])
    assert result.exit_code == 0 and "bubblewrap: no network" in result.output
    assert "code tools: on" in result.output


def on_host(path: Path) -> str | None:
    """The host's ``path`` (its text if it is a file), or None if it does not exist."""
    if path.is_dir():
        return "(a directory)"
    return path.read_text(errors="replace") if path.exists() else None


async def test_system_secrets_are_not_visible(sandbox: Sandbox) -> None:
    assert on_host(Path("/etc/passwd")) and os.access("/etc/shadow", os.F_OK)  # Debian: always
    seen = await probe(sandbox, ["/etc/shadow", "/etc/passwd", "/etc/hostname", "/root", "/home"])
    assert seen["/etc/shadow"] != "READ" and seen["/etc/passwd"] != "READ", seen
    assert seen["/etc/hostname"] == "absent", seen
    listing = await run(sandbox, "import json, os; print(json.dumps(os.listdir('/etc')))")
    allowed = {"ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives"}
    assert set(json.loads(str(listing["stdout"]))) <= allowed, listing


async def test_the_kernels_data_is_not_visible(sandbox: Sandbox, tmp_path: Path) -> None:
    home = tmp_path / "home"
    data = home / ".local" / "share" / "aios"
    data.mkdir(parents=True)
    spill = home / "spill"
    spill.mkdir()
    for path in (data / "aios.db", data / "admin.token", spill / "ctx.kv"):
        path.write_text("secret")
    hidden = Sandbox("bubblewrap", hidden=(*default_hidden(), str(data), str(spill)))
    targets = [str(data), str(data / "aios.db"), str(data / "admin.token"), str(spill)]
    real = REAL_DATA_DIR
    assert str(real) in default_hidden()  # the real data directory is always hidden
    seen = await probe(hidden, [*targets, str(real), str(real / "admin.token")])
    assert set(seen.values()) == {"absent"}, seen


async def test_data_inside_the_interpreters_prefix_is_covered(data_in_prefix: Path) -> None:
    hidden = Sandbox("bubblewrap", hidden=(str(data_in_prefix),))
    visible = Sandbox("bubblewrap", hidden=())
    token = str(data_in_prefix / "admin.token")
    assert (await probe(visible, [token]))[token] == "READ"  # shown when not hidden...
    seen = await probe(hidden, [token, str(data_in_prefix / "aios.db"), str(data_in_prefix)])
    assert "READ" not in seen.values(), seen  # ...and covered up when hidden
    assert (await probe(hidden, [sys.prefix]))[sys.prefix] == "READ"


async def test_an_interpreter_inside_hidden_data_refuses_to_run() -> None:
    for secret in (sys.prefix, str(Path(sys.prefix).parent)):
        exposing = Sandbox("bubblewrap", hidden=(secret,))
        assert not exposing.enabled and "never see" in exposing.describe()
        with pytest.raises(ToolError, match="never see"):
            await run(exposing, "print('leaked')")


async def test_the_rest_of_the_home_is_not_visible(sandbox: Sandbox, home_secret: Path) -> None:
    assert on_host(home_secret) == "s3cret"
    checkout = Path(os.getcwd(), "pyproject.toml")
    assert on_host(checkout) and not checkout.is_relative_to(REAL_PREFIX)
    seen = await probe(sandbox, [str(home_secret), str(home_secret.parent), str(checkout)])
    assert set(seen.values()) == {"absent"}, seen


async def test_nothing_outside_the_workspace_is_written(sandbox: Sandbox, tmp_path: Path) -> None:
    name = f"aios-evil-{secrets.token_hex(4)}"
    targets = [Path("/tmp") / name, Path.home() / name, Path("/usr") / name,
               Path("/etc") / name, Path("/") / name, Path(sys.prefix) / name,
               Path.cwd() / name, tmp_path / name]  # fmt: skip
    code = f"""
for target in {[str(t) for t in targets]!r}:
    try:
        open(target, "w").write("x")
    except OSError:
        pass
open("mine.txt", "w").write("ok")
print(open("mine.txt").read())
"""
    try:
        result = await run(sandbox, code)
        assert result["exit_code"] == 0 and str(result["stdout"]).strip() == "ok", result
        assert [t for t in targets if on_host(t) is not None] == []
    finally:
        for target in targets:
            with contextlib.suppress(OSError):
                os.unlink(target)


def sandbox_processes(marker: str) -> list[int]:
    """Host processes whose command line carries ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


async def test_a_fork_bomb_is_stopped(sandbox: Sandbox) -> None:
    start = time.monotonic()
    loop = """
import os, time
forked = 0
for _ in range(300):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(20)
        os._exit(0)
    forked += 1
print(forked)
"""
    result = await run(sandbox, loop, processes=16)
    assert result["exit_code"] == 0, result
    assert 0 < int(str(result["stdout"])) < 16, result
    marker = f"bomb-{secrets.token_hex(4)}"
    bomb = await run(sandbox, f"import os  # {marker}\nwhile True: os.fork()", wall_seconds=5)
    assert bomb["timed_out"] or bomb["exit_code"] != 0, bomb
    assert time.monotonic() - start < 20
    assert sandbox_processes(marker) == []  # nothing of it outlives the call
    after = await run(sandbox, "print('fine')")
    assert after["exit_code"] == 0 and str(after["stdout"]).strip() == "fine"


async def test_only_unshare_means_no_code_unless_an_operator_opts_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(UNSAFE_ENV, raising=False)
    weak = Sandbox("namespaces")
    assert not weak.enabled and "NOT" in weak.describe()
    manager = ToolManager(ToolRegistry([python_tool(sandbox=weak)]))
    ctx = ToolContext("coder", no_syscalls)
    with pytest.raises(ToolError, match="apt-get install bubblewrap") as refused:
        await manager.call(ctx, "python", {"code": "print(42)"}, Job())
    assert f"{UNSAFE_ENV}=1" in str(refused.value)
    monkeypatch.setenv(UNSAFE_ENV, "1")
    opted_in = Sandbox("namespaces")
    assert opted_in.enabled and "unsafe" in opted_in.describe()
    manager = ToolManager(ToolRegistry([python_tool(sandbox=opted_in)]))
    result = await manager.call(ctx, "python", {"code": "print(6 * 7)"}, Job())
    assert result["exit_code"] == 0 and result["stdout"].strip() == "42", result
    manager.close()


def test_the_kernels_database_is_hidden_from_its_python_tool(
    sandbox: Sandbox, data_in_prefix: Path
) -> None:
    """Through a real kernel: its database lies where the sandbox does mount things (inside the
    interpreter's prefix), yet the python tool it runs for an agent cannot read it."""
    from fakes import CORE_DEFAULTS, FakeFactory

    from aios.config import CoreConfig, KernelConfig, StorageConfig
    from aios.kernel import Kernel

    db = data_in_prefix / "kernel.db"
    config = KernelConfig(
        cores=(CoreConfig(name="fake", model="fake", **CORE_DEFAULTS),),
        storage=StorageConfig(database=str(db)),
    )
    code = f"print(open({str(db)!r}, 'rb').read(16))"

    async def attempt() -> dict[str, Any]:
        async with Kernel(config, engine_factory=FakeFactory(lambda p: "ok")) as k:
            p = k.register("coder", owner="mallory")
            await k.resource(p, "storage", "write", {"path": "mine.txt", "content": "x"})
            args = {"name": "python", "arguments": {"code": code}}
            result: dict[str, Any] = await k.resource(p, "tools", "call", args)
            return result

    ran = asyncio.run(attempt())
    assert db.read_bytes().startswith(b"SQLite") and db.stat().st_mode & 0o004  # on the host
    assert ran["exit_code"] != 0 and "SQLite" not in ran["stdout"], ran
