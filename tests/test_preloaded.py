"""The tests' `cnnkit` commands forked from a preloaded server (tests/preloaded.py) behave as fresh processes."""
import os
import subprocess
import sys

from tests import preloaded
from tests.conftest import run_cli


def fresh(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "cnnkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_a_forked_command_prints_and_exits_as_a_fresh_one(tmp_path):
    for args in (["--version"], ["eval", tmp_path / "nowhere"], ["train", "--epochs", "x"]):
        forked, started = run_cli(*args), fresh(*args)
        assert (forked.returncode, forked.stdout, forked.stderr) == (started.returncode, started.stdout,
                                                                    started.stderr), args
    assert forked.returncode == 2 and forked.stderr.count("\n") == 1


def test_a_forked_command_runs_in_its_folder_with_its_environment(tmp_path):
    proc = run_cli("train", "--epochs", "1", "--num-samples", "64", "--out", "run", cwd=tmp_path,
                   env={"CNNKIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "result.json").exists() and (tmp_path / "cache").is_dir()


def test_settings_read_when_torch_starts_get_a_fresh_process():
    server = {"OMP_NUM_THREADS": "1", "PATH": "/bin"}
    assert not preloaded.needs_fresh_process(dict(server), server)
    assert not preloaded.needs_fresh_process({**server, "TORCH_HOME": "/t", "CNNKIT_CACHE": "/c"}, server)
    for changed in ({"OMP_NUM_THREADS": "2"}, {"ATEN_CPU_CAPABILITY": "avx2"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"},
                    {"PYTHONPATH": "/shadow"}, {"CNNKIT_TEST_FRESH_PROCESSES": "1"}):
        assert preloaded.needs_fresh_process({**server, **changed}, server), changed
    without = dict(server)
    del without["OMP_NUM_THREADS"]
    assert preloaded.needs_fresh_process(without, server)
    assert os.environ.get("OMP_NUM_THREADS") is None or preloaded.needs_fresh_process(
        {**os.environ, "OMP_NUM_THREADS": os.environ["OMP_NUM_THREADS"] + "0"}, dict(os.environ))
