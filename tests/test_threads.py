"""--threads: the CPU threads a command computes with; the default is the physical cores this process may use."""

import json
import os
import subprocess
import sys

import pytest
import torch

import cnnkit
from cnnkit.errors import UserError
from cnnkit.threads import resolve_threads, usable_cores


def test_explicit_threads_win_and_bad_ones_are_user_errors(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads(5) == 5 and resolve_threads(5, workers=4) == 5
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(UserError, match="--threads"):
            resolve_threads(bad)


def test_default_counts_allowed_cores_less_loader_workers(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = usable_cores()
    assert 1 <= cores <= len(os.sched_getaffinity(0))
    assert resolve_threads(None) == cores
    assert resolve_threads(None, workers=cores) == 1  # never fewer than one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert resolve_threads(None) == 1


def run_pinned(args, cpus, tmp_path):
    """`cnnkit ARGS` in a process allowed to run on ``cpus`` only (as taskset or a container's CPU set does)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    return subprocess.run([sys.executable, "-m", "cnnkit", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=600, preexec_fn=lambda: os.sched_setaffinity(0, cpus))


def test_train_default_follows_the_affinity_and_is_shown_and_recorded(tmp_path):
    one_cpu = {min(os.sched_getaffinity(0))}
    proc = run_pinned(["train", "--epochs", 1, "--num-samples", 64, "--batch-size", 32, "--out", tmp_path / "run"],
                      one_cpu, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "cpu, " in proc.stdout and ", 1 CPU thread;" in proc.stdout, proc.stdout
    # config.json records the request (None: each machine's own default), so that replaying it on a machine with
    # more cores does not pin one thread; the count used is in the result.
    assert json.loads((tmp_path / "run" / "config.json").read_text())["threads"] is None
    assert json.loads((tmp_path / "run" / "result.json").read_text())["threads"] == 1


def test_threads_from_a_config_file_and_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("threads: 1\nepochs: 1\nnum_samples: 64\nbatch_size: 32\n")
    proc = run_pinned(["train", "--config", config, "--out", tmp_path / "a"], os.sched_getaffinity(0), tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ", 1 CPU thread;" in proc.stdout and json.loads((tmp_path / "a" / "config.json").read_text())["threads"] == 1
    assert json.loads((tmp_path / "a" / "result.json").read_text())["threads"] == 1
    proc = run_pinned(["lr-find", "--threads", 1, "--num-samples", 64, "--batch-size", 32, "--steps", 10,
                       "--out", tmp_path / "lr"], os.sched_getaffinity(0), tmp_path)
    assert proc.returncode == 0 and "; 1 CPU thread" in proc.stdout, proc.stderr[-2000:]
    proc = run_pinned(["eval", tmp_path / "a", "--threads", 0], os.sched_getaffinity(0), tmp_path)
    assert proc.returncode == 2 and "--threads" in proc.stderr


def test_eval_and_predict_compute_with_their_threads_and_leave_the_callers_count(tmp_path, image_folder):
    from cnnkit.checkpoint import load_checkpoint

    before = torch.get_num_threads()
    callers = resolve_threads(None) + 1  # neither the default nor the count asked below
    try:
        result = cnnkit.train(model="simple_cnn", data="shapes", num_samples=64, batch_size=32, epochs=1,
                              progress=False, out=str(tmp_path / "run"), log=open(os.devnull, "w"), threads=1)
        assert result.threads == 1
        ckpt = load_checkpoint(str(tmp_path / "run"))
        seen = []  # torch's thread count while the model computes
        ckpt.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
        for threads, expected in ((1, 1), (None, resolve_threads(None))):
            torch.set_num_threads(callers)
            seen.clear()
            r = cnnkit.evaluate(ckpt, threads=threads)
            assert r.threads == expected and set(seen) == {expected}
            assert torch.get_num_threads() == callers  # a library call leaves the process's setting alone
            seen.clear()
            assert cnnkit.predict(ckpt, image_folder, threads=threads)[0]["top"]
            assert set(seen) == {expected} and torch.get_num_threads() == callers
    finally:
        torch.set_num_threads(before)
