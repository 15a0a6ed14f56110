import itertools
from fractions import Fraction

import pytest
import torch
import torch.nn as nn

import cnnkit
from cnnkit.errors import UserError
from cnnkit.inspect.shapes import Field, conv_arithmetic
from tests.conftest import run_cli


def test_the_issue_example_with_the_formula_filled_in():
    r = conv_arithmetic(5, 3, stride=2, padding=1)
    assert r.output_size == 3 == cnnkit.conv_output_size(5, 3, 2, 1)
    assert r.formula == "floor((H + 2p - d(k-1) - 1) / s) + 1"
    assert r.steps == "floor((5 + 2*1 - (3-1) - 1) / 2) + 1 = floor(4 / 2) + 1 = 3"


@pytest.mark.parametrize("kind", ["conv", "maxpool", "avgpool"])
def test_agrees_with_pytorch_layers(kind):
    sizes, kernels, strides, paddings, dilations = (1, 5, 7, 8, 32), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2), (1, 2)
    for size, k, s, p, d in itertools.product(sizes, kernels, strides, paddings, dilations):
        for ceil in ((False, True) if kind != "conv" else (False,)):
            if kind == "avgpool" and d > 1:
                continue
            if kind == "conv":
                layer = nn.Conv2d(1, 1, k, s, p, d)
            elif kind == "maxpool":
                layer = nn.MaxPool2d(k, s, p, d, ceil_mode=ceil)
            else:
                layer = nn.AvgPool2d(k, s, p, ceil_mode=ceil)
            try:
                expected = layer(torch.zeros(1, 1, size, size)).shape[-1]
            except RuntimeError:
                expected = None
            if expected == 0:
                expected = None
            try:
                got = conv_arithmetic(size, k, s, p, d, kind, ceil).output_size
            except UserError:
                got = None
            assert got == expected, (kind, size, k, s, p, d, ceil)


@pytest.mark.parametrize("args, words", [
    ((5, 7), ["impossible", "larger than the padded input", "= -1, less than one unit"]),
    ((5, 3, 1, 0, 3), ["dilated kernel (7)"]),
    ((5, 3, 0), ["stride"]),
    ((5, 3, 1, -1), ["padding"]),
    ((0, 3), ["size"]),
])
def test_impossible_settings_name_the_problem(args, words):
    with pytest.raises(UserError) as e:
        conv_arithmetic(*args)
    for w in words:
        assert w in str(e.value)


def test_pooling_rules():
    with pytest.raises(UserError, match="half the kernel"):
        conv_arithmetic(8, 3, 2, 2, kind="maxpool")
    with pytest.raises(UserError, match="no dilation"):
        conv_arithmetic(8, 2, 2, 0, 2, kind="avgpool")
    with pytest.raises(UserError, match="ceil_mode"):
        conv_arithmetic(8, 2, 2, ceil_mode=True)
    assert conv_arithmetic(7, 2, 2, kind="maxpool", ceil_mode=True).output_size == 4


def test_field_arithmetic():
    f = Field.of_input().through_window(7, 2, 3).through_window(3, 2, 1)  # resnet stem: conv1, maxpool
    assert f.as_numbers() == (11, 4, 0)
    g = Field.of_input().through_window(2, 2)  # a 2x2 pool: centred between two pixels
    assert g.as_numbers() == (2, 2, 0.5)
    whole = f.spanning(56)
    assert whole.whole and whole.jump == 0 and whole.rf == 11 + 55 * 4
    assert whole.through_window(3, 1, 1) == whole  # once global, a field stops growing
    assert Field.of_input().through_adaptive(7, 3).jump == Fraction(7, 3)
    assert f.extent(0) == (-5.0, 5.0)


def test_ceil_mode_steps_show_the_dropped_last_window():
    # ceil(5 / 2) + 1 is 4, but PyTorch drops a last window that would start in the right padding: 3
    r = conv_arithmetic(5, 2, 2, 1, 1, "maxpool", True)
    assert r.output_size == 3 == nn.MaxPool2d(2, 2, 1, ceil_mode=True)(torch.zeros(1, 1, 5, 5)).shape[-1]
    assert r.steps.startswith("ceil((5 + 2*1 - (2-1) - 1) / 2) + 1 = ceil(5 / 2) + 1 = 4, less the last window")
    assert r.steps.endswith("= 3")
    assert "less" not in conv_arithmetic(6, 2, 2, 1, 1, "maxpool", True).steps  # nothing dropped: no such step


def test_pooling_strides_by_its_kernel_unless_told_as_pytorchs_layers_do():
    x = torch.zeros(1, 1, 32, 32)
    assert conv_arithmetic(32, 2, kind="maxpool").output_size == torch.nn.MaxPool2d(2)(x).shape[-1] == 16
    assert conv_arithmetic(32, 3, kind="avgpool").output_size == torch.nn.AvgPool2d(3)(x).shape[-1] == 10
    assert conv_arithmetic(32, 3).output_size == torch.nn.Conv2d(1, 1, 3)(x).shape[-1] == 30
    assert conv_arithmetic(32, 2, 1, kind="maxpool").output_size == 31  # a stride given is kept
    proc = run_cli("shape", "--size", "32", "--kernel", "2", "--pool", "max")
    assert proc.returncode == 0 and proc.stdout.startswith("maxpool output size: 16"), proc.stdout + proc.stderr
    with pytest.raises(UserError, match="size must be a whole number >= 1, got True"):
        cnnkit.conv_output_size(True, 3)
