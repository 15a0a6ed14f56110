"""The training loop: ``train`` reads top to bottom — data, model, optimizer, run folder, then epochs of
``train_one_epoch`` and ``evaluate_model``, checkpointing after each.

A run can stop at any moment (Ctrl-C, SIGTERM, a killed process) and ``train(resume=RUN_DIR)`` continues it
exactly: the checkpoint holds the optimizer, schedule, every random generator and the position in the
epoch, and each epoch's data order and each batch's augmentation are drawn from seeds, not from history.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit import compiled
from cnnkit.atomic import atomic_write, write_json
from cnnkit.data.checks import check_splits, class_weights
from cnnkit.choices import AUGMENT_POLICIES, DECODE_CHOICES
from cnnkit.data.loader import Augment, BatchLoader, channel_stats
from cnnkit.data.sources import DataSpec, ImageSet, load_splits
from cnnkit.errors import CheckpointError, NonFiniteLoss, TrainingStopped, UserError
from cnnkit.models.registry import check_model_name, create_model
from cnnkit.models.fast import sync_batchnorm
from cnnkit.modes import eval_mode
from cnnkit.progress import progress_bar
from cnnkit.threads import set_torch_threads
from cnnkit.report.tensorboard import open_tensorboard, require_tensorboard
from cnnkit.train import distributed
from cnnkit.train.checkpoint import (
    make_payload, read_payload, remove_stale_temp_files, rng_state, save_checkpoint, set_rng_state,
)
from cnnkit.train.config import TrainConfig, TrainResult, read_config_file, with_data_defaults
from cnnkit.train.ema import WeightEMA
from cnnkit.train.metrics import macro_averages, per_class_metrics, write_epoch_files
from cnnkit.train.mix import Mix
from cnnkit.train.lr_find import lr_find_record, resolve_auto_lr
from cnnkit.train.optim import DEFAULT_LR, make_optimizer, make_scheduler
from cnnkit.transfer import freeze_batchnorm_stats, load_weights, normalization, plan_stages, set_trainable
from cnnkit.train.precision import autocast, precision_name, resolve_device, resolve_precision
from cnnkit.train.recipes import recipe_options
from cnnkit.train.rewrite import PoolReLU, fuse_pool_relu, pool_before_relu, rand_dropout
from cnnkit.tta import TTAModel

MEMORISED_ACC = 0.99  # --overfit-batches: eval-mode accuracy on its own training images that counts as memorised
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "epoch_time_s",
                  "images_per_s", "grad_norm", "skipped_batches", "val_macro_recall", "val_macro_f1",
                  "ema_val_loss", "ema_val_acc"]
NO_FLIP_DATA = ("mnist",)  # mirrored digits are other symbols
NAN_POLICIES = ("stop", "skip")
MONITORS = {"val_acc": 1, "val_loss": -1}  # the metrics that pick best.pt and stop early: +1 higher is better
SMOKE_BATCHES, SMOKE_EPOCHS, SMOKE_VAL_IMAGES = 5, 2, 256
NAN_CHECK_EVERY = 50  # batches between two reads of the running loss sum's finiteness with nan="stop"


@dataclass
class EvalStats:
    """Loss, top-1 and top-5 accuracy and the confusion matrix (rows: true class, columns: predicted)."""

    loss: float
    acc: float
    top5: float
    confusion: torch.Tensor
    count: int


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


def train(config: TrainConfig | str | None = None, log: IO[str] | None = None, resume: str | None = None,
          **overrides) -> TrainResult:
    """Train a model as ``config`` (or keyword overrides of the defaults) says; returns the run's results.

    ``config`` may be a YAML or JSON file of TrainConfig fields (a run folder's ``config.json`` replays that run).
    ``resume=RUN_DIR`` continues an interrupted run from its ``last.pt`` with the run's own configuration.
    Example: ``cnnkit.train(model="simple_cnn", data="cifar10", epochs=15)``.
    """
    wall_start = time.perf_counter()
    if isinstance(config, (str, os.PathLike)):  # a file's values, over its recipe's if it names one
        values = read_config_file(os.fspath(config))
        config = TrainConfig(**{**recipe_options(values.get("recipe"), values.get("overfit_batches", 0)), **values})
    saved = _resume_payload(resume) if resume else None
    cfg = _make_config(TrainConfig(**saved["config"]) if saved else config, {} if saved else overrides)
    check_model_name(cfg.model)  # before minutes of data loading
    log = log or sys.stdout
    threads = set_torch_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        # Every batch has the same shapes, so cuDNN may time its algorithms once and keep the fastest
        # (timm's and airbench's setting); CUDA's convolutions are not bit-reproducible either way.
        torch.backends.cudnn.benchmark = True
    ctx = distributed.setup(device)  # one process, or one of torchrun's: only rank 0 prints and writes
    if not ctx.main:
        log = open(os.devnull, "w")
    cfg, lr_search = resolve_auto_lr(cfg, log, ctx)  # --lr auto: the range test's suggestion, before anything else

    # Data: decoded once into uint8 tensors; augmentation happens per batch on the device.
    num_samples = cfg.num_samples
    if cfg.smoke:  # a few batches' worth of training images
        num_samples = min(num_samples or SMOKE_BATCHES * cfg.batch_size, SMOKE_BATCHES * cfg.batch_size)
    spec = DataSpec(cfg.data, cfg.data_dir, cfg.download, cfg.val_data, cfg.val_split, cfg.input_size,
                    cfg.channels, num_samples, cfg.bad_images)
    train_set, val_set = load_splits(spec)
    if cfg.smoke:
        val_set = _sample(val_set, SMOKE_VAL_IMAGES, cfg.seed)
    if cfg.overfit_batches:  # can the model memorise a few batches? It is validated on the very same images.
        train_set = _sample(train_set, cfg.overfit_batches * cfg.batch_size, cfg.seed)
        val_set = dataclasses.replace(train_set, skipped=[])
    if train_set.images is None and cfg.workers:  # decoded per batch by loader processes: leave them their cores
        threads = set_torch_threads(cfg.threads, workers=cfg.workers)
    classes = train_set.classes
    if saved and saved["classes"] != classes:
        raise CheckpointError(f"the data's classes {classes[:10]} differ from the checkpoint's "
                              f"{saved['classes'][:10]}; resume with the data the run was started on")

    # Model and the weights it starts from; the input normalisation follows the weights.
    model = create_model(cfg.model, num_classes=len(classes), in_channels=train_set.channels,
                         input_size=train_set.size, pretrained=cfg.pretrained and not saved, **cfg.model_options)
    start_payload = load_weights(model, cfg.weights, log, train_set.classes) if cfg.weights and not saved else None
    if saved:
        mean, std = saved["mean"], saved["std"]
    elif cfg.pretrained:
        mean, std, _ = normalization(cfg.model, train_set.channels)  # ImageNet statistics, which the pretrained filters expect
    elif start_payload is not None:
        mean, std = start_payload["mean"], start_payload["std"]
    else:
        mean, std = channel_stats(train_set)
    if cfg.sync_bn and ctx.world > 1:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); on a CPU each process "
                            "normalises its own share of the batch")
        model = sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    # Before minutes of training: class balance, train/val duplicates, data against the model. Warnings only.
    if cfg.check_data and ctx.main and not saved:
        data_check = check_splits(
            train_set, val_set, cfg.model, cfg.pretrained,
            weights_norm=(mean, std) if cfg.pretrained or start_payload is not None else None,
            weights_label=f"torchvision's pretrained {cfg.model}" if cfg.pretrained else cfg.weights,
            balanced=bool(cfg.class_weights or cfg.balanced_sampler), hash_files=False)
        for warning in data_check.warnings:
            print(f"cnnkit: warning: {warning}", file=log)

    augment = None if cfg.overfit_batches else Augment(
        crop_pad=train_set.size // 8 if cfg.crop_pad is None else cfg.crop_pad,
        flip=(cfg.data not in NO_FLIP_DATA) if cfg.flip is None else cfg.flip,
        alternate_flip=cfg.alternate_flip, cutout=cfg.cutout, policy=cfg.augment_policy,
        random_erasing=cfg.random_erasing,
    )
    mix = Mix(len(classes), cfg.mixup, cfg.cutmix) if (cfg.mixup or cfg.cutmix) and not cfg.overfit_batches else None
    train_loader = BatchLoader(train_set, cfg.batch_size, mean, std, device, shuffle=True, augment=augment,
                               seed=cfg.seed, drop_last=len(train_set) >= cfg.batch_size,
                               channels_last=cfg.channels_last, workers=cfg.workers, rank=ctx.rank, world=ctx.world,
                               balanced=cfg.balanced_sampler, decode=cfg.decode)
    val_loader = BatchLoader(val_set, cfg.eval_batch_size, mean, std, device, channels_last=cfg.channels_last,
                             workers=cfg.workers, rank=ctx.rank, world=ctx.world, decode=cfg.decode)
    if hasattr(model, "init_from_data") and not saved and not start_payload:
        # Layers computed from the data (the fast net's whitening filters) see the first training batches,
        # normalised as training will normalise them.
        sample = BatchLoader(train_set, min(5000, len(train_set)), mean, std, device, shuffle=True, seed=cfg.seed,
                             channels_last=cfg.channels_last, workers=cfg.workers, decode=cfg.decode)
        model.init_from_data(next(iter(sample))[0])
        del sample  # and its loader's workers, which a streamed set keeps from epoch to epoch
    ema = WeightEMA(model, cfg.ema) if cfg.ema else None  # the moving average of the weights, beside them

    # What trains when: one stage, or a staged schedule (head first, then deeper layers at a lower rate).
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.optimizer, 0.01)
    stages = plan_stages(cfg.stages, cfg.freeze, cfg.unfreeze, cfg.epochs, lr)
    if cfg.smoke:
        stages = [dataclasses.replace(s, epochs=min(s.epochs, SMOKE_EPOCHS if len(stages) == 1 else 1)) for s in stages]
    total_epochs = sum(stage.epochs for stage in stages)
    first_epochs = [1 + sum(s.epochs for s in stages[:i]) for i in range(len(stages))]
    steps_per_epoch = -(-len(train_loader) // cfg.accum_steps)  # optimizer steps: the schedule counts these
    stage_log: list[dict] = []
    # The training step runs ``model`` rewritten (cnnkit/train/rewrite.py: the same function and gradients up to
    # dropout's draws, less work): ReLUs after their max-pools and, in runs long enough to repay compiling, each
    # such pair fused into one compiled loop; with --compile, the whole rewritten model compiled instead. On a
    # CPU dropout draws its masks with torch.rand. All share ``model``'s parameters: checkpoints and evaluation
    # use ``model``.
    step_model = pool_before_relu(model)
    if device.type == "cpu":
        step_model = rand_dropout(step_model)
    if cfg.compile:
        step_model = torch.compile(step_model)
    else:
        step_model = fuse_pool_relu(step_model, batches=total_epochs * len(train_loader))
        # The batch's crop, flip and normalisation in one compiled loop, where that pays (cnnkit/compiled.py):
        # cheap to compile beside the pools, whose compiling loads torch.compile anyway; alone, in long runs only.
        pools_fused = any(isinstance(m, PoolReLU) for m in step_model.modules())
        train_loader.fused = total_epochs * len(train_loader) >= (
            compiled.MIN_BATCHES if pools_fused else compiled.MIN_BATCHES_ALONE)

    def start_stage(index: int) -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        stage = stages[index]
        trainable = set_trainable(model, stage.modules)
        # Across processes, DistributedDataParallel averages the gradients; it is rebuilt per stage because it
        # registers the parameters that require gradients when it is made.
        net = torch.nn.parallel.DistributedDataParallel(step_model) if ctx.world > 1 else step_model
        optimizer = make_optimizer(model, cfg.optimizer, stage.lr, cfg.weight_decay, cfg.momentum, cfg.nesterov,
                                   backbone_lr=cfg.lr_backbone, batch_size=cfg.batch_size)
        scheduler = make_scheduler(optimizer, cfg.schedule, stage.epochs * steps_per_epoch,
                                   int(cfg.warmup_epochs * steps_per_epoch))
        stage_log.append({"stage": index + 1, "first_epoch": first_epochs[index], "modules": stage.modules or ["all"],
                          "epochs": stage.epochs, "lr": stage.lr, "lr_backbone": cfg.lr_backbone,
                          "trainable_params": trainable})
        return net, optimizer, scheduler

    next_epoch = saved["resume"]["run"]["epoch"] if saved else 1
    stage_index = max(i for i, first in enumerate(first_epochs) if first <= next_epoch)
    net, optimizer, scheduler = start_stage(stage_index)
    loss_weights = class_weights(train_set.labels, len(classes)) if cfg.class_weights == "auto" else None
    criterion = nn.CrossEntropyLoss(weight=None if loss_weights is None else torch.tensor(loss_weights, device=device),
                                    label_smoothing=cfg.label_smoothing)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    # The run folder is made only now, after every input has been checked.
    run = RunState()
    epoch_state = EpochState()
    if saved:
        run_dir = resume
        for stale in remove_stale_temp_files(run_dir):
            print(f"cnnkit: removed {stale}, left by an interrupted checkpoint write", file=log)
        if ctx.main and os.path.exists(os.path.join(run_dir, "stop.json")):  # it runs again: no longer diverged
            os.unlink(os.path.join(run_dir, "stop.json"))
        model.load_state_dict(saved["state_dict"])
        state = saved["resume"]
        if state["stage"] == stage_index:  # else the run stopped at a stage boundary: the new stage starts fresh
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        run = RunState(**state["run"])
        epoch_state = EpochState(**state["epoch_state"])
        set_rng_state(state["rng"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        if run.stop_reason:
            raise UserError(f"{run_dir} ended by early stopping ({run.stop_reason}); there is nothing to resume")
        if run.epoch > total_epochs:
            raise UserError(f"{run_dir} finished all {total_epochs} epochs already; there is nothing to resume")
        if run.best_score is None and run.best_epoch and cfg.monitor == "val_acc":  # a run saved before --monitor
            run.best_score = run.stop_best = run.best_acc
        if ctx.main:
            _prune_best_files(run_dir, run.kept_best)  # a crash between two writes may have left one too many
            _drop_steps_after(run_dir, run.epoch, epoch_state.batch)
        print(f"cnnkit: resuming {run_dir} at epoch {run.epoch}, batch {epoch_state.batch}", file=log)
    else:
        run_dir = distributed.broadcast_text(make_run_dir(cfg) if ctx.main else None, ctx)
        # threads as asked (None: this machine's default), so that a replayed config fits the machine it runs on;
        # the count used is in the run's header and its result.
        _write_json(run_dir, "config.json", {**dataclasses.asdict(cfg), "out": run_dir, "lr": lr})
        if lr_search:  # beside config.json, which stays a replayable --config file
            _write_json(run_dir, "lr_find.json", lr_find_record(lr_search, run_dir))
        if loss_weights is not None:
            _write_json(run_dir, "class_weights.json", {"classes": classes, "weights": loss_weights, "counts":
                                                        torch.bincount(train_set.labels, minlength=len(classes)).tolist()})
    skipped_images = train_set.skipped + val_set.skipped
    if skipped_images and ctx.main:
        with open(os.path.join(run_dir, "bad_images.txt"), "w") as f:
            f.write("\n".join(skipped_images) + "\n")
        print(f"cnnkit: skipped {len(skipped_images)} broken image(s), listed in "
              f"{os.path.join(run_dir, 'bad_images.txt')}", file=log)
    params = sum(p.numel() for p in model.parameters())
    print(f"cnnkit: {cfg.model} ({params:,} parameters) on {len(train_set):,} training and {len(val_set):,} "
          f"validation images of {train_set.channels}x{train_set.size}x{train_set.size} from {cfg.data}; "
          f"{device.type}, {precision_name(amp_dtype)}, {threads} CPU thread{'s' if threads > 1 else ''}; "
          f"run folder {run_dir}", file=log)
    if cfg.smoke:
        print(f"cnnkit: smoke run: {total_epochs} epoch(s) of at most {SMOKE_BATCHES} batches, validation on at most "
              f"{SMOKE_VAL_IMAGES} images; it checks that this command line runs, not how well the model learns",
              file=log)
    if ema is not None and total_epochs * steps_per_epoch * (1 - cfg.ema) < 1:
        print(f"cnnkit: note: --ema {cfg.ema} averages over about {1 / (1 - cfg.ema):,.0f} steps but the run has "
              f"{total_epochs * steps_per_epoch}; the average stays close to the first weights (try a lower decay)",
              file=log)

    def weights(net: nn.Module, epoch: int) -> dict[str, Any]:
        """A checkpoint of ``net`` that rebuilds the model and its preprocessing (no training state)."""
        return make_payload(net, classes, train_set.size, train_set.channels, mean, std, epoch=epoch,
                            metrics=run.history[-1] if run.history else {}, config=dataclasses.asdict(cfg))

    def checkpoint(epoch_state: EpochState, next_epoch: int) -> dict[str, Any]:
        """The resumable state, as it stands after the last finished step."""
        run.epoch = next_epoch
        return {**weights(model, next_epoch - 1),
                "resume": {"stage": stage_index, "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng_state(),
                           "run": dataclasses.asdict(run), "epoch_state": epoch_state.plain(),
                           "ema": ema.state_dict() if ema is not None else None}}

    last_path = os.path.join(run_dir, "last.pt")

    def save(payload: dict[str, Any], path: str) -> None:
        if ctx.main:  # one writer; the others wait, so nobody reads a checkpoint before it exists
            save_checkpoint(payload, path, model)
        distributed.barrier(ctx)

    def save_within_epoch(state: EpochState, epoch: int, step_losses: list[torch.Tensor]) -> None:
        # steps.csv first: last.pt never holds steps whose rows are missing (a resume drops rows beyond last.pt)
        _write_step_losses(run_dir, epoch, state.batch, step_losses)
        save(checkpoint(state, epoch), last_path)

    _write_metrics(run_dir, run.history)
    _write_json(run_dir, "stages.json", stage_log)  # which parameters train in which stage
    board = open_tensorboard(run_dir, classes, model, train_loader, mean, std, log) if cfg.tensorboard and ctx.main else None
    start = time.perf_counter()
    with StopSignals() as stop, _divergence(run_dir, lambda: epoch, lr_search):
        for epoch in range(run.epoch, total_epochs + 1):
            if stage_index + 1 < len(stages) and epoch == first_epochs[stage_index + 1]:
                stage_index += 1
                net, optimizer, scheduler = start_stage(stage_index)
                _write_json(run_dir, "stages.json", stage_log)
            train_loader.set_epoch(epoch)
            if epoch_state.lr is None:
                epoch_state.lr = optimizer.param_groups[0]["lr"]
            current_lr, step_losses = epoch_state.lr, []
            epoch_state = train_one_epoch(
                net, train_loader, optimizer, scheduler, scaler, criterion, device, amp_dtype, epoch_state,
                clip_grad=cfg.clip_grad, nan=cfg.nan, desc=f"epoch {epoch}/{total_epochs}",
                progress=cfg.progress and ctx.main, stop=stop, save_every=cfg.save_every,
                save=lambda state: save_within_epoch(state, epoch, step_losses), step_losses=step_losses,
                mix=mix if epoch <= total_epochs - cfg.mix_off_epochs else None, accum_steps=cfg.accum_steps,
                ema=ema,
            )
            _write_step_losses(run_dir, epoch, epoch_state.batch, step_losses)
            if stop.signal is not None:
                save(checkpoint(epoch_state, epoch), last_path)
                stopped = TrainingStopped(f"{stop.signal} at epoch {epoch}, batch {epoch_state.batch}; saved "
                                          f"{last_path}. Continue with: cnnkit train --resume {run_dir}")
                stopped.exit_code = 128 + getattr(signal, stop.signal)  # 130 for Ctrl-C, 143 for SIGTERM
                raise stopped
            if ctx.world > 1:  # every process saw its share: the epoch's figures are the sums over processes
                sums = distributed.all_reduce_sum(torch.tensor(
                    [epoch_state.loss_sum, epoch_state.correct, epoch_state.seen], dtype=torch.float64))
                epoch_state.loss_sum, epoch_state.correct, epoch_state.seen = sums[0].item(), sums[1].item(), int(sums[2])
            train_loss = epoch_state.loss_sum / max(epoch_state.seen, 1)
            train_acc = epoch_state.correct / max(epoch_state.seen, 1)
            run.train_seconds += epoch_state.seconds
            run.images_seen += epoch_state.seen
            run.skipped_batches += epoch_state.skipped
            val = evaluate_model(model, val_loader, len(classes), device, amp_dtype)
            if not math.isfinite(val.loss):  # --nan skip trains on past a blow-up: such weights are no result
                largest = max(p.detach().abs().max().item() for p in model.parameters())
                skipped_all = "" if epoch_state.seen else "; every batch was skipped"
                raise NonFiniteLoss(f"the model's outputs on the validation images are no longer finite (its largest "
                                    f"weight is {largest:.3g}{skipped_all}); lower --lr or add --clip-grad 1.0")
            ema_val = evaluate_model(ema.module, val_loader, len(classes), device, amp_dtype) if ema else None
            per_class = per_class_metrics(val.confusion, classes)
            macro = macro_averages(val.confusion, per_class)

            row = {"epoch": epoch, "lr": current_lr, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val.loss, "val_acc": val.acc, "val_top5": val.top5,
                   "epoch_time_s": epoch_state.seconds, "images_per_s": epoch_state.seen / epoch_state.seconds,
                   "grad_norm": epoch_state.grad_norm_sum / epoch_state.clipped_steps if epoch_state.clipped_steps else "",
                   "skipped_batches": epoch_state.skipped,
                   "val_macro_recall": macro["macro_recall"], "val_macro_f1": macro["macro_f1"],
                   "ema_val_loss": ema_val.loss if ema_val else "", "ema_val_acc": ema_val.acc if ema_val else ""}
            run.history.append(row)
            _write_metrics(run_dir, run.history)
            if board:
                board.log_epoch(row, val.confusion)
            if ctx.main:
                write_epoch_files(run_dir, epoch, val.confusion, classes, per_class)
            print(f"epoch {epoch}/{total_epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                  f"val loss {val.loss:.4f} acc {val.acc:.4f}" + (f"  ema acc {ema_val.acc:.4f}" if ema_val else "")
                  + f"  {row['images_per_s']:,.0f} images/s", file=log)

            # best.pt, best-epochNNN.pt and best_ema.pt are written before last.pt: a crash in between replays
            # this epoch on resume, which writes them again.
            score = row[cfg.monitor]
            if run.best_score is None or _better(score, run.best_score, cfg.monitor):
                run.best_score, run.best_acc, run.best_epoch = score, val.acc, epoch
                save(weights(model, epoch), os.path.join(run_dir, "best.pt"))
            if cfg.keep_best and _ranks_in(score, run.kept_best, cfg.keep_best, cfg.monitor):
                save(weights(model, epoch), os.path.join(run_dir, _best_file(epoch)))
                run.kept_best = sorted(run.kept_best + [[score, epoch]],
                                       key=lambda k: (-MONITORS[cfg.monitor] * k[0], k[1]))[: cfg.keep_best]
            if ema is not None:
                save(weights(ema.module, epoch), os.path.join(run_dir, "last_ema.pt"))
                ema_score = row["ema_" + cfg.monitor]
                if run.best_ema_score is None or _better(ema_score, run.best_ema_score, cfg.monitor):
                    run.best_ema_score = ema_score
                    save(weights(ema.module, epoch), os.path.join(run_dir, "best_ema.pt"))
            # Early stopping: patience counts epochs since the monitored metric last improved by more than min_delta.
            if run.stop_best is None or _better(score, run.stop_best, cfg.monitor, cfg.min_delta):
                run.stop_best, run.bad_epochs = score, 0
            else:
                run.bad_epochs += 1
            if cfg.early_stop and run.bad_epochs >= cfg.early_stop and epoch < total_epochs:
                run.stop_reason = (f"early stop after epoch {epoch}: {cfg.monitor} has not improved on "
                                   f"{run.stop_best:.4g} by more than {cfg.min_delta:g} for {run.bad_epochs} epochs")
            save(checkpoint(EpochState(), epoch + 1), last_path)
            if ctx.main:
                _prune_best_files(run_dir, run.kept_best)
            epoch_state = EpochState()
            if run.stop_reason:
                print(f"cnnkit: {run.stop_reason}; best {cfg.monitor} {run.best_score:.4g} at epoch {run.best_epoch}",
                      file=log)
                break

    tta_acc = None
    if cfg.tta:
        tta_model = TTAModel(model, mean, std, flip=True, shift=1).to(device)
        tta_acc = evaluate_model(tta_model, val_loader, len(classes), device, amp_dtype).acc
        print(f"test-time augmentation (mirror and 1-pixel shifts, softmax averaged): val acc {tta_acc:.4f}", file=log)
    if cfg.overfit_batches:
        print(overfit_verdict(val.acc, val.loss, len(val_set), cfg.overfit_batches), file=log)
    result = TrainResult(
        val_acc=val.acc, val_loss=val.loss, best_val_acc=run.best_acc, best_epoch=run.best_epoch,
        epochs=total_epochs, train_acc=train_acc, train_loss=train_loss,
        train_time_s=time.perf_counter() - start, images_per_s=run.images_seen / max(run.train_seconds, 1e-9),
        run_dir=run_dir, model=cfg.model, data=cfg.data, precision=precision_name(amp_dtype),
        num_train=len(train_set), num_val=len(val_set), params=params, skipped_images=len(skipped_images),
        skipped_batches=run.skipped_batches, tta_val_acc=tta_acc, wall_time_s=time.perf_counter() - wall_start,
        epochs_run=len(run.history), stop_reason=run.stop_reason or "completed", monitor=cfg.monitor,
        best_score=run.best_score, ema_val_acc=ema_val.acc if ema_val else None,
        threads=threads,
    )
    _write_json(run_dir, "result.json", dataclasses.asdict(result))
    distributed.cleanup(ctx)
    if board:
        board.close()
    if ctx.main and cfg.plots:  # --report sets plots too (_make_config)
        from cnnkit.report.html import show_run

        show_run(run_dir, report=cfg.report, device=cfg.device, log=log)
    return result


def overfit_verdict(acc: float, loss: float, images: int, batches: int) -> str:
    """Whether ``--overfit-batches`` memorised its batches: ``acc`` and ``loss`` in eval mode on the very
    ``images`` it trained on."""
    head = f"cnnkit: --overfit-batches {batches}: "
    if acc >= MEMORISED_ACC:
        return head + f"memorised: accuracy {acc:.4f} on the {images} images it trained on (in eval mode)"
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
    step_losses: list[torch.Tensor] | None = None,
    mix: Mix | None = None,
    accum_steps: int = 1,
    ema: WeightEMA | None = None,
) -> EpochState:
    """One pass over ``loader`` (from ``state.batch`` on, for a resumed epoch); returns the epoch's sums.

    The optimizer steps once every ``accum_steps`` batches (and after the epoch's last batch) on the mean
    gradient of those batches; the schedule counts optimizer steps. ``mix`` (mixup/CutMix) blends each batch and
    trains on soft targets: train accuracy then counts a prediction as right when it names the class with the
    larger share of the blended image. ``ema`` follows the weights after every optimizer step.
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
    # read as non-finite too, long after training has diverged): no per-step work, which on a 2-core CPU was
    # 1-2% of simple_cnn's step. nan="skip" must decide per step, so it reads each one.
    checked = state.batch  # every batch before this one had a finite loss
    for images, labels in loader.batches(state.batch):
        targets = labels
        if mix is not None:  # drawn from the batch's own seed, so a resumed run mixes it the same way
            images, targets = mix(images, labels, loader.batch_seed(state.batch))
            labels = targets.argmax(1)  # for the accuracy: the class with the larger share
        bn_before = [b.clone() for b in bn_buffers]  # only with nan="skip": a skipped batch must not touch them
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits, targets)
        if step_losses is not None:
            step_losses.append(loss.detach())
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
            checked = _check_finite(loss_sum, checked, state, optimizer)
        if state.batch % accum_steps == 0 or state.batch == len(loader):  # an optimizer step
            if pending:
                if clip_grad:
                    scaler.unscale_(optimizer)
                    # The norm before clipping is what tells whether the clipping threshold fits the run.
                    grad_norm_sum += torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
                    state.clipped_steps += 1
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                pending = 0
            scheduler.step()  # the schedule counts steps, skipped ones too, so it ends where it was planned to
            # Stopping and saving only between optimizer steps: accumulated gradients are not in a checkpoint.
            if stop is not None and _any_process_stopping(stop):
                if nan == "stop":
                    _check_finite(loss_sum, checked, state, optimizer)  # the caller saves what it has: it must be good
                break
            if save_every and save and state.batch % (save_every * accum_steps) == 0 and state.batch < len(loader):
                save(dataclasses.replace(state, loss_sum=loss_sum.item(), correct=correct.item(),
                                         grad_norm_sum=grad_norm_sum.item(),
                                         seconds=state.seconds + time.perf_counter() - t0))
        if not bar.disable and (state.batch % 20 == 0 or state.batch == len(loader)):
            bar.set_postfix(loss=f"{loss_sum.item() / max(state.seen, 1):.3f}",
                            acc=f"{correct.item() / max(state.seen, 1):.3f}",
                            img_s=f"{(state.seen - seen_before) / (time.perf_counter() - t0):,.0f}")
            bar.update(state.batch - bar.n)
    bar.close()
    state.seconds += time.perf_counter() - t0
    state.loss_sum, state.correct, state.grad_norm_sum = loss_sum.item(), correct.item(), grad_norm_sum.item()
    return state


def _check_finite(loss_sum: torch.Tensor, checked: int, state: EpochState, optimizer: torch.optim.Optimizer) -> int:
    """Raise NonFiniteLoss if the running loss sum has become non-finite on any process since batch ``checked``
    (before which all was finite); else return the batch up to which all is now known finite."""
    bad = distributed.all_reduce_sum((~torch.isfinite(loss_sum)).to(torch.int32).reshape(1))
    if bad.item():
        where = f"at batch {state.batch}" if checked + 1 == state.batch else \
            f"between batches {checked + 1} and {state.batch}"
        raise NonFiniteLoss(
            f"the loss became non-finite {where} of this epoch (lr {optimizer.param_groups[0]['lr']:.3g}); likely "
            "causes: a learning rate too high, exploding gradients, or bad input values. Lower --lr, add "
            "--clip-grad 1.0, or pass --nan skip"
        )
    return state.batch


@contextlib.contextmanager
def _divergence(run_dir: str, current_epoch: Callable[[], int], lr_search: Any) -> Iterator[None]:
    """Within the block, a NonFiniteLoss ends the run with a message that names the epoch, what the run folder
    still holds and, for ``--lr auto``, where the rate came from; ``stop.json`` marks the run as diverged."""
    try:
        yield
    except NonFiniteLoss as e:
        epoch = current_epoch()
        message = f"epoch {epoch}: {e}; {_kept_checkpoints(run_dir)}"
        if lr_search is not None:
            message += (f"; the rate came from --lr auto (the range test's suggestion {lr_search.suggestion:.3g}, "
                        f"rule '{lr_search.method}', in lr_find.json): pass a lower fixed --lr")
        _write_json(run_dir, "stop.json", {"status": "diverged", "epoch": epoch, "message": message})
        raise NonFiniteLoss(message) from None


def _kept_checkpoints(run_dir: str) -> str:
    """What a run that fails now leaves to resume from or use, in words."""
    path = os.path.join(run_dir, "last.pt")
    if not os.path.exists(path):
        return "no checkpoint had been written yet, so the run folder holds none"
    state = read_payload(path)["resume"]
    epoch, batch = state["run"]["epoch"], state["epoch_state"]["batch"]
    at = f"epoch {epoch}, batch {batch}" if batch else f"the end of epoch {epoch - 1}"
    has_best = os.path.exists(os.path.join(run_dir, "best.pt"))
    best = f" and best.pt (epoch {state['run']['best_epoch']})" if has_best else ""
    return f"kept: last.pt (the state at {at}){best}, both from before the failure"


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


@torch.no_grad()
def evaluate_model(
    model: nn.Module, loader: BatchLoader, num_classes: int, device: torch.device, amp_dtype: torch.dtype | None
) -> EvalStats:
    """Loss, accuracy, top-5 accuracy and confusion matrix of ``model`` on ``loader`` in eval mode
    (BatchNorm uses its running statistics, Dropout is off). Every module's mode is restored afterwards.
    For test-time augmentation pass the model wrapped in ``cnnkit.tta.TTAModel``."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    k = min(5, num_classes)
    # Not model.train() afterwards: that would also switch on BatchNorm layers that were frozen in eval mode.
    with eval_mode(model):
        for images, labels in loader:
            with autocast(device, amp_dtype):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
            confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    # Each process evaluated its own share of the images, each image exactly once: the sums are the whole set's.
    for t in (loss_sum, top5, confusion):
        distributed.all_reduce_sum(t)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    return EvalStats(loss=loss_sum.item() / max(n, 1), acc=confusion.diag().sum().item() / max(n, 1),
                     top5=top5.item() / max(n, 1), confusion=confusion, count=n)


class StopSignals:
    """Within the block, SIGINT and SIGTERM ask the loop to stop after the current step (a second SIGINT
    stops at once). Outside the main thread, where handlers cannot be installed, it does nothing."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _write_metrics(run_dir: str, history: list[dict]) -> None:
    """metrics.csv, rewritten whole from the run's history (so a resumed run never holds a duplicated row)."""
    if not _is_main_process():
        return
    with open(os.path.join(run_dir, "metrics.csv"), "w", newline="") as f:
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


def _write_step_losses(run_dir: str, epoch: int, last_step: int, losses: list[torch.Tensor]) -> None:
    """steps.csv: the loss of every step (averaged over processes), appended at the end of each epoch and before
    each save, so that no step waits for its loss to be read; ``losses`` end at step ``last_step`` and are
    emptied."""
    if not losses:
        return
    first_step = last_step - len(losses) + 1
    values = distributed.all_reduce_sum(torch.stack(losses).float().detach().clone())
    values /= torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    losses.clear()
    if not _is_main_process():
        return
    path = os.path.join(run_dir, "steps.csv")
    new = not os.path.exists(path)
    with open(path, "a") as f:
        if new:
            f.write("epoch,step,loss\n")
        f.writelines(f"{epoch},{first_step + i},{v:.8g}\n" for i, v in enumerate(values.tolist()))


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
    keep = [row for row in rows if _step_of(row) <= (epoch, step)]
    if len(keep) < len(rows):
        atomic_write(path, lambda f: f.write("".join([header, *keep]).encode()))


def _step_of(row: str) -> tuple[int, int]:
    """(epoch, step) of a steps.csv row; past any real step for a row a killed process left half-written."""
    try:
        epoch, step, loss = row.split(",")
        float(loss)
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


def _sample(data: ImageSet, count: int, seed: int) -> ImageSet:
    """``count`` images of ``data`` drawn at random with ``seed`` (all of them if it has fewer), in their order."""
    if len(data) <= count:
        return data
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    return data.subset(idx.sort().values)


def _resume_payload(run_dir: str) -> dict[str, Any]:
    if not os.path.isdir(run_dir):
        raise UserError(f"--resume {run_dir}: not a run folder; pass the folder a previous `cnnkit train` wrote")
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
    return payload


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_run_dir(cfg: TrainConfig) -> str:
    """``cfg.out`` (which must be new or empty), or a new ``runs/<timestamp>-<model>``."""
    if cfg.out:
        path = cfg.out
        if os.path.isdir(path) and os.listdir(path):
            raise UserError(f"run folder {path} already holds files; pass a new --out folder "
                            "(or --resume it to continue that run)")
    else:
        base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.model}")
        path, i = base, 2
        while os.path.exists(path):
            path, i = f"{base}-{i}", i + 1
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".write-test")
        open(probe, "w").close()
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write the run folder {path} ({e.strerror}); pass a writable --out") from None
    return path


def _make_config(config: TrainConfig | None, overrides: dict) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise UserError(f"unknown training option(s): {', '.join(unknown)}")
    # A recipe sets its options first; whatever else the caller passes wins over it.
    base = config or TrainConfig(**recipe_options(overrides.get("recipe"), overrides.get("overfit_batches", 0)))
    cfg = with_data_defaults(dataclasses.replace(base, **overrides))  # config.json records what they became
    if cfg.report and not cfg.plots:  # the report embeds the plots, so they are written too: config.json says so
        cfg = dataclasses.replace(cfg, plots=True)
    for f in dataclasses.fields(cfg):  # nan slips through the range checks below, inf through some: both fail mid-run
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not -float("inf") < value < float("inf"):
            raise UserError(f"{f.name} must be a finite number, got {value}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise UserError(f"{name.replace('_', ' ')} must be a positive whole number, got {getattr(cfg, name)}")
    if cfg.lr is not None and cfg.lr != "auto" and not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0):
        raise UserError(f"learning rate must be positive or 'auto', got {cfg.lr}")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"label smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.weight_decay < 0 or cfg.warmup_epochs < 0 or cfg.momentum < 0 or cfg.save_every < 0:
        raise UserError("weight decay, warm-up, momentum and --save-every cannot be negative")
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        raise UserError(f"--clip-grad must be positive, got {cfg.clip_grad}")
    if cfg.augment_policy not in (None, *AUGMENT_POLICIES):
        raise UserError(f"--augment-policy must be one of {', '.join(AUGMENT_POLICIES)}, not '{cfg.augment_policy}'")
    if not 0 <= cfg.random_erasing <= 1:
        raise UserError(f"--random-erasing is a probability in [0, 1], got {cfg.random_erasing}")
    if cfg.cutout < 0:
        raise UserError(f"--cutout must be 0 (off) or a side in pixels, got {cfg.cutout}")
    if cfg.class_weights not in (None, "auto"):
        raise UserError(f"--class-weights takes 'auto' (weights inversely proportional to class frequency), "
                        f"not '{cfg.class_weights}'")
    if cfg.decode not in DECODE_CHOICES:  # before minutes of data loading (BatchLoader checks it too, for its callers)
        raise UserError(f"--decode must be one of {', '.join(DECODE_CHOICES)}, not '{cfg.decode}'")
    if cfg.nan not in NAN_POLICIES:
        raise UserError(f"--nan must be one of {', '.join(NAN_POLICIES)}, not '{cfg.nan}'")
    if cfg.tensorboard:
        require_tensorboard()  # before any data is loaded or a run folder made
    for name in ("mixup", "cutmix", "min_delta"):
        if not isinstance(getattr(cfg, name), (int, float)) or not getattr(cfg, name) >= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a number, 0 or more, got {getattr(cfg, name)}")
    for name in ("accum_steps", "mix_off_epochs", "keep_best", "overfit_batches"):
        least = 1 if name == "accum_steps" else 0
        if not isinstance(getattr(cfg, name), int) or isinstance(getattr(cfg, name), bool) or getattr(cfg, name) < least:
            raise UserError(f"--{name.replace('_', '-')} must be a whole number, {least} or more, got {getattr(cfg, name)}")
    if cfg.mix_off_epochs and not (cfg.mixup or cfg.cutmix):
        raise UserError("--mix-off-epochs switches mixing off for the last epochs; it needs --mixup or --cutmix")
    if cfg.mix_off_epochs and not cfg.stages and cfg.mix_off_epochs >= cfg.epochs:
        raise UserError(f"--mix-off-epochs {cfg.mix_off_epochs} leaves no epoch of the {cfg.epochs} to mix in; "
                        "make it smaller than --epochs")
    if cfg.ema is not None and not (isinstance(cfg.ema, (int, float)) and 0 < cfg.ema < 1):
        raise UserError(f"--ema takes the decay of the moving average, between 0 and 1 (e.g. 0.999), got {cfg.ema}")
    if cfg.early_stop is not None and (not isinstance(cfg.early_stop, int) or cfg.early_stop < 1):
        raise UserError(f"--early-stop takes the patience in epochs, a whole number of 1 or more, got {cfg.early_stop}")
    if cfg.monitor not in MONITORS:
        raise UserError(f"--monitor must be one of {', '.join(MONITORS)}, not '{cfg.monitor}'")
    return cfg
