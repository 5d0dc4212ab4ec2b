"""Virtual paths of an agent's file namespace: one normal form, and nothing that escapes it.

A path is relative to the agent's root and written with ``/``: ``notes/today.md``. The root
itself is ``""`` (given as ``""``, ``"."`` or ``"/"``). Normalizing drops empty and ``.``
components (``a//b/./c`` is ``a/b/c``); everything that could mean "somewhere else" is an
error, not something to repair: ``..``, a leading ``/`` (an absolute path), ``\\``, every
control or format character (Unicode categories Cc, Cf, Zl, Zp and Cs: NUL and the other C0
and C1 controls, DEL, zero-width and bidirectional marks such as U+200B, U+202E and U+FEFF,
the soft hyphen, the line and paragraph separators, lone surrogates), over-long names and
paths.
"""

from __future__ import annotations

import unicodedata

from aios.errors import InvalidRequest

# What no name may contain: controls (Cc), format characters such as zero-width and
# bidirectional marks (Cf), line and paragraph separators (Zl, Zp) and surrogates (Cs).
FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
# Controls and surrogates have no character name; Unicode's data labels them like this.
_UNNAMED = {"Cc": "<control>", "Cs": "<surrogate>"}

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
    check_characters(path)
    if path.startswith("/"):
        raise InvalidRequest(
            f"absolute paths are not allowed ({path!r}); paths are relative to your root"
        )
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


def forbidden(char: str) -> bool:
    """``char`` is a control or format character: no path may contain it."""
    return unicodedata.category(char) in FORBIDDEN_CATEGORIES


def describe(char: str) -> str:
    """The code point and its name: ``U+202E (RIGHT-TO-LEFT OVERRIDE)``."""
    category = unicodedata.category(char)
    name = unicodedata.name(char, "") or _UNNAMED.get(category, category)
    return f"U+{ord(char):04X} ({name})"


def check_characters(path: str) -> None:
    """InvalidRequest naming the first control or format character in ``path``, if any (a
    lone surrogate, the only thing a ``str`` holds that UTF-8 cannot encode, included)."""
    bad = next((c for c in path if forbidden(c)), None)
    if bad is None:
        return
    if unicodedata.category(bad) == "Cs":
        kind = "a lone surrogate (not valid Unicode)"
    else:
        kind = "a control or format character"
    raise InvalidRequest(f"path {path!r} contains {describe(bad)}, {kind}")


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
