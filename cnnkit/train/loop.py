"""The training loop: ``train`` reads top to bottom — set up the run (cnnkit/train/setup.py builds its pieces),
then for each epoch ``train_one_epoch`` and ``evaluate_model``, saving after each, and return the run's results.

``train`` produces a run folder and a TrainResult, nothing else: what shows a run (TensorBoard, the final
test-time augmentation, plots and report.html) is the caller's, handed in as ``Callbacks``; ``cnnkit.train``
(cnnkit/training.py) wires them.

A run can stop at any moment (Ctrl-C, SIGTERM, a killed process) and ``train(resume=RUN_DIR)`` continues it
exactly: the checkpoint holds the optimizer, schedule, every random generator and the position in the
epoch, and each epoch's data order and each batch's augmentation are drawn from seeds, not from history.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator

import torch
import torch.nn as nn

from cnnkit import compiled
from cnnkit.atomic import atomic_path, atomic_write, write_json
from cnnkit.data.checks import TRAINING_PRINTS, save_prints
from cnnkit.data.loader import BatchLoader
from cnnkit.errors import CheckpointError, NonFiniteLoss, TrainingStopped, UserError, warn
from cnnkit.progress import progress_bar
from cnnkit.runs import list_runs, new_folder_name, newest, start_record
from cnnkit.stages import smoke_stages
from cnnkit.threads import ThreadGovernor, default_threads, oversubscribed
from cnnkit.train import distributed
from cnnkit.checkpoint import (
    make_payload, non_finite_tensors, read_payload, remove_stale_temp_files, rng_state, save_checkpoint,
    set_rng_state,
)
from cnnkit.train.config import SESSION_OPTIONS, TrainConfig, TrainResult, check_recorded_paths, recorded
from cnnkit.train.ema import WeightEMA
from cnnkit.train.evaluation import EvalStats, evaluate_model
from cnnkit.train.lr_find import LrFindResult, lr_find_record, resolve_auto_lr
from cnnkit.train.metrics import macro_averages, per_class_metrics, write_epoch_files
from cnnkit.train.mix import Mix
from cnnkit.train.optim import DEFAULT_LR, make_optimizer, make_scheduler
from cnnkit.train.options import MONITORS, make_config, model_options_error
from cnnkit.train.precision import autocast, precision_name
from cnnkit.train.rewrite import PoolReLU, fuse_pool_relu, pool_before_relu, rand_dropout
from cnnkit.train.setup import (
    SMOKE_BATCHES, SMOKE_VAL_IMAGES, Machine, ModelOptionsError, RunPieces, build_run,
    start_machine,
)
from cnnkit.transfer import (
    Stage, check_head_trains, first_epochs, freeze_batchnorm_stats, plan_stages, set_trainable, stage_at,
    trainable_modules,
)

MEMORISED_ACC = 0.99  # --overfit-batches: eval-mode accuracy on its own training images that counts as memorised
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "epoch_time_s",
                  "images_per_s", "grad_norm", "skipped_batches", "val_macro_recall", "val_macro_f1",
                  "ema_val_loss", "ema_val_acc"]
NAN_CHECK_EVERY = 50  # batches between two reads of the running loss sum's finiteness with nan="stop"
# A finite loss can show a run going wrong long before it overflows (``diverging``). The chance level is the
# cross-entropy of a uniform guess, ln(C) nats for C classes, where a fresh network starts. Runs that recovered
# stayed within 3.4x it and grew at most 2.1x from one epoch to the next (the spikes of cnn_bn at rates 0.01-0.05
# on a few hundred or thousand CIFAR images); an overfitting model's validation loss climbs a few percent an epoch.
# Runs that went wrong (resnet18 and cnn_bn at rate 0.05 on 220 CIFAR images, ending at chance accuracy) showed
# 7-33x, or grew 4.7-9.6x: docs/design.md has the figures. Ten times chance also leaves room for an overconfident
# overfitted binary classifier (6.9 nats a validation image on average: most of its answers confidently wrong).
FAR_ABOVE_CHANCE = 10
# Growth alone is no sign: a loss of 0.05 may well double. It counts from twice chance on: worse than guessing.
GROWTH, GROWTH_FROM_CHANCE = 4, 2


@dataclass
class EpochState:
    """Where an epoch stands: the next batch and the running sums (kept on the device until read)."""

    batch: int = 0
    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    seen: int = 0
    grad_norm_sum: torch.Tensor | float = 0.0
    clipped_steps: int = 0
    skipped: int = 0
    seconds: float = 0.0
    lr: float | None = None  # the rate at the epoch's first step: metrics.csv logs it, resumed mid-epoch or not
    # The rate of the run's last optimizer step before batch ``batch`` (this epoch's or an earlier one's; None: no
    # step yet, nan: a step whose rate a checkpoint from before this field did not record): the weights a
    # non-finite loss was computed on came from that step.
    last_step_lr: float | None = None

    def plain(self) -> dict[str, Any]:
        return {k: (v.item() if torch.is_tensor(v) else v) for k, v in dataclasses.asdict(self).items()}


@dataclass
class RunState:
    """Everything about a run's progress that a resumed run needs besides model and optimizer."""

    epoch: int = 1
    best_acc: float = -1.0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0
    images_seen: int = 0
    skipped_batches: int = 0
    best_score: float | None = None  # the monitored metric at best_epoch (best_acc: the val acc there)
    best_ema_score: float | None = None  # the same for the weight EMA (best_ema.pt)
    kept_best: list = field(default_factory=list)  # [score, epoch] of the best-epochNNN.pt files, best first
    stop_best: float | None = None  # early stopping: the monitored metric at its last real improvement
    bad_epochs: int = 0  # early stopping: epochs since then
    stop_reason: str = ""  # set when early stopping ends the run
    # the training loop's wall time (validation and saves included) up to the last checkpoint, over every session
    # of a resumed run: a resumed run's TrainResult.train_time_s goes on from it, as its images/s from train_seconds
    train_time_s: float = 0.0
    # The warnings and thread-count changes (ThreadChange's fields) of the sessions before this one, up to the
    # checkpoint it resumed from: a resumed run's result.json holds them with this session's (``_run_warnings``).
    # The data's warnings come in the first session alone (a resumed run's data are checked to be the same), and
    # a result that lost them on resuming read as a run on clean data.
    warnings: list[str] = field(default_factory=list)
    thread_changes: list[dict] = field(default_factory=list)


@dataclass
class Plan:
    """What trains when: one stage, or a staged schedule (head first, then deeper layers at a lower rate)."""

    lr: float  # the peak rate of a one-stage run (config.json records it)
    stages: list[Stage]
    first_epochs: list[int]  # each stage's first epoch
    total_epochs: int
    steps_per_epoch: int  # optimizer steps: the schedule counts these


@dataclass
class Stepper:
    """What the training step updates in the current stage: the network it runs, its optimizer and schedule."""

    index: int  # the stage's
    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


@dataclass
class EpochFigures:
    """The last finished epoch's training and validation figures."""

    train_loss: float
    train_acc: float
    val: EvalStats
    ema_val: EvalStats | None


@dataclass
class Training:
    """A run under way: its configuration and pieces, where it writes, and how far it has come."""

    cfg: TrainConfig
    machine: Machine
    ctx: distributed.Dist
    log: IO[str]
    pieces: RunPieces
    plan: Plan
    step_model: nn.Module  # ``model`` rewritten for the training step (shares its parameters)
    ema: WeightEMA | None
    lr_search: LrFindResult | None  # --lr auto's range test
    stage_log: list[dict] = field(default_factory=list)
    stage: Stepper | None = None
    run_dir: str = ""
    state: RunState = field(default_factory=RunState)
    epoch_state: EpochState = field(default_factory=EpochState)
    epoch: int = 1  # the epoch under way
    last: EpochFigures | None = None
    # (loss, rate) of the epoch's steps not yet in steps.csv
    step_losses: list[tuple[torch.Tensor, float]] = field(default_factory=list)
    governor: ThreadGovernor | None = None  # the CPU thread count, where cnnkit chooses it
    clock: tuple[float, float] = (0.0, 0.0)  # (perf_counter at this session's training start, state.train_time_s then)
    warnings: list[str] = field(default_factory=list)  # this session's, as its log shows them (``_run_warnings``)

    def train_time_s(self) -> float:
        """The run's training time so far: the sessions before this one and this one."""
        start, before = self.clock
        return before + time.perf_counter() - start

    @property
    def model(self) -> nn.Module:
        return self.pieces.model


class Callbacks:
    """The caller's steps around a run; here each does nothing. ``cnnkit.train`` (cnnkit/training.py) hands in
    the ones that show a run: TensorBoard, the final test-time augmentation, plots and report.html."""

    def check(self, cfg: TrainConfig) -> None:
        """Before anything is loaded: refuse what these steps cannot do (a UserError)."""

    def plot_lr_find(self, result: LrFindResult, path: str) -> str | None:
        """Draw --lr auto's range test into ``path``; its path, or None for no picture."""
        return None

    def on_start(self, run: Training) -> None:
        """The run folder holds config.json and stages.json; the first epoch is next."""

    def on_epoch(self, run: Training, row: dict[str, Any], val: EvalStats) -> None:
        """An epoch's figures (a metrics.csv row) and its validation, right after metrics.csv got the row."""

    def on_end(self, run: Training) -> dict[str, Any]:
        """After the last epoch, before result.json: TrainResult fields these steps measured."""
        return {}


def train(config: TrainConfig | str | None = None, log: IO[str] | None = None, resume: str | None = None,
          callbacks: Callbacks | None = None, **overrides) -> TrainResult:
    """Train a model as ``config`` (or keyword overrides of the defaults) says; returns the run's results.

    ``config`` may be a YAML or JSON file of TrainConfig fields (a run folder's ``config.json`` replays that run);
    options merge as cnnkit/train/options.py says. ``resume=RUN_DIR`` continues an interrupted run from its
    ``last.pt`` with the run's own configuration. ``callbacks``: the caller's steps (see ``Callbacks``); the
    options ``tta``, ``plots``, ``report`` and ``tensorboard`` are theirs. Example, with them:
    ``cnnkit.train(model="simple_cnn", data="cifar10", epochs=15)``.
    """
    wall_start = time.perf_counter()
    callbacks = callbacks or Callbacks()
    # The signals are caught from the start: before, Ctrl-C during the start-up (reading and decoding the data,
    # building the model, --lr auto's range test) ended in a bare KeyboardInterrupt, SIGTERM killed the process
    # without a word, and a run started ignoring SIGINT (`cnnkit train ... &` in a script) ignored it until the
    # loop's handler, then stopped on it.
    with StopSignals() as stop:
        with stop.at_once(functools.partial(_stopped_starting, resume=resume)):  # nothing written that a stop keeps
            saved = _resume_payload(resume) if resume else None
            if saved:
                cfg = resumed_config(saved, overrides)
            else:
                cfg = make_config(config, overrides)
            callbacks.check(cfg)
            try:
                t = _set_up(cfg, log or sys.stdout, saved)
            except ModelOptionsError as e:
                raise model_options_error(e, None if saved else config, overrides) from None
            set_by_stages = [n for n in ("epochs", "lr") if cfg.stages and not saved and overrides.get(n) is not None]
            if set_by_stages:  # not an error: a run's config.json, replayed with --config, records both beside them
                print(f"cnnkit: note: --stages sets each stage's epochs and learning rate; "
                      f"{' and '.join('--' + n for n in set_by_stages)} {'are' if len(set_by_stages) > 1 else 'is'} "
                      "not used", file=t.log)
        with _stopped_twice(t):
            # Every process waits here for the others' start-up, which a signal ends at once, before any of them
            # writes the run folder: from here on a signal stops them all after the same step (one that had ended
            # at once while the others went on left them to fail in their next collective, "Connection reset by
            # peer").
            distributed.barrier(t.ctx)
            _open_run_folder(t, saved, resume, callbacks)
            callbacks.on_start(t)
            start = time.perf_counter()
            t.clock = (start, t.state.train_time_s)
            with _divergence(t, start, wall_start):
                for epoch in range(t.state.epoch, t.plan.total_epochs + 1):
                    t.epoch = epoch
                    _train_epoch(t, stop)
                    _check_epoch_weights(t, "this epoch was neither validated nor saved")
                    row = _validate(t, callbacks)
                    _save_epoch(t, row)
                    if t.state.stop_reason:
                        if not _all_memorised(t):  # --overfit-batches' verdict says why, once the run is done
                            print(f"cnnkit: {t.state.stop_reason}; best {t.cfg.monitor} {t.state.best_score:.4g} "
                                  f"at epoch {t.state.best_epoch}", file=t.log)
                        break
        return _finish(t, callbacks, stop, wall_start)


CUDNN_AUTOTUNE_MIN_BATCHES = 5000  # training batches from which a run lets cuDNN time its algorithms


def _set_up(cfg: TrainConfig, log: IO[str], saved: dict[str, Any] | None) -> Training:
    """Everything a run needs before its run folder: the machine, the rate (--lr auto), the pieces, the plan
    of stages, the rewritten step model and the first stage's optimizer."""
    machine = start_machine(cfg)
    ctx = distributed.setup(machine.device)  # one process, or one of torchrun's: only rank 0 prints and writes
    if not ctx.main:
        log = open(os.devnull, "w", errors="ignore")
    cfg, lr_search = resolve_auto_lr(cfg, log, ctx)  # --lr auto: the range test's suggestion, before anything else
    pieces = build_run(cfg, machine, log, ctx, saved)
    if cfg.decode == "auto" and pieces.train_set.images is None:
        # The decoding path decides the augmentation of a streamed set (random resized crops on the device,
        # padded crops after CPU decoding): the run records the path it took, so that a resumed or replayed run
        # on another machine trains the same way.
        cfg = dataclasses.replace(cfg, decode="device" if pieces.train_loader.decode_on_device else "cpu")
    ema = WeightEMA(pieces.model, cfg.ema) if cfg.ema else None  # the moving average of the weights, beside them
    plan = _plan(cfg, len(pieces.train_loader))
    for stage in plan.stages:  # a misspelt module of a later stage fails now, not after the earlier ones trained
        trainable_modules(pieces.model, stage.modules)
    if machine.device.type == "cuda" and plan.total_epochs * len(pieces.train_loader) >= CUDNN_AUTOTUNE_MIN_BATCHES:
        # Every batch has the same shapes, so cuDNN may time its algorithms once and keep the fastest (timm's
        # setting). The timing takes about a second per run, and on the fast recipe it bought nothing (docs/design.md):
        # only long runs, where a better kernel could repay it, ask for it. Not bit-reproducible either way.
        torch.backends.cudnn.benchmark = True
    step_model = _step_model(pieces.model, cfg, machine.device, pieces.train_loader, plan.total_epochs)
    t = Training(cfg, machine, ctx, log, pieces, plan, step_model, ema, lr_search, warnings=list(pieces.warnings))
    if machine.device.type == "cpu" and ctx.world == 1 and default_threads(cfg.threads) and machine.threads > 1:
        # Other processes may compute on the same cores, and then fewer threads can be many times faster: with
        # the default count, training chooses it from the time its batches take (cnnkit/threads.py).
        t.governor = ThreadGovernor(machine.threads)
    next_epoch = saved["resume"]["run"]["epoch"] if saved else 1
    first = stage_at(plan.stages, next_epoch)
    check_head_trains(pieces.model, plan.stages[first], f"stage {first + 1} of --stages" if cfg.stages else
                      "--freeze backbone" if cfg.freeze else f"--unfreeze {cfg.unfreeze}")
    for index in range(first):  # a run resumed in a later stage: stages.json keeps the stages it trained before
        t.stage_log.append(_stage_record(t, index, set_trainable(t.model, plan.stages[index].modules)))
    t.stage = _start_stage(t, first)
    return t


def _plan(cfg: TrainConfig, batches_per_epoch: int) -> Plan:
    """The run's stages (a smoke run's cut short) and the epochs and optimizer steps they take."""
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.optimizer, 0.01)
    stages = plan_stages(cfg.stages, cfg.freeze, cfg.unfreeze, cfg.epochs, lr)
    if cfg.smoke:
        stages = smoke_stages(stages)
    return Plan(lr, stages, first_epochs(stages), sum(stage.epochs for stage in stages),
                -(-batches_per_epoch // cfg.accum_steps))


def _step_model(model: nn.Module, cfg: TrainConfig, device: torch.device, train_loader: BatchLoader,
                total_epochs: int) -> nn.Module:
    """The model the training step runs: ``model`` rewritten (cnnkit/train/rewrite.py: the same function and
    gradients up to dropout's draws, less work), sharing its parameters; checkpoints and evaluation use
    ``model``. ReLUs go after their max-pools and, in runs long enough to repay compiling, each such pair is
    fused into one compiled loop; with --compile, the whole rewritten model is compiled instead. On a CPU
    dropout draws its masks with torch.rand. Why each pays: docs/design.md."""
    step_model = pool_before_relu(model)
    if device.type == "cpu":
        step_model = rand_dropout(step_model)
    if cfg.compile:
        return torch.compile(step_model, mode=None if cfg.compile is True else cfg.compile)
    step_model = fuse_pool_relu(step_model, batches=total_epochs * len(train_loader))
    # The batch's crop, flip and normalisation in one compiled loop, where that pays (cnnkit/compiled.py):
    # cheap to compile beside the pools, whose compiling loads torch.compile anyway; alone, in long runs only.
    pools_fused = any(isinstance(m, PoolReLU) for m in step_model.modules())
    train_loader.fused = total_epochs * len(train_loader) >= (
        compiled.MIN_BATCHES if pools_fused else compiled.MIN_BATCHES_ALONE)
    return step_model


def _start_stage(t: Training, index: int) -> Stepper:
    """Stage ``index``'s trainable modules, optimizer and schedule (logged in ``t.stage_log``)."""
    cfg, stage = t.cfg, t.plan.stages[index]
    trainable = set_trainable(t.model, stage.modules)
    # Across processes, DistributedDataParallel averages the gradients; it is rebuilt per stage because it
    # registers the parameters that require gradients when it is made.
    net = torch.nn.parallel.DistributedDataParallel(t.step_model) if t.ctx.world > 1 else t.step_model
    optimizer = make_optimizer(t.model, cfg.optimizer, stage.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov,
                               backbone_lr=cfg.lr_backbone, batch_size=cfg.batch_size)
    scheduler = make_scheduler(optimizer, cfg.schedule, stage.epochs * t.plan.steps_per_epoch,
                               int(cfg.warmup_epochs * t.plan.steps_per_epoch))
    t.stage_log.append(_stage_record(t, index, trainable))
    return Stepper(index, net, optimizer, scheduler)


def _stage_record(t: Training, index: int, trainable: list[str]) -> dict[str, Any]:
    """Stage ``index`` as stages.json records it: its modules, epochs, rates and the parameters it trains."""
    stage = t.plan.stages[index]
    return {"stage": index + 1, "first_epoch": t.plan.first_epochs[index], "modules": stage.modules or ["all"],
            "epochs": stage.epochs, "lr": stage.lr, "lr_backbone": t.cfg.lr_backbone, "trainable_params": trainable}


def _open_run_folder(t: Training, saved: dict[str, Any] | None, resume: str | None, callbacks: Callbacks) -> None:
    """The run folder, made only now that every input has been checked, with the run's configuration; or the
    resumed run's, with the model, optimizer, generators and progress restored from its last.pt."""
    cfg, p, log = t.cfg, t.pieces, t.log
    if saved:
        _restore(t, saved, resume)
    else:
        t.run_dir = distributed.broadcast_text(make_run_dir(cfg) if t.ctx.main else None, t.ctx)
        # the start time in a file of its own: config.json stays a replayable --config file, and a file's time
        # changes when the folder is copied. Written first, so that a run folder (config.json) always has it.
        _write_json(t.run_dir, "run.json", start_record())
        # threads as asked (None: this machine's default), so that a replayed config fits the machine it runs on;
        # the count used is in the run's header and its result.
        _write_json(t.run_dir, "config.json", {**recorded(cfg), "out": t.run_dir, "lr": t.plan.lr})
        if t.lr_search:  # beside config.json, which stays a replayable --config file
            _write_json(t.run_dir, "lr_find.json", lr_find_record(t.lr_search, t.run_dir, callbacks.plot_lr_find))
        if p.train_prints is not None:
            save_prints(p.train_prints, os.path.join(t.run_dir, TRAINING_PRINTS))
        if p.loss_weights is not None:
            counts = torch.bincount(p.train_set.labels, minlength=len(p.classes)).tolist()
            _write_json(t.run_dir, "class_weights.json",
                        {"classes": p.classes, "weights": p.loss_weights, "counts": counts})
    skipped_images = p.train_set.skipped + p.val_set.skipped
    if skipped_images and t.ctx.main:
        with open(os.path.join(t.run_dir, "bad_images.txt"), "w") as f:
            f.write("\n".join(skipped_images) + "\n")
        warn(log, t.warnings, f"skipped {len(skipped_images)} broken image(s), listed in "
             f"{os.path.join(t.run_dir, 'bad_images.txt')}")
    params = sum(w.numel() for w in t.model.parameters())
    trainable = _trainable_count(t.model)  # the current stage's
    threads = t.machine.threads
    processes = f"{t.ctx.world} processes x " if t.ctx.world > 1 else ""
    print(f"cnnkit: {cfg.model} ({params:,} parameters{f', {trainable:,} trainable' if trainable < params else ''}) "
          f"on {len(p.train_set):,} training and {len(p.val_set):,} "
          f"validation images of {p.train_set.channels}x{p.train_set.size}x{p.train_set.size} from {cfg.data}; "
          f"{t.machine.device.type}, {precision_name(t.machine.amp_dtype)}, {processes}{threads} CPU "
          f"thread{'s' if threads > 1 else ''}{_streaming(t)}; run folder {t.run_dir}", file=log)
    if t.machine.device.type == "cpu" and (too_many := oversubscribed(cfg.threads)):
        warn(log, t.warnings, too_many)
    if cfg.smoke:
        print(f"cnnkit: smoke run: {t.plan.total_epochs} epoch(s) of at most {SMOKE_BATCHES} batches, validation on "
              f"at most {SMOKE_VAL_IMAGES} images; it checks that this command line runs, not how well the model "
              "learns", file=log)
    steps = t.plan.total_epochs * t.plan.steps_per_epoch
    if t.ema is not None and steps * (1 - cfg.ema) < 1:
        print(f"cnnkit: note: --ema {cfg.ema} averages over about {1 / (1 - cfg.ema):,.0f} steps but the run has "
              f"{steps}; the average stays close to the first weights (try a lower decay)", file=log)
    if saved and len(t.plan.stages) > 1:  # as the run said where it entered this stage, said before the epoch
        _announce_stage(t)
    _write_metrics(t.run_dir, t.state.history)
    _write_json(t.run_dir, "stages.json", t.stage_log)  # which parameters train in which stage


def _streaming(t: Training) -> str:
    """For the header: how a set too large for memory is decoded ("" for one in memory)."""
    loader = t.pieces.train_loader
    if t.pieces.train_set.images is not None:
        return ""
    if loader.decode_on_device:
        return f"; JPEGs streamed and decoded on the {t.machine.device.type}"
    if loader.workers == 0:
        return "; images streamed and decoded in this process"
    return f"; images streamed and decoded by {loader.workers} loader process{'es' if loader.workers != 1 else ''}"


def _restore(t: Training, saved: dict[str, Any], run_dir: str) -> None:
    """Continue the run in ``run_dir`` from its last.pt (``saved``)."""
    t.run_dir = run_dir
    for stale in remove_stale_temp_files(run_dir):
        print(f"cnnkit: removed {stale}, left by an interrupted checkpoint write", file=t.log)
    if t.ctx.main and os.path.exists(os.path.join(run_dir, "stop.json")):  # it runs again: no longer diverged
        os.unlink(os.path.join(run_dir, "stop.json"))
        if os.path.exists(os.path.join(run_dir, "result.json")):  # the diverged run's: the run writes its own
            os.unlink(os.path.join(run_dir, "result.json"))
    t.model.load_state_dict(saved["state_dict"])
    state = saved["resume"]
    if state["stage"] == t.stage.index:  # else the run stopped at a stage boundary: the new stage starts fresh
        t.stage.optimizer.load_state_dict(state["optimizer"])
        t.stage.scheduler.load_state_dict(state["scheduler"])
    t.pieces.scaler.load_state_dict(state["scaler"])
    t.state = run = RunState(**state["run"])
    t.epoch_state = EpochState(**{"last_step_lr": math.nan, **state["epoch_state"]})  # nan: an older last.pt's
    set_rng_state(state["rng"])
    if t.ema is not None:
        t.ema.load_state_dict(state["ema"])
    further = (f"; to train it further, start a new run from its weights: cnnkit train --config "
               f"{os.path.join(run_dir, 'config.json')} --weights {os.path.join(run_dir, 'last.pt')} --epochs N "
               "--out NEW_DIR")
    if run.stop_reason:
        raise UserError(f"{run_dir} ended by early stopping ({run.stop_reason}); there is nothing to resume{further}")
    if run.epoch > t.plan.total_epochs:
        epochs = f"all {t.plan.total_epochs} epochs" if t.plan.total_epochs > 1 else "its 1 epoch"
        raise UserError(f"{run_dir} finished {epochs} already; there is nothing to resume"
                        f"{further}")
    if run.best_score is None and run.best_epoch and t.cfg.monitor == "val_acc":  # a run saved before --monitor
        run.best_score = run.stop_best = run.best_acc
    if t.ctx.main:
        _prune_best_files(run_dir, run.kept_best)  # a crash between two writes may have left one too many
        _drop_steps_after(run_dir, run.epoch, t.epoch_state.batch)
    before = saved["config"].get("threads")
    threads = (f" with --threads {t.cfg.threads} (before: {before or 'the default'})"
               if t.cfg.threads != before else "")
    # The batches done, not the one to run next: "at epoch 2, batch 4" read as if batch 4 ran again.
    done = t.epoch_state.batch
    where = f"after batch {done} of epoch {run.epoch}" if done else f"at the start of epoch {run.epoch}"
    print(f"cnnkit: resuming {run_dir} {where}{threads}", file=t.log)


def _train_epoch(t: Training, stop: "StopSignals") -> None:
    """Epoch ``t.epoch``'s training steps (a resumed epoch from where it stopped); a caught signal saves the
    state and ends the run."""
    cfg, epoch, total = t.cfg, t.epoch, t.plan.total_epochs
    if t.stage.index + 1 < len(t.plan.stages) and epoch == t.plan.first_epochs[t.stage.index + 1]:
        t.stage = _start_stage(t, t.stage.index + 1)
        _write_json(t.run_dir, "stages.json", t.stage_log)
        _announce_stage(t)
    t.pieces.train_loader.set_epoch(epoch)
    if t.epoch_state.lr is None:
        t.epoch_state.lr = t.stage.optimizer.param_groups[0]["lr"]
    step_losses = t.step_losses  # emptied by each write to steps.csv
    changes = len(t.governor.changes) if t.governor else 0
    t.epoch_state = train_one_epoch(
        t.stage.net, t.pieces.train_loader, t.stage.optimizer, t.stage.scheduler, t.pieces.scaler, t.pieces.criterion,
        t.machine.device, t.machine.amp_dtype, t.epoch_state, clip_grad=cfg.clip_grad, nan=cfg.nan,
        desc=f"epoch {epoch}/{total}", progress=cfg.progress and t.ctx.main, stop=stop, save_every=cfg.save_every,
        save=functools.partial(_save_within_epoch, t, step_losses), step_losses=step_losses,
        mix=t.pieces.mix if epoch <= total - cfg.mix_off_epochs else None, accum_steps=cfg.accum_steps, ema=t.ema,
        governor=t.governor, epoch=epoch,
    )
    if t.governor:
        t.governor.finish()  # validation and what follows run at the count chosen, not at one being tried
    for change in t.governor.changes[changes:] if t.governor else []:  # here, not under the epoch's progress bar
        print(f"cnnkit: note: epoch {epoch}: {change.note()}", file=t.log)
    # here, not under the epoch's progress bar; once a run, in each run of the process that ran without the loops
    if (failed := compiled.failure_warning()) and failed not in t.warnings:
        warn(t.log, t.warnings, failed)
    _write_step_losses(t.run_dir, epoch, t.epoch_state.batch, step_losses)
    # Decided by all processes together: a signal that reached one after the epoch's last step, and another not
    # yet, would send one to save and the other to validate, each waiting in a different collective.
    if _any_process_stopping(stop):
        last_path = _save(t, _checkpoint(t, t.epoch_state, epoch), "last.pt")
        stopped = TrainingStopped(f"{stop.signal} at epoch {epoch}, batch {t.epoch_state.batch}; saved "
                                  f"{last_path}. Continue with: {_resume_command(t)}")
        stopped.exit_code = 128 + getattr(signal, stop.signal)  # 130 for Ctrl-C, 143 for SIGTERM
        raise stopped


def _announce_stage(t: Training) -> None:
    """The line that says which stage trains now: where a staged run enters a stage, and where one resumes."""
    index = t.stage.index
    stage = t.plan.stages[index]
    print(f"cnnkit: stage {index + 1} of {len(t.plan.stages)} from epoch {t.plan.first_epochs[index]}: training "
          f"{', '.join(stage.modules or ['all'])} ({_trainable_count(t.model):,} parameters) at lr {stage.lr:g} for "
          f"{stage.epochs} epoch(s)", file=t.log)


def _trainable_count(model: nn.Module) -> int:
    """The parameters the current stage trains."""
    return sum(w.numel() for w in model.parameters() if w.requires_grad)


def _resume_command(t: Training) -> str:
    """The command that continues run ``t`` exactly: with as many processes as it had (its data shards and
    batches per step depend on them)."""
    command = f"cnnkit train --resume {t.run_dir}"
    if t.ctx.world == 1:
        return command
    if int(os.environ.get("LOCAL_WORLD_SIZE", t.ctx.world)) == t.ctx.world:  # one machine: cnnkit starts them
        return f"{command} --nproc {t.ctx.world}"
    return f"{command}, under torchrun as before ({t.ctx.world} processes)"


def _validate(t: Training, callbacks: Callbacks) -> dict[str, Any]:
    """The epoch's figures: training sums, validation (and the EMA's); logged to metrics.csv, the epoch files
    and the console. Returns the metrics.csv row."""
    p, es, run, device, amp = t.pieces, t.epoch_state, t.state, t.machine.device, t.machine.amp_dtype
    if t.ctx.world > 1:  # every process saw its share: the epoch's figures are the sums over processes
        sums = distributed.all_reduce_sum(torch.tensor([es.loss_sum, es.correct, es.seen], dtype=torch.float64))
        es.loss_sum, es.correct, es.seen = sums[0].item(), sums[1].item(), int(sums[2])
    train_loss, train_acc = es.loss_sum / max(es.seen, 1), es.correct / max(es.seen, 1)
    run.train_seconds += es.seconds
    run.images_seen += es.seen
    run.skipped_batches += es.skipped
    distributed.broadcast_buffers(t.model, t.ctx)  # every process scores its share with the model rank 0 saves
    if t.ema:
        distributed.broadcast_buffers(t.ema.module, t.ctx)
    val = evaluate_model(t.model, p.val_loader, len(p.classes), device, amp)
    if not math.isfinite(val.loss):  # --nan skip trains on past a blow-up: such weights are no result
        largest = max(w.detach().abs().max().item() for w in t.model.parameters())
        skipped_all = "" if es.seen else "; every batch was skipped"
        raise NonFiniteLoss(f"the model's outputs on the validation images are no longer finite (its largest "
                            f"weight is {largest:.3g}{skipped_all}); lower --lr or add --clip-grad 1.0")
    ema_val = evaluate_model(t.ema.module, p.val_loader, len(p.classes), device, amp) if t.ema else None
    t.last = EpochFigures(train_loss, train_acc, val, ema_val)
    per_class = per_class_metrics(val.confusion, p.classes)
    macro = macro_averages(val.confusion, per_class)
    row = {"epoch": t.epoch, "lr": es.lr, "train_loss": train_loss, "train_acc": train_acc,
           "val_loss": val.loss, "val_acc": val.acc, "val_top5": "" if val.top5 is None else val.top5,
           "epoch_time_s": es.seconds, "images_per_s": es.seen / es.seconds,
           "grad_norm": es.grad_norm_sum / es.clipped_steps if es.clipped_steps else "",
           "skipped_batches": es.skipped,
           "val_macro_recall": macro["macro_recall"], "val_macro_f1": macro["macro_f1"],
           "ema_val_loss": ema_val.loss if ema_val else "", "ema_val_acc": ema_val.acc if ema_val else ""}
    run.history.append(row)
    _write_metrics(t.run_dir, run.history)
    callbacks.on_epoch(t, row, val)
    if t.ctx.main:
        write_epoch_files(t.run_dir, t.epoch, val.confusion, p.classes, per_class)
    print(f"epoch {t.epoch}/{t.plan.total_epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
          f"val loss {val.loss:.4f} acc {val.acc:.4f}" + (f"  ema acc {ema_val.acc:.4f}" if ema_val else "")
          + f"  {row['images_per_s']:,.0f} images/s", file=t.log)
    _warn_diverging(t)
    return row


def diverging(history: list[dict[str, Any]], num_classes: int) -> str | None:
    """Why the last epoch of ``history`` (metrics.csv rows) shows training gone badly wrong, or None: its training
    or validation loss more than FAR_ABOVE_CHANCE times the chance level ln(``num_classes``), or more than GROWTH
    times the epoch before's and over GROWTH_FROM_CHANCE times chance. A loss that is no longer finite is the same
    failure gone further: ``_validate`` and ``train_one_epoch`` stop the run on it (NonFiniteLoss); this warns of
    finite ones, while the run goes on."""
    chance = math.log(max(num_classes, 2))
    last, before = history[-1], history[-2] if len(history) > 1 else {}
    for key, what in (("val_loss", "validation loss"), ("train_loss", "training loss")):
        loss, previous = last.get(key), before.get(key)
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            continue
        said = f"{what} {loss:.4g} is {_times(loss / chance)} the chance level ln({num_classes}) = {chance:.2f}"
        if loss > FAR_ABOVE_CHANCE * chance:
            return said
        if isinstance(previous, (int, float)) and 0 < previous and loss > GROWTH * previous and \
                loss > GROWTH_FROM_CHANCE * chance:
            return f"{said} and {_times(loss / previous)} epoch {before['epoch']}'s {previous:.4g}"
    return None


def _times(ratio: float) -> str:
    return f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x" if ratio < 1000 else "over 1,000x"


def _warn_diverging(t: Training) -> None:
    """One warning, once a run (its sessions before a resume included), where its losses show it diverging
    (``diverging``): the rate is the first suspect."""
    if any(w.startswith("training is diverging") for w in _run_warnings(t)):
        return
    trouble = diverging(t.state.history, len(t.pieces.classes))
    if trouble is None:
        return
    lr = t.plan.stages[t.stage.index].lr
    if t.lr_search is not None:
        fix = f"the learning rate {lr:.3g}, from --lr auto, is likely too high: pass a lower fixed --lr"
    elif t.cfg.stages:
        fix = f"stage {t.stage.index + 1}'s learning rate {lr:g} is likely too high: lower it in --stages"
    else:
        fix = (f"the learning rate {lr:g} is likely too high: lower --lr, e.g. to {lr / 10:g} (a tenth), or let "
               "`cnnkit lr-find` suggest one (--lr auto)")
    warn(t.log, t.warnings, f"training is diverging at epoch {t.epoch}: {trouble}; {fix}")


def _save_epoch(t: Training, row: dict[str, Any]) -> None:
    """The checkpoints after an epoch (best.pt, best-epochNNN.pt, the EMA's, last.pt) and early stopping's count."""
    cfg, run, epoch = t.cfg, t.state, t.epoch
    # One scan for all of the epoch's files, which hold these same weights (the model's and the EMA's; last.pt
    # both), made here rather than trusted from before validation: the epoch's callbacks ran since.
    _check_epoch_weights(t, "this epoch's checkpoints were not written")
    # best.pt, best-epochNNN.pt and best_ema.pt are written before last.pt: a crash in between replays
    # this epoch on resume, which writes them again.
    score = row[cfg.monitor]
    if run.best_score is None or _better(score, run.best_score, cfg.monitor):
        _save(t, _weights(t, t.model, epoch), "best.pt", checked=True)
        run.best_score, run.best_acc, run.best_epoch = score, row["val_acc"], epoch
    if cfg.keep_best and _ranks_in(score, run.kept_best, cfg.keep_best, cfg.monitor):
        _save(t, _weights(t, t.model, epoch), _best_file(epoch), checked=True)
        run.kept_best = sorted(run.kept_best + [[score, epoch]],
                               key=lambda k: (-MONITORS[cfg.monitor] * k[0], k[1]))[: cfg.keep_best]
    if t.ema is not None:
        _save(t, _weights(t, t.ema.module, epoch), "last_ema.pt", checked=True)
        ema_score = row["ema_" + cfg.monitor]
        if run.best_ema_score is None or _better(ema_score, run.best_ema_score, cfg.monitor):
            run.best_ema_score = ema_score
            _save(t, _weights(t, t.ema.module, epoch), "best_ema.pt", checked=True)
    # Early stopping: patience counts epochs since the monitored metric last improved by more than min_delta.
    if run.stop_best is None or _better(score, run.stop_best, cfg.monitor, cfg.min_delta):
        run.stop_best, run.bad_epochs = score, 0
    else:
        run.bad_epochs += 1
    if _all_memorised(t) and epoch < t.plan.total_epochs:  # --overfit-batches has shown what it is for
        run.stop_reason = f"memorised the {_batches(_overfit_batches(t))} at epoch {epoch}"
    elif cfg.early_stop and run.bad_epochs >= cfg.early_stop and epoch < t.plan.total_epochs:
        run.stop_reason = (f"early stop after epoch {epoch}: {cfg.monitor} has not improved on "
                           f"{run.stop_best:.4g} by more than {cfg.min_delta:g} for {run.bad_epochs} epochs")
    next_epoch = EpochState(last_step_lr=t.epoch_state.last_step_lr)  # the next epoch's first loss follows that step
    _save(t, _checkpoint(t, next_epoch, epoch + 1), "last.pt", checked=True)
    if t.ctx.main:
        _prune_best_files(t.run_dir, run.kept_best)
    t.epoch_state = next_epoch


def _finish(t: Training, callbacks: Callbacks, stop: "StopSignals", wall_start: float) -> TrainResult:
    """The caller's final measurements, the overfit verdict and result.json; the run's TrainResult. A signal
    after the last epoch's stop check ends the measurements (--tta's) or skips them, and result.json holds the
    finished run without them: before, Ctrl-C during them left the trained run without a result.json, listed as
    stopped, with nothing to resume, and one during the last validation was ignored."""
    cfg, p, last = t.cfg, t.pieces, t.last
    try:
        with stop.at_once(lambda name: f"{name} after the last epoch; {os.path.join(t.run_dir, 'result.json')} "
                                       "holds the finished run, without the final measurements"):
            if stop.signal:  # it came during the last epoch's validation or save
                raise _Signalled(stop.signal)
            measured = callbacks.on_end(t)
    except TrainingStopped as stopped:
        stopped.result = _result(t, wall_start, t.state.stop_reason or "completed")
        _write_json(t.run_dir, "result.json", dataclasses.asdict(stopped.result))
        raise
    if cfg.overfit_batches:
        print(overfit_verdict(last.val.acc, last.val.loss, len(p.val_set), _overfit_batches(t), t.epoch,
                              t.plan.total_epochs, cfg.overfit_batches), file=t.log)
    result = _result(t, wall_start, t.state.stop_reason or "completed", **measured)
    _write_json(t.run_dir, "result.json", dataclasses.asdict(result))
    distributed.cleanup(t.ctx)
    return result


def _result(t: Training, wall_start: float, stop_reason: str, **measured: Any) -> TrainResult:
    """The run's TrainResult: the figures of its last finished epoch, from its metrics.csv row, which a resumed
    run holds too (None where no epoch finished, as in a run that diverged in its first)."""
    cfg, p, run = t.cfg, t.pieces, t.state
    row = run.history[-1] if run.history else {}

    def figure(name: str) -> float | None:
        return None if row.get(name, "") == "" else row[name]

    return TrainResult(
        val_acc=figure("val_acc"), val_loss=figure("val_loss"),
        best_val_acc=run.best_acc if run.best_epoch else None, best_epoch=run.best_epoch,
        epochs=t.plan.total_epochs, train_acc=figure("train_acc"), train_loss=figure("train_loss"),
        train_time_s=t.train_time_s(),
        images_per_s=run.images_seen / max(run.train_seconds, 1e-9) if run.history else None,
        run_dir=t.run_dir, model=cfg.model, data=cfg.data, precision=precision_name(t.machine.amp_dtype),
        num_train=len(p.train_set), num_val=len(p.val_set), params=sum(w.numel() for w in t.model.parameters()),
        skipped_images=len(p.train_set.skipped + p.val_set.skipped), skipped_batches=run.skipped_batches,
        wall_time_s=time.perf_counter() - wall_start, epochs_run=len(run.history),
        stop_reason=stop_reason, monitor=cfg.monitor, best_score=run.best_score,
        ema_val_acc=figure("ema_val_acc"), threads=t.machine.threads,
        thread_changes=_run_thread_changes(t), warnings=_run_warnings(t), **measured,
    )


def _run_warnings(t: Training) -> list[str]:
    """The run's warnings: its earlier sessions' (from last.pt), then this session's, each once."""
    return list(dict.fromkeys(t.state.warnings + t.warnings))


def _run_thread_changes(t: Training) -> list[dict]:
    """The run's changes of the thread count: its earlier sessions' (from last.pt), then this session's."""
    return t.state.thread_changes + ([dataclasses.asdict(c) for c in t.governor.changes] if t.governor else [])


def _weights(t: Training, net: nn.Module, epoch: int) -> dict[str, Any]:
    """A checkpoint of ``net`` that rebuilds the model and its preprocessing (no training state)."""
    p = t.pieces
    return make_payload(net, p.classes, p.train_set.size, p.train_set.channels, p.mean, p.std, epoch=epoch,
                        metrics=t.state.history[-1] if t.state.history else {}, config=recorded(t.cfg))


def _checkpoint(t: Training, epoch_state: EpochState, next_epoch: int) -> dict[str, Any]:
    """The resumable state, as it stands after the last finished step."""
    t.state.epoch = next_epoch
    t.state.train_time_s = t.train_time_s()
    return {**_weights(t, t.model, next_epoch - 1),
            "resume": {"stage": t.stage.index, "optimizer": t.stage.optimizer.state_dict(),
                       "scheduler": t.stage.scheduler.state_dict(), "scaler": t.pieces.scaler.state_dict(),
                       "rng": rng_state(), "epoch_state": epoch_state.plain(),
                       "run": {**dataclasses.asdict(t.state), "warnings": _run_warnings(t),
                               "thread_changes": _run_thread_changes(t)},
                       "ema": t.ema.state_dict() if t.ema is not None else None, "data": t.pieces.data_fingerprint}}


def _save(t: Training, payload: dict[str, Any], name: str, checked: bool = False) -> str:
    """Write ``payload`` to the run folder's ``name``; its path. Weights that are no longer finite are refused:
    a good checkpoint is never replaced by NaNs. ``checked``: the caller has just checked these weights
    (``_check_epoch_weights``), so they are not scanned again."""
    path = os.path.join(t.run_dir, name)
    if not checked:
        parts = {"": payload["state_dict"]}
        if (payload.get("resume") or {}).get("ema"):  # last.pt: the weight EMA's, to resume from, are weights too
            parts["ema."] = payload["resume"]["ema"]["state_dict"]
        _refuse_non_finite(t, parts, f"{path} was not written")
    if t.ctx.main:  # one writer; the others wait, so nobody reads a checkpoint before it exists
        save_checkpoint(payload, path)
    distributed.barrier(t.ctx)
    return path


def _position(resume: dict[str, Any]) -> str:
    """Where a last.pt's resume state (``resume``) continues the run, in words."""
    epoch, batch = resume["run"]["epoch"], resume["epoch_state"]["batch"]
    return f"epoch {epoch}, batch {batch}" if batch else f"the end of epoch {epoch - 1}"


def _check_epoch_weights(t: Training, consequence: str) -> None:
    """Raise NonFiniteLoss if the weights an epoch's files hold, the model's and the weight EMA's, are no longer
    finite: one scan and one all-reduce for all of them."""
    parts = {"": t.model.state_dict()}
    if t.ema is not None:
        parts["ema."] = t.ema.module.state_dict()
    _refuse_non_finite(t, parts, consequence)


def _refuse_non_finite(t: Training, parts: dict[str, dict[str, Any]], consequence: str) -> None:
    """Raise NonFiniteLoss, on every process alike, if a state dict of ``parts`` (by the prefix its tensors are
    named with in the message: "" for the model's, "ema." for the weight EMA's) holds a NaN or an infinity on any
    process: each decides from the count summed over processes, so none is left waiting at a barrier for a save
    that will not come (BatchNorm statistics can differ between processes)."""
    bad = non_finite_tensors({prefix + name: v for prefix, sd in parts.items() for name, v in sd.items()})
    if distributed.all_reduce_sum(torch.tensor([len(bad)], dtype=torch.int32, device=t.machine.device)).item():
        where = (", ".join(bad[:2]) + (f" and {len(bad) - 2} more" if len(bad) > 2 else "")) if bad else \
            "another process's copy"
        raise NonFiniteLoss(f"the weights are no longer finite (NaN or inf in {where}), so {consequence}; lower "
                            "--lr or add --clip-grad 1.0")


def _save_within_epoch(t: Training, step_losses: list[tuple[torch.Tensor, float]], state: EpochState) -> None:
    # steps.csv first: last.pt never holds steps whose rows are missing (a resume drops rows beyond last.pt)
    _write_step_losses(t.run_dir, t.epoch, state.batch, step_losses)
    _save(t, _checkpoint(t, state, t.epoch), "last.pt")


def _all_memorised(t: Training) -> bool:
    """Whether an --overfit-batches run's last epoch got every one of its images right, in eval mode (its
    validation images are its training images): the model and the loss can fit them, so training on is moot."""
    return bool(t.cfg.overfit_batches) and t.last is not None and t.last.val.acc == 1.0


def _overfit_batches(t: Training) -> int:
    """The batches an --overfit-batches run trains on: fewer than it asked for where its data has fewer."""
    return min(t.cfg.overfit_batches, -(-len(t.pieces.val_set) // t.cfg.batch_size))


def _batches(n: int) -> str:
    return f"{n} batch{'es' if n != 1 else ''}"


def overfit_verdict(acc: float, loss: float, images: int, batches: int, epoch: int, epochs: int,
                    asked: int | None = None) -> str:
    """Whether ``--overfit-batches`` memorised its batches: ``acc`` and ``loss`` in eval mode on the very
    ``images`` (``batches``) it trained on, after ``epoch`` of the run's ``epochs`` (the run stops at the first
    epoch that gets all of them right); ``asked``: the option's value, where the data had fewer batches."""
    head = f"cnnkit: --overfit-batches {asked or batches}: "
    if acc == 1.0:
        early = f"; stopped there, {epochs - epoch} of {epochs} epochs early" if epoch < epochs else ""
        return head + (f"memorised the {_batches(batches)} at epoch {epoch}: the model and loss can fit; all "
                       f"{images} images it trained on right in eval mode (loss {loss:.3g}){early}")
    if acc >= MEMORISED_ACC:
        wrong = images - round(acc * images)
        return head + (f"memorised: accuracy {acc:.4f} on the {images} images it trained on (in eval mode), all but "
                       f"{wrong} right after {epoch} epochs: the model and loss can fit")
    return head + (f"NOT memorised: accuracy {acc:.4f} (loss {loss:.3f}) on the {images} images it trained on, where "
                   f"a healthy model and data pipeline reach {MEMORISED_ACC} or more. If the loss is still falling, "
                   "give it more --epochs or a higher --lr; if not, suspect labels that do not match the images, "
                   "a frozen network, or a bug in the model")


def train_one_epoch(
    model: nn.Module,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    criterion: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    state: EpochState | None = None,
    clip_grad: float | None = None,
    nan: str = "stop",
    desc: str = "",
    progress: bool = True,
    stop: "StopSignals | None" = None,
    save_every: int = 0,
    save: Callable[[EpochState], None] | None = None,
    step_losses: list[tuple[torch.Tensor, float]] | None = None,
    mix: Mix | None = None,
    accum_steps: int = 1,
    ema: WeightEMA | None = None,
    governor: ThreadGovernor | None = None,
    epoch: int = 1,
) -> EpochState:
    """One pass over ``loader`` (from ``state.batch`` on, for a resumed epoch); returns the epoch's sums.

    The optimizer steps once every ``accum_steps`` batches (and after the epoch's last batch) on the mean
    gradient of those batches; the schedule counts optimizer steps. ``mix`` (mixup/CutMix) blends each batch and
    trains on soft targets: train accuracy then counts a prediction as right when it names the class with the
    larger share of the blended image. ``ema`` follows the weights after every optimizer step. ``governor`` times
    each batch and may change the CPU thread count between two; ``epoch``: the epoch's number, for its record.
    Stops early, between two optimizer steps, when ``stop`` has caught a signal.
    """
    state = state or EpochState()
    model.train()  # BatchNorm: batch statistics, running averages updated; Dropout: on
    freeze_batchnorm_stats(model)  # ...except BatchNorm layers whose parameters are frozen
    # Running sums stay on the device: reading them every step would make a GPU wait for each batch.
    loss_sum = torch.as_tensor(state.loss_sum, device=device, dtype=torch.float32)
    correct = torch.as_tensor(state.correct, device=device, dtype=torch.long)
    grad_norm_sum = torch.as_tensor(state.grad_norm_sum, device=device, dtype=torch.float32)
    bn_buffers = [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  for b in (m.running_mean, m.running_var) if b is not None] if nan == "skip" else []
    bar = progress_bar(len(loader), state.batch, desc, "batch", enabled=progress)  # plain lines when not a terminal
    t0 = time.perf_counter()
    seen_before = state.seen
    optimizer.zero_grad(set_to_none=True)
    pending = 0  # batches whose gradients wait for the next optimizer step
    # With nan="stop" the finite-loss check is read only every NAN_CHECK_EVERY steps (and before any save):
    # reading it each step would make a GPU wait for every batch. A non-finite step between two checks
    # only spoils weights that are then never saved. The check reads the running loss sum, which a non-finite
    # loss leaves non-finite for good (inf + x is inf or nan, nan + x is nan; a finite loss over 1e36 would
    # read as non-finite too, long after training has diverged): no per-step work, which a small CPU model's
    # step notices (see docs/design.md). nan="skip" must decide per step, so it reads each one.
    checked = state.batch  # every batch before this one had a finite loss
    # nan="stop": (loss, rate of the last optimizer step before it, that step's batch) of each batch since the last
    # check, so that a failed check can name the batch whose loss first went non-finite and the step whose weights
    # it was computed on (a schedule has moved on by the time the check runs). The step's batch is 0 when it was
    # in an earlier epoch; a save or a stop comes right after a step, so a resumed epoch's last one is its batch.
    # The rate is a Python float the optimizer holds: keeping it reads nothing from the device.
    window: list[tuple[torch.Tensor, float | None, int]] = []
    last_step_batch = state.batch
    if governor is not None:
        governor.start(epoch, state.batch)
    for images, labels in loader.batches(state.batch):
        targets = labels
        if mix is not None:  # drawn from the batch's own seed, so a resumed run mixes it the same way
            images, targets = mix(images, labels, loader.batch_seed(state.batch))
            labels = targets.argmax(1)  # for the accuracy: the class with the larger share
        bn_before = [b.clone() for b in bn_buffers]  # only with nan="skip": a skipped batch must not touch them
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits, targets)
        if step_losses is not None:  # with the rate of the optimizer step this batch's gradient goes into
            step_losses.append((loss.detach(), optimizer.param_groups[0]["lr"]))
        if nan == "stop":
            window.append((loss.detach(), state.last_step_lr, last_step_batch))
        if nan == "skip" and not _all_finite(loss):
            for b, saved in zip(bn_buffers, bn_before):
                b.copy_(saved)
            state.skipped += 1
        else:
            # Accumulation: each batch adds its share of the mean gradient over the batches of this optimizer
            # step (accum_steps of them; fewer for the epoch's last, short group).
            group = min(accum_steps, len(loader) - state.batch // accum_steps * accum_steps)
            # (Not divided by a group of 1: two operations per step, forward and backward, for nothing.)
            scaler.scale(loss / group if group > 1 else loss).backward()  # scaling is a no-op unless fp16
            pending += 1
            loss_sum += loss.detach().float() * len(labels)
            correct += (logits.detach().argmax(1) == labels).sum()
            state.seen += len(labels)

        state.batch += 1
        if nan == "stop" and (state.batch % NAN_CHECK_EVERY == 0 or state.batch == len(loader)
                              or (save_every and state.batch % (save_every * accum_steps) == 0)):
            checked = _check_finite(loss_sum, checked, state, window)
        if state.batch % accum_steps == 0 or state.batch == len(loader):  # an optimizer step
            if pending:
                norm = _optimizer_step(model, optimizer, scaler, clip_grad, ema)
                if norm is not None:
                    grad_norm_sum += norm
                    state.clipped_steps += 1
                pending = 0
                state.last_step_lr, last_step_batch = optimizer.param_groups[0]["lr"], state.batch
            scheduler.step()  # the schedule counts steps, skipped ones too, so it ends where it was planned to
            # Stopping and saving only between optimizer steps: accumulated gradients are not in a checkpoint.
            if stop is not None and _any_process_stopping(stop):
                if nan == "stop":
                    _check_finite(loss_sum, checked, state, window)  # the caller saves what it has: it must be good
                break
            if save_every and save and state.batch % (save_every * accum_steps) == 0 and state.batch < len(loader):
                save(dataclasses.replace(state, loss_sum=loss_sum.item(), correct=correct.item(),
                                         grad_norm_sum=grad_norm_sum.item(),
                                         seconds=state.seconds + time.perf_counter() - t0))
        if governor is not None:
            governor.step()
        if not bar.disable and (state.batch % 20 == 0 or state.batch == len(loader)):
            bar.set_postfix(loss=f"{loss_sum.item() / max(state.seen, 1):.3f}",
                            acc=f"{correct.item() / max(state.seen, 1):.3f}",
                            img_s=f"{(state.seen - seen_before) / (time.perf_counter() - t0):,.0f}")
            bar.update(state.batch - bar.n)
    bar.close()
    state.seconds += time.perf_counter() - t0
    state.loss_sum, state.correct, state.grad_norm_sum = loss_sum.item(), correct.item(), grad_norm_sum.item()
    return state


def _optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    clip_grad: float | None, ema: WeightEMA | None) -> torch.Tensor | None:
    """One step on the gradients accumulated so far, clipped to the norm ``clip_grad`` first (then it returns the
    norm before clipping, which tells whether the threshold fits the run); ``ema`` follows the new weights."""
    norm = None
    if clip_grad:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model)
    return norm


def _check_finite(loss_sum: torch.Tensor, checked: int, state: EpochState,
                  window: list[tuple[torch.Tensor, float | None, int]]) -> int:
    """Raise NonFiniteLoss if the running loss sum has become non-finite on any process since batch ``checked``
    (before which all was finite); else empty ``window`` and return the batch up to which all is now known finite.
    ``window``: (loss, rate of the last optimizer step before it, that step's batch: 0 for an earlier epoch's) of
    each batch after ``checked``; the message names the first batch whose loss is non-finite on any process and
    the step before it, whose weights gave that loss: the rate that did the damage is that step's (or an earlier
    one's), not the rate the failing batch would have stepped at."""
    bad = distributed.all_reduce_sum((~torch.isfinite(loss_sum)).to(torch.int32).reshape(1))
    if not bad.item():
        window.clear()
        return state.batch
    # Only here, once the run has failed, are the window's losses read: summed over processes (in float64, so
    # that the sum of finite losses does not overflow), a non-finite loss on any of them shows.
    losses = distributed.all_reduce_sum(torch.stack([loss for loss, _, _ in window]).double()) if window else None
    first = (~torch.isfinite(losses)).nonzero() if losses is not None else []
    if len(first):
        i = int(first[0])
        _, rate, step = window[i]
        where = f"at batch {checked + 1 + i} of this epoch"
        if rate is None:
            where += ", before any optimizer step (so on the starting weights: the rate played no part)"
        else:
            which = f"at batch {step}" if step else "the previous epoch's last"
            at = f"lr {rate:.3g}" if math.isfinite(rate) else "a rate the last.pt it resumed from did not record"
            where += f"; the last optimizer step before it, {which}, ran at {at}"
    else:  # every loss finite, their running sum not (over 3e38): no one batch to name
        where = f"at batch {state.batch}" if checked + 1 == state.batch else \
            f"between batches {checked + 1} and {state.batch}"
        where += " of this epoch"
        rates = [r for _, r, _ in window if r is not None and math.isfinite(r)]
        if rates:
            where += (f"; the optimizer steps before ran at lr {min(rates):.3g}"
                      + (f" to {max(rates):.3g}" if max(rates) != min(rates) else ""))
    raise NonFiniteLoss(
        f"the loss became non-finite {where} (steps.csv has each step's lr); likely causes: a learning rate too "
        "high, exploding gradients, or bad input values. Lower --lr, add --clip-grad 1.0, or pass --nan skip"
    )


@contextlib.contextmanager
def _divergence(t: Training, start: float, wall_start: float) -> Iterator[None]:
    """Within the block, a NonFiniteLoss ends the run with a message that names the epoch, what the run folder
    still holds and, for ``--lr auto``, where the rate came from; ``stop.json`` marks the run as diverged,
    steps.csv keeps the steps that ran before the failure and result.json says why the run stopped."""
    try:
        yield
    except NonFiniteLoss as e:
        run_dir, epoch, lr_search = t.run_dir, t.epoch, t.lr_search
        # The finite-loss check raises on every process at once, right after a step: the losses not yet written
        # end at the batch the loop had reached (t.epoch_state, advanced in place). Elsewhere none are left.
        _write_step_losses(run_dir, epoch, t.epoch_state.batch, t.step_losses, stop_at_non_finite=True)
        message = f"epoch {epoch}: {e}; {_kept_checkpoints(run_dir)}"
        if lr_search is not None:
            message += (f"; the rate came from --lr auto (the range test's suggestion {lr_search.suggestion:.3g}, "
                        f"rule '{lr_search.method}', in lr_find.json): pass a lower fixed --lr")
        else:  # a guessed lower rate may diverge again
            message += "; --lr auto picks a rate with a range test (cnnkit lr-find draws its curve)"
        _write_json(run_dir, "stop.json", {"status": "diverged", "epoch": epoch, "message": message})
        result = _result(t, wall_start, f"diverged: {message}")
        _write_json(run_dir, "result.json", dataclasses.asdict(result))
        error = NonFiniteLoss(message)
        error.result = result  # what result.json holds, for the caller's report and --json
        raise error from None


def _kept_checkpoints(run_dir: str) -> str:
    """What a run that fails now leaves to resume from or use, in words."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        return "no checkpoint had been written yet, so the run folder holds none"
    state = read_payload(path)["resume"]
    at = _position(state)
    has_best = os.path.exists(os.path.join(run_dir, "best.pt"))
    best = f" and best.pt (epoch {state['run']['best_epoch']}), both" if has_best else ""
    return f"kept: last.pt (the state at {at}){best} from before the failure"


def _all_finite(loss: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (they must all skip or stop together)."""
    bad = (~torch.isfinite(loss.detach())).to(torch.int32).reshape(1)
    return not bool(distributed.all_reduce_sum(bad).item())


def _any_process_stopping(stop: "StopSignals") -> bool:
    """Whether a signal reached any process: all stop after the same step, or the others would hang."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return stop.signal is not None  # one process: no tensor, no communication in the hot loop
    flag = distributed.all_reduce_sum(torch.tensor([int(stop.signal is not None)], dtype=torch.int32))
    if flag.item() and stop.signal is None:
        stop.signal = "SIGTERM"
    return bool(flag.item())


class _Signalled(KeyboardInterrupt):
    """A signal within ``StopSignals.at_once``: a KeyboardInterrupt, which code that catches Exception lets pass."""


class _SignalledTwice(KeyboardInterrupt):
    """A SIGINT after a first signal that the loop has not yet stopped on (its argument: the first one's name)."""


@contextlib.contextmanager
def _stopped_twice(t: Training) -> Iterator[None]:
    """Within the block, a second SIGINT (``StopSignals``) ends the run where it is, as a TrainingStopped that
    says what the run folder holds: its last.pt is whole (written atomically) and resumes the run from where it
    was saved. Before, it ended in a bare "cnnkit: interrupted", without the resume line a single Ctrl-C gives."""
    try:
        yield
    except _SignalledTwice as e:
        # Read from the file, not remembered from the save: the signal may have come between its rename and
        # anything that followed it.
        last = os.path.join(t.run_dir, "last.pt")
        saved_at = _position(read_payload(last)["resume"]) if t.run_dir and os.path.exists(last) else None
        stopped = TrainingStopped(_stopped_twice_message(str(e), t.run_dir, saved_at, _resume_command(t)))
        stopped.exit_code = 128 + signal.SIGINT
        raise stopped from None


def _stopped_twice_message(first: str, run_dir: str, saved_at: str | None, resume_command: str) -> str:
    """What a stop at once by a SIGINT after the signal ``first`` says; ``saved_at``: where the run's last.pt
    continues it (None: there is none yet)."""
    how = "SIGINT twice" if first == "SIGINT" else f"{first}, then SIGINT"
    if saved_at is None:
        config = os.path.join(run_dir, "config.json")
        again = ("run the same command again" if not run_dir else  # stopped before its folder was named
                 f"start it again with: cnnkit train --config {config} --out NEW_DIR" if os.path.exists(config) else
                 "run the same command again with a new --out")
        return f"{how}, at once, before the run's first checkpoint: there is nothing to resume; {again}"
    return (f"{how}, at once, without saving the steps since {os.path.join(run_dir, 'last.pt')} (the state at "
            f"{saved_at}). Continue from there with: {resume_command}")


class StopSignals:
    """Within the block, SIGINT and SIGTERM ask the loop to stop after the current step (a second SIGINT
    stops at once); within ``at_once``, they stop at once. Outside the main thread, where handlers cannot be
    installed, it does nothing. A signal that the process was started ignoring (SIG_IGN: the shell's SIGINT for
    `cnnkit train ... &` in a script, for a job that Ctrl-C must not reach) stays ignored, as Python leaves it
    too; SIGTERM stops such a run."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}
        self._at_once = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self._at_once:
            raise _Signalled(signal.Signals(signum).name)
        if self.signal is not None and signum == signal.SIGINT:
            raise _SignalledTwice(self.signal)
        self.signal = signal.Signals(signum).name

    @contextlib.contextmanager
    def at_once(self, message: Callable[[str], str]) -> Iterator[None]:
        """A block that a signal ends where it is (work with no step to finish and nothing to save: the start-up,
        the final measurements), as a TrainingStopped with the loop's exit code and ``message(signal's name)``."""
        self._at_once = True
        try:
            yield
        except _Signalled as e:
            stopped = TrainingStopped(message(str(e)))
            stopped.exit_code = 128 + getattr(signal, str(e))
            raise stopped from None
        finally:
            self._at_once = False

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(s) != signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _stopped_starting(name: str, resume: str | None) -> str:
    """What a stop by signal ``name`` during the start-up says; ``resume``: the run folder being resumed."""
    again = (f"{resume} is as it was (run the same command again to continue it)" if resume else
             "nothing was written (run the same command again to start it)")
    return f"{name} while the run was starting, before its first step; {again}"


def _write_metrics(run_dir: str, history: list[dict]) -> None:
    """metrics.csv, rewritten whole from the run's history (so a resumed run never holds a duplicated row)."""
    if not _is_main_process():
        return
    # through a temporary file: `cnnkit runs` and `cnnkit report` reading it meanwhile never see half a file,
    # which they would call damaged
    with atomic_path(os.path.join(run_dir, "metrics.csv")) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows(history)


def _write_json(run_dir: str, name: str, data: Any) -> None:
    """``data`` as strict JSON: a NaN or infinite number is written as null, which every JSON parser reads."""
    if not _is_main_process():
        return
    write_json(os.path.join(run_dir, name), data)


def _is_main_process() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def _write_step_losses(run_dir: str, epoch: int, last_step: int, losses: list[tuple[torch.Tensor, float]],
                       stop_at_non_finite: bool = False) -> None:
    """steps.csv: the loss of every step (averaged over processes) and the rate of the optimizer step its
    gradient went into (lr), appended at the end of each epoch and before each save, so that no step waits for
    its loss to be read; ``losses``, (loss, rate) pairs, end at step ``last_step`` and are emptied.
    ``stop_at_non_finite`` (a run that diverged): the rows end at the first non-finite loss, written as nan or
    inf, since the steps after it ran on weights that step spoiled (or, with accumulation, added to its spoiled
    gradient). A steps.csv from before the lr column (a resumed older run) gets rows without it."""
    if not losses:
        return
    first_step = last_step - len(losses) + 1
    values = distributed.all_reduce_sum(torch.stack([loss for loss, _ in losses]).float().detach().clone())
    values /= torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    rates = [rate for _, rate in losses]
    losses.clear()
    if stop_at_non_finite:
        bad = (~torch.isfinite(values)).nonzero()
        values = values[: int(bad[0]) + 1] if len(bad) else values
    if not _is_main_process():
        return
    path = os.path.join(run_dir, "steps.csv")
    new = not os.path.exists(path)
    with_lr = new or _steps_columns(path) > 3
    with open(path, "a") as f:
        if new:
            f.write("epoch,step,loss,lr\n")
        f.writelines(f"{epoch},{first_step + i},{v:.8g}" + (f",{rates[i]:.8g}\n" if with_lr else "\n")
                     for i, v in enumerate(values.tolist()))


def _steps_columns(path: str) -> int:
    """The number of columns in steps.csv's header: 3 in files from before the lr column, 4 since."""
    with open(path) as f:
        return len(f.readline().split(","))


def _drop_steps_after(run_dir: str, epoch: int, step: int) -> None:
    """Remove the steps.csv rows after ``step`` of ``epoch``: a resumed run replays those steps and logs them again."""
    path = os.path.join(run_dir, "steps.csv")
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    if not lines:
        return
    header, *rows = lines
    keep = [row for row in rows if _step_of(row, len(header.split(","))) <= (epoch, step)]
    if len(keep) < len(rows):
        atomic_write(path, lambda f: f.write("".join([header, *keep]).encode()))


def _step_of(row: str, columns: int = 3) -> tuple[int, int]:
    """(epoch, step) of a steps.csv row of ``columns`` numbers; past any real step for a row a killed process
    left half-written."""
    try:
        epoch, step, *numbers = row.split(",")
        if len(numbers) != columns - 2:
            raise ValueError(row)
        for number in numbers:
            float(number)
        return int(epoch), int(step)
    except ValueError:
        return (sys.maxsize, 0)


def _better(score: float, best: float, monitor: str, min_delta: float = 0.0) -> bool:
    """Whether ``score`` improves on ``best`` by more than ``min_delta`` (up for accuracy, down for loss)."""
    return MONITORS[monitor] * (score - best) > min_delta


def _ranks_in(score: float, kept: list, n: int, monitor: str) -> bool:
    """Whether an epoch with ``score`` belongs among the ``n`` best (ties: the earlier epoch stays)."""
    return len(kept) < n or _better(score, kept[-1][0], monitor)


def _best_file(epoch: int) -> str:
    return f"best-epoch{epoch:03d}.pt"


def _prune_best_files(run_dir: str, kept: list) -> None:
    """Delete the best-epochNNN.pt files of epochs no longer among the kept best."""
    keep = {_best_file(epoch) for _, epoch in kept}
    for name in os.listdir(run_dir):
        if name.startswith("best-epoch") and name.endswith(".pt") and name not in keep:
            os.unlink(os.path.join(run_dir, name))


def resumed_config(saved: dict[str, Any], overrides: dict[str, Any]) -> TrainConfig:
    """The configuration of the run whose last.pt is ``saved``, with this session's SESSION_OPTIONS from
    ``overrides``; any other option is refused, since the run goes on with its own (it was dropped unseen)."""
    others = sorted(set(overrides) - set(SESSION_OPTIONS))
    if others:
        raise UserError(f"a resumed run continues with its own settings; drop {', '.join(others)} (only "
                        f"{' and '.join(SESSION_OPTIONS)} may change when resuming)")
    return make_config(TrainConfig(**{**_as_run(saved["config"], saved["input_size"]), **overrides}), resumed=True)


def _as_run(config: dict[str, Any], input_size: int) -> dict[str, Any]:
    """A saved run's configuration as the run used it: one from before val_split beside val_data was refused
    took its validation images from val_data alone, and resumes so; and at the input size it trained at (pixels),
    which for a folder without --input-size was chosen from the images by a rule that has changed since."""
    config = {**config, "val_split": None} if config.get("val_data") is not None else config
    return {**config, "input_size": config.get("input_size") or input_size}


def _resume_payload(run_dir: str) -> dict[str, Any]:
    refuse_not_a_run(run_dir)
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        # A run killed during its first checkpoint write leaves a temporary file and nothing else to resume from.
        stale = remove_stale_temp_files(run_dir)
        removed = f"; removed {', '.join(map(os.path.basename, stale))}, left by an interrupted write" if stale else ""
        again = (f"; start it again with: cnnkit train --config {os.path.join(run_dir, 'config.json')} --out NEW_DIR"
                 if os.path.exists(os.path.join(run_dir, "config.json")) else "")
        raise UserError(f"--resume {run_dir}: no last.pt in it (the run stopped before its first checkpoint), so "
                        f"there is nothing to resume{removed}{again}")
    payload = read_payload(path)
    if "resume" not in payload:
        raise CheckpointError(f"{path} holds no training state to resume from")
    # a run from before runs recorded their paths absolute, resumed from another folder
    check_recorded_paths(payload.get("config") or {}, run_dir, "cnnkit train --resume")
    return payload


def refuse_not_a_run(path: str) -> None:
    """Raise a UserError saying what ``path`` is when it is not a run folder (one with config.json): missing, a
    file of a run (its folder is named), the folder holding runs (a few are named) or any other folder. A folder
    with last.pt alone is taken as one: the checkpoint holds the run's configuration."""
    if any(os.path.isfile(os.path.join(path, name)) for name in ("config.json", "last.pt")):
        return
    wrote = "pass the folder a previous `cnnkit train` wrote"
    if not os.path.exists(path):
        raise UserError(f"--resume {path}: no such folder; {wrote}")
    if not os.path.isdir(path):
        parent = os.path.dirname(path) or "."
        if os.path.isfile(os.path.join(parent, "config.json")):
            raise UserError(f"--resume {path}: a file of the run {parent}; pass the run folder: --resume {parent}")
        raise UserError(f"--resume {path}: a file, not a run folder; {wrote}")
    runs = list_runs(path)
    if runs:
        names = [os.path.basename(r.path) for r in runs]  # oldest first
        held = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"--resume {path}: not a run folder (no config.json); it holds runs: {held}; pass one of "
                        f"them, e.g. --resume {newest(runs)} (the newest)")
    raise UserError(f"--resume {path}: not a run folder (no config.json); {wrote}")


def make_run_dir(cfg: TrainConfig) -> str:
    """``cfg.out`` (which must be new or empty), or a new ``runs/<timestamp>-<model>``."""
    if cfg.out:
        path = cfg.out
        if os.path.isdir(path) and os.listdir(path):
            a_run = os.path.exists(os.path.join(path, "config.json"))
            raise UserError(f"run folder {path} already holds files; pass a new --out folder"
                            + (" (or --resume it to continue that run)" if a_run else " (it is not a run folder)"))
    else:
        path = new_folder_name(cfg.model)
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        open(probe, "w").close()
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write the run folder {path} ({e.strerror}); pass a writable --out") from None
    return path
