"""Penultimate-layer features (``embed``) and a linear probe on them (``probe``): the fastest way to see how
good a backbone is for a new dataset, without fine-tuning anything."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from cnnkit.atomic import atomic_write, check_writable, out_not_writable
from cnnkit.choices import BUILTIN
from cnnkit.data.loader import BatchLoader
from cnnkit.data.images import left_out_warning
from cnnkit.data.sources import DEFAULT_FOLDER_SPLIT, DataSpec, ImageSet, by_class_name, load_eval_set, load_splits
from cnnkit.errors import DataError, UserError
from cnnkit.evaluate import scores_training_images, training_images_warning
from cnnkit.models.heads import find_head
from cnnkit.models.registry import check_model_name, create_model
from cnnkit.models.sizes import check_before_building, check_input_size, check_trains_on
from cnnkit.modes import eval_mode
from cnnkit.checkpoint import checkpoint_from_payload, payload_model, read_payload, resolve_checkpoint_path
from cnnkit.train.precision import resolve_device
from cnnkit.models.pretrained import normalization


@dataclass
class Backbone:
    model: nn.Module | None  # None for a model name until ``features`` builds it for the size of its images
    mean: list[float]
    std: list[float]
    input_size: int | None  # square pixels the model is built for; None for a model name not built yet
    channels: int
    config: dict = field(default_factory=dict)  # a run's training configuration; empty for a model name
    label: str = "the backbone"  # the run, checkpoint or model name, for messages
    build: Callable[..., nn.Module] | None = None  # a model name's: its model for square images of that size
    classes: list[str] | None = None  # a run's or checkpoint's classes, in its order; None for a model name


def load_backbone(model_or_run: str, pretrained: bool = False, head_from: str | None = None,
                  device: str = "cpu", input_size: int | None = None) -> Backbone:
    """A run or checkpoint (its own preprocessing), or a registered model name (torchvision's pretrained
    weights and ImageNet statistics with ``pretrained``; otherwise random weights, mean 0.5 / std 0.25).
    ``head_from`` (a ResNet's stages, e.g. ``layer2,layer3,layer4``): the features are those stages' pooled
    outputs side by side (see ``MultiStageResNet``) instead of the last stage's.
    A model name is built by ``features`` when it sees the images, for their size: a flatten head (simple_cnn)
    built for 32 pixels cannot take 16-pixel images, and the images' size is known only once they are read.
    ``input_size``: the size the images will be read at, where given; a run that cannot take it is the error now,
    before its model is built."""
    if os.path.exists(model_or_run):
        if pretrained:  # else dropped unseen: the file's weights are the ones used
            raise UserError(f"--pretrained loads torchvision's weights into a model name, but {model_or_run} has "
                            "weights of its own; drop --pretrained, or pass the model's name instead")
        path = resolve_checkpoint_path(model_or_run)
        payload = read_payload(path)

        def with_head(model: nn.Module) -> nn.Module:
            if head_from is not None:
                from cnnkit.models.torchvision import pool_stages

                pool_stages(model, head_from, num_classes=len(payload["classes"]))
            return model

        own = (payload["channels"], payload["input_size"], payload["input_size"])
        if input_size not in (None, own[1]):  # `features` checks the real model again, as it does without it
            shape = (own[0], input_size, input_size)
            check_before_building(lambda model: check_input_size(model, shape, own, model_or_run),
                                  lambda: with_head(payload_model(payload)), shape)
        ckpt = checkpoint_from_payload(payload, path)
        with_head(ckpt.model)
        return Backbone(ckpt.model.to(resolve_device(device)), ckpt.mean, ckpt.std, ckpt.input_size, ckpt.channels,
                        ckpt.config or {}, model_or_run, classes=list(ckpt.classes))
    check_model_name(model_or_run)  # now, not after the images are read
    options = {"head_from": head_from} if head_from is not None else {}

    def build(size: int, shapes_only: bool = False) -> nn.Module:
        """The model for square images of ``size``; ``shapes_only``: without pretrained weights and left where it
        is built (``check_before_building`` builds it on the meta device)."""
        model = create_model(model_or_run, input_size=size, pretrained=pretrained and not shapes_only, **options)
        return model if shapes_only else model.eval().to(resolve_device(device))

    if pretrained:
        mean, std, _ = normalization(model_or_run)
    else:
        mean, std = [0.5] * 3, [0.25] * 3
    return Backbone(None, mean, std, None, 3, label=model_or_run, build=build)


@torch.no_grad()
def features(backbone: Backbone, data: ImageSet, batch_size: int = 256) -> np.ndarray:
    """The inputs of the classifier head for every image of ``data`` (N x D, float32), in eval mode. Builds a
    model name's model for the size of ``data``; a model built for another size that cannot take this one (a
    flatten head) is a UserError naming the size it takes."""
    if backbone.model is None:
        shape = (data.channels, data.size, data.size)
        # an image too small for the network: the one-line size error (with the smallest size it takes), as train's,
        # found on the model built on the meta device before the real one is built (seconds, for vgg11)
        check_before_building(lambda model: check_trains_on(model, backbone.label, shape),
                              lambda: backbone.build(data.size, shapes_only=True), shape)
        backbone.model, backbone.input_size = backbone.build(data.size), data.size
        check_trains_on(backbone.model, backbone.label, shape)
    elif backbone.input_size is not None:
        own = (backbone.channels, backbone.input_size, backbone.input_size)
        check_input_size(backbone.model, (data.channels, data.size, data.size), own, backbone.label)
    model = backbone.model
    head_name, head = find_head(model)
    parent = model.get_submodule(head_name.rpartition(".")[0]) if "." in head_name else model
    setattr(parent, head_name.rpartition(".")[2], nn.Identity())
    try:
        with eval_mode(model):
            device = next(model.parameters()).device
            loader = BatchLoader(data, batch_size, backbone.mean, backbone.std, device)
            out = [model(x).flatten(1).float().cpu() for x, _ in loader]
    finally:
        setattr(parent, head_name.rpartition(".")[2], head)
    if loader.skipped:  # a row short: every later row would be paired with the wrong file and label
        raise DataError(f"{loader.skipped} image(s) of {data.source} read when the folder was scanned could not be "
                        "decoded now (changed since?); run the command again")
    return torch.cat(out).numpy()


def embed(model_or_run: str, data: str, out: str, pretrained: bool = False, input_size: int | None = None,
          head_from: str | None = None, device: str = "cpu") -> dict:
    """Write the penultimate features of every image in ``data`` to ``out`` (.npy, N x D float32), their labels
    beside it (``<out>.labels.npy``, N class indices) and which image each row is (``<out>.paths.csv``, see
    ``rows_csv``), each file written atomically; returns a summary with the three paths.
    A run's labels are its own class indices and names, matched by name (as ``eval`` does), so that embeds of
    several folders of one run combine; a class the run does not have is a UserError naming it, unless ``data``
    shares no class with the run (a new dataset, whose own classes label it). A model name has no classes:
    ``data``'s own label the rows. The summary's ``labelled_by``: "run", "new" (a run's new dataset) or "data"."""
    if not out.endswith(".npy"):
        raise UserError(f"--out must end in .npy, got {out}")
    labels, paths = out[:-4] + ".labels.npy", out[:-4] + ".paths.csv"
    _check_writable([out, labels, paths])  # before the features are computed, and before any of the three is written
    backbone = load_backbone(model_or_run, pretrained, head_from, device, input_size)
    images = load_eval_set(DataSpec(data, input_size=input_size or backbone.input_size, channels=backbone.channels))
    whose = "data" if backbone.classes is None else "run" if set(images.classes) & set(backbone.classes) else "new"
    if whose == "run":
        images = by_class_name(images, backbone.classes, f"DATA {data}", f"the run {model_or_run}")
    feats = features(backbone, images)
    atomic_write(out, lambda f: np.save(f, feats))
    atomic_write(labels, lambda f: np.save(f, images.labels.numpy()))
    text = rows_csv(images).encode()
    atomic_write(paths, lambda f: f.write(text))
    return {"out": out, "labels": labels, "paths": paths, "images": len(images), "dim": int(feats.shape[1]),
            "classes": images.classes, "files": images.paths is not None, "labelled_by": whose,
            "warnings": left_out_warning(images.skipped, data)}


def _check_writable(files: list[str]) -> None:
    """A UserError, naming the fix, when one of ``files`` is a folder or their folder cannot be written."""
    for path in files:
        if os.path.isdir(path):
            raise UserError(f"--out: {path} is a folder; choose another --out")
    try:
        check_writable(files[0])
    except OSError as e:
        raise out_not_writable(files[0], e) from None


def rows_csv(images: ImageSet) -> str:
    """One CSV line per image of ``images``, in their order (that of the feature rows): ``row`` (from 0),
    ``path`` (the image file as the folder's scan named it; empty for a built-in dataset, whose images are no
    files), ``label`` (the class index) and ``class`` (its name)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["row", "path", "label", "class"])
    paths = images.paths or [""] * len(images)
    for row, (path, label) in enumerate(zip(paths, images.labels.tolist())):
        writer.writerow([row, path, label, images.classes[label]])
    return buffer.getvalue()


@dataclass
class ProbeResult:
    train_acc: float
    val_acc: float
    feature_dim: int
    num_train: int
    num_val: int
    warnings: list[str] = field(default_factory=list)  # e.g. that the validation images trained the backbone


def probe(model_or_run: str, data: str, pretrained: bool = False, val_split: float | None = None,
          val_data: str | None = None, input_size: int | None = None, weight_decay: float = 1e-3,
          head_from: str | None = None, device: str = "cpu") -> ProbeResult:
    """A linear classifier (multinomial logistic regression, L-BFGS) on frozen penultimate features.
    ``warnings`` says when the validation images include images a run's backbone trained on."""
    backbone = load_backbone(model_or_run, pretrained, head_from, device, input_size)
    warnings = []
    # The probe's validation images: --val-data whole, else the split load_splits makes (0.1 of a folder by default).
    scored = (val_data, None) if val_data is not None else (
        data, val_split if val_split is not None or data in BUILTIN else DEFAULT_FOLDER_SPLIT)
    if backbone.config and scores_training_images(backbone.config, *scored):
        # --val-data is scored whole: no fraction of it picks held-out images (DATA is what the probe trains on)
        warnings.append(training_images_warning(backbone.config, *scored,
                                                "probe on data the backbone did not train on",
                                                "--val-split" if val_data is None else None))
    spec = DataSpec(data, val_split=val_split, val_data=val_data, input_size=input_size or backbone.input_size,
                    channels=backbone.channels)
    train_set, val_set = load_splits(spec)
    warnings += left_out_warning(train_set.skipped + val_set.skipped,
                                 data if val_data is None else f"{data} and {val_data}")
    x_train, x_val = torch.from_numpy(features(backbone, train_set)), torch.from_numpy(features(backbone, val_set))
    mu, sigma = x_train.mean(0), x_train.std(0).clamp_min(1e-6)  # standardised features condition L-BFGS well
    x_train, x_val = (x_train - mu) / sigma, (x_val - mu) / sigma
    y_train, y_val = train_set.labels, val_set.labels
    linear = nn.Linear(x_train.shape[1], len(train_set.classes))
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(linear(x_train), y_train) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        train_acc = (linear(x_train).argmax(1) == y_train).float().mean().item()
        val_acc = (linear(x_val).argmax(1) == y_val).float().mean().item()
    return ProbeResult(train_acc, val_acc, x_train.shape[1], len(y_train), len(y_val), warnings)
