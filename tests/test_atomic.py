"""core/atomic.py: a file or folder appears whole or not at all."""

import json

import pytest

from rayvid.core.atomic import atomic_path, is_temporary, write_json, write_text


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    write_text(path, "old")
    write_json(path, {"b": 1, "a": [2]})
    assert json.loads(path.read_text()) == {"b": 1, "a": [2]}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_failure_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "a.txt"
    write_text(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            assert is_temporary(tmp) and tmp.parent == tmp_path
            raise RuntimeError("crash")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_folder_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale").write_text("x")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("y")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    with pytest.raises(RuntimeError):
        with atomic_path(out) as tmp:
            tmp.mkdir()
            (tmp / "half").write_text("z")
            raise RuntimeError("crash")
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_writing_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "x"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_folder_replaces_a_file_and_a_file_replaces_a_folder(tmp_path):
    out = tmp_path / "out"
    out.write_text("a stray file")
    with atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "meta.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["meta.json"]
    write_text(out, "now a file")
    assert out.read_text() == "now a file"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
