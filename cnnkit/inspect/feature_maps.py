"""Feature maps: what chosen layers output for one image, one grid PNG per layer.

Each channel is a tile, scaled to its own minimum and maximum (so a weak channel is as visible as a strong
one; compare channels by pattern, not brightness) and enlarged to at least 32 pixels. The title names the
layer and the activation's shape.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn

from cnnkit.errors import UserError
from cnnkit.inspect import drawing
from cnnkit.inspect.hooks import capture, find_layer, inspecting
from cnnkit.inspect.loading import load_model, prepare_image
from cnnkit.models.sizes import run_or_size_error


@dataclass
class FeatureMapImage:
    layer: str
    shape: list[int]  # of the activation, without the batch dimension
    channels_shown: int
    path: str
    width: int  # pixels of the PNG
    height: int


def _tiles(act: torch.Tensor, max_channels: int) -> tuple[list, int]:
    """One activation (no batch dimension) as coloured tiles: a tile per channel of a C x H x W map, one tile
    for anything else (a token x feature matrix, a feature vector laid out as a square)."""
    if act.dim() == 3:
        maps = act[:max_channels]
    elif act.dim() == 2:
        maps = act.unsqueeze(0)
    else:
        flat = act.flatten()
        side = math.ceil(math.sqrt(flat.numel()))
        maps = torch.cat([flat, flat.new_full((side * side - flat.numel(),), float(flat.min()))]).view(1, side, side)
    scaled = drawing.normalise(maps)
    factor = drawing.tile_factor(max(scaled.shape[-2:]), 64)  # tiles at least 64 pixels: legible at 1:1 on a screen
    return [drawing.upscale(drawing.colour(m), factor) for m in scaled], len(maps)


def feature_maps(model_or_run: str | nn.Module, layers: Sequence[str], image: str, out_dir: str,
                 input_size: Any = None, max_channels: int = 64, num_classes: int | None = None,
                 **options: Any) -> list[FeatureMapImage]:
    """Run ``image`` through the model, capture ``layers`` with forward hooks and write ``<out_dir>/<layer>.png``
    for each. A model name gets random weights, so its maps show the architecture, not learned features;
    ``num_classes`` and ``options`` go to its factory, as in ``summary``."""
    if not layers:
        raise UserError("name at least one --layer (--list-layers shows them)")
    if max_channels < 1:
        raise UserError(f"--max-channels must be at least 1, got {max_channels}")
    if drawing.names_a_picture(out_dir) and not os.path.isdir(out_dir):  # it would be made a folder of that name
        folder = os.path.dirname(os.path.normpath(out_dir)) or "."
        raise UserError(f"--out {out_dir} names a picture, but features writes one PNG per layer into a folder: "
                        f"pass a folder, such as {folder} (for {os.path.join(folder, layers[0] + '.png')})")
    target = load_model(model_or_run, input_size, num_classes, runs=True, **options)
    for name in layers:
        find_layer(target.model, name, target.source, target.build_args)
    x, _ = prepare_image(target, image)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir} is a file; features writes one PNG per layer into a folder: pass a "
                        "folder's name")
    with inspecting(target.model), capture(target.model, layers) as acts:
        run_or_size_error(target.model, x)
    unused = [name for name in layers if name not in acts]  # before any picture is written: all or none
    if unused:
        raise UserError(f"layer '{unused[0]}' was not used by the forward pass, so it has no output to show")
    try:  # only now: a run that fails leaves no empty folder behind
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the folder --out {out_dir}: {e.strerror}") from None
    results = []
    for name in layers:
        act = acts[name][0]
        tiles, shown = _tiles(act, max_channels)
        shape = list(act.shape)
        of = f" (channels 1-{shown} of {shape[0]})" if act.dim() == 3 and shown < shape[0] else ""
        path = os.path.join(out_dir, f"{name}.png")
        width, height = drawing.save_png(drawing.grid(tiles), f"{name}  {'x'.join(map(str, shape))}{of}", path)
        results.append(FeatureMapImage(name, shape, shown, path, width, height))
    return results
