"""Filters: a convolution's kernels as pictures.

- ``rgb``: a first layer's 3-channel kernels as colour patches, each scaled on its own to 0..255 — the
  oriented edges and colour blobs a trained first layer learns.
- ``channels``: one row per filter, one grey-blue-red patch per input channel (red positive, blue negative,
  white zero, scaled by the filter's largest absolute weight).
- ``mean``: each filter averaged over its input channels, coloured the same way: one patch per filter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from cnnkit.errors import UserError
from cnnkit.inspect import drawing
from cnnkit.inspect.hooks import find_layer
from cnnkit.inspect.loading import load_model

MODES = ("auto", "rgb", "channels", "mean")


@dataclass
class FilterImage:
    layer: str
    weight_shape: list[int]  # out_channels x in_channels/groups x kH x kW
    mode: str
    filters_shown: int
    path: str
    width: int
    height: int
    inputs_shown: int = 0  # input channels drawn for each filter (channels mode: at most 16); all of them else


def first_conv(model: nn.Module) -> str:
    """The name of the first ``Conv2d`` in the model's definition order."""
    name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if name is None:
        raise UserError("the model has no Conv2d layer to show filters of")
    return name


def _diverging(kernels: torch.Tensor) -> list:
    """k x k kernels scaled by their filter's largest |weight| onto a red (+) / white (0) / blue (-) map."""
    scale = kernels.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return [drawing.colour(0.5 + 0.5 * k / s, "RdBu_r") for k, s in zip(kernels, scale)]


def filters(model_or_run: str | nn.Module, layer: str | None = None, out: str = "filters.png", mode: str = "auto",
            max_filters: int = 64, input_size: Any = None, num_classes: int | None = None,
            **options: Any) -> FilterImage:
    """Draw the kernels of Conv2d ``layer`` (default: the first one) to the PNG ``out``; ``mode`` is one of
    ``rgb``, ``channels``, ``mean`` or ``auto`` (rgb for 3 input channels, else mean). A model name's
    ``num_classes`` and ``options`` go to its factory, as in ``summary``."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'")
    if max_filters < 1:
        raise UserError(f"--max-filters must be at least 1, got {max_filters}")
    drawing.check_picture_path(out)
    target = load_model(model_or_run, input_size, num_classes, **options)
    name = layer or first_conv(target.model)
    module = find_layer(target.model, name, target.source)
    if not isinstance(module, nn.Conv2d):
        convs = [n for n, m in target.model.named_modules() if isinstance(m, nn.Conv2d)][:4]
        raise UserError(f"layer '{name}' is a {type(module).__name__}, not a Conv2d; convolutional layers are "
                        f"{', '.join(convs)}, ...")
    weight = module.weight.detach().float().cpu()
    if mode == "auto":
        mode = "rgb" if weight.shape[1] == 3 else "mean"
    if mode == "rgb" and weight.shape[1] != 3:
        raise UserError(f"--mode rgb needs kernels with 3 input channels; {name} has {weight.shape[1]} "
                        "(use --mode channels or mean)")
    factor = drawing.tile_factor(weight.shape[-1], 48)  # a 3x3 kernel 48 pixels wide: legible at 1:1 on a screen
    columns = None
    if mode == "rgb":
        w = weight[:max_filters]
        lo, hi = w.amin(dim=(1, 2, 3), keepdim=True), w.amax(dim=(1, 2, 3), keepdim=True)
        scaled = (w - lo) / (hi - lo).clamp_min(1e-12)
        tiles = [(k.permute(1, 2, 0).numpy() * 255).round().astype("uint8") for k in scaled]
    elif mode == "mean":
        w = weight[:max_filters]
        tiles = _diverging(w.mean(dim=1))
    else:
        rows, columns = min(max_filters, 16, weight.shape[0]), min(16, weight.shape[1])
        w = weight[:rows, :columns]
        tiles = [t for f in w for t in _diverging(f)]
    tiles = [drawing.upscale(t, factor) for t in tiles]
    shape = list(weight.shape)
    title = f"{name}  {'x'.join(map(str, shape))}  {mode}"
    shown = [f"filters 1-{len(w)} of {shape[0]}"] if len(w) < shape[0] else []
    if columns is not None and columns < shape[1]:
        shown.append(f"input channels 1-{columns} of {shape[1]}")
    if shown:
        title += f" ({', '.join(shown)})"
    if not os.path.basename(out):
        raise UserError(f"--out wants a file name ending in .png, got '{out}'")
    width, height = drawing.save_png(drawing.grid(tiles, columns), title, out)
    return FilterImage(name, shape, mode, len(w), out, width, height, shape[1] if columns is None else columns)
