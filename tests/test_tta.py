"""Test-time augmentation: the averaged views, a flip-invariant case, and eval/predict with --tta."""

import os

import pytest
import torch

import cnnkit
from cnnkit.errors import UserError
from cnnkit.checkpoint import trained_with_flips
from cnnkit.tta import TTAModel, _shifted, with_tta
from tests.conftest import run_cli

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def random_model():
    torch.manual_seed(0)
    return cnnkit.create_model("convnet", widths=(8, 16), batchnorm=False).eval()


def test_tta_averages_the_softmax_of_the_image_and_its_mirror():
    model, x = random_model(), torch.randn(4, 3, 32, 32)
    tta = TTAModel(model, MEAN, STD, flip=True).eval()
    expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    torch.testing.assert_close(tta(x).softmax(1), expected)
    assert not torch.allclose(tta(x).softmax(1), model(x).softmax(1), atol=1e-4)  # a no-op would be equal


def test_tta_changes_nothing_where_the_mirror_is_the_same():
    model = random_model()
    x = torch.randn(4, 3, 32, 32)
    symmetric = (x + x.flip(-1)) / 2  # images that are their own mirror image
    tta = TTAModel(model, MEAN, STD, flip=True).eval()
    torch.testing.assert_close(tta(symmetric).softmax(1), model(symmetric).softmax(1))

    class MirrorInvariant(torch.nn.Module):  # a network that already averages over the mirror image
        def forward(self, x):
            return (model(x).softmax(1) + model(x.flip(-1)).softmax(1)).log()

    invariant = MirrorInvariant()
    torch.testing.assert_close(TTAModel(invariant, MEAN, STD)(x).softmax(1), invariant(x).softmax(1))


def test_shifted_views_move_the_image_and_fill_with_black():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    black = torch.full((1, 1, 1, 1), -2.0)
    down = _shifted(x, 1, 0, black)
    assert torch.equal(down[0, 0, 0], torch.full((4,), -2.0)) and torch.equal(down[0, 0, 1:], x[0, 0, :3])
    left = _shifted(x, 0, -2, black)
    assert torch.equal(left[0, 0, :, :2], x[0, 0, :, 2:]) and (left[0, 0, :, 2:] == -2).all()
    assert TTAModel(random_model(), MEAN, STD, flip=True, shift=2).num_views == 6


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tta") / "run"
    cnnkit.train(model="cnn_bn", data="shapes", num_samples=256, val_split=0.25, epochs=2, batch_size=32,
                 progress=False, out=str(out))
    return str(out)


def test_eval_and_predict_with_tta(run, image_folder):
    plain, flipped = cnnkit.evaluate(run), cnnkit.evaluate(run, tta=True, tta_shift=1)
    assert flipped.tta_views == 6 and plain.tta_views == 1 and flipped.count == plain.count
    assert flipped.loss != plain.loss
    # A model trained with flips: its mirror-image guesses are about as good, so the average is no worse by much.
    assert flipped.acc >= plain.acc - 0.1

    with_tta = {r["path"]: r["top"][0]["prob"] for r in cnnkit.predict(run, image_folder, topk=1, tta=True)}
    without = {r["path"]: r["top"][0]["prob"] for r in cnnkit.predict(run, image_folder, topk=1)}
    assert with_tta.keys() == without.keys() and with_tta != without
    proc = run_cli("eval", run, "--tta")
    assert proc.returncode == 0 and "test-time augmentation: 2 views" in proc.stdout, proc.stderr


@pytest.mark.parametrize("config", [{"flip": False}, {"data": "mnist", "flip": None}])
def test_tta_flip_is_refused_for_a_model_trained_without_flips(config):
    with pytest.raises(UserError, match="without horizontal flips"):
        with_tta(random_model(), MEAN, STD, trained_with_flips(config), tta=True, shift=0)
    assert with_tta(random_model(), MEAN, STD, trained_with_flips(config), tta=False, shift=1).num_views == 5  # shifts alone are fine


@pytest.mark.parametrize("format, ending", [("onnx", ".onnx"), ("safetensors", ".safetensors")])
def test_an_export_of_a_model_trained_without_flips_refuses_the_mirror_as_its_run_does(tmp_path, image_folder,
                                                                                      format, ending):
    # Exports did not record the flips: `predict model.onnx --tta` of a digits model averaged in mirrored digits,
    # which `predict RUN --tta` refuses.
    run = cnnkit.train(model="cnn_bn", data="shapes", num_samples=64, val_split=0.25, epochs=1, batch_size=32,
                       flip=False, progress=False, out=str(tmp_path / "run"), log=open(os.devnull, "w")).run_dir
    exported = cnnkit.export(run, format, str(tmp_path / f"model{ending}")).path
    for model in (run, exported):
        with pytest.raises(UserError, match="without horizontal flips"):
            cnnkit.predict(model, image_folder, tta=True)
        assert len(cnnkit.predict(model, image_folder, tta_shift=1)) == len(cnnkit.predict(model, image_folder))
    if format == "safetensors":  # eval takes checkpoints only
        with pytest.raises(UserError, match="without horizontal flips"):
            cnnkit.evaluate(exported, val_data=image_folder, tta=True)
    flipped = cnnkit.export(cnnkit.train(model="cnn_bn", data="shapes", num_samples=64, val_split=0.25, epochs=1,
                                         batch_size=32, progress=False, out=str(tmp_path / "flipped"),
                                         log=open(os.devnull, "w")).run_dir, format, str(tmp_path / f"f{ending}"))
    assert cnnkit.predict(flipped.path, image_folder, tta=True)


def test_a_shift_as_large_as_the_input_is_refused():
    # --tta-shift 100 on a 32-pixel model averaged in four all-black views without a word.
    with pytest.raises(UserError, match="--tta-shift 32 moves the model's 32x32 input out of view"):
        with_tta(random_model(), MEAN, STD, None, tta=False, shift=32, input_size=32)
    assert with_tta(random_model(), MEAN, STD, None, tta=False, shift=31, input_size=32).num_views == 5


def test_predict_and_eval_refuse_a_shift_beyond_the_input(run, image_folder):
    for call in (lambda: cnnkit.predict(run, image_folder, tta_shift=100), lambda: cnnkit.evaluate(run, tta_shift=100)):
        with pytest.raises(UserError, match="--tta-shift 100 moves"):
            call()
