import copy
import io
import json
import os

import pytest
import torch

import cnnkit
from cnnkit.data.loader import BatchLoader
from cnnkit.data.sources import DataSpec, load_splits
from cnnkit.errors import UserError
from cnnkit.train.loop import diverging, evaluate_model, train_one_epoch
from cnnkit.train.optim import make_optimizer, make_scheduler
from tests.conftest import run_cli

TINY = dict(data="shapes", num_samples=256, epochs=2, batch_size=32, progress=False)


def test_same_seed_same_result_on_cpu(tmp_path):
    a = cnnkit.train(**TINY, model="cnn_bn", seed=3, device="cpu", out=str(tmp_path / "a"))
    b = cnnkit.train(**TINY, model="cnn_bn", seed=3, device="cpu", out=str(tmp_path / "b"))
    cnnkit.train(**TINY, model="cnn_bn", seed=4, device="cpu", out=str(tmp_path / "c"))
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["state_dict"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["state_dict"]
    wc = torch.load(tmp_path / "c" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a.train_loss, a.val_loss, a.val_acc) == (b.train_loss, b.val_loss, b.val_acc)


def test_run_folder_contents_and_result(tmp_path):
    r = cnnkit.train(**TINY, out=str(tmp_path / "run"))
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert files == ["best.pt", "config.json", "confusion", "last.pt", "metrics.csv", "per_class.csv", "result.json",
                     "run.json", "stages.json", "steps.csv"]
    steps = (tmp_path / "run" / "steps.csv").read_text().splitlines()
    assert steps[0] == "epoch,step,loss,lr" and len(steps) == 1 + 2 * (256 // 32)  # one row per training step
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,lr,train_loss") and len(lines) == 3
    assert r.epochs == 2 and 0 <= r.val_acc <= 1 and r.images_per_s > 0 and r.params == 620_362


def test_cnn_beats_linear_on_shapes(tmp_path):
    # Shapes sit anywhere in the image: a pooled CNN learns them, a linear model on pixels cannot.
    common = dict(data="shapes", num_samples=6000, epochs=6, batch_size=64, progress=False)
    cnn = cnnkit.train(**common, model="convnet", lr=0.05, out=str(tmp_path / "cnn"))
    lin = cnnkit.train(**common, model="linear", optimizer="adamw", lr=1e-3, out=str(tmp_path / "lin"))
    assert cnn.val_acc > 0.7 and cnn.val_acc > lin.val_acc + 0.4, (cnn.val_acc, lin.val_acc)


def _bn_setup():
    train_set, val_set = load_splits(DataSpec("shapes", num_samples=128))
    model = cnnkit.create_model("cnn_bn")
    loader = BatchLoader(train_set, 32, [0.5] * 3, [0.25] * 3, torch.device("cpu"), shuffle=True)
    val_loader = BatchLoader(val_set, 100, [0.5] * 3, [0.25] * 3, torch.device("cpu"))
    return model, loader, val_loader


def test_batchnorm_updates_running_stats_in_training_only():
    model, loader, val_loader = _bn_setup()
    bn = model.features[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    evaluate_model(model, val_loader, 10, torch.device("cpu"), None)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert model.training  # evaluate_model restores the mode it found

    opt = make_optimizer(model, "sgd", 0.01, 0.0)
    train_one_epoch(model, loader, opt, make_scheduler(opt, "constant", 4, 0), torch.amp.GradScaler("cpu", enabled=False),
                    torch.nn.CrossEntropyLoss(), torch.device("cpu"), None, progress=False)
    assert not torch.equal(bn.running_mean, before[0])
    assert int(bn.num_batches_tracked) == before[2] + len(loader)


def test_batchnorm_uses_batch_statistics_in_train_mode_and_running_in_eval():
    model, _, _ = _bn_setup()
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    alone, together = model(x[:1]), model(x)[:1]
    assert torch.allclose(alone, together, atol=1e-5)  # eval: each image on its own
    model.train()
    alone, together = model(x[:2]), model(x)[:2]
    assert not torch.allclose(alone, together, atol=1e-3)  # train: depends on the rest of the batch


def test_dropout_is_off_in_eval_and_on_in_train():
    model = cnnkit.create_model("simple_cnn")
    x = torch.randn(4, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))
    dropout = model.classifier[3]
    assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.5


def test_evaluate_model_restores_train_mode_and_is_repeatable():
    model, _, val_loader = _bn_setup()
    state = copy.deepcopy(model.state_dict())
    a = evaluate_model(model, val_loader, 10, torch.device("cpu"), None)
    b = evaluate_model(model, val_loader, 10, torch.device("cpu"), None)
    assert a.acc == b.acc and a.loss == b.loss and model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert a.count == 2000 and int(a.confusion.sum()) == 2000


def test_schedules_reach_peak_and_end_low():
    from cnnkit.train.optim import lr_factor

    for schedule in ("onecycle", "cosine", "step", "constant"):
        factors = [lr_factor(schedule, s, 100, 10) for s in range(100)]
        assert max(factors) == pytest.approx(1.0) and factors[0] == pytest.approx(0.1)
        if schedule != "constant":
            assert factors[-1] < 0.02


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(batch_size=-1), dict(lr=0.0), dict(lr=-1.0),
                                 dict(label_smoothing=1.0), dict(nonsense=1), dict(random_erasing=2.0),
                                 dict(augment_policy="autoaugment"), dict(cutout=-1), dict(recipe="slow"),
                                 dict(crop_pad=-3), dict(crop_pad=32), dict(crop_pad=2.5)])
def test_bad_options_are_refused_before_a_run_folder_exists(tmp_path, bad):
    with pytest.raises(UserError):
        cnnkit.train(**{**TINY, **bad}, out=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_unwritable_run_folder_is_reported_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write the run folder"):
        cnnkit.train(**TINY, out=str(blocker / "run"))


def test_the_result_holds_the_warnings_its_log_shows(tmp_path, image_folder):
    """A Python caller gets a run's warnings as data, as the log's lines show them, and so do result.json and
    `train --json`: the set-up's (--freeze backbone without weights, the data check's) and the loop's (--threads)."""
    log = io.StringIO()
    too_many = len(os.sched_getaffinity(0)) + 1
    r = cnnkit.train(model="cnn_bn", data=image_folder, epochs=1, batch_size=8, freeze="backbone", threads=too_many,
                     log=log, progress=False, out=str(tmp_path / "run"))
    prefix = "cnnkit: warning: "
    shown = [line[len(prefix):] for line in log.getvalue().splitlines() if line.startswith(prefix)]
    assert r.warnings == shown, log.getvalue()
    assert any(w.startswith("--freeze backbone keeps") for w in shown) and any(f"--threads {too_many}" in w for w in shown)
    assert any("validation image(s)" in w for w in shown)  # the data check's: 4 of them
    assert json.load(open(tmp_path / "run" / "result.json"))["warnings"] == r.warnings
    proc = run_cli("train", "--model", "cnn_bn", "--data", image_folder, "--epochs", "1", "--batch-size", "8",
                   "--freeze", "backbone", "--threads", too_many, "--quiet", "--json", "--out", tmp_path / "cli")
    assert proc.returncode == 0, proc.stderr
    # --quiet: the warnings alone reach stderr, each once; --json: the same list
    assert json.loads(proc.stdout.splitlines()[-1])["warnings"] == [line[len(prefix):] for line in
                                                                    proc.stderr.splitlines()] == shown


def test_epochs_and_lr_beside_stages_get_a_note_and_a_replayed_run_none(tmp_path):
    # --stages set the epochs and rates while --epochs 5 --lr 0.1 beside them were dropped without a word. Not an
    # error: config.json records both beside the stages, and replaying it with --config must train the same run.
    options = dict(data="shapes", num_samples=64, batch_size=32, progress=False, model="cnn_bn", precision="fp32",
                   stages="head:1@1e-3,all:1@1e-4")
    log = io.StringIO()
    cnnkit.train(**options, epochs=5, lr=0.1, out=str(tmp_path / "run"), log=log)
    notes = [line for line in log.getvalue().splitlines() if "--stages sets" in line]
    assert notes == ["cnnkit: note: --stages sets each stage's epochs and learning rate; --epochs and --lr are not "
                     "used"]
    log = io.StringIO()
    cnnkit.train(**options, lr=0.1, out=str(tmp_path / "lr"), log=log)
    assert "; --lr is not used" in log.getvalue()
    log = io.StringIO()
    cnnkit.train(str(tmp_path / "run" / "config.json"), out=str(tmp_path / "replay"), log=log)
    assert "--stages sets" not in log.getvalue()
    ran, replayed = (torch.load(tmp_path / name / "last.pt", weights_only=True)["state_dict"] for name in ("run", "replay"))
    assert all(torch.equal(ran[k], replayed[k]) for k in ran)
    assert json.loads((tmp_path / "replay" / "result.json").read_text())["epochs"] == 2


def _history(*losses):
    """metrics.csv rows with these (train_loss, val_loss) pairs, epoch 1 first."""
    return [{"epoch": i + 1, "train_loss": train, "val_loss": val} for i, (train, val) in enumerate(losses)]


def test_healthy_histories_are_not_diverging():
    # measured: the default run (simple_cnn on shapes); cnn_bn's first-epoch spike at SGD's default rate on 2,400
    # CIFAR images, which recovers (benchmarks/results/cnn_bn_lr.md); a 10-class model overfitting slowly; a
    # near-perfect binary model whose small validation loss triples
    for history, classes in [
        (_history((2.304, 2.297), (2.119, 1.723), (1.004, 0.339), (0.244, 0.092)), 10),
        (_history((4.670, 2.158), (2.004, 1.863), (1.840, 1.804)), 10),
        (_history((1.9, 2.0), (1.7, 2.05), (1.5, 2.2), (1.2, 2.4), (0.9, 2.7)), 10),
        (_history((0.3, 0.1), (0.2, 0.3)), 2),
    ]:
        for epoch in range(1, len(history) + 1):
            assert diverging(history[:epoch], classes) is None, history[:epoch]


def test_a_loss_far_above_chance_is_diverging():
    # resnet18 at SGD's default rate on 220 CIFAR images of 10 classes: validation loss 10.4, then 76.2
    said = diverging(_history((2.83, 10.41), (4.77, 76.19)), 10)
    assert said.startswith("validation loss 76.19 is 33x the chance level ln(10) = 2.30"), said
    assert "training loss 90 is 65x the chance level ln(4) = 1.39" in diverging(_history((90.0, 1.3)), 4)


def test_a_loss_that_grows_many_fold_above_chance_is_diverging():
    # cnn_bn at SGD's default rate on 220 CIFAR images: training loss 3.51, then 16.6 (validation 16.5)
    said = diverging(_history((3.51, 3.46), (16.62, 16.49)), 10)
    assert said == "validation loss 16.49 is 7.2x the chance level ln(10) = 2.30 and 4.8x epoch 1's 3.46", said
    # the same growth below twice chance is not enough
    assert diverging(_history((0.5, 0.3), (0.5, 1.3)), 2) is None  # 2 ln 2 = 1.39


def test_losses_that_are_not_numbers_are_left_to_the_finite_loss_check():
    assert diverging(_history((float("nan"), float("inf"))), 10) is None
    assert diverging([{"epoch": 1, "train_loss": 1.0, "val_loss": ""}], 10) is None


def test_a_diverging_run_warns_once_in_its_log_and_its_result(tmp_path, image_folder):
    log = io.StringIO()
    r = cnnkit.train(model="cnn_bn", data=image_folder, epochs=2, batch_size=8, lr=1.0, progress=False, log=log,
                     check_data=False, out=str(tmp_path / "run"))
    lines = [line for line in log.getvalue().splitlines() if "training is diverging" in line]
    assert len(lines) == 1 and lines[0].startswith("cnnkit: warning: training is diverging at epoch 1: "), lines
    assert "lower --lr, e.g. to 0.1 (a tenth), or let `cnnkit lr-find` suggest one" in lines[0]
    assert [w for w in r.warnings if "training is diverging" in w] == [lines[0][len("cnnkit: warning: "):]]
