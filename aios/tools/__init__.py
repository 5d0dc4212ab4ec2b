"""Tools: a registry of typed tools, the manager that runs them (validation, per-tool
concurrency limits, timeouts), and the built-in tools."""
