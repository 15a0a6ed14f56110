"""The fast recipe's parts: fastnet's whitening layer, Muon, test-time augmentation, the recipe's options,
the deferred finite-loss check and --compile."""

import json

import torch
import torch.nn as nn

import cnnkit
from cnnkit.models.fast import FastNet
from cnnkit.checkpoint import load_checkpoint
from cnnkit.train.optim import Muon, make_optimizer, orthogonalize
from tests.conftest import run_cli

TINY = dict(data="shapes", num_samples=256, val_split=0.25, progress=False)


def test_whitening_layer_decorrelates_the_patches_it_was_computed_from():
    torch.manual_seed(0)
    mixing = torch.tensor([[1.0, 0.9, 0.8], [0.0, 0.4, 0.3], [0.0, 0.0, 0.2]])
    images = torch.einsum("dc,nchw->ndhw", mixing, torch.randn(200, 3, 16, 16))  # strongly correlated channels
    model = FastNet(num_classes=4)
    model.init_from_data(images)
    out = nn.functional.conv2d(images, model.whiten_weight)[:, :12]  # the first half; the rest are negatives
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12), atol=0.05)


def test_fastnet_has_no_trainable_scale_or_whitening_filters():
    model = cnnkit.create_model("fastnet", num_classes=10)
    names = [n for n, _ in model.named_parameters()]
    assert "whiten_weight" not in names and not any(n.endswith("norm1.weight") for n in names)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_orthogonalize_brings_every_singular_value_near_one():
    g = torch.randn(64, 288) * torch.logspace(-3, 1, 288)  # singular values over four orders of magnitude
    s = torch.linalg.svdvals(orthogonalize(g).float())
    assert s.min() > 0.3 and s.max() < 1.6


def test_muon_steps_filters_at_fixed_norm_and_the_rest_with_sgd():
    torch.manual_seed(0)
    model = FastNet(num_classes=4, widths=(8, 8, 8))
    optimizer = make_optimizer(model, "muon", lr=0.1, weight_decay=0.0, batch_size=16)
    assert isinstance(optimizer, Muon) and [g["muon"] for g in optimizer.param_groups] == [True, False, False]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(16, 3, 32, 32)).logsumexp(1).mean().backward()
    optimizer.step()
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), name
    for group in optimizer.param_groups:  # a step of size zero leaves only the renormalisation of the filters
        group["lr"] = 0.0
    optimizer.step()
    for p in optimizer.param_groups[0]["params"]:
        assert torch.isclose(p.norm(), torch.tensor(len(p) ** 0.5), rtol=1e-3)


def test_recipe_sets_its_options_and_explicit_ones_win(tmp_path):
    result = cnnkit.train(**TINY, recipe="fast", epochs=1, batch_size=64, model_options={"widths": (16, 32, 32)}, out=str(tmp_path / "run"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["model"], config["optimizer"], config["schedule"]) == ("fastnet", "muon", "linear")
    assert (config["epochs"], config["batch_size"], config["label_smoothing"]) == (1, 64, 0.2)
    # train's final test-time augmentation is eval's --tta --tta-shift 1, on the same weights
    assert result.tta_val_acc == cnnkit.evaluate(str(tmp_path / "run" / "last.pt"), tta=True, tta_shift=1).acc
    ckpt = load_checkpoint(str(tmp_path / "run"))  # the whitening filters travel in the checkpoint
    assert ckpt.model.whiten_weight.abs().sum() > 0


def test_cli_recipe_defaults_yield_to_flags(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--recipe", "fast", "--data", "shapes", "--num-samples", "128", "--val-split", "0.25",
                   "--epochs", "1", "--batch-size", "32", "--model-opt", "widths=[16,32,32]", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "with test-time augmentation" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert (config["model"], config["epochs"], config["batch_size"], config["tta"]) == ("fastnet", 1, 32, True)


def test_compiled_training_saves_plain_weights(tmp_path):
    result = cnnkit.train(**TINY, model="linear", epochs=1, compile=True, precision="fp32", out=str(tmp_path / "run"))
    ckpt = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    assert not any("_orig_mod" in k for k in ckpt.model.state_dict())
    assert result.val_acc == cnnkit.evaluate(str(tmp_path / "run" / "last.pt")).acc


def test_batchnorm_under_bf16_autocast_keeps_fp32_statistics_close_to_fp32_training():
    from cnnkit.train.precision import autocast

    torch.manual_seed(0)
    x = torch.randn(64, 3, 16, 16) * 50 + 100  # large mean, where a bf16 variance would lose digits
    stats = {}
    for dtype in (None, torch.bfloat16):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
        with autocast(torch.device("cpu"), dtype):
            model(x)
        bn = model[1]
        assert bn.running_mean.dtype == torch.float32 and bn.running_var.dtype == torch.float32
        stats[dtype] = (bn.running_mean.clone(), bn.running_var.clone())
    assert torch.allclose(stats[None][0], stats[torch.bfloat16][0], rtol=2e-2, atol=0.1)
    assert torch.allclose(stats[None][1], stats[torch.bfloat16][1], rtol=2e-2)


def test_compile_takes_torchs_mode_names_and_refuses_others(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", "shapes", "--num-samples", "64", "--epochs", "1", "--model", "linear",
                   "--compile", "max-autotune-no-cudagraphs", "--precision", "fp32", "--out", out, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["compile"] == "max-autotune-no-cudagraphs"
    assert "CUDA_HOME" not in proc.stderr, proc.stderr  # torch's note on machines with a CUDA toolkit, no GPU
    bad = run_cli("train", "--compile", "fastest", "--out", tmp_path / "bad")
    assert bad.returncode == 2 and "invalid choice: 'fastest'" in bad.stderr
    try:
        cnnkit.train(**TINY, compile="fastest", out=str(tmp_path / "bad2"))
    except cnnkit.errors.UserError as e:
        assert "--compile takes no value or one of default, reduce-overhead" in str(e)
    else:
        raise AssertionError("an unknown compile mode was accepted")
    assert not (tmp_path / "bad2").exists()


def test_compile_on_the_cpu_drops_torchs_cuda_home_note_and_nothing_else():
    import logging

    from cnnkit.train.options import make_config
    from cnnkit.train.setup import start_machine

    start_machine(make_config(None, {"compile": True, "device": "cpu", "threads": torch.get_num_threads()}))
    logger = logging.getLogger("torch.utils.cpp_extension")  # where torch logs the note, on importing the module
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local/cuda")
        logger.warning("Error checking compiler version for %s", "c++")
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records] == ["Error checking compiler version for c++"]
