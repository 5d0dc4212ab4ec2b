"""Full-text queries, the same on both backends: a query's words, any of which may match,
ranked by BM25 (SQLite FTS5, Porter stemming) or by cover density (PostgreSQL, English
stemming). A query is words, never query syntax: nothing in it is interpreted."""

from __future__ import annotations

import re

from aios.errors import InvalidRequest

MAX_TERMS = 32
_WORD = re.compile(r"\w+")


def terms(query: str) -> list[str]:
    """The distinct words of ``query`` (at most ``MAX_TERMS``), lower-cased."""
    if not isinstance(query, str):
        raise InvalidRequest(f"a search query must be a string, got {type(query).__name__}")
    found = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))
    if not found:
        raise InvalidRequest(f"the search query {query!r} has no words")
    return found[:MAX_TERMS]


def fts5_match(words: list[str]) -> str:
    """An FTS5 MATCH expression: any of the words (each quoted, so never syntax)."""
    return " OR ".join('"' + w.replace('"', '""') + '"' for w in words)


def tsquery(words: list[str]) -> str:
    """A ``to_tsquery`` argument: any of the words (``\\w+`` holds no tsquery operator)."""
    return " | ".join(words)
