"""Evaluation of a checkpoint: top-1/top-5 accuracy, loss, per-class precision and recall, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass



from cnnkit.data.loader import BatchLoader
from cnnkit.data.sources import DataSpec, ImageSet, load_eval_set, load_splits
from cnnkit.errors import UserError
from cnnkit.threads import keeps_torch_threads, set_torch_threads
from cnnkit.checkpoint import Checkpoint, load_checkpoint
from cnnkit.train.evaluation import evaluate_model
from cnnkit.train.metrics import macro_averages, per_class_metrics
from cnnkit.tta import with_tta
from cnnkit.train.precision import precision_name, resolve_device, resolve_precision

LOADER_WORKERS = 2  # processes decoding the images per batch, for sets too large for memory


@dataclass
class EvalResult:
    acc: float
    top5: float
    loss: float
    count: int
    per_class: list[dict]  # {class, precision, recall, f1, support}
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    classes: list[str]
    checkpoint: str
    data: str
    precision: str
    macro_recall: float = 0.0  # unweighted means over the classes (every class counts the same)
    macro_f1: float = 0.0
    tta_views: int = 1  # views averaged per image (test-time augmentation; 1: none)
    threads: int = 0  # CPU threads torch computed with


@keeps_torch_threads  # torch's thread count is the caller's again afterwards
def evaluate(
    checkpoint: str | Checkpoint,
    data: str | None = None,
    *,
    data_dir: str | None = None,
    val_split: float | None = None,
    val_data: str | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str | None = None,
    ema: bool = False,
    tta: bool = False,
    tta_shift: int = 0,
    threads: int | None = None,
) -> EvalResult:
    """Evaluate ``checkpoint`` (a run folder, a .pt file or a loaded Checkpoint).

    Without ``data``: the validation set the run was trained with. With ``data``: the same rules as
    training pick the part to measure (shapes' validation set, a torchvision test split, the
    ``val_split`` part of a folder), or the whole folder when no split is asked for.
    ``ema``: a run folder's weight EMA. ``tta``/``tta_shift``: test-time augmentation (see cnnkit/tta.py).
    ``threads``: CPU threads torch computes with; None: the physical cores this process may use, less one per
    loader process when the images are decoded per batch (cnnkit/threads.py). torch's thread count, one setting
    for the whole process, is put back as it was when this returns.
    """
    threads_used = set_torch_threads(threads)
    dev = resolve_device(device)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, dev, ema=ema)
    ckpt.model.to(dev)
    cfg = ckpt.config
    if data is None:
        eval_set = training_validation_set(ckpt)
    else:
        spec = DataSpec(data, data_dir, False, val_data, val_split, ckpt.input_size, ckpt.channels)
        eval_set = load_eval_set(spec)
    if eval_set.classes != ckpt.classes:
        raise UserError(f"the data's classes {eval_set.classes[:10]} differ from the checkpoint's "
                        f"{ckpt.classes[:10]}; evaluate on data with the same class folders")
    if eval_set.images is None:  # decoded per batch by loader processes: leave them their cores
        threads_used = set_torch_threads(threads, workers=LOADER_WORKERS)
    amp_dtype = resolve_precision(precision or cfg.get("precision", "auto"), dev)
    loader = BatchLoader(eval_set, batch_size or cfg.get("eval_batch_size", 500), ckpt.mean, ckpt.std, dev,
                         channels_last=cfg.get("channels_last", True), workers=LOADER_WORKERS, decode=cfg.get("decode", "auto"))
    model = with_tta(ckpt.model, ckpt.mean, ckpt.std, cfg, tta, tta_shift)
    stats = evaluate_model(model, loader, len(ckpt.classes), dev, amp_dtype)
    cm = stats.confusion
    per_class = per_class_metrics(cm, ckpt.classes)
    macro = macro_averages(cm, per_class)
    return EvalResult(acc=stats.acc, top5=stats.top5, loss=stats.loss, count=stats.count, per_class=per_class,
                      confusion_matrix=cm.tolist(), classes=list(ckpt.classes), checkpoint=ckpt.path,
                      data=data or cfg["data"], precision=precision_name(amp_dtype), **macro,
                      tta_views=getattr(model, "num_views", 1), threads=threads_used)


def training_validation_set(ckpt: Checkpoint) -> ImageSet:
    """The validation set ``ckpt`` was trained with, rebuilt from the configuration it records."""
    cfg = ckpt.config
    if not cfg:
        raise UserError(f"{ckpt.path} does not record its training data; pass --data")
    spec = DataSpec(cfg["data"], cfg.get("data_dir"), False, cfg.get("val_data"), cfg.get("val_split"),
                    ckpt.input_size, ckpt.channels, cfg.get("num_samples"))
    return load_splits(spec)[1]


def confusion_text(result: EvalResult) -> str:
    """The confusion matrix as aligned text, rows = true class; class names in full, each column as wide as
    its name or its largest count."""
    names, cm = result.classes, result.confusion_matrix
    widths = [max([len(n)] + [len(str(row[j])) for row in cm]) + 2 for j, n in enumerate(names)]
    label = max(len(n) for n in names + ["true \\ pred"])
    lines = ["true \\ pred".ljust(label) + "".join(n.rjust(w) for n, w in zip(names, widths))]
    for name, row in zip(names, cm):
        lines.append(name.ljust(label) + "".join(str(v).rjust(w) for v, w in zip(row, widths)))
    return "\n".join(lines)
