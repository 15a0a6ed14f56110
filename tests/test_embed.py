"""`cnnkit embed` says which image each feature row is: ``<out>.paths.csv`` beside ``<out>`` and its labels."""

import csv
import os
import shutil

import numpy as np
import pytest
import torch

import cnnkit
from cnnkit.checkpoint import load_checkpoint
from cnnkit.data.sources import DataSpec, ImageSet, load_eval_set
from cnnkit.errors import DataError
from cnnkit.embed import embed, features, load_backbone, rows_csv
from tests.conftest import run_cli


def read_rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_embed_writes_each_rows_image_beside_the_features(tmp_path, image_folder):
    run = cnnkit.train(model="cnn_bn", data=image_folder, epochs=1, batch_size=8, progress=False,
                       out=str(tmp_path / "run"))
    out = tmp_path / "emb" / "f.npy"
    os.makedirs(out.parent)
    proc = run_cli("embed", run.run_dir, image_folder, "--out", out)
    assert proc.returncode == 0, proc.stderr
    paths = tmp_path / "emb" / "f.paths.csv"
    assert f"to {out}, their labels (the run's class indices) to {tmp_path / 'emb' / 'f.labels.npy'}" in proc.stdout
    assert f"each row's image file, label and class to {paths}" in proc.stdout
    assert sorted(os.listdir(out.parent)) == ["f.labels.npy", "f.npy", "f.paths.csv"]  # no temp file left behind

    feats, labels, rows = np.load(out), np.load(tmp_path / "emb" / "f.labels.npy"), read_rows(paths)
    assert list(rows[0]) == ["row", "path", "label", "class"]
    assert len(rows) == len(feats) == len(labels) == 32
    assert [int(r["row"]) for r in rows] == list(range(32)) and [int(r["label"]) for r in rows] == labels.tolist()
    for r in rows:  # each file is in its class's folder
        assert os.path.isfile(r["path"]) and os.path.basename(os.path.dirname(r["path"])) == r["class"]
    # Row k is the features of the file the CSV names in row k: that image alone gives the same features.
    backbone = load_backbone(run.run_dir)
    for k in (0, 13, 31):
        single = tmp_path / f"single{k}" / rows[k]["class"]
        os.makedirs(single)
        shutil.copy(rows[k]["path"], single)
        alone = features(backbone, load_eval_set(DataSpec(str(single.parent), input_size=backbone.input_size,
                                                          channels=backbone.channels)))
        np.testing.assert_allclose(alone[0], feats[k], rtol=1e-4, atol=1e-5)
        assert not np.allclose(feats[k], feats[(k + 1) % 32], rtol=1e-4, atol=1e-5)


def test_rows_of_a_builtin_dataset_have_no_path_but_their_label_and_class():
    images = ImageSet(labels=torch.tensor([2, 0, 1]), classes=["a", "b, with a comma", "c"])
    text = rows_csv(images)
    assert text.splitlines() == ["row,path,label,class", "0,,2,c", '1,,0,a', '2,,1,"b, with a comma"']


def test_a_runs_embed_labels_rows_by_the_runs_classes(tmp_path, image_folder):
    """A folder holding some of a run's classes gets the run's indices and names, so two embeds of one run combine;
    a class the run does not have is a one-line error naming it; a model name keeps the folder's own classes."""
    run = cnnkit.train(model="cnn_bn", data=image_folder, epochs=1, batch_size=8, progress=False,
                       out=str(tmp_path / "run"))
    assert load_checkpoint(run.run_dir).classes == ["circle", "square", "star", "triangle"]
    some = tmp_path / "some"
    for name in ("square", "triangle"):
        shutil.copytree(os.path.join(image_folder, name), some / name)
    proc = run_cli("embed", run.run_dir, some, "--out", tmp_path / "f.npy")
    assert proc.returncode == 0, proc.stderr
    rows, labels = read_rows(tmp_path / "f.paths.csv"), np.load(tmp_path / "f.labels.npy")
    assert [(r["class"], int(r["label"])) for r in rows] == [("square", 1)] * 8 + [("triangle", 3)] * 8
    assert labels.tolist() == [1] * 8 + [3] * 8
    assert "their labels (the run's class indices)" in proc.stdout

    shutil.copytree(os.path.join(image_folder, "circle"), some / "ellipse")
    proc = run_cli("embed", run.run_dir, some, "--out", tmp_path / "g.npy")
    assert proc.returncode == 2 and "ellipse" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "g.npy")

    # A model name has no classes of its own: the folder's are the labels, numbered by its sub-folders.
    proc = run_cli("embed", "cnn_bn", some, "--out", tmp_path / "h.npy")
    assert proc.returncode == 0, proc.stderr
    assert [(r["class"], int(r["label"])) for r in read_rows(tmp_path / "h.paths.csv")][::8] == \
        [("ellipse", 0), ("square", 1), ("triangle", 2)]


def test_a_runs_embed_of_a_new_dataset_keeps_its_own_classes(tmp_path, image_folder):
    """Features of a run's backbone for a dataset that shares no class with it (a new dataset) are labelled by
    the dataset's own classes, and the summary says so."""
    run = cnnkit.train(model="cnn_bn", data=image_folder, epochs=1, batch_size=8, progress=False,
                       out=str(tmp_path / "run"))
    other = tmp_path / "other"
    for old, new in (("circle", "b"), ("square", "a")):
        shutil.copytree(os.path.join(image_folder, old), other / new)
    proc = run_cli("embed", run.run_dir, other, "--out", tmp_path / "f.npy")
    assert proc.returncode == 0, proc.stderr
    assert [(r["class"], int(r["label"])) for r in read_rows(tmp_path / "f.paths.csv")][::8] == [("a", 0), ("b", 1)]
    assert f"their labels ({other}'s own classes: the run has none of them)" in proc.stdout


def test_broken_images_are_named_and_a_file_that_breaks_later_is_no_shifted_row(tmp_path, image_folder,
                                                                                 monkeypatch):
    # Broken images were left out without a word; and one that decoded at the scan but not when its batch was
    # read made the feature rows one short, every later row paired with the next file's path and label.
    ckpt = str(tmp_path / "best.pt")
    from tests.test_export import write_checkpoint

    write_checkpoint(ckpt, "cnn_bn", classes=sorted(os.listdir(image_folder)))
    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    first = sorted(p for p in data.rglob("*.png"))[0]
    (first.parent / "empty.png").write_bytes(b"")
    r = embed(ckpt, str(data), str(tmp_path / "f.npy"))
    assert len(r["warnings"]) == 1 and "left out 1 broken image(s)" in r["warnings"][0]
    assert "empty.png" in r["warnings"][0]
    proc = run_cli("embed", ckpt, data, "--out", tmp_path / "g.npy")
    assert proc.returncode == 0 and "cnnkit: warning: left out 1 broken image(s)" in proc.stderr, proc.stderr

    monkeypatch.setenv("CNNKIT_MEMORY_BUDGET", "1")  # streamed: decoded batch by batch
    backbone = load_backbone(ckpt)
    images = load_eval_set(DataSpec(str(data), input_size=backbone.input_size, channels=backbone.channels))
    assert images.images is None
    first.write_bytes(b"not a png any more")
    with pytest.raises(DataError, match="could not be decoded now"):
        features(backbone, images)


def test_an_out_that_cannot_be_written_is_a_one_line_error_before_any_work(tmp_path, image_folder):
    # It was an internal error (FileNotFoundError, IsADirectoryError), after every feature had been computed.
    from tests.test_export import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "best.pt", "cnn_bn", classes=sorted(os.listdir(image_folder)))
    (tmp_path / "a_file").write_text("")
    (tmp_path / "folder.npy").mkdir()
    for out, words in ((tmp_path / "a_file" / "f.npy", "cannot write --out"),
                       (tmp_path / "folder.npy", "is a folder")):
        proc = run_cli("embed", ckpt, image_folder, "--out", out)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert words in proc.stderr and "internal error" not in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["a_file", "best.pt", "folder.npy", "images"]
    assert os.listdir(tmp_path / "folder.npy") == []


def test_pretrained_beside_a_checkpoint_is_refused(tmp_path, image_folder):
    # The checkpoint's weights were used and --pretrained dropped without a word.
    from tests.test_export import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "best.pt", "cnn_bn", classes=sorted(os.listdir(image_folder)))
    for command in (["embed", ckpt, image_folder, "--out", tmp_path / "f.npy"], ["probe", ckpt, image_folder]):
        proc = run_cli(*command, "--pretrained")
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "--pretrained loads torchvision's weights into a model name" in proc.stderr


def test_images_too_small_for_a_model_name_are_the_one_line_size_error(tmp_path, image_folder):
    # embed and probe of vgg16 at 16x16 ran the forward pass unchecked: "internal error: RuntimeError: ... Output
    # size is too small", where train names the smallest size the model takes.
    out = tmp_path / "f.npy"
    for command in (["embed", "vgg16", image_folder, "--input-size", 16, "--out", out],
                    ["probe", "vgg16", image_folder, "--input-size", 16]):
        proc = run_cli(*command)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.strip().endswith("use a larger --input-size (the smallest it takes: 32)"), proc.stderr
    assert not out.exists()
