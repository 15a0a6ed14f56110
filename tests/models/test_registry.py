import os
import subprocess
import sys

import pytest
import torch
import torchvision

import cnnkit
from cnnkit.errors import UserError


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_simple_cnn_has_620362_parameters_at_32x32():
    assert n_params(cnnkit.create_model("simple_cnn", num_classes=10)) == 620_362


def test_cnn_bn_head_is_64x8x8_to_classes():
    model = cnnkit.create_model("cnn_bn")
    linear = model.classifier[-1]
    assert (linear.in_features, linear.out_features) == (64 * 8 * 8, 10)
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 2


@pytest.mark.parametrize("name", ["simple_cnn", "cnn_bn", "convnet", "linear", "mlp"])
@pytest.mark.parametrize("size", [28, 32, 48, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_own_models_output_shape(name, size, channels):
    model = cnnkit.create_model(name, num_classes=7, in_channels=channels, input_size=size).eval()
    assert model(torch.randn(3, channels, size, size)).shape == (3, 7)


@pytest.mark.parametrize("downsample", ["max", "avg", "stride"])
@pytest.mark.parametrize("head", ["flatten", "gap"])
@pytest.mark.parametrize("conv1x1", [False, True])
def test_convnet_builder_variants(downsample, head, conv1x1):
    model = cnnkit.create_model("convnet", num_classes=5, input_size=40, downsample=downsample, head=head,
                                conv1x1=conv1x1, widths=(8, 16), depth=2, batchnorm=downsample != "avg")
    assert model(torch.randn(2, 3, 40, 40)).shape == (2, 5)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 2 * 2 + (2 if conv1x1 else 0)
    assert sum(c.kernel_size == (1, 1) for c in convs) == (2 if conv1x1 else 0)
    assert any(c.stride == (2, 2) for c in convs) == (downsample == "stride")


def test_gap_head_takes_any_size_but_flatten_head_is_sized_to_input():
    gap = cnnkit.create_model("convnet", head="gap", input_size=32).eval()
    assert gap(torch.randn(1, 3, 80, 80)).shape == (1, 10)
    flat = cnnkit.create_model("convnet", head="flatten", input_size=64)
    assert flat.classifier[-1].in_features == 128 * 8 * 8


@pytest.mark.parametrize("downsample", ["max", "avg"])
@pytest.mark.parametrize("head", ["gap", "flatten"])
def test_convnet_refuses_an_input_too_small_for_its_pooling_stages_whatever_its_head(downsample, head):
    # five halvings of 16 pixels: the fifth stage has a 1x1 map to pool
    with pytest.raises(UserError) as e:
        cnnkit.create_model("convnet", input_size=16, widths=[8] * 5, downsample=downsample, head=head)
    assert "input size 16 is too small for this network" in str(e.value)
    assert "use a larger --input-size or fewer downsampling stages" in str(e.value) and "\n" not in str(e.value)
    model = cnnkit.create_model("convnet", input_size=32, widths=[8] * 5, downsample=downsample, head=head).eval()
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_convnet_with_strided_stages_runs_down_to_a_1x1_map():
    # a stride-2 convolution padded by 1 keeps a 1x1 map 1x1: nothing to refuse, whatever the head
    for head in ("gap", "flatten"):
        model = cnnkit.create_model("convnet", input_size=16, widths=[8] * 6, downsample="stride", head=head).eval()
        assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


def test_flatten_head_works_on_channels_last():
    model = cnnkit.create_model("simple_cnn").to(memory_format=torch.channels_last).eval()
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert model(x).shape == (4, 10)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn", "alexnet", "efficientnet_b0", "mobilenet_v3_small",
                                  "densenet121", "squeezenet1_1", "regnet_y_400mf"])
@pytest.mark.parametrize("size", [64, 96])
def test_torchvision_models_output_shape(name, size):
    model = cnnkit.create_model(name, num_classes=6, input_size=size).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 6)


def test_torchvision_model_takes_one_channel():
    model = cnnkit.create_model("resnet18", num_classes=10, in_channels=1, input_size=28).eval()
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_list_models_has_own_and_torchvision_models():
    names = cnnkit.list_models()
    for name in ["simple_cnn", "cnn_bn", "convnet", "resnet18", "resnet50", "vgg16", "efficientnet_b0"]:
        assert name in names
    assert cnnkit.list_models("resnet1*") == ["resnet101", "resnet152", "resnet18"]


def test_unknown_model_and_option_are_user_errors():
    with pytest.raises(UserError, match="did you mean resnet18"):
        cnnkit.create_model("resnet81")
    with pytest.raises(UserError, match="no option"):
        cnnkit.create_model("simple_cnn", widths=(1, 2))
    with pytest.raises(UserError, match="too small"):
        cnnkit.create_model("simple_cnn", input_size=4)


@pytest.mark.parametrize("name, size, words", [
    ("vit_b_16", 28, "vit_b_16 cuts its input into 16x16 patches, so its input size must be a multiple of 16, "
                     "and 28 is not; use 16 or 32 pixels (--input-size)"),
    ("vit_h_14", 8, "multiple of 14, and 8 is not; use 14 pixels (--input-size)"),
])
def test_a_vit_at_a_size_its_patches_do_not_divide_is_a_user_error_naming_the_sizes_that_work(name, size, words):
    # torchvision's constructor only asserts it ("Input shape indivisible by patch size!"): an internal error, and
    # MNIST's 28x28 images meet it with vit_b_16
    with pytest.raises(UserError) as e:
        cnnkit.create_model(name, input_size=size)
    assert str(e.value).endswith(words)
    from tests.conftest import run_cli

    proc = run_cli("summary", name, "--input-size", 3, size, size)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr


def test_maxvit_is_built_for_the_input_size_and_a_size_its_windows_do_not_divide_names_the_ones_that_work(
        tmp_path, monkeypatch, capsys):
    """maxvit_t was built for 224 whatever the input size, so it ran at 223 and 224 only, and the search for the
    smallest size (64, 128, 256) never met them: "use a larger --input-size", with no size. torchvision builds
    a MaxViT for one input size, whose four stages (1/4 to 1/32 of it, rounded up) must be multiples of 7."""
    from cnnkit.cli import main

    with pytest.raises(UserError) as e:
        cnnkit.create_model("maxvit_t", input_size=64)
    assert str(e.value).endswith("at 64 pixels they are 16, 8, 4, 2; use 224 pixels (--input-size; the smallest it "
                                 "takes: 221)")
    with pytest.raises(UserError, match=r"at 300 pixels they are 75, 38, 19, 10; use 224 or 448 pixels"):
        cnnkit.create_model("maxvit_t", input_size=300)
    assert main(["summary", "maxvit_t", "--input-size", "220"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    for size in (221, 448):  # the smallest, and a size the model built for 224 could not take
        assert cnnkit.summary("maxvit_t", input_size=size).layers[-1].output_shape == [1000]
    # torchvision's pretrained weights hold nothing sized by the input, so they load at 448 too
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    state = torchvision.models.maxvit_t().state_dict()
    torch.save(state, folder / os.path.basename(torchvision.models.MaxVit_T_Weights.DEFAULT.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = cnnkit.create_model("maxvit_t", num_classes=1000, input_size=448, pretrained=True).eval()
    assert torch.equal(model.state_dict()["stem.0.0.weight"], state["stem.0.0.weight"])
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 448, 448)).shape == (1, 1000)


def test_an_unknown_model_option_names_a_close_one_and_the_models_options():
    with pytest.raises(UserError) as e:
        cnnkit.create_model("convnet", width=(8, 16))
    assert str(e.value) == ("model 'convnet' has no option width; did you mean widths? (its options: widths, depth, "
                            "downsample, head, conv1x1, batchnorm, dropout, hidden)")
    with pytest.raises(UserError, match=r"has no option width \(its options: dropout\)$"):
        cnnkit.create_model("simple_cnn", width=3)


def test_model_carries_its_config():
    model = cnnkit.create_model("convnet", num_classes=3, in_channels=1, input_size=28, head="flatten")
    assert model.cnnkit_config == {"name": "convnet", "options": {"head": "flatten"}, "num_classes": 3,
                                   "in_channels": 1, "input_size": 28, "pretrained": False}


def test_building_a_model_leaves_batchnorm_statistics_untouched():
    model = cnnkit.create_model("cnn_bn")
    bn = model.features[1]
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_var, torch.ones(32))
    assert model.training


def test_cifar_stem_keeps_resnet18_layer4_at_4x4_for_32px_images():
    """He et al.'s CIFAR stem (3x3 stride-1 conv1, no max-pool): 0.56 G MACs at 32x32 (the published CIFAR
    ResNet-18 figure), layer4 at 4x4 where torchvision's stem leaves 1x1; everything after conv1 unchanged."""
    plain = cnnkit.create_model("resnet18", num_classes=5, input_size=32)
    cifar = cnnkit.create_model("resnet18", num_classes=5, input_size=32, stem="cifar")
    assert tuple(cifar.conv1.weight.shape) == (64, 3, 3, 3) and isinstance(cifar.maxpool, torch.nn.Identity)
    assert n_params(plain) - n_params(cifar) == 64 * 3 * (49 - 9)
    cifar_summary, plain_summary = cnnkit.summary(cifar, (3, 32, 32)), cnnkit.summary(plain, (3, 32, 32))
    layer4 = [next(r for r in s.layers if r.name == "layer4").output_shape for s in (cifar_summary, plain_summary)]
    assert layer4 == [[512, 4, 4], [512, 1, 1]]
    assert cifar_summary.total_macs == pytest.approx(0.556e9, rel=2e-3)
    with pytest.raises(UserError, match="ResNet-style"):
        cnnkit.create_model("vgg11", num_classes=5, input_size=32, stem="cifar")
    with pytest.raises(UserError, match="stem must be one of"):
        cnnkit.create_model("resnet18", stem="tiny")


def test_training_cnnkits_own_model_does_not_import_torchvision(tmp_path):
    """torchvision adds about 160 MB of resident memory; a simple_cnn run needs none of it."""
    code = ("import sys, io, cnnkit\n"
            f"cnnkit.train(model='simple_cnn', data='shapes', num_samples=64, epochs=1, batch_size=32, "
            f"out={str(tmp_path / 'run')!r}, progress=False, log=io.StringIO())\n"
            "assert 'torchvision' not in sys.modules, 'torchvision was imported'\n"
            "cnnkit.create_model('resnet18')\n"
            "assert 'torchvision' in sys.modules\n")
    env = {**os.environ, "CNNKIT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("name, options, words", [
    ("convnet", {"widths": ("x", "y")}, "option widths must be a list of whole numbers, got ('x', 'y')"),
    ("convnet", {"widths": "ab"}, "option widths must be a list of whole numbers, got 'ab'"),
    ("convnet", {"depth": 1.5}, "option depth must be a whole number, got 1.5"),
    ("simple_cnn", {"dropout": "x"}, "option dropout must be a number, got 'x'"),
    ("fastnet", {"widths": (8, 16)}, "option widths must be a list of 3 whole numbers"),
    ("resnet18", {"head_from": 5}, "option head_from must be text or a list of texts or null, got 5"),
    ("convnet", {"dropout": 2.0}, "cannot be built with dropout=2.0: dropout probability"),
    ("convnet", {"widths": (-3,)}, "convnet: widths must be positive whole numbers, got [-3]"),
    ("convnet", {"widths": (0, 8)}, "convnet: widths must be positive whole numbers, got [0, 8]"),
    ("convnet", {"depth": 0}, "convnet: depth must be a positive whole number, got 0"),
    ("convnet", {"hidden": -4}, "convnet: hidden must be 0 (no hidden layer) or a positive whole number, got -4"),
    ("mlp", {"hidden": 0}, "mlp: hidden must be a positive whole number, got 0"),
])
def test_wrong_model_options_are_a_user_error_naming_them(name, options, words):
    with pytest.raises(UserError) as e:
        cnnkit.create_model(name, **options)
    assert words in str(e.value) and "\n" not in str(e.value)

