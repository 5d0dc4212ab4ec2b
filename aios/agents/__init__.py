"""Example agents: small, real agents that make several dependent LLM calls each.

Their prompts are written for a 135M-parameter chat model: one short instruction per call,
short outputs, every step fed by the previous step's answer.
"""

from __future__ import annotations

from aios.agents.examples import Planner, Quiz, Writer
from aios.agents.react import FileAgent, MathAgent
from aios.errors import ConfigError
from aios.sdk import Agent

AGENTS: dict[str, type[Agent]] = {a.name: a for a in (Planner, Writer, Quiz, MathAgent, FileAgent)}

MIXED: tuple[type[Agent], ...] = (Planner, Writer, Quiz)  # what `aios run` mixes by default

__all__ = [
    "AGENTS", "MIXED", "FileAgent", "MathAgent", "Planner", "Quiz", "Writer", "get_agent",
    "tasks_for",
]  # fmt: skip


def get_agent(name: str) -> type[Agent]:
    try:
        return AGENTS[name]
    except KeyError:
        raise ConfigError(f"unknown agent {name!r}; choose one of {', '.join(AGENTS)}") from None


def tasks_for(agent: type[Agent], n: int) -> list[str]:
    """``n`` sample tasks for an agent kind, cycling through its built-in list."""
    tasks: tuple[str, ...] = getattr(agent, "tasks", ("Say hello.",))
    return [tasks[i % len(tasks)] for i in range(n)]
