"""`cnnkit eval` and `cnnkit probe` score the images asked for, and say when those include training images."""

import io
import json
import os
import shutil

import pytest

import cnnkit
from cnnkit.embed import probe
from cnnkit.errors import UserError
from cnnkit.evaluate import evaluate
from tests.conftest import run_cli, write_image_folder

PER_CLASS, CLASSES = 18, 3  # training holds out 0.1 of each class by default: 2 images per class, 6 in all


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained on a folder with the default split, that folder, and another folder with the same classes."""
    root = tmp_path_factory.mktemp("eval_data")
    data = write_image_folder(str(root / "train"), n_per_class=2 * PER_CLASS, classes=CLASSES)
    for c in os.listdir(data):  # the generator's classes come in unequal numbers: keep PER_CLASS of each
        names = sorted(os.listdir(os.path.join(data, c)))
        assert len(names) >= PER_CLASS
        for name in names[PER_CLASS:]:
            os.remove(os.path.join(data, c, name))
    other = write_image_folder(str(root / "other"), n_per_class=5, classes=CLASSES, seed=1)
    out = root / "run"  # trained through the API: these tests read the run, `cnnkit train` is test_cli.py's
    cnnkit.train(data=data, epochs=1, batch_size=16, progress=False, out=str(out), log=io.StringIO())
    return str(out), data, other


def test_val_data_alone_scores_that_folder_whole(run):
    out, data, other = run
    r = evaluate(out, val_data=other)
    assert (r.count, r.data, r.warnings) == (sum(len(os.listdir(os.path.join(other, c))) for c in os.listdir(other)),
                                             other, [])


def test_val_data_that_does_not_exist_is_an_error(run, tmp_path):
    proc = run_cli("eval", run[0], "--val-data", tmp_path / "nothing")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "nothing" in proc.stderr


def test_a_built_in_dataset_of_other_classes_is_no_folder_to_rename(run):
    with pytest.raises(UserError, match="that the checkpoint .* does not have .*; pass images of the checkpoint "
                                        ".*'s classes: shapes is another dataset"):
        evaluate(run[0], data="shapes")


def test_val_split_without_data_splits_the_runs_training_data(run):
    out, data, _ = run
    assert evaluate(out).count == 2 * CLASSES  # the run's own validation images
    r = evaluate(out, val_split=0.05)  # 1 image per class: part of what the run held out
    assert (r.count, r.data, r.warnings) == (CLASSES, data, [])


def test_val_split_without_data_larger_than_the_runs_is_refused(run):
    proc = run_cli("eval", run[0], "--val-split", "0.5")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line, = proc.stderr.strip().splitlines()
    assert "--val-split 0.5" in line and "trained on" in line and "held out 0.1" in line


def test_val_split_with_val_data_alone_is_refused(run):
    proc = run_cli("eval", run[0], "--val-data", run[2], "--val-split", "0.1")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "--val-split" in proc.stderr and "--val-data" in proc.stderr


def test_eval_of_the_training_folder_warns(run):
    out, data, other = run
    proc = run_cli("eval", out, "--data", data, "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["count"] == PER_CLASS * CLASSES  # --data alone: the whole folder
    line, = proc.stderr.strip().splitlines()
    assert line.startswith("cnnkit: warning: ") and "training data" in line and "about 90%" in line
    assert f"--data {data} --val-split 0.1" in line and "overstate" in line

    held_out = evaluate(out, data, val_split=0.1)  # exactly the images the run held out
    assert held_out.count == 2 * CLASSES and held_out.warnings == []
    assert held_out.acc == evaluate(out).acc
    assert "about 50%" in evaluate(out, data + os.sep, val_split=0.2).warnings[0]  # the same folder, spelt otherwise
    for scored in (evaluate(out, val_data=data), evaluate(out, other, val_data=data)):  # --val-data is scored
        assert scored.count == PER_CLASS * CLASSES and scored.data == data
        warning, = scored.warnings
        assert "drop --val-data" in warning and f"--data {data} --val-split 0.1" in warning
    assert evaluate(out, other).warnings == []


def test_eval_of_a_folder_names_the_files_beside_its_class_folders(run, tmp_path):
    # they are scored no more than trained on: eval on such a folder said nothing of them
    out, data, other = run
    from PIL import Image

    folder = shutil.copytree(other, tmp_path / "other")
    for name in ("stray.png", ".DS_Store"):
        Image.new("RGB", (16, 16)).save(folder / name, format="PNG")
    for scored in (evaluate(out, str(folder)), evaluate(out, str(folder), val_split=0.5),
                   evaluate(out, val_data=str(folder))):
        warning, = scored.warnings
        assert "1 file(s) at the top of" in warning and "(stray.png)" in warning, warning


def test_eval_help_says_what_data_and_val_split_score():
    text = " ".join(run_cli("eval", "--help").stdout.split())
    assert "default for folders: 0.1" not in text
    assert "scored whole unless --val-split or --val-data is given" in text
    assert "--val-data DIR score this folder, all of it" in text


def test_probe_warns_when_its_validation_images_trained_the_backbone(run):
    out, data, other = run
    assert probe(out, data).warnings == []  # the default 0.1 split: what the run held out
    assert probe(out, data, val_split=0.1).warnings == []
    assert probe(out, other, val_split=0.4).warnings == []
    assert probe("simple_cnn", data, val_split=0.4, input_size=32).warnings == []  # a model name trained on nothing
    warning, = probe(out, data, val_split=0.4).warnings
    assert "--val-split 0.1 (or less)" in warning and warning.endswith("probe on data the backbone did not train on")
    # The same situation as eval's, in the same words (one function writes both); only the ways out differ.
    eval_warning, = evaluate(out, data, val_split=0.4).warnings
    assert warning.split(";")[0] == eval_warning.split(";")[0]
    assert "about 75% of those images are in the run's training split" in warning
    # a share, not "--val-split 0.4": probe's default split (0.1 of a folder) is worded alike though nobody typed it
    assert warning.startswith(f"{data} is the run's training data: a 0.4 share of it is scored, and about 75%")
    # --val-data is scored whole: no --val-split fix, and the same sentence as eval's for --val-data
    whole, = probe(out, other, val_data=data).warnings
    assert "--val-split" not in whole and whole.split(";")[0] == evaluate(out, val_data=data).warnings[0].split(";")[0]
    proc = run_cli("probe", out, data, "--val-split", "0.4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["warnings"] == [warning]
    assert proc.stderr.strip() == f"cnnkit: warning: {warning}"


@pytest.mark.parametrize("streamed", [False, True])
def test_broken_images_left_out_of_the_scores_are_named(run, tmp_path, monkeypatch, streamed):
    # They used to be dropped without a word: "on 15 images of val/" for a folder of 17 images.
    out, _, other = run
    folder = tmp_path / "val"
    shutil.copytree(other, folder)
    first = sorted(os.listdir(folder))[0]
    good = sorted(os.listdir(folder / first))[0]
    whole = (folder / first / good).read_bytes()
    (folder / first / "empty.png").write_bytes(b"")
    (folder / first / "cut.png").write_bytes(whole[: len(whole) // 2])
    if streamed:  # too large for memory: decoded batch by batch
        monkeypatch.setenv("CNNKIT_MEMORY_BUDGET", "1")
    r = evaluate(out, val_data=str(folder))
    assert r.count == sum(len(os.listdir(folder / c)) for c in os.listdir(folder)) - 2
    assert len(r.warnings) == 1 and "left out 2 broken image(s)" in r.warnings[0], r.warnings


def test_an_export_without_data_asks_for_the_images_to_score(run, tmp_path):
    # A .safetensors export records no training data: eval without --data failed with "internal error: KeyError".
    import cnnkit

    exported = cnnkit.export(run[0], "safetensors", str(tmp_path / "model.safetensors")).path
    proc = run_cli("eval", exported)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "does not record its training data" in proc.stderr and "--val-data DIR" in proc.stderr
    with pytest.raises(UserError, match="does not record its training data"):
        evaluate(exported, val_split=0.05)
    assert evaluate(exported, val_data=run[2]).count == evaluate(run[0], val_data=run[2]).count


def test_a_scored_folder_may_have_an_empty_class_folder_as_val_data_may(run, tmp_path):
    # eval --data refused it: "a class without images cannot be learnt", though eval learns nothing, and the same
    # folder passed as --val-data was scored.
    out, _, other = run
    folder = tmp_path / "scored"
    shutil.copytree(other, folder)
    emptied = sorted(os.listdir(folder))[0]
    shutil.rmtree(folder / emptied)
    (folder / emptied).mkdir()
    by_data, by_val_data = evaluate(out, data=str(folder)), evaluate(out, val_data=str(folder))
    assert by_data.count == by_val_data.count == sum(len(os.listdir(folder / c)) for c in os.listdir(folder))
    assert by_data.per_class == by_val_data.per_class
    assert [r["support"] for r in by_data.per_class if r["class"] == emptied] == [0]


def test_the_library_refuses_an_ema_it_cannot_give_and_a_batch_size_below_one(run):
    # ema=True beside a loaded Checkpoint scored the checkpoint's own weights without a word; batch_size=0 was taken
    import cnnkit

    with pytest.raises(UserError, match=r"load it with cnnkit.load_checkpoint\(run, ema=True\)"):
        evaluate(cnnkit.load_checkpoint(run[0]), ema=True)
    for bad in (0, -1, 2.5):
        with pytest.raises(UserError, match="batch_size must be a whole number, 1 or more"):
            evaluate(run[0], batch_size=bad)


@pytest.mark.parametrize("folder", [False, True], ids=["shapes", "folder"])
def test_eval_of_a_smoke_run_scores_the_images_it_validated_on(tmp_path, folder):
    # a smoke run generates fewer shapes and validates on a sample of its validation images: eval rebuilds those,
    # not the validation set its recorded num_samples (none) would give, so its figures are the run's last epoch's
    data = ["--data", write_image_folder(str(tmp_path / "data"), n_per_class=150, classes=3)] if folder else []
    out = tmp_path / "run"
    proc = run_cli("train", "--smoke", *data, "--val-split", "0.9", "--batch-size", "8", "--threads", "1",
                   "--out", out)
    assert proc.returncode == 0, proc.stderr
    with open(out / "result.json") as f:
        result = json.load(f)
    r = evaluate(str(out / "last.pt"), threads=1)
    assert r.count == result["num_val"] == 256
    assert r.acc == result["val_acc"] and r.loss == pytest.approx(result["val_loss"], rel=1e-4)
    # and it says that they are a smoke run's: eval printed them as any run's score
    assert r.warnings == [f"{out / 'last.pt'} is from a smoke run (--smoke: at most 2 epochs a stage, each of at "
                          "most 5 batches), which checks that a command line runs: these figures are not how well "
                          "the model learns"]


def test_eval_of_an_overfit_batches_run_scores_the_batches_it_overfit_and_says_so(tmp_path, image_folder):
    # the run validated on the batches it overfit (as Lightning's overfit_batches does), but `cnnkit eval RUN`
    # scored the real held-out images under the run's name: figures unlike any the run reported
    out = tmp_path / "run"
    cnnkit.train(model="linear", data=image_folder, overfit_batches=1, batch_size=8, epochs=1, threads=1,
                 progress=False, out=str(out))
    with open(out / "result.json") as f:
        result = json.load(f)
    r = evaluate(str(out / "last.pt"), threads=1)
    assert r.count == result["num_val"] == 8
    assert r.acc == result["val_acc"] and r.loss == pytest.approx(result["val_loss"], rel=1e-4)
    assert r.scored == (f"images of {image_folder} the run overfit and validated on (--overfit-batches 1; "
                        "--val-split 0.1 scores its held-out images)") and r.val_split is None
    held_out = evaluate(str(out / "last.pt"), val_split=0.1, threads=1)  # the way to the held-out images
    assert held_out.count == 4 and held_out.scored.startswith("held-out images of")
