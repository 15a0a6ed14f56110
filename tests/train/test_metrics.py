"""Per-class precision, recall and F1, and their macro averages, against figures computed by hand as scikit-learn's
classification_report computes them (its default zero_division: an undefined value is 0 in the average)."""

import json
import os
import re
import shutil

import pytest
import torch

import cnnkit
from cnnkit.checkpoint import make_payload, save_checkpoint
from cnnkit.data.shapes import SHAPE_CLASSES
from cnnkit.train.metrics import macro_averages, per_class_metrics
from tests.conftest import run_cli, write_image_folder

# rows: true class, columns: predicted. C has an image but is never predicted; D has none and is never predicted
# (in no average, as scikit-learn leaves out a label in neither y_true nor y_pred); E is predicted once, has none.
CONFUSION = torch.tensor([[3, 1, 0, 0, 1],
                          [2, 2, 0, 0, 0],
                          [1, 0, 0, 0, 0],
                          [0, 0, 0, 0, 0],
                          [0, 0, 0, 0, 0]])


def test_a_class_never_predicted_has_no_precision_rather_than_a_measured_zero():
    rows = per_class_metrics(CONFUSION, list("ABCDE"))
    by = {r["class"]: r for r in rows}
    assert by["A"]["precision"] == pytest.approx(3 / 6) and by["B"]["precision"] == pytest.approx(2 / 3)
    assert by["C"]["precision"] is None and by["D"]["precision"] is None  # 0/0: nothing predicted as them
    assert by["E"]["precision"] == 0.0  # predicted once, wrongly: a measured 0
    assert [r["recall"] for r in rows] == pytest.approx([3 / 5, 2 / 4, 0.0, None, None])
    # F1 = 2 TP / (2 TP + FP + FN): C has an image and is never predicted, so 0
    assert [r["f1"] for r in rows] == pytest.approx([6 / 11, 4 / 7, 0.0, None, None])
    assert [r["support"] for r in rows] == [5, 4, 1, 0, 0]


def test_macro_averages_count_an_undefined_value_as_zero_over_the_classes_present():
    macro = macro_averages(CONFUSION, per_class_metrics(CONFUSION, list("ABCDE")))
    # over A, B, C, E (D is in neither the images nor the predictions); C's precision and E's recall count 0
    assert macro["macro_precision"] == pytest.approx((1 / 2 + 2 / 3 + 0 + 0) / 4)  # 0.2917
    assert macro["macro_recall"] == pytest.approx((3 / 5 + 1 / 2 + 0 + 0) / 4)  # 0.275
    assert macro["macro_f1"] == pytest.approx((6 / 11 + 4 / 7 + 0 + 0) / 4)  # 0.2792


def _always_circle(tmp_path, classes: list[str]) -> str:
    """A checkpoint of a linear model over ``classes`` that predicts the first, `circle`, for every image."""
    model = cnnkit.create_model("linear", num_classes=3, input_size=16)
    with torch.no_grad():
        last = model.classifier[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([5.0, 0.0, 0.0]))
    path = str(tmp_path / "circle.pt")
    save_checkpoint(make_payload(model, classes, 16, 3, [0.5] * 3, [0.25] * 3), path)
    return path


def test_eval_shows_a_dash_and_a_note_for_a_class_never_predicted(tmp_path):
    """A checkpoint that predicts `circle` for every image: the other classes' precision is undefined."""
    classes = list(SHAPE_CLASSES[:3])
    folder = write_image_folder(str(tmp_path / "images"), n_per_class=4, classes=3)
    path = _always_circle(tmp_path, classes)
    proc = run_cli("eval", path, "--val-data", folder, "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^circle\s+0\.3333\s+1\.0000\s+0\.5000\s+4$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^square\s+-\s+0\.0000\s+0\.0000\s+4$", proc.stdout, re.M), proc.stdout
    # precision (1/3 + 0 + 0) / 3, recall (1 + 0 + 0) / 3, F1 (1/2 + 0 + 0) / 3
    assert re.search(r"^macro avg\s+0\.1111\s+0\.3333\s+0\.1667\s+12$", proc.stdout, re.M), proc.stdout
    assert "no image was predicted as that class (0/0)" in proc.stdout
    r = json.loads(run_cli("eval", path, "--val-data", folder, "--threads", "1", "--json").stdout)
    assert [c["precision"] for c in r["per_class"]] == [pytest.approx(1 / 3), None, None]
    assert (r["macro_precision"], r["macro_recall"], r["macro_f1"]) == pytest.approx((1 / 9, 1 / 3, 1 / 6))


def test_eval_does_not_say_an_absent_class_counts_zero_in_the_macro_average(tmp_path):
    """The same checkpoint on a folder of circles only: the other two classes are in neither the images nor the
    predictions, so the macro averages leave them out (1.0, as scikit-learn's) and the note must not say they count
    as 0, which the old line did under a macro precision of 1.0000."""
    classes = list(SHAPE_CLASSES[:3])
    folder = write_image_folder(str(tmp_path / "images"), n_per_class=4, classes=3)
    for name in classes[1:]:
        shutil.rmtree(os.path.join(folder, name))
    path = _always_circle(tmp_path, classes)
    proc = run_cli("eval", path, "--val-data", folder, "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^square\s+-\s+-\s+-\s+0$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^macro avg\s+1\.0000\s+1\.0000\s+1\.0000\s+4$", proc.stdout, re.M), proc.stdout
    assert "counts it as 0" not in proc.stdout
    assert "no image of that class here and none predicted as it; the macro averages leave it out" in proc.stdout
