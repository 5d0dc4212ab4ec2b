"""The memory manager's durable side: notes (text + metadata, full-text searchable) and the
conversation history of each agent, as SQL on a :class:`~aios.storage.db.Conn`. Every
function is scoped by ``owner``: there is no query that reaches another agent's memory."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aios.errors import InvalidRequest, NotFound
from aios.storage.db import Conn
from aios.storage.paths import check_text as valid_text
from aios.storage.text import fts5_match, terms, tsquery

MAX_NOTE_BYTES = 256 << 10
_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Note:
    id: int
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0

    @property
    def size(self) -> int:
        """Bytes it takes resident (text, metadata and bookkeeping)."""
        return len(self.text.encode()) + len(json.dumps(self.metadata)) + 96

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Turn:
    n: int  # its index in the agent's history (0 is the first turn)
    role: str
    content: str
    at: float

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


_NOTE = "id, text, metadata, created, updated"


def _note(row: tuple[Any, ...]) -> Note:
    meta = row[2] if isinstance(row[2], dict) else json.loads(row[2])
    return Note(int(row[0]), row[1], meta, row[3], row[4])


def check_text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("a note's text must be a non-empty string")
    valid_text(text, "a note's text")
    if len(text.encode()) > MAX_NOTE_BYTES:
        raise InvalidRequest(f"a note's text may hold at most {MAX_NOTE_BYTES} bytes")
    return text


def check_metadata(metadata: Any) -> dict[str, Scalar]:
    """Metadata is a flat object of simple values (what filters compare against)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InvalidRequest("metadata must be an object of simple values")
    for key, value in metadata.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise InvalidRequest(f"metadata key {key!r} must be 1-64 of [A-Za-z0-9_.-]")
        if not isinstance(value, str | int | float | bool) and value is not None:
            raise InvalidRequest(
                f"metadata value of {key!r} must be a string, number, boolean or null"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest(f"metadata value of {key!r} must be a finite number")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 2**53:
            raise InvalidRequest(f"metadata value of {key!r} is too large (|n| <= 2**53)")
        if isinstance(value, str):
            valid_text(value, f"metadata value of {key!r}")
    if len(json.dumps(metadata)) > 16 << 10:
        raise InvalidRequest("metadata may hold at most 16 KiB")
    return dict(metadata)


def _filters(conn: Conn, where: dict[str, Scalar] | None) -> tuple[str, list[Any]]:
    """SQL (``AND ...``) keeping notes whose metadata has each key equal to its value."""
    where = check_metadata(where)
    if not where:
        return "", []
    if conn.dialect == "postgres":
        return " AND n.metadata @> ?::jsonb", [json.dumps(where)]
    sql, params = "", []
    for key, value in where.items():
        if value is None:
            sql += f" AND json_type(n.metadata, '$.\"{key}\"') = 'null'"
            continue
        sql += f" AND json_extract(n.metadata, '$.\"{key}\"') = ?"
        # json_extract gives booleans as 0/1; a string '1' must not match the number 1
        sql += f" AND json_type(n.metadata, '$.\"{key}\"') IN ({_json_types(value)})"
        params.append(value)
    return sql, params


def _json_types(value: Scalar) -> str:
    if isinstance(value, bool):
        return "'true', 'false'"
    if isinstance(value, int | float):
        return "'integer', 'real'"
    return "'text'"


class Notes:
    def __init__(self, clock: Any = time.time) -> None:
        self.clock = clock

    def add(self, conn: Conn, owner: str, text: str, metadata: dict[str, Scalar]) -> Note:
        now = self.clock()
        row = conn.one(
            "INSERT INTO notes (owner, text, metadata, created, updated) VALUES (?, ?, ?, ?, ?) "
            f"RETURNING {_NOTE}",
            (owner, text, json.dumps(metadata, allow_nan=False), now, now),
        )
        assert row is not None
        return _note(row)

    def get(self, conn: Conn, owner: str, note_id: int) -> Note:
        row = conn.one(f"SELECT {_NOTE} FROM notes WHERE owner = ? AND id = ?", (owner, note_id))
        if row is None:
            raise NotFound(f"no note {note_id}")
        return _note(row)

    def update(
        self,
        conn: Conn,
        owner: str,
        note_id: int,
        text: str | None,
        metadata: dict[str, Scalar] | None,
    ) -> Note:
        with conn.transaction():
            old = self.get(conn, owner, note_id)
            row = conn.one(
                "UPDATE notes SET text = ?, metadata = ?, updated = ? WHERE owner = ? AND id = ? "
                f"RETURNING {_NOTE}",
                (
                    old.text if text is None else text,
                    json.dumps(old.metadata if metadata is None else metadata, allow_nan=False),
                    self.clock(),
                    owner,
                    note_id,
                ),
            )
            assert row is not None
            return _note(row)

    def delete(self, conn: Conn, owner: str, note_id: int) -> None:
        if not conn.run("DELETE FROM notes WHERE owner = ? AND id = ?", (owner, note_id)):
            raise NotFound(f"no note {note_id}")

    def list_notes(
        self, conn: Conn, owner: str, where: dict[str, Scalar] | None, limit: int
    ) -> list[Note]:
        """Newest first."""
        sql, params = _filters(conn, where)
        rows = conn.all(
            f"SELECT {_NOTE.replace('id', 'n.id', 1)} FROM notes n WHERE n.owner = ?{sql} "
            "ORDER BY n.id DESC LIMIT ?",
            (owner, *params, limit),
        )
        return [_note(r) for r in rows]

    def search(
        self,
        conn: Conn,
        owner: str,
        query: str,
        where: dict[str, Scalar] | None,
        limit: int,
    ) -> list[tuple[Note, float]]:
        """Notes matching any word of ``query``, best first, with their scores."""
        words = terms(query)
        sql, params = _filters(conn, where)
        cols = "n.id, n.text, n.metadata, n.created, n.updated"
        if conn.dialect == "sqlite":
            rows = conn.all(
                f"SELECT {cols}, -bm25(notes_text) FROM notes_text "
                "JOIN notes n ON n.id = notes_text.rowid "
                f"WHERE notes_text MATCH ? AND n.owner = ?{sql} "
                "ORDER BY bm25(notes_text) LIMIT ?",
                (fts5_match(words), owner, *params, limit),
            )
        else:
            rows = conn.all(
                f"SELECT {cols}, ts_rank_cd(n.body, q) AS score FROM notes n, "
                f"to_tsquery('english', ?) q WHERE n.body @@ q AND n.owner = ?{sql} "
                "ORDER BY score DESC, n.id DESC LIMIT ?",
                (tsquery(words), owner, *params, limit),
            )
        return [(_note(r), float(r[5])) for r in rows]

    def count(self, conn: Conn, owner: str) -> int:
        return int(conn.scalar("SELECT COUNT(*) FROM notes WHERE owner = ?", (owner,)))

    # -- conversation history ---------------------------------------------------------------
    def append(self, conn: Conn, owner: str, turns: list[tuple[str, str]]) -> list[Turn]:
        """Append turns (role, content) at the end of the agent's history."""
        with conn.transaction():
            conn.lock(f"history:{owner}")
            n = int(
                conn.scalar("SELECT COALESCE(MAX(n) + 1, 0) FROM history WHERE owner = ?", (owner,))
            )
            now = self.clock()
            added = []
            for i, (role, content) in enumerate(turns):
                conn.run(
                    "INSERT INTO history (owner, n, role, content, at) VALUES (?, ?, ?, ?, ?)",
                    (owner, n + i, role, content, now),
                )
                added.append(Turn(n + i, role, content, now))
            return added

    def turns(self, conn: Conn, owner: str, start: int, end: int) -> list[Turn]:
        """Turns ``start <= n < end``, oldest first."""
        rows = conn.all(
            "SELECT n, role, content, at FROM history WHERE owner = ? AND n >= ? AND n < ? "
            "ORDER BY n",
            (owner, start, end),
        )
        return [Turn(int(r[0]), r[1], r[2], r[3]) for r in rows]

    def length(self, conn: Conn, owner: str) -> int:
        return int(
            conn.scalar("SELECT COALESCE(MAX(n) + 1, 0) FROM history WHERE owner = ?", (owner,))
        )

    def clear(self, conn: Conn, owner: str) -> int:
        return conn.run("DELETE FROM history WHERE owner = ?", (owner,))
