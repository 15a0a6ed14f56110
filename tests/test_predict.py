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


def test_each_broken_image_is_named_with_what_is_wrong_and_what_to_do(tmp_path):
    # "cannot decode image X: cannot identify image file 'X'" named the file twice, said nothing of why (an empty
    # file, text under a .jpg name) and gave no fix; the images that decode are still predicted, as train skips
    ckpt = write_checkpoint(tmp_path / "best.pt", "cnn_bn")
    folder = pathlib.Path(write_image_folder(str(tmp_path / "images"), n_per_class=1, classes=2))
    good = sorted(folder.rglob("*.png"))[0]
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image\n")
    (folder / "cut.png").write_bytes(good.read_bytes()[:60])
    found = cnnkit.predict(ckpt, folder, topk=1)
    assert sum("top" in r for r in found) == 2 and len(found) == 5
    results = {pathlib.Path(r["path"]).name: r for r in found}
    assert results["empty.jpg"]["error"].endswith("empty.jpg: the file is empty (0 bytes); fix or remove it, the "
                                                  "other images are predicted")
    assert "text.jpg: its contents are not an image cnnkit reads" in results["text.jpg"]["error"]
    assert "cut.png: the file is cut short" in results["cut.png"]["error"]
    alone = cnnkit.predict(ckpt, folder / "text.jpg")[0]["error"]
    assert alone.endswith("; fix or remove it") and alone.count("text.jpg") == 1, alone
