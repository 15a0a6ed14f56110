import json
import math

import pytest
import torch

import cnnkit
from cnnkit.errors import UserError
from cnnkit.train.lr_find import EDGE_METHOD, EDGE_SHARE, FLAT_METHOD, TENTH_METHOD, lr_find
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error

TINY = dict(data="shapes", num_samples=128, batch_size=32, progress=False)


def test_range_test_sweeps_exponentially_and_stops_when_the_loss_blows_up(tmp_path):
    # convnet (BatchNorm) learns within a few dozen steps even of tiny data; lr up to 1e3 makes it blow up
    sweep = dict(model="convnet", **TINY, start_lr=1e-3, end_lr=1e3, steps=80)
    r = lr_find(**sweep, out=str(tmp_path / "lr.png"))
    assert 10 <= r.steps < 80 and r.diverged
    assert len(r.lrs) == len(r.losses) == len(r.smoothed) == r.steps
    ratios = [b / a for a, b in zip(r.lrs, r.lrs[1:])]
    assert r.lrs[0] == pytest.approx(1e-3) and max(ratios) == pytest.approx(min(ratios))  # geometric
    assert ratios[0] == pytest.approx((1e3 / 1e-3) ** (1 / 79))
    assert r.smoothed[-1] > 4 * min(r.smoothed)
    # one-cycle, the default schedule, takes the end of the valley around the lowest smoothed loss
    settled = r.steps // 10
    low = min(range(settled, r.steps), key=r.smoothed.__getitem__)
    edge = r.lrs.index(r.edge_lr)
    limit = r.smoothed[low] + EDGE_SHARE * (r.smoothed[settled] - r.smoothed[low])
    assert r.min_loss_lr == r.lrs[low] and low <= edge and max(r.smoothed[low:edge + 1]) <= limit < r.smoothed[edge + 1]
    assert r.method == EDGE_METHOD and r.suggestion == r.edge_lr
    assert r.lrs[0] < r.steepest_lr <= r.min_loss_lr
    assert (tmp_path / "lr.png").stat().st_size > 10_000 and r.plot == str(tmp_path / "lr.png")
    # without a warm-up, a tenth of it
    constant = lr_find(**sweep, schedule="constant")
    assert constant.method == TENTH_METHOD and constant.suggestion == pytest.approx(r.edge_lr / 10)


def test_flat_curve_keeps_the_default_learning_rate():
    # lr never above 1e-6: the loss cannot move, so the minimum is noise and the default is kept
    r = lr_find(model="cnn_bn", **TINY, start_lr=1e-8, end_lr=1e-6, steps=20)
    assert r.method == FLAT_METHOD and r.suggestion == 0.05 and not r.diverged


def test_auto_lr_trains_exactly_as_with_the_suggested_rate(tmp_path):
    common = dict(TINY, model="cnn_bn", epochs=1, device="cpu")
    auto = cnnkit.train(**common, lr="auto", out=str(tmp_path / "auto"))
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    found = config["lr_find"]
    assert config["lr"] == found["suggestion"] and found["method"] in (EDGE_METHOD, FLAT_METHOD)
    assert (tmp_path / "auto" / "lr_find.png").exists() and found["plot"] == str(tmp_path / "auto" / "lr_find.png")
    fixed = cnnkit.train(**common, lr=found["suggestion"], out=str(tmp_path / "fixed"))
    # the range test ran on its own model and the generators were re-seeded: the same run, bit for bit
    a = torch.load(tmp_path / "auto" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "fixed" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a) and auto.val_loss == fixed.val_loss


def test_lr_find_command(tmp_path):
    out = tmp_path / "curve.png"
    proc = run_cli("lr-find", "--model", "cnn_bn", "--num-samples", 128, "--batch-size", 32, "--steps", 30,
                   "--start-lr", "1e-4", "--end-lr", "1e3", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["plot"] == str(out) and out.exists() and result["suggestion"] > 0
    assert "range test" in proc.stderr  # the log goes to stderr with --json, the result alone to stdout


@pytest.mark.parametrize("options, words", [
    (dict(steps=3), "at least 10 steps"),
    (dict(start_lr=1.0, end_lr=0.1), "start lr < end lr"),
    (dict(out="no/such/folder/x.png"), "no/such/folder"),
    (dict(stages="fc:1@0.1"), "--stages"),
])
def test_range_test_rejects_bad_settings_before_any_work(options, words):
    with pytest.raises(UserError, match=words):
        lr_find(**TINY, **options)


@pytest.mark.parametrize("args, words", [
    (["--lr", "auto", "--stages", "fc:1@0.1"], ["--lr auto", "--stages"]),
    (["--lr", "fast"], ["--lr", "not a number"]),
])
def test_train_lr_usage_errors(tmp_path, args, words):
    assert_one_line_error(run_cli("train", *args, cwd=tmp_path), 2, *words)
    assert not (tmp_path / "runs").exists()


def test_library_rejects_a_learning_rate_that_is_neither_a_number_nor_auto():
    with pytest.raises(UserError, match="positive or 'auto'"):
        cnnkit.train(lr="fast", **TINY)
