"""The agent SDK: write an agent once, run it in-process or (later) over HTTP."""

from aios.sdk.agent import Agent
from aios.sdk.llm import LLM, SyscallClient

__all__ = ["LLM", "Agent", "SyscallClient"]
