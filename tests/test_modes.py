"""Mode safety: every inspection, evaluation and export entry point leaves a model in train mode, and one in eval
mode, exactly as it found it: each module's ``training`` flag and every BatchNorm buffer (running mean, running
variance, num_batches_tracked), bit for bit. The model in train mode holds one BatchNorm layer in eval mode, the
state fine-tuning with a frozen layer leaves it in, which a bare ``model.train()`` afterwards would not restore."""

import os

import pytest
import torch

import cnnkit
from cnnkit.data.sources import DataSpec, load_eval_set
from cnnkit.embed import Backbone, features
from cnnkit.modes import eval_mode, preserve_modes
from cnnkit.checkpoint import Checkpoint
from tests.conftest import write_image_folder

ENTRY_POINTS = ["summary", "rf", "features", "filters", "cam", "evaluate", "export", "predict", "embed"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(str(tmp_path_factory.mktemp("modes") / "images"), n_per_class=4, size=32)


def make_model(mode: str, classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = cnnkit.create_model("convnet", num_classes=classes, input_size=32, batchnorm=True, dropout=0.5)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, 32, 32))  # running statistics away from zeros and ones, batches counted
    if mode == "eval":
        return m.eval()
    m.train()
    m.features[1].eval()  # a frozen BatchNorm layer, as fine-tuning leaves it: model.train() would flip it
    return m


def snapshot(m: torch.nn.Module) -> tuple[dict, dict]:
    return ({n: mod.training for n, mod in m.named_modules()}, {k: v.clone() for k, v in m.state_dict().items()})


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_point_leaves_modes_and_batchnorm_statistics(entry, mode, folder, tmp_path):
    classes = sorted(os.listdir(folder))
    model = make_model(mode, len(classes))
    image = os.path.join(folder, classes[0], "001.png")
    ckpt = Checkpoint(model, classes, 32, 3, [0.5] * 3, [0.25] * 3, path="in-memory")
    before = snapshot(model)
    if entry == "summary":
        cnnkit.summary(model)
    elif entry == "rf":
        cnnkit.receptive_field(model)
    elif entry == "features":
        cnnkit.feature_maps(model, ["features.1", "features.2"], image, str(tmp_path))
    elif entry == "filters":
        cnnkit.filters(model, out=str(tmp_path / "f.png"))
    elif entry == "cam":
        cnnkit.class_activation_map(model, image, method="all", out=str(tmp_path / "cam.png"))
    elif entry == "evaluate":
        assert cnnkit.evaluate(ckpt, folder).count == 4 * len(classes)
    elif entry == "export":
        cnnkit.export(ckpt, "torchscript", str(tmp_path / "m.ts"), verify=True)
    elif entry == "predict":
        assert len(cnnkit.predict(ckpt, folder)) == 4 * len(classes)
    else:
        features(Backbone(model, [0.5] * 3, [0.25] * 3, 32, 3), load_eval_set(DataSpec(folder, input_size=32)))
    modes, tensors = snapshot(model)
    assert modes == before[0]
    assert tensors.keys() == before[1].keys()
    changed = [k for k in tensors if not torch.equal(tensors[k], before[1][k])]
    assert not changed, f"{entry} changed {changed}"


def test_preserve_modes_restores_after_a_training_forward_pass_and_an_error():
    model = make_model("eval", 10)
    model.features[1].train()  # a mixed state
    before = snapshot(model)
    with pytest.raises(RuntimeError), preserve_modes(model):
        model.train()
        model(torch.randn(4, 3, 32, 32))  # moves every running statistic
        raise RuntimeError("inside the block")
    modes, tensors = snapshot(model)
    assert modes == before[0] and all(torch.equal(tensors[k], before[1][k]) for k in tensors)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert snapshot(model)[0] == before[0]
