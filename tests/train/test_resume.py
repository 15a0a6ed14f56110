"""Killed, stopped and resumed runs end with exactly the weights of an uninterrupted run (CPU, fp32)."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cnnkit.errors import UserError
from cnnkit.runs import list_runs
from cnnkit.checkpoint import read_payload
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error

# A fixed thread count: bit-for-bit equality holds for one count, and the default one changes when the machine is
# busy (cnnkit/threads.py), as it is while these tests poll the run's checkpoint, when this file runs alone, without
# `make test`'s OMP_NUM_THREADS=1 (seen: the resumed weights differed; with --threads 2 or 1 they agree).
ARGS = ["--model", "cnn_bn", "--data", "shapes", "--num-samples", "1024", "--val-split", "0.25", "--epochs", "2",
        "--batch-size", "32", "--threads", "1",
        "--precision", "fp32", "--seed", "7"]


def start(*args):
    return subprocess.Popen([sys.executable, "-m", "cnnkit", "train", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def weights(run_dir):
    return torch.load(os.path.join(run_dir, "last.pt"), weights_only=True)["state_dict"]


def logs(run_dir):
    """steps.csv whole, and metrics.csv without the timings: what a resumed run must log as an uninterrupted one."""
    steps = open(os.path.join(run_dir, "steps.csv")).read()
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        metrics = [{k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")}
                   for row in csv.DictReader(f)]
    return steps, metrics


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    proc = start(*ARGS, "--out", out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return str(out)


def resume(run_dir):
    proc = start("--resume", run_dir)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def wait_for(predicate, proc, timeout=120):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() - t0 < timeout
        time.sleep(0.001)


def test_sigkill_during_an_epoch_then_resume(tmp_path, reference):
    out = tmp_path / "run"
    proc = start(*ARGS, "--out", out, "--save-every", "5")
    last = out / "last.pt"
    # Kill once a mid-epoch checkpoint of the second epoch exists: batches after it are lost and replayed.
    wait_for(lambda: last.exists() and read_payload(str(last))["resume"]["run"]["epoch"] == 2
             and read_payload(str(last))["resume"]["epoch_state"]["batch"] >= 5, proc)
    proc.kill()
    proc.wait()
    state = read_payload(str(last))["resume"]
    assert state["run"]["epoch"] == 2 and 0 < state["epoch_state"]["batch"] < 24
    text = resume(str(out))
    # It names the batches done, which are not run again ("at epoch 2, batch 4" read as if batch 4 were).
    assert f"resuming {out} after batch {state['epoch_state']['batch']} of epoch 2" in text, text
    assert_same_weights(weights(reference), weights(out))
    assert len((out / "metrics.csv").read_text().splitlines()) == 3  # header + one row per epoch, no duplicates
    assert logs(out) == logs(reference)  # every step's loss once, and the epoch's lr from its first step
    # the training time goes on from the killed session's, as images/s does from its epochs: it was this session's
    # alone, shorter than the epochs it reported images/s over
    result = json.loads((out / "result.json").read_text())
    with open(out / "metrics.csv") as f:
        epoch_seconds = sum(float(row["epoch_time_s"]) for row in csv.DictReader(f))
    assert result["train_time_s"] >= epoch_seconds


def test_sigkill_during_a_checkpoint_write_then_resume(tmp_path, reference):
    for attempt in range(5):
        out = tmp_path / f"run{attempt}"
        proc = start(*ARGS, "--out", out, "--save-every", "1")
        tmp_files = lambda: [f for f in (os.listdir(out) if out.exists() else []) if f.endswith(".tmp")]  # noqa: E731
        wait_for(lambda: (out / "last.pt").exists() and tmp_files(), proc)
        proc.kill()
        proc.wait()
        if tmp_files():  # the kill landed inside a write: a half-written temporary file is there
            break
    else:
        pytest.fail("never caught the process inside a checkpoint write")
    read_payload(str(out / "last.pt"))  # the previous checkpoint is whole
    text = resume(str(out))
    assert "removed" in text and not tmp_files()
    assert_same_weights(weights(reference), weights(out))
    assert logs(out) == logs(reference)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_says_how_to_resume(tmp_path, reference, sig, code):
    out = tmp_path / "run"
    proc = start(*ARGS, "--out", out, "--save-every", "3")
    wait_for(lambda: (out / "last.pt").exists(), proc)  # a first of ~16 saves: more than an epoch is left
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert f"--resume {out}" in err and "Traceback" not in err
    assert list_runs(str(out))[0].status == "stopped"
    # steps.csv holds every step up to the one the stop finished, as last.pt does (not only up to the last save)
    state = read_payload(str(out / "last.pt"))["resume"]
    epoch, batch = state["run"]["epoch"], state["epoch_state"]["batch"]
    rows = [tuple(map(int, row.split(",")[:2])) for row in (out / "steps.csv").read_text().splitlines()[1:]]
    assert rows == [(e, s) for e in range(1, epoch) for s in range(1, 25)] + [(epoch, s) for s in range(1, batch + 1)]
    resume(str(out))
    assert_same_weights(weights(reference), weights(out))


def test_resume_refuses_data_with_other_classes(tmp_path, image_folder):
    out = tmp_path / "run"
    proc = start("--data", image_folder, "--epochs", "1", "--out", out)
    assert proc.wait(timeout=120) == 0
    os.rename(os.path.join(image_folder, "circle"), os.path.join(image_folder, "disk"))
    proc = start("--resume", out)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert "the data's classes differ from the checkpoint's (new: disk; gone: circle); resume with the data the run " \
        "was started on" in err, err


def test_resume_refuses_a_folder_whose_images_changed(tmp_path, image_folder):
    # The split is drawn from the files found: with one file fewer, or another in its place, the validation images
    # would be others, some of them trained on. (The check runs before the finished run's "nothing to resume".)
    import cnnkit
    from cnnkit.errors import CheckpointError

    out = str(tmp_path / "run")
    cnnkit.train(data=image_folder, epochs=1, out=out, precision="fp32", progress=False)
    with pytest.raises(UserError, match="nothing to resume"):  # the same data passes the check
        cnnkit.train(resume=out)
    square = os.path.join(image_folder, "square")
    os.rename(os.path.join(square, "001.png"), os.path.join(square, "100.png"))
    with pytest.raises(CheckpointError, match=r"the data changed since the run started: as many images as then "
                                              r"\(\d+ and \d+\), but other files or labels; resume with the data"):
        cnnkit.train(resume=out)
    os.remove(os.path.join(square, "100.png"))
    with pytest.raises(CheckpointError, match=r"the data changed since the run started: (\d+) training and (\d+) "
                                              r"validation images then, \d+ and \d+ now"):
        cnnkit.train(resume=out)


def test_resuming_a_finished_run_says_so(reference):
    proc = start("--resume", reference)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "nothing to resume" in err
    # and how to train it further, which --resume cannot
    assert (f"start a new run from its weights: cnnkit train --config {os.path.join(reference, 'config.json')} "
            f"--weights {os.path.join(reference, 'last.pt')} --epochs N --out NEW_DIR") in err


def test_resuming_a_folder_that_is_no_run_says_so_before_the_flags_beside_it(tmp_path):
    # it said "drop --epochs (... cnnkit train --config nope/config.json ...)", a file that is not there
    proc = run_cli("train", "--resume", tmp_path / "nope", "--epochs", "1")
    assert_one_line_error(proc, 2, f"--resume {tmp_path / 'nope'}: no such folder")


class _StopsOnce(torch.nn.Module):
    """cnn_bn that sends its own process SIGTERM during one training batch, once per test: an interruption at
    an exactly known step, mid-epoch and mid-accumulation, without a subprocess."""

    armed_at = None  # the training forward call that signals
    calls = 0

    def __init__(self, num_classes, in_channels, input_size):
        super().__init__()
        from cnnkit.models.simple import cnn_bn

        self.net = cnn_bn(num_classes, in_channels, input_size)

    def forward(self, x):
        if self.training:
            _StopsOnce.calls += 1
            if _StopsOnce.calls == _StopsOnce.armed_at:
                signal.raise_signal(signal.SIGTERM)
        return self.net(x)


def test_resume_is_exact_with_mixing_ema_and_accumulation(tmp_path):
    import cnnkit
    from cnnkit.errors import TrainingStopped
    from cnnkit.models.registry import _FACTORIES, register_model

    @register_model
    def stops_once(num_classes=10, in_channels=3, input_size=32):
        return _StopsOnce(num_classes, in_channels, input_size)

    options = dict(model="stops_once", data="shapes", num_samples=128, val_split=0.25, epochs=2, batch_size=16,
                   precision="fp32", seed=2, mixup=0.3, cutmix=1.0, ema=0.8, accum_steps=2, progress=False)
    try:
        _StopsOnce.armed_at = None
        cnnkit.train(**options, out=str(tmp_path / "ref"))
        _StopsOnce.calls, _StopsOnce.armed_at = 0, 9  # epoch 2 (6 batches an epoch), batch 3: inside a group of 2
        with pytest.raises(TrainingStopped):
            cnnkit.train(**options, out=str(tmp_path / "run"))
        state = read_payload(str(tmp_path / "run" / "last.pt"))["resume"]
        assert state["run"]["epoch"] == 2 and state["epoch_state"]["batch"] == 4  # stopped after the step
        cnnkit.train(resume=str(tmp_path / "run"))
    finally:
        _FACTORIES.pop("stops_once")
    assert_same_weights(weights(tmp_path / "ref"), weights(tmp_path / "run"))
    ema = lambda run: torch.load(tmp_path / run / "last_ema.pt", weights_only=True)["state_dict"]  # noqa: E731
    assert_same_weights(ema("ref"), ema("run"))
    assert logs(tmp_path / "ref") == logs(tmp_path / "run")  # losses, accuracies and lr, not timings


def test_resume_before_the_first_checkpoint_removes_the_half_written_one(tmp_path):
    # What a SIGKILL during the first checkpoint write leaves: config.json and atomic_torch_save's temporary file
    import tempfile

    import cnnkit
    from cnnkit.errors import UserError

    (tmp_path / "config.json").write_text("{}")
    fd, partial = tempfile.mkstemp(dir=tmp_path, prefix=".last.pt.", suffix=".tmp")
    os.write(fd, b"PK\x03\x04" + bytes(1000))
    os.close(fd)
    with pytest.raises(UserError, match="nothing to resume; removed .last.pt.*config.json") as e:
        cnnkit.train(resume=str(tmp_path))
    assert "first checkpoint" in str(e.value) and not os.path.exists(partial)
    assert os.listdir(tmp_path) == ["config.json"]


def test_resume_of_a_run_from_before_the_lr_column_keeps_its_steps_csv_readable(tmp_path):
    # A run stopped (SIGTERM, in-process) after epoch 2's first step, its steps.csv and last.pt turned into what an
    # older cnnkit wrote (no lr column, no last_step_lr): resumed, it drops the replayed rows and appends rows
    # without lr, which every reader of steps.csv still reads.
    from cnnkit.errors import TrainingStopped
    from cnnkit.report.plots import read_steps
    from cnnkit.train import loop

    class StopAfterEpoch1(loop.Callbacks):
        def on_epoch(self, run, row, val):
            os.kill(os.getpid(), signal.SIGTERM)  # caught: the run stops after epoch 2's first step

    out = tmp_path / "run"
    tiny = dict(data="shapes", num_samples=256, val_split=0.25, batch_size=32, epochs=2, progress=False)
    with pytest.raises(TrainingStopped):
        loop.train(callbacks=StopAfterEpoch1(), out=str(out), **tiny)
    rows = (out / "steps.csv").read_text().splitlines()
    assert rows[0] == "epoch,step,loss,lr" and len(rows) == 1 + 6 + 1
    # an older run's files; one row past last.pt, which the resumed run replays
    old = [",".join(row.split(",")[:3]) for row in rows] + ["2,2,2.5"]
    (out / "steps.csv").write_text("\n".join(old) + "\n")
    payload = torch.load(out / "last.pt", weights_only=True)
    assert payload["resume"]["epoch_state"].pop("last_step_lr") is not None
    torch.save(payload, out / "last.pt")
    result = loop.train(resume=str(out), log=open(os.devnull, "w"))
    assert result.stop_reason == "completed"
    lines = (out / "steps.csv").read_text().splitlines()
    assert lines[0] == "epoch,step,loss" and all(len(line.split(",")) == 3 for line in lines)
    assert [(e, s) for e, s, _ in read_steps(str(out))] == [(e, s) for e in (1, 2) for s in range(1, 7)]
    assert lines[8] != "2,2,2.5"  # the replayed step's row was dropped and written again


def test_a_resumed_runs_result_keeps_the_warnings_and_thread_changes_of_its_earlier_sessions(tmp_path, image_folder):
    # A resumed run's result.json held its last session's alone: the data's warnings, which only the first session
    # checks, were gone, and with them what a user reading it after Ctrl-C and --resume needed to know.
    import io

    import cnnkit
    from cnnkit.checkpoint import save_checkpoint
    from cnnkit.errors import WARNING
    from cnnkit.train import loop

    class Killed(loop.Callbacks):
        def on_epoch(self, run, row, val):
            raise RuntimeError("killed")  # as a killed process: last.pt is the last --save-every save, mid-epoch

    (tmp_path / "images" / "notes.txt").write_text("")
    out = str(tmp_path / "run")
    log = io.StringIO()
    # lr 0.005: at SGD's default 0.05 this linear model's loss reached 12x chance, which is a warning of its own
    with pytest.raises(RuntimeError, match="killed"):
        loop.train(data=image_folder, model="linear", batch_size=4, epochs=2, threads=1, save_every=1, lr=0.005,
                   progress=False, out=out, log=log, callbacks=Killed())
    first = [line[len(WARNING):] for line in log.getvalue().splitlines() if line.startswith(WARNING)]
    assert len(first) == 2 and "notes.txt" in first[0] and "validation image(s)" in first[1], first
    # a change of the thread count in the first session, as the governor records one on a busy machine
    payload = read_payload(os.path.join(out, "last.pt"))
    change = dict(epoch=1, batch=2, before=2, threads=1, s_before=0.05, s_after=0.02)
    payload["resume"]["run"]["thread_changes"] = [change]
    save_checkpoint(payload, os.path.join(out, "last.pt"))
    log = io.StringIO()
    result = cnnkit.train(resume=out, log=log)
    assert "resuming" in log.getvalue() and WARNING not in log.getvalue()  # this session has nothing new to say
    assert result.warnings == first and result.thread_changes == [change]
    saved = json.loads(open(os.path.join(out, "result.json")).read())
    assert saved["warnings"] == first and saved["thread_changes"] == [change]


# A staged run of 6 batches an epoch: the head for epoch 1, then the last conv block with it for epochs 2-3.
_TWO_STAGES = dict(data="shapes", num_samples=128, val_split=0.25, batch_size=16, precision="fp32", seed=3,
                   stages="head:1@0.01,net.features.4+head:2@0.001", progress=False)


def test_a_run_resumed_in_a_later_stage_keeps_the_earlier_stages_in_stages_json(tmp_path):
    # stages.json was rewritten with the resumed stage alone: stage 1 and what it trained were gone from the run's
    # record, and the report's learning-rate plot, drawn from it, left the first stage's epochs empty
    import cnnkit
    from cnnkit.errors import TrainingStopped
    from cnnkit.models.registry import _FACTORIES, register_model

    @register_model
    def stops_once(num_classes=10, in_channels=3, input_size=32):
        return _StopsOnce(num_classes, in_channels, input_size)

    options = dict(model="stops_once", **_TWO_STAGES)
    try:
        _StopsOnce.armed_at = None
        cnnkit.train(**options, out=str(tmp_path / "ref"))
        _StopsOnce.calls, _StopsOnce.armed_at = 0, 9  # epoch 2 (6 batches an epoch), batch 3: inside stage 2
        with pytest.raises(TrainingStopped):
            cnnkit.train(**options, out=str(tmp_path / "run"))
        assert read_payload(str(tmp_path / "run" / "last.pt"))["resume"]["stage"] == 1
        cnnkit.train(resume=str(tmp_path / "run"))
    finally:
        _FACTORIES.pop("stops_once")
    stages = json.loads((tmp_path / "run" / "stages.json").read_text())
    assert [s["modules"] for s in stages] == [["head"], ["net.features.4", "head"]]
    assert stages[0]["trainable_params"] == ["net.classifier.1.weight", "net.classifier.1.bias"]
    assert stages == json.loads((tmp_path / "ref" / "stages.json").read_text())
    assert_same_weights(weights(tmp_path / "ref"), weights(tmp_path / "run"))


class _CrashesOnce(_StopsOnce):
    """_StopsOnce that fails (as a killed process would stop) at its ``armed_at`` training call, signalling nothing:
    the run keeps the last.pt of its last finished epoch."""

    def forward(self, x):
        if self.training and _StopsOnce.calls + 1 == _StopsOnce.armed_at:
            _StopsOnce.calls += 1
            raise RuntimeError("killed")
        return super().forward(x)


def test_a_run_resumed_at_a_stage_boundary_says_the_stage_it_starts_in(tmp_path, capsys):
    # An uninterrupted run prints "stage 2 of 2 from epoch 2: ..." as it enters stage 2; one resumed from the
    # last.pt of stage 1's last epoch started stage 2 without a word of it.
    import cnnkit
    from cnnkit.models.registry import _FACTORIES, register_model

    @register_model
    def crashes_once(num_classes=10, in_channels=3, input_size=32):
        return _CrashesOnce(num_classes, in_channels, input_size)

    options = dict(model="crashes_once", **_TWO_STAGES)
    try:
        _StopsOnce.calls, _StopsOnce.armed_at = 0, 7  # epoch 2's first batch (6 batches an epoch)
        with pytest.raises(RuntimeError, match="killed"):
            cnnkit.train(**options, out=str(tmp_path / "run"))
        saved = read_payload(str(tmp_path / "run" / "last.pt"))["resume"]
        assert (saved["stage"], saved["run"]["epoch"], saved["epoch_state"]["batch"]) == (0, 2, 0)
        capsys.readouterr()
        cnnkit.train(resume=str(tmp_path / "run"))
    finally:
        _FACTORIES.pop("crashes_once")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("cnnkit: stage ")]
    assert lines == ["cnnkit: stage 2 of 2 from epoch 2: training net.features.4, head (59,402 parameters) at lr "
                     "0.001 for 2 epoch(s)"]
