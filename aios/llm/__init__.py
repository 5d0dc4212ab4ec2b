"""LLM cores: engines that run batched generation, and the core that schedules onto them."""
