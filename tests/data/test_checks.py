"""check-data: class balance, duplicates planted between training and validation, the data against a model."""

import dataclasses
import hashlib
import io
import json
import os
import shutil

import pytest
import torch
from PIL import Image, ImageEnhance

from cnnkit.data.checks import SMALL_VAL, check_data, check_splits, class_weights, format_check, perceptual_hashes
from cnnkit.data.sources import DataSpec, ImageSet, load_splits
from tests.conftest import run_cli, write_image_folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A training and a validation folder of different generated images, and three training images planted in
    validation: a copy, a re-encoded JPEG and a brighter version. Returns (train, val, {val path: train path})."""
    root = tmp_path_factory.mktemp("planted")
    train = write_image_folder(str(root / "train"), n_per_class=10, size=32, seed=0)
    val = write_image_folder(str(root / "val"), n_per_class=4, size=32, seed=5)
    sources = {c: os.path.join(train, c, name) for c, name in
               (("circle", "002.png"), ("square", "005.png"), ("star", "007.png"))}
    copy = os.path.join(val, "circle", "copy.png")
    shutil.copy(sources["circle"], copy)
    jpeg = os.path.join(val, "square", "reencoded.jpg")
    Image.open(sources["square"]).convert("RGB").save(jpeg, quality=70)
    brighter = os.path.join(val, "star", "brighter.png")
    ImageEnhance.Brightness(Image.open(sources["star"]).convert("RGB")).enhance(1.15).save(brighter)
    return train, val, {copy: sources["circle"], jpeg: sources["square"], brighter: sources["star"]}


def test_check_data_names_planted_duplicates(planted):
    train, val, pairs = planted
    proc = run_cli("check-data", train, "--val-data", val, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    found = {d["val"]: d for d in result["duplicates"]}
    assert {v: d["train"] for v, d in found.items()} == pairs  # all three, and nothing else
    assert [found[v]["exact"] for v in pairs] == [True, False, False]
    assert all(d["distance"] <= result["threshold"] for d in found.values())
    assert result["train_counts"] == [10, 10, 10, 10] and result["val_counts"] == [5, 5, 5, 4]
    assert any("3 validation image(s) (1 exact)" in w for w in result["warnings"])

    text = format_check(check_data(train, val_data=val))
    assert all(v in text and t in text for v, t in pairs.items())


def test_duplicates_in_a_set_too_large_for_memory(planted, monkeypatch):
    train, val, pairs = planted
    monkeypatch.setenv("CNNKIT_MEMORY_BUDGET", "1")  # decoded per batch: the check decodes thumbnails itself
    assert load_splits(DataSpec(train, val_data=val))[0].images is None
    result = check_data(train, val_data=val)
    assert {d.val: d.train for d in result.duplicates} == pairs and result.duplicates_checked


def test_a_brightened_and_resaved_copy_is_caught(tmp_path):
    """Brightened 1.2x and re-saved at JPEG quality 80: 6 bits from its original here (each change alone moves
    fewer), which the old threshold of 4 missed; benchmarks/duplicate_threshold.py measured the threshold."""
    g = torch.Generator().manual_seed(6)  # a smooth, photo-like picture
    small = torch.rand(1, 3, 6, 6, generator=g)
    photo = (torch.nn.functional.interpolate(small, size=(32, 32), mode="bicubic")[0].clamp(0, 1) * 255).round()
    train = write_image_folder(str(tmp_path / "train"), n_per_class=10, size=32, seed=0)
    val = write_image_folder(str(tmp_path / "val"), n_per_class=4, size=32, seed=5)
    original = os.path.join(train, "circle", "photo.png")
    Image.fromarray(photo.to(torch.uint8).permute(1, 2, 0).numpy()).save(original)
    copy = os.path.join(val, "circle", "brighter.jpg")
    ImageEnhance.Brightness(Image.open(original).convert("RGB")).enhance(1.2).save(copy, quality=80)
    result = check_data(train, val_data=val)
    (found,) = result.duplicates
    assert (found.val, found.train, found.exact) == (copy, original, False)
    assert 4 < found.distance <= result.threshold


def test_a_near_duplicate_hashes_close_and_a_different_image_far():
    torch.manual_seed(0)
    a = (torch.rand(1, 3, 8, 8) * 255).to(torch.uint8).repeat_interleave(4, 2).repeat_interleave(4, 3)
    buffer = io.BytesIO()
    Image.fromarray(a[0].permute(1, 2, 0).numpy()).save(buffer, "JPEG", quality=60)
    jpeg = torch.from_numpy(__import__("numpy").array(Image.open(buffer))).permute(2, 0, 1)[None]
    other = torch.flip(a, dims=[3])
    h = perceptual_hashes(torch.cat([a, jpeg, other]))
    distance = [bin(int(h[0]) ^ int(x)).count("1") for x in h]
    assert distance[1] <= 4 < 16 <= distance[2]


def test_a_small_validation_set_is_warned_about_with_its_accuracy_step(tmp_path):
    folder = write_image_folder(str(tmp_path / "small"), n_per_class=20, size=16)  # 80 images, 4 classes
    (warning,) = [w for w in check_data(folder, val_split=0.05).warnings if "validation image" in w]
    assert warning.startswith("only 4 validation image(s): one image moves validation accuracy by 0.2500,")
    assert "a larger --val-split" in warning and "--val-data DIR" in warning
    val = write_image_folder(str(tmp_path / "val"), n_per_class=3, size=16, seed=1)
    (warning,) = [w for w in check_data(folder, val_data=val).warnings if "validation image" in w]
    assert warning.startswith("only 12 validation image(s): one image moves validation accuracy by 0.0833,")
    assert warning.endswith(f"add images to --val-data {val}") and "--val-split" not in warning
    assert not [w for w in check_data(folder, val_split=0.7).warnings if "validation image" in w]  # 56 images
    # train prints it before training
    proc = run_cli("train", "--data", folder, "--val-split", "0.05", "--epochs", "1", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert "cnnkit: warning: only 4 validation image(s): one image moves validation accuracy by 0.2500" in proc.stdout


def test_a_class_of_one_image_gets_no_validation_image_from_any_split(tmp_path):
    folder = write_image_folder(str(tmp_path / "one"), n_per_class=12, size=16)
    for name in sorted(os.listdir(os.path.join(folder, "circle")))[1:]:
        os.unlink(os.path.join(folder, "circle", name))
    (warning,) = [w for w in check_data(folder, val_split=0.5).warnings if "no validation images" in w]
    # a larger --val-split would not help: split() keeps a class's only image for training
    assert "circle" in warning and "only image" in warning and "larger --val-split" not in warning


def test_every_class_without_validation_images_is_counted_in_the_warning():
    # 7 of 10 classes have no validation image: the warning names 5 and says how many more, so that no reader
    # takes the 2 left unnamed for classes that have some
    classes = [f"c{i}" for i in range(10)]
    train = ImageSet(torch.arange(10).repeat(3), classes, torch.zeros(30, 3, 8, 8, dtype=torch.uint8), size=8,
                     source="train")
    val = ImageSet(torch.tensor([0, 1, 2]), classes, torch.full((3, 3, 8, 8), 255, dtype=torch.uint8), size=8,
                   source="val")
    (warning,) = [w for w in check_splits(train, val).warnings if "no validation images" in w]
    assert warning.startswith("no validation images of c3, c4, c5, c6, c7 and 2 more: their recall cannot be measured")


def test_imbalance_warning_suggests_class_weights(tmp_path):
    folder = write_image_folder(str(tmp_path / "imbalanced"), n_per_class=12, size=16)
    for name in sorted(os.listdir(os.path.join(folder, "circle")))[:9]:
        os.unlink(os.path.join(folder, "circle", name))
    result = check_data(folder, val_split=0.25)
    assert result.train_counts[0] * 3 <= max(result.train_counts) and result.imbalance >= 3
    (warning,) = [w for w in result.warnings if "imbalanced" in w]
    assert "--class-weights auto" in warning and "--balanced-sampler" in warning and "circle" in warning
    weights = class_weights(torch.tensor([0] * 2 + [1] * 8), 2)
    assert weights == pytest.approx([10 / (2 * 2), 10 / (2 * 8)])


def grey_set(n=40, level=30, channels=3, size=32):
    torch.manual_seed(n)  # the 10-image validation sets differ from the 40-image training sets
    grey = (torch.rand(n, 1, size, size) * 2 * level).to(torch.uint8)  # dark, like MNIST or X-rays
    return ImageSet(torch.arange(n) % 2, ["a", "b"], grey.expand(-1, channels, -1, -1).contiguous(), None, channels,
                    size, "generated")


def test_data_against_the_model():
    train, val = grey_set(), grey_set(10)
    result = check_splits(train, val, "resnet18", pretrained=True)
    assert any("ImageNet" not in w and "normalised as torchvision's pretrained resnet18" in w for w in result.warnings)
    assert any("grey (R = G = B)" in n for n in result.notes)
    one = check_splits(grey_set(channels=1), grey_set(10, channels=1), "resnet18", pretrained=True)
    assert any("adapt_input_conv" in n for n in one.notes)
    small = check_splits(grey_set(size=32), grey_set(10, size=32), "inception_v3")
    assert any("at least 75x75" in w for w in small.warnings)
    unknown = check_splits(train, val, "simple_cnn", weights_label="weights.pth")
    assert any("records no input normalisation" in w for w in unknown.warnings)
    # own statistics, balanced, no leaks, and validation images enough for a fine-grained accuracy
    assert not check_splits(train, grey_set(SMALL_VAL), "simple_cnn").warnings


def test_check_data_bad_input_is_one_line(tmp_path):
    proc = run_cli("check-data", tmp_path / "missing")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "missing" in proc.stderr


def test_check_data_lists_broken_images(tmp_path):
    folder = write_image_folder(str(tmp_path / "broken"), n_per_class=10, size=32)
    good = os.path.join(folder, "circle", "001.png")
    jpeg = io.BytesIO()
    Image.open(good).convert("RGB").save(jpeg, "JPEG", quality=90)
    broken = {os.path.join(folder, "circle", "empty.jpg"): b"",
              os.path.join(folder, "square", "truncated.jpg"): jpeg.getvalue()[: len(jpeg.getvalue()) // 2],
              os.path.join(folder, "star", "notes.jpg"): b"not an image, just text\n",
              os.path.join(folder, "triangle", "garbage.png"): bytes(range(256)) * 4}
    for path, data in broken.items():
        with open(path, "wb") as f:
            f.write(data)
    proc = run_cli("check-data", folder, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    listed = result["bad_images"]
    assert len(listed) == len(broken) and all(any(p in line for line in listed) for p in broken), listed
    assert sum(result["train_counts"]) + sum(result["val_counts"]) == 40  # the broken ones left out
    assert any("4 broken image(s)" in w for w in result["warnings"])
    text = run_cli("check-data", folder).stdout
    assert "broken images: 4" in text and all(p in text for p in broken)


def test_a_second_check_of_the_same_images_finds_their_hashes_cached(tmp_path, monkeypatch):
    import cnnkit.data.checks as checks

    monkeypatch.setenv("CNNKIT_CACHE", str(tmp_path / "cache"))
    write_image_folder(tmp_path / "data", n_per_class=6, size=16, classes=2)
    spec = DataSpec(str(tmp_path / "data"), val_split=0.5)
    train, val = load_splits(spec)
    first = check_splits(train, val, hash_files=False)
    calls = []
    real = checks.perceptual_hashes
    monkeypatch.setattr(checks, "perceptual_hashes", lambda images: calls.append(len(images)) or real(images))
    checks.cache._MEMORY.clear()  # from the disk, as a new process would
    second = check_splits(train, val, hash_files=False)
    assert calls == [] and second.duplicates == first.duplicates
    altered = dataclasses.replace(val, images=val.images.clone())
    altered.images[0] ^= 255  # other pixels: hashed afresh
    check_splits(train, altered, hash_files=False)
    assert calls == [len(val)]


def test_the_folder_key_is_relpaths_for_every_spelling_of_the_root(tmp_path, monkeypatch):
    import os

    from cnnkit.data.cache import files_fingerprint
    from cnnkit.data.sources import scan_folder

    write_image_folder(tmp_path / "data", n_per_class=2, size=8, classes=2)
    monkeypatch.chdir(tmp_path)
    keys = set()
    for root in ("data", "data/", "./data", str(tmp_path / "data"), "data/../data", "data//"):
        files = scan_folder(root)[0]
        keys.add(files_fingerprint(root, files))
        reference = hashlib.sha256()
        for f in files:
            st = os.stat(f)
            reference.update(f"{os.path.relpath(f, root)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
        assert files_fingerprint(root, files) == reference.hexdigest(), root
    assert len(keys) == 1


def test_a_split_of_classes_with_one_image_each_says_why_none_is_held_out():
    data = ImageSet(torch.arange(3), ["a", "b", "c"], torch.zeros(3, 3, 8, 8, dtype=torch.uint8), size=8)
    from cnnkit.data.sources import split
    from cnnkit.errors import UserError

    with pytest.raises(UserError, match="no class has two images, so --val-split can hold none out for validation; "
                                        r"add images \(two or more per class\) or pass --val-data DIR"):
        split(data, 0.5)


def test_an_image_filed_under_two_classes_is_a_label_conflict(tmp_path):
    root = write_image_folder(str(tmp_path / "data"), n_per_class=10, classes=3)
    clean = check_data(root)
    assert not any("two or more classes" in w for w in clean.warnings), clean.warnings
    classes = sorted(os.listdir(root))
    shutil.copy(os.path.join(root, classes[0], "001.png"), os.path.join(root, classes[1], "copy.png"))
    c = check_data(root)
    conflict = [w for w in c.warnings if "two or more classes" in w]
    assert len(conflict) == 1 and conflict[0].startswith("1 image(s) appear under two or more classes with identical "
                                                         "pixels, e.g. "), c.warnings
    assert f"{classes[0]}/001.png ({classes[0]})" in conflict[0] and f"{classes[1]}/copy.png ({classes[1]})" in conflict[0]


def test_one_class_is_refused_by_train_and_named_by_check_data(tmp_path):
    # every image is the one class: training "reaches" accuracy 1.0 learning nothing
    folder = str(tmp_path / "one")
    write_image_folder(str(tmp_path / "all"), n_per_class=8, size=16)
    shutil.copytree(os.path.join(tmp_path, "all", "circle"), os.path.join(folder, "circle"))
    message = f"{folder} has one class, circle; a classifier needs two or more: add a folder per class"
    proc = run_cli("train", "--data", folder, "--epochs", "1", "--out", tmp_path / "run")
    assert proc.returncode == 2 and proc.stderr.strip() == f"cnnkit train: error: {message}, each holding that " \
        "class's images", proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()
    check = check_data(folder)
    assert [w for w in check.warnings if "one class" in w] == [message + ", each holding that class's images"]
    text = format_check(check)
    assert ", 1 class; mean" in text and "1 classes" not in text
