import shlex

import pytest
import torch

import cnnkit
from cnnkit.errors import UserError
from cnnkit.inspect.hooks import inspecting


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_capture_records_the_named_layers_and_removes_its_hooks():
    model = cnnkit.create_model("resnet18", input_size=64).eval()
    with torch.no_grad(), cnnkit.capture(model, ["layer1.0", "layer2"]) as acts:
        model(torch.randn(2, 3, 64, 64))
    assert acts["layer1.0"].shape == (2, 64, 16, 16) and acts["layer2"].shape == (2, 128, 8, 8)
    assert hook_count(model) == 0


def test_hooks_are_removed_when_the_block_raises():
    model = cnnkit.create_model("simple_cnn").eval()
    with pytest.raises(RuntimeError):
        with cnnkit.capture(model, "features.0"):
            model(torch.randn(1, 5, 32, 32))  # wrong channel count
    assert hook_count(model) == 0


def test_captured_copies_are_not_changed_by_a_later_inplace_relu():
    model = cnnkit.create_model("simple_cnn").eval()  # features.1 is ReLU(inplace=True) on features.0's output
    with torch.no_grad(), cnnkit.capture(model, ["features.0", "features.1"]) as acts:
        model(torch.randn(1, 3, 32, 32))
    assert (acts["features.0"] < 0).any() and (acts["features.1"] >= 0).all()
    with cnnkit.capture(model, ["features.0"], detach=False) as live:
        model(torch.randn(1, 3, 32, 32))
    assert live["features.0"].requires_grad


def test_live_captures_are_not_changed_by_a_later_inplace_operation_either():
    """With detach=False the captured tensor was the one the forward pass went on with, so a later in-place ReLU
    or a ResNet block's `out += identity` changed it: Grad-CAM of resnet18's layer4.1.bn2 was the map of
    layer4 (the block's output after the addition and ReLU), with no word that it was not the layer asked for."""
    from cnnkit.inspect.cam import cam_heatmaps, grad_cam
    from cnnkit.inspect.drawing import normalise

    torch.manual_seed(0)
    model = cnnkit.create_model("simple_cnn").eval()
    x = torch.randn(1, 3, 32, 32)
    with cnnkit.capture(model, ["features.0"], detach=False) as live:
        y = model(x)
    assert (live["features.0"] < 0).any() and live["features.0"].requires_grad
    assert torch.equal(y, model(x))  # the forward pass computes what it computed without the hooks
    assert hook_count(model) == 0

    model = cnnkit.create_model("resnet18", num_classes=10, input_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    bn2 = cam_heatmaps(model, x, "layer4.1.bn2", 0)[0]["gradcam"]
    assert not torch.allclose(bn2, cam_heatmaps(model, x, "layer4", 0)[0]["gradcam"])
    # Grad-CAM of layer4.1.bn2 by hand: its output as a leaf, then the rest of the block and the head
    m = model
    with torch.no_grad():
        h = m.layer4[0](m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))
        block = m.layer4[1]
        out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h))))).clone()
    out.requires_grad_(True)
    logit = m.fc(torch.flatten(m.avgpool(torch.relu(out + h)), 1))[0, 0]
    (grads,) = torch.autograd.grad(logit, out)
    by_hand = torch.nn.functional.interpolate(grad_cam(out.detach(), grads)[None, None], size=(64, 64),
                                              mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(bn2, normalise(by_hand), atol=1e-5)


def test_unknown_layer_names_suggest_the_close_ones():
    model = cnnkit.create_model("resnet18")
    with pytest.raises(UserError, match=r"no layer 'layer5'.*did you mean layer.*--list-layers"):
        with cnnkit.capture(model, ["layer5"]):
            pass
    assert hook_count(model) == 0


def test_inspecting_restores_modes_and_batchnorm_statistics_even_after_an_error():
    model = cnnkit.create_model("cnn_bn").train()
    model.features[1].eval()  # a mix of modes must come back as it was
    bn = model.features[1]
    before = {k: v.clone() for k, v in bn.named_buffers()}
    with pytest.raises(ValueError):
        with inspecting(model):
            assert not any(m.training for m in model.modules())
            model.train()
            model(torch.randn(4, 3, 32, 32))  # updates the running statistics
            assert not torch.equal(bn.running_mean, before["running_mean"])
            raise ValueError
    assert model.training and not model.features[1].training
    assert all(torch.equal(v, before[k]) for k, v in bn.named_buffers())


@pytest.mark.parametrize("command", [
    ["features", "simple_cnn", "--layer", "feature.7", "--image", "IMG", "--out", "OUT"],
    ["filters", "simple_cnn", "--layer", "feature.7", "--out", "OUT.png"],
    ["cam", "simple_cnn", "--layer", "feature.7", "--image", "IMG", "--out", "OUT.png"],
    ["rf", "simple_cnn", "--verify-layer", "feature.7"],
    ["rf", "simple_cnn", "--effective", "OUT.png", "--layer", "feature.7", "--images", "2"],
])
def test_an_unknown_layer_names_the_command_that_lists_this_models_layers(command, capsys, shape_image, tmp_path):
    """The hint said `cnnkit features MODEL --list-layers`, with the literal word MODEL."""
    from cnnkit.cli import main

    args = [shape_image if a == "IMG" else str(tmp_path / a) if a.startswith("OUT") else a for a in command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("the model has no layer 'feature.7'; did you mean features.7, features.8 or "
                        "features.6? (`cnnkit features simple_cnn --list-layers` shows the 16 names)"), err


def test_an_unknown_layer_of_a_module_points_to_layer_names():
    model = cnnkit.create_model("resnet18")  # from Python: no name to put in a command line
    names = len(cnnkit.inspect.layer_names(model))
    with pytest.raises(UserError, match=r"no layer 'layer5'.* \(`cnnkit\.inspect\.layer_names\(model\)`, or "
                       rf"`--list-layers` on the command line, shows the {names} names\)$"):
        with cnnkit.capture(model, ["layer5"]):
            pass


def test_the_command_that_lists_the_layers_keeps_the_options_that_build_the_model(capsys):
    """The hint for an unknown layer said `cnnkit features convnet --list-layers`, leaving out the --model-opt and
    --input-size the user gave: options that change the layers and their names. The suggested command, run,
    lists the names of the model the user asked about."""
    from cnnkit.cli import main

    build = ["--input-size", "1", "28", "28", "--num-classes", "5", "--model-opt", "widths=[16,32]",
             "--model-opt", "downsample=stride"]
    assert main(["rf", "convnet", *build, "--verify-layer", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    suggested = ("cnnkit features convnet --input-size 1 28 28 --num-classes 5 --model-opt 'widths=[16,32]' "
                 "--model-opt downsample=stride --list-layers")
    assert err.endswith(f"the model has no layer 'nope' (`{suggested}` shows the 13 names)"), err
    assert main(shlex.split(suggested)[1:]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == 13 and listed[0].split() == ["features", "Sequential", "32x7x7"], listed
