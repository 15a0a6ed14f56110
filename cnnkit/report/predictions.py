"""What a run's checkpoint predicts for each validation image: probabilities and losses per image, and from
them the confusion matrix and per-class precision, recall and F1.

The figures match ``cnnkit.evaluate`` on the same checkpoint (the same validation set, batches, precision and
eval mode: the one evaluation loop, ``cnnkit.train.evaluation.eval_batches``); this pass also keeps each
image's probabilities, which the top-losses grid and the choice of images for Grad-CAM need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnnkit.data.images import load_image
from cnnkit.data.loader import BatchLoader
from cnnkit.data.sources import ImageSet
from cnnkit.evaluate import training_validation_set
from cnnkit.checkpoint import Checkpoint
from cnnkit.train.evaluation import eval_batches
from cnnkit.train.metrics import per_class_metrics
from cnnkit.train.precision import resolve_device, resolve_precision


@dataclass
class ClassMetrics:
    """A class's row of ``cnnkit.train.metrics.per_class_metrics``, which says where a figure is None."""

    name: str
    precision: float | None  # of the images predicted as this class, the share that are it; None: never predicted
    recall: float | None  # of the images of this class, the share predicted as it; None: no images of it
    f1: float | None  # harmonic mean of precision and recall (2 TP / (2 TP + FP + FN)); None: no images of it
    support: int  # validation images of this class


@dataclass
class Predictions:
    """Per-image results of one checkpoint on its validation set (rows in the set's order)."""

    data: ImageSet
    classes: list[str]
    probs: torch.Tensor  # N x K, softmax, float32
    losses: torch.Tensor  # N, cross-entropy of the true class
    labels: torch.Tensor  # N, true class
    checkpoint: str

    @property
    def predicted(self) -> torch.Tensor:
        return self.probs.argmax(dim=1)

    @property
    def acc(self) -> float:
        return float((self.predicted == self.labels).float().mean()) if len(self.labels) else 0.0

    @property
    def loss(self) -> float:
        return float(self.losses.double().mean()) if len(self.losses) else 0.0

    def confusion(self) -> torch.Tensor:
        """K x K counts, rows: true class, columns: predicted class."""
        k = len(self.classes)
        return torch.bincount(self.labels * k + self.predicted, minlength=k * k).view(k, k)

    def per_class(self) -> list[ClassMetrics]:
        return [ClassMetrics(r["class"], r["precision"], r["recall"], r["f1"], r["support"])
                for r in per_class_metrics(self.confusion(), self.classes)]

    @property
    def has_images(self) -> bool:
        """False when rows no longer line up with the set's files (one broke after training)."""
        return self.data.images is not None or self.data.files is not None

    def images(self, index: torch.Tensor) -> torch.Tensor:
        """uint8 images (n x C x H x W) of the rows ``index``, as the model saw them (no augmentation)."""
        if self.data.images is not None:
            return self.data.images[index]
        return torch.stack([load_image(self.data.files[i], self.data.channels, self.data.size)
                            for i in index.tolist()])

    def top_losses(self, n: int) -> torch.Tensor:
        """Row indices of the ``n`` images with the highest loss, highest first."""
        return self.losses.argsort(descending=True)[:n]

    def confident_correct(self, n: int) -> torch.Tensor:
        """Row indices of up to ``n`` correctly classified images, most confident first, one per class before
        any class repeats (so a few pictures cover several classes)."""
        correct = (self.predicted == self.labels).nonzero().flatten()
        confidence = self.probs[correct, self.labels[correct]]
        ranked = correct[confidence.argsort(descending=True)].tolist()
        labels = self.labels.tolist()
        chosen, seen = [], set()
        for i in ranked:
            if labels[i] not in seen:
                chosen.append(i)
                seen.add(labels[i])
        picked = set(chosen)
        chosen += [i for i in ranked if i not in picked]
        return torch.tensor(chosen[:n], dtype=torch.long)


@torch.no_grad()
def predict_validation(ckpt: Checkpoint, device: str = "auto", batch_size: int | None = None) -> Predictions:
    """Run ``ckpt``'s model (in eval mode) over the validation set it was trained with."""
    dev = resolve_device(device)
    cfg = ckpt.config
    data = training_validation_set(ckpt)
    amp_dtype = resolve_precision(cfg.get("precision", "auto"), dev)
    loader = BatchLoader(data, batch_size or cfg.get("eval_batch_size", 500), ckpt.mean, ckpt.std, dev,
                         channels_last=cfg.get("channels_last", True), decode=cfg.get("decode", "auto"))
    probs, losses, labels = [], [], []
    for logits, y in eval_batches(ckpt.model.to(dev), loader, dev, amp_dtype):
        probs.append(logits.softmax(dim=1).cpu())
        losses.append(F.cross_entropy(logits, y, reduction="none").cpu())
        labels.append(y.cpu())
    if loader.skipped:
        # A file that broke since training was dropped from its batch: rows no longer line up with the files.
        data = ImageSet(torch.cat(labels), data.classes, channels=data.channels, size=data.size, source=data.source)
    k = len(ckpt.classes)
    return Predictions(data, list(ckpt.classes), torch.cat(probs) if probs else torch.zeros(0, k),
                       torch.cat(losses) if losses else torch.zeros(0), torch.cat(labels) if labels else
                       torch.zeros(0, dtype=torch.long), ckpt.path)
