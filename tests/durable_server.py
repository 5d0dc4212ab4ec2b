"""``python tests/durable_server.py ENGINE``: ``aios serve`` as the durable-process tests run it
(tests/test_resume.py), a real server process to kill: settings from the environment and
``$AIOS_CONFIG`` like ``aios serve``, the test agents (tests/durable_agents.py) offered to
``POST /api/v1/processes`` and the ``slow`` tool beside the built-in ones. ENGINE is ``model``
(the embedded llama.cpp model) or ``fake`` (the test double, deterministic, each step taking
``$FAKE_STEP_S`` seconds). Prints ``READY <port>`` once it listens."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import durable_agents
from fakes import FakeEngine

from aios.agents import AGENTS
from aios.config import CoreConfig
from aios.kernel import llamacpp_engine
from aios.llm.engine import Engine
from aios.server.config import load_settings
from aios.server.main import bound_port, serve
from aios.tools.builtin import builtin_tools
from aios.tools.registry import ToolRegistry


def reply(tokens: Sequence[int]) -> str:
    return "w" + hashlib.sha256(repr(list(tokens)).encode()).hexdigest()[:6]


class PacedEngine(FakeEngine):
    """The fake engine at a human pace, so that a kill lands mid-run."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(float(os.environ.get("FAKE_STEP_S", "0.01")))
        return super().step(*args, **kwargs)


def fake(config: CoreConfig) -> Engine:
    return PacedEngine(config, reply)  # type: ignore[return-value]


def main(engine: str) -> None:
    settings = load_settings()
    for cls in (durable_agents.Chain, durable_agents.Guarded, durable_agents.Slow):
        AGENTS[cls.name] = cls
    tools = ToolRegistry([*builtin_tools([str(settings.server.data_path)]), durable_agents.slow])
    factory = llamacpp_engine if engine == "model" else fake
    asyncio.run(
        serve(
            settings,
            engine_factory=factory,
            tools=tools,
            on_ready=lambda server, _: print(f"READY {bound_port(server)}", flush=True),
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
