"""A run works from any folder: its config records absolute paths; a run recorded before that, used from another
folder, and folders that are not runs (or runs without a checkpoint) are refused with the reason and the fix."""

import json
import os
import re

import pytest
import torch

import cnnkit
from cnnkit.cli import main
from cnnkit.errors import NonFiniteLoss, UserError
from cnnkit.evaluate import evaluate
from cnnkit.report.html import write_report
from tests.conftest import write_image_folder


@pytest.fixture
def trained(tmp_path, monkeypatch):
    """A one-epoch run trained in tmp_path/work with --data data --val-data val (relative, as typed); returns
    (the folder it was trained in, the run folder's absolute path); the test continues from tmp_path/elsewhere."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_image_folder(str(work / "data"))
    write_image_folder(str(work / "val"), seed=1)
    monkeypatch.chdir(work)
    cnnkit.train(data="data", val_data="val", epochs=1, out=os.path.join("runs", "r"), precision="fp32",
                 progress=False)
    monkeypatch.chdir(elsewhere)
    return work, work / "runs" / "r"


def test_a_run_records_absolute_paths_and_works_from_another_folder(trained):
    work, run = trained
    config = json.loads((run / "config.json").read_text())
    assert (config["data"], config["val_data"]) == (str(work / "data"), str(work / "val"))
    assert torch.load(run / "best.pt", weights_only=True)["config"]["data"] == str(work / "data")
    assert evaluate(str(run), precision="fp32").count == 32  # all of val/
    assert os.path.isfile(write_report(str(run), cam_images=0).path)
    with pytest.raises(UserError, match="finished its 1 epoch already"):  # past loading the data
        cnnkit.train(resume=str(run))


def _as_recorded_before(run):
    """Make ``run`` what a run trained before paths were recorded absolute holds: its paths as typed."""
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "data": "data", "val_data": "val"}))
    for name in ("best.pt", "last.pt"):
        payload = torch.load(run / name, weights_only=True)
        payload["config"] = {**payload["config"], "data": "data", "val_data": "val"}
        torch.save(payload, run / name)


def test_a_run_that_recorded_relative_paths_says_where_they_came_from(trained, monkeypatch):
    work, run = trained
    _as_recorded_before(run)
    came_from = '"data": "data" in the run\'s config.json is relative to the folder the run was trained in'
    with pytest.raises(UserError, match=came_from) as e:
        evaluate(str(run))
    assert f"run cnnkit eval from {work}, the folder it was trained in, or pass" in str(e.value)
    assert "--val-data DIR" in str(e.value) and "--data DIR" in str(e.value)
    with pytest.raises(UserError, match=came_from) as e:
        write_report(str(run), cam_images=0)
    assert str(e.value).endswith(f"run cnnkit report from {work}, the folder it was trained in")
    with pytest.raises(UserError, match=came_from) as e:
        cnnkit.train(resume=str(run))
    assert str(e.value).endswith(f"run cnnkit train --resume from {work}, the folder it was trained in")
    with pytest.raises(UserError, match=came_from) as e:  # a replay of its settings
        cnnkit.train(str(run / "config.json"), out="again")
    assert "pass --data DIR (and --val-data DIR)" in str(e.value)
    # eval's own images are taken as given
    assert evaluate(str(run), val_data=str(work / "val"), precision="fp32").count == 32
    monkeypatch.chdir(work)  # where the paths hold
    assert evaluate(str(run), precision="fp32").count == 32
    with pytest.raises(UserError, match="finished its 1 epoch already"):
        cnnkit.train(resume=str(run))


def test_a_run_whose_data_moved_says_so_and_its_report_leaves_out_what_needs_the_images(trained):
    work, run = trained
    os.rename(work / "val", work / "val_moved")
    gone = re.escape(f'the run\'s "val_data" folder {work / "val"} (its config.json) is not there any more: moved or '
                     "deleted")
    with pytest.raises(UserError, match=gone) as e:
        evaluate(str(run))
    assert "put it back to run cnnkit eval on the run's own images, or pass the images to score: --val-data DIR" \
        in str(e.value)
    report = write_report(str(run), cam_images=0)
    assert report.notes == [f"confusion matrix, per-class metrics, top losses, Grad-CAM and feature maps: the "
                            f"run's validation images went with its \"val_data\" folder {work / 'val'}, which is not "
                            "there any more (moved or deleted); put it back and run cnnkit report again"]
    assert "classes" not in report.sections and {"metrics", "curves", "model", "config"} <= set(report.sections)
    with pytest.raises(UserError, match=gone):
        cnnkit.train(resume=str(run))
    assert evaluate(str(run), val_data=str(work / "val_moved"), precision="fp32").count == 32  # eval's own images
    os.rename(work / "data", work / "data_moved")
    with pytest.raises(UserError, match=f'the run\'s "data" folder {work / "data"}'):
        evaluate(str(run))


def _fake_run(folder, **files):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model": "simple_cnn", "data": "shapes", "lr": 0.05}))
    (folder / "stages.json").write_text("[]")
    for name, content in files.items():
        (folder / name.replace("_", ".")).write_text(content)
    return folder


def test_resume_of_what_is_not_a_run_folder_says_what_it_is(tmp_path):
    runs = tmp_path / "runs"
    for name in ("a", "b", "c", "d"):
        _fake_run(runs / name, last_pt="x")
    newest = runs / "d"
    os.utime(newest / "config.json", (2e9, 2e9))
    with pytest.raises(UserError) as e:
        cnnkit.train(resume=str(runs))
    assert str(e.value) == (f"--resume {runs}: not a run folder (no config.json); it holds runs: a, b, c and 1 more; "
                            f"pass one of them, e.g. --resume {newest} (the newest)")
    photos = write_image_folder(str(tmp_path / "photos"))
    with pytest.raises(UserError) as e:
        cnnkit.train(resume=photos)
    assert str(e.value) == (f"--resume {photos}: not a run folder (no config.json); pass the folder a previous "
                            "`cnnkit train` wrote")
    with pytest.raises(UserError) as e:
        cnnkit.train(resume=str(runs / "a" / "last.pt"))
    assert str(e.value) == f"--resume {runs / 'a' / 'last.pt'}: a file of the run {runs / 'a'}; pass the run " \
                           f"folder: --resume {runs / 'a'}"
    with pytest.raises(UserError, match="no such folder"):
        cnnkit.train(resume=str(tmp_path / "missing"))


def test_predict_and_export_of_a_run_without_a_checkpoint_say_why_it_has_none(tmp_path, capsys):
    diverged = tmp_path / "diverged"
    with pytest.raises(NonFiniteLoss):
        cnnkit.train(data="shapes", num_samples=256, val_split=0.25, batch_size=32, progress=False,
                     model="simple_cnn", lr=1e4, schedule="constant", epochs=3, out=str(diverged))
    image = tmp_path / "one.png"
    write_image_folder(str(tmp_path / "images"), n_per_class=1, classes=1)
    os.rename(next((tmp_path / "images").rglob("*.png")), image)
    for argv in (["predict", str(diverged), str(image)], ["export", str(diverged), "--format", "onnx",
                                                          "--out", str(tmp_path / "m.onnx")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert (f"{diverged} is a run folder without a checkpoint (best.pt or last.pt): the run diverged in epoch 1, "
                "before its first checkpoint") in err
        assert f"cnnkit train --config {diverged / 'config.json'} --lr 1e3 --out NEW_DIR" in err
    stopped = _fake_run(tmp_path / "stopped")  # Ctrl-C'd in its first epoch, or still running
    assert main(["predict", str(stopped), str(image)]) == 2
    err = capsys.readouterr().err
    assert "the run stopped before its first checkpoint" in err and "pass a run folder" not in err
    assert f"cnnkit train --config {stopped / 'config.json'} --out NEW_DIR" in err
