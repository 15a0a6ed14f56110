"""Evaluation of a checkpoint: top-1/top-5 accuracy, loss, per-class precision and recall, confusion matrix."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from cnnkit.choices import BUILTIN, DEFAULT_THRESHOLD
from cnnkit.data.checks import TRAINING_PRINTS, Duplicate, find_duplicates, fingerprints, hashed, load_prints
from cnnkit.data.loader import BatchLoader
from cnnkit.data.images import left_out_warning
from cnnkit.data.sources import DEFAULT_FOLDER_SPLIT, DataSpec, ImageSet, by_class_name, load_eval_set, load_splits
from cnnkit.errors import UserError, plural
from cnnkit.runs import is_run
from cnnkit.threads import keeps_torch_threads, set_torch_threads
from cnnkit.checkpoint import Checkpoint, load_checkpoint
from cnnkit.train.config import check_recorded_paths, moved_data
from cnnkit.train.evaluation import evaluate_model
from cnnkit.stages import SMOKE_EPOCHS
from cnnkit.train.setup import SMOKE_BATCHES, run_images, samples_asked
from cnnkit.train.metrics import macro_averages, per_class_metrics
from cnnkit.tta import with_tta
from cnnkit.train.precision import precision_name, resolve_device, resolve_precision

LOADER_WORKERS = 2  # processes decoding the images per batch, for sets too large for memory


@dataclass
class EvalResult:
    acc: float
    top5: float | None  # None with 5 classes or fewer, where every image is in the top 5 by definition
    loss: float
    count: int
    # {class, precision, recall, f1, support}: precision None for a class never predicted (0/0), recall and f1 None
    # for a class without images (cnnkit/train/metrics.py)
    per_class: list[dict]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted class
    classes: list[str]
    checkpoint: str
    data: str  # the folder (or built-in dataset) the scored images came from
    precision: str
    # unweighted means over the classes in the images or the predictions (every class counts the same); a None
    # above counts 0, as scikit-learn's default zero_division does
    macro_precision: float = 0.0
    macro_recall: float = 0.0
    macro_f1: float = 0.0
    tta_views: int = 1  # views averaged per image (test-time augmentation; 1: none)
    threads: int = 0  # CPU threads torch computed with
    warnings: list[str] = field(default_factory=list)  # e.g. that the images scored include training images
    val_split: float | None = None  # the share of each class of ``data`` scored; None: all of it (a dataset's test set)
    scored: str = ""  # the images, for a line after their count: "held-out images of photos/ (0.1 of each class)"
    # The images scored (of --data or --val-data) that duplicate or nearly duplicate one the run trained on, as
    # `cnnkit train` finds them among its validation images (training_duplicates); None: not compared (the run's
    # own validation images, which train compared; or see ``notes``)
    training_duplicates: list[Duplicate] | None = None
    notes: list[str] = field(default_factory=list)  # for information: e.g. why the images were not compared


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

    Without ``data``: the validation set the run was trained with; ``val_data`` alone: that folder, all of it;
    ``val_split`` alone: that fraction of the run's training data, split as training splits (so at most the
    fraction the run held out: a larger one would score training images, and is refused). With ``data``: the
    same rules as training pick the part to measure (shapes' validation set, a torchvision test split, the
    ``val_data`` folder, the ``val_split`` part of a folder), or the whole folder when no split is asked for;
    ``warnings`` then says when those images include ones the run trained on: by where they come from (its training
    folder), or by their content (copies, also re-saved or brightened: ``training_duplicates``).
    ``ema``: a run folder's weight EMA. ``tta``/``tta_shift``: test-time augmentation (see cnnkit/tta.py).
    ``threads``: CPU threads torch computes with; None: the physical cores this process may use, less one per
    loader process when the images are decoded per batch (cnnkit/threads.py). torch's thread count, one setting
    for the whole process, is put back as it was when this returns.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise UserError(f"batch_size must be a whole number, 1 or more, got {batch_size!r}")
    if ema and isinstance(checkpoint, Checkpoint):  # its weights are the ones it was loaded with
        raise UserError("ema=True picks a run folder's EMA weights when it loads them; this Checkpoint is loaded "
                        "already: load it with cnnkit.load_checkpoint(run, ema=True), or pass the run folder")
    threads_used = set_torch_threads(threads)
    dev = resolve_device(device)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, dev, ema=ema)
    ckpt.model.to(dev)
    cfg = ckpt.config
    warnings = []
    if (cfg or {}).get("smoke"):  # its figures read as a score, as any run's do, where it trained a few batches
        warnings.append(f"{ckpt.path} is from a smoke run (--smoke: at most {SMOKE_EPOCHS} epochs a stage, each of "
                        f"at most {SMOKE_BATCHES} batches), which checks that a command line runs: these figures are "
                        "not how well the model learns")
    if data is None and val_data is None and not (cfg or {}).get("data"):  # an export, or a bare state's checkpoint
        raise UserError(f"{ckpt.path} does not record its training data, so it has no validation images of its own; "
                        "pass the images to score: --val-data DIR (all of it), or --data DIR")
    source, part = scored_images(cfg, data, val_data, val_split)  # where the scored images come from
    # an --overfit-batches run's own validation images are the training images it overfit (training_validation_set)
    overfit = data is None and val_data is None and val_split is None and bool((cfg or {}).get("overfit_batches"))
    part = None if overfit else part
    if data is None and val_data is not None:
        if val_split is not None:
            raise UserError(f"--val-split splits --data, but --val-data {val_data} alone is scored whole; "
                            "pass --val-data DIR or --data DIR --val-split F, not both")
        eval_set = load_eval_set(DataSpec(val_data, data_dir, False, None, None, ckpt.input_size, ckpt.channels),
                                 "--val-data")
    elif data is None:
        if val_split is not None and cfg and scores_training_images(cfg, cfg["data"], val_split):
            raise UserError(f"--val-split {val_split:g} without --data re-splits the run's training data "
                            f"{cfg['data']}, and would score images the run trained on ({_held_out_text(cfg)}); "
                            "drop --val-split to score the run's held-out images, or pass --data DIR")
        eval_set = training_validation_set(ckpt, val_split, "cnnkit eval", "pass the images to score: --val-data DIR "
                                           "(all of it), or --data DIR (with --val-split F, that part of it)")
    else:
        spec = DataSpec(data, data_dir, False, val_data, val_split, ckpt.input_size, ckpt.channels)
        eval_set = load_eval_set(spec)
    # Images the user pointed at (the run's own validation images are held out by construction) may be trained on.
    trained_on = (data is not None or val_data is not None) and bool(cfg) and scores_training_images(cfg, source, part)
    if trained_on:
        warnings.append(_training_images_warning(cfg, source, part, "--val-data" if val_data is not None else "--data"))
    # A folder of some of the run's classes is scored with its labels matched to the checkpoint's by name.
    named = (f"--val-data {val_data}" if val_data is not None else f"--data {data}" if data is not None
             else f"the run's validation data {cfg.get('val_data') or cfg.get('data')}")
    eval_set = by_class_name(eval_set, list(ckpt.classes), named, f"the checkpoint {ckpt.path}")
    warnings += eval_set.warnings  # what reading a folder found: files beside its class folders, not scored
    # ... or hold copies of training images under other names (a test folder put together by hand); the run's own
    # validation images, named or not, were compared by train
    compare = (data is not None or val_data is not None) and not _own_validation(cfg, source, part)
    duplicates, note = training_duplicates(ckpt, eval_set) if compare else (None, None)
    notes = [note] if note else []
    if duplicates and not trained_on:  # (that warning says so of the whole folder already)
        warnings.append(_duplicates_warning(duplicates, len(eval_set), named))
    if eval_set.images is None:  # decoded per batch by loader processes: leave them their cores
        threads_used = set_torch_threads(threads, workers=LOADER_WORKERS)
    amp_dtype = resolve_precision(precision or cfg.get("precision", "auto"), dev)
    loader = BatchLoader(eval_set, batch_size or cfg.get("eval_batch_size", 500), ckpt.mean, ckpt.std, dev,
                         channels_last=cfg.get("channels_last", True), workers=LOADER_WORKERS, decode=cfg.get("decode", "auto"))
    model = with_tta(ckpt.model, ckpt.mean, ckpt.std, ckpt.flip, tta, tta_shift, ckpt.input_size)
    stats = evaluate_model(model, loader, len(ckpt.classes), dev, amp_dtype)
    # Not scored, found when the folder was read or when a batch decoded them: the figures count fewer images
    warnings += left_out_warning(eval_set.skipped, source, len(eval_set.skipped) + loader.skipped,
                                 ", which these figures do not count")
    if overfit:
        scored = (f"{plural('image', stats.count)} of {source} the run overfit and validated on (--overfit-batches "
                  f"{cfg['overfit_batches']}; {_held_out_option(cfg)} scores its held-out images)")
    else:
        scored = describe_scored(cfg, source, part, stats.count)
    cm = stats.confusion
    per_class = per_class_metrics(cm, ckpt.classes)
    macro = macro_averages(cm, per_class)
    return EvalResult(acc=stats.acc, top5=stats.top5, loss=stats.loss, count=stats.count, per_class=per_class,
                      confusion_matrix=cm.tolist(), classes=list(ckpt.classes), checkpoint=ckpt.path,
                      data=source, precision=precision_name(amp_dtype), **macro,
                      tta_views=getattr(model, "num_views", 1), threads=threads_used, warnings=warnings,
                      val_split=part, scored=scored, training_duplicates=duplicates, notes=notes)


def training_validation_set(ckpt: Checkpoint, val_split: float | None = None, command: str = "the command",
                            fix: str | None = None) -> ImageSet:
    """The validation set ``ckpt`` was trained with, rebuilt from the configuration it records; with
    ``val_split``, that fraction of its training data instead (split as training splits). ``command`` and ``fix``:
    for the message when the run's recorded data paths are relative and missing (``check_recorded_paths``)."""
    return _run_splits(ckpt, val_split, command, fix)[1]


def _run_splits(ckpt: Checkpoint, val_split: float | None = None, command: str = "the command",
                fix: str | None = None) -> tuple[ImageSet, ImageSet]:
    """The images ``ckpt``'s run trained and validated on (``training_validation_set``'s arguments)."""
    cfg = ckpt.config
    if not cfg:
        raise UserError(f"{ckpt.path} does not record its training data; pass --data")
    check_recorded_paths(cfg, _run_folder(ckpt), command, fix)
    # A run from before --val-split beside --val-data was refused took its validation images from val_data.
    run_split = cfg.get("val_split") if cfg.get("val_data") is None else None
    # as training asked: a smoke run generates or keeps fewer images, and validates on a sample of them
    smoke = bool(cfg.get("smoke")) and cfg.get("batch_size") is not None
    num_samples = (samples_asked(cfg["data"], run_split, cfg.get("num_samples"), cfg["batch_size"], True) if smoke
                   else cfg.get("num_samples"))
    spec = DataSpec(cfg["data"], cfg.get("data_dir"), False, cfg.get("val_data"), run_split,
                    ckpt.input_size, ckpt.channels, num_samples)
    if val_split is not None:
        return load_splits(replace(spec, val_data=None, val_split=val_split))
    # an --overfit-batches run validated on the batches it overfit
    return run_images(*load_splits(spec), smoke, cfg.get("overfit_batches", 0), cfg.get("batch_size"),
                      cfg.get("seed", 0))


def training_duplicates(ckpt: Checkpoint, images: ImageSet) -> tuple[list[Duplicate] | None, str | None]:
    """The images of ``images`` that duplicate or nearly duplicate an image ``ckpt``'s run trained on, found as
    ``cnnkit train`` finds them among its validation images (cnnkit/data/checks.py), closest first. The training
    images' fingerprints come from the run folder (``TRAINING_PRINTS``, written when the run checked its data), else
    from its training images, rebuilt from its configuration. (None, why) when they cannot be compared: a set that
    train does not check either (too large for memory), or training images neither recorded nor at hand; (None,
    None) for the generated shapes data, which is never checked (its draws are independent)."""
    cfg = ckpt.config or {}
    if images.source == "shapes" or cfg.get("data") == "shapes":
        return None, None
    if not hashed(images):
        return None, (f"{images.source} is too large to decode into memory, so its images were not compared with "
                      "the run's training images (nor does train compare such sets): `cnnkit check-data "
                      f"{cfg.get('data') or 'TRAIN_DIR'} --val-data {images.source}` compares them")
    folder = _run_folder(ckpt)
    prints = load_prints(os.path.join(folder, TRAINING_PRINTS)) if folder is not None else None
    if prints is not None:  # the run's, in its folder: training images named by their place in its training set
        train = ImageSet(torch.zeros(len(prints[0]), dtype=torch.long), list(ckpt.classes), source=cfg.get("data", ""))
    else:
        if not cfg.get("data"):
            return None, (f"{ckpt.path} records no training data, so the images scored were not compared with the "
                          "images it was trained on")
        unrecorded = (f"the images scored were not compared with the images the run trained on: {cfg['data']} "
                      f"{{}}, and their fingerprints, which a run folder keeps ({TRAINING_PRINTS}), are not beside "
                      f"{ckpt.path}")
        moved = moved_data(cfg)  # the training images are rebuilt with the run's splits, --val-data's too
        if moved == "data":
            return None, unrecorded.format("is not there (moved or deleted)")
        if moved == "val_data":
            return None, unrecorded.format(f"could not be rebuilt without the run's --val-data {cfg['val_data']}, "
                                           "which is not there (moved or deleted)")
        try:
            train = _run_splits(ckpt, command="cnnkit eval")[0]
        except UserError as e:  # a torchvision dataset not downloaded, say
            return None, unrecorded.format(f"could not be read ({e})")
        if not hashed(train):
            return None, (f"the run's training images ({cfg['data']}) are too large to decode into memory, so the "
                          "images scored were not compared with them")
        prints = fingerprints(train)
    return find_duplicates(train, images, (prints, fingerprints(images)), DEFAULT_THRESHOLD), None




def _run_folder(ckpt: Checkpoint) -> str | None:
    """The run folder ``ckpt`` was loaded from (its best.pt, last.pt, ...), or None for a file outside one."""
    folder = os.path.dirname(os.path.abspath(ckpt.path))
    return folder if is_run(folder) else None


def scored_images(cfg: dict, data: str | None, val_data: str | None, val_split: float | None
                  ) -> tuple[str, float | None]:
    """Where ``evaluate``'s images come from, for its arguments and a run's configuration ``cfg``: (the folder or
    built-in dataset, the share of each of its classes taken as training splits, or None for all of a folder or a
    dataset's own test or validation set). A run trained with ``--val-data V`` was validated on all of V."""
    if val_data is not None:
        return val_data, None
    if data is not None:
        return data, val_split
    if val_split is not None:
        return cfg["data"], val_split
    if cfg.get("val_data") is not None:
        return cfg["val_data"], None
    return cfg["data"], held_out_fraction(cfg)


def describe_scored(cfg: dict, data: str, val_split: float | None, count: int | None = None) -> str:
    """The images ``scored_images`` names, for a line after their count: "images of val/", "held-out images of
    photos/ (0.1 of each class)" (what the run configured by ``cfg`` held out of its training data, or part of
    it), "images of photos/ (its --val-split 0.3 part)", "images of the cifar10 test split"; "image" where
    ``count`` is 1."""
    images = plural("image", count)
    if val_split is None:
        if data == "shapes":
            return f"{images} of the shapes validation set"
        return f"{images} of the {data} test split" if data in BUILTIN else f"{images} of {data}"
    if cfg.get("data") and _same_data(data, cfg["data"]) and not scores_training_images(cfg, data, val_split):
        return f"held-out {images} of {data} ({val_split:g} of each class)"
    return f"{images} of {data} (its --val-split {val_split:g} part)"


def held_out_fraction(cfg: dict) -> float | None:
    """The fraction of its training data (``cfg["data"]``) a run held out for validation; None when its
    validation images came from elsewhere (``--val-data``, a dataset's test split, shapes' own validation set)."""
    if cfg.get("val_data") is not None:
        return None
    if cfg.get("val_split") is not None:
        return cfg["val_split"]
    return None if cfg["data"] in BUILTIN else DEFAULT_FOLDER_SPLIT


def _own_validation(cfg: dict, data: str, val_split: float | None) -> bool:
    """Whether ``data`` and ``val_split`` pick the images the run configured by ``cfg`` validated on (an
    --overfit-batches run validated on its training images: none)."""
    if not cfg or not cfg.get("data") or cfg.get("overfit_batches"):
        return False
    own_data, own_split = scored_images(cfg, None, None, None)
    return _same_data(data, own_data) and val_split == own_split


def _same_data(a: str, b: str) -> bool:
    if a in BUILTIN or b in BUILTIN:
        return a == b
    return os.path.realpath(a) == os.path.realpath(b)


def scores_training_images(cfg: dict, data: str, val_split: float | None) -> bool:
    """Whether the images ``data`` and ``val_split`` pick for measuring (the ``val_split`` part, else the whole
    folder, or a dataset's test split) include images the run configured by ``cfg`` trained on. Training's split
    draws each class's order from a fixed seed whatever the fraction, so a fraction up to the run's own picks only
    images it held out, and a larger one adds training images."""
    if not cfg.get("data") or not _same_data(data, cfg["data"]):
        return False
    if data in BUILTIN and val_split is None:  # a dataset's test split, or shapes' validation set
        return False
    held = held_out_fraction(cfg)
    return held is None or val_split is None or val_split > held


def _held_out_option(cfg: dict) -> str:
    """The options of ``cnnkit eval RUN`` that score the images the run configured by ``cfg`` held out from training
    (which an --overfit-batches run did not validate on)."""
    if cfg.get("val_data") is not None:
        return f"--val-data {cfg['val_data']}"
    held = held_out_fraction(cfg)
    return f"--val-split {held:g}" if held is not None else f"--data {cfg['data']}"


def _held_out_text(cfg: dict) -> str:
    held = held_out_fraction(cfg)
    if held is not None:
        return f"it held out {held:g} of each class"
    return f"its validation images were {cfg['val_data'] if cfg.get('val_data') else 'a separate set'}"


def _training_images_warning(cfg: dict, data: str, val_split: float | None, option: str) -> str:
    """Eval's ``training_images_warning``: the images ``option`` (--data or --val-data) and ``val_split`` picked."""
    return training_images_warning(cfg, data, val_split, f"drop {option} to score the run's own validation images",
                                   f"--data {data} --val-split")


def training_images_warning(cfg: dict, data: str, val_split: float | None, alternative: str,
                            held_out_options: str | None = None) -> str:
    """One line, for eval and probe alike: the images ``data`` and ``val_split`` picked for measuring include
    images the run configured by ``cfg`` trained on (``scores_training_images``). ``held_out_options``: the options
    that, followed by the fraction the run held out, pick only its held-out images (None: no such fix there);
    ``alternative``: the other way out, for the command at hand."""
    held = held_out_fraction(cfg)
    what = f"a {val_split:g} share" if val_split is not None else "all"  # probe's default split as much as one given
    if held is None:
        share = "all of those images are"
    else:  # each class is rounded to whole images, hence "about"
        share = f"about {1 - held / (val_split if val_split is not None else 1):.0%} of those images are"
    fix = (f"pass {held_out_options} {held:g} (or less) to score only its held-out images, or "
           if held is not None and held_out_options else "")
    return (f"{data} is the run's training data: {what} of it is scored, and {share} in the run's training split "
            f"({_held_out_text(cfg)}), so these figures overstate accuracy; {fix}{alternative}")


def _duplicates_warning(duplicates: list[Duplicate], count: int, named: str) -> str:
    exact = sum(d.exact for d in duplicates)
    return (f"{len(duplicates):,} of the {count:,} images of {named} ({exact:,} exact) duplicate images the run "
            f"trained on, e.g. {duplicates[0].val} (perceptual hashes within {DEFAULT_THRESHOLD} bits, as train's "
            "check of its validation images finds them; --json lists them all): accuracy over them measures memory, "
            "so these figures overstate it; evaluate on held-out images, without those")


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
