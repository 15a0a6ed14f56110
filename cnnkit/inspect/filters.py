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
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cnnkit.errors import UserError
from cnnkit.inspect import drawing
from cnnkit.inspect.hooks import find_layer, inspecting
from cnnkit.inspect.loading import load_model
from cnnkit.models.sizes import SIZE_ERRORS

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


class _FirstConvolution(TorchFunctionMode):
    """Stops the forward pass at its first 2-D convolution, holding the kernels it was given (``weight``)."""

    weight: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            self.weight = args[1] if len(args) > 1 else kwargs["weight"]
            raise _Stop
        return func(*args, **kwargs)


class _Stop(Exception):
    pass


def first_conv(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> str:
    """The kernels the forward pass convolves its input with first: a ``Conv2d``'s name, or the name of a fixed
    filter bank that ``forward`` convolves with itself (fastnet's whitening filters, the buffer ``whiten_weight``:
    not a Conv2d, and the most telling first-layer filters of that network). Found by running the forward pass on
    one image of zeros of ``input_shape`` (C, H, W) up to that convolution; without a shape, or where the kernels
    are not among the model's own tensors, the first ``Conv2d`` in definition order."""
    if input_shape is not None:
        tensors = {id(t): n for n, t in (*model.named_parameters(), *model.named_buffers())}
        found = _FirstConvolution()
        first = next(iter((*model.parameters(), *model.buffers())), None)
        x = torch.zeros(1, *input_shape, dtype=first.dtype if first is not None and first.is_floating_point()
                        else None, device=first.device if first is not None else None)
        try:
            with inspecting(model), found:
                model(x)
        except _Stop:
            pass
        except SIZE_ERRORS:  # an input the model cannot take before its first convolution: the fallback
            pass
        name = tensors.get(id(found.weight))
        if name is not None:
            owner, _, attribute = name.rpartition(".")
            return owner if attribute == "weight" and isinstance(model.get_submodule(owner), nn.Conv2d) else name
    name = next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)
    if name is None:
        raise UserError("the model has no Conv2d layer to show filters of")
    return name


def _kernels(model: nn.Module, name: str, label: str | None, build_args: list[str]) -> torch.Tensor:
    """The out x in x kH x kW kernels of ``name``: a ``Conv2d`` layer, or a filter bank the model holds as a
    4-D tensor of its own (``whiten_weight``), which the forward pass convolves with."""
    tensors = dict((*model.named_parameters(), *model.named_buffers()))
    if name not in dict(model.named_modules()) and name in tensors and tensors[name].dim() == 4:
        return tensors[name]
    module = find_layer(model, name, label, build_args)
    if not isinstance(module, nn.Conv2d):
        banks = [n for n, b in model.named_buffers() if b.dim() == 4 and b.is_floating_point()]
        convs = (banks + [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)])[:4]
        raise UserError(f"layer '{name}' is a {type(module).__name__}, not a Conv2d; convolutional layers are "
                        f"{', '.join(convs)}, ...")
    return module.weight


def _diverging(kernels: torch.Tensor) -> list:
    """k x k kernels scaled by their filter's largest |weight| onto a red (+) / white (0) / blue (-) map."""
    scale = kernels.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return [drawing.colour(0.5 + 0.5 * k / s, "RdBu_r") for k, s in zip(kernels, scale)]


def filters(model_or_run: str | nn.Module, layer: str | None = None, out: str = "filters.png", mode: str = "auto",
            max_filters: int = 64, input_size: Any = None, num_classes: int | None = None,
            **options: Any) -> FilterImage:
    """Draw the kernels of Conv2d ``layer`` (default: the first convolution the forward pass runs, ``first_conv``;
    a fixed filter bank such as fastnet's ``whiten_weight`` is named by its own name) to the PNG ``out``; ``mode``
    is one of ``rgb``, ``channels``, ``mean`` or ``auto`` (rgb for 3 input channels, else mean). A model name's
    ``num_classes`` and ``options`` go to its factory, as in ``summary``."""
    if mode not in MODES:
        raise UserError(f"--mode must be one of {', '.join(MODES)}, not '{mode}'")
    if max_filters < 1:
        raise UserError(f"--max-filters must be at least 1, got {max_filters}")
    drawing.check_picture_path(out)
    target = load_model(model_or_run, input_size, num_classes, **options)
    name = layer or first_conv(target.model, target.input_shape)
    weight = _kernels(target.model, name, target.source, target.build_args).detach().float().cpu()
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
