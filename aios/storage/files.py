"""The storage manager's file operations: a versioned, access-checked file tree per agent.

Every function takes a :class:`~aios.storage.db.Conn` and runs in one transaction: it checks,
then changes everything or nothing. Content lives in content-addressed blobs (SHA-256,
stored once however many versions or agents hold it); every change of a file appends a
version (a deletion is a version without content), so history survives deletes and moves,
and a rollback is itself a new version.

Another agent's files are reachable only through a share (of a file or folder, to an agent or
a group, read-only or read-write). Without one, they answer exactly like files that do not
exist: an agent cannot even learn that they are there.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from aios.config import StorageConfig
from aios.errors import Conflict, InvalidRequest, NotFound, PermissionDenied, StorageFull
from aios.identity import check_name
from aios.storage.db import Conn
from aios.storage.paths import ancestors, like_prefix, normalize, parent, rebase, under
from aios.storage.text import fts5_match, terms, tsquery

Mode = Literal["r", "rw"]
WriteMode = Literal["overwrite", "create", "append"]
INDEX_BYTES = 1 << 20  # text files up to this size are indexed for search
INDEX_CHARS_POSTGRES = 200_000  # PostgreSQL indexes a prefix (a tsvector holds at most 1 MB)
MAX_INT = 2**63 - 1


@dataclass(frozen=True)
class Principal:
    """Who makes a call: an agent identity and its groups (from its credential)."""

    name: str
    groups: frozenset[str] = frozenset()

    @property
    def grantees(self) -> list[str]:
        return [f"agent:{self.name}", *(f"group:{g}" for g in sorted(self.groups))]


@dataclass(frozen=True)
class Stat:
    owner: str
    path: str
    kind: Literal["file", "dir"]
    size: int
    version: int | None
    hash: str | None
    created: float
    modified: float

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Version:
    id: int
    path: str
    size: int
    hash: str | None  # None: the file was deleted by this version
    op: str
    at: float
    author: str

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


@dataclass(frozen=True)
class Share:
    owner: str
    path: str
    grantee: str
    mode: Mode
    at: float

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


_STAT = "owner, path, kind, size, version, hash, created, modified"


def _stat(row: tuple[Any, ...]) -> Stat:
    return Stat(row[0], row[1], row[2], int(row[3]), row[4], row[5], row[6], row[7])


class Files:
    """The operations; ``limits`` is the quota of every agent, ``clock`` the wall clock of
    version timestamps (rollback by time uses it)."""

    def __init__(
        self, limits: StorageConfig | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        self.limits = limits or StorageConfig()
        self.clock = clock

    # -- access -----------------------------------------------------------------------------
    def _owner(self, who: Principal, owner: str | None) -> str:
        return who.name if owner is None else check_name(owner, "owner")

    def _allowed(self, conn: Conn, who: Principal, owner: str, path: str) -> Mode | None:
        """What ``who`` may do in ``owner``'s ``path``: everything in its own namespace,
        else the widest share on the path or a folder above it."""
        if owner == who.name:
            return "rw"
        places = [path, *ancestors(path)] if path else [""]
        grantees = who.grantees
        rows = conn.all(
            f"SELECT mode FROM shares WHERE owner = ? AND path IN ({_marks(places)}) "
            f"AND grantee IN ({_marks(grantees)})",
            (owner, *places, *grantees),
        )
        modes = {r[0] for r in rows}
        return "rw" if "rw" in modes else "r" if modes else None

    def _check(self, conn: Conn, who: Principal, owner: str, path: str, need: Mode) -> None:
        mode = self._allowed(conn, who, owner, path)
        if mode is None:  # the same answer as for a path that does not exist
            raise NotFound(f"no such file or folder: {_where(who, owner, path)}")
        if need == "rw" and mode != "rw":
            raise PermissionDenied(f"{_where(who, owner, path)} is shared with you read-only")

    def writable(self, conn: Conn, who: Principal, owner: str | None, path: str) -> None:
        """Raise as a write of ``who`` to ``owner``'s ``path`` would (NotFound or
        PermissionDenied) if its shares do not allow it."""
        self._check(conn, who, self._owner(who, owner), normalize(path), "rw")

    def _get(self, conn: Conn, owner: str, path: str) -> Stat | None:
        row = conn.one(f"SELECT {_STAT} FROM files WHERE owner = ? AND path = ?", (owner, path))
        return None if row is None else _stat(row)

    def _need(self, conn: Conn, who: Principal, owner: str, path: str) -> Stat:
        found = self._get(conn, owner, path)
        if found is None:
            raise NotFound(f"no such file or folder: {_where(who, owner, path)}")
        return found

    # -- reading ----------------------------------------------------------------------------
    def stat(self, conn: Conn, who: Principal, path: str, owner: str | None = None) -> Stat:
        owner, path = self._owner(who, owner), normalize(path)
        self._check(conn, who, owner, path, "r")
        if not path:
            return Stat(owner, "", "dir", 0, None, None, 0.0, 0.0)
        return self._need(conn, who, owner, path)

    def read(
        self,
        conn: Conn,
        who: Principal,
        path: str,
        owner: str | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        """A file's ``content`` (now, or at ``version``) and its ``stat``."""
        owner, path = self._owner(who, owner), normalize(path)
        self._check(conn, who, owner, path, "r")
        if version is not None:
            row = conn.one(
                "SELECT v.hash, b.data, v.size, v.at FROM versions v "
                "LEFT JOIN blobs b ON b.hash = v.hash WHERE v.id = ? AND v.owner = ? "
                "AND v.path = ?",
                (_int(version, "version"), owner, path),
            )
            if row is None:
                raise NotFound(f"{_where(who, owner, path)} has no version {version}")
            if row[0] is None:
                raise NotFound(f"version {version} of {_where(who, owner, path)} is a deletion")
            stat = Stat(owner, path, "file", row[2], version, row[0], row[3], row[3])
            return {"content": bytes(row[1]), "stat": stat}
        found = self._need(conn, who, owner, path)
        if found.kind != "file":
            raise Conflict(f"{_where(who, owner, path)} is a folder; list it instead")
        data = conn.scalar("SELECT data FROM blobs WHERE hash = ?", (found.hash,))
        return {"content": bytes(data), "stat": found}

    def ls(
        self,
        conn: Conn,
        who: Principal,
        path: str = "",
        owner: str | None = None,
        recursive: bool = False,
    ) -> list[Stat]:
        """A folder's entries (every entry below it when ``recursive``), by path."""
        owner, path = self._owner(who, owner), normalize(path)
        self._check(conn, who, owner, path, "r")
        if path:
            found = self._need(conn, who, owner, path)
            if found.kind == "file":
                return [found]
        rows = conn.all(
            f"SELECT {_STAT} FROM files WHERE owner = ? AND path LIKE ? ESCAPE '\\' ORDER BY path",
            (owner, like_prefix(path)),
        )
        entries = [_stat(r) for r in rows]
        return entries if recursive else [e for e in entries if parent(e.path) == path]

    def history(
        self,
        conn: Conn,
        who: Principal,
        path: str,
        owner: str | None = None,
        limit: int = 100,
    ) -> list[Version]:
        """A file's versions, newest first (deleted files keep theirs)."""
        owner, path = self._owner(who, owner), normalize(path)
        self._check(conn, who, owner, path, "r")
        rows = conn.all(
            "SELECT id, path, size, hash, op, at, author FROM versions "
            "WHERE owner = ? AND path = ? ORDER BY id DESC LIMIT ?",
            (owner, path, _positive(limit, "limit")),
        )
        if not rows:
            raise NotFound(f"{_where(who, owner, path)} has no history")
        return [Version(*r) for r in rows]

    def search(
        self,
        conn: Conn,
        who: Principal,
        query: str,
        owner: str | None = None,
        folder: str = "",
        limit: int = 10,
    ) -> list[dict[str, Any]]:
        """Text files matching any word of ``query``, best first: ``{path, score, size}``."""
        owner, folder = self._owner(who, owner), normalize(folder)
        self._check(conn, who, owner, folder, "r")
        words, limit = terms(query), _positive(limit, "limit")
        fetch = limit if owner == who.name else limit * 10  # shares filter afterwards
        if conn.dialect == "sqlite":
            rows = conn.all(
                "SELECT f.path, f.size, -bm25(file_text) AS score FROM file_text "
                "JOIN files f ON f.rowid = file_text.rowid WHERE file_text MATCH ? "
                "AND f.owner = ? AND (? = '' OR f.path LIKE ? ESCAPE '\\') "
                "ORDER BY bm25(file_text) LIMIT ?",
                (fts5_match(words), owner, folder, like_prefix(folder), fetch),
            )
        else:
            rows = conn.all(
                "SELECT path, size, ts_rank_cd(body, q) AS score FROM files, "
                "to_tsquery('english', ?) q WHERE owner = ? AND body @@ q "
                "AND (? = '' OR path LIKE ? ESCAPE '\\') ORDER BY score DESC, path LIMIT ?",
                (tsquery(words), owner, folder, like_prefix(folder), fetch),
            )
        if owner != who.name:
            rows = [r for r in rows if self._allowed(conn, who, owner, r[0])]
        return [{"path": r[0], "size": r[1], "score": float(r[2])} for r in rows[:limit]]

    def usage(self, conn: Conn, who: Principal) -> dict[str, int]:
        row = conn.one("SELECT bytes, files FROM usage WHERE owner = ?", (who.name,))
        used_bytes, used_files = (row[0], row[1]) if row else (0, 0)
        return {
            "bytes": int(used_bytes),
            "files": int(used_files),
            "max_bytes": self.limits.max_bytes,
            "max_files": self.limits.max_files,
        }

    # -- writing ----------------------------------------------------------------------------
    def write(
        self,
        conn: Conn,
        who: Principal,
        path: str,
        content: bytes,
        owner: str | None = None,
        mode: WriteMode = "overwrite",
    ) -> Stat:
        """Create, overwrite or append to a file; its folders are created as needed."""
        owner, path = self._owner(who, owner), normalize(path)
        if not path:
            raise InvalidRequest("cannot write to the root folder; name a file")
        if not isinstance(content, bytes | bytearray):
            raise InvalidRequest(f"file content must be bytes, got {type(content).__name__}")
        data = bytes(content)
        if mode not in ("overwrite", "create", "append"):
            raise InvalidRequest(f"write mode must be overwrite, create or append, got {mode!r}")
        with conn.transaction():
            conn.lock(f"files:{owner}")  # one writer per namespace: quota checks hold
            self._check(conn, who, owner, path, "rw")
            found = self._get(conn, owner, path)
            if found is not None and found.kind == "dir":
                raise Conflict(f"{_where(who, owner, path)} is a folder")
            if found is not None and mode == "create":
                raise Conflict(f"{_where(who, owner, path)} already exists")
            if found is not None and mode == "append":
                old = conn.scalar("SELECT data FROM blobs WHERE hash = ?", (found.hash,))
                data = bytes(old) + data
            self._mkdirs(conn, who, owner, parent(path))
            return self._put(conn, who, owner, path, data, found, "write")

    def mkdir(self, conn: Conn, who: Principal, path: str, owner: str | None = None) -> Stat:
        """Create a folder (and the folders above it); an existing folder is fine."""
        owner, path = self._owner(who, owner), normalize(path)
        with conn.transaction():
            conn.lock(f"files:{owner}")  # one writer per namespace: quota checks hold
            self._check(conn, who, owner, path, "rw")
            self._mkdirs(conn, who, owner, path)
            return self.stat(conn, who, path, owner)

    def delete(
        self,
        conn: Conn,
        who: Principal,
        path: str,
        owner: str | None = None,
        recursive: bool = False,
    ) -> int:
        """Delete a file, or a folder (with what it holds when ``recursive``); the number of
        files deleted. Their history stays: a rollback brings a file back."""
        owner, path = self._owner(who, owner), normalize(path)
        if not path:
            raise InvalidRequest("cannot delete the root folder")
        with conn.transaction():
            conn.lock(f"files:{owner}")  # one writer per namespace: quota checks hold
            self._check(conn, who, owner, path, "rw")
            found = self._need(conn, who, owner, path)
            inside = self.ls(conn, Principal(owner), path, owner, recursive=True)
            if found.kind == "dir" and inside and not recursive:
                raise Conflict(f"{_where(who, owner, path)} is not empty (delete recursively)")
            entries = [*inside, found] if found.kind == "dir" else [found]
            for entry in entries:
                if entry.kind == "file":
                    self._record(conn, who, owner, entry.path, None, 0, "delete")
                    self._unindex(conn, owner, entry.path)
                conn.run("DELETE FROM files WHERE owner = ? AND path = ?", (owner, entry.path))
            files = [e for e in entries if e.kind == "file"]
            self._charge(conn, owner, -sum(e.size for e in files), -len(entries))
            return len(files)

    def move(
        self, conn: Conn, who: Principal, src: str, dst: str, owner: str | None = None
    ) -> Stat:
        """Rename a file or folder; the target must not exist. History follows the file: the
        new path starts with a ``move`` version, the old one ends with a deletion."""
        owner, src, dst = self._owner(who, owner), normalize(src), normalize(dst)
        if not src or not dst:
            raise InvalidRequest("cannot move the root folder, or onto it")
        if under(dst, src):
            raise InvalidRequest(f"cannot move {src!r} into itself ({dst!r})")
        with conn.transaction():
            conn.lock(f"files:{owner}")  # one writer per namespace: quota checks hold
            self._check(conn, who, owner, src, "rw")
            self._check(conn, who, owner, dst, "rw")
            found = self._need(conn, who, owner, src)
            if self._get(conn, owner, dst) is not None:
                raise Conflict(f"{_where(who, owner, dst)} already exists")
            self._mkdirs(conn, who, owner, parent(dst))
            inside = self.ls(conn, Principal(owner), src, owner, recursive=True)
            for entry in [found, *inside] if found.kind == "dir" else [found]:
                target = rebase(entry.path, src, dst)
                if entry.kind == "file":
                    self._record(conn, who, owner, entry.path, None, 0, "delete")
                    version = self._record(conn, who, owner, target, entry.hash, entry.size, "move")
                    conn.run(
                        "UPDATE files SET version = ? WHERE owner = ? AND path = ?",
                        (version, owner, entry.path),
                    )
                conn.run(
                    "UPDATE files SET path = ?, modified = ? WHERE owner = ? AND path = ?",
                    (target, self.clock(), owner, entry.path),
                )
            return self._need(conn, who, owner, dst)

    def rollback(
        self,
        conn: Conn,
        who: Principal,
        path: str,
        owner: str | None = None,
        version: int | None = None,
        at: float | None = None,
    ) -> Stat | None:
        """Make a file what it was at ``version`` (an id from its history) or at time ``at``
        (the newest version written then or before); the rollback is a new version. Rolling
        back to a deletion deletes the file (returns None)."""
        owner, path = self._owner(who, owner), normalize(path)
        if (version is None) == (at is None):
            raise InvalidRequest("give exactly one of 'version' or 'at' (a UNIX timestamp)")
        with conn.transaction():
            conn.lock(f"files:{owner}")  # one writer per namespace: quota checks hold
            self._check(conn, who, owner, path, "rw")
            if version is not None:
                row = conn.one(
                    "SELECT hash, size FROM versions WHERE id = ? AND owner = ? AND path = ?",
                    (_int(version, "version"), owner, path),
                )
                if row is None:
                    raise NotFound(f"{_where(who, owner, path)} has no version {version}")
            else:
                row = conn.one(
                    "SELECT hash, size FROM versions WHERE owner = ? AND path = ? AND at <= ? "
                    "ORDER BY id DESC LIMIT 1",
                    (owner, path, _number(at, "at")),
                )
                if row is None:
                    raise NotFound(f"{_where(who, owner, path)} did not exist at {at}")
            found = self._get(conn, owner, path)
            if found is not None and found.kind == "dir":
                raise Conflict(f"{_where(who, owner, path)} is a folder now")
            if row[0] is None:  # back to "deleted"
                if found is not None:
                    self.delete(conn, who, path, owner)
                return None
            data = conn.scalar("SELECT data FROM blobs WHERE hash = ?", (row[0],))
            self._mkdirs(conn, who, owner, parent(path))
            return self._put(conn, who, owner, path, bytes(data), found, "rollback")

    # -- sharing ----------------------------------------------------------------------------
    def share(self, conn: Conn, who: Principal, path: str, grantee: str, mode: Mode = "r") -> Share:
        """Share one of your files or folders with ``agent:NAME`` or ``group:NAME``."""
        path = normalize(path)
        grantee = _grantee(grantee)
        if mode not in ("r", "rw"):
            raise InvalidRequest(f"share mode must be 'r' or 'rw', got {mode!r}")
        if grantee == f"agent:{who.name}":
            raise InvalidRequest("you cannot share with yourself")
        with conn.transaction():
            if path:
                self._need(conn, who, who.name, path)
            now = self.clock()
            conn.run(
                "INSERT INTO shares (owner, path, grantee, mode, at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (owner, path, grantee) DO UPDATE SET mode = excluded.mode, "
                "at = excluded.at",
                (who.name, path, grantee, mode, now),
            )
            return Share(who.name, path, grantee, mode, now)

    def unshare(self, conn: Conn, who: Principal, path: str, grantee: str) -> bool:
        """Revoke a share; False if there was none."""
        changed = conn.run(
            "DELETE FROM shares WHERE owner = ? AND path = ? AND grantee = ?",
            (who.name, normalize(path), _grantee(grantee)),
        )
        return changed > 0

    def shares(self, conn: Conn, who: Principal) -> dict[str, list[Share]]:
        """The shares you gave and the ones given to you (or your groups)."""
        given = conn.all(
            "SELECT owner, path, grantee, mode, at FROM shares WHERE owner = ? "
            "ORDER BY path, grantee",
            (who.name,),
        )
        grantees = who.grantees
        received = conn.all(
            f"SELECT owner, path, grantee, mode, at FROM shares WHERE grantee IN "
            f"({_marks(grantees)}) ORDER BY owner, path",
            grantees,
        )
        return {"given": [Share(*r) for r in given], "received": [Share(*r) for r in received]}

    # -- internals --------------------------------------------------------------------------
    def _mkdirs(self, conn: Conn, who: Principal, owner: str, path: str) -> None:
        missing = []
        for place in [path, *ancestors(path)] if path else []:
            if not place:
                break
            found = self._get(conn, owner, place)
            if found is not None:
                if found.kind == "file":
                    raise Conflict(f"{_where(who, owner, place)} is a file, not a folder")
                break
            missing.append(place)
        if len(missing) and self._files(conn, owner) + len(missing) > self.limits.max_files:
            raise StorageFull(f"{owner} would pass its quota of {self.limits.max_files} files")
        now = self.clock()
        for place in reversed(missing):
            conn.run(
                "INSERT INTO files (owner, path, kind, version, hash, size, created, modified) "
                "VALUES (?, ?, 'dir', NULL, NULL, 0, ?, ?)",
                (owner, place, now, now),
            )
        self._charge(conn, owner, 0, len(missing))

    def _put(
        self,
        conn: Conn,
        who: Principal,
        owner: str,
        path: str,
        data: bytes,
        found: Stat | None,
        op: str,
    ) -> Stat:
        size = len(data)
        if size > self.limits.max_file_bytes:
            raise StorageFull(
                f"{size} bytes is more than the {self.limits.max_file_bytes} bytes a file may hold"
            )
        grow = size - (found.size if found else 0)
        new_files = 0 if found else 1
        used = conn.one("SELECT bytes, files FROM usage WHERE owner = ?", (owner,)) or (0, 0)
        if used[0] + grow > self.limits.max_bytes:
            raise StorageFull(
                f"{owner} uses {used[0]} of {self.limits.max_bytes} bytes; "
                f"this write needs {grow} more"
            )
        if used[1] + new_files > self.limits.max_files:
            raise StorageFull(f"{owner} would pass its quota of {self.limits.max_files} files")
        digest = hashlib.sha256(data).hexdigest()
        conn.run(
            "INSERT INTO blobs (hash, size, data) VALUES (?, ?, ?) ON CONFLICT (hash) DO NOTHING",
            (digest, size, data),
        )
        version = self._record(conn, who, owner, path, digest, size, op)
        now = self.clock()
        if found is None:
            conn.run(
                "INSERT INTO files (owner, path, kind, version, hash, size, created, modified) "
                "VALUES (?, ?, 'file', ?, ?, ?, ?, ?)",
                (owner, path, version, digest, size, now, now),
            )
        else:
            conn.run(
                "UPDATE files SET version = ?, hash = ?, size = ?, modified = ? "
                "WHERE owner = ? AND path = ?",
                (version, digest, size, now, owner, path),
            )
        self._charge(conn, owner, grow, new_files)
        self._index(conn, owner, path, data)
        return self._need(conn, who, owner, path)

    def _record(
        self,
        conn: Conn,
        who: Principal,
        owner: str,
        path: str,
        digest: str | None,
        size: int,
        op: str,
    ) -> int:
        row = conn.one(
            "INSERT INTO versions (owner, path, hash, size, op, at, author) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
            (owner, path, digest, size, op, self.clock(), who.name),
        )
        assert row is not None
        return int(row[0])

    def _files(self, conn: Conn, owner: str) -> int:
        return int(conn.scalar("SELECT files FROM usage WHERE owner = ?", (owner,)) or 0)

    def _charge(self, conn: Conn, owner: str, grow: int, files: int) -> None:
        conn.run(
            "INSERT INTO usage (owner, bytes, files) VALUES (?, ?, ?) ON CONFLICT (owner) "
            "DO UPDATE SET bytes = usage.bytes + excluded.bytes, "
            "files = usage.files + excluded.files",
            (owner, grow, files),
        )

    def _index(self, conn: Conn, owner: str, path: str, data: bytes) -> None:
        text = _text(data)
        if conn.dialect == "postgres":
            conn.run(
                "UPDATE files SET body = to_tsvector('english', ?) WHERE owner = ? AND path = ?",
                ((text or "")[:INDEX_CHARS_POSTGRES], owner, path),
            )
            return
        rowid = conn.scalar("SELECT rowid FROM files WHERE owner = ? AND path = ?", (owner, path))
        conn.run("DELETE FROM file_text WHERE rowid = ?", (rowid,))
        if text:
            conn.run("INSERT INTO file_text (rowid, body) VALUES (?, ?)", (rowid, text))

    def _unindex(self, conn: Conn, owner: str, path: str) -> None:
        if conn.dialect == "sqlite":
            conn.run(
                "DELETE FROM file_text WHERE rowid = "
                "(SELECT rowid FROM files WHERE owner = ? AND path = ?)",
                (owner, path),
            )


def _text(data: bytes) -> str | None:
    """The text of a file worth indexing (UTF-8, not too big), else None."""
    if len(data) > INDEX_BYTES:
        return None
    try:
        text = data.decode()
    except UnicodeDecodeError:
        return None
    return None if "\x00" in text else text  # NUL: binary, whatever else it decodes to


def _marks(values: list[str]) -> str:
    return ", ".join("?" for _ in values)


def _where(who: Principal, owner: str, path: str) -> str:
    shown = path or "/"
    return repr(shown) if owner == who.name else f"{owner}:{shown!r}"


def _grantee(grantee: str) -> str:
    kind, _, name = str(grantee).partition(":")
    if kind not in ("agent", "group") or not name:
        raise InvalidRequest(f"a grantee is 'agent:NAME' or 'group:NAME', got {grantee!r}")
    return f"{kind}:{check_name(name, f'{kind} name')}"


def _int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -MAX_INT <= value <= MAX_INT:
        raise InvalidRequest(f"{name} must be a 64-bit integer, got {value!r}")
    return value


def _positive(value: Any, name: str) -> int:
    if _int(value, name) < 1 or value > 10_000:
        raise InvalidRequest(f"{name} must be in [1, 10000], got {value!r}")
    return int(value)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"{name} must be a finite number, got {value!r}")
    return float(value)
