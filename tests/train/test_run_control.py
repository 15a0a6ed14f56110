"""Run control: early stopping, the best N checkpoints, per-class metrics every epoch, --overfit-batches, --smoke."""

import csv
import io
import json
import os

import pytest
import torch

import cnnkit
from cnnkit.data.sources import DataSpec, load_splits
from cnnkit.errors import UserError

# 68 training images, no augmentation: the network memorises them (train acc 1.0 by epoch 8) while the validation
# loss rises from the first epoch on (2.38, 2.55, 2.68, ... on the machine this was written on).
OVERFITS = dict(model="cnn_bn", data="shapes", num_samples=128, val_split=0.5, batch_size=16, optimizer="adamw",
                lr=1e-3, schedule="constant", crop_pad=0, flip=False, precision="fp32", progress=False)


def rows(run):
    return list(csv.DictReader(open(os.path.join(run, "metrics.csv"))))


def test_early_stopping_stops_at_the_epoch_the_rule_names_on_a_rising_validation_loss(tmp_path):
    out = str(tmp_path / "run")
    r = cnnkit.train(**OVERFITS, epochs=10, early_stop=2, monitor="val_loss", out=out)
    losses = [float(row["val_loss"]) for row in rows(out)]
    best, waited, expected = float("inf"), 0, None
    for epoch, loss in enumerate(losses, 1):  # the rule, applied to the logged losses
        best, waited = (loss, 0) if loss < best else (best, waited + 1)
        if waited == 2:
            expected = epoch
            break
    assert expected is not None and losses[-1] > min(losses)  # the validation loss did rise
    assert r.epochs_run == len(losses) == expected < 10
    assert r.stop_reason.startswith(f"early stop after epoch {expected}: val_loss") and r.monitor == "val_loss"
    assert json.load(open(os.path.join(out, "result.json")))["stop_reason"] == r.stop_reason
    assert torch.load(os.path.join(out, "best.pt"), weights_only=True)["epoch"] == losses.index(min(losses)) + 1
    with pytest.raises(UserError, match="early stopping"):
        cnnkit.train(resume=out)


def test_min_delta_decides_what_counts_as_an_improvement(tmp_path):
    r = cnnkit.train(**OVERFITS, epochs=5, early_stop=1, min_delta=2.0, out=str(tmp_path / "run"))
    assert r.epochs_run == 2  # no accuracy can rise by 2: the second epoch is already one without improvement
    assert "by more than 2" in r.stop_reason


def test_keep_best_keeps_exactly_the_n_best_epochs_and_per_class_files_every_epoch(tmp_path):
    out = tmp_path / "run"
    cnnkit.train(**OVERFITS, epochs=4, keep_best=2, monitor="val_loss", out=str(out))
    history = rows(out)
    by_loss = sorted(history, key=lambda row: float(row["val_loss"]))
    kept = sorted(f for f in os.listdir(out) if f.startswith("best-epoch"))
    assert kept == sorted(f"best-epoch{int(row['epoch']):03d}.pt" for row in by_loss[:2])
    for name in kept:  # each file holds the weights of the epoch it is named after
        assert torch.load(out / name, weights_only=True)["epoch"] == int(name[10:13])
    assert torch.load(out / "best.pt", weights_only=True)["epoch"] == int(by_loss[0]["epoch"])

    per_class = list(csv.DictReader(open(out / "per_class.csv")))
    assert len(per_class) == 4 * 10 and set(per_class[0]) == {"epoch", "class", "precision", "recall", "f1", "support"}
    assert sorted(os.listdir(out / "confusion")) == [f"epoch-{e:03d}.csv" for e in range(1, 5)]
    last = cnnkit.evaluate(str(out / "last.pt"))  # the last epoch's files are what `cnnkit eval` reports
    matrix = [[int(v) for v in line.split(",")[1:]] for line in (out / "confusion" / "epoch-004.csv").read_text().splitlines()[1:]]
    assert matrix == last.confusion_matrix
    epoch4 = [row for row in per_class if row["epoch"] == "4"]
    assert [float(row["f1"]) for row in epoch4] == pytest.approx([c["f1"] for c in last.per_class])
    assert float(history[-1]["val_macro_f1"]) == pytest.approx(last.macro_f1)
    assert float(history[-1]["val_macro_recall"]) == pytest.approx(last.macro_recall)


def test_overfit_batches_memorises_the_same_few_batches_it_validates_on(tmp_path):
    r = cnnkit.train(model="cnn_bn", data="shapes", num_samples=128, input_size=16, overfit_batches=2, batch_size=16, epochs=10,
                     optimizer="adamw", lr=3e-3, schedule="constant", precision="fp32", progress=False,
                     out=str(tmp_path / "run"))
    assert r.num_train == r.num_val == 32
    assert r.train_acc >= 0.95 and r.val_acc >= 0.95, (r.train_acc, r.val_acc)


def test_overfit_batches_defaults_memorise_and_the_run_says_so(tmp_path):
    # Only the data's size is set: the optimisation is --overfit-batches' own defaults (with the general ones,
    # SGD and onecycle over 10 epochs of 2 batches, simple_cnn reached 0.13 on its 128 training images).
    log = io.StringIO()
    r = cnnkit.train(overfit_batches=2, num_samples=256, input_size=16, precision="fp32", progress=False,
                     out=str(tmp_path / "run"), log=log)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["optimizer"], config["schedule"], config["weight_decay"]) == ("adamw", "constant", 0.0)
    # It stops at the first epoch that gets every image right (in eval mode), and says so in one line
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [float(row["val_acc"]) == 1.0 for row in rows] == [False] * (len(rows) - 1) + [True]
    epoch = len(rows)
    assert r.val_acc == 1.0 and r.epochs_run == epoch < r.epochs == 60
    assert r.stop_reason == f"memorised the 2 batches at epoch {epoch}"
    assert json.loads((tmp_path / "run" / "result.json").read_text())["stop_reason"] == r.stop_reason
    (line,) = [x for x in log.getvalue().splitlines() if "--overfit-batches 2:" in x]
    assert line.startswith(f"cnnkit: --overfit-batches 2: memorised the 2 batches at epoch {epoch}: the model and "
                           "loss can fit; all 64 images it trained on right in eval mode")
    assert line.endswith(f"stopped there, {60 - epoch} of 60 epochs early")
    assert "early stop" not in log.getvalue()  # the one line says why it stopped


def test_overfit_verdict_counts_the_images_a_nearly_memorised_run_still_gets_wrong():
    from cnnkit.train.loop import overfit_verdict

    assert overfit_verdict(0.995, 0.05, 200, 4, 60, 60) == (
        "cnnkit: --overfit-batches 4: memorised: accuracy 0.9950 on the 200 images it trained on (in eval mode), all "
        "but 1 right after 60 epochs: the model and loss can fit")
    assert overfit_verdict(1.0, 0.01, 200, 4, 60, 60).endswith("right in eval mode (loss 0.01)")  # not stopped early
    assert "memorised the 1 batch at epoch 4: " in overfit_verdict(1.0, 0.5, 8, 1, 4, 60)  # not "the 1 batches"


def test_overfit_batches_stop_keeps_train_json_and_the_done_line_right(tmp_path):
    from tests.conftest import run_cli

    args = ["train", "--overfit-batches", 2, "--model", "cnn_bn", "--num-samples", 128, "--input-size", 16,
            "--batch-size", 16, "--epochs", 10, "--lr", 3e-3, "--precision", "fp32"]
    proc = run_cli(*args, "--json", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)  # stdout holds the result only: the verdict went to stderr
    assert printed == json.loads((tmp_path / "run" / "result.json").read_text())
    epoch = printed["epochs_run"]
    assert printed["stop_reason"] == f"memorised the 2 batches at epoch {epoch}" and epoch < 10
    assert printed["val_acc"] == 1.0 and printed["best_epoch"] == epoch
    assert f"--overfit-batches 2: memorised the 2 batches at epoch {epoch}: the model and loss can fit" in proc.stderr
    proc = run_cli(*args, "--out", tmp_path / "plain")
    done = proc.stdout.strip().splitlines()[-2]
    assert done.startswith(f"done: val acc 1.0000 (best 1.0000 at epoch {epoch})"), proc.stdout


def test_overfit_batches_says_when_it_did_not_memorise(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("train", "--overfit-batches", 1, "--epochs", 1, "--lr", 1e-7, "--batch-size", 16, "--num-samples",
                   64, "--input-size", 16, "--precision", "fp32", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    (line,) = [x for x in proc.stdout.splitlines() if "--overfit-batches 1:" in x]
    assert "NOT memorised" in line and "more --epochs" in line
    config = json.loads((tmp_path / "run" / "config.json").read_text())  # its defaults, under what was given
    assert (config["optimizer"], config["weight_decay"], config["epochs"], config["lr"]) == ("adamw", 0.0, 1, 1e-7)


def test_smoke_run_is_short_and_says_so(tmp_path):
    log = io.StringIO()
    r = cnnkit.train(smoke=True, epochs=30, batch_size=32, model="cnn_bn", precision="fp32", progress=False,
                     out=str(tmp_path / "run"), log=log)
    assert "smoke run" in log.getvalue()
    assert r.epochs_run == 2 and r.num_train <= 5 * 32 and r.num_val <= 256
    steps = (tmp_path / "run" / "steps.csv").read_text().splitlines()
    assert len(steps) - 1 <= 2 * 5


def test_smoke_run_with_val_split_on_shapes_trains_its_five_batches(tmp_path):
    # shapes splits the images it generates: a smoke run generated 5 batches' worth and trained on 4
    log = io.StringIO()
    r = cnnkit.train(smoke=True, val_split=0.1, batch_size=32, model="cnn_bn", precision="fp32", progress=False,
                     out=str(tmp_path / "run"), log=log)
    assert r.num_train == 5 * 32 and r.num_val > 0
    # its 5 batches are --smoke's cap, which the smaller --batch-size that this note advised would not lift
    assert "a smaller --batch-size gives more steps" not in log.getvalue(), log.getvalue()
    steps = (tmp_path / "run" / "steps.csv").read_text().splitlines()
    assert len(steps) - 1 == 2 * 5
    # with --num-samples, shapes generates no more than that, as the run itself does: the same training images
    r = cnnkit.train(smoke=True, val_split=0.5, num_samples=64, batch_size=32, model="cnn_bn", precision="fp32",
                     progress=False, out=str(tmp_path / "run64"), log=io.StringIO())
    assert r.num_train == len(load_splits(DataSpec("shapes", val_split=0.5, num_samples=64))[0])


def test_smoke_run_with_a_val_split_near_1_generates_no_more_than_it_validates_on(tmp_path, monkeypatch):
    # to train on 5 batches, --val-split 0.99 generated 16,010 shapes (0.9999: 1.6 million) to validate on 256
    from cnnkit.train import setup

    specs = []
    monkeypatch.setattr(setup, "load_splits", lambda spec: specs.append(spec) or load_splits(spec))
    r = cnnkit.train(smoke=True, val_split=0.99, batch_size=32, model="cnn_bn", precision="fp32", progress=False,
                     out=str(tmp_path / "run"), log=io.StringIO())
    spec, = specs
    assert spec.num_samples <= 5 * 32 + 256 + 10 and r.num_val == 256 and 1 <= r.num_train <= 5 * 32
    assert r.epochs_run == 2


@pytest.mark.parametrize("bad, words", [
    (dict(mixup=-1), "--mixup"), (dict(accum_steps=0), "--accum-steps"), (dict(ema=1.0), "--ema"),
    (dict(early_stop=0), "--early-stop"), (dict(monitor="val_f1"), "--monitor"), (dict(keep_best=-1), "--keep-best"),
    (dict(mix_off_epochs=1), "needs --mixup"), (dict(cutmix=1.0, mix_off_epochs=3, epochs=3), "smaller than --epochs"),
])
def test_bad_run_control_options_are_refused_before_a_run_folder_exists(tmp_path, bad, words):
    with pytest.raises(UserError, match=words):
        cnnkit.train(**{**OVERFITS, "epochs": 2, **bad}, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_the_done_line_names_the_monitored_metric_of_the_best_epoch(tmp_path):
    # With --monitor val_loss the best epoch's accuracy can be below the last one's: "best 0.6300" read as the best
    # accuracy, below the final 0.6400, looked like a mistake.
    from tests.conftest import run_cli

    r = run_cli("train", "--data", "shapes", "--num-samples", "200", "--epochs", "2", "--monitor", "val_loss",
                "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    done = next(line for line in r.stdout.splitlines() if line.startswith("done:"))
    assert (f"(best val_loss {result['best_score']:.4g} at epoch {result['best_epoch']}, val acc "
            f"{result['best_val_acc']:.4f} there)") in done, done


def test_overfit_batches_on_a_folder_gives_no_warning_its_mode_makes_moot(tmp_path):
    """Validation IS the training batches, on purpose: no "duplicate training images" warning, and no class
    imbalance warning about a sample of a few batches (2 batches of 4 images of 4 classes: 3 of one, 1 of
    another, 3.0x, which warned before)."""
    from tests.conftest import run_cli, write_image_folder

    data = write_image_folder(str(tmp_path / "images"))
    common = ["--model", "cnn_bn", "--data", data, "--batch-size", 4, "--epochs", 1, "--precision", "fp32"]
    proc = run_cli("train", *common, "--overfit-batches", 2, "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    printed = proc.stdout + proc.stderr  # the log goes to stdout, or to stderr with --json
    assert "on 8 training and 8 validation images" in printed
    assert "warning" not in printed, printed
    # Validating on training images in a plain run: the warning is real there.
    proc = run_cli("train", *common, "--val-data", data, "--num-samples", 8, "--out", tmp_path / "plain")
    assert "duplicate training images" in proc.stdout + proc.stderr, proc.stdout


def test_overfit_batches_says_when_the_data_has_fewer_batches(tmp_path):
    """--overfit-batches 20 on 7 batches overfits those 7: a note says so at the start, the verdict counts 7."""
    from tests.conftest import run_cli, write_image_folder

    data = write_image_folder(str(tmp_path / "images"))  # 32 images: 28 training, 7 batches of 4
    proc = run_cli("train", "--model", "cnn_bn", "--data", data, "--batch-size", 4, "--epochs", 20, "--precision",
                   "fp32", "--overfit-batches", 20, "--json", "--out", tmp_path / "run")
    assert proc.returncode == 0, proc.stderr
    assert ("cnnkit: note: --overfit-batches 20: the training data has only 7 batch(es) of 4 (28 images); it "
            "overfits all of them") in proc.stderr.splitlines()
    epoch = json.loads(proc.stdout)["epochs_run"]
    assert json.loads(proc.stdout)["stop_reason"] == f"memorised the 7 batches at epoch {epoch}"
    assert f"--overfit-batches 20: memorised the 7 batches at epoch {epoch}" in proc.stderr


def test_num_samples_beyond_the_data_says_it_trains_on_all(tmp_path):
    import cnnkit
    from tests.conftest import write_image_folder

    data = write_image_folder(str(tmp_path / "images"))  # 32 images: 28 training
    log = io.StringIO()
    result = cnnkit.train(data=data, num_samples=5000, epochs=1, out=str(tmp_path / "run"), precision="fp32",
                          progress=False, log=log)
    assert result.num_train == 28
    assert "cnnkit: note: --num-samples 5,000: the training data has only 28 images; it trains on all of them" \
        in log.getvalue().splitlines(), log.getvalue()


def test_num_samples_beyond_the_data_of_a_smoke_run_says_it_trains_on_all(tmp_path):
    # a smoke run said nothing: 100 asked, within its cap of 5 batches of 32, and 28 there
    import cnnkit
    from tests.conftest import write_image_folder

    data = write_image_folder(str(tmp_path / "images"))  # 32 images: 28 training
    for num_samples, said in ((100, True), (None, False)):
        log = io.StringIO()
        result = cnnkit.train(data=data, num_samples=num_samples, smoke=True, batch_size=32,
                              out=str(tmp_path / f"run{num_samples}"), precision="fp32", progress=False, log=log)
        assert result.num_train == 28
        notes = [line for line in log.getvalue().splitlines() if "--num-samples" in line]
        assert notes == (["cnnkit: note: --num-samples 100: the training data has only 28 images; it trains on all "
                          "of them"] if said else []), log.getvalue()
    # beyond the cap, the smoke run's own cap is what holds the number down: its line says so, no note
    write_image_folder(str(tmp_path / "more"), n_per_class=60)
    log = io.StringIO()
    result = cnnkit.train(data=str(tmp_path / "more"), num_samples=1000, smoke=True, batch_size=32,
                          out=str(tmp_path / "run2"), precision="fp32", progress=False, log=log)
    assert result.num_train == 5 * 32 and "--num-samples" not in log.getvalue(), log.getvalue()


def test_overfit_batches_refuses_val_data_before_any_work(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("train", "--overfit-batches", 1, "--val-data", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"cnnkit train: error: --overfit-batches 1 validates on the very batches it "
                                   f"trains on, so --val-data {tmp_path / 'nowhere'} would be ignored: drop one of the two")
    assert not (tmp_path / "run").exists()


def test_a_batch_size_that_leaves_few_steps_an_epoch_is_noted(tmp_path):
    # --recipe fast's batches of 1000 on a folder of ~1,000 images made one step an epoch, in silence.
    log = io.StringIO()
    cnnkit.train(data="shapes", num_samples=300, batch_size=128, epochs=1, progress=False, out=str(tmp_path / "a"),
                 log=log)
    assert ("cnnkit: note: 300 training images in batches of 128: 2 batch(es) an epoch, the 44 images left over in "
            "each shuffled epoch unused; a smaller --batch-size gives more steps") in log.getvalue()
    log = io.StringIO()
    cnnkit.train(data="shapes", num_samples=320, batch_size=32, epochs=1, progress=False, out=str(tmp_path / "b"),
                 log=log)
    assert "batch(es) an epoch" not in log.getvalue()  # 10 batches: enough to say nothing


# `cnnkit train` with a model that signals its own process when built (the run's start-up: after the data are read,
# before the run folder), in each training step, once in the validation, or twice in the first training step after
# a validation (``twice``: a double Ctrl-C once the first epoch is saved); SIGINT optionally ignored from the start,
# as a shell script's `cnnkit train ... &` starts it.
SIGNALLING_TRAIN = """
import os, signal, sys
import torch
from cnnkit.cli import main
from cnnkit.models.registry import register_model
from cnnkit.models.simple import simple_cnn

sig, when = getattr(signal, sys.argv[1]), sys.argv[2]
if sys.argv[3] == "ignored":
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Signalling(torch.nn.Module):
    trained = sent = validated = False

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if self.training and when == "training":
            os.kill(os.getpid(), sig)
        if self.training and when == "twice" and Signalling.validated:
            os.kill(os.getpid(), sig)
            os.kill(os.getpid(), signal.SIGINT)
        Signalling.validated |= Signalling.trained and not self.training
        if not self.training and when == "validation" and Signalling.trained and not Signalling.sent:
            Signalling.sent = True  # once: a second SIGINT stops at once
            os.kill(os.getpid(), sig)
        Signalling.trained |= self.training
        return self.net(x)


@register_model
def signalling(num_classes=10, in_channels=3, input_size=32):
    if when == "start-up":
        os.kill(os.getpid(), sig)
    return Signalling(simple_cnn(num_classes, in_channels, input_size))


sys.exit(main(["train", "--model", "signalling", *sys.argv[4:]]))
"""


def train_signalled(out, sig, when, sigint="default", *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", SIGNALLING_TRAIN, sig, when, sigint, "--num-samples", "64",
                           "--epochs", "1", "--batch-size", "32", "--threads", "1", "--quiet", "--out", str(out),
                           *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_the_start_up_stops_the_run_in_one_line_with_nothing_written(tmp_path, sig, code):
    # Before, SIGINT there ended in "cnnkit: interrupted" and SIGTERM killed the process without a word.
    proc = train_signalled(tmp_path / "run", sig, "start-up")
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == (f"cnnkit train: stopped: {sig} while the run was starting, before its first step; nothing "
                           "was written (run the same command again to start it)\n")
    assert not (tmp_path / "run").exists()


def test_a_run_started_with_sigint_ignored_ignores_it_throughout_and_stops_on_sigterm(tmp_path):
    # `cnnkit train ... &` in a script: the shell has SIGINT ignored, for a job that Ctrl-C must not reach. Python
    # leaves it so, and so did the start-up, but the loop's handler stopped the run on it.
    for when in ("start-up", "training"):
        proc = train_signalled(tmp_path / when, "SIGINT", when, sigint="ignored")
        assert proc.returncode == 0 and proc.stdout.startswith("done: "), proc.stderr
        assert (tmp_path / when / "result.json").exists()
    proc = train_signalled(tmp_path / "terminated", "SIGTERM", "training", sigint="ignored")
    assert proc.returncode == 143 and "stopped: SIGTERM at epoch 1, batch 1; saved" in proc.stderr, proc.stderr


def test_a_signal_in_the_last_validation_stops_before_the_final_measurements_with_result_json(tmp_path):
    # Before, the signal was caught there but never looked at again (the run went on to --tta, exit 0), and one
    # during --tta's measurement left the trained run without result.json: listed as stopped, nothing to resume.
    from cnnkit.runs import list_runs

    proc = train_signalled(tmp_path / "run", "SIGINT", "validation", "default", "--tta", "--json")
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == (f"cnnkit train: stopped: SIGINT after the last epoch; {tmp_path / 'run' / 'result.json'} "
                           "holds the finished run, without the final measurements\n")
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert json.loads(proc.stdout) == result  # --json prints it (before, nothing, though result.json was whole)
    assert result["stop_reason"] == "completed" and result["epochs_run"] == 1 and result["tta_val_acc"] is None
    assert list_runs(str(tmp_path / "run"))[0].status == "finished"


def test_a_second_sigint_stops_at_once_and_says_how_to_resume_from_the_last_checkpoint(tmp_path):
    # Before, a double Ctrl-C ended in a bare "cnnkit: interrupted", without the resume line of a single one, though
    # last.pt (the end of epoch 1 here) was whole and resumed the run.
    from cnnkit.runs import list_runs
    from cnnkit.train.loop import _resume_payload

    run = tmp_path / "run"
    proc = train_signalled(run, "SIGINT", "twice", "default", "--epochs", "2")
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == (f"cnnkit train: stopped: SIGINT twice, at once, without saving the steps since "
                           f"{run / 'last.pt'} (the state at the end of epoch 1). Continue from there with: "
                           f"cnnkit train --resume {run}\n")
    state = _resume_payload(str(run))["resume"]
    assert (state["run"]["epoch"], state["epoch_state"]["batch"]) == (2, 0)
    assert list_runs(str(run))[0].status == "stopped" and not (run / "result.json").exists()


def test_a_second_sigint_before_the_first_checkpoint_says_there_is_nothing_to_resume(tmp_path):
    from cnnkit.train.loop import _stopped_twice_message

    (tmp_path / "config.json").write_text("{}")
    assert _stopped_twice_message("SIGTERM", str(tmp_path), None, "unused") == (
        "SIGTERM, then SIGINT, at once, before the run's first checkpoint: there is nothing to resume; start it again "
        f"with: cnnkit train --config {tmp_path / 'config.json'} --out NEW_DIR")
    assert _stopped_twice_message("SIGINT", "", None, "unused").endswith("nothing to resume; run the same command "
                                                                         "again")



# `cnnkit COMMAND ...` with a signal sent to its own process while the saved run's plots and report are drawn
# (``drawing``), or in each step of the learning-rate range test (``range-test``: a model that signals when it trains).
SIGNALLING_ELSEWHERE = """
import os, signal, sys
import torch
import cnnkit.training
from cnnkit.cli import main
from cnnkit.models.registry import register_model
from cnnkit.models.simple import simple_cnn

sig, when = getattr(signal, sys.argv[1]), sys.argv[2]
if when == "drawing":
    draw = cnnkit.training.show_run

    def show_run(*args, **kwargs):
        os.kill(os.getpid(), sig)
        return draw(*args, **kwargs)

    cnnkit.training.show_run = show_run


class Signalling(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if self.training and when == "range-test":
            os.kill(os.getpid(), sig)
        return self.net(x)


@register_model
def signalling(num_classes=10, in_channels=3, input_size=32):
    return Signalling(simple_cnn(num_classes, in_channels, input_size))


sys.exit(main(sys.argv[3:]))
"""


def signalled_elsewhere(sig, when, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", SIGNALLING_ELSEWHERE, sig, when, *map(str, args), "--model",
                           "signalling", "--num-samples", "64", "--batch-size", "32", "--threads", "1", "--quiet"],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("sig, code, printed", [("SIGINT", 130, ()), ("SIGTERM", 143, ("--json",))])
def test_a_signal_while_the_plots_are_drawn_says_the_run_finished_and_which_command_draws_them(tmp_path, sig, code,
                                                                                               printed):
    # Before, Ctrl-C there ended in a bare "cnnkit: interrupted" and SIGTERM killed the process without a word,
    # though the run was finished and saved; then --json printed nothing, though result.json was whole.
    from cnnkit.runs import list_runs

    run = tmp_path / "run"
    proc = signalled_elsewhere(sig, "drawing", "train", "--epochs", 1, "--report", *printed, "--out", run)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == (f"cnnkit train: stopped: {sig} while drawing the plots and report; training finished and "
                           f"is saved in {run}, result.json included; draw them with: cnnkit report {run}\n")
    assert json.loads((run / "result.json").read_text())["stop_reason"] == "completed"
    assert (json.loads(proc.stdout) == json.loads((run / "result.json").read_text())) if printed else proc.stdout == ""
    assert list_runs(str(run))[0].status == "finished" and not (run / "report.html").exists()


@pytest.mark.parametrize("sig, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_the_range_test_stops_it_in_one_line_with_nothing_written(tmp_path, sig, code):
    out = tmp_path / "lrf"
    proc = signalled_elsewhere(sig, "range-test", "lr-find", "--steps", 20, "--out", out)
    assert proc.returncode == code, proc.stderr
    assert proc.stderr == (f"cnnkit lr-find: stopped: {sig} during the learning-rate range test, which stopped at "
                           "once without writing its result (run the same command again)\n")
    assert not out.exists()  # not even its folder (check_writable removes what it made for the check)


def test_a_smoke_runs_done_line_and_listing_say_it_is_one(tmp_path):
    # its done line and `cnnkit runs` gave its accuracy as any finished run's, a score it is not
    from tests.conftest import run_cli

    out = tmp_path / "run"
    proc = run_cli("train", "--smoke", "--out", out)
    assert proc.returncode == 0, proc.stderr
    done = proc.stdout.splitlines()[-2]
    assert done.startswith("done: val acc ") and done.endswith(
        f" in all (a smoke run: it checks that the command line runs; its accuracy is no score); run folder {out}")
    listed = run_cli("runs", out).stdout.splitlines()[1]
    assert listed.endswith("finished (smoke run)"), listed
