"""The pictures of a run, in ``<run>/plots/``, drawn with matplotlib's Agg renderer (files only: no display,
no pyplot state, so it works on a server and from threads):

- ``curves.png``: loss and accuracy per epoch, training and validation; each step's training loss faintly
  behind, and the best epoch marked. Where a run diverged, the loss axis is logarithmic and the non-finite
  step is marked along its top edge.
- ``lr.png``: the learning rate of every step as the schedule set it (recomputed from the run's configuration
  with the function the training used), and the rate ``metrics.csv`` recorded at the start of each epoch.
- ``confusion.png``: the confusion matrix of ``best.pt`` on the validation set, class names on the axes,
  coloured by the share of each true class (so rare classes are as readable as common ones).
- ``top_losses.png``: the validation images with the highest loss, each labelled with its true class, the
  predicted class and the probability the model gave it: where the model is most confidently wrong, and
  where the labels themselves may be wrong.

``lr_find.png`` (the learning-rate range test) is drawn here too, by ``plot_lr_find``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import textwrap
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnkit.atomic import atomic_write
from cnnkit.errors import UserError
from cnnkit.runs import damaged, load_history, load_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from cnnkit.report.predictions import Predictions
    from cnnkit.train.lr_find import LrFindResult

DPI = 100
TRAIN_COLOUR, VAL_COLOUR, LR_COLOUR = "#1f77b4", "#d62728", "#2ca02c"
PLOT_NAMES = ("curves", "lr", "confusion", "top_losses")
BLOWN_UP = 1e3  # ratio of the largest to the smallest step loss from which the loss axis is logarithmic


# --- reading a run folder ------------------------------------------------------------------------------------

def _number(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None  # an empty cell (grad_norm without --clip-grad)


def read_metrics(run_dir: str) -> list[dict[str, float | None]]:
    """``metrics.csv`` as one dict of numbers per epoch (empty cells as None); [] when there is none yet."""
    # a damaged file is a UserError naming it and what is wrong, as `cnnkit runs` marks it
    return [{k: _number(v) for k, v in row.items()} for row in load_history(run_dir)]


def read_steps(run_dir: str) -> list[tuple[int, int, float]]:
    """``steps.csv``: (epoch, step within the epoch, loss) for every training step; [] when there is none."""
    path = os.path.join(run_dir, "steps.csv")
    if not os.path.isfile(path):
        return []
    with open(path, newline="") as f:
        text = f.read()
    # A run appends its steps at each epoch's end while it trains: a last line without its newline is one being
    # written now, not damage (a report made during training draws the steps before it).
    reader = csv.DictReader(io.StringIO(text if text.endswith("\n") else text[: text.rfind("\n") + 1], newline=""))
    try:
        return [(int(r["epoch"]), int(r["step"]), float(r["loss"])) for r in reader]
    except (KeyError, TypeError, ValueError, csv.Error) as e:
        what = f"no {e} column" if isinstance(e, KeyError) else f"line {reader.line_num} is not epoch,step,loss,..."
        raise damaged(path, what) from None


def read_json(run_dir: str, name: str) -> Any:
    """The run's JSON file ``name``; None when there is none, a UserError naming it when it is damaged (config.json
    and result.json: also when they are not a JSON object)."""
    return load_json(os.path.join(run_dir, name), want_object=name in ("config.json", "result.json"))


# --- drawing ---------------------------------------------------------------------------------------------------

def new_figure(width: float, height: float) -> "Figure":
    """A figure with its own Agg canvas (inches)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: "Figure", path: str) -> str:
    """Write ``fig`` as a PNG, atomically; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=DPI, facecolor="white"))
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); check the folder is writable") from None
    return path


def figure_pixels(fig: "Figure") -> np.ndarray:
    """The rendered figure as H x W x 3 uint8 (for TensorBoard)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def _epoch_axis(ax: Any, epochs: int) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.set_xlim(0, max(epochs, 1) + 0.05)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def curves_figure(history: list[dict], steps: list[tuple[int, int, float]] | None = None,
                  best_epoch: int | None = None, steps_per_epoch: int | None = None) -> "Figure":
    """Loss (left) and accuracy (right) against epochs, training and validation. ``steps_per_epoch``: the
    training batches of an epoch, where steps.csv does not show them (a run that stopped in its first epoch)."""
    fig = new_figure(11, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [int(r["epoch"]) for r in history]
    last = max(epochs, default=0)
    blown_up = False
    if steps:
        # x = epochs of training done after the step, so a step's loss sits left of its epoch's mean
        per_epoch = max(_steps_per_epoch(steps), steps_per_epoch or 0)
        xs = [e - 1 + s / per_epoch for e, s, _ in steps]
        ax_loss.plot(xs, [v for _, _, v in steps], color=TRAIN_COLOUR, alpha=0.4, linewidth=0.7,
                     label="train (each step)")
        last = max(last, math.ceil(max(xs)))
        finite = [v for _, _, v in steps if math.isfinite(v) and v > 0]
        # A run that diverged: its last losses can be 1e30 times its first; only a log scale shows them all.
        blown_up = bool(finite) and max(finite) > BLOWN_UP * min(finite)
        bad = [x for x, (_, _, v) in zip(xs, steps) if not math.isfinite(v)]
        if bad:  # NaN or inf has no place on the axis: marked along its top edge instead
            ax_loss.plot(bad, [1.0] * len(bad), "x", color=VAL_COLOUR, markersize=8, clip_on=False,
                         transform=ax_loss.get_xaxis_transform(), label="non-finite loss (NaN or inf)")
    for ax, key, title in ((ax_loss, "loss", "Loss (cross-entropy)"), (ax_acc, "acc", "Accuracy")):
        for split, colour in (("train", TRAIN_COLOUR), ("val", VAL_COLOUR)):
            ys = [r.get(f"{split}_{key}") for r in history]
            ax.plot(epochs, ys, marker="o", markersize=4, color=colour,
                    label=f"{'training' if split == 'train' else 'validation'}{' (epoch mean)' if split == 'train' else ''}")
        if best_epoch:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set_title(title)
        _epoch_axis(ax, last)
        ax.legend(fontsize=8)
    ax_acc.set_ylim(0, 1.01)
    ax_acc.set_ylabel("share of images right")
    if blown_up:
        ax_loss.set_yscale("log")
        ax_loss.set_title("Loss (cross-entropy, log scale)")
    elif history and steps:
        # per-step losses of the first steps can be far above the rest; keep the epoch figures readable
        top = max((v for r in history for v in (r.get("train_loss"), r.get("val_loss")) if v is not None),
                  default=None)  # None: epochs with empty loss cells, the steps' losses set the axis
        if top is not None:
            ax_loss.set_ylim(0, max(top * 1.6, 1e-3))
    return fig


def _steps_per_epoch(steps: list[tuple[int, int, float]]) -> int:
    return max(s for _, s, _ in steps)


def scheduled_lr(config: dict, stages: list[dict], steps_per_epoch: int, steps_done: int) -> tuple[list, list]:
    """(x in epochs, learning rate) of every optimizer step the run took (``steps_per_epoch`` and ``steps_done``
    count batches, as steps.csv does), recomputed from its configuration and stages with the schedule function
    the training loop used. The head's rate (``--lr-backbone`` sets another for the rest)."""
    from cnnkit.train.optim import lr_factor

    # steps.csv counts batches; with --accum-steps the schedule counts optimizer steps, one per N batches
    accum = max(1, int(config.get("accum_steps") or 1))
    per_epoch = -(-steps_per_epoch // accum)
    done = steps_done // steps_per_epoch * per_epoch + -(-(steps_done % steps_per_epoch) // accum)
    xs, ys = [], []
    warmup = int(config.get("warmup_epochs", 0) * per_epoch)
    for stage in stages:
        total = stage["epochs"] * per_epoch
        first = (stage["first_epoch"] - 1) * per_epoch
        for s in range(total):
            if first + s >= done:
                break
            xs.append((first + s) / per_epoch)
            ys.append(stage["lr"] * lr_factor(config["schedule"], s, total, warmup))
    return xs, ys


def lr_figure(history: list[dict], config: dict | None, stages: list[dict] | None,
              steps: list[tuple[int, int, float]] | None, steps_per_epoch: int | None = None) -> "Figure":
    """The learning rate against epochs: every step as scheduled, and each epoch's recorded start value
    (``steps_per_epoch`` as for ``curves_figure``)."""
    fig = new_figure(7, 3.6)
    ax = fig.subplots()
    last = max([int(r["epoch"]) for r in history], default=1)
    if config and stages and steps:
        per_epoch = max(_steps_per_epoch(steps), steps_per_epoch or 0)
        done = max((e - 1) * per_epoch + s for e, s, _ in steps)
        xs, ys = scheduled_lr(config, stages, per_epoch, done)
        ax.plot(xs, ys, color=LR_COLOUR, linewidth=1.5, label=f"each step ({config['schedule']} schedule)")
        last = max(last, math.ceil(done / per_epoch))
    recorded = [(r["epoch"] - 1, r["lr"]) for r in history if r.get("lr") is not None]
    if recorded:
        ax.plot(*zip(*recorded), "o", color="black", markersize=4, label="recorded at each epoch's start")
    ax.set_title("Learning rate")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _epoch_axis(ax, last)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    return fig


def confusion_figure(confusion: Any, classes: list[str], title: str = "Confusion matrix") -> "Figure":
    """Rows: true class, columns: predicted class. Colour: the share of the row; numbers: the counts."""
    cm = np.asarray(confusion, dtype=np.int64)
    k = len(classes)
    side = min(14.0, max(4.5, 0.42 * k + 2))
    # Room for the class names beside and (at 45 degrees) below the matrix, about 0.07 inch a character at
    # font size 9: the figure grows by it and the cells stay about square. A fixed-aspect image would instead
    # leave the layout no room to move, and long names pushed the axis labels off the picture.
    names = 0.07 * max((len(c) for c in classes), default=0) * (9 if k <= 20 else 6) / 9 if k <= 50 else 0.0
    fig = new_figure(side + 0.8 + names, side + 0.75 * names)
    ax = fig.subplots()
    shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, shrink=0.7, fraction=0.04, label="share of the true class")
    if k <= 50:
        ax.set_xticks(range(k), labels=classes, rotation=45, ha="right", rotation_mode="anchor",
                      fontsize=9 if k <= 20 else 6)
        ax.set_yticks(range(k), labels=classes, fontsize=9 if k <= 20 else 6)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    _fitting_title(fig, ax, title)
    return fig


def _fitting_title(fig: "Figure", ax: Any, title: str) -> None:
    """``title`` over ``ax``, wrapped onto more lines where one line would run past the figure's edges (the
    title is centred on the axes, which a colour bar pushes left of the figure's centre)."""
    text = ax.set_title(title)
    chars = len(title)
    for _ in range(8):  # each wrap moves the layout a little: measure again
        fig.canvas.draw()
        box = text.get_window_extent()
        if box.x0 >= 4 and box.x1 <= fig.bbox.width - 4 or chars <= 10:
            break
        centre = (box.x0 + box.x1) / 2
        room = 2 * min(centre, fig.bbox.width - centre) - 16  # pixels, a margin of 8 each side
        chars = max(10, min(chars - 1, int(chars * room / box.width)))
        text.set_text(textwrap.fill(title, chars))


def top_losses_figure(pred: "Predictions", n: int = 16, columns: int = 4) -> "Figure":
    """The ``n`` validation images with the highest loss, titled true / predicted (probability) / loss."""
    index = pred.top_losses(n)
    images = pred.images(index)
    rows = max(1, math.ceil(len(index) / columns))
    fig = new_figure(2.1 * columns, 2.35 * rows + 0.4)
    axes = np.atleast_1d(fig.subplots(rows, columns)).flatten()
    for ax in axes:
        ax.axis("off")
    for ax, i, image in zip(axes, index.tolist(), images):
        true, guess = int(pred.labels[i]), int(pred.predicted[i])
        pixels = image.permute(1, 2, 0).numpy()
        if pixels.shape[2] == 1:
            ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set_title(f"true: {pred.classes[true]}\npred: {pred.classes[guess]} ({float(pred.probs[i, guess]):.2f})\n"
                     f"loss {float(pred.losses[i]):.2f}", fontsize=8,
                     color="black" if true == guess else "#b00000")
    wrong = int((pred.labels[index] != pred.predicted[index]).sum())
    # A good model's top losses are mostly right answers given without confidence: say how many are mistakes.
    fig.suptitle(f"Top losses: the {len(index)} validation images with the highest loss "
                 f"({wrong} misclassified, in red)", fontsize=11)
    return fig


def plot_lr_find(result: "LrFindResult", out: str) -> str:
    """The range test: loss (raw and smoothed) against a logarithmic learning rate, the suggestion marked."""
    from cnnkit.train.lr_find import FLAT_METHOD

    fig = new_figure(7, 4.2)
    ax = fig.subplots()
    ax.plot(result.lrs, result.losses, color="grey", alpha=0.35, linewidth=0.8, label="loss of each step")
    ax.plot(result.lrs, result.smoothed, color=TRAIN_COLOUR, linewidth=1.8, label="smoothed")
    ax.set_xscale("log")
    ax.axvline(result.suggestion, color=VAL_COLOUR, linestyle="--",
               label=f"suggested: {result.suggestion:.3g} ({result.method})")
    if not result.method.startswith(FLAT_METHOD):  # a flat curve's lowest point is noise: not drawn, nor its valley
        ax.axvline(result.min_loss_lr, color="grey", linestyle=":", label=f"lowest smoothed loss: {result.min_loss_lr:.3g}")
        if result.edge_lr != result.suggestion:
            ax.axvline(result.edge_lr, color="grey", linestyle="-.", label=f"end of its valley: {result.edge_lr:.3g}")
    if result.smoothed:
        # from the settled start down to the minimum: the blow-up at the end would squash the interesting part
        start, low = result.smoothed[len(result.smoothed) // 10], min(result.smoothed)
        span = max(start - low, 0.1 * abs(low), 1e-3)
        ax.set_ylim(low - 0.15 * span, start + 0.5 * span)
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    _fitting_title(fig, ax, f"Learning-rate range test: {result.model} on {result.data}, {len(result.lrs)} steps")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


# --- a run's plots ---------------------------------------------------------------------------------------------

def write_plots(run_dir: str, predictions: "Predictions | None" = None, device: str = "auto") -> dict[str, str]:
    """Write every plot of ``run_dir`` into ``run_dir/plots/``; returns {name: path}.

    ``predictions`` (of ``best.pt`` on the validation set) are computed when not given; without ``best.pt``
    (a run stopped in its first epoch) or the run's images (their folder moved or deleted since) the confusion
    matrix and top losses are left out.
    """
    if not os.path.isfile(os.path.join(run_dir, "config.json")):
        raise UserError(f"{run_dir} is not a cnnkit run folder (no config.json); pass a folder `cnnkit train` wrote")
    folder = os.path.join(run_dir, "plots")
    history, steps = read_metrics(run_dir), read_steps(run_dir)
    config, stages, result = read_json(run_dir, "config.json"), read_json(run_dir, "stages.json"), \
        read_json(run_dir, "result.json")
    best = (result or {}).get("best_epoch") or _best_epoch(history)
    per_epoch = None if history else _batches_per_epoch(config, result)
    paths = {
        "curves": save_figure(curves_figure(history, steps, best, per_epoch), os.path.join(folder, "curves.png")),
        "lr": save_figure(lr_figure(history, config, stages, steps, per_epoch), os.path.join(folder, "lr.png")),
    }
    from cnnkit.train.config import moved_data

    if predictions is None and os.path.isfile(os.path.join(run_dir, "best.pt")) and moved_data(config) is None:
        from cnnkit.report.predictions import predict_validation
        from cnnkit.checkpoint import load_checkpoint

        predictions = predict_validation(load_checkpoint(os.path.join(run_dir, "best.pt")), device)
    if predictions is not None:
        title = f"Confusion matrix of best.pt on {len(predictions.labels):,} validation images (acc {predictions.acc:.3f})"
        paths["confusion"] = save_figure(confusion_figure(predictions.confusion(), predictions.classes, title),
                                         os.path.join(folder, "confusion.png"))
        if predictions.has_images and len(predictions.labels):
            paths["top_losses"] = save_figure(top_losses_figure(predictions), os.path.join(folder, "top_losses.png"))
    return paths


def _batches_per_epoch(config: dict | None, result: dict | None) -> int | None:
    """The training batches of an epoch, from the run's training images and (global) batch size, as the loader
    counts them (the last, partial batch dropped); None where either is missing. Only for a run with no finished
    epoch: steps.csv then ends inside its first, so its steps cannot say how long an epoch is."""
    images, batch = (result or {}).get("num_train"), (config or {}).get("batch_size")
    if not isinstance(images, int) or not isinstance(batch, int) or images <= 0 or batch <= 0:
        return None
    return images // batch if images >= batch else 1


def _best_epoch(history: list[dict]) -> int | None:
    scored = [r for r in history if r.get("val_acc") is not None]
    return int(max(scored, key=lambda r: r["val_acc"])["epoch"]) if scored else None
