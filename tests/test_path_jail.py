"""Property tests: path normalization (the jail of every agent's namespace) and version history
(a random sequence of writes, appends, deletes and rollbacks against a plain Python model)."""

from __future__ import annotations

import sqlite3
import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aios.errors import InvalidRequest, NotFound
from aios.storage.db import Database
from aios.storage.files import Files, Principal
from aios.storage.paths import ancestors, like_prefix, normalize, parent, rebase, under

NAME = st.text(alphabet=string.ascii_letters + string.digits + "._-% ü", min_size=1, max_size=8)
ANY_PATH = st.lists(
    st.sampled_from(["a", "b", ".", "/", "\\", "\x00", "\x1f", "..", "ü", "%", "_", " "]),
    max_size=30,
).map("".join)


def check_normal(path: str) -> None:
    assert not path.startswith("/") and not path.endswith("/")
    parts = path.split("/") if path else []
    assert all(p and p not in (".", "..") for p in parts)
    assert "\\" not in path and "\x00" not in path


@settings(max_examples=500)
@given(ANY_PATH)
def test_normalize_accepts_only_paths_inside_and_is_idempotent(path: str) -> None:
    try:
        normal = normalize(path)
    except InvalidRequest:
        parts = path.split("/")
        assert (
            ".." in parts
            or (path.startswith("/") and path != "/")
            or any(ord(c) < 32 for c in path)
            or "\\" in path
        ), f"{path!r} was rejected without a reason"
        return
    check_normal(normal)
    assert normalize(normal) == normal
    assert ".." not in path.split("/")


@given(st.lists(NAME.filter(lambda n: n not in (".", "..")), min_size=1, max_size=6))
def test_joined_names_survive_and_relations_agree(names: list[str]) -> None:
    path = normalize("/".join(names))
    assert path == "/".join(names)
    found = ancestors(path)
    assert found[-1] == "" and len(found) == len(names)
    assert all(under(path, a) for a in found)
    assert parent(path) == found[0]
    moved = rebase(path, found[0], "elsewhere")
    assert moved == normalize(f"elsewhere/{names[-1]}")
    assert not under(path + "x", path) or path + "x" == path


@pytest.mark.parametrize(
    "bad",
    ["..", "../x", "a/../../b", "a/..", "/etc/passwd", "//x", "a\\b", "a\x00b", "a\nb",
     "x" * 256, "/".join(["d"] * 40), 7, None],
)  # fmt: skip
def test_escapes_are_errors(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        normalize(bad)  # type: ignore[arg-type]


@settings(max_examples=100)
@given(st.lists(NAME, min_size=1, max_size=12), NAME)
def test_like_prefix_matches_exactly_the_paths_inside(names: list[str], folder: str) -> None:
    db = sqlite3.connect(":memory:")
    try:
        db.execute("CREATE TABLE t (p TEXT)")
        paths = {folder, *(f"{folder}/{n}" for n in names), *names, f"{folder}x/y"}
        db.executemany("INSERT INTO t VALUES (?)", [(p,) for p in paths])
        rows = db.execute(
            "SELECT p FROM t WHERE p LIKE ? ESCAPE '\\'", (like_prefix(folder),)
        ).fetchall()
        assert {r[0] for r in rows} == {p for p in paths if p.startswith(folder + "/")}
    finally:
        db.close()


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "append", "delete", "rollback"]),
        st.sampled_from(["a.txt", "d/b.txt"]),
        st.binary(max_size=6),
        st.integers(0, 50),
    ),
    max_size=25,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(OPS)
def test_version_history_matches_a_model(tmp_path_factory: pytest.TempPathFactory, ops) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path_factory.mktemp("h") / "h.db"
    conn = Database.open(str(path)).connect()
    files, who = Files(), Principal("agent")
    model: dict[str, list[tuple[int, bytes | None]]] = {}  # path -> versions (id, content)
    try:
        for op, name, data, pick in ops:
            versions = model.setdefault(name, [])
            current = versions[-1][1] if versions else None
            if op in ("write", "append"):
                new = (current or b"") + data if op == "append" else data
                stat = files.write(
                    conn, who, name, data, mode="append" if op == "append" else "overwrite"
                )
                versions.append((stat.version, new))
            elif op == "delete":
                if current is None:
                    with pytest.raises(NotFound):
                        files.delete(conn, who, name)
                    continue
                files.delete(conn, who, name)
                versions.append((_newest(conn, name), None))
            else:
                if not versions:
                    with pytest.raises(NotFound):
                        files.rollback(conn, who, name, version=1_000_000)
                    continue
                target = versions[pick % len(versions)]
                files.rollback(conn, who, name, version=target[0])
                if target[1] is None:
                    if current is not None:
                        versions.append((_newest(conn, name), None))
                else:
                    versions.append((_newest(conn, name), target[1]))
        for name, versions in model.items():
            if not versions:
                continue
            history = files.history(conn, who, name, limit=1000)
            assert [v.id for v in history] == [v for v, _ in reversed(versions)]
            for version, content in versions:
                if content is None:
                    with pytest.raises(NotFound):
                        files.read(conn, who, name, version=version)
                else:
                    assert files.read(conn, who, name, version=version)["content"] == content
            now = versions[-1][1]
            if now is None:
                with pytest.raises(NotFound):
                    files.read(conn, who, name)
            else:
                assert files.read(conn, who, name)["content"] == now
        usage = files.usage(conn, who)
        live = [v[-1][1] for v in model.values() if v and v[-1][1] is not None]
        assert usage["bytes"] == sum(len(c) for c in live if c is not None)
    finally:
        conn.close()


def _newest(conn, name: str) -> int:  # type: ignore[no-untyped-def]
    return int(conn.scalar("SELECT MAX(id) FROM versions WHERE path = ?", (name,)))
