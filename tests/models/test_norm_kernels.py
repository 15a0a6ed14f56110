"""Normalisation layers hand their kernels the tensors every backend accepts.

PyTorch's CPU batch norm takes a bias without a weight (scale); its CUDA backward does not, and training dies
in the first backward pass there. A CPU cannot run that kernel, but it can see the call: every batch-, group-,
instance- and layer-norm call made by a model's forward must pass a weight wherever it passes a bias.
"""

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import cnnkit

NORMS = {F.batch_norm: (3, 4), F.instance_norm: (3, 4), F.group_norm: (2, 3), F.layer_norm: (2, 3)}
# (positions of weight and bias among the positional arguments)


class NormCalls(TorchFunctionMode):
    """Records, for each normalisation call, whether it got a weight and whether it got a bias."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in NORMS:
            w_at, b_at = NORMS[func]
            weight = args[w_at] if len(args) > w_at else kwargs.get("weight")
            bias = args[b_at] if len(args) > b_at else kwargs.get("bias")
            self.calls.append((func.__name__, weight is not None, bias is not None))
        return func(*args, **kwargs)


@pytest.mark.parametrize("name,options,size", [
    ("simple_cnn", {}, 32), ("cnn_bn", {}, 32), ("convnet", {}, 32), ("fastnet", {}, 32),
    ("resnet18", {"stem": "cifar"}, 32), ("mobilenet_v3_small", {}, 64), ("convnext_tiny", {}, 32),
])
def test_every_norm_call_with_a_bias_also_passes_a_weight(name, options, size):
    torch.manual_seed(0)
    model = cnnkit.create_model(name, num_classes=10, input_size=size, **options).train()
    mode = NormCalls()
    with mode:
        model(torch.randn(2, 3, size, size)).sum().backward()
    missing = [call for call in mode.calls if call[2] and not call[1]]
    assert not missing, f"{name}: a norm call with a bias but no weight (CUDA's backward rejects it): {missing[:3]}"


def test_the_check_sees_a_layer_without_a_scale():
    # The bug as it was: nn.BatchNorm2d with its weight removed and its bias kept.
    layer = torch.nn.BatchNorm2d(4)
    layer.weight = None
    mode = NormCalls()
    with mode:
        layer(torch.randn(2, 4, 3, 3))
    assert mode.calls == [("batch_norm", False, True)]


def test_fastnet_batchnorm_still_has_no_trainable_scale_and_the_same_checkpoint_keys():
    model = cnnkit.create_model("fastnet", num_classes=10)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith(("norm1.weight", "norm2.weight")) for n in names)
    assert not any("unit_scale" in k for k in model.state_dict())
    norm = model.layers[1].norm1
    x = torch.randn(4, norm.num_features, 5, 5)
    expected = F.batch_norm(x, None, None, None, norm.bias, True, 0.0, norm.eps)
    assert torch.equal(norm.train()(x), expected)


def test_sync_batchnorm_of_fastnet_keeps_a_scale_for_the_kernels_and_the_checkpoint_keys():
    # --sync-bn converts every BatchNorm; PyTorch's conversion copies the missing weight as None, which would
    # bring back the CUDA failure for multi-GPU runs of the fast recipe.
    from cnnkit.models.fast import sync_batchnorm

    model = cnnkit.create_model("fastnet", num_classes=10, input_size=32)
    keys = set(model.state_dict())
    plain = torch.nn.SyncBatchNorm.convert_sync_batchnorm(
        cnnkit.create_model("fastnet", num_classes=10, input_size=32))
    assert any(m.weight is None for m in plain.modules() if isinstance(m, torch.nn.SyncBatchNorm))
    synced = sync_batchnorm(model).eval()  # SyncBatchNorm runs the plain kernel outside training
    norms = [m for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert norms and all(m.weight is not None and not m.weight.requires_grad for m in norms)
    assert set(synced.state_dict()) == keys
    assert all(p is not m.weight for m in norms for p in synced.parameters())
    mode = NormCalls()
    with mode:
        synced(torch.randn(2, 3, 32, 32))
    assert mode.calls and all(call[1] for call in mode.calls if call[2])
