"""The sandbox for code tools, for real: no network, no writes outside its workspace, limits on
CPU, memory, output and wall time; and the Python tool that runs in it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aios.errors import ToolError
from aios.storage.db import Job
from aios.tools.builtin import builtin_tools
from aios.tools.manager import ToolManager
from aios.tools.registry import ToolRegistry
from aios.tools.sandbox import Limits, Sandbox, python_argv
from aios.tools.spec import ToolContext


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    found = Sandbox.detect()
    # CI installs bubblewrap (.ci/install-system): a weaker sandbox there is a failure.
    assert found.kind == "bubblewrap", found.describe()
    return found


async def run(sandbox: Sandbox, code: str, **limits: float) -> dict[str, object]:
    return (await sandbox.run(python_argv(code), Limits(**limits))).to_json()  # type: ignore[arg-type]


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
    async def no_syscalls(kind: str, op: str, args: dict[str, object]) -> object:
        raise AssertionError

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
