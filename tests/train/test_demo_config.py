"""`make demo` is `cnnkit train` with no options: its configuration is the one README.md describes."""

import re
from pathlib import Path

from cnnkit.cli import _given_train_options, build_parser
from cnnkit.data.sources import SHAPES_TRAIN
from cnnkit.train.config import TrainConfig
from cnnkit.train.options import make_config as _make_config

ROOT = Path(__file__).resolve().parents[2]


def demo_config() -> TrainConfig:
    """What `cnnkit train` (no options) trains with, resolved as train() resolves it."""
    args = build_parser().parse_args(["train"])
    args.argv = ["train"]
    return _make_config(None, _given_train_options(args))


def test_make_demo_runs_cnnkit_train_without_options():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile.split("\ndemo:", 1)[1].split("\n\n", 1)[0]
    assert re.search(r"cnnkit train\s*$", recipe), recipe


def test_the_demo_is_what_the_readme_says():
    cfg = demo_config()
    assert (cfg.model, cfg.data, cfg.num_samples) == ("simple_cnn", "shapes", None)
    line = next(line for line in (ROOT / "README.md").read_text().splitlines() if re.match(r"cnnkit train\s+#", line))
    m = re.search(r"# (\w+) on ([\d,]+) generated `shapes` images, (\d+) epochs at batch (\d+), no random crops", line)
    assert m, line
    assert m[1] == cfg.model
    assert int(m[2].replace(",", "")) == SHAPES_TRAIN
    assert (int(m[3]), int(m[4]), cfg.crop_pad) == (cfg.epochs, cfg.batch_size, 0)
    assert cfg.optimizer == "sgd" and cfg.schedule == "onecycle" and cfg.lr is None  # SGD's 0.05, one cycle


def test_other_data_keep_the_general_defaults_and_explicit_options_win():
    cfg = _make_config(None, {"data": "cifar10"})
    assert (cfg.epochs, cfg.batch_size, cfg.crop_pad) == (10, 64, None)  # crop_pad None: an eighth of the size
    cfg = _make_config(None, {"epochs": 2, "batch_size": 8, "crop_pad": 3})
    assert (cfg.epochs, cfg.batch_size, cfg.crop_pad) == (2, 8, 3)
