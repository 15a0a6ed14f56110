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
    with pytest.raises(UserError, match=r"config.json is damaged: not JSON text \(not UTF-8\)") as caught:
        load_json(str(path))
    assert caught.value.exit_code == 1  # a damaged file, not a usage error: it exited with 2
    path.write_text("\ufeff" + json.dumps({"epochs": 3}), encoding="utf-8")  # a byte order mark is still JSON
    assert load_json(str(path)) == {"epochs": 3}


def test_started_is_the_runs_own_record_not_its_files_time(tmp_path):
    # `cp -r` (no -p), rsync, git checkout and unzip give the files the copy's time: STARTED showed that
    import datetime
    import io
    import os
    import shutil

    import cnnkit
    from cnnkit.runs import format_runs, latest_run, list_runs

    root = tmp_path / "runs"
    cnnkit.train(data="shapes", num_samples=64, epochs=1, batch_size=32, threads=1, progress=False,
                 out=str(root / "first"), log=io.StringIO())
    recorded = datetime.datetime.fromisoformat(json.loads((root / "first" / "run.json").read_text())["started"])
    assert abs(recorded.timestamp() - (root / "first" / "config.json").stat().st_mtime) < 5
    shutil.copytree(root / "first", root / "copy", copy_function=shutil.copy)  # as cp -r: the copy's file times
    long_ago = datetime.datetime(2020, 1, 2, 3, 4).timestamp()
    os.utime(root / "first" / "config.json", (long_ago, long_ago))  # as a restore with other file times
    local = recorded.astimezone().strftime("%Y-%m-%d %H:%M")
    (first, copy) = list_runs(str(root))
    assert first.started == copy.started == local and first.started_recorded and copy.started_recorded
    assert "*" not in format_runs([first, copy])

    # a folder from before run.json: config.json's time, marked as such, and sorted by it
    (root / "copy" / "run.json").unlink()
    os.utime(root / "copy" / "config.json", (long_ago, long_ago))
    (old, new) = list_runs(str(root))
    assert old.path == str(root / "copy") and old.started == "2020-01-02 03:04" and not old.started_recorded
    assert new.path == str(root / "first") and new.started == local and new.started_recorded
    table = format_runs([old, new]).splitlines()
    assert "2020-01-02 03:04*" in table[1] and f"{local} " in table[2] + " "
    assert table[-1].startswith("* config.json's file time (no run.json")
    assert latest_run(str(root)) == str(root / "first")


def test_no_latest_run_in_runs_names_the_runs_made_with_out_nearby(tmp_path, monkeypatch):
    # `cnnkit report` with no run: "no runs/ folder here" said nothing of the runs `train --out` had made beside it
    import os

    from cnnkit.runs import latest_run

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^no runs/ folder here, so there is no latest run; pass a run folder$"):
        latest_run()
    for folder in ("again", os.path.join("exp", "a"), os.path.join("exp", "b")):
        os.makedirs(folder)
        open(os.path.join(folder, "config.json"), "w").write("{}")
    with pytest.raises(UserError, match=r"; pass a run folder \(runs made with --out: again, exp/a, \.\.\.\)$"):
        latest_run()
    os.makedirs("runs")
    with pytest.raises(UserError, match=r"^no run folders in runs/; pass a run folder \(runs made with --out: "):
        latest_run()


def test_a_stopped_staged_run_is_listed_with_the_epochs_its_stages_plan(tmp_path):
    # --stages sets the epochs, stage by stage, and --epochs is not used: a staged run of 1 + 2 epochs, stopped
    # (no result.json yet), was listed with the unused --epochs its config.json also records (1/10 from the command
    # line)
    import io

    import cnnkit
    from cnnkit.runs import list_runs

    run = tmp_path / "staged"
    cnnkit.train(model="cnn_bn", data="shapes", num_samples=64, batch_size=32, threads=1, progress=False,
                 stages="head:1@0.01,all:2@0.001", out=str(run), log=io.StringIO())
    assert json.loads((run / "config.json").read_text())["epochs"] != 3
    assert list_runs(str(run))[0].epochs == 3  # finished: result.json's
    (run / "result.json").unlink()  # as a killed run leaves its folder
    info = list_runs(str(run))[0]
    assert (info.status, info.epochs) == ("stopped", 3)


def test_a_stopped_smoke_run_is_listed_with_the_epochs_smoke_cuts_it_to(tmp_path):
    # A smoke run of --epochs 30 stopped in its first epoch was listed 0/30 (and its report said "1 of 30 epochs"),
    # though it trains 2; a staged one (1 epoch a stage) 0/8 for --stages head:3@..,all:5@.., though it trains 2.
    from cnnkit.runs import list_runs

    for config, planned in [({"epochs": 30, "smoke": True}, 2), ({"epochs": 1, "smoke": True}, 1),
                            ({"epochs": 30, "stages": "head:3@1e-3,all:5@1e-4", "smoke": True}, 2),
                            ({"epochs": 30, "stages": "head:3@1e-3,all:5@1e-4"}, 8), ({"epochs": 30}, 30)]:
        run = tmp_path / str(len(list(tmp_path.iterdir())))
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"model": "cnn_bn", "data": "shapes", **config}))
        info = list_runs(str(run))[0]
        assert (info.status, info.epochs, info.smoke) == ("stopped", planned, bool(config.get("smoke"))), config


def test_folders_with_runs_are_found_one_level_below_and_runs_itself_is_left_out(tmp_path, monkeypatch):
    from cnnkit.runs import folders_with_runs

    def run(path):
        path.mkdir(parents=True)
        (path / "config.json").write_text("{}")

    run(tmp_path / "b")
    run(tmp_path / "a")
    run(tmp_path / "exp" / "one")
    run(tmp_path / "runs" / "r")  # what `cnnkit runs` lists itself
    run(tmp_path / "deep" / "er" / "r")  # two levels down: not looked for
    (tmp_path / "photos" / "cat").mkdir(parents=True)
    (tmp_path / "photos" / "cat" / "1.jpg").write_bytes(b"")
    (tmp_path / ".hidden" / "r").mkdir(parents=True)
    (tmp_path / ".hidden" / "r" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert folders_with_runs() == [(".", ["a", "b"]), ("exp", ["one"])]
    assert folders_with_runs(str(tmp_path / "exp")) == [(str(tmp_path / "exp"), ["one"])]
    monkeypatch.chdir(tmp_path / "a")  # inside a run folder: `cnnkit runs .` lists it
    assert folders_with_runs() == [(".", ["a"])]
    monkeypatch.chdir(tmp_path / "photos")
    assert folders_with_runs() == []
