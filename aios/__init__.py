"""aios: an operating system for LLM agents.

Agents make system calls; the kernel queues, schedules, batches and meters them onto shared
resources (LLM cores first). Importing this package loads nothing heavy: llama.cpp is imported
only when an embedded core starts.
"""

__version__ = "0.1.0"
