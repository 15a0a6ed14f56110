"""Every command on a CUDA GPU: training of each model family and option, then eval, predict, lr-find,
features/filters/cam, embed/probe, export and torchrun with nccl on a CUDA-trained run.

Skipped where PyTorch sees no GPU (CI has none); ``benchmarks/gpu_check.sh`` runs them on a GPU machine.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import cnnkit
from cnnkit.checkpoint import load_checkpoint
from tests.conftest import run_cli, write_image_folder

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

TINY = dict(data="shapes", num_samples=256, val_split=0.25, progress=False, device="cuda", epochs=1)


def finite_weights(run_dir):
    state = torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    """simple_cnn trained on the GPU: the run the inference commands below start from."""
    out = tmp_path_factory.mktemp("cuda") / "run"
    r = cnnkit.train(model="simple_cnn", out=str(out), **{**TINY, "epochs": 2})
    assert r.precision == "bf16" or r.precision == "fp16"  # auto on CUDA: bf16 where the GPU has it
    return str(out)


@pytest.mark.parametrize("model,options", [
    ("simple_cnn", {}), ("cnn_bn", {}), ("convnet", {}), ("fastnet", {}), ("resnet18", {"stem": "cifar"}),
    ("mobilenet_v3_small", {}), ("efficientnet_b0", {}), ("vgg11_bn", {}),
])
def test_every_model_family_trains_on_cuda(tmp_path, model, options):
    r = cnnkit.train(model=model, model_options=options, out=str(tmp_path / "run"), **TINY)
    assert r.epochs_run == 1 and r.val_loss == r.val_loss  # not NaN
    assert finite_weights(tmp_path / "run")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_trains_on_cuda(tmp_path, precision):
    r = cnnkit.train(model="cnn_bn", precision=precision, out=str(tmp_path / "run"), **TINY)
    assert r.precision == precision and finite_weights(tmp_path / "run")


def test_fast_recipe_trains_through_batchnorm_without_a_scale(tmp_path):
    # fastnet's BatchNorm has a shift but no learnable scale; CUDA's batch-norm backward rejected a missing weight.
    r = cnnkit.train(recipe="fast", out=str(tmp_path / "run"), **{**TINY, "num_samples": 2000, "epochs": 2,
                                                                   "batch_size": 500})
    assert r.tta_val_acc is not None and r.val_acc > 0.3
    assert finite_weights(tmp_path / "run")


@pytest.mark.parametrize("mode", [True, "reduce-overhead"])
def test_compile_on_cuda(tmp_path, mode):
    r = cnnkit.train(model="cnn_bn", compile=mode, out=str(tmp_path / "run"), **{**TINY, "epochs": 2})
    assert finite_weights(tmp_path / "run") and r.val_loss == r.val_loss


def test_mixing_ema_accumulation_and_early_stop_on_cuda(tmp_path):
    r = cnnkit.train(model="cnn_bn", out=str(tmp_path / "run"), mixup=0.2, cutmix=1.0, ema=0.9, accum_steps=2,
                     early_stop=1, min_delta=1.0, clip_grad=1.0, **{**TINY, "epochs": 4})
    assert r.ema_val_acc is not None and r.stop_reason.startswith("early stop")
    assert os.path.exists(tmp_path / "run" / "best_ema.pt")


def test_sigterm_and_resume_on_cuda(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "cnn_bn", "--data", "shapes", "--num-samples", "4096", "--val-split", "0.25",
            "--epochs", "3", "--batch-size", "32", "--device", "cuda", "--out", str(out), "--save-every", "5"]
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    t0 = time.time()
    while not (out / "metrics.csv").exists() or len(open(out / "metrics.csv").read().splitlines()) < 2:
        assert proc.poll() is None and time.time() - t0 < 120, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 143, err
    again = run_cli("train", "--resume", out)
    assert again.returncode == 0, again.stderr
    result = json.load(open(out / "result.json"))
    assert result["epochs_run"] == 3 and finite_weights(out)


def test_eval_predict_and_export_of_a_cuda_run(tmp_path, cuda_run):
    images = write_image_folder(str(tmp_path / "images"), n_per_class=4, size=32)
    r = run_cli("eval", cuda_run, "--device", "cuda", "--tta", "--json")
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads(r.stdout)["acc"] <= 1
    on_gpu = cnnkit.predict(cuda_run, images, device="cuda")
    on_cpu = cnnkit.predict(cuda_run, images, device="cpu")
    assert [p["top"][0]["class"] for p in on_gpu] == [p["top"][0]["class"] for p in on_cpu]
    r = run_cli("predict", cuda_run, images, "--device", "cuda", "--json")
    assert r.returncode == 0, r.stderr
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.ts"), ("safetensors", "m.safetensors")):
        r = run_cli("export", cuda_run, "--format", fmt, "--out", tmp_path / name, "--verify", "--json")
        assert r.returncode == 0, (fmt, r.stderr)
    r = run_cli("predict", tmp_path / "m.onnx", images, "--json")
    assert r.returncode == 0, r.stderr


def test_export_of_a_cuda_trained_fastnet(tmp_path):
    cnnkit.train(recipe="fast", out=str(tmp_path / "run"), **{**TINY, "num_samples": 1000, "batch_size": 250,
                                                              "tta": False})
    for fmt, name in (("onnx", "m.onnx"), ("torchscript", "m.ts")):
        r = run_cli("export", tmp_path / "run", "--format", fmt, "--out", tmp_path / name, "--verify")
        assert r.returncode == 0, (fmt, r.stderr[-2000:])


def test_inspection_of_a_cuda_model(tmp_path, cuda_run):
    from cnnkit.inspect.cam import class_activation_map
    from cnnkit.inspect.feature_maps import feature_maps

    image = os.path.join(write_image_folder(str(tmp_path / "images"), n_per_class=1, size=32), "circle", "001.png")
    model = load_checkpoint(cuda_run, device="cuda").model
    maps = feature_maps(model, ["features.0"], image, str(tmp_path / "maps"))
    assert maps and os.path.exists(maps[0].path)
    cam = class_activation_map(model, image, None, None, "all", str(tmp_path / "cam.png"))
    assert os.path.exists(cam.path)
    for command in (["features", cuda_run, "--layer", "features.0", "--image", image, "--out", tmp_path / "f"],
                    ["filters", cuda_run, "--out", tmp_path / "filters.png"],
                    ["cam", cuda_run, "--image", image, "--out", tmp_path / "cam2.png"]):
        r = run_cli(*command)
        assert r.returncode == 0, (command[0], r.stderr)


def test_lr_find_embed_and_probe_on_cuda(tmp_path, cuda_run):
    r = run_cli("lr-find", "--data", "shapes", "--num-samples", "512", "--device", "cuda", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    images = write_image_folder(str(tmp_path / "images"), n_per_class=8, size=32)
    r = run_cli("embed", cuda_run, images, "--out", tmp_path / "f.npy", "--device", "cuda")
    assert r.returncode == 0, r.stderr
    r = run_cli("probe", cuda_run, images, "--val-split", "0.25", "--device", "cuda", "--json")
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads(r.stdout)["val_acc"] <= 1


def test_torchrun_with_nccl(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
           "--master-port", "29517", "-m", "cnnkit", "train", "--data", "shapes", "--num-samples", "512",
           "--epochs", "1", "--device", "cuda", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(out / "result.json"))["epochs_run"] == 1
