"""JSON output grammars (GBNF) for constrained decoding on the embedded core.

Compiled from a JSON Schema with llama.cpp's converter when a call is made, so a schema the
converter cannot handle is the caller's :class:`~aios.errors.InvalidRequest`, never a failed
engine step. Cached: agents send the same few schemas (their tools) over and over.
"""

from __future__ import annotations

import functools

from aios.errors import InvalidRequest


@functools.lru_cache(maxsize=128)
def json_grammar(schema: str | None) -> str:
    """GBNF for any JSON object (``schema=None``) or for JSON matching ``schema``."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    if schema is None:
        return str(JSON_GBNF)
    try:
        return str(json_schema_to_gbnf(schema))
    except Exception as e:  # the converter raises plain Exceptions for unsupported schemas
        raise InvalidRequest(f"unsupported JSON schema: {type(e).__name__}: {e}") from None
