"""Property tests (hypothesis): path normalization, the jail of every agent's namespace;
folder arithmetic (ancestors, under, rebase) and the LIKE pattern of a folder; and version
history, a random sequence of writes, appends, deletes and rollbacks on SQLite checked against
a plain Python model."""

from __future__ import annotations

import itertools
import sqlite3
import string
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aios.config import StorageConfig
from aios.errors import InvalidRequest, NotFound
from aios.storage.db import Conn, Database
from aios.storage.files import Files, Principal, WriteMode
from aios.storage.paths import (
    MAX_DEPTH,
    MAX_NAME_BYTES,
    MAX_PATH_BYTES,
    ancestors,
    like_prefix,
    normalize,
    parent,
    rebase,
    under,
)

FORBIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs"}  # what no path may contain, by Unicode category
NAME_CHARS = string.ascii_lowercase + string.digits + "._-%~ é"
NAME = st.text(alphabet=NAME_CHARS, min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
NORMAL = st.lists(NAME, max_size=5).map("/".join)  # already normal paths ("" is the root)
PIECES = st.sampled_from(["a", "b", "é", ".", "..", "...", "", "/", "//", "\\", "\x00", "\x1f",
                          "\x7f", "%", "_", " ", "a.", ".a", "\n", "😀"])  # fmt: skip
ANY_PATH = st.one_of(st.lists(PIECES, max_size=25).map("".join), st.text(max_size=40))


def components(path: str) -> list[str]:
    return path.split("/") if path else []


# -- normalize -------------------------------------------------------------------------------
@settings(max_examples=300)
@given(ANY_PATH)
def test_normalize_is_idempotent_and_its_output_is_normal(path: str) -> None:
    try:
        normal = normalize(path)
    except InvalidRequest:
        return
    assert normalize(normal) == normal
    assert not normal.startswith("/") and not normal.endswith("/")
    assert "//" not in normal and not normal.startswith("./") and "/./" not in normal
    assert all(part not in ("", ".", "..") for part in components(normal))
    assert not any(unicodedata.category(c) in FORBIDDEN or c == "\\" for c in normal)
    assert len(normal.encode()) <= MAX_PATH_BYTES and len(components(normal)) <= MAX_DEPTH
    # the same names in the same order: normalizing only drops "" and "." components
    assert components(normal) == [p for p in path.split("/") if p not in ("", ".")]


@settings(max_examples=150)
@given(
    before=st.lists(st.one_of(NAME, st.sampled_from([".", ""])), max_size=4),
    after=st.lists(st.one_of(NAME, st.sampled_from([".", "", ".."])), max_size=4),
    lead=st.sampled_from(["", "./", "/"]),
    tail=st.sampled_from(["", "/", "/."]),
)
def test_any_dotdot_component_is_refused(
    before: list[str], after: list[str], lead: str, tail: str
) -> None:
    path = lead + "/".join([*before, "..", *after]) + tail
    with pytest.raises(InvalidRequest):
        normalize(path)


@pytest.mark.parametrize(
    "path",
    [
        "..", "../", "./..", "a/..", "a/../b", "a/../../b", "../../etc/passwd", "/etc/passwd",
        "//etc", "/a", "a\\b", "..\\a", "a\x00", "\x00", "a\nb", "a\x1f", "a\x7f", "\t",
        "x" * (MAX_NAME_BYTES + 1), "é" * 128, "/".join(["d"] * (MAX_DEPTH + 1)),
        "/".join(["n" * 200] * 6), 5, None, b"a", ["a"],
    ],
)  # fmt: skip
def test_paths_outside_the_namespace_are_refused(path: object) -> None:
    with pytest.raises(InvalidRequest):
        normalize(path)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("", ""), (".", ""), ("/", ""), ("./", ""), ("a", "a"), ("a/", "a"), ("./a", "a"),
        ("a//b", "a/b"), ("a/./b/.", "a/b"), ("...", "..."), ("a../b", "a../b"), (".a", ".a"),
        ("x" * MAX_NAME_BYTES, "x" * MAX_NAME_BYTES), ("d/" * MAX_DEPTH, "/".join("d" * MAX_DEPTH)),
    ],
)  # fmt: skip
def test_normal_forms(path: str, normal: str) -> None:
    assert normalize(path) == normal


@pytest.mark.parametrize(
    ("char", "name"),
    [
        ("\x00", "<control>"), ("\x1f", "<control>"), ("\x7f", "<control>"),
        ("\x85", "<control>"), ("\x9f", "<control>"), ("\xad", "SOFT HYPHEN"),
        ("\u200b", "ZERO WIDTH SPACE"), ("\u200d", "ZERO WIDTH JOINER"),
        ("\u200e", "LEFT-TO-RIGHT MARK"), ("\u202e", "RIGHT-TO-LEFT OVERRIDE"),
        ("\u2066", "LEFT-TO-RIGHT ISOLATE"), ("\ufeff", "ZERO WIDTH NO-BREAK SPACE"),
        ("\u2028", "LINE SEPARATOR"), ("\u2029", "PARAGRAPH SEPARATOR"),
        ("\U000e0001", "LANGUAGE TAG"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("where", ["{}", "a{}b", "dir/{}.txt", "{}/file", "ok/ok/x{}"])
def test_control_and_format_characters_are_refused_by_code_point(
    char: str, name: str, where: str
) -> None:
    """Every character of categories Cc, Cf, Zl and Zp, in any component: the error names the
    code point, and the message itself carries no raw control or bidirectional character."""
    assert unicodedata.category(char) in FORBIDDEN
    with pytest.raises(InvalidRequest) as caught:
        normalize(where.format(char))
    message = str(caught.value)
    assert f"U+{ord(char):04X} ({name}), a control or format character" in message
    assert message.isprintable()


@settings(max_examples=200)
@given(
    name=st.text(alphabet=NAME_CHARS, min_size=1, max_size=6),
    char=st.characters(categories=["Cc", "Cf", "Zl", "Zp"]),
    at=st.integers(0, 6),
)
def test_any_control_or_format_character_anywhere_is_refused(name: str, char: str, at: int) -> None:
    with pytest.raises(InvalidRequest, match=f"U\\+{ord(char):04X} "):
        normalize(name[:at] + char + name[at:])


@pytest.mark.parametrize(
    "path",
    ["é", "café/résumé.md", "日本/語.txt", "😀", "notes/🎉party🎉", "Ελληνικά/ü ñ", "עברית",
     "العربية/ملف", "नमस्ते", "a\u00a0b", "combining/e\u0301", "flag/🇫🇷", "heart/❤\ufe0f"],
)  # fmt: skip
def test_ordinary_non_ascii_names_are_kept_as_given(path: str) -> None:
    """Letters, marks, symbols, emoji (with a variation selector, a Mn) and no-break spaces are
    not control or format characters: kept exactly (no Unicode normalization)."""
    assert normalize(path) == path
    assert normalize(path + "/") == path


def test_emoji_joined_with_zwj_is_refused_like_any_format_character() -> None:
    """U+200D (ZERO WIDTH JOINER) is Cf: a joined emoji sequence is not a valid name."""
    with pytest.raises(InvalidRequest, match="U\\+200D"):
        normalize("family/👨\u200d👩\u200d👧")


def test_a_lone_surrogate_is_an_invalid_request_not_a_crash() -> None:
    """JSON can carry "\\ud800"; it cannot be encoded, so it is not a path."""
    for path in ("\ud800", "a/\udfff", "ok/" + "\ud800" * 3):
        with pytest.raises(InvalidRequest, match="lone surrogate"):
            normalize(path)


# -- folder arithmetic -----------------------------------------------------------------------
@settings(max_examples=200)
@given(path=NORMAL, folder=NORMAL)
def test_ancestors_and_under_agree(path: str, folder: str) -> None:
    found = ancestors(path)
    assert len(found) == len(components(path))
    if path:
        assert found[-1] == "" and found[0] == parent(path)
        assert all(found[i] == parent(found[i - 1]) for i in range(1, len(found)))
    assert all(under(path, a) and a != path for a in found)
    assert under(path, folder) == (folder == path or folder in found)
    assert under(path, "") and under(path, path)


@settings(max_examples=200)
@given(old=NORMAL.filter(bool), new=NORMAL.filter(bool), inside=NORMAL)
def test_rebase_moves_exactly_what_is_under_the_folder(old: str, new: str, inside: str) -> None:
    """(A move never involves the root: neither ``old`` nor ``new`` is "".)"""
    path = "/".join(p for p in (old, inside) if p)  # a path under old
    assert under(path, old)
    moved = rebase(path, old, new)
    assert normalize(moved) == moved
    assert under(moved, new)
    assert rebase(moved, new, old) == path
    assert moved == "/".join(p for p in (new, inside) if p)
    if path == old:
        assert moved == new
    # what was above the moved path, below old, is now below new in the same order
    below_old = [a for a in ancestors(path) if under(a, old) and a != old]
    below_new = [a for a in ancestors(moved) if under(a, new) and a != new]
    assert [rebase(a, old, new) for a in below_old] == below_new


@pytest.fixture(scope="module")
def db_conn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Conn]:
    """A connection exactly as the storage manager opens it (schema applied)."""
    conn = Database.open(str(tmp_path_factory.mktemp("like") / "like.db")).connect()
    yield conn
    conn.close()


LIKE_CHARS = string.ascii_lowercase[:3] + "%_.\\/"


@settings(max_examples=300)
@given(
    folder=st.lists(st.text(alphabet=LIKE_CHARS.replace("/", ""), min_size=1, max_size=4),
                    max_size=3).map("/".join),
    names=st.lists(st.text(alphabet=LIKE_CHARS, min_size=1, max_size=10), max_size=20),
)  # fmt: skip
def test_like_prefix_matches_exactly_the_paths_inside(
    db_conn: Conn, folder: str, names: list[str]
) -> None:
    """LIKE with the pattern and ESCAPE '\\' matches what is strictly inside ``folder``: '%'
    and '_' in names are literal, not wildcards."""
    pattern = like_prefix(folder)
    for name in {*names, folder, folder + "/x", folder + "x/y", folder.replace("_", "x") + "/z"}:
        matched = db_conn.scalar("SELECT ? LIKE ? ESCAPE '\\'", (name, pattern))
        assert bool(matched) == (name.startswith(folder + "/") if folder else True), (
            folder,
            name,
            pattern,
        )


def test_like_prefix_is_case_sensitive_where_storage_uses_it(db_conn: Conn) -> None:
    """Paths are case-sensitive ("Docs" and "docs" are two folders), but SQLite's LIKE folds
    ASCII case unless told otherwise: the folder pattern must not match another folder."""
    for folder, other in [("docs", "DOCS/secret"), ("Pub", "pub/x"), ("a_b", "A_B/c")]:
        matched = db_conn.scalar("SELECT ? LIKE ? ESCAPE '\\'", (other, like_prefix(folder)))
        assert not matched, (folder, other)


def test_sqlite_like_reference() -> None:
    """The reference semantics the property relies on, on a bare SQLite connection."""
    raw = sqlite3.connect(":memory:")
    try:
        for name, folder, expected in [
            ("a%b/x", "a%b", 1), ("aXb/x", "a%b", 0), ("aXb/x", "a_b", 0), ("a_b/x", "a_b", 1),
            ("a_b", "a_b", 0), ("a_bc/x", "a_b", 0), ("x", "", 1),
        ]:  # fmt: skip
            query = "SELECT ? LIKE ? ESCAPE '\\'"
            assert raw.execute(query, (name, like_prefix(folder))).fetchone()[0] == expected
    finally:
        raw.close()


# -- version history against a model ---------------------------------------------------------
PATHS = ["f", "g", "d/h"]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from(PATHS), st.binary(max_size=6)),
        st.tuples(st.just("append"), st.sampled_from(PATHS), st.binary(max_size=4)),
        st.tuples(st.just("delete"), st.sampled_from(PATHS), st.just(b"")),
        st.tuples(st.just("rollback"), st.sampled_from(PATHS), st.integers(0, 30)),
        st.tuples(st.just("rollback_at"), st.sampled_from(PATHS), st.integers(0, 30)),
    ),
    max_size=25,
)


@dataclass
class Model:
    """A path's versions: (version id, time, content or None for a deletion)."""

    versions: dict[str, list[tuple[int, float, bytes | None]]] = field(default_factory=dict)
    current: dict[str, bytes] = field(default_factory=dict)

    def record(self, path: str, version: int, at: float, data: bytes | None) -> None:
        self.versions.setdefault(path, []).append((version, at, data))
        if data is None:
            self.current.pop(path, None)
        else:
            self.current[path] = data


class Tick:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_version_history_matches_a_model(tmp_path: Path) -> None:
    conn = Database.open(str(tmp_path / "history.db")).connect()
    tick = Tick()
    files = Files(StorageConfig(), clock=tick)
    owners = itertools.count()

    @settings(max_examples=80, deadline=None)
    @given(ops=OPS)
    def run(ops: list[tuple[str, str, object]]) -> None:
        who = Principal(f"agent{next(owners)}")  # a fresh namespace for each example
        model = Model()

        def newest(path: str) -> tuple[int, float, str | None]:
            top = files.history(conn, who, path, limit=1)[0]
            return top.id, top.at, top.hash

        for op, path, arg in ops:
            if op == "write" or op == "append":
                assert isinstance(arg, bytes)
                mode: WriteMode = "append" if op == "append" else "overwrite"
                stat = files.write(conn, who, path, arg, mode=mode)
                data = model.current.get(path, b"") + arg if op == "append" else arg
                version, at, _ = newest(path)
                assert stat.version == version and stat.size == len(data)
                model.record(path, version, at, data)
            elif op == "delete":
                if path not in model.current:
                    with pytest.raises(NotFound):
                        files.delete(conn, who, path)
                    continue
                assert files.delete(conn, who, path) == 1
                version, at, digest = newest(path)
                assert digest is None
                model.record(path, version, at, None)
            else:
                history = model.versions.get(path, [])
                if not history:
                    with pytest.raises(NotFound):
                        files.rollback(conn, who, path, version=1 << 40)
                    continue
                assert isinstance(arg, int)
                target_id, target_at, data = history[arg % len(history)]
                if op == "rollback":
                    stat = files.rollback(conn, who, path, version=target_id)
                else:  # by time: exactly at that version's time, or just after it
                    stat = files.rollback(conn, who, path, at=target_at + (arg % 2) * 0.5)
                if data is None:
                    assert stat is None
                    if path in model.current:  # rolling back to a deletion deletes
                        version, at, _ = newest(path)
                        model.record(path, version, at, None)
                else:
                    assert stat is not None
                    version, at, _ = newest(path)
                    assert stat.version == version
                    model.record(path, version, at, data)

        # every version of every path, newest first, readable as it was
        for path, versions in model.versions.items():
            history = files.history(conn, who, path, limit=10_000)
            assert [v.id for v in history] == [v for v, _, _ in reversed(versions)]
            assert [v.at for v in history] == [at for _, at, _ in reversed(versions)]
            for (version, _, data), v in zip(reversed(versions), history, strict=True):
                assert v.author == who.name and v.path == path
                if data is None:
                    assert v.hash is None and v.size == 0
                    with pytest.raises(NotFound):
                        files.read(conn, who, path, version=version)
                else:
                    assert v.size == len(data)
                    assert files.read(conn, who, path, version=version)["content"] == data
        for path in PATHS:
            if path in model.current:
                assert files.read(conn, who, path)["content"] == model.current[path]
            else:
                with pytest.raises(NotFound):
                    files.read(conn, who, path)
        listed = {s.path for s in files.ls(conn, who, recursive=True) if s.kind == "file"}
        assert listed == set(model.current)
        assert files.usage(conn, who)["bytes"] == sum(map(len, model.current.values()))

    try:
        run()
    finally:
        conn.close()
