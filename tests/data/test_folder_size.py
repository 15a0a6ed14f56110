"""A folder's default input size comes from a sample of its images spread over the classes, not from its first
image, and a folder of widely mixed sizes is warned about in one line (check-data prints it, train too)."""

import io
import os

import numpy as np
import torch
from PIL import Image

import cnnkit
from cnnkit.checkpoint import load_checkpoint
from cnnkit.data.checks import check_splits
from cnnkit.data.sources import DataSpec, load_splits
from tests.conftest import run_cli, write_image_folder


def write_sized_folder(root, sizes, classes=("a", "b")):
    """Random-pixel PNGs: ``sizes[i]`` (width, height) for the i-th image of each class, files sorted by index."""
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i, (w, h) in enumerate(sizes):
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(root, c, f"{i:03d}.png"))
    return str(root)


def test_one_photo_first_among_thumbnails_does_not_decide(tmp_path):
    # a/000.png, the first file, is 400x300; the other 79 images are 32x32
    root = write_sized_folder(tmp_path / "mixed", [(32, 32)] * 40)
    Image.new("RGB", (400, 300)).save(os.path.join(root, "a", "000.png"))
    train, val = load_splits(DataSpec(root))
    assert train.size == 32 and train.images.shape[-2:] == (32, 32)
    warning, = train.warnings
    assert "shorter sides 32 to 300 pixels" in warning and "32x32" in warning and "--input-size N" in warning
    assert "\n" not in warning and not val.warnings  # said once, with the training set
    assert warning in check_splits(train, val).warnings  # what `train` prints before training

    proc = run_cli("check-data", root)
    assert proc.returncode == 0, proc.stderr
    assert "images of 3x32x32" in proc.stdout and f"warning: {warning}" in proc.stdout.splitlines()


def test_one_thumbnail_first_among_photos_does_not_shrink_them(tmp_path):
    root = write_sized_folder(tmp_path / "photos", [(300, 260)] * 6)
    Image.new("RGB", (32, 32)).save(os.path.join(root, "a", "000.png"))
    train, _ = load_splits(DataSpec(root))
    assert train.size == 224 and len(train.warnings) == 1 and "32 to 260" in train.warnings[0]


def test_a_folder_of_one_size_keeps_its_size_without_a_warning(tmp_path):
    assert load_splits(DataSpec(write_sized_folder(tmp_path / "one", [(48, 40)] * 5)))[0].size == 40
    # photos of several sizes all above 224 are read at 224, as before: nothing to warn about
    big = load_splits(DataSpec(write_sized_folder(tmp_path / "big", [(640, 480), (300, 400), (1000, 250)] * 2)))[0]
    assert big.size == 224 and not big.warnings
    given = load_splits(DataSpec(write_sized_folder(tmp_path / "given", [(32, 32), (300, 300)] * 3), input_size=64))[0]
    assert given.size == 64 and not given.warnings  # --input-size chose: no warning


def test_a_run_resumes_at_the_size_it_trained_at(tmp_path):
    # A run on a folder without --input-size records none: as if an earlier rule had chosen 24 pixels for this
    # 16-pixel folder, resuming must not re-choose (simple_cnn's flatten head fits one size only).
    data = write_image_folder(str(tmp_path / "images"), n_per_class=6, classes=3)
    out = tmp_path / "run"
    cnnkit.train(model="simple_cnn", data=data, input_size=24, epochs=1, batch_size=8, out=str(out), log=io.StringIO())
    for name in ("best.pt", "last.pt"):
        payload = torch.load(out / name, weights_only=True)
        payload["config"] = {**payload["config"], "input_size": None, "epochs": 2}
        torch.save(payload, out / name)
    result = cnnkit.train(resume=str(out), log=io.StringIO())
    assert result.epochs_run == 2 and load_checkpoint(str(out / "last.pt")).input_size == 24
