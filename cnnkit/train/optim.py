"""Optimizers and learning-rate schedules, one learning rate per step."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from cnnkit.choices import OPTIMIZERS, SCHEDULES
from cnnkit.errors import UserError
from cnnkit.models.heads import find_head
from cnnkit.train.precision import cpu_has_bf16

DEFAULT_LR = {"sgd": 0.05, "adamw": 2e-3, "muon": 0.24}
# Muon's companions, as multiples of the filters' learning rate times the batch size (airbench94_muon's
# rates were tuned with a summed loss; cnnkit's loss is a mean over the batch).
MUON_BIAS_LR = 0.053 / 0.24
MUON_HEAD_LR = 0.67 / 0.24


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.9, nesterov: bool = True,
    backbone_lr: float | None = None, batch_size: int = 1,
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
    if name == "muon":
        if backbone_lr is not None:  # check_config refuses it for a run; here for Python callers
            raise UserError("backbone_lr sets the rate below the head for sgd and adamw; muon sets its own rates")
        return _muon(model, lr, weight_decay, batch_size, head)
    # PyTorch's fused kernels update each tensor in one pass over its weights, gradients and state; the default
    # on a CPU is a loop of separate operations, each a pass over memory, and simple_cnn's 2 MB head weights and
    # their state do not stay in cache (measured in docs/design.md, "The training step"). The arithmetic is the
    # same, rounded in a different order.
    fused = all(p.device.type in ("cpu", "cuda") for group in groups for p in group["params"]) or None
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
                               fused=fused)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, not '{name}'")


def lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """The learning rate at ``step`` (of ``total``) as a fraction of the peak.

    ``linear``: optional warm-up, then a straight line down to zero (the fast recipe's).
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
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
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


def _muon(model: nn.Module, lr: float, weight_decay: float, batch_size: int, head: str) -> "Muon":
    """Muon for the convolution filters; Nesterov SGD for biases and the head, at their own rates."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    filters = [p for n, p in params if p.ndim == 4]
    head_params = [p for n, p in params if p.ndim != 4 and n.startswith(head)]
    others = [p for n, p in params if p.ndim != 4 and not n.startswith(head)]
    groups = [{"params": filters, "lr": lr, "muon": True, "momentum": 0.6, "weight_decay": 0.0}]
    # The SGD groups' decay is scaled so that the decay per step does not change with their learning rate.
    for group_params, scale in ((others, MUON_BIAS_LR), (head_params, MUON_HEAD_LR)):
        if group_params:
            group_lr = lr * scale * batch_size
            groups.append({"params": group_params, "lr": group_lr, "muon": False, "momentum": 0.85,
                           "weight_decay": weight_decay * batch_size / group_lr})
    return Muon(groups)


class Muon(torch.optim.Optimizer):
    """Muon (Jordan et al. 2024) on groups marked ``muon``: Nesterov momentum, then the update replaced by
    the nearest semi-orthogonal matrix (Newton-Schulz iterations), so every direction of a layer's filter
    space moves at the same rate; the weights are kept at a fixed norm. Groups not marked ``muon`` take
    plain Nesterov SGD steps with coupled weight decay."""

    def __init__(self, groups: list[dict]) -> None:
        super().__init__(groups, {"lr": 0.0, "momentum": 0.9, "weight_decay": 0.0, "muon": False})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        # Each line is one operation over all of a group's tensors (torch._foreach_*): on a GPU the step of a
        # small network is bound by how fast the CPU launches kernels, and a loop over tensors launches one per
        # tensor per operation. The arithmetic is that of the loop, tensor by tensor.
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            lr, momentum = group["lr"], group["momentum"]
            grads = [p.grad for p in params]
            if not group["muon"] and group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(g)) for p, g in zip(params, grads)]
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
            updates = torch._foreach_add(grads, bufs, alpha=momentum)  # Nesterov
            if group["muon"]:
                norms = torch._foreach_norm(params)
                torch._foreach_mul_(params, [len(p) ** 0.5 / n for p, n in zip(params, norms)])
                updates = orthogonalize_all(updates)
            torch._foreach_add_(params, [u.to(p.dtype) for p, u in zip(params, updates)], alpha=-lr)


def orthogonalize_all(updates: list[torch.Tensor]) -> list[torch.Tensor]:
    """``orthogonalize`` of each update as a matrix (filters flattened per output channel), shaped back."""
    return [orthogonalize(u.reshape(len(u), -1)).view(u.shape) for u in updates]


def orthogonalize(g: torch.Tensor, steps: int = 3, eps: float = 1e-7) -> torch.Tensor:
    """About U V^T of g = U S V^T, by a quintic Newton-Schulz iteration in bf16 (Muon's; its coefficients
    trade exactness, singular values end in about [0.5, 1.5], for needing only a few steps). In fp32 on a CPU
    without bf16 matrix instructions (every AVX2-only one), where bf16 products are emulated, many times slower."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.bfloat16() if g.device.type != "cpu" or cpu_has_bf16() else g.float()
    x = x / (x.norm() + eps)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * s @ s) @ x
    return x.T if tall else x
