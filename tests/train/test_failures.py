"""Numerical failures, failed writes and hostile checkpoints."""

import contextlib
import json
import math
import os
import resource

import pytest
import torch
import torch.nn as nn

import cnnkit
from cnnkit.errors import CheckpointError, NonFiniteLoss
from cnnkit.models.registry import _FACTORIES, register_model
from cnnkit.runs import list_runs
from tests.conftest import run_cli, write_malicious_checkpoint

TINY = dict(data="shapes", num_samples=256, val_split=0.25, batch_size=32, progress=False)


@contextlib.contextmanager
def _registered(name, module_class):
    """``module_class(num_classes, in_channels)`` registered as the model ``name`` for the block only."""
    def factory(num_classes=10, in_channels=3, input_size=32):
        return module_class(num_classes, in_channels)

    factory.__name__ = name
    register_model(factory)
    try:
        yield name
    finally:
        _FACTORIES.pop(name)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="batch") as e:
        cnnkit.train(**TINY, model="simple_cnn", lr=1e4, schedule="constant", epochs=3, save_every=1,
                     out=str(out))
    assert "--clip-grad" in str(e.value)
    if (out / "last.pt").exists():
        state = torch.load(out / "last.pt", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())


def test_nan_stop_in_the_first_epoch_says_no_checkpoint_exists(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(**TINY, model="simple_cnn", lr=1e4, schedule="constant", epochs=3, out=str(out))
    assert str(e.value).startswith("epoch 1: the loss became non-finite") and "no checkpoint" in str(e.value)
    assert "kept" not in str(e.value) and not (out / "last.pt").exists()
    assert json.loads((out / "stop.json").read_text())["status"] == "diverged"
    assert list_runs(str(out))[0].status == "diverged"  # not "stopped", as a Ctrl-C'd run is
    # No save ever wrote steps.csv: the steps that ran are there all the same, up to the first non-finite loss
    losses = [float(row.split(",")[2]) for row in (out / "steps.csv").read_text().splitlines()[1:]]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses[:-1]) and not math.isfinite(losses[-1])
    result = json.loads((out / "result.json").read_text())
    assert result["stop_reason"] == "diverged: " + str(e.value) and result["epochs_run"] == 0
    assert result["val_acc"] is None and result["best_val_acc"] is None and result["images_per_s"] is None


def test_nan_skip_never_keeps_or_reports_a_blown_up_model(tmp_path):
    # lr 1e6: the weights grow to about 1e25 while the steps whose loss overflows are skipped; the outputs are NaN
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="^epoch 1: the model's outputs on the validation images") as e:
        cnnkit.train(**TINY, model="simple_cnn", lr=1e6, nan="skip", epochs=2, out=str(out))
    assert "no checkpoint" in str(e.value)
    assert not [f for f in os.listdir(out) if f.endswith(".pt")]
    assert json.loads((out / "stop.json").read_text())["epoch"] == 1
    result = json.loads((out / "result.json").read_text())  # why it stopped, and no figure of the blown-up model
    assert result["stop_reason"].startswith("diverged: epoch 1: the model's outputs")
    assert result["val_acc"] is None and result["train_acc"] is None and result["epochs_run"] == 0


def test_run_files_are_strict_json(tmp_path):
    from cnnkit.train.loop import _write_json

    _write_json(str(tmp_path), "x.json", {"loss": float("nan"), "rows": [1.5, float("inf")]})
    strict = json.loads((tmp_path / "x.json").read_text(), parse_constant=lambda name: pytest.fail(name))
    assert strict == {"loss": None, "rows": [1.5, None]}


class _SometimesNaN(nn.Module):
    """Feeds NaN into its BatchNorm on every third training batch."""

    def __init__(self, num_classes, in_channels):
        super().__init__()
        self.calls = 0
        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls % 3 == 0:
                x = x * float("nan")
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def test_nan_skip_skips_batches_and_keeps_batchnorm_statistics_finite(tmp_path):
    @register_model
    def sometimes_nan(num_classes=10, in_channels=3, input_size=32):
        return _SometimesNaN(num_classes, in_channels)

    try:
        r = cnnkit.train(**TINY, model="sometimes_nan", epochs=2, nan="skip", out=str(tmp_path / "run"))
    finally:
        _FACTORIES.pop("sometimes_nan")
    assert r.skipped_batches == 2 * (6 // 3)  # 6 batches an epoch, every third one poisoned
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["state_dict"]
    assert torch.isfinite(state["bn.running_mean"]).all() and torch.isfinite(state["bn.running_var"]).all()
    assert int(state["bn.num_batches_tracked"]) == 2 * 6  # PyTorch counts the call; the statistics were restored


class _NaNInEpoch2(_SometimesNaN):
    """NaN from the 8th training batch on: the second epoch of 6 batches."""

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= 8:
                x = x * float("nan")
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def test_nan_stop_names_the_epoch_and_the_checkpoint_that_is_kept(tmp_path):
    @register_model
    def nan_in_epoch2(num_classes=10, in_channels=3, input_size=32):
        return _NaNInEpoch2(num_classes, in_channels)

    try:
        with pytest.raises(NonFiniteLoss) as e:
            cnnkit.train(**TINY, model="nan_in_epoch2", epochs=3, out=str(tmp_path / "run"))
    finally:
        _FACTORIES.pop("nan_in_epoch2")
    assert str(e.value).startswith("epoch 2: the loss became non-finite at batch 2 of this epoch")
    assert "kept: last.pt (the state at the end of epoch 1) and best.pt (epoch 1), both from" in str(e.value)
    # steps.csv, last written at the end of epoch 1, also holds epoch 2's steps up to the poisoned one (its 2nd)
    rows = [row.split(",") for row in (tmp_path / "run" / "steps.csv").read_text().splitlines()[1:]]
    assert [(int(epoch), int(step)) for epoch, step, _, _ in rows] == [(1, i) for i in range(1, 7)] + [(2, 1), (2, 2)]
    assert all(math.isfinite(float(loss)) for _, _, loss, _ in rows[:-1]) and rows[-1][2] == "nan"
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    metrics = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert result["stop_reason"] == "diverged: " + str(e.value) and result["epochs_run"] == len(metrics) - 1 == 1
    assert result["best_epoch"] == 1 and result["val_acc"] == pytest.approx(float(metrics[1].split(",")[5]))
    assert list_runs(str(tmp_path / "run"))[0].status == "diverged"


def test_resuming_a_diverged_run_removes_its_stop_and_result_files(tmp_path):
    # Once resumed, the run is no longer the one that diverged: if it stops again before its end (here at
    # once, by the caller's start step), nothing may still say "diverged" or hold the old result.
    @register_model
    def nan_in_epoch2(num_classes=10, in_channels=3, input_size=32):
        return _NaNInEpoch2(num_classes, in_channels)

    from cnnkit.train.loop import Callbacks, train

    class StopAtStart(Callbacks):
        def on_start(self, run):
            raise KeyboardInterrupt

    out = tmp_path / "run"
    try:
        with pytest.raises(NonFiniteLoss):
            cnnkit.train(**TINY, model="nan_in_epoch2", epochs=3, out=str(out))
        assert (out / "result.json").exists() and (out / "stop.json").exists()
        with pytest.raises(KeyboardInterrupt):
            train(resume=str(out), callbacks=StopAtStart())
    finally:
        _FACTORIES.pop("nan_in_epoch2")
    assert not (out / "result.json").exists() and not (out / "stop.json").exists()
    assert list_runs(str(out))[0].status == "stopped"


class _BatchNormOverflow(_SometimesNaN):
    """From the 8th training batch (the second of epoch 2) on, activations so large (1e30) that BatchNorm's batch
    variance overflows to inf: its output, so the loss and the gradients, stay finite; its running variance not."""

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            self.calls += 1
            if self.calls >= 8:
                x = x * 1e30
        return self.head(self.bn(x).relu().mean((2, 3)))


@pytest.mark.parametrize("nan", ["skip", "stop"])
def test_a_save_refuses_batchnorm_statistics_that_are_no_longer_finite(tmp_path, nan):
    # The loss stays finite, so neither --nan mode sees anything: the mid-epoch save (--save-every) must check
    # the buffers it writes, not only the parameters, and stop the run naming the checkpoint it kept.
    out = tmp_path / "run"
    with _registered("bn_overflow", _BatchNormOverflow), pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(**TINY, model="bn_overflow", epochs=3, nan=nan, save_every=1, out=str(out))
    assert str(e.value) == (
        f"epoch 2: the weights are no longer finite (NaN or inf in bn.running_var), so {out / 'last.pt'} was not "
        "written; lower --lr or add --clip-grad 1.0; kept: last.pt (the state at epoch 2, batch 1) and best.pt "
        "(epoch 1), both from before the failure; --lr auto picks a rate with a range test (cnnkit lr-find draws "
        "its curve)")
    for name in ("last.pt", "best.pt"):
        state = torch.load(out / name, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert json.loads((out / "stop.json").read_text())["message"] == str(e.value)



def test_an_epoch_whose_batchnorm_statistics_overflowed_is_neither_validated_nor_recorded(tmp_path):
    # Without a mid-epoch save, the end of the epoch must notice before validating: the figures of a model with
    # inf statistics (one class for every image) must not reach metrics.csv or result.json as an epoch that ran.
    import csv

    out = tmp_path / "run"
    with _registered("bn_overflow", _BatchNormOverflow), pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(**TINY, model="bn_overflow", epochs=3, out=str(out))
    assert str(e.value).startswith("epoch 2: the weights are no longer finite (NaN or inf in bn.running_var), so "
                                   "this epoch was neither validated nor saved; lower --lr or add --clip-grad 1.0; "
                                   "kept: last.pt")
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [row["epoch"] for row in rows] == ["1"]
    result = json.loads((out / "result.json").read_text())
    assert result["epochs_run"] == 1 and result["val_acc"] == pytest.approx(float(rows[0]["val_acc"]))
    assert result["stop_reason"].startswith("diverged: epoch 2")


def test_a_resumed_run_that_diverges_reports_the_figures_of_its_last_finished_epoch(tmp_path):
    # The resumed process has validated no epoch itself: the figures come from the run's history (metrics.csv).
    import csv
    import os
    import signal

    from cnnkit.errors import TrainingStopped
    from cnnkit.train.loop import Callbacks, train

    broken = {"on": False}

    class NaNWhenBroken(torch.nn.Module):
        def __init__(self, num_classes, in_channels):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(in_channels, 8, 3, padding=1), torch.nn.Linear(8, num_classes)

        def forward(self, x):
            y = self.head(self.conv(x).relu().mean((2, 3)))
            return y * float("nan") if broken["on"] and self.training else y

    @register_model
    def nan_when_broken(num_classes=10, in_channels=3, input_size=32):
        return NaNWhenBroken(num_classes, in_channels)

    class StopAfterEpoch1(Callbacks):
        def on_epoch(self, run, row, val):
            if row["epoch"] == 1:
                os.kill(os.getpid(), signal.SIGINT)

    out = tmp_path / "run"
    try:
        with pytest.raises(TrainingStopped):
            train(None, callbacks=StopAfterEpoch1(), **TINY, model="nan_when_broken", epochs=3, out=str(out))
        broken["on"] = True
        with pytest.raises(NonFiniteLoss):
            train(resume=str(out))
    finally:
        _FACTORIES.pop("nan_when_broken")
    row = next(csv.DictReader(open(out / "metrics.csv")))
    result = json.loads((out / "result.json").read_text())
    assert result["epochs_run"] == 1
    for name in ("val_acc", "val_loss", "train_acc", "train_loss"):
        assert result[name] == pytest.approx(float(row[name])), name

class _InfiniteGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


class _OneInfiniteGradient(_SometimesNaN):
    """On the 8th training batch (the second of epoch 2), a finite loss whose gradients reach the convolution
    infinite: its weights go non-finite after that step, and every later loss is NaN."""

    def forward(self, x):
        x = self.conv(x)
        if self.training:
            self.calls += 1
            if self.calls == 8:
                x = _InfiniteGradient.apply(x)
        return self.head(self.bn(x).relu().mean((2, 3)))


def test_nan_skip_mid_epoch_save_refuses_weights_a_finite_loss_spoiled(tmp_path):
    # --nan skip skips the update of a non-finite loss only: this step's loss was finite, its update was not.
    # The next mid-epoch save must not replace last.pt, and the run stops naming what it kept and the fix.
    out = tmp_path / "run"
    with _registered("one_inf_gradient", _OneInfiniteGradient), pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(**TINY, model="one_inf_gradient", epochs=3, nan="skip", save_every=1, out=str(out))
    assert str(e.value) == (
        f"epoch 2: the weights are no longer finite (NaN or inf in conv.weight, conv.bias), so {out / 'last.pt'} "
        "was not written; lower --lr or add --clip-grad 1.0; kept: last.pt (the state at epoch 2, batch 1) and "
        "best.pt (epoch 1), both from before the failure; --lr auto picks a rate with a range test (cnnkit lr-find "
        "draws its curve)")
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["resume"]["epoch_state"]["batch"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    steps = (out / "steps.csv").read_text().splitlines()
    assert steps[-1].startswith("2,2,")  # the finite step that spoiled the weights: its row is written
    assert math.isfinite(float(steps[-1].split(",")[2]))


class _NaNInTheRun(_SometimesNaN):
    """Fine in the range test (the first model built for real), NaN from the 8th training batch of the second.
    (Builds on the meta device, which check input sizes before a real build, do not count.)"""

    built = 0

    def __init__(self, num_classes, in_channels):
        super().__init__(num_classes, in_channels)
        if not self.conv.weight.is_meta:
            _NaNInTheRun.built += 1
        self.poisoned = _NaNInTheRun.built == 2

    def forward(self, x):
        if self.training and self.poisoned:
            self.calls += 1
            if self.calls >= 8:
                x = x * float("nan")
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def test_a_diverged_auto_lr_run_says_where_the_rate_came_from(tmp_path):
    @register_model
    def nan_in_the_run(num_classes=10, in_channels=3, input_size=32):
        return _NaNInTheRun(num_classes, in_channels)

    try:
        with pytest.raises(NonFiniteLoss) as e:
            cnnkit.train(**TINY, model="nan_in_the_run", lr="auto", epochs=2, out=str(tmp_path / "run"))
    finally:
        _FACTORIES.pop("nan_in_the_run")
    found = json.loads((tmp_path / "run" / "lr_find.json").read_text())
    assert str(e.value).startswith("epoch 2: ")
    assert (f"the rate came from --lr auto (the range test's suggestion {found['suggestion']:.3g}, rule "
            f"'{found['method']}', in lr_find.json)") in str(e.value)


def test_nan_stop_names_the_first_non_finite_batch_whatever_the_checks_interval(tmp_path, monkeypatch):
    # The finite-loss check reads the running loss sum every NAN_CHECK_EVERY batches: once it has failed, the
    # message names the batch whose loss first went non-finite (the third: NaN on every third batch), not the
    # stretch since the last good check.
    from cnnkit.train import loop

    @register_model
    def sometimes_nan(num_classes=10, in_channels=3, input_size=32):
        return _SometimesNaN(num_classes, in_channels)

    try:
        for every in (1, 2, 4):
            monkeypatch.setattr(loop, "NAN_CHECK_EVERY", every)
            with pytest.raises(NonFiniteLoss, match="non-finite at batch 3 of this epoch"):
                cnnkit.train(**TINY, model="sometimes_nan", epochs=1, out=str(tmp_path / f"run{every}"))
    finally:
        _FACTORIES.pop("sometimes_nan")


class _NaNFrom(_SometimesNaN):
    """NaN from training batch ``FROM`` on (counting over the run, from 1)."""

    FROM = 1

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls >= self.FROM:
                x = x * float("nan")
        return self.head(self.bn(self.conv(x)).relu().mean((2, 3)))


def _steps_csv_lr(out, epoch, step):
    """steps.csv's lr of one row, as written."""
    for row in (out / "steps.csv").read_text().splitlines()[1:]:
        e, s, _, lr = row.split(",")
        if (int(e), int(s)) == (epoch, step):
            return float(lr)
    raise AssertionError(f"no row for epoch {epoch}, step {step}")


@pytest.mark.parametrize("schedule, every", [("linear", 50), ("onecycle", 50), ("linear", 1)])
def test_nan_stop_quotes_the_rate_of_the_last_step_before_the_non_finite_loss(tmp_path, monkeypatch, schedule, every):
    # The loss goes NaN at batch 2 of epoch 2 (the run's 8th batch of 3 x 6): computed on the weights of the
    # optimizer step of batch 1 (the schedule's step 6, from 0), whose rate the message quotes, not the rate batch 2
    # would have stepped at (step 7), nor the one the schedule has reached when the check runs (after batch 6).
    # Checked after every batch, the check window starts at batch 2: the step before it lies outside.
    from cnnkit.train import loop
    from cnnkit.train.optim import lr_factor

    monkeypatch.setattr(loop, "NAN_CHECK_EVERY", every)
    out = tmp_path / "run"
    with _registered("nan_in_epoch2", _NaNInEpoch2), pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(**TINY, model="nan_in_epoch2", epochs=3, lr=0.1, schedule=schedule, out=str(out))
    before, failing = 0.1 * lr_factor(schedule, 6, 18, 0), 0.1 * lr_factor(schedule, 7, 18, 0)
    assert f"{before:.3g}" != f"{failing:.3g}"  # else the test could not tell them apart
    assert str(e.value).startswith(f"epoch 2: the loss became non-finite at batch 2 of this epoch; the last optimizer "
                                   f"step before it, at batch 1, ran at lr {before:.3g} (steps.csv has each step's lr)")
    assert _steps_csv_lr(out, 2, 1) == pytest.approx(before, rel=1e-7)  # the user can check it there
    assert _steps_csv_lr(out, 2, 2) == pytest.approx(failing, rel=1e-7)
    assert json.loads((out / "stop.json").read_text())["message"] == str(e.value)
    assert json.loads((out / "result.json").read_text())["stop_reason"] == "diverged: " + str(e.value)


def test_nan_stop_at_an_epochs_first_batch_quotes_the_previous_epochs_last_step(tmp_path):
    # NaN from the 7th batch, the first of epoch 2: the step before it was epoch 1's last (the schedule's step 5).
    from cnnkit.train.optim import lr_factor

    out = tmp_path / "run"
    with _registered("nan_at_epoch2", type("_NaNAt7", (_NaNFrom,), {"FROM": 7})), pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(**TINY, model="nan_at_epoch2", epochs=3, lr=0.1, schedule="linear", out=str(out))
    before = 0.1 * lr_factor("linear", 5, 18, 0)
    assert str(e.value).startswith(f"epoch 2: the loss became non-finite at batch 1 of this epoch; the last optimizer "
                                   f"step before it, the previous epoch's last, ran at lr {before:.3g} ")
    # the end of epoch 1's last.pt carries that rate, for a run resumed from it
    state = torch.load(out / "last.pt", weights_only=True)["resume"]["epoch_state"]
    assert state["batch"] == 0 and state["last_step_lr"] == pytest.approx(before, rel=1e-7)


def test_nan_stop_at_the_first_batch_says_no_step_ran(tmp_path):
    with _registered("nan_at_once", _NaNFrom), pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(**TINY, model="nan_at_once", epochs=1, lr=0.1, out=str(tmp_path / "run"))
    assert str(e.value).startswith("epoch 1: the loss became non-finite at batch 1 of this epoch, before any "
                                   "optimizer step (so on the starting weights: the rate played no part)")


def test_nan_stop_with_accumulation_quotes_the_step_before_the_group(tmp_path):
    # Two batches a step: batch 4's loss (NaN) came from the weights of the step after batch 2 (the schedule's
    # step 0), not from batch 3's, which was accumulated, nor batch 4's own step (step 1).
    from cnnkit.train.optim import lr_factor

    with _registered("nan_at_4", type("_NaNAt4", (_NaNFrom,), {"FROM": 4})), pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(**TINY, model="nan_at_4", epochs=1, lr=0.1, schedule="linear", accum_steps=2,
                     out=str(tmp_path / "run"))
    before, own = 0.1 * lr_factor("linear", 0, 3, 0), 0.1 * lr_factor("linear", 1, 3, 0)
    assert f"{before:.3g}" != f"{own:.3g}"
    assert (f"at batch 4 of this epoch; the last optimizer step before it, at batch 2, ran at lr {before:.3g} "
            in str(e.value))


def test_nan_stop_after_resuming_an_older_checkpoint_says_the_rate_is_unknown():
    # A last.pt from before EpochState.last_step_lr restores it as nan: the step is named, its rate is not made up.
    from cnnkit.train.loop import EpochState, _check_finite

    state = EpochState(batch=1, last_step_lr=math.nan)
    with pytest.raises(NonFiniteLoss) as e:
        _check_finite(torch.tensor(math.nan), 0, state, [(torch.tensor(math.nan), math.nan, 0)])
    assert str(e.value).startswith("the loss became non-finite at batch 1 of this epoch; the last optimizer step "
                                   "before it, the previous epoch's last, ran at a rate the last.pt it resumed from "
                                   "did not record")


def test_clip_grad_logs_the_norm_before_clipping(tmp_path):
    cnnkit.train(**TINY, model="cnn_bn", epochs=1, clip_grad=0.01, out=str(tmp_path / "run"))
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    header, row = rows[0].split(","), rows[1].split(",")
    assert float(row[header.index("grad_norm")]) > 0.01  # the logged norm is the unclipped one


def test_failed_checkpoint_write_stops_with_a_message(tmp_path):
    def limit_file_size():  # writes past 200 kB fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cnnkit", "train", "--num-samples", "128", "--epochs", "1",
                           "--out", str(out)], capture_output=True, text=True, preexec_fn=limit_file_size,
                          env={**os.environ, "CNNKIT_CACHE": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "could not write checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("command", [["eval"], ["predict"]])
def test_malicious_checkpoint_is_refused_by_the_cli(tmp_path, image_folder, command):
    path, marker = write_malicious_checkpoint(tmp_path)
    args = [*command, path] + ([image_folder] if command == ["predict"] else [])
    proc = run_cli(*args)
    assert proc.returncode == 1 and "could run code" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_malicious_checkpoint_is_refused_by_resume(tmp_path):
    path, marker = write_malicious_checkpoint(tmp_path)
    os.replace(path, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match="could run code"):
        cnnkit.train(resume=str(tmp_path))
    assert not marker.exists()


def test_json_on_the_command_line_is_strict_even_for_a_blown_up_model(tmp_path):
    # A checkpoint whose weights are NaN (say, written by another tool): predict's probabilities are NaN, and its
    # --json output must still parse with a strict parser (null, never a bare NaN).
    from tests.conftest import run_cli, write_image_folder

    cnnkit.train(data="shapes", num_samples=64, val_split=0.25, epochs=1, progress=False, out=str(tmp_path / "run"))
    payload = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    for value in payload["state_dict"].values():
        if value.is_floating_point():
            value.fill_(float("nan"))
    torch.save(payload, tmp_path / "nan.pt")
    images = write_image_folder(str(tmp_path / "images"), n_per_class=1, size=32)
    r = run_cli("predict", tmp_path / "nan.pt", images, "--json")
    results = json.loads(r.stdout.strip().splitlines()[-1], parse_constant=lambda name: pytest.fail(name))
    assert results and all(t["prob"] is None for p in results for t in p["top"])


def test_resuming_a_diverged_run_is_refused_naming_the_new_run_that_goes_on(tmp_path, capsys):
    # last.pt holds the state, random generators included, from before the failure: resuming would replay the same
    # steps into it. The refusal quotes stop.json and names a command that works: run here, in-process, where the
    # test's model is registered.
    import shlex

    from cnnkit.cli import main
    from cnnkit.errors import UserError

    @register_model
    def nan_in_epoch2(num_classes=10, in_channels=3, input_size=32):
        return _NaNInEpoch2(num_classes, in_channels)

    out = tmp_path / "run"
    try:
        with pytest.raises(NonFiniteLoss):
            cnnkit.train(**TINY, model="nan_in_epoch2", epochs=3, lr=0.05, out=str(out))
        before = {name: (out / name).read_bytes() for name in os.listdir(out) if os.path.isfile(out / name)}
        with pytest.raises(UserError) as e:
            cnnkit.train(resume=str(out))
        message = str(e.value)
        stop = json.loads((out / "stop.json").read_text())["message"]
        assert message.startswith(f"--resume {out}: the run diverged ({stop}); resuming replays the same steps")
        # a tenth of the rate may diverge again: the message offers --lr auto too
        assert "Go on in a new run at a lower rate (or with --lr auto in place of --lr 0.005, to have a range " \
            "test pick it; cnnkit lr-find draws its curve): cnnkit train" in message
        command = message.split("cnnkit lr-find draws its curve): ")[1]
        assert command == (f"cnnkit train --config {out / 'config.json'} --weights {out / 'last.pt'} --lr 0.005 "
                           "--out NEW_DIR")
        assert {name: (out / name).read_bytes() for name in before} == before  # stop.json, result.json kept
        assert main(["train", "--resume", str(out)]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"cnnkit train: error: {message}"]
        argv = shlex.split(command)[1:] + ["--epochs", "1", "--quiet"]
        argv[argv.index("NEW_DIR")] = str(tmp_path / "new")
        assert main(argv) == 0, capsys.readouterr().err  # one epoch: the test model's NaN starts in the second
    finally:
        _FACTORIES.pop("nan_in_epoch2")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["weights"] == str(out / "last.pt")
    assert json.loads((tmp_path / "new" / "result.json").read_text())["stop_reason"] == "completed"


def test_train_json_prints_a_diverged_runs_result(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--data", "shapes", "--num-samples", 256, "--batch-size", 32, "--epochs", 2,
                   "--lr", "1e4", "--schedule", "constant", "--json", "--out", out)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("cnnkit train: error: epoch 1: the loss became non-finite")
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed == json.loads((out / "result.json").read_text())
    assert printed["stop_reason"].startswith("diverged: epoch 1:") and printed["val_acc"] is None


def test_an_epochs_weights_are_scanned_twice_not_once_per_file(tmp_path, monkeypatch):
    # An epoch's weights (the model's and the EMA's, in one scan) are checked after its steps, before validation,
    # and once more for all of its files (best.pt, best-epochNNN.pt, last_ema.pt, best_ema.pt and last.pt),
    # which then are not scanned one by one.
    from cnnkit.train import loop

    scans = []
    real = loop.non_finite_tensors
    monkeypatch.setattr(loop, "non_finite_tensors", lambda sd: scans.append(len(sd)) or real(sd))
    out = tmp_path / "run"
    cnnkit.train(**TINY, model="cnn_bn", epochs=2, ema=0.9, keep_best=2, out=str(out))
    assert {"best.pt", "best-epoch001.pt", "last_ema.pt", "best_ema.pt", "last.pt"} <= set(os.listdir(out))
    tensors = len(cnnkit.create_model("cnn_bn").state_dict())
    assert scans == [2 * tensors] * 4  # two scans an epoch, of the model's and the EMA's tensors together


def _finite_files(out):
    """Whether every checkpoint in ``out`` holds finite weights, its EMA's (to resume from) included."""
    def finite(state_dict):
        return all(torch.isfinite(v).all() for v in state_dict.values() if v.is_floating_point())

    for name in [f for f in os.listdir(out) if f.endswith(".pt")]:
        payload = torch.load(out / name, weights_only=True)
        ema = (payload.get("resume") or {}).get("ema")
        if not finite(payload["state_dict"]) or (ema and not finite(ema["state_dict"])):
            return False
    return True


@pytest.mark.parametrize("save", ["end of epoch", "save every", "signal"])
def test_an_ema_that_is_no_longer_finite_never_reaches_a_checkpoint(tmp_path, monkeypatch, save):
    # The weight EMA goes NaN at the second step of epoch 2 (6 steps an epoch) while the model stays finite:
    # last.pt carries the EMA to resume from, so every save of it (mid-epoch, on a signal, at the epoch's end)
    # must refuse it, and an epoch whose EMA is not finite is neither validated nor saved.
    import signal

    from cnnkit.train import loop

    class BreakingEMA(loop.WeightEMA):
        def update(self, model):
            super().update(model)
            if self.updates == 8:
                with torch.no_grad():
                    next(self.module.parameters()).fill_(float("nan"))
                if save == "signal":
                    os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(loop, "WeightEMA", BreakingEMA)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(**TINY, model="cnn_bn", epochs=3, ema=0.9, save_every=1 if save == "save every" else 0,
                     out=str(out))
    consequence = "this epoch was neither validated nor saved" if save == "end of epoch" else \
        f"{out / 'last.pt'} was not written"
    assert str(e.value).startswith(
        f"epoch 2: the weights are no longer finite (NaN or inf in ema.features.0.weight), so {consequence}; ")
    assert _finite_files(out) and (out / "last.pt").exists()
    assert len((out / "metrics.csv").read_text().splitlines()) == 2  # epoch 1's row only


def test_weights_changed_after_the_epochs_check_are_checked_again_by_the_saves(tmp_path):
    # The epoch's files are checked after its callbacks ran: one that spoils the weights in place after the
    # end-of-epoch check is caught before best.pt is written.
    from cnnkit.train.loop import Callbacks, train

    class Spoil(Callbacks):
        def on_epoch(self, run, row, val):
            if row["epoch"] == 2:
                with torch.no_grad():
                    run.model.features[1].running_var.fill_(float("inf"))

    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as e:
        train(None, callbacks=Spoil(), **TINY, model="cnn_bn", epochs=3, out=str(out))
    assert "(NaN or inf in features.1.running_var), so this epoch's checkpoints were not written" in str(e.value)
    assert _finite_files(out)
    assert torch.load(out / "last.pt", weights_only=True)["epoch"] == 1
