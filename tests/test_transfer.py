import collections
import datetime
import json
import math
import os

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import cnnkit
from cnnkit.errors import CheckpointError, UserError
from cnnkit.models.heads import find_head, replace_head
from cnnkit.train.optim import make_optimizer
from cnnkit.transfer import check_stage_options, load_weights, parse_stages, plan_stages, set_trainable
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error

TINY = dict(data="shapes", num_samples=256, val_split=0.25, batch_size=32, progress=False)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A $TORCH_HOME holding resnet18 weights under the exact name torchvision's weights enum downloads to."""
    home = tmp_path / "torch_home"
    folder = home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.manual_seed(123)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    torch.save(state, folder / os.path.basename(url))
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home, state


def test_pretrained_loads_through_torchvisions_cache_path(tmp_path, torch_home):
    home, state = torch_home
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "resnet18", "--pretrained", "--freeze", "backbone", "--data", "shapes",
                   "--num-samples", "64", "--val-split", "0.25", "--input-size", "32", "--epochs", "1",
                   "--precision", "fp32", "--out", out, env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    trained = torch.load(out / "last.pt", weights_only=True)
    # Frozen backbone: every weight is the file's; BatchNorm statistics did not drift; only fc changed shape.
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(trained["state_dict"][k], v), k
    assert trained["state_dict"]["fc.weight"].shape == (10, 512)
    # Preprocessing follows the weights: ImageNet statistics, not the dataset's.
    assert trained["mean"] == pytest.approx([0.485, 0.456, 0.406]) and trained["std"] == pytest.approx([0.229, 0.224, 0.225])
    stages = json.loads((out / "stages.json").read_text())
    assert stages[0]["trainable_params"] == ["fc.weight", "fc.bias"]


def test_missing_pretrained_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    with pytest.raises(UserError) as e:
        cnnkit.create_model("resnet18", pretrained=True)
    expected = str(tmp_path / "empty" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    assert expected in str(e.value) and "download" in str(e.value)
    assert not os.listdir(tmp_path / "empty" / "hub" / "checkpoints")  # nothing half-downloaded left behind


def _cut_short_cached_resnet18(tmp_path, monkeypatch):
    """resnet18's weights in a fresh $TORCH_HOME's cache, cut short as by a download that stopped; their path."""
    checkpoints = tmp_path / "home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    cached = checkpoints / "resnet18-f37072fd.pth"
    torch.save(cnnkit.create_model("resnet18", num_classes=1000).state_dict(), cached)
    cached.write_bytes(cached.read_bytes()[:100_000])
    return cached


def test_damaged_or_wrong_cached_pretrained_weights_are_named_to_delete(tmp_path, monkeypatch):
    cached = _cut_short_cached_resnet18(tmp_path, monkeypatch)
    with pytest.raises(UserError, match=f"pretrained weights for resnet18 \\({cached}\\) cannot be read .*delete"):
        cnnkit.create_model("resnet18", pretrained=True)
    torch.save(torchvision.models.resnet34().state_dict(), cached)  # another model's weights under that name
    with pytest.raises(UserError, match="do not fit torchvision's resnet18: they are another model's; delete") as e:
        cnnkit.create_model("resnet18", pretrained=True)
    assert e.value.exit_code == 1  # the file in the cache is wrong, not the command line: it exited with 2
    # Right weights, but options that change the architecture: the options are named, not the file
    from cnnkit.models.pretrained import cached_weights_path

    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), cached_weights_path("mobilenet_v3_small"))
    with pytest.raises(UserError, match=r"for its default architecture, which these options change \(width_mult=0.5"):
        cnnkit.create_model("mobilenet_v3_small", pretrained=True, width_mult=0.5)


def test_a_cut_short_cached_pretrained_file_is_named_damaged_with_a_short_reason(tmp_path, monkeypatch):
    # It quoted PyTorch's error cut mid-sentence: "(... This is an internal miniz error. If you are seeing this
    # error, there is a high)".
    cached = _cut_short_cached_resnet18(tmp_path, monkeypatch)
    with pytest.raises(UserError) as caught:
        cnnkit.create_model("resnet18", pretrained=True)
    message = str(caught.value)
    assert f"({cached}) cannot be read (the file is damaged or cut short: PytorchStreamReader failed reading zip " \
           "archive: failed finding central directory); delete it so that it is downloaded again" in message, message
    assert "If you are seeing" not in message and "miniz" not in message and "\n" not in message


def test_no_pretrained_weights_for_own_models():
    with pytest.raises(UserError, match="no pretrained weights"):
        cnnkit.create_model("simple_cnn", pretrained=True)


@pytest.mark.parametrize("name, head", [
    ("resnet18", "fc"), ("vgg11", "classifier.6"), ("alexnet", "classifier.6"), ("efficientnet_b0", "classifier.1"),
    ("mobilenet_v2", "classifier.1"), ("mobilenet_v3_small", "classifier.3"), ("densenet121", "classifier"),
    ("squeezenet1_0", "classifier.1"), ("convnext_tiny", "classifier.2"), ("regnet_y_400mf", "fc"),
    ("shufflenet_v2_x0_5", "fc"), ("mnasnet0_5", "classifier.1"), ("googlenet", "fc"), ("inception_v3", "fc"),
    ("vit_b_16", "heads.head"), ("swin_t", "head"), ("maxvit_t", "classifier.5"), ("wide_resnet50_2", "fc"),
    ("simple_cnn", "classifier.4"), ("cnn_bn", "classifier.1"), ("convnet", "classifier.2"),
])
def test_head_is_found_and_replaced_in_every_family(name, head):
    try:
        with torch.device("meta"):  # shapes only: no memory or time spent on weights
            model = cnnkit.create_model(name, num_classes=1000, input_size=224)
    except NotImplementedError:  # RegNet computes its widths from tensor values: build it for real
        model = cnnkit.create_model(name, num_classes=1000, input_size=224)
    assert find_head(model)[0] == head
    assert replace_head(model, 7) == head
    new = model.get_submodule(head)
    assert (new.out_features if hasattr(new, "out_features") else new.out_channels) == 7


def test_head_replacement_runs_forward():
    model = cnnkit.create_model("squeezenet1_1", num_classes=1000, input_size=64).eval()
    replace_head(model, 3)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_frozen_parameters_and_batchnorm_statistics_do_not_change(tmp_path):
    base = cnnkit.train(**TINY, model="cnn_bn", epochs=1, out=str(tmp_path / "base"))
    start = torch.load(os.path.join(base.run_dir, "last.pt"), weights_only=True)["state_dict"]
    cnnkit.train(**TINY, model="cnn_bn", epochs=2, weights=base.run_dir, freeze="backbone", lr=0.05,
                 out=str(tmp_path / "frozen"))
    end = torch.load(tmp_path / "frozen" / "last.pt", weights_only=True)["state_dict"]
    for k in start:
        if k.startswith("classifier."):
            assert not torch.equal(start[k], end[k]), k
        else:  # conv weights, BN affine parameters and BN running statistics alike
            assert torch.equal(start[k], end[k]), k


def test_staged_schedule_switches_parameters_and_learning_rate(tmp_path):
    base = cnnkit.train(**TINY, model="cnn_bn", epochs=1, out=str(tmp_path / "base"))
    start = torch.load(os.path.join(base.run_dir, "last.pt"), weights_only=True)["state_dict"]
    r = cnnkit.train(**TINY, model="cnn_bn", weights=base.run_dir, stages="head:1@0.01,features.4+head:2@0.001",
                     schedule="constant", out=str(tmp_path / "staged"))
    assert r.epochs == 3
    end = torch.load(tmp_path / "staged" / "last.pt", weights_only=True)["state_dict"]
    assert torch.equal(start["features.0.weight"], end["features.0.weight"])  # never trained
    assert not torch.equal(start["features.4.weight"], end["features.4.weight"])  # trained in stage 2
    stages = json.loads((tmp_path / "staged" / "stages.json").read_text())
    assert [s["first_epoch"] for s in stages] == [1, 2]
    assert stages[0]["trainable_params"] == ["classifier.1.weight", "classifier.1.bias"]
    assert "features.4.weight" in stages[1]["trainable_params"]
    lrs = [float(line.split(",")[1]) for line in (tmp_path / "staged" / "metrics.csv").read_text().splitlines()[1:]]
    assert lrs == pytest.approx([0.01, 0.001, 0.001])


def test_discriminative_learning_rates():
    model = cnnkit.create_model("resnet18")
    opt = make_optimizer(model, "adamw", 1e-3, 0.01, backbone_lr=1e-4)
    head_ids = {id(model.fc.weight), id(model.fc.bias)}
    for group in opt.param_groups:
        is_head = all(id(p) in head_ids for p in group["params"])
        assert group["lr"] == (1e-3 if is_head else 1e-4)


def test_weights_from_plain_state_dict_and_safetensors_with_new_head(tmp_path, capsys):
    source = cnnkit.create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    for path in ("w.pth", "w.safetensors"):
        target = cnnkit.create_model("resnet18", num_classes=5)
        load_weights(target, str(tmp_path / path))
        assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)
        assert target.fc.weight.shape == (5, 512)
        out = capsys.readouterr().out
        assert "the head fc (fc." in out and "starts fresh, at zero: its shape does not fit" in out
        # The new head starts at zero (Big Transfer's choice): the first predictions are uniform.
        assert not target.fc.weight.any() and not target.fc.bias.any()
        with torch.no_grad():
            logits = target.eval()(torch.randn(3, 3, 64, 64))
        assert torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2])).item() == pytest.approx(math.log(5))


def test_weights_from_cnnkits_safetensors_export_keep_the_runs_normalisation(tmp_path, capsys):
    # The export carries the run's description as the checkpoint does: the file format must not change training.
    run = cnnkit.train(**TINY, model="simple_cnn", epochs=1, out=str(tmp_path / "run"))
    cnnkit.export(run.run_dir, "safetensors", str(tmp_path / "model.safetensors"))
    saved = torch.load(os.path.join(run.run_dir, "last.pt"), weights_only=True)
    for source in (run.run_dir, str(tmp_path / "model.safetensors")):
        model = cnnkit.create_model("simple_cnn", num_classes=10)
        payload = load_weights(model, source, classes=list(saved["classes"]))
        assert payload is not None and payload["mean"] == saved["mean"] and payload["std"] == saved["std"], source
        assert torch.equal(model.classifier[4].weight, saved["state_dict"]["classifier.4.weight"])


def test_a_head_trained_on_other_classes_starts_fresh_even_when_its_shape_fits(tmp_path, capsys):
    """A run on airplane..deer fine-tuned on dog..truck: five outputs each, but the old head's answers mean
    nothing for the new classes; loading it kept a confidently wrong head (first loss 5.7 for 5 classes)."""
    run = cnnkit.train(**TINY, model="simple_cnn", epochs=1, out=str(tmp_path / "run"))
    saved = torch.load(os.path.join(run.run_dir, "last.pt"), weights_only=True)
    same = cnnkit.create_model("simple_cnn", num_classes=10)
    load_weights(same, run.run_dir, classes=list(saved["classes"]))
    assert torch.equal(same.classifier[4].weight, saved["state_dict"]["classifier.4.weight"])
    out = capsys.readouterr().out
    assert "starts fresh" not in out
    # A run folder is read through one of its checkpoints, and the line names which ("from RUN" did not).
    assert f"tensors from {os.path.join(run.run_dir, 'best.pt')}" in out, out
    other = cnnkit.create_model("simple_cnn", num_classes=10)
    load_weights(other, run.run_dir, classes=[f"class{i}" for i in range(10)])
    out = capsys.readouterr().out
    assert "the head classifier.4" in out and "trained on other classes (10 in the file, 10 here, 0 in common)" in out
    assert not other.classifier[4].weight.any()
    # Three of the run's classes, matched by name, would still be read by the wrong outputs: the message says so.
    load_weights(cnnkit.create_model("simple_cnn", num_classes=3), run.run_dir, classes=list(saved["classes"])[:3])
    assert "trained on other classes (10 in the file, 3 here, 3 in common)" in capsys.readouterr().out
    shuffled = list(reversed(saved["classes"]))
    load_weights(cnnkit.create_model("simple_cnn", num_classes=10), run.run_dir, classes=shuffled)
    assert "trained on the same classes in another order" in capsys.readouterr().out
    assert torch.equal(other.features[0].weight, saved["state_dict"]["features.0.weight"])


def test_a_head_built_differently_or_missing_is_dropped_and_the_backbone_loads(tmp_path, capsys):
    """A file whose head is built differently (here an MLP projector before the classifier, as some
    pretraining recipes use) or that has no head at all (a backbone-only file): the file's whole head goes, the
    new head starts at zero, and the backbone loads strictly."""
    source = cnnkit.create_model("resnet18", num_classes=5)
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    torch.save(state, tmp_path / "headless.pth")
    torch.save({**state, "fc.0.weight": torch.randn(64, 512), "fc.3.weight": torch.randn(5, 64),
                "fc.3.bias": torch.randn(5)}, tmp_path / "projector.pth")
    for name, why in (("projector.pth", "built differently"), ("headless.pth", "the file has no head")):
        target = cnnkit.create_model("resnet18", num_classes=5)
        load_weights(target, str(tmp_path / name))
        assert why in capsys.readouterr().out
        assert torch.equal(target.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
        assert target.fc.weight.shape == (5, 512) and not target.fc.weight.any()


def test_weights_that_do_not_fit_name_keys_and_shapes(tmp_path):
    # Usage errors (exit code 2): the files read fine, the command line pairs them with a model of another shape.
    torch.save(cnnkit.create_model("resnet34").state_dict(), tmp_path / "r34.pth")
    with pytest.raises(UserError, match="unexpected layer.*; pass weights saved from a resnet18 at these options, "
                                        "or leave out --weights$") as caught:
        load_weights(cnnkit.create_model("resnet18"), str(tmp_path / "r34.pth"))
    assert caught.value.exit_code == 2
    torch.save(cnnkit.create_model("simple_cnn", input_size=64).state_dict(), tmp_path / "s64.pth")
    with pytest.raises(UserError, match=r"classifier.1.weight: file \(256, 8192\) vs model \(256, 2048\)") as caught:
        load_weights(cnnkit.create_model("simple_cnn"), str(tmp_path / "s64.pth"))
    assert caught.value.exit_code == 2
    run = cnnkit.train(**TINY, model="cnn_bn", epochs=1, out=str(tmp_path / "bn"))  # a run of another model
    with pytest.raises(UserError, match=f"{run.run_dir}/best.pt holds a cnn_bn and this model is a simple_cnn: pass "
                                        "--model cnn_bn") as caught:
        load_weights(cnnkit.create_model("simple_cnn"), run.run_dir)
    assert caught.value.exit_code == 2
    with pytest.raises(UserError, match=f"{run.run_dir}/best.pt was trained on 3-channel images and this model takes 1: "
                                        "pass --channels 3$"):
        load_weights(cnnkit.create_model("cnn_bn", in_channels=1), run.run_dir)


@pytest.mark.parametrize("keep", [50_000, 500_000])
def test_a_weights_file_cut_short_is_named_as_damaged(tmp_path, keep):
    # It said "cannot read weights r18.pth ([Errno 22] Invalid argument); it must be a state dict (.pt/.pth) ...",
    # of a file that is one, cut short; or quoted PyTorch's miniz advice, cut mid-sentence.
    path = tmp_path / "r18.pth"
    torch.save(cnnkit.create_model("resnet18").state_dict(), path)
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(CheckpointError) as caught:
        load_weights(cnnkit.create_model("resnet18"), str(path))
    message = str(caught.value)
    assert message.startswith(f"weights file {path} is damaged, truncated or not a PyTorch file (")
    assert "restore or download it again" in message and "If you are seeing" not in message


@pytest.mark.parametrize("seed", range(4))
def test_a_weights_file_of_random_bytes_is_named_as_damaged_not_as_a_refused_pickle(tmp_path, seed):
    # It said "holds objects other than tensors and plain data () and was not loaded, since unpickling it could run
    # code": the weights-only unpickler's "Unsupported operand" read as a refusal, of bytes that are no pickle.
    path = tmp_path / "rand.pth"
    path.write_bytes(bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(seed)).tolist()))
    with pytest.raises(CheckpointError) as caught:
        load_weights(cnnkit.create_model("simple_cnn"), str(path))
    message = str(caught.value)
    assert message.startswith(f"weights file {path} is damaged, truncated or not a PyTorch file (neither a zip "
                              "archive nor a pickle: "), message
    assert "could run code" not in message and "()" not in message
    # A real pickle holding other objects keeps its message.
    torch.save({"head": collections.OrderedDict(), "when": datetime.date(2026, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="refers to datetime.date, which is not a tensor or plain data"):
        load_weights(cnnkit.create_model("simple_cnn"), str(path))


def test_weights_of_another_size_are_a_usage_error_on_the_command_line(tmp_path):
    run = cnnkit.train(**TINY, model="simple_cnn", epochs=1, out=str(tmp_path / "s32"))
    proc = run_cli("train", "--model", "simple_cnn", "--data", "shapes", "--num-samples", "64", "--input-size", "48",
                   "--epochs", "1", "--weights", run.run_dir, "--out", tmp_path / "s48")
    assert_one_line_error(proc, 2, f"{run.run_dir}/best.pt was trained on 32x32 images and this model is built for 48x48: "
                                "pass --input-size 32")


def test_bad_transfer_options():
    with pytest.raises(UserError, match="MODULES:EPOCHS@LR"):
        parse_stages("fc3@1e-3")
    with pytest.raises(UserError, match="top-level modules are conv1"):
        set_trainable(cnnkit.create_model("resnet18"), ["layer9"])


@pytest.mark.parametrize("text", [":3@1e-3", "+fc:3@1e-3", "fc:1@1e-3,layer4+:2@1e-4"])
def test_a_stage_with_an_empty_module_name_is_refused_not_read_as_the_whole_model(text):
    # "" names the model itself in named_modules(): a slip of the keyboard trained all 11 M parameters of resnet18
    with pytest.raises(UserError, match="has an empty module name"):
        parse_stages(text)


def test_stage_module_names_may_have_spaces_around_them_and_rates_must_be_finite():
    # "layer4 + fc" was looked up as "layer4 " and " fc"; a rate of inf trained until the loss went non-finite
    assert [s.modules for s in parse_stages("fc:1@1e-3, layer4 + fc:2@1e-4")] == [["fc"], ["layer4", "fc"]]
    with pytest.raises(UserError, match="positive, finite learning rate"):
        parse_stages("fc:1@inf")


def test_embed_and_probe(tmp_path, image_folder):
    run = cnnkit.train(model="cnn_bn", data=image_folder, epochs=2, batch_size=8, progress=False,
                       out=str(tmp_path / "run"))
    proc = run_cli("embed", run.run_dir, image_folder, "--out", tmp_path / "f.npy")
    assert proc.returncode == 0, proc.stderr
    import numpy as np

    feats, labels = np.load(tmp_path / "f.npy"), np.load(tmp_path / "f.labels.npy")
    assert feats.shape == (32, 64 * 4 * 4)  # cnn_bn at 16x16: 64 channels of 4x4 into the head
    assert labels.tolist() == sorted(labels.tolist()) and feats.std() > 0
    proc = run_cli("probe", run.run_dir, image_folder, "--val-split", "0.25", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["train_acc"] == 1.0 and result["num_val"] == 8  # 24 points in 1024 dimensions: separable


def test_pretrained_normalisation_for_one_channel_matches_the_adapted_first_conv():
    from cnnkit.models.pretrained import normalization

    mean, std, _ = normalization("resnet18", channels=1)
    assert mean == pytest.approx([(0.485 + 0.456 + 0.406) / 3]) and std == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    assert len(normalization("resnet18")[0]) == 3


def test_multi_stage_head_reads_each_stages_average_and_max_pooled_standardised_features():
    torch.manual_seed(0)
    model = cnnkit.create_model("resnet18", num_classes=5, head_from="layer2,layer4").eval()
    assert model.fc.in_features == 2 * (128 + 512)
    outputs = {}
    hooks = [getattr(model, s).register_forward_hook(lambda m, i, o, s=s: outputs.__setitem__(s, o))
             for s in ("layer2", "layer3", "layer4")]
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits = model(x)
        pooled = [pool(outputs[s]) for s in ("layer2", "layer4") for pool in (lambda t: t.mean((2, 3)),
                                                                              lambda t: t.amax((2, 3)))]
        expected = model.fc(torch.cat([(p - p.mean(1, keepdim=True)) / torch.sqrt(p.var(1, unbiased=False, keepdim=True)
                                                                                  + 1e-5) for p in pooled], 1))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(logits, expected)
    # Stages after the last one the head reads are not run.
    short = cnnkit.create_model("resnet18", num_classes=5, head_from=["layer3", "layer2"])
    ran = []
    short.layer4.register_forward_hook(lambda *a: ran.append("layer4"))
    assert short(x).shape == (3, 5) and short.fc.in_features == 2 * (128 + 256) and not ran


def test_multi_stage_head_on_a_loaded_backbone_starts_fresh_and_survives_checkpoint_and_export(tmp_path, capsys):
    source = cnnkit.create_model("resnet18", num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    target = cnnkit.create_model("resnet18", num_classes=5, head_from="layer2,layer3,layer4")
    load_weights(target, str(tmp_path / "w.pth"))
    assert "starts fresh, at zero" in capsys.readouterr().out
    assert torch.equal(target.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert target.fc.weight.shape == (5, 2 * 896) and not target.fc.weight.any()
    # A run with the option rebuilds the same model from its checkpoint, and it exports.
    run = cnnkit.train(**TINY, model="resnet18", model_options={"head_from": "layer3,layer4"}, epochs=1,
                       precision="fp32", out=str(tmp_path / "run"))
    ckpt = cnnkit.load_checkpoint(run.run_dir)
    assert type(ckpt.model).__name__ == "MultiStageResNet" and ckpt.model.head_from == ("layer3", "layer4")
    result = cnnkit.export(run.run_dir, "torchscript", str(tmp_path / "m.pt"), verify=True)
    assert result.verified


def test_multi_stage_head_through_pretrained_weights_from_torch_home(tmp_path, torch_home):
    home, state = torch_home
    out = tmp_path / "run"
    proc = run_cli("train", "--model", "resnet18", "--pretrained", "--model-opt", "head_from=layer3,layer4",
                   "--freeze", "backbone", "--data", "shapes", "--num-samples", "64", "--val-split", "0.25",
                   "--input-size", "32", "--epochs", "1", "--precision", "fp32", "--out", out,
                   env={"TORCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    trained = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(trained[k], v), k
    assert trained["fc.weight"].shape == (10, 2 * (256 + 512))


def test_bad_multi_stage_head_options():
    with pytest.raises(UserError, match="head_from takes stage names among layer1, layer2, layer3, layer4"):
        cnnkit.create_model("resnet18", head_from="layer2,layer5")
    with pytest.raises(UserError, match="head_from needs a ResNet-style model"):
        cnnkit.create_model("vgg11", head_from="layer4")


def test_probe_on_several_stages_of_a_run(tmp_path, image_folder):
    run = cnnkit.train(model="resnet18", data=image_folder, epochs=1, batch_size=8, progress=False, precision="fp32",
                       out=str(tmp_path / "run"))
    proc = run_cli("probe", run.run_dir, image_folder, "--val-split", "0.25", "--head-from", "layer3,layer4", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["feature_dim"] == 2 * (256 + 512)
    proc = run_cli("embed", run.run_dir, image_folder, "--out", tmp_path / "f.npy", "--head-from", "layer9")
    assert proc.returncode == 2 and "head_from takes stage names" in proc.stderr


def test_a_head_that_read_other_stages_starts_fresh_even_when_its_shape_fits(tmp_path, capsys):
    """head_from=layer3 on resnet18 gives fc 2 x 256 = 512 inputs, as many as the plain head's: same shape,
    other features."""
    plain = cnnkit.train(**TINY, model="resnet18", epochs=1, precision="fp32", out=str(tmp_path / "plain"))
    saved = torch.load(os.path.join(plain.run_dir, "last.pt"), weights_only=True)
    classes = list(saved["classes"])
    stage3 = cnnkit.create_model("resnet18", num_classes=len(classes), head_from="layer3")
    assert stage3.fc.weight.shape == saved["state_dict"]["fc.weight"].shape
    load_weights(stage3, plain.run_dir, classes=classes)
    assert "the file's head read other stages (head_from)" in capsys.readouterr().out
    assert not stage3.fc.weight.any()
    again = cnnkit.create_model("resnet18", num_classes=len(classes))
    load_weights(again, plain.run_dir, classes=classes)
    assert "starts fresh" not in capsys.readouterr().out


def test_stages_the_head_never_reads_never_train():
    model = cnnkit.create_model("resnet18", num_classes=5, head_from="layer2,layer3")
    trainable = set_trainable(model, None)
    assert "layer3.0.conv1.weight" in trainable and not any(n.startswith("layer4.") for n in trainable)
    assert not model.layer4[0].conv1.weight.requires_grad
    with pytest.raises(UserError, match="layer4 never runs: the head reads up to layer3"):
        set_trainable(model, ["layer4", "fc"])


def test_freezing_layers_that_start_random_is_warned_about(tmp_path):
    # Only the head learns, over features that never will: a new user's --freeze backbone without weights.
    import io

    log = io.StringIO()
    cnnkit.train(data="shapes", num_samples=128, epochs=1, freeze="backbone", progress=False,
                 out=str(tmp_path / "random"), log=log)
    assert ("warning: --freeze backbone keeps the other layers at their random initial weights (neither "
            "--pretrained nor --weights was given)") in log.getvalue()
    log = io.StringIO()
    cnnkit.train(data="shapes", num_samples=128, epochs=1, freeze="backbone", progress=False,
                 weights=str(tmp_path / "random" / "last.pt"), out=str(tmp_path / "tuned"), log=log)
    assert "random initial weights" not in log.getvalue()


def test_a_new_head_left_frozen_is_refused_before_a_run_that_could_not_learn(tmp_path, torch_home):
    # --unfreeze layer4 without fc kept the new head at zero, which passes no gradient back: the loss stayed at
    # ln(10) for the whole run and nothing said why.
    home, _ = torch_home
    common = ["train", "--model", "resnet18", "--pretrained", "--data", "shapes", "--num-samples", "64",
              "--input-size", "32", "--epochs", "1", "--precision", "fp32"]
    for options in (["--unfreeze", "layer4"], ["--stages", "layer4:1@0.01,fc:1@0.01"]):
        proc = run_cli(*common, *options, "--out", tmp_path / "run", env={"TORCH_HOME": str(home)})
        assert_one_line_error(proc, 2, "head fc frozen", "starts at zero", "nothing would train")
        assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="head fc frozen"):
        cnnkit.lr_find(model="resnet18", pretrained=True, data="shapes", num_samples=64, input_size=32,
                       unfreeze="layer4", progress=False, log=open(os.devnull, "w"))
    # A head trained on these classes (a run's own, same classes) may stay frozen: it passes gradients back.
    base = cnnkit.train(**TINY, model="cnn_bn", epochs=1, out=str(tmp_path / "base"))
    cnnkit.train(**TINY, model="cnn_bn", epochs=1, weights=base.run_dir, unfreeze="features.4",
                 out=str(tmp_path / "same_classes"), log=open(os.devnull, "w"))


@pytest.mark.parametrize("options, words", [
    (dict(freeze="backbone", unfreeze="layer4"), ["--freeze backbone", "--unfreeze layer4", "one of the two"]),
    (dict(freeze="backbone", stages="fc:1@0.01"), ["--stages", "--freeze", "ignored"]),
    (dict(unfreeze="layer4,fc", stages="fc:1@0.01"), ["--stages", "--unfreeze", "ignored"]),
])
def test_options_that_would_override_each_other_unseen_are_refused(options, words):
    # --stages won over --freeze/--unfreeze, and --unfreeze over --freeze, without a word.
    with pytest.raises(UserError) as e:
        check_stage_options(options.get("stages"), options.get("freeze"), options.get("unfreeze"))
    assert all(w in str(e.value) for w in words), str(e.value)
    for refused in (lambda: cnnkit.train(**TINY, model="cnn_bn", epochs=1, **options),  # train, lr-find, audit
                    lambda: cnnkit.lr_find(**TINY, model="cnn_bn", **options),
                    lambda: cnnkit.audit("resnet18", **options)):
        with pytest.raises(UserError) as e:
            refused()
        assert all(w in str(e.value) for w in words), str(e.value)
    # A run recorded before the refusal is planned as it trained (summary and audit of it read its plan): --stages
    # first, then --unfreeze
    planned = plan_stages(options.get("stages"), options.get("freeze"), options.get("unfreeze"), 1, 0.01)
    assert planned[0].modules == (["fc"] if options.get("stages") else ["layer4"])


def test_weights_beside_pretrained_keep_their_own_normalisation_and_need_no_torchvision_file(tmp_path, torch_home):
    # --pretrained --weights RUN normalised with ImageNet's statistics the weights of a run trained with its data's,
    # and read torchvision's file only for --weights to replace every weight of it.
    home, _ = torch_home
    options = dict(TINY, num_samples=64, model="resnet18", input_size=32, epochs=1, precision="fp32",
                   log=open(os.devnull, "w"))
    scratch = cnnkit.train(**options, out=str(tmp_path / "scratch"))
    first = torch.load(os.path.join(scratch.run_dir, "last.pt"), weights_only=True)
    os.environ["TORCH_HOME"] = str(tmp_path / "no_cache")  # monkeypatched by torch_home: restored after the test
    again = cnnkit.train(**options, pretrained=True, weights=scratch.run_dir, out=str(tmp_path / "again"))
    second = torch.load(os.path.join(again.run_dir, "last.pt"), weights_only=True)
    assert (second["mean"], second["std"]) == (first["mean"], first["std"])
    assert second["mean"] != pytest.approx([0.485, 0.456, 0.406])


def test_a_weights_path_named_safetensors_that_is_a_folder_or_missing_is_named_so(tmp_path):
    # Both were "cannot read X as safetensors (No such device (os error 19))" / "(No such file or directory ...)",
    # exit code 1, as if a file there were damaged.
    folder = tmp_path / "w.safetensors"
    folder.mkdir()
    with pytest.raises(UserError, match=f"{folder} is a folder without best.pt or last.pt") as caught:
        load_weights(cnnkit.create_model("simple_cnn"), str(folder))
    assert caught.value.exit_code == 2
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(UserError, match=f"weights file {missing} does not exist") as caught:
        load_weights(cnnkit.create_model("simple_cnn"), str(missing))
    assert caught.value.exit_code == 2
