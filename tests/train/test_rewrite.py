import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit.models import create_model
from cnnkit.train.rewrite import pool_before_relu


def _kinds(seq: nn.Sequential) -> list[str]:
    return [type(m).__name__ for m in seq]


def test_simple_cnn_runs_pool_first_and_leaves_the_model_as_it_is():
    model = create_model("simple_cnn", num_classes=10)
    before = _kinds(model.features)
    fast = pool_before_relu(model)
    assert _kinds(model.features) == before == ["Conv2d", "ReLU", "MaxPool2d"] * 3
    assert _kinds(fast.features) == ["Conv2d", "MaxPool2d", "ReLU"] * 3
    assert fast.classifier is model.classifier  # nothing to reorder there: shared as it is
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(a is b for a, b in zip(fast.parameters(), model.parameters()))
    fast.eval()
    assert not model.features[0].training  # the layers themselves are shared


@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_training_through_the_rewrite_gives_the_same_weights_bit_for_bit(precision):
    torch.manual_seed(0)
    plain = create_model("simple_cnn", num_classes=10).to(memory_format=torch.channels_last)
    other = copy.deepcopy(plain)
    fast = pool_before_relu(other)
    # 8x8 blocks of equal pixels: equal convolution outputs inside them, so many pooling windows with tied
    # maxima (about 40% of the first layer's), whose gradient the pool must route to the same element in both
    # orders, as well as windows of negative values only.
    x = F.interpolate(torch.randn(16, 3, 4, 4), scale_factor=8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    for net in (plain, fast):
        torch.manual_seed(1)  # the same dropout masks
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            with torch.autocast("cpu", dtype=precision or torch.float32, enabled=precision is not None):
                loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    for (name, a), b in zip(plain.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(plain.features[0].weight, create_model("simple_cnn", num_classes=10).features[0].weight)


def test_vgg_and_batchnorm_nets_are_rewritten_where_relu_meets_a_pool():
    vgg = pool_before_relu(create_model("vgg11", num_classes=10))
    kinds = _kinds(vgg.features)
    assert kinds.count("MaxPool2d") == 5
    assert all(kinds[i + 1] == "ReLU" for i, k in enumerate(kinds) if k == "MaxPool2d")
    bn = pool_before_relu(create_model("cnn_bn", num_classes=10))
    assert _kinds(bn.features) == ["Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU"] * 2


def test_models_without_relu_then_pool_come_back_unchanged():
    for name in ("resnet18", "linear"):
        model = create_model(name, num_classes=10)
        assert pool_before_relu(model) is model
    indices = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2, return_indices=True))  # a different output: left alone
    assert pool_before_relu(indices) is indices
