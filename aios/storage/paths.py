"""Virtual paths of an agent's file namespace: one normal form, and nothing that escapes it.

A path is relative to the agent's root and written with ``/``: ``notes/today.md``. The root
itself is ``""`` (given as ``""``, ``"."`` or ``"/"``). Normalizing drops empty and ``.``
components (``a//b/./c`` is ``a/b/c``); everything that could mean "somewhere else" is an
error, not something to repair: ``..``, a leading ``/`` (an absolute path), ``\\``, NUL and
other control characters, over-long names and paths.
"""

from __future__ import annotations

from aios.errors import InvalidRequest

MAX_NAME_BYTES = 255
MAX_PATH_BYTES = 1024
MAX_DEPTH = 32


def normalize(path: str) -> str:
    """The normal form of ``path`` (``""`` is the root); :class:`InvalidRequest` if it is not
    a path inside the namespace."""
    if not isinstance(path, str):
        raise InvalidRequest(f"a path must be a string, got {type(path).__name__}")
    if path in ("", ".", "/"):
        return ""
    check_text(path, "a path")
    if path.startswith("/"):
        raise InvalidRequest(
            f"absolute paths are not allowed ({path!r}); paths are relative to your root"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise InvalidRequest(f"path {path!r} contains a NUL or control character")
    if "\\" in path:
        raise InvalidRequest(f"path {path!r} contains '\\'; the separator is '/'")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidRequest(f"path {path!r} contains '..'; nothing may leave your namespace")
    for part in parts:
        if len(part.encode()) > MAX_NAME_BYTES:
            raise InvalidRequest(f"a path component is longer than {MAX_NAME_BYTES} bytes")
    if len(parts) > MAX_DEPTH:
        raise InvalidRequest(f"path {path!r} is deeper than {MAX_DEPTH} levels")
    normal = "/".join(parts)
    if len(normal.encode()) > MAX_PATH_BYTES:
        raise InvalidRequest(f"path is longer than {MAX_PATH_BYTES} bytes")
    return normal


def parent(path: str) -> str:
    """The folder holding ``path`` (``""`` for a top-level name)."""
    return path.rpartition("/")[0]


def ancestors(path: str) -> list[str]:
    """Every folder above ``path``, nearest first, ending with the root ``""``."""
    found = []
    while path:
        path = parent(path)
        found.append(path)
    return found


def under(path: str, folder: str) -> bool:
    """``path`` is ``folder`` or inside it."""
    return not folder or path == folder or path.startswith(folder + "/")


def rebase(path: str, old: str, new: str) -> str:
    """``path`` (inside ``old``) moved to ``new``."""
    return new + path[len(old) :] if old else f"{new}/{path}" if new else path


def like_prefix(folder: str) -> str:
    """A SQL LIKE pattern (with ``\\`` as ESCAPE) for the paths strictly inside ``folder``."""
    escaped = folder.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"{escaped}/%" if folder else "%"


def check_text(text: str, what: str) -> str:
    """``text`` if it can be stored (valid Unicode, no NUL), else InvalidRequest."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidRequest(f"{what} is not valid Unicode (a lone surrogate)") from None
    if "\x00" in text:
        raise InvalidRequest(f"{what} contains a NUL character")
    return text
