"""A real MCP server (the official SDK's FastMCP) for the tests: python tests/mcp_demo_server.py."""

from __future__ import annotations

from mcp.server.fastmcp import FastMCP
from mcp.types import ToolAnnotations


def main() -> None:
    server = FastMCP("demo")

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True))
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @server.tool()
    def shout(text: str) -> str:
        """Upper-case a text."""
        if text == "fail":
            raise ValueError("asked to fail")
        return text.upper()

    @server.tool(annotations=ToolAnnotations(destructiveHint=True))
    def erase(what: str) -> str:
        """Erase something (destructive)."""
        return f"erased {what}"

    server.run("stdio")


if __name__ == "__main__":
    main()
