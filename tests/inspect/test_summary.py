import pytest
import torch
import torch.nn as nn

import cnnkit
from cnnkit.errors import UserError
from cnnkit.inspect.receptive_field import format_receptive_field


@pytest.fixture(scope="module")
def resnet18():
    return cnnkit.summary("resnet18", input_size=(3, 224, 224))


def row(s, name):
    return next(r for r in s.layers if r.name == name)


def test_resnet18_matches_torchvision_and_the_real_shapes(resnet18):
    s = resnet18
    assert s.total_params == 11_689_512 == s.trainable_params and s.frozen_params == 0
    assert abs(s.total_macs / 1.814e9 - 1) < 0.01
    assert row(s, "layer1.0").output_shape == [64, 56, 56]  # not 112x112: conv1 and maxpool both stride 2
    assert row(s, "conv1").output_shape == [64, 112, 112]
    assert row(s, "fc").output_shape == [1000] and s.output_shape == [1000]
    assert row(s, "conv1").macs == 64 * 3 * 7 * 7 * 112 * 112
    assert row(s, "layer4").rf == 435 and row(s, "layer4").jump == 32


def test_container_rows_hold_what_is_inside_them(resnet18):
    block = row(resnet18, "layer2.0")  # conv1, conv2 and the 1x1 downsample convolution of the skip path
    parts = ["layer2.0.conv1", "layer2.0.conv2", "layer2.0.downsample.0"]
    assert block.macs == sum(row(resnet18, p).macs for p in parts)
    assert block.params == sum(row(resnet18, p).params for p in parts + ["layer2.0.bn1", "layer2.0.bn2",
                                                                         "layer2.0.downsample.1"])
    assert row(resnet18, "layer1.0.relu").calls == 2  # a BasicBlock uses its ReLU twice
    assert sum(r.macs for r in resnet18.layers if r.depth == 1) == resnet18.total_macs


def test_a_module_called_twice_shows_its_first_call_where_it_is_listed(resnet18):
    # BasicBlock's one relu runs after bn1 and again after the residual sum; its row stands after bn1, and showed
    # the second call's field (27 px), a growth no pointwise layer makes
    relu, bn1 = row(resnet18, "layer1.0.relu"), row(resnet18, "layer1.0.bn1")
    assert (relu.rf, relu.jump, relu.output_shape) == (bn1.rf, bn1.jump, bn1.output_shape) == (19, 4, [64, 56, 56])
    assert row(resnet18, "layer1.0").rf == 27  # the second call's output is the block's
    assert "ReLU x2" in resnet18.table() and "BasicBlock x" not in resnet18.table()
    field = cnnkit.receptive_field("resnet18")
    relu = next(x for x in field.layers if x.name == "layer1.0.relu")
    assert (relu.rf, relu.calls) == (19, 2) and field.final_rf == 435
    assert "ReLU x2" in format_receptive_field(field)


def test_simple_cnn_rows_and_table():
    s = cnnkit.summary("simple_cnn")
    assert s.input_size == [3, 32, 32] and s.total_params == 620_362
    assert [r.name for r in s.layers if r.depth == 2][:3] == ["features.0", "features.1", "features.2"]
    assert row(s, "features.0").macs == 32 * 27 * 32 * 32
    assert s.activation_bytes > 0 and s.param_bytes == 4 * 620_362
    text = s.table()
    assert "features.0" in text and "Parameters: 620,362" in text and "MACs: 10.85 M" in text
    assert "features.0" not in s.table(depth=1)


def test_frozen_parameters_and_checkpoints(trained_run):
    model = cnnkit.load_checkpoint(trained_run).model
    for p in model.features.parameters():
        p.requires_grad_(False)
    s = cnnkit.summary(model)
    assert s.frozen_params == 93_248 and s.trainable_params == 620_362 - 93_248
    assert row(s, "features").trainable_params == 0 and row(s, "classifier").trainable_params == 527_114
    assert cnnkit.summary(trained_run).total_params == 620_362


@pytest.mark.parametrize("config, epoch, trainable, note", [
    ({"freeze": "backbone"}, 5, 40_970, "as the run trained them: head"),
    ({"stages": "classifier:2@1e-3,features.4+classifier:3@1e-4"}, 5, 40_970 + 18_432,
     "as the run's stage 2 of 2 trained them: features.4+classifier"),
    ({"stages": "classifier:2@1e-3,features.4+classifier:3@1e-4"}, 2, 40_970,  # a best.pt of stage 1
     "as the run's stage 1 of 2 trained them: classifier"),
    ({"stages": "classifier:2@1e-3,all:3@1e-4"}, 3, 60_458, None),
])
def test_a_run_that_froze_part_of_the_model_is_summarised_as_it_trained(tmp_path, config, epoch, trainable, note):
    # A checkpoint's parameters load trainable; the run trained only what the stage of its epoch unfroze.
    from cnnkit.checkpoint import make_payload, save_checkpoint

    model = cnnkit.create_model("cnn_bn")
    config = {"stages": None, "freeze": None, "unfreeze": None, "epochs": 5, **config}
    path = tmp_path / "run.pt"
    save_checkpoint(make_payload(model, [str(i) for i in range(10)], 32, 3, [0.5] * 3, [0.25] * 3, config=config,
                                 epoch=epoch), str(path))
    s = cnnkit.summary(str(path))
    assert (s.total_params, s.trainable_params, s.frozen_params) == (60_458, trainable, 60_458 - trainable)
    assert s.trained == note
    assert (f"frozen {60_458 - trainable:,}, {note})" if note else "frozen 0)") in s.table()


def test_parameters_of_layers_the_forward_pass_skips_are_counted_apart():
    s = cnnkit.summary("inception_v3", aux_logits=True)  # the auxiliary head only runs in training
    assert s.total_params == 27_161_264 and s.unused_params > 3_000_000
    assert not any(r.name.startswith("AuxLogits") for r in s.layers)


def test_functional_operations_in_forward_are_counted():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.weight = nn.Parameter(torch.randn(10, 8 * 16 * 16))

        def forward(self, x):
            x = torch.nn.functional.max_pool2d(self.conv(x), 2)
            return torch.flatten(x, 1) @ self.weight.t()  # a matmul outside any module

    s = cnnkit.summary(Net(), input_size=(3, 32, 32))
    assert s.total_macs == 8 * 27 * 32 * 32 + 10 * 8 * 16 * 16
    assert s.output_shape == [10] and s.total_params == 8 * 27 + 8 + 10 * 2048


def test_non_square_input_and_other_sizes():
    s = cnnkit.summary("resnet18", input_size=(3, 96, 64))
    assert row(s, "layer4").output_shape == [512, 3, 2]
    assert cnnkit.summary("simple_cnn", input_size=(1, 28, 28)).layers[0].output_shape == [128, 3, 3]


@pytest.mark.parametrize("size, words", [
    ((3, 224), ["C H W", "2 numbers"]),
    ((3, 0, 5), ["positive"]),
    ((3, 32, 32), ["cannot take a 3x32x32 input", "larger --input-size"]),
])
def test_bad_input_sizes(size, words):
    with pytest.raises(UserError) as e:
        cnnkit.summary("alexnet", input_size=size)
    for w in words:
        assert w in str(e.value)


def test_unknown_model_and_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="unknown model 'resnet81'.*resnet18"):
        cnnkit.summary("resnet81")
    with pytest.raises(UserError, match="does not exist"):
        cnnkit.summary(str(tmp_path / "nothing" / "best.pt"))


def test_a_model_name_at_a_non_square_size_is_told_to_take_a_square_one():
    # it said "cannot take a 3x28x40 input (...); use a larger --input-size": no larger size helps a flatten head
    with pytest.raises(UserError) as e:
        cnnkit.summary("simple_cnn", input_size=(3, 28, 40))
    assert "model 'simple_cnn' is built for a square input (28x28" in str(e.value)
    assert str(e.value).endswith("use a square size, e.g. --input-size 3 40 40")
    assert cnnkit.summary("simple_cnn", input_size=(3, 40, 40)).output_shape == [10]
    with pytest.raises(UserError) as e:  # a global-pool head takes other sizes: this one is too small
        cnnkit.summary("alexnet", input_size=(3, 224, 8))
    assert "cannot take a 3x224x8 input" in str(e.value) and "use a larger --input-size" in str(e.value)


def test_a_model_that_asserts_its_input_size_gets_the_square_size_advice():
    # torchvision's ViT checks the size with `assert`: that was "internal error: AssertionError ... please report it"
    with pytest.raises(UserError) as e:
        cnnkit.summary("vit_b_16", input_size=(3, 224, 160))
    assert "model 'vit_b_16' is built for a square input (224x224" in str(e.value)
    assert "Wrong image width" in str(e.value) and str(e.value).endswith("--input-size 3 224 224")


@pytest.mark.parametrize("downsample", ["max", "avg"])
def test_a_gap_convnet_too_small_for_its_input_is_a_user_error(downsample):
    with pytest.raises(UserError, match="input size 16 is too small for this network.*fewer downsampling stages"):
        cnnkit.summary("convnet", input_size=16, widths=[8] * 5, downsample=downsample)


@pytest.mark.parametrize("args, words", [
    (["--model-opt", "num_classes=3"], "--model-opt num_classes: this option is set by --num-classes"),
    (["--model-opt", "input_size=64"], "--model-opt input_size: this option is set by --input-size"),
    (["--model-opt", "in_channels=1"], "--model-opt in_channels: this option is set by --input-size C H W"),
    (["--model-opt", "widths=[0,8]"], "convnet: widths must be positive whole numbers, got [0, 8]"),
    (["--model-opt", "widths=[-1,8]"], "convnet: widths must be positive whole numbers, got [-1, 8]"),
])
def test_summary_model_opt_errors_are_one_line(capsys, args, words):
    from cnnkit.cli import main

    for command in ("summary", "rf"):
        assert main([command, "convnet", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err and "internal error" not in err, err


def test_summary_takes_a_dropout_written_as_python_writes_it(capsys):
    from cnnkit.cli import main

    assert main(["summary", "convnet", "--model-opt", "dropout=.5", "--json"]) == 0
    assert '"Dropout"' in capsys.readouterr().out


def test_a_count_unlike_the_one_torchvision_lists_says_why():
    """inception_v3 is built without its auxiliary classifier: 23,834,568 parameters where torchvision's weights
    list 27,161,264, and the summary gave no hint why its count was not the published one."""
    s = cnnkit.summary("inception_v3")
    assert s.total_params == 23_834_568
    assert s.published == ("torchvision's inception_v3 weights (IMAGENET1K_V1) list 27,161,264 parameters; cnnkit "
                           "builds inception_v3 with aux_logits=False, init_weights=True (--model-opt changes that)")
    assert f"\n  {s.published}\n" in s.table(depth=1)
    assert cnnkit.summary("inception_v3", aux_logits=True).published is None  # 27,161,264
    assert cnnkit.summary("resnet18").published is None
    assert cnnkit.summary("inception_v3", num_classes=10).published is None  # not built as the weights were


def test_a_module_for_grey_images_or_one_input_size_is_told_the_fix_that_fits():
    """cnnkit.summary(module) of a network built for 1x28x28 images said "use a larger --input-size", for 3x224x224
    (the default) as for 1x32x32: the fix is its channel count, or the size its linear layer was built for."""
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 13 * 13, 10))
    with pytest.raises(UserError, match="its first convolution takes 1-channel images: use --input-size 1 224 224$"):
        cnnkit.summary(net)
    with pytest.raises(UserError, match="a linear layer is sized for another input size .*built for$"):
        cnnkit.summary(net, input_size=(1, 32, 32))
    assert cnnkit.summary(net, input_size=(1, 28, 28)).total_params == 13_610
    with pytest.raises(UserError, match=r"use a larger --input-size \(the smallest it takes: 32\)$"):
        cnnkit.summary("vgg16", input_size=16)


@pytest.mark.parametrize("extra", [{"num_classes": 3}, {"widths": (8, 16)}])
def test_build_options_for_a_module_are_an_error_not_ignored(extra):
    """summary(module, num_classes=3) summarised the module's own 10-class head as if asked for it."""
    net = cnnkit.create_model("convnet")
    for inspect in (cnnkit.summary, cnnkit.receptive_field):
        with pytest.raises(UserError, match="apply to model names, not to a module"):
            inspect(net, None, **extra)
