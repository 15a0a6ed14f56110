"""Every inspection leaves the model exactly as it found it: each module's mode, the BatchNorm running
statistics, the weights, and no gradients or hooks left behind."""

import pytest
import torch

import cnnkit


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = cnnkit.create_model("cnn_bn", input_size=32)
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, 3, 32, 32))  # BatchNorm statistics away from their initial zeros and ones
    m.classifier.eval()  # a mixed state
    return m


def state(m):
    return ({n: mod.training for n, mod in m.named_modules()},
            {k: v.clone() for k, v in m.state_dict().items()},
            [p.grad for p in m.parameters()],
            sum(len(x._forward_hooks) + len(x._forward_pre_hooks) for x in m.modules()))


@pytest.mark.parametrize("inspect", ["summary", "rf", "verify", "effective", "features", "filters", "cam"])
def test_model_is_unchanged(model, inspect, shape_image, tmp_path):
    before = state(model)
    if inspect == "summary":
        cnnkit.summary(model)
    elif inspect == "rf":
        cnnkit.receptive_field(model)
    elif inspect == "verify":
        cnnkit.verify_receptive_field(model)
    elif inspect == "effective":
        cnnkit.effective_receptive_field(model, count=2)
    elif inspect == "features":
        cnnkit.feature_maps(model, ["features.1", "features.2"], shape_image, str(tmp_path))
    elif inspect == "filters":
        cnnkit.filters(model, out=str(tmp_path / "f.png"))
    else:
        cnnkit.class_activation_map(model, shape_image, method="all", out=str(tmp_path / "cam.png"))
    modes, tensors, grads, hooks = state(model)
    assert modes == before[0]
    assert tensors.keys() == before[1].keys()
    assert all(torch.equal(tensors[k], before[1][k]) for k in tensors), inspect
    assert all(g is None for g in grads) and hooks == 0
