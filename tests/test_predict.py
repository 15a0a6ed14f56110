"""cnnkit.predict from Python: what it takes as the images, and its checks of its arguments."""

import pathlib

import pytest

import cnnkit
from cnnkit.errors import UserError
from tests.conftest import write_image_folder
from tests.test_export import write_checkpoint


def test_paths_may_be_pathlib_paths_as_the_checkpoint_may(tmp_path):
    # A pathlib.Path for the images failed with "'PosixPath' object is not iterable".
    ckpt = write_checkpoint(tmp_path / "best.pt", "cnn_bn")
    folder = pathlib.Path(write_image_folder(str(tmp_path / "images"), n_per_class=1, classes=2))
    image = sorted(folder.rglob("*.png"))[0]
    want = cnnkit.predict(ckpt, [str(image)], topk=2)
    assert cnnkit.predict(pathlib.Path(ckpt), image, topk=2) == want
    assert cnnkit.predict(ckpt, [image], topk=2) == want
    assert len(cnnkit.predict(ckpt, folder, topk=1)) == len(list(folder.rglob("*.png")))


def test_a_batch_size_below_one_is_a_user_error(tmp_path):
    # It was a raw "range() arg 3 must not be zero".
    ckpt = write_checkpoint(tmp_path / "best.pt", "cnn_bn")
    with pytest.raises(UserError, match="batch_size must be at least 1, got 0"):
        cnnkit.predict(ckpt, [str(tmp_path)], batch_size=0)


def test_an_image_that_does_not_decode_is_named_on_a_line_of_predicts_own(tmp_path, capsys):
    # The line said "cnnkit: error: ...", unlike every other command's "cnnkit COMMAND: error: ...".
    from cnnkit.cli import main

    ckpt = write_checkpoint(tmp_path / "best.pt", "cnn_bn")
    folder = pathlib.Path(write_image_folder(str(tmp_path / "images"), n_per_class=1, classes=2))
    (folder / "broken.png").write_bytes(b"not a png")
    assert main(["predict", ckpt, str(folder)]) == 1
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnkit predict: error: ") and "broken.png" in lines[0], err
    assert len(out.strip().splitlines()) == 2  # the two good images are still predicted
