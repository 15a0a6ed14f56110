"""`cnnkit --help`, `--version` and every command's `--help` answer without loading torch, which takes seconds;
commands that compute nothing with tensors (shape, runs) do not load it either."""

import resource
import subprocess
import sys

import pytest

from cnnkit.cli import build_parser

HEAVY = ("torch", "torchvision", "numpy", "PIL", "matplotlib", "onnxruntime")
# CPU seconds, not wall-clock ones: on a busy machine a process waits for a core, but the work it does stays the
# same (about a tenth of a second here; importing torch alone is several seconds of CPU).
CPU_LIMIT_S = 1.0


def run_timed(*args, cwd=None):
    """`python -X importtime -m cnnkit ARGS`: (the process, the top-level packages it imported, CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "cnnkit", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    packages = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    return proc, packages, cpu


COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("args", [["--help"], ["--version"], *([c, "--help"] for c in COMMANDS)],
                         ids=lambda a: " ".join(a))
def test_help_and_version_answer_without_torch(args):
    proc, packages, cpu = run_timed(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout or proc.stdout.startswith("cnnkit ")
    assert not packages & set(HEAVY), f"{' '.join(args)} imported {sorted(packages & set(HEAVY))}"
    assert cpu < CPU_LIMIT_S, f"{' '.join(args)} used {cpu:.2f} CPU seconds"


def test_version_names_torch_without_importing_it():
    proc, packages, _ = run_timed("--version")
    assert "torch" not in packages
    from importlib import metadata

    assert f"torch {metadata.version('torch')}," in proc.stdout and "Python" in proc.stdout


def test_commands_import_only_what_they_use(tmp_path):
    proc, packages, cpu = run_timed("shape", "--size", 5, "--kernel", 3)
    assert proc.returncode == 0 and "output size: 3" in proc.stdout, proc.stderr[-2000:]
    assert "torch" not in packages and cpu < CPU_LIMIT_S
    proc, packages, cpu = run_timed("runs", tmp_path)
    assert proc.returncode == 0 and "no runs" in proc.stdout, proc.stderr[-2000:]
    assert "torch" not in packages and cpu < CPU_LIMIT_S


def test_the_api_is_imported_on_first_use():
    code = ("import sys, cnnkit; assert 'torch' not in sys.modules; from cnnkit.train.config import TrainConfig; "
            "import cnnkit.inspect; assert 'torch' not in sys.modules; "
            "f = cnnkit.train; assert callable(f) and f.__module__ == 'cnnkit.training', f; "
            "assert callable(cnnkit.predict) and callable(cnnkit.export) and callable(cnnkit.evaluate); "
            "assert callable(cnnkit.inspect.summary) and cnnkit.TrainConfig is TrainConfig; "
            "from cnnkit import *; assert callable(lr_find) and OnnxModel.__name__ == 'OnnxModel'; "
            "assert set(cnnkit.__all__) <= set(dir(cnnkit)); print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "ok", proc.stderr[-2000:]
