"""--input-size on commands that run a model on images: a model name is built for the size asked for (or the
data's own), and a run's model that cannot take the size asked for is a one-line error naming the size it takes."""

import functools
import os

import numpy as np
import pytest
import torch

import cnnkit
from cnnkit.checkpoint import make_payload, save_checkpoint
from cnnkit.embed import embed, probe
from cnnkit.errors import UserError
from cnnkit.inspect.feature_maps import feature_maps
from cnnkit.models.sizes import check_input_size
from tests.conftest import run_cli, write_image_folder
from tests.test_cli import assert_one_line_error


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A folder of 16-pixel images and a simple_cnn run trained on it (a flatten head sized for 16x16)."""
    root = tmp_path_factory.mktemp("input_size")
    data = write_image_folder(str(root / "images"), n_per_class=6)
    run = cnnkit.train(model="simple_cnn", data=data, epochs=1, batch_size=8, progress=False, out=str(root / "run"))
    return data, run.run_dir


@pytest.mark.parametrize("size", [8, 32])
def test_embed_and_probe_build_a_model_name_for_the_size_asked_for(folders, tmp_path, size):
    data, _ = folders
    out = str(tmp_path / "f.npy")
    assert embed("simple_cnn", data, out, input_size=size)["dim"] == 256  # simple_cnn's penultimate width
    assert np.load(out).shape == (24, 256)
    r = probe("simple_cnn", data, val_split=0.25, input_size=size)
    assert (r.feature_dim, r.num_train, r.num_val) == (256, 16, 8)


def test_a_model_name_without_input_size_is_built_for_the_datas_own_size(folders, tmp_path):
    data, _ = folders  # 16-pixel images: simple_cnn's flatten head would be sized for 32 by default
    assert embed("simple_cnn", data, str(tmp_path / "f.npy"))["images"] == 24
    assert probe("simple_cnn", data, val_split=0.25).num_val == 8


def test_a_run_at_a_size_its_flatten_head_cannot_take_is_one_line_naming_the_size_it_takes(folders, tmp_path):
    data, run = folders
    assert embed(run, data, str(tmp_path / "f.npy"), input_size=16)["images"] == 24  # its own size: fine
    for size, args in ((32, ("probe", run, data)), (8, ("embed", run, data, "--out", tmp_path / "f.npy"))):
        assert_one_line_error(run_cli(*args, "--input-size", size), 2,
                              f"takes 3x16x16 images and cannot run on 3x{size}x{size}", "pass --input-size 16")
    image = f"{data}/circle/001.png"
    with pytest.raises(UserError, match="takes 3x16x16 images and cannot run on 3x32x32"):
        feature_maps(run, ["features.0"], image, str(tmp_path / "maps"), input_size=32)


def test_check_input_size_lets_a_global_pool_head_take_other_sizes():
    pooled = cnnkit.create_model("resnet18", num_classes=4)
    for size in (16, 64):
        check_input_size(pooled, (3, size, size), (3, 32, 32), "resnet18")
    flat = cnnkit.create_model("simple_cnn", num_classes=4, input_size=32)
    check_input_size(flat, (3, 32, 32), (3, 32, 32), "simple_cnn")
    with pytest.raises(UserError, match=r"simple_cnn takes 3x32x32 images and cannot run on 3x16x16 .*"
                                        r"leave out --input-size, or pass --input-size 32"):
        check_input_size(flat, (3, 16, 16), (3, 32, 32), "simple_cnn")
    assert flat.training  # the check leaves the model's mode as it found it


def test_weights_of_a_run_trained_at_another_size_name_that_size(folders, tmp_path):
    data, run = folders  # simple_cnn at 16x16: its flatten head does not fit a simple_cnn built for 32x32
    with pytest.raises(UserError, match=r"shape mismatch .*; .* was trained on 16x16 images and this model is built "
                                        r"for 32x32: pass --input-size 16"):
        cnnkit.train(model="simple_cnn", data=data, weights=run, input_size=32, epochs=1, progress=False,
                     out=str(tmp_path / "run"))


class _WidthChecked(torch.nn.Module):
    """A model that checks its input width with `assert`, as torchvision's ViT does."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        assert x.shape[-1] == 16, f"Wrong image width! Expected 16 but got {x.shape[-1]}!"
        return self.conv(x).mean((2, 3))


def test_a_model_asserting_its_size_is_a_one_line_error_not_an_internal_one():
    # an AssertionError from the model's forward pass was "internal error: ... please report it"
    with pytest.raises(UserError, match=r"cannot run on 3x16x20 \(Wrong image width! Expected 16 but got 20!\)"):
        check_input_size(_WidthChecked(), (3, 16, 20), (3, 16, 16), "run r")
    with pytest.raises(UserError, match=r"cannot take a 3x16x20 input \(Wrong image width"):
        cnnkit.summary(_WidthChecked(), input_size=(3, 16, 20))


def test_training_a_model_its_images_shrink_to_nothing_in_is_one_line_before_the_run_folder(folders, tmp_path):
    # squeezenet1_1's pools leave nothing of a 16x16 image; PyTorch said so in the first step, as cnnkit's
    # "internal error", after the run folder was made
    data, _ = folders
    proc = run_cli("train", "--model", "squeezenet1_1", "--data", data, "--epochs", "1", "--out", tmp_path / "run")
    assert_one_line_error(proc, 2, "squeezenet1_1 cannot take 3x16x16 images", "use a larger --input-size")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(open("/proc/sys/vm/overcommit_memory").read().strip() == "1" if os.path.exists(
    "/proc/sys/vm/overcommit_memory") else True, reason="the kernel must refuse the 120 GB at once (Linux, no "
                                                         "overcommit-always), not kill the process later")
def test_an_input_size_too_large_for_the_memory_says_use_a_smaller_one(folders, tmp_path):
    # simple_cnn sizes its head with one image of zeros: 3 x 100,000 x 100,000 floats are 120 GB
    data, _ = folders
    proc = run_cli("train", "--data", data, "--input-size", "100000", "--epochs", "1", "--out", tmp_path / "run")
    assert_one_line_error(proc, 2, "input size 100000: one image does not fit in memory", "use a smaller --input-size")
    assert "too small" not in proc.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [["train", "--data", "shapes", "--input-size", "3", "32", "32"],
                                     ["lr-find", "--data", "shapes", "--input-size", "32", "32"],
                                     ["check-data", "--input-size", "1", "28", "28", "shapes"],
                                     ["probe", "simple_cnn", "shapes", "--input-size", "3", "32", "32"]])
def test_c_h_w_given_to_a_command_of_one_size_is_one_line_naming_the_form_it_takes(command, tmp_path):
    # argparse took the first number and left "32 32 ..." over, unrecognized, as if they were stray words
    proc = run_cli(*command, cwd=tmp_path)
    assert_one_line_error(proc, 2, f"--input-size takes one number in cnnkit {command[0]}", "side of the square",
                          "C H W is the form of the inspection commands")
    assert ("--channels 1 or 3" in proc.stderr) == (command[0] != "probe")  # probe reads the model's channels
    assert os.listdir(tmp_path) == []  # refused before any run folder


@pytest.mark.parametrize("size", [(3, 32, 32), [3, 32, 32]])
def test_c_h_w_given_to_the_python_api_of_one_size_is_a_user_error_not_a_type_error(size, tmp_path):
    for call in (lambda: cnnkit.check_data("shapes", input_size=size),
                 lambda: cnnkit.train(data="shapes", input_size=size, progress=False, out=str(tmp_path / "run"))):
        with pytest.raises(UserError, match="one positive whole number, the side of the square images") as e:
            call()
        assert "not C H W" in str(e.value) and "\n" not in str(e.value)
    assert not os.path.exists(tmp_path / "run")


@pytest.fixture
def real_builds(monkeypatch):
    """The models built for real (not on the meta device) while a test runs: alexnet's and simple_cnn's builds,
    each a name in the list."""
    from cnnkit.models import registry

    registry.check_model_name("alexnet")  # torchvision's models registered
    built = []
    for name in ("alexnet", "simple_cnn"):
        factory = registry._FACTORIES[name]

        @functools.wraps(factory)
        def counted(*args, _factory=factory, _name=name, **kwargs):
            if not torch.empty(0).is_meta:
                built.append(_name)
            return _factory(*args, **kwargs)

        monkeypatch.setitem(registry._FACTORIES, name, counted)
    return built


@pytest.fixture(scope="module")
def wide_run(tmp_path_factory):
    """A checkpoint of simple_cnn built for 160-pixel images: its flatten head's 13 M parameters take that size
    only."""
    model = cnnkit.create_model("simple_cnn", num_classes=4, input_size=160)
    path = str(tmp_path_factory.mktemp("wide") / "wide.pt")
    save_checkpoint(make_payload(model, ["a", "b", "c", "d"], 160, 3, [0.5] * 3, [0.25] * 3), path)
    return path


def test_training_at_a_size_the_model_cannot_take_is_refused_before_the_model_is_built(folders, tmp_path,
                                                                                         real_builds):
    # vgg11 at 28 pixels: the error came after 11 s, most of them making its 133 M random weights (alexnet's
    # pools are as unforgiving and its weights fewer)
    data, _ = folders
    for command in (cnnkit.train, cnnkit.lr_find):
        with pytest.raises(UserError, match=r"alexnet cannot take 3x16x16 images \(Given input size: \(192x1x1\)\. "
                                            r"Calculated output size: \(192x0x0\)\. Output size is too small\); use "
                                            r"a larger --input-size \(the smallest it takes: 63\)"):
            command(model="alexnet", data=data, epochs=1, progress=False, out=str(tmp_path / "run"))
    assert real_builds == [] and not (tmp_path / "run").exists()


def test_inspecting_a_run_at_a_size_it_cannot_take_is_refused_before_its_model_is_built(folders, wide_run,
                                                                                         tmp_path, real_builds):
    data, _ = folders
    words = (r"wide\.pt takes 3x160x160 images and cannot run on 3x32x32 \(mat1 and mat2 shapes cannot be multiplied "
             r"\(1x2048 and 51200x256\)\); leave out --input-size, or pass --input-size 160")
    for call in (lambda: cnnkit.summary(wide_run, input_size=32),
                 lambda: feature_maps(wide_run, ["features.0"], f"{data}/circle/001.png", str(tmp_path / "maps"),
                                      input_size=32),
                 lambda: embed(wide_run, data, str(tmp_path / "f.npy"), input_size=32)):
        with pytest.raises(UserError, match=words):
            call()
    assert real_builds == []
    cnnkit.summary(wide_run)  # its own size: built, and fine
    assert real_builds == ["simple_cnn"]


def test_a_model_name_run_at_a_size_it_cannot_take_is_refused_before_it_is_built(folders, tmp_path, real_builds):
    data, _ = folders
    image = f"{data}/circle/001.png"
    with pytest.raises(UserError, match=r"the model cannot take a 3x16x16 input \(Given input size: \(192x1x1\)"):
        feature_maps("alexnet", ["features.0"], image, str(tmp_path / "maps"), input_size=16)
    with pytest.raises(UserError, match=r"the model cannot take a 3x16x16 input .* \(the smallest it takes: 63\)"):
        cnnkit.class_activation_map("alexnet", image, out=str(tmp_path / "cam.png"), input_size=16, progress=False)
    with pytest.raises(UserError, match=r"alexnet cannot take 3x16x16 images .* \(the smallest it takes: 63\)"):
        embed("alexnet", data, str(tmp_path / "f.npy"))  # the folder's own 16 pixels
    assert real_builds == []
