"""Per-class precision, recall and F1 from a confusion matrix, and the files a run keeps of them every epoch.

``per_class.csv`` (one row per epoch and class) and ``confusion/epoch-NNN.csv`` (rows: true class, columns:
predicted class) in the run folder; the macro averages go into ``metrics.csv``.
"""

from __future__ import annotations

import csv
import os

import torch

PER_CLASS_COLUMNS = ["epoch", "class", "precision", "recall", "f1", "support"]


def per_class_metrics(confusion: torch.Tensor, classes: list[str]) -> list[dict]:
    """For each class: precision (of the images predicted as it), recall (of its images), F1 and support
    (its number of images). None (null in JSON, empty in per_class.csv, "-" in eval's table) where there is no
    figure, which a mean over the rows must not take for a measured 0: the precision of a class never predicted
    (0/0), the recall and F1 of a class without images. F1 is 2 TP / (2 TP + FP + FN), as scikit-learn computes
    it: 0 for a class with images that is never predicted."""
    rows = []
    for c, name in enumerate(classes):
        hits, predicted, support = int(confusion[c, c]), int(confusion[:, c].sum()), int(confusion[c, :].sum())
        precision = hits / predicted if predicted else None
        recall = hits / support if support else None
        f1 = 2 * hits / (support + predicted) if support else None
        rows.append({"class": name, "precision": precision, "recall": recall, "f1": f1, "support": support})
    return rows


def macro_averages(confusion: torch.Tensor, rows: list[dict]) -> dict[str, float]:
    """Unweighted means of precision, recall and F1 over the classes that occur in the data or the predictions
    (as scikit-learn's ``average="macro"``): every class counts the same, however rare. An undefined value (None
    in ``rows``) counts 0, as scikit-learn's default ``zero_division`` does: a class never predicted lowers the
    macro precision, one predicted but without images the macro recall and F1."""
    present = [r for c, r in enumerate(rows) if confusion[c, :].sum() or confusion[:, c].sum()]
    n = max(len(present), 1)
    return {key: sum(r[name] or 0.0 for r in present) / n
            for key, name in (("macro_precision", "precision"), ("macro_recall", "recall"), ("macro_f1", "f1"))}


def write_epoch_files(run_dir: str, epoch: int, confusion: torch.Tensor, classes: list[str], rows: list[dict]) -> None:
    """Add ``epoch``'s rows to per_class.csv (replacing any it already had, as after a resumed run replays an
    epoch) and write its confusion matrix."""
    path = os.path.join(run_dir, "per_class.csv")
    kept = []
    if os.path.exists(path):
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if int(r["epoch"]) < epoch]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=PER_CLASS_COLUMNS)
        writer.writeheader()
        writer.writerows(kept)
        writer.writerows({"epoch": epoch, **r} for r in rows)
    os.makedirs(os.path.join(run_dir, "confusion"), exist_ok=True)
    with open(os.path.join(run_dir, "confusion", f"epoch-{epoch:03d}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["true \\ predicted", *classes])
        writer.writerows([name, *row] for name, row in zip(classes, confusion.tolist()))
