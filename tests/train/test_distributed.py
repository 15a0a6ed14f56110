"""Multi-process training with torchrun (gloo on CPU): same losses as one process, exact evaluation counts."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import cnnkit
from cnnkit.data.loader import BatchLoader
from cnnkit.data.sources import DataSpec, load_splits
from cnnkit.checkpoint import read_payload

# No dropout and no BatchNorm: then N processes with a global batch B compute what one process does.
ARGS = ["--model", "simple_cnn", "--model-opt", "dropout=0", "--data", "shapes", "--num-samples", "503",
        "--val-split", "0.21", "--epochs", "1", "--batch-size", "32", "--precision", "fp32", "--seed", "3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra]
    if not extra:
        cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    return subprocess.run([*cmd, "-m", "cnnkit", "train", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def step_losses(run_dir):
    lines = open(os.path.join(run_dir, "steps.csv")).read().split()[1:]
    return [float(line.split(",")[2]) for line in lines]


def test_two_processes_match_one_step_for_step_and_count_each_image_once(tmp_path):
    one = subprocess.run([sys.executable, "-m", "cnnkit", "train", *ARGS, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = torchrun(*ARGS, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    a, b = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a[:8], b[:8])) < 1e-5, list(zip(a, b))
    # Only rank 0 wrote: one run folder, one line per step.
    assert sorted(os.listdir(tmp_path)) == ["one", "two"]
    # Distributed evaluation of the 103 validation images (odd: no even split) equals a single process's.
    import json

    reported = json.load(open(tmp_path / "two" / "result.json"))
    assert reported["num_val"] == 103
    single = cnnkit.evaluate(str(tmp_path / "two" / "last.pt"), precision="fp32")
    assert single.count == 103 and single.acc == reported["val_acc"]
    assert abs(single.loss - reported["val_loss"]) < 1e-5


def test_eval_shards_cover_every_image_once_and_training_order_is_per_epoch():
    train, val = load_splits(DataSpec("shapes", num_samples=503, val_split=0.21))
    cpu = torch.device("cpu")
    shards = [BatchLoader(val, 10, [0.5] * 3, [0.25] * 3, cpu, rank=r, world=2).order() for r in range(2)]
    assert sorted(torch.cat(shards).tolist()) == list(range(len(val))) and len(val) % 2 == 1
    loader = BatchLoader(train, 32, [0.5] * 3, [0.25] * 3, cpu, shuffle=True, seed=1, rank=1, world=2)
    loader.set_epoch(1)
    first = loader.order()
    loader.set_epoch(2)
    assert not torch.equal(first, loader.order())
    again = BatchLoader(train, 32, [0.5] * 3, [0.25] * 3, cpu, shuffle=True, seed=1, rank=1, world=2)
    again.set_epoch(1)
    assert torch.equal(first, again.order())
    # The two ranks' shares of a global batch are disjoint and make up the whole batch.
    loader.set_epoch(1)
    other = BatchLoader(train, 32, [0.5] * 3, [0.25] * 3, cpu, shuffle=True, seed=1, rank=0, world=2)
    other.set_epoch(1)
    (_, y1), (_, y0) = next(iter(loader)), next(iter(other))
    assert len(y0) == len(y1) == 16


def test_two_node_run_on_one_machine_loads_in_a_single_process(tmp_path):
    port = free_port()
    procs = []
    for node in (0, 1):
        rdzv = ["--nnodes", "2", "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", *rdzv, "-m", "cnnkit",
               "train", *ARGS, "--out", str(tmp_path / "run")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ckpt = cnnkit.load_checkpoint(str(tmp_path / "run"))
    assert ckpt.model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_distributed_run_resumes_after_a_kill(tmp_path):
    args = [*ARGS[:-6], "--epochs", "2", "--num-samples", "2500", "--batch-size", "32", "--precision", "fp32",
            "--seed", "3"]  # ~60 steps an epoch: time to kill it inside epoch 2
    ref = torchrun(*args, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "cnnkit", "train", *args, "--save-every", "2", "--out",
           str(tmp_path / "run")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    last = tmp_path / "run" / "last.pt"
    t0 = time.time()
    while not (last.exists() and read_payload(str(last))["resume"]["run"]["epoch"] == 2):  # kill inside epoch 2
        assert proc.poll() is None and time.time() - t0 < 200
        time.sleep(0.005)
    # torchrun starts its workers in sessions of their own: kill every process of this run, as a crash would.
    subprocess.run(["pkill", "-KILL", "-f", str(tmp_path / "run")])
    proc.wait()
    assert read_payload(str(last))["resume"]["run"]["epoch"] == 2
    resumed = torchrun("--resume", tmp_path / "run")
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "ref" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_refused_on_one_process_stop_every_process_with_one_line(tmp_path):
    # cnn_bn at a huge rate overflows its BatchNorm statistics while the loss stays finite; the refusal must be
    # decided on every process (the statistics differ between them), not only on the one that writes, or the
    # others die at the barrier with gloo's "Connection closed by peer" reported as an internal error.
    args = ["--model", "cnn_bn", "--data", "shapes", "--num-samples", "503", "--epochs", "2", "--lr", "1000",
            "--batch-size", "32", "--precision", "fp32", "--out", tmp_path / "run"]
    proc = torchrun(*args)
    assert proc.returncode != 0
    assert "internal error" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]
    refusals = [line for line in proc.stderr.splitlines() if "the weights are no longer finite" in line]
    assert len(refusals) == 2, proc.stderr[-3000:]  # one line from each process


def test_validation_of_a_batchnorm_model_is_that_of_the_saved_weights(tmp_path):
    # Each process's last training forward pass updates its own BatchNorm statistics; validation, each process
    # scoring its share of the images, must use rank 0's, which are saved: the figures must be best.pt's.
    import json

    args = ["--model", "cnn_bn", "--data", "shapes", "--num-samples", "503", "--val-split", "0.21", "--epochs", "1",
            "--batch-size", "32", "--precision", "fp32", "--seed", "3", "--out", tmp_path / "run"]
    proc = torchrun(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reported = json.load(open(tmp_path / "run" / "result.json"))
    single = cnnkit.evaluate(str(tmp_path / "run" / "best.pt"), precision="fp32")
    assert single.count == 103 and single.acc == reported["val_acc"]
    assert abs(single.loss - reported["val_loss"]) < 1e-5, (single.loss, reported["val_loss"])


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_to_cnnkit_train_nproc_stops_every_process_and_saves(tmp_path, sig):
    # torchrun runs its workers in sessions of their own: the signal must travel through cnnkit and torchrun,
    # or the workers train on with nobody to stop them. SIGHUP (a closed terminal) reaches them as SIGTERM, the
    # signal they stop on with a save.
    run = tmp_path / "run"
    args = [*ARGS[:-6], "--epochs", "50", "--num-samples", "2500", "--precision", "fp32", "--seed", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit", "train", *args, "--nproc", "2", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"})
    t0 = time.time()
    while not (run / "metrics.csv").exists():  # an epoch done: the workers are training
        assert proc.poll() is None and time.time() - t0 < 200, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    proc.send_signal(getattr(signal, sig))
    out, err = proc.communicate(timeout=120)
    try:
        assert proc.returncode == 128 + getattr(signal, sig), err[-3000:]
        stopped = [line for line in err.splitlines() if "stopped: SIGTERM" in line]
        assert len(stopped) == 1 and f"cnnkit train --resume {run} --nproc 2" in stopped[0], err[-3000:]
        assert "Traceback" not in err and "SignalException" not in err, err[-3000:]  # torchrun's own, caught
        assert read_payload(str(run / "last.pt"))["resume"]["run"]["epoch"] >= 1
    finally:
        left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
        subprocess.run(["pkill", "-KILL", "-f", str(run)])
    assert not left, "processes left training after cnnkit train stopped"


def test_cnnkit_train_nproc_started_under_nohup_trains_on_after_a_hangup(tmp_path):
    # nohup starts it with SIGHUP ignored: forwarded as SIGTERM, as before, a closed terminal stopped the run
    run = tmp_path / "run"
    args = [*ARGS[:-6], "--epochs", "50", "--num-samples", "2500", "--precision", "fp32", "--seed", "3"]
    proc = subprocess.Popen([sys.executable, "-m", "cnnkit", "train", *args, "--nproc", "2", "--out", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    try:
        t0 = time.time()
        while not (run / "metrics.csv").exists():  # an epoch done: the workers are training
            assert proc.poll() is None and time.time() - t0 < 200, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGHUP)
        time.sleep(5)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)  # what does stop it
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 143 and "stopped: SIGTERM" in err, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        left = subprocess.run(["pgrep", "-f", str(run)], capture_output=True, text=True).stdout.split()
        for pid in left:  # this test's own workers (their command lines name its folder)
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not left, "processes left training after cnnkit train stopped"


def test_nproc_refuses_bad_input_once_before_starting_processes(tmp_path):
    for args, expected in ((["--data", tmp_path / "nothere"], "does not exist"),
                           (["--epochs", "0"], "epochs"),
                           (["--device", "cuda"], "no CUDA GPU") if not torch.cuda.is_available() else ((), None)):
        if expected is None:
            continue
        proc = subprocess.run([sys.executable, "-m", "cnnkit", "train", "--nproc", "2", *map(str, args), "--out",
                               str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
        assert len(proc.stderr.strip().splitlines()) == 1 and "torch.distributed" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_single_process_with_rank_in_its_environment_still_reports(tmp_path):
    # RANK alone (left exported by a cluster's shell, no WORLD_SIZE) is no worker of a multi-process run.
    from tests.conftest import run_cli

    proc = run_cli("train", "--data", "shapes", "--num-samples", "100", "--epochs", "1", "--precision", "fp32",
                   "--out", tmp_path / "run", env={"RANK": "3"})
    assert proc.returncode == 0 and "done: val acc" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_0_fetches_the_pretrained_weights_before_the_other_processes(tmp_path, monkeypatch, rank):
    # Every process of `cnnkit train --nproc N --pretrained` downloaded the same weights into the same cache at once;
    # the others now wait at a barrier for rank 0's, which it reaches even when its download fails.
    import io

    from cnnkit.errors import UserError
    from cnnkit.train import distributed
    from cnnkit.train.config import TrainConfig
    from cnnkit.train.setup import Machine, build_run

    events = []
    monkeypatch.setattr(torch.distributed, "barrier", lambda *args, **kwargs: events.append("barrier"))

    def download(url, *args, **kwargs):
        events.append("download")
        raise OSError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = TrainConfig(model="resnet18", pretrained=True, data="shapes", num_samples=64, batch_size=16,
                      input_size=32, progress=False)
    with pytest.raises(UserError, match="could not be downloaded"):
        build_run(cfg, Machine(torch.device("cpu"), None, torch.get_num_threads()), io.StringIO(),
                  distributed.Dist(rank=rank, world=2))
    assert events == (["download", "barrier"] if rank == 0 else ["barrier", "download"])


def test_a_worker_that_failed_with_one_line_ends_the_launcher_without_torchruns_traceback(monkeypatch, capsys):
    # `cnnkit train --nproc 2 --pretrained` offline: each process printed its one-line error, then torchrun's launcher
    # raised ChildFailedError, a 20-line traceback and summary under them, and the command exited with 1.
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from cnnkit.train import distributed

    def failed(exitcode):
        def main(args):
            raise ChildFailedError("cnnkit", {0: ProcessFailure(0, 123, exitcode, "<N/A>")})
        return main

    monkeypatch.setattr(torch.distributed.run, "main", failed(2))
    assert distributed.torchrun(["-m", "cnnkit", "train"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.setattr(torch.distributed.run, "main", failed(-9))  # killed by a signal: torchrun's report stays
    with pytest.raises(ChildFailedError):
        distributed.torchrun(["-m", "cnnkit", "train"])
