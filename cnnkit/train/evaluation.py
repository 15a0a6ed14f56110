"""The one evaluation loop: a model's logits over a loader in eval mode, without gradients. ``evaluate_model``
sums them into loss, accuracy and confusion matrix (the training loop's validation, ``cnnkit eval``);
``cnnkit.report.predictions`` keeps each image's probabilities from the same loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit.data.loader import BatchLoader
from cnnkit.modes import eval_mode
from cnnkit.train import distributed
from cnnkit.train.precision import autocast


@dataclass
class EvalStats:
    """Loss, top-1 and top-5 accuracy and the confusion matrix (rows: true class, columns: predicted). ``top5``
    is None with 5 classes or fewer, where every image is in the top 5 by definition."""

    loss: float
    acc: float
    top5: float | None
    confusion: torch.Tensor
    count: int


@torch.no_grad()
def eval_batches(model: nn.Module, loader: BatchLoader, device: torch.device,
                 amp_dtype: torch.dtype | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(float32 logits, labels) of each batch of ``loader``, ``model`` in eval mode (BatchNorm uses its running
    statistics, Dropout is off) and in ``amp_dtype``. Every module's mode is restored once the batches are done."""
    # Not model.train() afterwards: that would also switch on BatchNorm layers that were frozen in eval mode.
    with eval_mode(model):
        for images, labels in loader:
            with autocast(device, amp_dtype):
                logits = model(images)
            yield logits.float(), labels


@torch.no_grad()
def evaluate_model(
    model: nn.Module, loader: BatchLoader, num_classes: int, device: torch.device, amp_dtype: torch.dtype | None
) -> EvalStats:
    """Loss, accuracy, top-5 accuracy and confusion matrix of ``model`` on ``loader`` in eval mode (see
    ``eval_batches``). For test-time augmentation pass the model wrapped in ``cnnkit.tta.TTAModel``."""
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.long)
    k = min(5, num_classes)
    for logits, labels in eval_batches(model, loader, device, amp_dtype):
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        top5 += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum()
        confusion += torch.bincount(labels * num_classes + logits.argmax(1), minlength=num_classes**2)
    # Each process evaluated its own share of the images, each image exactly once: the sums are the whole set's.
    for t in (loss_sum, top5, confusion):
        distributed.all_reduce_sum(t)
    confusion = confusion.view(num_classes, num_classes).cpu()
    n = int(confusion.sum())
    return EvalStats(loss=loss_sum.item() / max(n, 1), acc=confusion.diag().sum().item() / max(n, 1),
                     top5=top5.item() / max(n, 1) if num_classes > 5 else None, confusion=confusion, count=n)
