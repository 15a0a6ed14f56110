"""``--tensorboard``: the run as TensorBoard events in ``<run>/tensorboard`` (``tensorboard --logdir runs``).

Written through PyTorch's own ``SummaryWriter``: per epoch the losses, accuracies, learning rate and speed
(step = epoch number, so a resumed run continues the same curves) and the confusion matrix as an image; once,
a batch of training images as the model sees them (augmented) and the model's graph where it can be traced.
Events are flushed after every epoch, so a stopped run keeps what it logged.

Nothing here draws from a random generator or changes the model: a run logs the same with or without it.
"""

from __future__ import annotations

import os
import warnings
from typing import IO, Any

import torch
import torch.nn as nn

from cnnkit.errors import UserError

# metrics.csv column -> TensorBoard tag; grouped by the part before the slash
SCALARS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "train_acc": "accuracy/train", "val_acc": "accuracy/val",
    "val_top5": "accuracy/val_top5", "lr": "learning_rate", "images_per_s": "speed/images_per_s",
}
SAMPLE_IMAGES = 32


def require_tensorboard() -> None:
    """A UserError naming the extra to install when the tensorboard package is missing."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("--tensorboard needs the tensorboard package: pip install 'cnnkit[tensorboard]'") from None


class TensorBoardLog:
    """The writer of one run; ``log_epoch`` after each epoch, ``close`` at the end."""

    def __init__(self, run_dir: str, classes: list[str], log: IO[str] | None = None) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.classes = classes
        self.log = log
        self.path = os.path.join(run_dir, "tensorboard")
        self.writer = SummaryWriter(self.path)

    def log_start(self, model: nn.Module, images: torch.Tensor, mean: list[float], std: list[float]) -> None:
        """A sample batch (``images``: normalised model input, un-normalised here for display) and the graph."""
        shown = images[:SAMPLE_IMAGES].detach().float().cpu()
        shown = shown * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        self.writer.add_images("data/train_batch", shown.clamp(0, 1), 0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tracing warns about every data-dependent branch
                self.writer.add_graph(model, images[:1].detach(), use_strict_trace=False)
        except Exception as e:  # some models do not trace (dynamic control flow); the rest is still worth having
            if self.log:
                print(f"cnnkit: TensorBoard: no model graph ({type(e).__name__}: {str(e).splitlines()[0][:120]})",
                      file=self.log)
        self.writer.flush()

    def log_epoch(self, row: dict[str, Any], confusion: torch.Tensor) -> None:
        """The epoch's row of metrics.csv and its validation confusion matrix."""
        from cnnkit.report.plots import confusion_figure, figure_pixels

        epoch = int(row["epoch"])
        for column, tag in SCALARS.items():
            value = row.get(column)
            if value is not None and value != "":
                self.writer.add_scalar(tag, float(value), epoch)
        acc = float(confusion.diag().sum()) / max(int(confusion.sum()), 1)
        pixels = figure_pixels(confusion_figure(confusion, self.classes,
                                                f"Validation confusion matrix, epoch {epoch} (acc {acc:.3f})"))
        self.writer.add_image("validation/confusion_matrix", pixels, epoch, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(run_dir: str, classes: list[str], model: nn.Module, loader: Any, mean: list[float],
                     std: list[float], log: IO[str] | None = None) -> TensorBoardLog:
    """The writer of a run about to start, with a sample batch of ``loader`` and the model graph logged."""
    board = TensorBoardLog(run_dir, classes, log)
    images, _ = next(loader.batches())  # drawn from the loader's own seeded generators: training is unaffected
    board.log_start(model, images, mean, std)
    return board
