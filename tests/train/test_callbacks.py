"""train/ writes a run folder and returns a TrainResult, nothing else: what shows a run (TensorBoard, the final
test-time augmentation, plots and report.html) is the caller's, handed in as callbacks."""

import ast
import json
import os
from pathlib import Path

from cnnkit.train import loop

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(data="shapes", num_samples=128, val_split=0.25, batch_size=32, model="cnn_bn", progress=False,
            precision="fp32")


def imported_modules(path: Path) -> set[str]:
    """Every cnnkit module ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {n for n in names if n.startswith("cnnkit")}


def test_train_imports_nothing_that_shows_or_evaluates_a_run():
    above = ("cnnkit.report", "cnnkit.tta", "cnnkit.evaluate", "cnnkit.training", "cnnkit.inspect", "cnnkit.cli")
    for path in sorted((ROOT / "cnnkit" / "train").glob("*.py")):
        wrong = sorted(n for n in imported_modules(path) if n.startswith(above))
        assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"
    # ...and what evaluates a run does not reach into the loop for its evaluation.
    for name in ("evaluate.py", "tta.py", "report/predictions.py", "train/lr_find.py"):
        wrong = sorted(n for n in imported_modules(ROOT / "cnnkit" / name) if n.startswith("cnnkit.train.loop"))
        assert not wrong, f"cnnkit/{name} imports {wrong}"


class Recorder(loop.Callbacks):
    def __init__(self) -> None:
        self.calls = []

    def on_start(self, run):
        self.calls.append(("start", sorted(os.listdir(run.run_dir))))

    def on_epoch(self, run, row, val):
        self.calls.append(("epoch", row["epoch"], row["val_acc"] == val.acc))

    def on_end(self, run):
        self.calls.append(("end", len(run.state.history)))
        return {"tta_val_acc": 0.25}


def test_the_loop_calls_back_and_draws_nothing_itself(tmp_path):
    out = tmp_path / "run"
    recorder = Recorder()
    # plots, report and tta are asked for, but only the callbacks could carry them out
    r = loop.train(**TINY, epochs=2, plots=True, report=True, tta=True, out=str(out), callbacks=recorder)
    assert recorder.calls == [("start", ["config.json", "metrics.csv", "run.json", "stages.json"]),
                              ("epoch", 1, True), ("epoch", 2, True), ("end", 2)]
    assert r.tta_val_acc == 0.25 == json.loads((out / "result.json").read_text())["tta_val_acc"]
    assert not (out / "plots").exists() and not (out / "report.html").exists()
    assert json.loads((out / "config.json").read_text())["plots"]  # the run records what was asked of it
