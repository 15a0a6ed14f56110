import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit import compiled
from cnnkit.models import create_model
from cnnkit.train import rewrite
from cnnkit.train.rewrite import PoolReLU, fuse_pool_relu, pool_before_relu


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


def _fused(model: nn.Module) -> nn.Module:
    return fuse_pool_relu(pool_before_relu(model), batches=compiled.MIN_BATCHES)


def test_fusing_puts_one_pool_relu_layer_where_pool_and_relu_were():
    model = create_model("simple_cnn", num_classes=10)
    fast = _fused(model)
    assert _kinds(model.features) == ["Conv2d", "ReLU", "MaxPool2d"] * 3
    assert _kinds(fast.features) == ["Conv2d", "PoolReLU", "Identity"] * 3
    assert fast.features[1].pool is model.features[2] and fast.features[1].relu is model.features[1]
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in model.named_parameters()]
    other = nn.Sequential(nn.MaxPool2d(3), nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.ReLU())  # not 2x2 stride 2
    assert fuse_pool_relu(other, batches=compiled.MIN_BATCHES) is other
    short = pool_before_relu(model)  # a run too short to repay compiling keeps the plain layers
    assert fuse_pool_relu(short, batches=compiled.MIN_BATCHES - 1) is short


@pytest.mark.parametrize("rewritten", [pool_before_relu, _fused], ids=["reordered", "fused"])
@pytest.mark.parametrize("precision", [None, torch.bfloat16])
def test_training_through_the_rewrite_gives_the_same_weights_bit_for_bit(precision, rewritten):
    torch.manual_seed(0)
    plain = create_model("simple_cnn", num_classes=10).to(memory_format=torch.channels_last)
    other = copy.deepcopy(plain)
    fast = rewritten(other)
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
    if rewritten is _fused:  # the first pool's 16 x 32 x 32 x 32 input is large enough for the compiled loops
        assert fast.features[1].shape == (16, 32, 32, 32) and rewrite._pool_relu in compiled._compiled


def _pool_relu_pair(x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    y = layer(x)
    y.backward(torch.arange(y.numel(), dtype=torch.float32).view_as(y).to(y.dtype) / y.numel())
    return y.detach(), x.grad


def test_pool_relu_runs_the_two_layers_for_shapes_it_was_not_compiled_for():
    layer = PoolReLU(nn.MaxPool2d(2), nn.ReLU())
    big = torch.randn(8, 16, 64, 64).contiguous(memory_format=torch.channels_last)  # 2**19 values
    other_batch = torch.randn(9, 16, 64, 64).contiguous(memory_format=torch.channels_last)
    for x in (big, other_batch, torch.randn(8, 16, 64, 63), big[:1], big.contiguous()):  # odd width, small, NCHW
        assert all(torch.equal(a, b) for a, b in zip(_pool_relu_pair(x, layer), _pool_relu_pair(x, nn.Sequential(
            nn.MaxPool2d(2), nn.ReLU()))))
        assert layer.shape == big.shape  # compiled for the first shape only: nothing else recompiles


def test_pool_relu_falls_back_to_the_layers_with_a_warning_when_compiling_fails(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled, "_compiled", {})
    layer = PoolReLU(nn.MaxPool2d(2), nn.ReLU())
    x = torch.randn(8, 16, 64, 64).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(compiled, "_failure", None, raising=False)
    with warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        got = _pool_relu_pair(x, layer)
    assert not [w for w in python_warnings if "could not compile" in str(w.message)]  # the run shows it (below)
    assert compiled._compiled is None
    assert compiled.failure_warning().startswith(
        "could not compile the fused max-pool + ReLU (RuntimeError: no C++ compiler); compiled loops are off")
    assert compiled.failure_warning() is None  # once
    want = _pool_relu_pair(x, nn.Sequential(nn.MaxPool2d(2), nn.ReLU()))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


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


def test_a_long_enough_run_trains_through_the_fused_layers_to_the_same_weights(tmp_path, monkeypatch):
    import cnnkit
    from cnnkit.train import loop
    from cnnkit.checkpoint import load_checkpoint

    step_models = []
    monkeypatch.setattr(loop, "fuse_pool_relu", lambda m, batches: step_models.append(fuse_pool_relu(m, batches))
                        or step_models[-1])
    # Batches of 16 at 32x32: the first pool's input (16 x 32 x 32 x 32) is large enough to be compiled.
    common = dict(model="simple_cnn", data="shapes", num_samples=160, epochs=2, batch_size=16, progress=False,
                  precision="bf16", seed=3)
    monkeypatch.setattr(compiled, "MIN_BATCHES", 10**9)
    cnnkit.train(**common, out=str(tmp_path / "plain"))
    assert len(step_models) == 1 and not any(isinstance(m, PoolReLU) for m in step_models[0].modules())
    assert type(step_models[0].classifier[3]).__name__ == "RandDropout"  # on a CPU, in every run
    monkeypatch.setattr(compiled, "MIN_BATCHES", 16)  # 2 epochs of 9 batches (144 training images): 18 batches
    cnnkit.train(**common, out=str(tmp_path / "fused"))
    assert len(step_models) == 2 and step_models[1].features[1].shape == (16, 32, 32, 32)
    plain, other = (load_checkpoint(str(tmp_path / name / "last.pt")).model.state_dict() for name in ("plain", "fused"))
    for name, weight in plain.items():
        assert torch.equal(weight, other[name]), name


def test_a_compile_failure_is_one_of_the_runs_warnings_and_training_goes_on(tmp_path, monkeypatch):
    """A run long enough to compile on a machine without a C++ compiler reported the failure through Python's
    warnings.warn: not a "cnnkit: warning:" line of the run's log, nor in TrainResult.warnings."""
    import cnnkit

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failure", None, raising=False)
    monkeypatch.setattr(compiled, "MIN_BATCHES", 16)  # 2 epochs of 9 batches: long enough to compile
    log = io.StringIO()
    with warnings.catch_warnings(record=True) as python_warnings:
        warnings.simplefilter("always")
        r = cnnkit.train(model="simple_cnn", data="shapes", num_samples=160, epochs=2, batch_size=16, progress=False,
                         seed=3, log=log, out=str(tmp_path / "run"))
    assert not [w for w in python_warnings if "could not compile" in str(w.message)]
    failed = [w for w in r.warnings if w.startswith("could not compile the ")]
    assert len(failed) == 1 and "(RuntimeError: no C++ compiler)" in failed[0] and "training goes on" in failed[0]
    assert log.getvalue().count("cnnkit: warning: could not compile the ") == 1, log.getvalue()
    assert r.epochs_run == 2 and compiled._compiled is None  # trained both epochs with the plain layers


def test_every_run_of_a_process_that_ran_without_the_compiled_loops_says_so_once(tmp_path, monkeypatch):
    """A Python user calling cnnkit.train twice in one process, where compiling failed in the first, got the
    warning in the first run only: the second ran without the loops too, and its TrainResult said nothing."""
    import cnnkit

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(compiled, "_compiled", {})
    monkeypatch.setattr(compiled, "_failure", None, raising=False)
    monkeypatch.setattr(compiled, "_unreported", False, raising=False)
    monkeypatch.setattr(compiled, "MIN_BATCHES", 16)  # 2 epochs of 9 batches: long enough to compile
    common = dict(model="simple_cnn", data="shapes", num_samples=160, batch_size=16, progress=False, seed=3)
    for name in ("first", "second"):
        log = io.StringIO()
        r = cnnkit.train(**common, epochs=2, log=log, out=str(tmp_path / name))
        failed = [w for w in r.warnings if w.startswith("could not compile the ")]
        assert len(failed) == 1 and "(RuntimeError: no C++ compiler)" in failed[0], (name, r.warnings)
        assert log.getvalue().count("cnnkit: warning: could not compile the ") == 1, (name, log.getvalue())
    # a run too short for the loops asks for none: it runs as it would have anyway, and says nothing
    short = cnnkit.train(**common, epochs=1, log=io.StringIO(), out=str(tmp_path / "short"))
    assert not [w for w in short.warnings if w.startswith("could not compile the ")]


def test_rand_dropout_keeps_each_value_with_probability_one_minus_p_and_scales_it():
    from cnnkit.train.rewrite import RandDropout, rand_dropout

    model = create_model("simple_cnn", num_classes=10)
    fast = rand_dropout(model)
    assert _kinds(fast.classifier) == ["Flatten", "Linear", "ReLU", "RandDropout", "Linear"]
    assert _kinds(model.classifier)[3] == "Dropout" and fast.classifier[3].dropout is model.classifier[3]
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in model.named_parameters()]
    for p in (0.5, 0.2):
        layer = RandDropout(nn.Dropout(p))
        x = torch.rand(200, 500) + 1
        torch.manual_seed(0)
        y = layer(x.requires_grad_())
        kept = y != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 0.005  # 100,000 draws: 3-4 standard errors
        assert torch.allclose(y[kept], x[kept] / (1 - p))
        torch.manual_seed(0)
        assert torch.equal(layer(x), y)  # drawn from torch's generator: seeded runs repeat
        y.sum().backward()
        assert torch.equal(x.grad, kept.float() / (1 - p))  # the gradient passes through the kept values only
        layer.dropout.eval()  # the wrapped nn.Dropout's mode decides (model.eval() reaches it through the model)
        assert layer.training and torch.equal(layer(x), x)
    for unchanged in (nn.Sequential(nn.Dropout(0.0)), nn.Sequential(nn.Dropout(1.0)), nn.Sequential(nn.Dropout2d())):
        assert rand_dropout(unchanged) is unchanged


def test_fused_pools_built_for_avx2_keep_their_codes_in_the_inputs_dtype_and_match_the_layers():
    # Built for AVX2, the compiled loops loaded one-byte codes several times slower than codes of the input's
    # dtype; the AVX2 code path (an AVX-512 CPU held to AVX2, in a fresh process: the capability is read when torch
    # loads) must store them so and still give the two layers' output and gradient bit for bit.
    import os
    import subprocess
    import sys

    with open("/proc/cpuinfo") as f:
        if "avx512f" not in f.read().split():
            pytest.skip("needs a CPU with AVX-512 to lower its capability to AVX2")
    code = """
import torch, torch.nn as nn, torch.nn.functional as F
from cnnkit import compiled
from cnnkit.train import rewrite
assert torch.backends.cpu.get_cpu_capability() == "AVX2" and not rewrite.BYTE_CODES
torch.manual_seed(0)
for dtype in (torch.float32, torch.bfloat16):
    # 2x2 blocks of equal values: tied maxima in every window, and windows of negative values only
    x = F.interpolate(torch.randn(8, 16, 32, 32), scale_factor=2).to(dtype).contiguous(memory_format=torch.channels_last)
    out, codes = rewrite._pool_relu(x)
    assert codes.dtype == dtype, codes.dtype
    results = []
    for layer in (rewrite.PoolReLU(nn.MaxPool2d(2), nn.ReLU()), nn.Sequential(nn.MaxPool2d(2), nn.ReLU())):
        xi = x.clone().requires_grad_()
        y = layer(xi)
        y.backward(torch.arange(y.numel(), dtype=torch.float32).view_as(y).to(dtype) / y.numel())
        results.append((y.detach(), xi.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), dtype
assert rewrite._pool_relu in compiled._compiled and rewrite._pool_relu_grad in compiled._compiled
print("same")
"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CPP_MARCH"}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "ATEN_CPU_CAPABILITY": "avx2"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "same" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
