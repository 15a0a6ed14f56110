"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017; fastai's
``lr_find``): train for a few hundred steps while the learning rate grows exponentially from tiny to huge,
and watch the loss. At first nothing happens, then the loss falls, then it levels off and blows up.

What it suggests: the smoothed loss of a CNN typically falls into a wide, flat valley and then climbs; the
lowest point inside the valley is noise (on ``convnet`` and ``shapes`` it moved between 0.01 and 0.07 from one
seed to the next, on curves whose valleys all ended near 0.12). The suggestion is therefore the valley's
**right edge**: the largest rate reached before the smoothed loss climbs more than EDGE_SHARE of the test's
whole descent above its minimum.

- **one-cycle (the default): a third of the edge** ("edge/3", about half a decade below it). One-cycle warms up
  to its peak and anneals from it, which lets a run sit near the edge of stability for a while (Smith, "A
  disciplined approach to neural network hyper-parameters", 2018: the peak is where the loss stops falling);
  but the edge itself is too close to it. The smoothed loss lags the rate: its exponential average remembers
  about 50 steps, over which the rate grows about 50-fold, so the curve climbs well after the loss itself
  did, and a run holds its peak for many more steps than the test held any rate. ``simple_cnn`` (no
  BatchNorm) on a 3-class CIFAR-10 subset went NaN in its second epoch at the edge's 0.307 (issue 24) and
  at 0.3, and trained at 0.15 and below. ``benchmarks/results/lr_find_rules.md`` (3 epochs on two 3-class
  subsets, 1,620 training images each) compares the rules on the same curves. A third of the edge
  (0.042-0.049; one curve counted as flat, where the default 0.05 was kept) gave val acc 0.744 and 0.772
  with ``simple_cnn``, the best of all rates tried, and 0.689 with ``convnet`` (best fixed rate 0.706); the
  edge itself 0.639, 0.544 and 0.683. fastai's ``valley`` (``fastai_valley``: halfway along the longest
  descent) suggested 0.002-0.009 and gave 0.528, 0.628 and 0.611; its ``slide`` (``fastai_slide``) moved
  between 0.015 and 0.36 from curve to curve.
  Networks with BatchNorm tolerate more: ``convnet`` on ``shapes`` (3 epochs, 6,000 images, seed 0) reached
  23.4% at 0.007, 38.7% at 0.024, 50.7% at 0.05, 52.9% at 0.07 and 57.2% at 0.15, so there a third of the
  edge gives some accuracy away for the margin.
- **other schedules: a tenth of the edge** ("edge/10"): without the warm-up, a run starts at its peak.
- **never within that margin of the blow-up**: the suggestion is at most the rate at which the test stopped
  because the loss blew up, divided by the same 3 (one-cycle) or 10 ("capped at blow-up/3" is added to the
  method where that decided). The valley's edge lies below the blow-up, so the cap matters for the default rate
  kept on a flat curve (below), which knows nothing of the network: a rate the test saw blow up is no peak.

The steepest point of the descent is reported too (``steepest_lr``) but not suggested: it is the derivative of
a noisy curve and moves by an order of magnitude between seeds on small sets.

Some networks give the test nothing to read: one without BatchNorm, freshly initialised, can sit on a plateau
(loss ln(classes), every prediction alike) for longer than the test lasts at any rate — ``simple_cnn`` on
``shapes`` does for its first few hundred steps — and the loss stays flat until high rates kill it. The
minimum of a flat curve is noise, so when the loss never falls FLAT_DROP below its level after the first tenth
of the test, the suggestion is the optimizer's default rate instead ("default: flat curve"), and the message
says so. Slower sweeps do not help there (simple_cnn on 20,000 ``shapes`` images stayed flat through 500- and
1,000-step exponential sweeps), and no fixed rate does reliably better than the default: one-cycle runs of 3
epochs at peaks 0.03 / 0.05 / 0.1 / 0.2 / 0.3 reached mean val accuracies of 0.39 / 0.66 / 0.50 / 0.57 / 0.10
over seeds 0-2 (``benchmarks/lr_find_shapes.py --sweep``): when the plateau ends is close to chance, and above
about 0.2 the network dies (every output alike) instead.

How many steps: 200 (DEFAULT_STEPS), but on a small data set no more than 4 passes over its training images
(MAX_PASSES) and no fewer than 50 steps (MIN_STEPS); ``--steps`` is taken as given. 200 steps of 64 images are 14
passes over 900 training images: the test then mostly measures how well the model memorises them, and takes long. A
shorter sweep grows the rate faster per step, so the moving average remembers fewer steps (``default_smoothing``: a
quarter of the sweep, as at 200 steps) and lags the curve by the same span of rates that the margins above were
measured with; with 0.98, a 39-step sweep (810 images) ended at lr 10 without its smoothed loss showing the blow-up
that the losses themselves showed from 0.51. On the first 300 and 600 images a class of ``cifar3a`` (810 and 1,620
training images, batch 64; benchmarks/results/lr_find_steps.md), ``convnet``'s suggestion from the shorter default
sweep was somewhat lower than from 200 steps: 0.033, 0.033 and 0.046 (50 steps, seeds 0-2) against 0.046, 0.074 and
0.063 on 810 images, 0.035 (100 steps) against 0.046 on 1,620, where fixed rates 0.01, 0.03 and 0.1 trained
``convnet`` to within two validation images of each other (benchmarks/results/lr_find_rules.md); ``simple_cnn``'s
curve stayed flat, and its default kept, at every length.

The test runs on its own freshly built model and optimizer, so nothing it does reaches a later training run;
``train(lr="auto")`` runs it first with the same configuration and trains with the suggestion (``config.json``
records the rate, so replaying the run with ``--config`` uses it again; ``lr_find.json`` the test's figures,
``lr_find.png`` its curve).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Callable

import torch.nn as nn

from cnnkit.atomic import check_writable, write_json
from cnnkit.data.loader import BatchLoader
from cnnkit.data.images import left_out_warning
from cnnkit.errors import UserError, warn
from cnnkit.progress import progress_bar
from cnnkit.runs import new_folder_name
from cnnkit.train import distributed
from cnnkit.train.config import TrainConfig
from cnnkit.train.optim import DEFAULT_LR, make_optimizer
from cnnkit.train.options import make_config, model_options_error
from cnnkit.train.precision import autocast
from cnnkit.train.setup import ModelOptionsError, build_run, range_test_config, seed_everything, start_machine
from cnnkit.transfer import check_head_trains, freeze_batchnorm_stats, plan_stages, set_trainable

EDGE_METHOD, TENTH_METHOD, FLAT_METHOD = "edge/3", "edge/10", "default: flat curve"
BLOWUP_METHOD = "capped at blow-up/{margin}"  # added to the method when the cap below the blow-up decided
ONE_CYCLE_MARGIN = 3  # one-cycle's peak: the valley's edge divided by this (see the module doc)
EDGE_SHARE = 0.1  # the valley ends where the smoothed loss is this share of the descent above its minimum
FLAT_DROP = 0.05  # the smoothed loss must fall by 5% of its level for the curve to count as a descent
# How many steps: DEFAULT_STEPS, but on a small data set at most MAX_PASSES passes over its training images and
# at least MIN_STEPS (see the module doc, "How many steps").
DEFAULT_STEPS, MAX_PASSES, MIN_STEPS = 200, 4, 50
SMOOTHING = 0.98  # the loss's moving average at DEFAULT_STEPS or more: it remembers about a quarter of the sweep
DrawCurve = Callable[["LrFindResult", str], "str | None"]  # draws a test's curve into a PNG file; returns its path


@dataclass
class LrFindResult:
    model: str
    data: str
    suggestion: float  # a third of edge_lr (one-cycle) or a tenth, or the optimizer's default for a flat curve
    method: str
    edge_lr: float  # the right edge of the valley around the minimum (see the module doc)
    min_loss_lr: float  # where the smoothed loss is lowest
    steepest_lr: float  # where the smoothed loss falls fastest per decade of learning rate
    diverged: bool  # stopped early because the loss blew up (the usual end)
    steps: int  # steps taken
    seconds: float
    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # each step's training loss
    smoothed: list[float] = field(default_factory=list)  # debiased exponential moving average of the losses
    plot: str | None = None  # the PNG, once written
    blowup_lr: float | None = None  # the rate at which the test stopped because the loss blew up, else None
    # what the set-up warned about (errors.warn), each as its log line after "cnnkit: warning: " (TrainResult's)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        """The figures without the curves, and the warnings (what ``lr-find --json`` prints and lr_find.json holds)."""
        return {k: getattr(self, k) for k in ("suggestion", "method", "edge_lr", "min_loss_lr", "steepest_lr", "diverged",
                                              "blowup_lr", "steps", "plot", "warnings")}


def lr_find(config: TrainConfig | str | None = None, *, start_lr: float = 1e-6, end_lr: float = 10.0,
            steps: int | None = None, smoothing: float | None = None, diverge: float = 4.0, out: str | None = None,
            log: IO[str] | None = None, progress: bool | None = None, draw: DrawCurve | None = None,
            for_train: bool = False, **overrides) -> LrFindResult:
    """Run the range test for ``config`` (or keyword overrides of the training defaults): ``steps`` steps from
    ``start_lr`` to ``end_lr``, stopping once the smoothed loss exceeds ``diverge`` times its minimum. ``steps``
    None: ``default_steps`` (DEFAULT_STEPS, fewer on a small data set); ``smoothing`` (the moving average's
    factor per step) None: ``default_smoothing(steps)``. ``out``: a
    folder (made if missing, as train's ``out``) that receives the figures, ``lr_find.json``, and the curve,
    ``lr_find.png``, drawn by ``draw`` (``cnnkit.lr_find`` passes ``cnnkit.report.plots.plot_lr_find``).
    ``config`` and ``overrides`` are merged as train's (cnnkit/train/options.py). ``for_train``: the test runs
    for ``train --lr auto``, which has no --end-lr: its messages name ``cnnkit lr-find`` for a longer sweep.
    Example: ``cnnkit.lr_find(model="simple_cnn", data="shapes").suggestion``.
    """
    cfg = make_config(config, overrides)
    if not 0 < start_lr < end_lr:
        raise UserError(f"the range test needs 0 < start lr < end lr, got {start_lr:g} and {end_lr:g}")
    if steps is not None and steps < 10:
        raise UserError(f"the range test needs at least 10 steps to draw a curve, got {steps}")
    if smoothing is not None and not 0 <= smoothing < 1 or not diverge > 1:
        raise UserError("smoothing must be in [0, 1) and the divergence factor above 1")
    if cfg.stages:
        raise UserError("the range test finds one learning rate; with --stages give each stage its rate")
    if out:
        _check_folder(out)
    log = log or sys.stdout
    progress = cfg.progress if progress is None else progress
    machine = start_machine(cfg)
    device, amp_dtype = machine.device, machine.amp_dtype
    # Data, model, loader and loss as `train` builds them, so the test measures the run it advises.
    try:
        # train --lr auto: the run's own set-up prints the same notes and warnings right after the test
        run = build_run(range_test_config(cfg, for_train), machine, io.StringIO() if for_train else log)
    except ModelOptionsError as e:
        raise model_options_error(e, config, overrides) from None
    if not for_train:  # train --lr auto: the run's own set-up warns right after the test, as train does
        # without a run folder's bad_images.txt: the first is named, check-data lists them all
        for warning in left_out_warning(run.train_set.skipped + run.val_set.skipped, cfg.data,
                                        why=f" (`cnnkit check-data {cfg.data}` lists them all)"):
            warn(log, run.warnings, warning)
    model, criterion, scaler, threads = run.model, run.criterion, run.scaler, machine.threads
    stage = plan_stages(None, cfg.freeze, cfg.unfreeze, cfg.epochs, start_lr)[0]
    check_head_trains(model, stage, f"--unfreeze {cfg.unfreeze}")  # else a flat curve, every gradient zero
    set_trainable(model, stage.modules)
    optimizer = make_optimizer(model, cfg.optimizer, start_lr, cfg.weight_decay, cfg.momentum, cfg.nesterov,
                               batch_size=cfg.batch_size)
    # Groups may run at their own multiple of the rate (Muon's biases and head): the sweep keeps those ratios.
    ratios = [group["lr"] / start_lr for group in optimizer.param_groups]

    batches = len(run.train_loader)  # per pass over the training images
    given = steps is not None
    steps = steps if given else default_steps(batches)
    smoothing = default_smoothing(steps) if smoothing is None else smoothing
    print(f"cnnkit: learning-rate range test for {cfg.model} on {cfg.data}: up to {steps} steps of "
          f"{cfg.batch_size} images {_passes_text(steps, batches, len(run.train_set), given)}, lr {start_lr:g} -> "
          f"{end_lr:g}; {threads} CPU thread{'s' if threads > 1 else ''}", file=log)
    factor = (end_lr / start_lr) ** (1 / (steps - 1))
    lrs, losses, smoothed = [], [], []
    average, best, diverged, blowup_lr = 0.0, math.inf, False, None
    bar = progress_bar(steps, desc="lr-find", unit="step", enabled=progress)
    start = time.perf_counter()
    model.train()
    freeze_batchnorm_stats(model)
    endless = _endless(run.train_loader)
    for i in range(steps):
        lr = start_lr * factor**i
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        images, labels = next(endless)
        with autocast(device, amp_dtype):
            loss = criterion(model(images), labels)
        value = loss.item()  # the stop test needs it every step; a few hundred syncs are nothing here
        if not math.isfinite(value):
            # This loss comes from the weights the previous step's rate made: that rate did the damage.
            diverged, blowup_lr = True, lrs[-1] if lrs else lr
            break
        average = smoothing * average + (1 - smoothing) * value
        smooth = average / (1 - smoothing ** (i + 1))  # without the bias towards the 0 it started from
        lrs.append(lr)
        losses.append(value)
        smoothed.append(smooth)
        best = min(best, smooth)
        if i >= 10 and smooth > diverge * best:
            # The smoothed loss, not a step's: one noisy batch far above a low minimum is not a blow-up. The
            # smoothed loss rises some steps after the raw losses did: the blow-up's rate is that of the first step
            # since the minimum whose own loss rose as far.
            low = smoothed.index(best)
            blowup_lr = next((lrs[j] for j in range(low, len(lrs)) if losses[j] > diverge * best), lr)
            diverged = True
            break
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smooth:.3f}")
        bar.update(1)
    bar.close()
    if len(lrs) < 10:
        raise UserError(f"the loss blew up within {len(lrs)} steps of the range test: lower the start "
                        f"learning rate (now {start_lr:g})")
    default = DEFAULT_LR.get(cfg.optimizer, 0.01)
    suggestion, method, edge, low = suggest(lrs, smoothed, cfg.schedule, default, blowup_lr)
    result = LrFindResult(cfg.model, cfg.data, suggestion, method, lrs[edge], lrs[low],
                          _steepest(lrs, smoothed, max(1, len(lrs) // 10), low), diverged, len(lrs),
                          time.perf_counter() - start, lrs, losses, smoothed, blowup_lr=blowup_lr,
                          warnings=list(run.warnings))
    if method.startswith(FLAT_METHOD):
        share = {3: "a third", 10: "a tenth"}.get(_margin(cfg.schedule), f"1/{_margin(cfg.schedule)}")
        kept = (f"keeping the {cfg.optimizer} default {default:g}" if method == FLAT_METHOD else
                f"the {cfg.optimizer} default {default:g} capped at {suggestion:.3g}, {share} of the {blowup_lr:.3g} "
                "at which the loss blew up")
        if not diverged:
            print(_flat_message(lrs, smoothed, diverge, _beyond(end_lr, for_train), kept), file=log)
        else:
            chance, typical = math.log(len(run.classes)), sorted(smoothed)[len(smoothed) // 2]
            level = (f"loss about ln({len(run.classes)}) = {chance:.2f}, every prediction alike"
                     if abs(typical - chance) < 0.1 * chance else f"loss about {typical:.3g}")
            has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
            print(f"cnnkit: the loss did not fall at any rate of the range test: {cfg.model} sat on its starting "
                  f"plateau on {cfg.data} ({level}) until it blew up, so the curve cannot rank the rates; {kept}. "
                  "Such a plateau ends after enough steps, not at some rate, so a longer sweep would not help"
                  + ("" if has_bn else "; networks with BatchNorm and global average pooling (cnnkit's convnet) "
                                       "leave it sooner"), file=log)
    elif not diverged:
        print(_no_blowup_message(lrs, smoothed, low, edge, diverge, _beyond(end_lr, for_train)), file=log)
    if out:
        write_json(os.path.join(out, "lr_find.json"), lr_find_record(result, out, draw))
    return result


def _beyond(end_lr: float, for_train: bool) -> str:
    """How to sweep past ``end_lr``: an option of ``cnnkit lr-find``, which ``train --lr auto`` does not have."""
    if for_train:
        return f"run cnnkit lr-find with this run's options and --end-lr {end_lr * 10:g} to see further"
    return "raise --end-lr"


def _flat_message(lrs: list[float], smoothed: list[float], diverge: float, beyond: str, kept: str) -> str:
    """What a flat curve that did not blow up saw: a loss that never moved, where the sweep may simply have stopped
    below the rates that move it (``beyond``: how to see further), or one that rose without falling first, short
    of ``diverge`` times its minimum (a network with few classes, whose loss starts near ln(classes)): the rates
    that move it were inside the test, and they only made it worse. ``kept``: the rate kept."""
    settled = max(1, len(lrs) // 10)
    start = smoothed[settled]
    above = [v > (1 + FLAT_DROP) * start for v in smoothed]
    if not above[-1]:  # (a rise that does not last to the end is noise: a short sweep's smoothed loss wanders)
        # the figures too: "neither fell nor blew up" alone read as unmoved where the loss ended a few % higher
        return (f"cnnkit: the loss neither fell nor blew up by lr {lrs[-1]:.3g}, where the range test ended: the "
                f"smoothed loss went from {start:.3g} to {smoothed[-1]:.3g} ({smoothed[-1] / start - 1:+.1%}), within "
                f"the {FLAT_DROP:.0%} the test reads as flat; the rates that move it may lie beyond ({beyond}); {kept}")
    rise = next(i for i in range(len(above), 0, -1) if not above[i - 1])  # from here on, above to the end
    peak = max(range(rise, len(smoothed)), key=smoothed.__getitem__)
    return (f"cnnkit: the loss did not fall at any rate of the range test: the smoothed loss stayed near {start:.3g} "
            f"up to lr {lrs[rise - 1]:.3g}, then rose to {smoothed[peak]:.3g} by lr {lrs[peak]:.3g}, so the curve "
            f"cannot rank the rates (the test ran on to lr {lrs[-1]:.3g} because it stops early only once the loss "
            f"passes {diverge:g}x its minimum); {kept}")


def _no_blowup_message(lrs: list[float], smoothed: list[float], low: int, edge: int, diverge: float,
                       beyond: str) -> str:
    """What a test that ended without the loss blowing up (``diverge`` times its smoothed minimum, at ``low``)
    saw: a curve still in its valley at the end (the valley's edge, ``edge``, is the last step), whose minimum
    may lie beyond (``beyond``: how to see), or one that climbed out of it, which is no blow-up by the test's
    measure but is the rise the suggestion reads: with few classes the loss starts near ln(classes) and a
    blown-up network's loss stays within a few times that, short of ``diverge`` times the minimum."""
    settled = max(1, len(lrs) // 10)
    if edge == len(lrs) - 1:
        return f"cnnkit: the loss did not blow up by lr {lrs[-1]:.3g}; the minimum may lie beyond it ({beyond})"
    peak = max(range(low, len(smoothed)), key=smoothed.__getitem__)
    start = smoothed[settled]
    above = f" (above its {start:.3g} at the start)" if smoothed[peak] > start else ""
    return (f"cnnkit: the smoothed loss fell to its minimum {smoothed[low]:.3g} at lr {lrs[low]:.3g}, then rose "
            f"to {smoothed[peak]:.3g} by lr {lrs[peak]:.3g}{above}, so the valley ends inside the test, at lr "
            f"{lrs[edge]:.3g}; the test ran on to lr {lrs[-1]:.3g} because it stops early only once the loss "
            f"passes {diverge:g}x its minimum")


def default_steps(batches: int) -> int:
    """The range test's steps when none are asked for, given the ``batches`` of one pass over the training
    images: DEFAULT_STEPS, or MAX_PASSES passes where that is fewer, but never fewer than MIN_STEPS."""
    return max(MIN_STEPS, min(DEFAULT_STEPS, MAX_PASSES * batches))


def default_smoothing(steps: int) -> float:
    """The moving average's factor per step for a sweep of ``steps``: SMOOTHING, which remembers about 50 steps
    (1 / (1 - 0.98)), a quarter of DEFAULT_STEPS; in a shorter sweep, less, so that it still remembers a quarter
    of the sweep, the same span of learning rates the suggestion's margin was measured with (module doc)."""
    return min(SMOOTHING, 1 - 4 / steps)


def _passes_text(steps: int, batches: int, images: int, given: bool) -> str:
    """In parentheses: what ``steps`` are against the ``batches`` of one pass over the ``images`` training images,
    and why fewer than DEFAULT_STEPS when cnnkit chose fewer (``given``: the caller asked for ``steps``)."""
    passes = f"{steps / batches:.1f} passes over the {images:,} training images"
    if given or steps == DEFAULT_STEPS:
        return f"({passes})"
    floor = f", nor fewer than {MIN_STEPS}, which a readable curve needs" if MAX_PASSES * batches < MIN_STEPS else ""
    return (f"({passes}: not the default {DEFAULT_STEPS} steps, {DEFAULT_STEPS / batches:.1f} passes that would "
            f"mostly measure how well the model memorises them{floor}; --steps N to choose)")


def default_out() -> str:
    """Where ``cnnkit lr-find`` writes without --out: a new ``runs/<timestamp>-lr_find``, beside the training runs
    it advises (``runs/<timestamp>-<model>``). The current folder, the default before, took two files of each test
    among the user's own, and the next test wrote over them."""
    return new_folder_name("lr_find")


def _check_folder(out: str) -> None:
    """Check that the folder ``out`` can take lr_find.png and lr_find.json, before the test's minutes of work.
    It is made when they are written: a test that fails or is interrupted leaves no empty folder."""
    if out.lower().endswith((".png", ".json")):
        raise UserError(f"--out {out}: --out names a folder (as in `cnnkit train`), which receives lr_find.png and "
                        f"lr_find.json; pass --out {os.path.splitext(out)[0] or '.'}")
    try:
        check_writable(os.path.join(out, "lr_find.json"))
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"--out {out}: a file of that name is in the way; pass a folder") from None
    except OSError as e:
        raise UserError(f"cannot write into the folder {out} ({e.strerror}); pass a writable --out") from None


def _endless(loader: BatchLoader):
    """Batches for as long as asked, a new shuffled epoch whenever one runs out."""
    epoch = 1
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def suggest(lrs: list[float], smoothed: list[float], schedule: str, default: float,
            blowup_lr: float | None = None) -> tuple[float, str, int, int]:
    """(suggested rate, method, index of the valley's end, index of the minimum) of a range test's curve, by the
    rules of the module doc. The first tenth of the steps is left out: the moving average has not settled there.
    ``blowup_lr``, the first rate whose loss blew up, caps the suggestion at the same margin below it as the
    valley's edge gets (a third for one-cycle, else a tenth)."""
    settled = max(1, len(lrs) // 10)
    low = min(range(settled, len(smoothed)), key=smoothed.__getitem__)
    edge = _valley_edge(smoothed, low, smoothed[settled])
    margin = _margin(schedule)
    if smoothed[settled] - smoothed[low] < FLAT_DROP * smoothed[settled]:
        suggestion, method = default, FLAT_METHOD
    else:
        suggestion, method = lrs[edge] / margin, EDGE_METHOD if schedule == "onecycle" else TENTH_METHOD
    if blowup_lr is not None and suggestion > blowup_lr / margin:
        suggestion, method = blowup_lr / margin, f"{method}, {BLOWUP_METHOD.format(margin=margin)}"
    return suggestion, method, edge, low


def _margin(schedule: str) -> int:
    """How far below the valley's end (and the blow-up) the suggestion sits: one-cycle's warm-up reaches the peak
    gradually, other schedules start at it."""
    return ONE_CYCLE_MARGIN if schedule == "onecycle" else 10


def _valley_edge(smoothed: list[float], low: int, settled_level: float) -> int:
    """Index of the last step after the minimum at ``low`` before the smoothed loss climbs more than
    EDGE_SHARE of the descent (``settled_level`` - minimum) above the minimum."""
    limit = smoothed[low] + EDGE_SHARE * max(settled_level - smoothed[low], 0.0)
    edge = low
    while edge + 1 < len(smoothed) and smoothed[edge + 1] <= limit:
        edge += 1
    return edge


def _steepest(lrs: list[float], smoothed: list[float], first: int, low: int) -> float:
    """The learning rate where the smoothed loss falls fastest against log(lr), between ``first`` and the
    minimum at ``low``."""
    first = max(first, 1)
    if low - first < 2:
        return lrs[low]
    slopes = [(smoothed[i + 1] - smoothed[i - 1]) / math.log(lrs[i + 1] / lrs[i - 1]) for i in range(first, low)]
    return lrs[first + min(range(len(slopes)), key=slopes.__getitem__)]


def resolve_auto_lr(cfg: TrainConfig, log: IO[str], ctx: "distributed.Dist") -> tuple[TrainConfig, LrFindResult | None]:
    """``cfg`` with ``lr="auto"`` replaced by the range test's suggestion (run by the first process only and
    sent to the others), and the test's result; ``cfg`` unchanged and None for any other ``lr``."""
    if cfg.lr != "auto":
        return cfg, None
    if cfg.stages:
        raise UserError("--lr auto finds one learning rate; with --stages give each stage its rate")
    result = lr_find(dataclasses.replace(cfg, lr=None), log=log, for_train=True) if ctx.main else None
    lr = float(distributed.broadcast_text(repr(result.suggestion) if result else None, ctx))
    print(f"cnnkit: --lr auto: {lr:.3g} (range test: {result.method if result else 'rank 0'})", file=log)
    seed_everything(cfg.seed)  # the test drew from the generators: training starts as it would with --lr {lr}
    return dataclasses.replace(cfg, lr=lr), result


def lr_find_record(result: LrFindResult, folder: str, draw: DrawCurve | None = None) -> dict:
    """The figures for ``lr_find.json``, after ``draw`` has drawn the test's curve into ``folder/lr_find.png``
    (without ``draw`` no picture, and the record's plot is None)."""
    if draw is not None:
        result.plot = draw(result, os.path.join(folder, "lr_find.png"))
    return result.summary()
