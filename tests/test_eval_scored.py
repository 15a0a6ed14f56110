"""`cnnkit eval` names the images it scored: the folder they came from, and which part of it."""

import json
import os
import shutil

import pytest

import cnnkit
from cnnkit.evaluate import describe_scored, evaluate, scored_images
from tests.conftest import run_cli, write_image_folder

# Keys `eval --json` carried before `val_split` and `scored` were added: scripts read them.
OLD_KEYS = {"acc", "top5", "loss", "count", "per_class", "confusion_matrix", "classes", "checkpoint", "data",
            "precision", "macro_recall", "macro_f1", "tta_views", "threads", "warnings"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Training data D (10 images per class), validation folder V (6 per class), a run that held out the default
    0.1 of D, and a run validated on V."""
    root = tmp_path_factory.mktemp("scored")
    data = write_image_folder(str(root / "D"), n_per_class=10)
    val = write_image_folder(str(root / "V"), n_per_class=6, seed=1)
    common = dict(data=data, epochs=1, batch_size=8, progress=False)
    split = cnnkit.train(**common, out=str(root / "split")).run_dir
    validated = cnnkit.train(**common, val_data=val, out=str(root / "validated")).run_dir
    return data, val, split, validated


def test_eval_of_a_run_trained_with_val_data_names_that_folder_in_its_line_and_json(runs):
    data, val, _, validated = runs
    proc = run_cli("eval", validated)
    assert proc.returncode == 0, proc.stderr
    assert f" on 24 images of {val}: acc " in proc.stdout.splitlines()[0]
    assert data not in proc.stdout.splitlines()[0]
    proc = run_cli("eval", validated, "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert OLD_KEYS <= set(r)
    assert (r["data"], r["val_split"], r["scored"], r["count"]) == (val, None, f"images of {val}", 24)


def test_eval_of_a_run_with_a_split_says_the_images_are_its_held_out_share(runs):
    data, _, split, _ = runs
    proc = run_cli("eval", split)
    assert proc.returncode == 0, proc.stderr
    assert f" on 4 held-out images of {data} (0.1 of each class): acc " in proc.stdout.splitlines()[0]
    r = evaluate(split, val_split=0.05)  # part of what the run held out: at least one image of each class
    assert (r.data, r.val_split, r.scored, r.count) == (data, 0.05, f"held-out images of {data} (0.05 of each class)", 4)


def test_eval_with_data_or_val_data_names_the_folder_scored(runs):
    data, val, split, validated = runs
    for r in (evaluate(split, val_data=val), evaluate(split, val), evaluate(split, data, val_data=val)):
        assert (r.data, r.val_split, r.scored, r.count) == (val, None, f"images of {val}", 24)
    r = evaluate(validated, val_data=data)  # the run's training data, whole (with a warning saying so)
    assert (r.data, r.scored, r.count) == (data, f"images of {data}", 40) and r.warnings
    r = evaluate(split, val, val_split=0.5)
    assert (r.data, r.val_split, r.scored, r.count) == (val, 0.5, f"images of {val} (its --val-split 0.5 part)", 12)
    r = evaluate(split, data, val_split=0.1)  # exactly what the run held out
    assert (r.scored, r.count) == (f"held-out images of {data} (0.1 of each class)", 4)
    r = evaluate(split, data, val_split=0.5)  # more than it held out: training images too, so not "held-out"
    assert r.scored == f"images of {data} (its --val-split 0.5 part)" and r.warnings


def test_built_in_datasets_name_their_test_or_validation_set():
    cfg = {"data": "cifar10"}
    assert scored_images(cfg, None, None, None) == ("cifar10", None)
    assert describe_scored(cfg, "cifar10", None) == "images of the cifar10 test split"
    assert describe_scored({"data": "shapes"}, "shapes", None) == "images of the shapes validation set"
    cfg = {"data": "shapes", "val_split": 0.2}  # a run that held out 0.2 of its generated training images
    assert scored_images(cfg, None, None, None) == ("shapes", 0.2)
    assert describe_scored(cfg, "shapes", 0.2) == "held-out images of shapes (0.2 of each class)"
    # A run from before --val-split beside --val-data was refused was validated on its val_data.
    assert scored_images({"data": "D", "val_data": "V", "val_split": 0.2}, None, None, None) == ("V", None)


def test_one_image_scored_is_one_image_not_one_images(runs, tmp_path):
    data, val, split, _ = runs
    # one class's folder of V, holding one image: the line said "on 1 images of ..."
    one, name = tmp_path / "one", sorted(os.listdir(val))[0]
    (one / name).mkdir(parents=True)
    first = sorted(os.listdir(os.path.join(val, name)))[0]
    shutil.copy(os.path.join(val, name, first), one / name / first)
    proc = run_cli("eval", split, "--val-data", one)
    assert proc.returncode == 0, proc.stderr
    assert f" on 1 image of {one}: acc " in proc.stdout.splitlines()[0], proc.stdout
    r = evaluate(split, val_data=str(one))
    assert (r.count, r.scored) == (1, f"image of {one}")
