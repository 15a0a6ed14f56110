"""Penultimate-layer features (``embed``) and a linear probe on them (``probe``): the fastest way to see how
good a backbone is for a new dataset, without fine-tuning anything."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from cnnkit.choices import BUILTIN
from cnnkit.data.loader import BatchLoader
from cnnkit.data.sources import DEFAULT_FOLDER_SPLIT, DataSpec, ImageSet, load_eval_set, load_splits
from cnnkit.errors import UserError
from cnnkit.evaluate import held_out_fraction, scores_training_images
from cnnkit.models.heads import find_head
from cnnkit.models.registry import check_model_name, create_model
from cnnkit.models.sizes import check_input_size
from cnnkit.modes import eval_mode
from cnnkit.checkpoint import load_checkpoint
from cnnkit.train.precision import resolve_device
from cnnkit.models.pretrained import normalization


@dataclass
class Backbone:
    model: nn.Module
    mean: list[float]
    std: list[float]
    input_size: int | None
    channels: int
    config: dict = field(default_factory=dict)  # a run's training configuration; empty for a model name


def load_backbone(model_or_run: str, pretrained: bool = False, head_from: str | None = None,
                  device: str = "cpu", input_size: int = 32) -> Backbone:
    """A run or checkpoint (its own preprocessing), or a registered model name (torchvision's pretrained
    weights and ImageNet statistics with ``pretrained``; otherwise random weights, mean 0.5 / std 0.25), built
    for square images of ``input_size`` pixels (a run's model keeps the size it was trained at).
    ``head_from`` (a ResNet's stages, e.g. ``layer2,layer3,layer4``): the features are those stages' pooled
    outputs side by side (see ``MultiStageResNet``) instead of the last stage's."""
    if os.path.exists(model_or_run):
        ckpt = load_checkpoint(model_or_run)
        if head_from is not None:
            from cnnkit.models.torchvision import pool_stages

            pool_stages(ckpt.model, head_from, num_classes=len(ckpt.classes))
        return Backbone(ckpt.model.to(resolve_device(device)), ckpt.mean, ckpt.std, ckpt.input_size, ckpt.channels,
                        ckpt.config or {})
    options = {"head_from": head_from} if head_from is not None else {}
    model = create_model(model_or_run, input_size=input_size, pretrained=pretrained, **options)
    if pretrained:
        mean, std, _ = normalization(model_or_run)
    else:
        mean, std = [0.5] * 3, [0.25] * 3
    return Backbone(model.eval().to(resolve_device(device)), mean, std, input_size, 3)


def _backbone_and_data(model_or_run: str, pretrained: bool, head_from: str | None, device: str,
                       input_size: int | None, read: Callable[[int | None, int], tuple[ImageSet, ...]]
                       ) -> tuple[Backbone, tuple[ImageSet, ...]]:
    """The backbone and the images it reads (``read(input_size, channels)``) at one size: ``input_size``, else a
    run's own, else the data's own. A model name is built after its data is read, for the size the images have:
    a flatten head (simple_cnn) built for 32 pixels cannot take a batch of 16-pixel images. A run's model is
    checked against ``input_size``: a one-line error if it cannot take that size."""
    if os.path.exists(model_or_run):
        backbone = load_backbone(model_or_run, pretrained, head_from, device)
        size = input_size or backbone.input_size
        check_input_size(backbone.model, (backbone.channels, size, size),
                         (backbone.channels, backbone.input_size, backbone.input_size), model_or_run)
        return backbone, read(size, backbone.channels)
    check_model_name(model_or_run)  # before the images are read: a misspelt name should not wait for them
    images = read(input_size, 3)
    return load_backbone(model_or_run, pretrained, head_from, device, images[0].size), images


@torch.no_grad()
def features(backbone: Backbone, data: ImageSet, batch_size: int = 256) -> np.ndarray:
    """The inputs of the classifier head for every image of ``data`` (N x D, float32), in eval mode."""
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
    return torch.cat(out).numpy()


def embed(model_or_run: str, data: str, out: str, pretrained: bool = False, input_size: int | None = None,
          head_from: str | None = None, device: str = "cpu") -> dict:
    """Write the penultimate features of every image in ``data`` to ``out`` (.npy) and the labels beside it
    (``<out>.labels.npy``); returns a summary."""
    if not out.endswith(".npy"):
        raise UserError(f"--out must end in .npy, got {out}")
    backbone, (images,) = _backbone_and_data(
        model_or_run, pretrained, head_from, device, input_size,
        lambda size, channels: (load_eval_set(DataSpec(data, input_size=size, channels=channels)),))
    feats = features(backbone, images)
    np.save(out, feats)
    np.save(out[:-4] + ".labels.npy", images.labels.numpy())
    return {"out": out, "images": len(images), "dim": int(feats.shape[1]), "classes": images.classes}


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
    backbone, (train_set, val_set) = _backbone_and_data(
        model_or_run, pretrained, head_from, device, input_size,
        lambda size, channels: load_splits(DataSpec(data, val_split=val_split, val_data=val_data, input_size=size,
                                                    channels=channels)))
    warnings = []
    # The probe's validation images: --val-data whole, else the split load_splits makes (0.1 of a folder by default).
    scored = (val_data, None) if val_data is not None else (
        data, val_split if val_split is not None or data in BUILTIN else DEFAULT_FOLDER_SPLIT)
    if backbone.config and scores_training_images(backbone.config, *scored):
        held = held_out_fraction(backbone.config)
        fix = f"pass --val-split {held:g} (or less), or " if held is not None and val_data is None else ""
        warnings.append(f"{scored[0]} is the training data of the backbone {model_or_run}, so the probe's validation "
                        f"images include images the backbone trained on and its val acc overstates; {fix}probe on "
                        "data the backbone did not train on")
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
