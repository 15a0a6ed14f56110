"""Atomic writes and the writability check commands run before their work."""

import os

import pytest

from cnnkit.atomic import atomic_write, check_writable


def test_check_writable_leaves_no_folder_it_made_and_the_write_makes_them(tmp_path):
    # a command that checks its --out first and then fails (bad data, Ctrl-C) left the empty folders behind
    path = tmp_path / "new" / "deeper" / "report.html"
    check_writable(str(path))
    assert os.listdir(tmp_path) == []
    atomic_write(str(path), lambda f: f.write(b"page"))
    assert path.read_bytes() == b"page"


def test_check_writable_raises_for_a_file_in_the_way_and_removes_nothing_of_the_users(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError):
        check_writable(str(tmp_path / "a_file" / "sub" / "x.png"))
    assert os.listdir(tmp_path) == ["a_file"] and (tmp_path / "a_file").is_file()
    existing = tmp_path / "kept"
    existing.mkdir()
    check_writable(str(existing / "x.png"))
    assert existing.is_dir() and os.listdir(existing) == []
