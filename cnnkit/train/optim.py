"""Optimizers and learning-rate schedules, one learning rate per step."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cnnkit.errors import UserError
from cnnkit.models.heads import find_head

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "step", "constant")
DEFAULT_LR = {"sgd": 0.05, "adamw": 2e-3}


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9, nesterov: bool = True,
    backbone_lr: float | None = None,
) -> torch.optim.Optimizer:
    """SGD or AdamW over the trainable parameters. Weight decay applies to weights of conv and linear layers
    only: decaying biases and BatchNorm scales pulls them towards zero for no gain in generalisation.
    ``backbone_lr``: everything but the classifier head learns at this rate (discriminative learning rates)."""
    head = find_head(model)[0] + "."
    groups = []
    for is_head in (True, False):
        for decays in (True, False):
            params = [p for n, p in model.named_parameters()
                      if p.requires_grad and (p.ndim > 1) == decays and n.startswith(head) == is_head]
            if params:
                group_lr = lr if is_head or backbone_lr is None else backbone_lr
                groups.append({"params": params, "lr": group_lr, "weight_decay": weight_decay if decays else 0.0})
    if not groups:
        raise UserError("no parameter is left trainable; check --freeze/--unfreeze/--stages")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not '{name}'")


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning rate at ``step`` (of ``total``) as a fraction of the peak.

    ``onecycle``: linear warm-up to the peak over ``warmup`` steps (30% of the run when 0), then cosine
    annealing to zero (fastai's fit_one_cycle). ``cosine``: optional warm-up, then cosine to zero.
    ``step``: optional warm-up, then x0.1 at 50% and 75% of the run. ``constant``: optional warm-up.
    """
    if schedule == "onecycle" and warmup == 0:
        warmup = max(1, int(0.3 * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule in ("onecycle", "cosine"):
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if schedule == "step":
        return 0.1 ** (int(progress >= 0.5) + int(progress >= 0.75))
    if schedule == "constant":
        return 1.0
    raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, not '{schedule}'")


def make_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    lr_factor(schedule, 0, total_steps, warmup_steps)  # rejects an unknown name before training starts
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(schedule, step, total_steps, warmup_steps)
    )
