"""A SIMULATED LLM core: a deterministic cost model in place of a model.

For unit tests and scale experiments beyond this machine. It is never a default: nothing in
aios builds it unless asked (``Kernel(config, engine_factory=lambda cfg: SimulatedEngine(cfg,
CostModel.calibrated()))``), its ``description`` says "simulated", and every figure made with
it must say so too.

- :mod:`aios.llm.sim.cost`: :class:`CostModel`, what a step of the simulated hardware costs
  (calibrated on the reference machine), and its JSON form.
- :mod:`aios.llm.sim.tokens`: the toy tokenizer and the deterministic choice of generated
  tokens (the same history gives the same continuation).
- :mod:`aios.llm.sim.kv`: the unified KV pool and :class:`OutOfMemory`.
- :mod:`aios.llm.sim.engine`: :class:`SimulatedEngine`, an :class:`~aios.llm.engine.Engine`
  for the kernel's core on the cost model, and :class:`SimStats`.

The no-kernel baseline of bench/scale.py (a naive server on the same simulated hardware, with
no admission control) is ``SimulatedServer`` in bench/naive_server.py, built on these parts.
"""

from aios.llm.sim.cost import CALIBRATION_SOURCE, CostModel
from aios.llm.sim.engine import SimStats, SimulatedEngine
from aios.llm.sim.kv import KVPool, OutOfMemory
from aios.llm.sim.tokens import EOG, SeqState, check_reply_tokens, tokenize, tokenize_chat

__all__ = [
    "CALIBRATION_SOURCE",
    "EOG",
    "CostModel",
    "KVPool",
    "OutOfMemory",
    "SeqState",
    "SimStats",
    "SimulatedEngine",
    "check_reply_tokens",
    "tokenize",
    "tokenize_chat",
]
