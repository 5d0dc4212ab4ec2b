"""`pip install aios` is a client install: no llama.cpp. The SDK, the CLI and the syscall
objects work without it (a JSON schema is checked without compiling it), and an embedded core
says what to install instead of failing with an ImportError. Each case runs in a fresh
interpreter where ``import llama_cpp`` fails, as on a host without the ``embedded`` extra."""

from __future__ import annotations

import subprocess
import sys

NO_LLAMA = "import sys; sys.modules['llama_cpp'] = None\n"  # `import llama_cpp` now fails


def run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", NO_LLAMA + code], capture_output=True, text=True, timeout=120
    )


def test_the_sdk_and_its_calls_need_no_llama_cpp() -> None:
    done = run(
        "import json\n"
        "from aios.sdk.http import AsyncClient, Client\n"
        "from aios.sdk import Agent\n"
        "from aios.cli import app\n"
        "from aios.syscall import LLMCall, Message, SamplingParams\n"
        "schema = json.dumps({'type': 'object', 'properties': {'a': {'type': 'integer'}}})\n"
        "call = LLMCall(messages=(Message('user', 'hi'),),"
        " params=SamplingParams(json_schema=schema))\n"
        "print('ok', call.params.json_output, sys.modules['llama_cpp'])\n"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "True", "None"]


def test_an_embedded_core_without_llama_cpp_says_what_to_install() -> None:
    done = run(
        "import asyncio\n"
        "from aios.config import KernelConfig\n"
        "from aios.errors import ConfigError\n"
        "from aios.kernel import Kernel\n"
        "async def main():\n"
        "    async with Kernel(KernelConfig()):\n"
        "        pass\n"
        "try:\n"
        "    asyncio.run(main())\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'aios[embedded]'" in done.stdout and "remote core" in done.stdout
