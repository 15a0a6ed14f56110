"""``cnnkit.train`` and ``cnnkit.lr_find``: the training loop and the range test of cnnkit/train/, with the
steps that show a run wired in. Those live above train/ (which writes a run folder and returns a TrainResult,
nothing else) because they draw on report/ and tta.py:

- ``tensorboard``: the TensorBoard events, opened before the first epoch and written after each;
- ``tta``: the final validation accuracy with test-time augmentation (``TrainResult.tta_val_acc``);
- ``plots`` / ``report``: plots/ and report.html, drawn once the run is saved;
- the learning-rate range test's curve, ``lr_find.png`` (``lr-find``, and ``train --lr auto``).
"""

from __future__ import annotations

from typing import IO, Any

from cnnkit.errors import NonFiniteLoss, TrainingStopped
from cnnkit.report.html import show_run
from cnnkit.report.plots import plot_lr_find
from cnnkit.report.tensorboard import TensorBoardLog, open_tensorboard, require_tensorboard
from cnnkit.runs import refuse_resuming_divergence
from cnnkit.train import loop
from cnnkit.train import lr_find as range_test
from cnnkit.train.config import TrainConfig, TrainResult
from cnnkit.train.evaluation import EvalStats, evaluate_model
from cnnkit.train.lr_find import LrFindResult
from cnnkit.tta import TTAModel

TTA_SHIFT = 1  # pixels: train --tta averages the image, its mirror image and its four 1-pixel shifts


def train(config: TrainConfig | str | None = None, log: IO[str] | None = None, resume: str | None = None,
          **overrides) -> TrainResult:
    """Train a model as ``config`` (a TrainConfig, or a YAML or JSON file of its fields) and the keyword
    ``overrides`` say; returns the run's results. ``resume=RUN_DIR`` continues an interrupted run from its
    ``last.pt`` with the run's own configuration. Options merge as cnnkit/train/options.py says: defaults <
    recipe < config file < overrides. Example: ``cnnkit.train(model="simple_cnn", data="cifar10", epochs=15)``.

    A run that diverges raises NonFiniteLoss after writing its result.json; the exception's ``result`` holds
    that TrainResult (its ``stop_reason`` "diverged: ..."), or None when the run folder was never made. A diverged
    run is not resumed (UserError): it would replay the same steps into the same failure.
    A run stopped by a signal raises TrainingStopped; its ``result`` holds the TrainResult where result.json was
    written whole (a stop after the training: in the final measurements or while the plots are drawn), else None.
    """
    if resume:
        refuse_resuming_divergence(resume)
    steps = ShowRun()
    try:
        result = loop.train(config, log=log, resume=resume, callbacks=steps, **overrides)
    except NonFiniteLoss as e:
        if e.result is not None:  # its report shows why it stopped and the losses up to it (--plots, --report)
            steps.after(e.result)
        raise
    steps.after(result)
    return result


def lr_find(config: TrainConfig | str | None = None, **options: Any) -> LrFindResult:
    """The learning-rate range test (cnnkit/train/lr_find.py: its keyword options and the rules it suggests by),
    with its curve drawn into ``out/lr_find.png`` when ``out`` is given. SIGINT or SIGTERM stops it at once, as
    they stop a training run's start-up (TrainingStopped, exit code 130 or 143): the test has nothing to save.
    Example: ``cnnkit.lr_find(model="simple_cnn", data="shapes").suggestion``."""
    # Before, Ctrl-C ended in a bare "cnnkit: interrupted" and SIGTERM killed the process without a word.
    with loop.StopSignals() as stop, stop.at_once(_stopped_range_test):
        return range_test.lr_find(config, draw=plot_lr_find, **options)


def _stopped_range_test(name: str) -> str:
    """What a stop by signal ``name`` during ``lr_find`` says (its files are written atomically, at its end)."""
    return (f"{name} during the learning-rate range test, which stopped at once without writing its result "
            "(run the same command again)")


class ShowRun(loop.Callbacks):
    """The steps that show a run, as its configuration asks for them."""

    def __init__(self) -> None:
        self.board: TensorBoardLog | None = None
        self.run: loop.Training | None = None  # set when the run starts

    def check(self, cfg: TrainConfig) -> None:
        if cfg.tensorboard:
            require_tensorboard()  # before any data is loaded or a run folder made

    def plot_lr_find(self, result: LrFindResult, path: str) -> str | None:
        return plot_lr_find(result, path)

    def on_start(self, run: loop.Training) -> None:
        self.run = run
        if run.cfg.tensorboard and run.ctx.main:
            p = run.pieces
            self.board = open_tensorboard(run.run_dir, p.classes, p.model, p.train_loader, p.mean, p.std, run.log)

    def on_epoch(self, run: loop.Training, row: dict[str, Any], val: EvalStats) -> None:
        if self.board:
            self.board.log_epoch(row, val.confusion)

    def on_end(self, run: loop.Training) -> dict[str, Any]:
        if not run.cfg.tta:
            return {}
        p = run.pieces
        tta_model = TTAModel(p.model, p.mean, p.std, flip=True, shift=TTA_SHIFT).to(run.machine.device)
        tta_acc = evaluate_model(tta_model, p.val_loader, len(p.classes), run.machine.device, run.machine.amp_dtype).acc
        print(f"test-time augmentation (mirror and {TTA_SHIFT}-pixel shifts, softmax averaged): val acc {tta_acc:.4f}",
              file=run.log)
        return {"tta_val_acc": tta_acc}

    def after(self, result: TrainResult) -> None:
        """Once the run is saved: the TensorBoard events closed; plots and report.html drawn (first process)."""
        if self.board:
            self.board.close()
        run = self.run
        if run.ctx.main and run.cfg.plots:  # --report sets plots too (train/options.py)
            # Training's own signal handling has ended, but the run is saved: a signal stops the drawing alone and
            # says so (before, Ctrl-C ended in a bare "cnnkit: interrupted" and SIGTERM killed it without a word).
            try:
                with loop.StopSignals() as stop, stop.at_once(lambda name: _stopped_drawing(name, result,
                                                                                            run.cfg.report)):
                    show_run(result.run_dir, report=run.cfg.report, device=run.cfg.device, log=run.log)
            except TrainingStopped as stopped:
                stopped.result = result  # result.json is whole: --json still prints it
                raise


def _stopped_drawing(name: str, result: TrainResult, report: bool) -> str:
    """What a stop by signal ``name`` while a saved run's plots (and ``report``) are drawn says."""
    what = "plots and report" if report else "plots"
    ended = "diverged (its result.json says why)" if result.stop_reason.startswith("diverged") else "finished"
    return (f"{name} while drawing the {what}; training {ended} and is saved in {result.run_dir}, result.json "
            f"included; draw them with: cnnkit report {result.run_dir}")
