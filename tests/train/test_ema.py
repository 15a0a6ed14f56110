"""Weight EMA: the average it keeps, the files it writes, and `eval --ema`."""

import csv
import os

import pytest
import torch

import cnnkit
from cnnkit.errors import UserError
from cnnkit.train.ema import WeightEMA
from tests.conftest import run_cli


def test_ema_update_is_the_exponential_average_of_weights_and_batchnorm_statistics():
    model = cnnkit.create_model("cnn_bn")
    ema = WeightEMA(model, decay=0.75)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.features[1].running_mean.add_(2.0)
        model.features[1].num_batches_tracked += 5
    ema.update(model)
    averaged = ema.module.state_dict()
    for name, value in model.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[name], 0.75 * start[name] + 0.25 * value)
    assert torch.allclose(averaged["features.1.running_mean"], start["features.1.running_mean"] + 0.5)
    assert int(averaged["features.1.num_batches_tracked"]) == 5  # counters are copied, not averaged
    assert ema.updates == 1 and not any(p.requires_grad for p in ema.module.parameters())


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    result = cnnkit.train(data="shapes", num_samples=192, val_split=0.25, epochs=2, batch_size=16, model="cnn_bn",
                          ema=0.9, precision="fp32", progress=False, out=str(out))
    return result, out


def test_ema_weights_are_saved_evaluated_and_differ_from_the_raw_ones(ema_run):
    result, out = ema_run
    assert {"last_ema.pt", "best_ema.pt"} <= set(os.listdir(out))
    raw = torch.load(out / "last.pt", weights_only=True)["state_dict"]
    avg = torch.load(out / "last_ema.pt", weights_only=True)["state_dict"]
    fresh = cnnkit.create_model("cnn_bn").state_dict()
    for name in ("features.0.weight", "features.1.running_mean", "classifier.1.weight"):
        assert not torch.equal(raw[name], avg[name])  # the average lags behind the weights...
        assert not torch.allclose(avg[name], fresh[name])  # ...but has moved from the start
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert all(r["ema_val_acc"] != "" for r in rows)
    # The column is the saved EMA model's accuracy: evaluating last_ema.pt gives it back.
    assert cnnkit.evaluate(str(out / "last_ema.pt")).acc == pytest.approx(float(rows[-1]["ema_val_acc"]))
    assert result.ema_val_acc == pytest.approx(float(rows[-1]["ema_val_acc"]))
    best_ema = max(float(r["ema_val_acc"]) for r in rows)
    assert cnnkit.evaluate(str(out), ema=True).acc == pytest.approx(best_ema)


def test_eval_ema_on_the_command_line_and_its_errors(ema_run, tmp_path):
    _, out = ema_run
    proc = run_cli("eval", out, "--ema")
    assert proc.returncode == 0 and "best_ema.pt" in proc.stdout, proc.stderr
    with pytest.raises(UserError, match="not one"):  # --ema picks a file of a run folder
        cnnkit.evaluate(str(out / "last.pt"), ema=True)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "best.pt").write_bytes((out / "best.pt").read_bytes())
    with pytest.raises(UserError, match="--ema DECAY"):
        cnnkit.evaluate(str(plain), ema=True)
