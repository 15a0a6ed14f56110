"""Where the validation images come from: --val-data and --val-split are one or the other (never one silently
dropped), an error about --val-data names it, and a --val-data folder may hold only some of the training classes,
labelled by class name."""

import csv
import json
import os
import re
import shutil

import pytest
import torch

import cnnkit
from cnnkit.data.checks import check_data
from cnnkit.data.sources import DataSpec, load_splits
from cnnkit.errors import UserError
from cnnkit.evaluate import evaluate
from cnnkit.train.config import TrainConfig
from cnnkit.train.options import make_config
from tests.conftest import run_cli, write_image_folder

CLASSES = ["circle", "square", "triangle"]  # write_image_folder(classes=3), sorted as the folders are


def count_images(root):
    return sum(len(os.listdir(os.path.join(root, c))) for c in os.listdir(root))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """The training folder (3 classes), a validation folder of the same classes, one without `square` (so its
    `triangle` is its second sub-folder but the training data's third class) and one with an extra class."""
    root = tmp_path_factory.mktemp("val_data")
    data = write_image_folder(str(root / "train"), n_per_class=6, classes=3)
    val = write_image_folder(str(root / "val"), n_per_class=3, classes=3, seed=1)
    some = write_image_folder(str(root / "some"), n_per_class=3, classes=3, seed=1)
    shutil.rmtree(os.path.join(some, "square"))
    extra = write_image_folder(str(root / "extra"), n_per_class=3, classes=3, seed=1)
    shutil.copytree(os.path.join(extra, "circle"), os.path.join(extra, "hexagon"))
    assert sorted(os.listdir(data)) == CLASSES and sorted(os.listdir(some)) == ["circle", "triangle"]
    return {"data": data, "val": val, "some": some, "extra": extra, "root": root}


# --- 1. --val-split beside --val-data -------------------------------------------------------------------------

def test_train_refuses_val_split_beside_val_data_before_any_work(folders, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", folders["data"], "--val-data", folders["val"], "--val-split", "0.2",
                   "--epochs", "1", "--out", out)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert f"--val-split 0.2 splits --data, but with --val-data {folders['val']}" in line and "drop one" in line
    assert not out.exists()  # refused before the run folder was made


def test_a_config_file_with_both_is_refused_naming_the_file(folders, tmp_path):
    both = tmp_path / "both.yaml"
    both.write_text(f"data: {folders['data']}\nval_data: {folders['val']}\nval_split: 0.2\n")
    with pytest.raises(UserError) as e:
        make_config(str(both))
    assert str(e.value).startswith(f"val_split 0.2 (in --config {both}) splits --data, but with val_data "
                                   f"{folders['val']} (in --config {both})")
    # one from the file, the other given: each is named where it was set
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"data": folders["data"], "val_split": 0.2}))
    with pytest.raises(UserError, match=re.escape(f"val_split 0.2 (in --config {split}) splits --data, but with "
                                                  f"--val-data {folders['val']} the validation images")):
        make_config(str(split), {"val_data": folders["val"]})
    proc = run_cli("train", "--config", both, "--out", tmp_path / "run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and str(both) in proc.stderr


def test_the_python_api_refuses_both(folders, tmp_path):
    with pytest.raises(UserError, match="--val-split 0.2 splits --data, but with --val-data"):
        cnnkit.train(data=folders["data"], val_data=folders["val"], val_split=0.2, epochs=1, out=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    with pytest.raises(UserError, match="--val-split 0.2 splits --data"):
        cnnkit.train(TrainConfig(data=folders["data"], val_data=folders["val"], val_split=0.2), out=str(tmp_path / "r"))
    # either alone is fine (val_split has no default: None is "not given")
    assert make_config(None, {"data": folders["data"], "val_data": folders["val"]}).val_split is None
    assert make_config(None, {"data": folders["data"], "val_split": 0.2}).val_data is None


def test_eval_and_check_data_refuse_both_too(folders, tmp_path):
    # load_splits is what train, eval --data, check-data and probe load through: none drops the split unseen
    with pytest.raises(UserError, match=re.escape(f"--val-split 0.2 splits {folders['data']} into training and")):
        load_splits(DataSpec(folders["data"], val_data=folders["val"], val_split=0.2))
    # check-data and probe take DATA as an argument, not as --data: the message names it by its path
    for args in (("check-data", folders["data"]), ("probe", "simple_cnn", folders["data"])):
        proc = run_cli(*args, "--val-data", folders["val"], "--val-split", "0.2")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert f"--val-split 0.2 splits {folders['data']} into" in proc.stderr and "--data" not in proc.stderr


# --- 2. a --val-data path that is wrong is named as --val-data ------------------------------------------------

def test_a_missing_val_data_folder_is_named_as_val_data(folders, tmp_path):
    missing = tmp_path / "nothing"
    proc = run_cli("train", "--data", folders["data"], "--val-data", missing, "--epochs", "1", "--out", tmp_path / "r")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert f"--val-data {missing} does not exist" in line
    loose = os.path.join(folders["data"], "circle")  # images, no class folders
    with pytest.raises(UserError, match=f"^--val-data {re.escape(loose)} holds images but no class sub-folders"):
        load_splits(DataSpec(folders["data"], val_data=loose))


# --- 3. a --val-data folder of some of the training classes ---------------------------------------------------

def test_val_data_of_some_classes_is_labelled_by_class_name(folders):
    train, val = load_splits(DataSpec(folders["data"], val_data=folders["some"]))
    assert train.classes == val.classes == CLASSES
    assert len(val) == count_images(folders["some"])
    names = [os.path.basename(os.path.dirname(p)) for p in val.paths]
    assert val.labels.tolist() == [CLASSES.index(n) for n in names]  # triangle is 2, not its folder's 1
    assert torch.bincount(val.labels, minlength=3)[1] == 0


def test_an_empty_class_folder_in_val_data_is_a_class_without_validation_images(folders, run, tmp_path):
    # classes are matched by name, so an empty folder is what a missing one is: no validation images of it
    empty = tmp_path / "empty"
    shutil.copytree(folders["some"], empty)
    os.makedirs(empty / "square")
    train, val = load_splits(DataSpec(folders["data"], val_data=str(empty)))
    assert val.classes == CLASSES and torch.bincount(val.labels, minlength=3)[1] == 0
    names = [os.path.basename(os.path.dirname(p)) for p in val.paths]
    assert val.labels.tolist() == [CLASSES.index(n) for n in names]
    # the advice fits --val-data: --val-split cannot be combined with it
    proc = run_cli("check-data", folders["data"], "--val-data", empty)
    assert proc.returncode == 0, proc.stderr
    warning, = [line for line in proc.stdout.splitlines() if "no validation images of" in line]
    assert warning.endswith(f"no validation images of square: their recall cannot be measured; add images of them "
                            f"to --val-data {empty}") and "--val-split" not in warning
    missing = [w for w in check_data(folders["data"], val_data=folders["some"]).warnings if "of square" in w]
    assert missing == [f"no validation images of square: their recall cannot be measured; add images of them to "
                       f"--val-data {folders['some']}"]  # a missing folder: the same
    r = evaluate(run, val_data=str(empty))  # eval's --val-data alone takes it too
    assert r.count == count_images(folders["some"]) and r.per_class[1]["support"] == 0
    # an empty class folder in the training data is still refused, for a reason that holds
    os.makedirs(tmp_path / "data")
    shutil.copytree(folders["data"], tmp_path / "data" / "d")
    os.makedirs(tmp_path / "data" / "d" / "zebra")
    with pytest.raises(UserError, match="zebra; add images or remove the folder \\(a class without images cannot be"):
        load_splits(DataSpec(str(tmp_path / "data" / "d")))


def test_val_data_with_a_class_the_training_data_lacks_is_refused(folders):
    with pytest.raises(UserError) as e:
        load_splits(DataSpec(folders["data"], val_data=folders["extra"]))
    message = str(e.value)
    assert f"--val-data {folders['extra']} has class(es) hexagon that the training data" in message
    assert "its classes: circle, square, triangle" in message and "\n" not in message


@pytest.fixture(scope="module")
def run(folders):
    """A run validated on the folder without `square`."""
    out = folders["root"] / "run"
    proc = run_cli("train", "--data", folders["data"], "--val-data", folders["some"], "--epochs", "1",
                   "--batch-size", "8", "--report", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "no validation images of square" in proc.stdout + proc.stderr  # the data check says so before training
    return str(out)


def test_a_run_validated_on_some_classes_measures_all_of_them(folders, run):
    result = json.load(open(os.path.join(run, "result.json")))
    assert result["num_val"] == count_images(folders["some"])
    r = evaluate(run)
    assert r.classes == CLASSES and len(r.confusion_matrix) == 3 and r.count == result["num_val"]
    square = r.per_class[1]
    assert square["support"] == 0 and sum(r.confusion_matrix[1]) == 0
    assert all(v == v for row in r.per_class for v in row.values() if isinstance(v, float))  # no NaN
    # no recall or F1 to give, rather than a 0 that a mean over the classes would take in: null, empty in the CSV
    assert square["recall"] is None and square["f1"] is None
    assert json.loads(run_cli("eval", run, "--json").stdout)["per_class"][1]["recall"] is None
    rows = [row for row in csv.DictReader(open(os.path.join(run, "per_class.csv"))) if row["class"] == "square"]
    assert rows and all(row["recall"] == "" and row["f1"] == "" for row in rows), rows
    # shown as a class without images: "-" for its recall and F1, in eval's table and in the report's; "-" for its
    # precision too where the model never predicts it (0/0)
    predicted = sum(row[1] for row in r.confusion_matrix)
    proc = run_cli("eval", run)
    assert proc.returncode == 0, proc.stderr
    precision = r"\d\.\d{4}" if predicted else "-"
    assert re.search(r"^square\s+" + precision + r"\s+-\s+-\s+0$", proc.stdout, re.M), proc.stdout
    html = open(os.path.join(run, "report.html")).read()
    precision = r"\d\.\d{3}" if predicted else "-"
    assert re.search(r'<td class="text">square</td><td>' + precision + '</td><td>-</td><td>-</td><td>0</td>', html)
    # its macro average is over the classes in the images or the predictions, as eval's macro-F1 is
    macro = re.search(r'macro average</td>(?:<td>[^<]*</td>){2}<td>([^<]*)</td>', html).group(1)
    assert macro == f"{r.macro_f1:.3f}"


def test_eval_scores_a_folder_of_some_classes_by_name(folders, run):
    r = evaluate(run, val_data=folders["some"])
    assert r.count == count_images(folders["some"]) and r.classes == CLASSES
    assert [sum(row) for row in r.confusion_matrix] == [len(os.listdir(os.path.join(folders["some"], c)))
                                                        if c != "square" else 0 for c in CLASSES]
    proc = run_cli("eval", run, "--val-data", folders["extra"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "hexagon" in proc.stderr and f"--val-data {folders['extra']}" in proc.stderr
    proc = run_cli("eval", run, "--val-data", folders["root"] / "nothing")
    assert proc.returncode == 2 and "--val-data" in proc.stderr and "nothing" in proc.stderr
    proc = run_cli("eval", run, "--data", folders["data"], "--val-data", folders["val"], "--val-split", "0.2")
    assert proc.returncode == 2 and f"--val-split 0.2 splits {folders['data']}" in proc.stderr


def test_a_run_from_before_the_refusal_still_evaluates_and_resumes(folders, run, tmp_path):
    # Runs made before --val-split beside --val-data was refused recorded both and validated on --val-data alone.
    old = tmp_path / "old"
    shutil.copytree(run, old)
    for name in ("best.pt", "last.pt"):
        payload = torch.load(old / name, weights_only=True)
        payload["config"] = {**payload["config"], "val_split": 0.2, "epochs": 2}
        torch.save(payload, old / name)
    assert evaluate(str(old)).count == count_images(folders["some"])
    proc = run_cli("train", "--resume", old)
    assert proc.returncode == 0, proc.stderr
    assert json.load(open(old / "result.json"))["epochs_run"] == 2


def test_quiet_training_still_warns_of_classes_without_validation_images(folders, tmp_path):
    # --quiet dropped everything the run wrote but the result, this warning too: a run whose recall of a class
    # cannot be measured finished without a word about it.
    proc = run_cli("train", "--data", folders["data"], "--val-data", folders["some"], "--epochs", "1",
                   "--batch-size", "8", "--precision", "fp32", "--quiet", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    warned = proc.stderr.splitlines()
    assert all(line.startswith("cnnkit: warning: ") for line in warned), proc.stderr  # the warnings, one line each
    assert any("no validation images of square" in line for line in warned), proc.stderr
    assert any("only 6 validation image(s)" in line for line in warned), proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == 1 and out[0].startswith("done: val acc "), proc.stdout  # and nothing else
