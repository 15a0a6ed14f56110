"""The one place that builds a run's pieces from its configuration, for training and for the learning-rate range
test alike (so the test measures the run it advises): the machine (threads, seeds, device, number format), then
the data splits, the model and the weights it starts from, the input normalisation, the loaders, the loss.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
import torch
import torch.nn as nn

from cnnkit import compiled
from cnnkit.choices import NO_FLIP_DATA
from cnnkit.data.checks import Prints, check_splits, class_weights, fingerprints, hashed, one_class
from cnnkit.data.loader import Augment, BatchLoader, channel_stats
from cnnkit.data.shapes import SHAPE_CLASSES
from cnnkit.data.sources import DataSpec, ImageSet, fingerprint, load_splits
from cnnkit.errors import CheckpointError, UserError, warn
from cnnkit.models.fast import sync_batchnorm
from cnnkit.models.pretrained import normalization
from cnnkit.models.registry import check_model_name, create_model, is_torchvision_model
from cnnkit.models.sizes import check_before_building, check_trains_on
from cnnkit.modes import eval_mode
from cnnkit.threads import set_torch_threads
from cnnkit.train import distributed
from cnnkit.train.config import TrainConfig
from cnnkit.train.mix import Mix
from cnnkit.train.precision import resolve_device, resolve_precision
from cnnkit.transfer import is_within, load_weights, plan_stages, trainable_modules

# Fewer batches an epoch than this get a note: so few steps barely move the weights.
FEW_STEPS = 10

SMOKE_BATCHES, SMOKE_VAL_IMAGES = 5, 256  # a smoke run's epochs: cnnkit/stages.py


@dataclass
class Machine:
    """Where and how a run computes."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast's number format; None: fp32
    threads: int  # CPU threads torch computes with


@dataclass
class RunPieces:
    """What a run is built from: its data, model, normalisation, loaders and loss."""

    train_set: ImageSet
    val_set: ImageSet
    classes: list[str]
    model: nn.Module
    start_payload: dict[str, Any] | None  # the cnnkit checkpoint the weights came from (--weights), if one
    mean: list[float]
    std: list[float]
    train_loader: BatchLoader
    val_loader: BatchLoader
    mix: Mix | None
    loss_weights: list[float] | None  # --class-weights auto
    criterion: nn.Module
    scaler: torch.amp.GradScaler
    data_fingerprint: dict[str, Any]  # the splits' images (sources.fingerprint), which a resume compares
    warnings: list[str] = field(default_factory=list)  # what the set-up warned about in the run's log
    # the training images' perceptual hashes and pixel digests, made for the check of the data and kept in the run
    # folder (checks.TRAINING_PRINTS) for `cnnkit eval` to find them among the images it scores; None: not checked
    train_prints: Prints | None = None


def _check_same_data(saved: dict[str, Any], train_set: ImageSet, val_set: ImageSet, now: dict[str, Any]) -> None:
    """Refuse to resume a run (its last.pt: ``saved``) on data other than it started with: other classes, or other
    images in either split (a folder changed since draws another validation split, which may hold images the run
    trained on); ``now``: the splits' fingerprints. Checkpoints from before the splits were recorded are checked on
    their classes alone."""
    fix = "resume with the data the run was started on, or start a new run on this data"
    classes, before = train_set.classes, list(saved["classes"])
    if classes != before:
        new, gone = [c for c in classes if c not in before], [c for c in before if c not in classes]
        what = "; ".join(x for x in (f"new: {', '.join(new[:5])}{', ...' if len(new) > 5 else ''}" if new else "",
                                     f"gone: {', '.join(gone[:5])}{', ...' if len(gone) > 5 else ''}" if gone else "")
                         if x) or "the same names in another order"
        raise CheckpointError(f"the data's classes differ from the checkpoint's ({what}); {fix}")
    recorded = (saved.get("resume") or {}).get("data")
    if recorded and recorded != now:
        then, now = (recorded["train"]["images"], recorded["val"]["images"]), (len(train_set), len(val_set))
        counts = (f"{then[0]:,} training and {then[1]:,} validation images then, {now[0]:,} and {now[1]:,} now"
                  if then != now else f"as many images as then ({now[0]:,} and {now[1]:,}), but other files or labels")
        raise CheckpointError(f"the data changed since the run started: {counts}; {fix}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def start_machine(cfg: TrainConfig) -> Machine:
    """Check the model's name (before minutes of data loading), set the CPU threads, seed every generator and
    resolve the device and number format."""
    check_model_name(cfg.model)
    threads = set_torch_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_precision(cfg.precision, device)
    if cfg.compile and device.type != "cuda":  # --compile builds C++ for the CPU, as the compiled loops do
        compiled.quiet_cuda_home_note()
        compiled.build_for_aten_capability()
    return Machine(device, amp_dtype, threads)


def range_test_config(cfg: TrainConfig, for_train: bool) -> TrainConfig:
    """``cfg`` as the range test builds its run from it: all the training images with their augmentation, one
    process, no mixing (the run it advises does those). The data are checked as train checks them (unless
    ``check_data`` is off), so that ``cnnkit lr-find`` warns about its data, as train would; ``for_train`` (the
    test of ``train --lr auto``): not checked, since the run's own set-up checks them right after the test."""
    return dataclasses.replace(cfg, smoke=False, overfit_batches=0, mixup=0.0, cutmix=0.0, sync_bn=False,
                               check_data=cfg.check_data and not for_train)


class ModelOptionsError(UserError):
    """The model refused the run's ``model_options``: the caller names where they were set (a config file's key,
    as the other options' errors do; see cnnkit/train/options.py model_options_error)."""


def build_run(cfg: TrainConfig, machine: Machine, log: IO[str], ctx: distributed.Dist | None = None,
              saved: dict[str, Any] | None = None) -> RunPieces:
    """The pieces of the run ``cfg`` describes, on ``machine``; ``ctx``: this process's place among several
    (None: the only one); ``saved``: the checkpoint of a run being resumed (its weights load later, its
    normalisation and classes hold now). May lower ``machine.threads`` to leave loader processes their cores."""
    ctx = ctx or distributed.Dist()
    device = machine.device
    train_set, val_set = _load_data(cfg, machine)
    if cfg.crop_pad is not None and cfg.crop_pad >= train_set.size and not cfg.overfit_batches:
        raise UserError(f"--crop-pad {cfg.crop_pad} on {train_set.size}-pixel images: a crop could hold no image at "
                        f"all; use less than {train_set.size} (the default is an eighth of the size, "
                        f"{train_set.size // 8})")
    classes = train_set.classes
    if cfg.overfit_batches and ctx.main and not saved and len(train_set) < cfg.overfit_batches * cfg.batch_size:
        batches = -(-len(train_set) // cfg.batch_size)
        print(f"cnnkit: note: --overfit-batches {cfg.overfit_batches}: the training data has only {batches} "
              f"batch(es) of {cfg.batch_size} ({len(train_set):,} images); it overfits all of them", file=log)
    # what --num-samples asked the data for; in a smoke run, no more than its own cap (its line names that one)
    asked = (samples_asked(cfg.data, cfg.val_split, cfg.num_samples, cfg.batch_size, cfg.smoke)
             if cfg.num_samples else 0)
    if len(train_set) < asked and not cfg.overfit_batches and ctx.main and not saved and cfg.data != "shapes":
        print(f"cnnkit: note: --num-samples {cfg.num_samples:,}: the training data has only {len(train_set):,} "
              "images; it trains on all of them", file=log)
    steps, left = divmod(len(train_set), cfg.batch_size)  # a full last batch only: drop_last, below
    if ctx.main and not saved and not cfg.overfit_batches and not cfg.smoke and steps < FEW_STEPS:
        # A recipe's batch size (--recipe fast: 1000) on a small folder leaves one or two updates an epoch. A smoke
        # run's few batches are its own cap (its line says so), which a smaller --batch-size would not lift.
        dropped = f", the {left} images left over in each shuffled epoch unused" if steps and left else ""
        print(f"cnnkit: note: {len(train_set):,} training images in batches of {cfg.batch_size}: "
              f"{max(steps, 1)} batch(es) an epoch{dropped}; a smaller --batch-size gives more steps", file=log)
    data_fingerprint = {"train": fingerprint(train_set), "val": fingerprint(val_set)}
    if saved:
        _check_same_data(saved, train_set, val_set, data_fingerprint)

    # Model and the weights it starts from; the input normalisation follows the weights. --weights replaces every
    # weight --pretrained would load (all but a fresh head, which starts at zero either way), so it alone is read:
    # `--config RUN/config.json --weights RUN/last.pt` goes on from a pretrained run without torchvision's file.
    pretrained = cfg.pretrained and not saved and not cfg.weights
    shape = (train_set.channels, train_set.size, train_set.size)

    def build(pretrained: bool) -> nn.Module:
        try:
            return create_model(cfg.model, num_classes=len(classes), in_channels=shape[0], input_size=shape[1],
                                pretrained=pretrained, **cfg.model_options)
        except UserError as e:
            # the options' own errors ("convnet: head must be one of ..."), which name the model or the option; not
            # those of other settings (--input-size too small) or of the pretrained weights (their cache)
            about_options = str(e).startswith(f"{cfg.model}:") or any(key in str(e) for key in cfg.model_options)
            if cfg.model_options and about_options and not (cfg.pretrained and "pretrained" in str(e)):
                raise ModelOptionsError(str(e)) from None
            raise

    # An image too small for the network, found on the model built on the meta device: now, not after seconds of
    # building the real one (and fetching its pretrained weights). check_trains_on below checks the real one too.
    check_before_building(lambda model: check_trains_on(model, cfg.model, shape), lambda: build(pretrained=False),
                          shape)
    # Under torchrun every process would download the same weights into the same cache at once: rank 0 first.
    with distributed.main_first(ctx) if pretrained else contextlib.nullcontext():
        model = build(pretrained)
    start_payload = load_weights(model, cfg.weights, log, train_set.classes) if cfg.weights and not saved else None
    data_stats = None  # the training images' own (mean, std), when the normalisation is theirs
    if saved:
        mean, std = saved["mean"], saved["std"]
    elif start_payload is not None:  # the run's own, whatever --pretrained says: its filters expect those
        mean, std = start_payload["mean"], start_payload["std"]
    elif cfg.pretrained:
        mean, std, _ = normalization(cfg.model, train_set.channels)  # ImageNet statistics, which the pretrained filters expect
    else:
        mean, std = data_stats = channel_stats(train_set)
    if cfg.sync_bn and ctx.world > 1:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA (PyTorch's SyncBatchNorm is GPU-only); on a CPU each process "
                            "normalises its own share of the batch")
        model = sync_batchnorm(model)
    model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    check_trains_on(model, cfg.model, shape)
    if ctx.main and not saved and is_torchvision_model(cfg.model):
        # imported here: the module imports torchvision, which a run of cnnkit's own models never needs
        from cnnkit.models.torchvision import small_image_note

        own = "pretrained" if pretrained else cfg.weights
        note = small_image_note(model, cfg.model, shape, cfg.model_options, own)
        if note:
            print(f"cnnkit: note: {note}", file=log)
    _check_single_image_batchnorm(model, cfg, train_set, device, ctx.world)
    # Before minutes of training: class balance, train/val duplicates, data against the model. Warnings only.
    warnings: list[str] = []
    train_prints = None
    if cfg.check_data and ctx.main and not saved:
        train_prints = fingerprints(train_set) if hashed(train_set) else None
        data_check = check_splits(
            train_set, val_set, cfg.model, cfg.pretrained,
            weights_norm=(mean, std) if cfg.pretrained or start_payload is not None else None,
            weights_label=f"torchvision's pretrained {cfg.model}" if cfg.pretrained and start_payload is None
            else cfg.weights,
            balanced=bool(cfg.class_weights or cfg.balanced_sampler), hash_files=False, stats=data_stats,
            same_images=bool(cfg.overfit_batches), train_prints=train_prints)
        for warning in data_check.warnings:
            warn(log, warnings, warning)
    if (cfg.freeze or cfg.unfreeze) and not (cfg.pretrained or cfg.weights) and ctx.main and not saved:
        # Frozen layers keep the weights they start with: random ones learn nothing and pass noise on.
        option = "--freeze backbone" if cfg.freeze else f"--unfreeze {cfg.unfreeze}"
        warn(log, warnings, f"{option} keeps the other layers at their random initial weights (neither "
             "--pretrained nor --weights was given); add one of them to fine-tune, or drop it to train them all")

    augment = None if cfg.overfit_batches else Augment(
        crop_pad=train_set.size // 8 if cfg.crop_pad is None else cfg.crop_pad,
        flip=(cfg.data not in NO_FLIP_DATA) if cfg.flip is None else cfg.flip,
        alternate_flip=cfg.alternate_flip, cutout=cfg.cutout, policy=cfg.augment_policy,
        random_erasing=cfg.random_erasing,
    )
    mix = Mix(len(classes), cfg.mixup, cfg.cutmix) if (cfg.mixup or cfg.cutmix) and not cfg.overfit_batches else None
    train_loader = BatchLoader(train_set, cfg.batch_size, mean, std, device, shuffle=True, augment=augment,
                               seed=cfg.seed, drop_last=len(train_set) >= cfg.batch_size,
                               channels_last=cfg.channels_last, workers=cfg.workers, rank=ctx.rank, world=ctx.world,
                               balanced=cfg.balanced_sampler, decode=cfg.decode)
    val_loader = BatchLoader(val_set, cfg.eval_batch_size, mean, std, device, channels_last=cfg.channels_last,
                             workers=cfg.workers, rank=ctx.rank, world=ctx.world, decode=cfg.decode)
    if hasattr(model, "init_from_data") and not saved and not start_payload:
        # Layers computed from the data (the fast net's whitening filters) see the first training batches,
        # normalised as training will normalise them.
        sample = BatchLoader(train_set, min(5000, len(train_set)), mean, std, device, shuffle=True, seed=cfg.seed,
                             channels_last=cfg.channels_last, workers=cfg.workers, decode=cfg.decode)
        model.init_from_data(next(iter(sample))[0])
        del sample  # and its loader's workers, which a streamed set keeps from epoch to epoch

    loss_weights = class_weights(train_set.labels, len(classes)) if cfg.class_weights == "auto" else None
    criterion = nn.CrossEntropyLoss(weight=None if loss_weights is None else torch.tensor(loss_weights, device=device),
                                    label_smoothing=cfg.label_smoothing)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.type, enabled=machine.amp_dtype == torch.float16)
    return RunPieces(train_set, val_set, classes, model, start_payload, mean, std, train_loader, val_loader, mix,
                     loss_weights, criterion, scaler, data_fingerprint, warnings, train_prints)


def _check_single_image_batchnorm(model: nn.Module, cfg: TrainConfig, train_set: ImageSet, device: torch.device,
                                  world: int) -> None:
    """Raise a UserError when training batches of one image (per process) would reach a BatchNorm layer as a 1x1
    map: its batch statistics need more than one value per channel, and torch refuses that at the first step,
    after the run folder exists. One forward pass of zeros in eval mode finds the map sizes; only then is it run.
    Only the BatchNorm layers some stage trains count: a frozen one uses its running statistics and takes one value
    (``train_one_epoch`` puts it in eval mode)."""
    if min(cfg.batch_size, len(train_set)) // world != 1:
        return
    trained = [trainable_modules(model, stage.modules) for stage in plan_stages(cfg.stages, cfg.freeze, cfg.unfreeze,
                                                                               1, 1.0)]
    names = {m: name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             and any(is_within(name, wanted) for wanted in trained)}
    if not names:
        return
    single: list[tuple[str, tuple[int, ...]]] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not single and inputs[0][0, 0].numel() == 1:  # one image: one value per channel
            single.append((names[module], tuple(inputs[0].shape[2:])))

    handles = [m.register_forward_pre_hook(record) for m in names]
    try:
        param = next(model.parameters(), None)
        x = torch.zeros(1, train_set.channels, train_set.size, train_set.size, device=device,
                        dtype=param.dtype if param is not None and param.is_floating_point() else None)
        with torch.no_grad(), eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    if single:
        name, shape = single[0]
        where = f"a {'x'.join(map(str, shape))} map" if shape else "a single value per channel"
        no_bn = " or --model-opt batchnorm=false" if cfg.model == "convnet" else ""
        if cfg.batch_size // world == 1 and len(train_set) // world > 1:
            cause = f"--batch-size {cfg.batch_size}" + (f" over {world} processes" if world > 1 else "")
            fix = (f"use a --batch-size of {2 * world} or more (or a larger --input-size, fewer downsampling "
                   f"stages{no_bn})")
        else:
            cause = f"{len(train_set)} training image(s)" + (f" over {world} processes" if world > 1 else "")
            fix = f"add training images (or use a larger --input-size, fewer downsampling stages{no_bn})"
        raise UserError(f"{cause} gives batches of one image, which BatchNorm layer {name} would see as {where}: "
                        f"training needs more than one value per channel; {fix}")


def _load_data(cfg: TrainConfig, machine: Machine) -> tuple[ImageSet, ImageSet]:
    """The training and validation sets, decoded once into uint8 tensors (augmentation happens per batch on the
    device), or streamed from their files when too large for memory."""
    num_samples = samples_asked(cfg.data, cfg.val_split, cfg.num_samples, cfg.batch_size, cfg.smoke)
    spec = DataSpec(cfg.data, cfg.data_dir, cfg.download, cfg.val_data, cfg.val_split, cfg.input_size,
                    cfg.channels, num_samples, cfg.bad_images)
    train_set, val_set = load_splits(spec)
    single = one_class(train_set)
    if single:  # else it trains to accuracy 1.0 without a word: every image is the one class
        raise UserError(single)
    train_set, val_set = run_images(train_set, val_set, cfg.smoke, cfg.overfit_batches, cfg.batch_size, cfg.seed)
    if train_set.images is None and cfg.workers:  # decoded per batch by loader processes: leave them their cores
        machine.threads = set_torch_threads(cfg.threads, workers=cfg.workers)
    return train_set, val_set


def samples_asked(data: str, val_split: float | None, num_samples: int | None, batch_size: int,
                  smoke: bool) -> int | None:
    """The ``num_samples`` a run asks its data for: ``--num-samples``, or in a smoke run a few batches' worth.
    ``cnnkit eval RUN`` asks the same (cnnkit/evaluate.py), so that it rebuilds the images the run validated on."""
    if not smoke:
        return num_samples
    smoke_train = SMOKE_BATCHES * batch_size
    asked = min(num_samples or smoke_train, smoke_train)
    if data == "shapes" and val_split is not None:
        # shapes generates num_samples images and --val-split holds its share of those out: generate that
        # share on top (and one per class for the rounding), so the training part fills the batches; but
        # never more than the smoke run validates on (--val-split 0.99 generated 16,010 images to validate
        # on 256, 0.9999 1.6 million: fewer batches then), nor than --num-samples, which the run splits so
        generated = min(smoke_train / (1 - val_split), SMOKE_VAL_IMAGES / val_split)
        asked = math.ceil(generated) + len(SHAPE_CLASSES)
        asked = min(asked, num_samples) if num_samples else asked
    return asked


def run_images(train_set: ImageSet, val_set: ImageSet, smoke: bool, overfit_batches: int, batch_size: int | None,
               seed: int) -> tuple[ImageSet, ImageSet]:
    """The parts of its splits a run trains and validates on. A smoke run: at most SMOKE_BATCHES batches' worth of
    the training images and SMOKE_VAL_IMAGES of the validation images. With ``overfit_batches`` (can the model
    memorise a few batches?): that many batches' worth of the training images, which the run validates on too, as
    Lightning's overfit_batches does (their broken images were left out before the batches were drawn: the
    validation set names none). ``cnnkit eval RUN`` rebuilds them (cnnkit/evaluate.py), to score the images the run
    was validated on."""
    if smoke:
        train_set = sample_images(train_set, SMOKE_BATCHES * batch_size, seed)
    if overfit_batches:
        train_set = sample_images(train_set, overfit_batches * batch_size, seed)
        return train_set, dataclasses.replace(train_set, skipped=[])
    return train_set, sample_images(val_set, SMOKE_VAL_IMAGES, seed) if smoke else val_set


def sample_images(data: ImageSet, count: int, seed: int) -> ImageSet:
    """``count`` images of ``data`` drawn at random with ``seed`` (all of them if it has fewer), in their order."""
    if len(data) <= count:
        return data
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count]
    return data.subset(idx.sort().values)
