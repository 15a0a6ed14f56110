"""The training loop: ``train`` reads top to bottom — data, model, optimizer, run folder, then epochs of
``train_one_epoch`` and ``evaluate_model``, checkpointing after each.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from cnnkit.data.loader import Augment, BatchLoader, channel_stats
from cnnkit.data.sources import DataSpec, load_splits
from cnnkit.errors import UserError
from cnnkit.models.registry import check_model_name, create_model
from cnnkit.train.checkpoint import make_payload, save_checkpoint
from cnnkit.train.config import TrainConfig, TrainResult
from cnnkit.train.optim import DEFAULT_LR, make_optimizer, make_scheduler
from cnnkit.train.precision import autocast, precision_name, resolve_device, resolve_precision

METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "val_top5", "epoch_time_s", "images_per_s"]
NO_FLIP_DATA = ("mnist",)  # mirrored digits are other symbols


@dataclass
class EvalStats:
    """Loss, top-1 and top-5 accuracy and the confusion matrix (rows: true class, columns: predicted)."""

    loss: float
    acc: float
    top5: float
    confusion: torch.Tensor
    count: int


def train(config: TrainConfig | None = None, log: IO[str] | None = None, **overrides) -> TrainResult:
    """Train a model as ``config`` (or keyword overrides of the defaults) says; returns the run's results.

    Example: ``cnnkit.train(model="simple_cnn", data="cifar10", epochs=15)``.
    """
    cfg = _make_config(config, overrides)
    check_model_name(cfg.model)  # before minutes of data loading
    log = log or sys.stdout
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)

    # Data: decoded once into uint8 tensors; augmentation happens per batch on the device.
    spec = DataSpec(cfg.data, cfg.data_dir, cfg.download, cfg.val_data, cfg.val_split, cfg.input_size,
                    cfg.channels, cfg.num_samples)
    train_set, val_set = load_splits(spec)
    classes = train_set.classes
    mean, std = channel_stats(train_set)
    augment = Augment(
        crop_pad=train_set.size // 8 if cfg.crop_pad is None else cfg.crop_pad,
        flip=(cfg.data not in NO_FLIP_DATA) if cfg.flip is None else cfg.flip,
    )
    train_loader = BatchLoader(train_set, cfg.batch_size, mean, std, device, shuffle=True, augment=augment,
                               seed=cfg.seed, drop_last=len(train_set) >= cfg.batch_size,
                               channels_last=cfg.channels_last, workers=cfg.workers)
    val_loader = BatchLoader(val_set, cfg.eval_batch_size, mean, std, device, channels_last=cfg.channels_last,
                             workers=cfg.workers)

    # Model, optimizer and the per-step learning-rate schedule.
    model = create_model(cfg.model, num_classes=len(classes), in_channels=train_set.channels,
                         input_size=train_set.size, **cfg.model_options)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR.get(cfg.optimizer, 0.01)
    optimizer = make_optimizer(model, cfg.optimizer, lr, cfg.weight_decay, cfg.momentum, cfg.nesterov)
    steps_per_epoch = len(train_loader)
    scheduler = make_scheduler(optimizer, cfg.schedule, cfg.epochs * steps_per_epoch,
                               int(cfg.warmup_epochs * steps_per_epoch))
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # The run folder is made only now, after every input has been checked.
    run_dir = make_run_dir(cfg)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), "out": run_dir, "lr": lr}, f, indent=2)
    params = sum(p.numel() for p in model.parameters())
    print(f"cnnkit: {cfg.model} ({params:,} parameters) on {len(train_set):,} training and {len(val_set):,} "
          f"validation images of {train_set.channels}x{train_set.size}x{train_set.size} from {cfg.data}; "
          f"{device.type}, {precision_name(amp_dtype)}; run folder {run_dir}", file=log)

    metrics_file = open(os.path.join(run_dir, "metrics.csv"), "w", newline="")
    writer = csv.DictWriter(metrics_file, fieldnames=METRIC_COLUMNS)
    writer.writeheader()
    best_acc, best_epoch, train_seconds, images_seen = -1.0, 0, 0.0, 0
    start = time.perf_counter()
    try:
        for epoch in range(1, cfg.epochs + 1):
            train_loader.set_epoch(epoch)
            current_lr = optimizer.param_groups[0]["lr"]
            t0 = time.perf_counter()
            train_loss, train_acc, seen = train_one_epoch(
                model, train_loader, optimizer, scheduler, criterion, device, amp_dtype,
                desc=f"epoch {epoch}/{cfg.epochs}", progress=cfg.progress,
            )
            epoch_seconds = time.perf_counter() - t0
            train_seconds += epoch_seconds
            images_seen += seen
            val = evaluate_model(model, val_loader, len(classes), device, amp_dtype)

            row = {"epoch": epoch, "lr": current_lr, "train_loss": train_loss, "train_acc": train_acc,
                   "val_loss": val.loss, "val_acc": val.acc, "val_top5": val.top5,
                   "epoch_time_s": epoch_seconds, "images_per_s": seen / epoch_seconds}
            writer.writerow(row)
            metrics_file.flush()
            print(f"epoch {epoch}/{cfg.epochs}  train loss {train_loss:.4f} acc {train_acc:.4f}  "
                  f"val loss {val.loss:.4f} acc {val.acc:.4f}  {seen / epoch_seconds:,.0f} images/s", file=log)

            payload = make_payload(model, classes, train_set.size, train_set.channels, mean, std,
                                   epoch=epoch, metrics=row, config=dataclasses.asdict(cfg))
            save_checkpoint(payload, os.path.join(run_dir, "last.pt"))
            if val.acc > best_acc:
                best_acc, best_epoch = val.acc, epoch
                save_checkpoint(payload, os.path.join(run_dir, "best.pt"))
    finally:
        metrics_file.close()

    result = TrainResult(
        val_acc=val.acc, val_loss=val.loss, best_val_acc=best_acc, best_epoch=best_epoch, epochs=cfg.epochs,
        train_acc=train_acc, train_loss=train_loss, train_time_s=time.perf_counter() - start,
        images_per_s=images_seen / train_seconds, run_dir=run_dir, model=cfg.model, data=cfg.data,
        precision=precision_name(amp_dtype), num_train=len(train_set), num_val=len(val_set), params=params,
    )
    with open(os.path.join(run_dir, "result.json"), "w") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)
    return result


def train_one_epoch(
    model: nn.Module,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    desc: str = "",
    progress: bool = True,
) -> tuple[float, float, int]:
    """One pass over ``loader``; returns mean training loss, training accuracy and the images seen."""
    model.train()  # BatchNorm: batch statistics, running averages updated; Dropout: on
    # Running sums stay on the device: reading them every step would make a GPU wait for each batch.
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    bar = tqdm(total=len(loader), desc=desc, leave=False, unit="batch", dynamic_ncols=True,
               disable=not (progress and sys.stderr.isatty()))
    t0 = time.perf_counter()
    for step, (images, labels) in enumerate(loader, 1):
        with autocast(device, amp_dtype):
            logits = model(images)
            loss = criterion(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        loss_sum += loss.detach() * len(labels)
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += len(labels)
        if not bar.disable and (step % 20 == 0 or step == len(loader)):
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                            img_s=f"{seen / (time.perf_counter() - t0):,.0f}")
            bar.update(step - bar.n)
    bar.close()
    return loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), seen


@torch.no_grad()
def evaluate_model(
    model: nn.Module, loader: BatchLoader, num_classes: int, device: torch.device, amp_dtype: torch.dtype | None
) -> EvalStats:
    """Loss, accuracy, top-5 accuracy and confusion matrix of ``model`` on ``loader`` in eval mode
    (BatchNorm uses its running statistics, Dropout is off). The model's mode is restored afterwards."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    k = min(5, num_classes)
    try:
        for images, labels in loader:
            with autocast(device, amp_dtype):
                logits = model(images)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
            confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    finally:
        model.train(was_training)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    return EvalStats(loss=loss_sum.item() / max(n, 1), acc=confusion.diag().sum().item() / max(n, 1),
                     top5=top5.item() / max(n, 1), confusion=confusion, count=n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_run_dir(cfg: TrainConfig) -> str:
    """``cfg.out`` (which must be new or empty), or a new ``runs/<timestamp>-<model>``."""
    if cfg.out:
        path = cfg.out
        if os.path.isdir(path) and os.listdir(path):
            raise UserError(f"run folder {path} already holds files; pass a new --out folder")
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
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            raise UserError(f"{name.replace('_', ' ')} must be a positive whole number, got {getattr(cfg, name)}")
    if cfg.lr is not None and not cfg.lr > 0:
        raise UserError(f"learning rate must be positive, got {cfg.lr}")
    if not 0 <= cfg.label_smoothing < 1:
        raise UserError(f"label smoothing must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.weight_decay < 0 or cfg.warmup_epochs < 0 or cfg.momentum < 0:
        raise UserError("weight decay, warm-up and momentum cannot be negative")
    return cfg
