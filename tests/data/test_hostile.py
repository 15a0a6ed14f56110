"""Broken and hostile image files: every kind is either decoded correctly or reported with its path."""

import io
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cnnkit.data.images import load_image
from cnnkit.data.sources import DataSpec, load_splits
from cnnkit.errors import DataError
from tests.conftest import run_cli, write_image_folder


def _png_bytes(size=16, mode="RGB"):
    arr = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "PNG")
    return buf.getvalue()


def _jpeg_bytes(size=16):
    arr = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG")
    return buf.getvalue()


def make_hostile_folder(root):
    """A real ImageFolder tree holding every broken-file kind next to good images of odd modes.
    Returns the names of the files that must be reported as broken."""
    write_image_folder(root, n_per_class=6)
    c = os.path.join(root, "circle")
    broken = {
        "zero.jpg": b"",
        "truncated.jpg": _jpeg_bytes(64)[:300],
        "truncated.png": _png_bytes(64)[:200],
        "text.jpg": b"just some text, not an image\n",
        "huge.png": _png_bytes(200),  # over the pixel limit the test sets
    }
    for name, data in broken.items():
        with open(os.path.join(c, name), "wb") as f:
            f.write(data)
    os.symlink("loop_b.png", os.path.join(c, "loop_a.png"))
    os.symlink("loop_a.png", os.path.join(c, "loop_b.png"))
    # Odd but valid images: these must train.
    s = os.path.join(root, "square")
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 128))
    rgba.save(os.path.join(s, "alpha.png"))
    Image.fromarray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 256).save(os.path.join(s, "deep16.png"))
    Image.new("RGB", (16, 16), (0, 128, 255)).convert("CMYK").save(os.path.join(s, "cmyk.jpg"))
    Image.new("RGB", (16, 16), (0, 128, 255)).convert("P").save(os.path.join(s, "palette.gif"))
    exif_img = Image.new("RGB", (24, 16), (9, 9, 9))
    exif = exif_img.getexif()
    exif[0x0112] = 6
    exif_img.save(os.path.join(s, "rotated.jpg"), exif=exif)
    # Hidden files and folders are not data.
    os.makedirs(os.path.join(root, ".ipynb_checkpoints"))
    Image.new("RGB", (16, 16)).save(os.path.join(root, ".ipynb_checkpoints", "x.png"))
    with open(os.path.join(s, ".DS_Store"), "wb") as f:
        f.write(b"\0\1\2")
    return sorted(list(broken) + ["loop_a.png", "loop_b.png"])


def test_every_broken_kind_is_skipped_and_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("CNNKIT_MAX_PIXELS", str(100 * 100))
    root = str(tmp_path / "hostile")
    expected = make_hostile_folder(root)
    train, val = load_splits(DataSpec(root, input_size=16, val_split=0.2))
    assert len(train.skipped) == len(expected), train.skipped
    for name in expected:
        assert sum(f"circle/{name}" in m for m in train.skipped) >= 1, (name, train.skipped)
    assert len(train) + len(val) == 4 * 6 + 5  # the good shapes and the five odd-but-valid images
    assert train.classes == ["circle", "square", "star", "triangle"]


def test_cli_trains_with_skip_and_names_the_first_with_error(tmp_path):
    root = str(tmp_path / "hostile")
    expected = make_hostile_folder(root)
    env = {"CNNKIT_MAX_PIXELS": str(100 * 100)}
    out = tmp_path / "run"
    proc = run_cli("train", "--data", root, "--input-size", "16", "--epochs", "1", "--out", out, env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"cnnkit: warning: skipped {len(expected)} broken image(s)" in proc.stdout
    listed = (out / "bad_images.txt").read_text().splitlines()
    assert len(listed) == len(expected) and all(any(name in line for line in listed) for name in expected)
    # --quiet keeps the warnings: this line was not one, and quiet dropped it
    proc = run_cli("train", "--data", root, "--input-size", "16", "--epochs", "1", "--quiet", "--out",
                   tmp_path / "quiet", env=env)
    assert proc.returncode == 0 and f"skipped {len(expected)} broken image(s)" in proc.stderr, proc.stderr

    proc = run_cli("train", "--data", root, "--input-size", "16", "--bad-images", "error", "--out", tmp_path / "r2",
                   env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "circle/" in proc.stderr and "more broken" in proc.stderr
    assert not (tmp_path / "r2").exists()


def test_pixel_limit_is_enforced(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(_png_bytes(120))
    monkeypatch.setenv("CNNKIT_MAX_PIXELS", "10000")
    with pytest.raises(DataError, match="over the limit"):
        load_image(str(path), 3, 16)


@settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_image_bytes_decode_or_raise_data_error(tmp_path, data):
    """Mutated PNG/JPEG bytes: the decoder returns an image or a DataError, never another exception or a hang."""
    original = bytearray(data.draw(st.sampled_from([_png_bytes(), _jpeg_bytes(), _png_bytes(mode="P")])))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(original) - 1))
        original[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        original = original[: data.draw(st.integers(0, len(original)))]
    path = tmp_path / "fuzz.png"
    path.write_bytes(bytes(original))
    try:
        x = load_image(str(path), 3, 16)
        assert x.shape == (3, 16, 16)
    except DataError as e:
        assert "fuzz.png" in str(e)


def _tiny_checkpoint(folder):
    """A checkpoint of an untrained 16x16 simple_cnn: enough for predict, without a training run."""
    import cnnkit
    from cnnkit.checkpoint import make_payload, save_checkpoint

    model = cnnkit.create_model("simple_cnn", num_classes=2, input_size=16)
    path = str(folder / "tiny.pt")
    save_checkpoint(make_payload(model, ["a", "b"], 16, 3, [0.5] * 3, [0.25] * 3), path)
    return path


def _png_claiming(width, height):
    """A PNG whose header says width x height (the pixel data is an 8x8 image's: it is refused before decoding)."""
    import struct
    import zlib

    data = bytearray(_png_bytes(8, "L"))
    ihdr = bytearray(data[16:29])
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


@pytest.mark.parametrize("value", ["abc", "-5", "1e6"])
def test_a_bad_pixel_limit_setting_is_named_not_blamed_on_the_images(tmp_path, monkeypatch, value):
    from cnnkit.errors import UserError

    (tmp_path / "a.png").write_bytes(_png_bytes())
    monkeypatch.setenv("CNNKIT_MAX_PIXELS", value)
    with pytest.raises(UserError, match="CNNKIT_MAX_PIXELS must be a positive whole number") as e:
        load_image(str(tmp_path / "a.png"), 3, 16)
    assert not isinstance(e.value, DataError)


def test_cli_names_a_bad_pixel_limit_setting_in_predict_and_train(tmp_path):
    images = write_image_folder(str(tmp_path / "images"), n_per_class=3)
    env = {"CNNKIT_MAX_PIXELS": "abc", "CNNKIT_CACHE": str(tmp_path / "cache")}  # a cold cache decodes every file
    for args in (["predict", _tiny_checkpoint(tmp_path), images],
                 ["train", "--data", images, "--input-size", "16", "--epochs", "1", "--out", tmp_path / "run"]):
        proc = run_cli(*args, env=env)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "CNNKIT_MAX_PIXELS must be a positive whole number" in proc.stderr and "'abc'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_predict_names_symlink_loops_and_dangling_links(tmp_path):
    from cnnkit.data.images import image_paths
    from cnnkit.errors import UserError

    os.symlink("loop_b.png", tmp_path / "loop_a.png")
    os.symlink("loop_a.png", tmp_path / "loop_b.png")
    os.symlink("gone.png", tmp_path / "dangling.png")
    with pytest.raises(UserError, match="loop_a.png is a symbolic link that loops"):
        image_paths([str(tmp_path / "loop_a.png")])
    with pytest.raises(UserError, match="dangling.png is a symbolic link to gone.png, which does not exist"):
        image_paths([str(tmp_path / "dangling.png")])
    with pytest.raises(UserError, match="nothing.png does not exist"):
        image_paths([str(tmp_path / "nothing.png")])
    proc = run_cli("predict", _tiny_checkpoint(tmp_path), str(tmp_path / "loop_a.png"))
    assert proc.returncode == 2 and "symbolic link that loops" in proc.stderr and "does not exist" not in proc.stderr


def test_predict_given_a_file_by_name_and_in_its_folder_predicts_it_once(tmp_path):
    images = write_image_folder(str(tmp_path / "images"), n_per_class=2)
    one = os.path.join(images, "circle", "001.png")
    proc = run_cli("predict", _tiny_checkpoint(tmp_path), one, images, "--json")
    assert proc.returncode == 0, proc.stderr
    paths = [r["path"] for r in json.loads(proc.stdout)]
    assert len(paths) == len(set(paths)) == 8 and paths[0] == one  # once, where it was first named


def test_an_image_over_pillows_limit_gets_one_line(tmp_path):
    (tmp_path / "huge.png").write_bytes(_png_claiming(10_000, 10_000))  # over Pillow's 89,478,485 pixels
    proc = run_cli("predict", _tiny_checkpoint(tmp_path), tmp_path / "huge.png")
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "huge.png is 10000x10000 = 100,000,000 pixels, over the limit" in proc.stderr
    assert "DecompressionBombWarning" not in proc.stderr


def _alias_bomb_yaml(key):
    """``key:`` over nine levels of nine YAML aliases: 400 bytes that stand for 387 million values."""
    value = "&a0 [" + ", ".join(["x"] * 9) + "]"
    for i in range(1, 9):
        value = f"&a{i} [" + ", ".join([value] + [f"*a{i - 1}"] * 8) + "]"
    return f"{key}: {value}\n"


def _limit_memory():
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))  # torch's import alone maps about 3.5 GB


@pytest.mark.parametrize("case", ["bomb_batch_size", "bomb_stages", "model_opt", "model_options_file", "utf16",
                                  "lr_inf", "momentum_nan", "max_pixels", "symlink_loop"])
def test_hostile_input_gets_one_line_and_exit_2_within_time_and_memory(tmp_path, case):
    """Issue 24, items 1-6: each input is refused with one line naming it and exit code 2, in a process limited
    to 8 GB of address space and 120 s (the alias bombs ran past 60 s and 2.5 GB before)."""
    import subprocess
    import sys

    files = {"bomb_batch_size": _alias_bomb_yaml("batch_size"), "bomb_stages": _alias_bomb_yaml("stages"),
             "model_options_file": "model: convnet\nmodel_options: {widths: [x, y]}\n"}
    env = {"CNNKIT_CACHE": str(tmp_path / "cache")}
    train = ["train", "--num-samples", "64", "--smoke", "--out", str(tmp_path / "run")]
    if case in files:
        (tmp_path / "run.yaml").write_text(files[case])
        args, words = train + ["--config", "run.yaml"], {
            "bomb_batch_size": "more than 10,000 values", "bomb_stages": "more than 10,000 values",
            "model_options_file": "option widths must be a list of whole numbers"}[case]
    elif case == "utf16":
        (tmp_path / "run.yaml").write_bytes("epochs: 1\n".encode("utf-16"))
        args, words = train + ["--config", "run.yaml"], "not UTF-8 text"
    elif case == "model_opt":
        args, words = train + ["--model", "convnet", "--model-opt", 'widths=["x","y"]'], "option widths must be"
    elif case in ("lr_inf", "momentum_nan"):
        flag, value = ("--lr", "inf") if case == "lr_inf" else ("--momentum", "nan")
        args, words = train + [flag, value], f"argument {flag}: must be a"
    elif case == "max_pixels":
        (tmp_path / "a.png").write_bytes(_png_bytes())
        env["CNNKIT_MAX_PIXELS"] = "abc"
        args, words = ["predict", _tiny_checkpoint(tmp_path), "a.png"], "CNNKIT_MAX_PIXELS must be"
    else:
        os.symlink("loop_b.png", tmp_path / "loop_a.png")
        os.symlink("loop_a.png", tmp_path / "loop_b.png")
        args, words = ["predict", _tiny_checkpoint(tmp_path), "loop_a.png"], "symbolic link that loops"
    proc = subprocess.run([sys.executable, "-m", "cnnkit", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120, preexec_fn=_limit_memory)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr[-2000:]
    assert words in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("budget", [None, "100"])  # decoded in memory, and streamed from the files
def test_file_names_that_are_not_utf8_train_with_their_warnings_printed(tmp_path, budget):
    # os.walk gives such a name (a Latin-1 archive's) with surrogate escapes: hashing it for the cache or the run's
    # data fingerprint, or printing a warning that names it, must not fail the run.
    data = write_image_folder(str(tmp_path / "data"), n_per_class=6, size=16, classes=2)
    first, second = sorted(os.listdir(data))
    source = os.path.join(data, first, sorted(os.listdir(os.path.join(data, first)))[0])
    for folder in (first, second):  # the same image in both classes: a warning that names the two files
        with open(source, "rb") as f, open(os.path.join(data.encode(), folder.encode(), b"caf\xe9.png"), "wb") as g:
            g.write(f.read())
    env = {"CNNKIT_MEMORY_BUDGET": budget} if budget else {}
    for quiet in ([], ["--quiet"]):
        proc = run_cli("train", "--data", data, "--epochs", "1", "--precision", "fp32", *quiet,
                       "--out", tmp_path / f"run{len(quiet)}", env={**env, "PYTHONIOENCODING": "utf-8:strict"})
        assert proc.returncode == 0, proc.stderr
        if not quiet and not budget:
            assert "caf\\udce9.png" in proc.stdout + proc.stderr  # the warning, its bytes shown escaped
