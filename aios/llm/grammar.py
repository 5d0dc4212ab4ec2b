"""JSON output grammars (GBNF) for constrained decoding on the embedded core.

:func:`check_schema` (pure, no llama.cpp: the SDK runs it on every host) refuses schemas no
core could use. :func:`json_grammar` compiles one with llama.cpp's converter when an embedded
core accepts the call (``LLMCore.submit``), so a schema the converter cannot handle is the
caller's :class:`~aios.errors.InvalidRequest`, never a failed engine step; remote cores send
the schema to their server instead. Cached: agents send the same few schemas (their tools)
over and over.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from aios.errors import ConfigError, InvalidRequest

# The converter writes a bounded repetition out in full (maxLength 10**7: an 80 MB grammar,
# built on the event loop), and no answer is longer than a sequence (2048 tokens by default),
# so larger bounds are refused before anything is built.
MAX_REPEAT = 8192
_BOUNDS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
           "minContains", "maxContains")  # fmt: skip
MAX_GRAMMAR_BYTES = 1 << 20


@functools.lru_cache(maxsize=128)
def json_grammar(schema: str | None) -> str:
    """GBNF for any JSON object (``schema=None``) or for JSON matching ``schema``."""
    try:
        from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf
    except ImportError:
        raise ConfigError(
            "JSON output on an embedded core needs llama-cpp-python: pip install 'aios[embedded]'"
        ) from None
    if schema is None:
        return str(JSON_GBNF)
    try:
        check_schema(json.loads(schema))
    except ValueError:
        raise InvalidRequest("json_schema is not valid JSON") from None
    try:
        grammar = str(json_schema_to_gbnf(schema))
    except RecursionError:
        raise InvalidRequest("json_schema is nested too deeply") from None
    except Exception as e:  # the converter raises plain Exceptions for unsupported schemas
        raise InvalidRequest(f"unsupported JSON schema: {type(e).__name__}: {e}") from None
    if len(grammar) > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(
            f"json_schema compiles to a {len(grammar)}-byte grammar (at most {MAX_GRAMMAR_BYTES})"
        )
    return grammar


def check_schema(node: Any, depth: int = 0) -> None:
    """Refuse a schema nested too deeply or with repetition bounds no answer could use (see
    ``MAX_REPEAT``)."""
    if depth > 64:
        raise InvalidRequest("json_schema is nested more than 64 levels deep")
    if isinstance(node, dict):
        for key in _BOUNDS:
            value = node.get(key)
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and value > MAX_REPEAT
            ):
                raise InvalidRequest(f"json_schema {key} must be <= {MAX_REPEAT}, got {value}")
        children: Any = node.values()
    elif isinstance(node, list):
        children = node
    else:
        return
    for child in children:
        check_schema(child, depth + 1)
