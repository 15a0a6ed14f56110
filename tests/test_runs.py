"""cnnkit/runs.py: reading a run's JSON files."""

import json

import pytest

from cnnkit.errors import UserError
from cnnkit.runs import load_json


def test_a_json_file_cut_short_after_non_ascii_text_is_called_cut_short(tmp_path):
    # The position of the error counts characters, the file's length was counted in bytes: with non-ASCII class
    # names before the cut, "(cut short?)" was left out.
    path = tmp_path / "config.json"
    text = json.dumps({"classes": ["café", "thé", "crème brûlée"], "epochs": 3}, ensure_ascii=False)
    path.write_bytes(text[: text.index(', "epochs"')].encode())
    with pytest.raises(UserError, match=r"config.json is damaged: not valid JSON \(Expecting ',' delimiter at line 1, "
                                        r"column \d+ \(cut short\?\)\)"):
        load_json(str(path))


def test_a_json_file_that_is_not_utf8_text_is_damaged(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"classes": ["caf\xe9"]}')  # Latin-1
    with pytest.raises(UserError, match=r"config.json is damaged: not JSON text \(not UTF-8\)"):
        load_json(str(path))
    path.write_text("\ufeff" + json.dumps({"epochs": 3}), encoding="utf-8")  # a byte order mark is still JSON
    assert load_json(str(path)) == {"epochs": 3}
