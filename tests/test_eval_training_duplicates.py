"""`cnnkit eval RUN --val-data DIR` (or --data DIR) compares the images it scores with the ones the run trained on,
as `cnnkit train` compares its validation images: copies under other names used to inflate accuracy without a word."""

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

import cnnkit
from cnnkit.data.checks import TRAINING_PRINTS
from cnnkit.evaluate import evaluate
from tests.conftest import run_cli, write_idx, write_image_folder

CLASSES = ("circle", "square", "triangle")


def _photos(root, per_class, seed, size=32):
    """Smooth, photo-like pictures, each its own: perceptual hashes tell them apart (the shapes generator's
    pictures differ only in colour often enough, which the hash does not see)."""
    g = torch.Generator().manual_seed(seed)
    for c in CLASSES:
        os.makedirs(os.path.join(root, c))
        for i in range(per_class):
            small = torch.rand(1, 3, 6, 6, generator=g)
            photo = (torch.nn.functional.interpolate(small, size=(size, size), mode="bicubic")[0].clamp(0, 1) * 255)
            Image.fromarray(photo.round().to(torch.uint8).permute(1, 2, 0).numpy()).save(
                os.path.join(root, c, f"{i:03d}.png"))
    return str(root)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained on train/ (validated on held/), and test/: new pictures, 2 files copied from train/ under
    other names and one brightened and re-saved as JPEG."""
    root = tmp_path_factory.mktemp("eval_duplicates")
    train, held = _photos(root / "train", 12, seed=0), _photos(root / "held", 4, seed=1)
    test = _photos(root / "test", 5, seed=2)
    shutil.copy(os.path.join(train, "circle", "003.png"), os.path.join(test, "circle", "copy_a.png"))
    shutil.copy(os.path.join(train, "square", "007.png"), os.path.join(test, "square", "copy_b.png"))
    ImageEnhance.Brightness(Image.open(os.path.join(train, "triangle", "001.png")).convert("RGB")).enhance(1.2).save(
        os.path.join(test, "triangle", "brighter.jpg"), quality=80)
    out = str(root / "run")
    cnnkit.train(data=train, val_data=held, epochs=1, batch_size=16, progress=False, out=out, log=io.StringIO())
    return out, train, held, test


def test_eval_warns_of_scored_images_that_duplicate_training_images(run):
    out, train, _, test = run
    r = evaluate(out, val_data=test)
    assert r.count == 18
    (warning,) = r.warnings
    assert warning.startswith(f"3 of the 18 images of --val-data {test} (2 exact) duplicate images the run trained on")
    assert "evaluate on held-out images" in warning
    found = {os.path.basename(d.val): (d.exact, d.distance) for d in r.training_duplicates}
    assert set(found) == {"copy_a.png", "copy_b.png", "brighter.jpg"}
    assert found["copy_a.png"] == found["copy_b.png"] == (True, 0) and not found["brighter.jpg"][0]
    assert r.notes == []


def test_the_run_folder_keeps_the_fingerprints_so_eval_needs_no_training_data(run, tmp_path):
    out, train, _, test = run
    assert os.path.isfile(os.path.join(out, TRAINING_PRINTS))
    moved = str(tmp_path / "moved")
    shutil.move(train, moved)
    try:
        r = evaluate(out, val_data=test)
    finally:
        shutil.move(moved, train)
    assert len(r.training_duplicates) == 3 and r.warnings[0].startswith("3 of the 18 images")


def test_a_run_without_fingerprints_is_compared_with_its_rebuilt_training_images(run, tmp_path):
    # a run from before train kept them, or a checkpoint outside its run folder
    out, train, _, test = run
    best = tmp_path / "best.pt"
    shutil.copy(os.path.join(out, "best.pt"), best)
    r = evaluate(str(best), val_data=test)
    assert len(r.training_duplicates) == 3 and r.warnings[0].startswith("3 of the 18 images")
    assert {d.train for d in r.training_duplicates} == {os.path.join(train, "circle", "003.png"),
                                                        os.path.join(train, "square", "007.png"),
                                                        os.path.join(train, "triangle", "001.png")}
    moved = str(tmp_path / "moved")
    shutil.move(train, moved)
    try:  # neither recorded nor at hand: not compared, and a note says so
        r = evaluate(str(best), val_data=test)
    finally:
        shutil.move(moved, train)
    assert (r.training_duplicates, r.warnings) == (None, [])
    (note,) = r.notes
    assert f"{train} is not there" in note and TRAINING_PRINTS in note


def test_the_cli_warns_in_one_line_and_json_lists_them(run):
    out, _, _, test = run
    proc = run_cli("eval", out, "--val-data", test, "--json")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit: warning: 3 of the 18 images"), proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["training_duplicates"]) == 3 and result["notes"] == []
    assert {"val", "train", "distance", "exact", "matches"} == set(result["training_duplicates"][0])


def test_held_out_images_are_no_duplicates_and_the_runs_own_are_not_compared_again(run):
    out, _, held, _ = run
    fresh = evaluate(out, val_data=held)  # the run's own validation folder: train compared it already
    assert (fresh.training_duplicates, fresh.warnings, fresh.notes) == (None, [], [])
    assert evaluate(out).training_duplicates is None


def test_scoring_the_training_folder_warns_once_and_counts_every_image(run):
    out, train, _, _ = run
    r = evaluate(out, data=train)
    assert len(r.warnings) == 1 and "is the run's training data" in r.warnings[0], r.warnings
    assert len(r.training_duplicates) == r.count == 36 and all(d.exact for d in r.training_duplicates)


def test_a_set_too_large_for_memory_is_not_compared_as_train_does_not(run, monkeypatch):
    out, _, _, test = run
    monkeypatch.setenv("CNNKIT_MEMORY_BUDGET", "1")
    r = evaluate(out, val_data=test)
    assert (r.training_duplicates, r.warnings) == (None, [])
    assert len(r.notes) == 1 and "too large" in r.notes[0] and "check-data" in r.notes[0]


def test_a_shapes_run_is_not_compared(tmp_path):
    # train never compares the generated shapes (same shape, same place, another colour: the hash is colour-blind)
    out = str(tmp_path / "run")
    cnnkit.train(data="shapes", num_samples=200, epochs=1, batch_size=32, progress=False, out=out, log=io.StringIO())
    assert not os.path.exists(os.path.join(out, TRAINING_PRINTS))
    folder = write_image_folder(str(tmp_path / "val"), n_per_class=3, classes=2)
    r = evaluate(out, val_data=folder)
    assert (r.training_duplicates, r.notes) == (None, [])


def test_a_run_on_a_torchvision_dataset_keeps_its_fingerprints(tmp_path):
    pictures = (torch.nn.functional.interpolate(torch.rand(70, 1, 5, 5, generator=torch.Generator().manual_seed(3)),
                                                size=(28, 28), mode="bicubic").clamp(0, 1) * 255).round()
    pictures = pictures.to(torch.uint8)[:, 0].numpy()
    labels = (np.arange(70) % 10).astype(np.uint8)
    data_dir = str(tmp_path / "datasets")
    write_idx(os.path.join(data_dir, "MNIST", "raw"), "train", pictures[:50], labels[:50])
    write_idx(os.path.join(data_dir, "MNIST", "raw"), "t10k", pictures[50:], labels[50:])
    out = str(tmp_path / "run")
    cnnkit.train(data="mnist", data_dir=data_dir, epochs=1, batch_size=16, progress=False, out=out,
                 log=io.StringIO())
    folder = tmp_path / "val"
    classes = cnnkit.load_checkpoint(out).classes  # torchvision's names: "0 - zero", ...
    for i in (0, 1, 55):  # two training images, saved as PNG files, and a test image
        os.makedirs(folder / classes[labels[i]], exist_ok=True)
        Image.fromarray(pictures[i]).save(folder / classes[labels[i]] / f"{i}.png")
    r = evaluate(out, val_data=str(folder))
    assert [os.path.basename(d.val) for d in r.training_duplicates] == ["0.png", "1.png"]
    assert all(d.exact and d.train.startswith("mnist train #") for d in r.training_duplicates)
    # the test split, the run's own validation images, is not compared again
    assert evaluate(out, data="mnist", data_dir=data_dir).training_duplicates is None
    # a run without its fingerprints, whose dataset is gone: a note says why nothing was compared
    os.remove(os.path.join(out, TRAINING_PRINTS))
    shutil.rmtree(data_dir)
    r = evaluate(out, val_data=str(folder))
    assert (r.training_duplicates, r.warnings) == (None, [])
    assert len(r.notes) == 1 and "mnist could not be read" in r.notes[0], r.notes
