"""MODEL_OR_RUN -> the model to inspect, the input shape it takes, and how to prepare an image for it.

A path that exists is a run folder or checkpoint (the trained model, its classes, size and normalisation);
anything else is a registered model name, built with random weights (pretrained weights are not downloaded).
Torchvision models get ImageNet's 1000-class head by default, so their parameter counts are the published
ones, and the input size their default weights were measured at (224, 299 for inception_v3, ...).

``meta=True`` builds the model on the meta device — shapes without data — which is all a summary or a
receptive field needs: ``vit_h_14`` (632 M parameters) is then built in a second and uses no memory.
"""

from __future__ import annotations

import os
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn

from cnnkit.choices import is_model_file
from cnnkit.data.images import load_image
from cnnkit.errors import UserError
from cnnkit.inspect.trace import parse_input_shape
from cnnkit.models.registry import check_model_name, create_model, default_input_size, is_torchvision_model
from cnnkit.models.sizes import SIZE_ERRORS, check_before_building, check_input_size, check_runs_on, first_line, on_meta
from cnnkit.modes import eval_mode
from cnnkit.checkpoint import checkpoint_from_payload, payload_model, read_payload, resolve_checkpoint_path

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


@dataclass
class InspectedModel:
    model: nn.Module
    label: str  # the model name, or the checkpoint path
    input_shape: tuple[int, int, int]  # C, H, W
    mean: list[float]
    std: list[float]
    classes: list[str] | None = None  # None for an untrained model built from its name
    config: dict[str, Any] | None = None  # the training configuration of a checkpoint
    epoch: int | None = None  # a checkpoint's: the epochs trained when it was saved
    source: str | None = None  # the model name or path as given (what a command's MODEL_OR_RUN takes); None: a module
    build_args: list[str] = field(default_factory=list)  # the options that built it, as command-line words


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int | None = None, meta: bool = False,
                **options: Any) -> nn.Module:
    """``create_model(name, ...)`` sized for ``input_shape``; on the meta device when ``meta``."""
    check_model_name(name)
    if num_classes is None:
        num_classes = 1000 if is_torchvision_model(name) else 10
    c, h, _ = input_shape

    def build() -> nn.Module:
        return create_model(name, num_classes=num_classes, in_channels=c, input_size=h, **options)

    return on_meta(build) if meta else build()


def load_model(model_or_run: str | nn.Module, input_size: Any = None, num_classes: int | None = None,
               meta: bool = False, runs: bool = False, **options: Any) -> InspectedModel:
    """What to inspect: a module as given, a run folder or checkpoint, or a model name (see the module doc).

    ``input_size``: C H W, one number (a square), or None for the model's own size. ``runs``: the caller runs the
    model at that size (features, cam), so a model name that cannot take it is the error now, before it is built.
    """
    if isinstance(model_or_run, nn.Module):
        if num_classes is not None or options:  # else silently a model other than the one asked for
            raise UserError("num_classes and model options apply to model names, not to a module, which is built "
                            "already")
        cfg = getattr(model_or_run, "cnnkit_config", None) or {}
        default = (cfg.get("in_channels", 3), cfg.get("input_size", 224), cfg.get("input_size", 224))
        return InspectedModel(model_or_run, cfg.get("name", type(model_or_run).__name__),
                              parse_input_shape(input_size, default), IMAGENET_MEAN, IMAGENET_STD)
    if os.path.exists(model_or_run):
        if num_classes is not None or options:
            raise UserError("--num-classes and model options apply to model names, not to a checkpoint")
        path = resolve_checkpoint_path(model_or_run)
        payload = read_payload(path)
        own = (payload["channels"], payload["input_size"], payload["input_size"])
        shape = parse_input_shape(input_size, own)
        if shape[0] != own[0]:
            raise UserError(f"{model_or_run} takes {own[0]}-channel images, not {shape[0]}; "
                            f"use --input-size {own[0]} {shape[1]} {shape[2]}")
        if shape != own:
            check_before_building(lambda model: check_input_size(model, shape, own, path),
                                  lambda: payload_model(payload), shape)
        ckpt = checkpoint_from_payload(payload, path)
        check_input_size(ckpt.model, shape, own, ckpt.path)
        return InspectedModel(ckpt.model, ckpt.path, shape, list(ckpt.mean), list(ckpt.std), list(ckpt.classes),
                              ckpt.config, ckpt.epoch, model_or_run, build_args(input_size))
    if os.sep in model_or_run or is_model_file(model_or_run):
        raise UserError(f"{model_or_run} does not exist; pass a run folder, a checkpoint file or a model name")
    check_model_name(model_or_run)
    size = default_input_size(model_or_run)
    shape = parse_input_shape(input_size, (3, size, size))

    def takes(model: nn.Module) -> None:
        if shape[1] != shape[2]:
            _check_non_square(model, model_or_run, shape)
        else:
            check_runs_on(model, shape)

    if runs and not meta:
        check_before_building(takes, lambda: build_model(model_or_run, shape, num_classes, **options), shape)
    model = build_model(model_or_run, shape, num_classes, meta, **options)
    if shape[1] != shape[2]:
        _check_non_square(model, model_or_run, shape)
    return InspectedModel(model, model_or_run, shape, IMAGENET_MEAN, IMAGENET_STD, source=model_or_run,
                          build_args=build_args(input_size, num_classes, options))


def build_args(input_size: Any = None, num_classes: int | None = None, options: dict[str, Any] | None = None
               ) -> list[str]:
    """The command-line words (``--input-size``, ``--num-classes``, ``--model-opt KEY=VALUE``) that build the
    model as ``load_model`` was asked to: they can change its layers and their names (a builder's options, the
    size a builder adapts to), so a command suggested to the user repeats them."""
    words = []
    if input_size is not None:
        sizes = input_size if isinstance(input_size, Sequence) and not isinstance(input_size, str) else [input_size]
        words += ["--input-size", *map(str, sizes)]
    if num_classes is not None:
        words += ["--num-classes", str(num_classes)]
    for key, value in (options or {}).items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
        words += ["--model-opt", f"{key}={text}"]
    return words


def _check_non_square(model: nn.Module, name: str, shape: tuple[int, int, int]) -> None:
    """Raise a UserError unless ``model``, built from ``name`` for a non-square ``shape`` (C, H, W), runs on it.
    A model name is built for a square input of side H: a flatten head's first linear layer is sized for it, so
    a model that runs on no other size (tried at 2H x 2H) is told to take a square size, not a larger one.
    Forward passes of zeros, in eval mode, on the model's device (the meta device costs nothing)."""
    param = next(model.parameters(), None)
    c, h, w = shape

    def runs(size: tuple[int, int, int]) -> None:
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(1, *size, device=param.device if param is not None else None))

    try:
        runs(shape)
    except NotImplementedError:  # an operation the meta device lacks: the trace runs it for real
        return
    except SIZE_ERRORS as e:
        reason = first_line(e)
        try:
            runs((c, 2 * h, 2 * h))
        except (*SIZE_ERRORS, NotImplementedError):
            side = max(h, w)
            raise UserError(f"model '{name}' is built for a square input ({h}x{h}, from the height of --input-size "
                            f"{c} {h} {w}) and cannot take {c}x{h}x{w} ({reason}); use a square size, e.g. "
                            f"--input-size {c} {side} {side}") from None
        raise UserError(f"model '{name}' cannot take a {c}x{h}x{w} input ({reason}); use a larger --input-size") \
            from None


def square_side(input_shape: tuple[int, int, int]) -> int:
    """The side images are read at for a model of ``input_shape`` (C, H, W): image files are resized to a square,
    so a non-square size is a UserError naming the square one."""
    c, h, w = input_shape
    if h != w:
        raise UserError(f"images are resized to a square; use --input-size {c} {h} {h}")
    return h


def prepare_image(target: InspectedModel, path: str) -> tuple[torch.Tensor, np.ndarray]:
    """``path`` as the model's input (1 x C x H x W, normalised, on the model's device) and as the picture
    it shows (H x W x 3 uint8: resized and centre-cropped the way the model sees it)."""
    c, side = target.input_shape[0], square_side(target.input_shape)
    if os.path.isdir(path):
        raise UserError(f"image {path} is a folder; pass one image file in it (png, jpg, ...)")
    if not os.path.isfile(path):
        raise UserError(f"image {path} does not exist; pass an image file (png, jpg, ...)")
    pixels = load_image(path, c, side)
    mean = torch.tensor(target.mean).view(-1, 1, 1) * 255
    std = torch.tensor(target.std).view(-1, 1, 1) * 255
    x = ((pixels.float() - mean) / std).unsqueeze(0)
    params = next(target.model.parameters(), None)
    if params is not None:
        x = x.to(device=params.device, dtype=params.dtype)
    shown = pixels.permute(1, 2, 0).numpy()
    return x, np.repeat(shown, 3, axis=2) if c == 1 else shown
