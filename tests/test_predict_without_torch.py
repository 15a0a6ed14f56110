"""`cnnkit predict model.onnx images/` with onnxruntime, numpy and Pillow alone: no torch needed (README: serving
without torch)."""

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import metadata

import pytest

import cnnkit
from tests.conftest import write_image_folder
from tests.test_export import write_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, its ONNX export, a folder of images)."""
    folder = tmp_path_factory.mktemp("serve")
    ckpt = write_checkpoint(folder / "cnn_bn.pt", "cnn_bn")
    cnnkit.export(ckpt, "onnx", str(folder / "m.onnx"))
    return ckpt, str(folder / "m.onnx"), write_image_folder(str(folder / "images"), n_per_class=3)


def assert_same_predictions(got, want):
    assert [r["path"] for r in got] == [r["path"] for r in want]
    for g, w in zip(got, want):
        assert [t["class"] for t in g["top"]] == [t["class"] for t in w["top"]], (g, w)
        assert max(abs(a["prob"] - b["prob"]) for a, b in zip(g["top"], w["top"])) < 1e-5


def test_onnx_predict_never_imports_torch(tmp_path, exported):
    ckpt, onnx_file, images = exported
    shadow = tmp_path / "shadow"  # a torch (and torchvision) that cannot be imported, as in an install without it
    for name in ("torch", "torchvision"):
        (shadow / name).mkdir(parents=True)
        (shadow / name / "__init__.py").write_text(f"raise ImportError('{name} is not installed here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "cnnkit", "predict", onnx_file, images, "--json", "--topk", "3"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert_same_predictions(json.loads(proc.stdout), cnnkit.predict(ckpt, images, topk=3))
    proc = subprocess.run([sys.executable, "-m", "cnnkit", "predict", onnx_file, images, "--tta"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "--tta" in proc.stderr and "torch" in proc.stderr, proc.stderr[-2000:]


def test_onnx_predict_with_tta_matches_the_checkpoint(exported):
    ckpt, onnx_file, images = exported
    assert_same_predictions(cnnkit.predict(onnx_file, images, tta=True, tta_shift=1),
                            cnnkit.predict(ckpt, images, tta=True, tta_shift=1))


def test_predict_in_a_fresh_venv_without_torch(tmp_path, exported):
    """cnnkit installed with --no-deps beside onnxruntime, numpy and Pillow, from the package index pip uses."""
    _, onnx_file, images = exported
    start = time.perf_counter()
    src = tmp_path / "src"  # a copy, so that building the wheel leaves nothing in the working tree
    shutil.copytree(os.path.join(REPO, "cnnkit"), src / "cnnkit", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), src / name)
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    if tuple(int(p) for p in metadata.version("pip").split(".")[:2]) >= (22, 3):
        # Without pip in the venv (ensurepip alone takes many seconds): this pip installs into it with --python.
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
        pip = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--disable-pip-version-check"]
    else:
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
        pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["--no-deps", str(src)], ["onnxruntime", "numpy", "pillow"]):
        proc = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            pytest.skip(f"pip could not install {args[-1]} into a fresh venv: {proc.stderr.strip().splitlines()[-1:]}")
    installed = time.perf_counter() - start
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0  # really without it
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(venv / "bin" / "cnnkit"), "predict", onnx_file, images, "--json"], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    assert len(results) == 12 and all(len(r["top"]) == 4 for r in results)
    version = subprocess.run([str(venv / "bin" / "cnnkit"), "--version"], capture_output=True, text=True, env=env)
    assert "torch not installed" in version.stdout
    print(f"venv and installs {installed:.1f} s, in all {time.perf_counter() - start:.1f} s")
