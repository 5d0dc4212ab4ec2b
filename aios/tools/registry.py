"""The tool registry: every tool the kernel can run, by name (built-ins, Python entry points
in the ``aios.tools`` group, MCP servers' tools), rendered for the LLM in the OpenAI format."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from aios.errors import ConfigError, NotFound
from aios.tools.spec import ToolSpec

ENTRY_POINTS = "aios.tools"


class ToolRegistry:
    def __init__(self, tools: Iterable[ToolSpec] = ()) -> None:
        self._tools: dict[str, ToolSpec] = {}
        for spec in tools:
            self.register(spec)

    def register(self, spec: ToolSpec) -> ToolSpec:
        if not isinstance(spec, ToolSpec):
            raise ConfigError(f"not a tool (use @tool): {spec!r}")
        if spec.name in self._tools:
            raise ConfigError(f"a tool named {spec.name!r} is already registered")
        self._tools[spec.name] = spec
        return spec

    def unregister(self, name: str) -> None:
        self._tools.pop(name, None)

    def get(self, name: str) -> ToolSpec:
        spec = self._tools.get(name) if isinstance(name, str) else None
        if spec is None:
            raise NotFound(f"no tool named {name!r}; tools: {', '.join(sorted(self._tools))}")
        return spec

    def __iter__(self) -> Iterator[ToolSpec]:
        return iter(sorted(self._tools.values(), key=lambda s: s.name))

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def openai(self, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Tools in the OpenAI ``tools`` format (all, or the ones named)."""
        chosen = list(self) if names is None else [self.get(n) for n in names]
        return [spec.openai() for spec in chosen]

    def load_entry_points(self, group: str = ENTRY_POINTS) -> list[str]:
        """Register the tools that installed packages declare (each entry point names a
        ToolSpec, or a list of them); the names registered."""
        from importlib.metadata import entry_points

        added = []
        for point in entry_points(group=group):
            try:
                loaded = point.load()
            except Exception as e:
                raise ConfigError(f"tool entry point {point.name!r} failed to load: {e}") from e
            for spec in loaded if isinstance(loaded, list | tuple) else [loaded]:
                added.append(self.register(spec).name)
        return added
