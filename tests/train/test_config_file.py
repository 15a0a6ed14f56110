"""--config FILE: YAML or JSON training options, overridden by flags; a run's config.json replays it."""

import csv
import json

import pytest

import cnnkit
from cnnkit.errors import UserError
from cnnkit.train.config import read_config_file
from tests.conftest import run_cli

YAML = """\
# a run described in a file
model: cnn_bn
num_samples: 128
val_split: 0.25
epochs: 3
batch_size: 32
optimizer: adamw
lr: 3e-3          # YAML 1.1 reads this as text; a float field takes it as the number
precision: fp32
seed: 4
mixup: 0.2
"""


def metrics(run):
    """metrics.csv without its timing columns."""
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")}
            for row in csv.DictReader(open(run / "metrics.csv"))]


def test_yaml_options_overrides_win_and_config_json_replays_the_run_on_the_command_line(tmp_path):
    (tmp_path / "run.yaml").write_text(YAML)
    result = cnnkit.train(config=str(tmp_path / "run.yaml"), epochs=1, out=str(tmp_path / "a"), progress=False)
    saved = json.load(open(tmp_path / "a" / "config.json"))
    assert result.epochs == 1 and result.model == "cnn_bn"  # the keyword beat the file's 3 epochs
    assert (saved["optimizer"], saved["lr"], saved["mixup"], saved["seed"]) == ("adamw", 0.003, 0.2, 4)

    # config.json names its own run folder as "out": the flag given on the command line wins over the file.
    replay = run_cli("train", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b")
    assert replay.returncode == 0, replay.stderr
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert (tmp_path / "a" / "steps.csv").read_text() == (tmp_path / "b" / "steps.csv").read_text()


@pytest.mark.parametrize("text, words", [
    ("epochs: 2\nbatchsize: 8\n", ["unknown key(s) batchsize", "did you mean batch_size"]),
    ("epochs: ten\n", ["epochs must be a whole number", "'ten'"]),
    ("epochs: 2.5\n", ["epochs must be a whole number"]),
    ("lr: fast\n", ["lr must be a number or 'auto' or null"]),
    ("flip: maybe\n", ["flip must be true or false or null"]),
    ("model_options: 3\n", ["model_options must be a mapping"]),
    ("- epochs\n", ["expected a mapping"]),
    ("epochs: [1\n", ["not valid YAML", "line"]),
])
def test_bad_config_files_are_named_in_one_line(tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        read_config_file(str(path))
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_config_errors_on_the_command_line_exit_2_with_one_line(tmp_path):
    (tmp_path / "run.json").write_text('{"epochs": 1, "nonsense": true}')
    proc = run_cli("train", "--config", tmp_path / "run.json", "--out", tmp_path / "run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "nonsense" in proc.stderr and "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="cannot read"):
        read_config_file(str(tmp_path / "missing.yaml"))
