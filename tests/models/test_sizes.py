"""check_before_building: a size a model cannot take is found on the model built on the meta device, before the
real one is built, with the words the real model's check has."""

import pytest
import torch
import torch.nn as nn

import cnnkit
from cnnkit.errors import UserError
from cnnkit.models import sizes
from cnnkit.models.sizes import check_before_building, check_input_size, check_trains_on


def _builder(name, **kwargs):
    """``create_model(name, **kwargs)`` as a builder, and the devices it was called on ("meta" or "cpu")."""
    devices = []

    def build():
        devices.append(torch.empty(0).device.type)
        return cnnkit.create_model(name, **kwargs)

    return build, devices


def test_a_size_the_model_cannot_take_is_its_real_error_without_building_the_real_model():
    # alexnet (61 M parameters) cannot take 32x32 images; the real check says so only after the weights are made
    build, devices = _builder("alexnet", num_classes=10, input_size=32)
    with pytest.raises(UserError) as caught:
        check_before_building(lambda model: check_trains_on(model, "alexnet", (3, 32, 32)), build, (3, 32, 32))
    assert devices == ["meta"]
    assert str(caught.value) == (  # the real model's check, word for word
        "alexnet cannot take 3x32x32 images (Given input size: (256x1x1). Calculated output size: (256x0x0). Output "
        "size is too small); use a larger --input-size (the smallest it takes: 63)")


def test_the_meta_devices_own_words_for_a_shape_error_are_not_the_ones_shown():
    # On the meta device a flatten head's mismatch reads "a and b must have same reduction dim"; the message keeps
    # PyTorch's usual "mat1 and mat2 shapes cannot be multiplied". simple_cnn at 160 pixels has 13 M parameters.
    build, devices = _builder("simple_cnn", num_classes=4, input_size=160)
    check = lambda model: check_input_size(model, (3, 32, 32), (3, 160, 160), "run r")  # noqa: E731
    with pytest.raises(UserError, match=r"run r takes 3x160x160 images and cannot run on 3x32x32 \(mat1 and mat2 "
                                        r"shapes cannot be multiplied \(1x2048 and 51200x256\)\); leave out "
                                        r"--input-size, or pass --input-size 160"):
        check_before_building(check, build, (3, 32, 32))
    assert devices == ["meta"]


def test_a_size_the_model_takes_passes_and_leaves_the_real_weights_as_they_would_be():
    build, devices = _builder("alexnet", num_classes=10, input_size=64)
    torch.manual_seed(0)
    check_before_building(lambda model: check_trains_on(model, "alexnet", (3, 64, 64)), build, (3, 64, 64))
    after = cnnkit.create_model("resnet18", num_classes=3).fc.weight
    torch.manual_seed(0)
    assert torch.equal(after, cnnkit.create_model("resnet18", num_classes=3).fc.weight)  # the RNG was not drawn on
    assert devices == ["meta"]


class _ItemInForward(nn.Module):
    """A model whose forward pass reads a value, which the meta device does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x.mean((2, 3))) * x.abs().max().item()


class _RealTensorsInBuild(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, int(torch.ones(2).sum().item()))  # a width worked out with a real tensor


def test_a_model_the_meta_device_cannot_run_or_build_is_left_to_the_real_check(monkeypatch):
    monkeypatch.setattr(sizes, "CHECKED_BEFORE_BUILDING", 0)
    for build in (_ItemInForward, _RealTensorsInBuild):
        check_before_building(lambda model: check_trains_on(model, "m", (3, 8, 8)), build, (3, 8, 8))


def test_a_builders_own_user_error_comes_from_the_meta_build():
    # simple_cnn sizes its head with a pass of its convolutions: at 4 pixels they leave nothing
    build, devices = _builder("simple_cnn", num_classes=4, input_size=4)
    with pytest.raises(UserError, match="input size 4 is too small for this network"):
        check_before_building(lambda model: None, build, (3, 4, 4))
    assert devices == ["meta"]


def test_a_model_quick_to_build_is_left_to_the_check_after_its_real_build():
    # below CHECKED_BEFORE_BUILDING parameters one pass on the meta device costs more than the real build
    build, devices = _builder("squeezenet1_1", num_classes=4, input_size=16)
    check_before_building(lambda model: check_trains_on(model, "squeezenet1_1", (3, 16, 16)), build, (3, 16, 16))
    assert devices == ["meta"]
    with pytest.raises(UserError, match="squeezenet1_1 cannot take 3x16x16 images"):
        check_trains_on(build(), "squeezenet1_1", (3, 16, 16))
