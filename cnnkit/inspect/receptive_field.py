"""Receptive fields: for each layer, how many input pixels one unit sees (rf), how far apart neighbouring
units are in the input (jump), and where the first one is centred (start) — see ``shapes.Field``.

``receptive_field`` computes them analytically through the real graph of the forward pass (``trace``):
where branches merge (a ResNet's skip connection, DenseNet's and Inception's concatenations) the largest
field wins. ``verify_receptive_field`` measures them instead: with every weight made positive and max
pooling replaced by average pooling (so no path is cut or cancelled), the input gradient of a layer's
centre unit is non-zero exactly on the pixels the unit sees. ``effective_receptive_field`` measures what a
*trained* network actually uses: the gradient magnitude of the centre unit, averaged over images, which is
concentrated in a much smaller, roughly Gaussian, region than the theoretical field (Luo et al., 2016).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from cnnkit.errors import UserError, plural
from cnnkit.inspect.cam import last_block_with_positions
from cnnkit.inspect.hooks import capture, find_layer, inspecting
from cnnkit.inspect.loading import InspectedModel, load_model, square_side
from cnnkit.inspect.shapes import Field
from cnnkit.inspect.summary import called, field_numbers
from cnnkit.inspect.trace import Trace, TracedLayer, trace, whole_input_note


@dataclass
class LayerField:
    name: str
    type: str
    output_shape: list[int] | None
    rf: int | None  # input pixels, the larger of the two axes
    jump: int | float | None  # input pixels between neighbouring units
    start: int | float | None  # centre of the first unit's field (0 = centre of the top-left pixel)
    whole: bool = False  # also sees every input pixel through a global operation
    calls: int = 1  # a module the forward pass calls more than once is listed at its first call, with its output


@dataclass
class FieldCheck:
    """The analytic field of one layer's centre unit against the measured input-gradient footprint."""

    layer: str
    unit: list[int]  # (row, column) of the unit measured
    rf: int  # analytic, unclipped
    expected: list[list[int]]  # [[top, bottom], [left, right]]: the analytic field clipped to the input
    measured: list[list[int]]  # rows and columns where the input gradient is non-zero
    agrees: bool


@dataclass
class ReceptiveField:
    model: str
    input_size: list[int]  # C, H, W
    layers: list[LayerField]
    final_layer: str | None  # the last layer that still has a spatial layout (before pooling/flatten)
    final_rf: int | None
    covers_input: bool  # the final layer's centre unit sees every input pixel
    every_unit_covers: bool  # ... and so do its corner units
    checks: list[FieldCheck] = field(default_factory=list)

    def table(self) -> str:
        return format_receptive_field(self)


def _spatial(layer: TracedLayer) -> bool:
    return layer.info is not None and layer.output_shape is not None and \
        layer.info.spatial(torch.Size([1, *layer.output_shape]))


def final_feature_layer(t: Trace) -> TracedLayer | None:
    """The last layer whose output still has positions that all the rest of the network is computed from: a
    stage or block, not one branch of a block (a residual block's main path beside its shortcut, Inception's or
    ShuffleNet's branches) nor a layer inside one that merely has the same size of output; chosen as ``cam``'s
    default layer is where the last maps are 1x1 (``last_block_with_positions``). Where that layer is a pool that
    keeps its input's size and field (VGG's ``avgpool`` to the same 7x7), the layer it pools; of the layers that
    end with that same output (a ResNet's ``layer4``, its last block, that block's ReLU) the outermost."""
    final = last_block_with_positions(t, _spatial)
    while final is not None:  # (a layer that works in place, a ReLU, has its input as its output: not a source)
        source = [x for x in t.layers if x.done < final.first and final.input_info is not None and
                  (x.info is final.input_info or x.first_info is final.input_info)]
        if not source or any(x.output_shape != final.output_shape or x.info.fields != final.info.fields
                             for x in source):
            return final
        final = min(source, key=lambda layer: (layer.depth, layer.done))
    return None


def _sees(f: Field, index: int, size: int) -> bool:
    if f.whole:
        return True
    lo, hi = f.extent(index)
    return lo <= 0 and hi >= size - 1


def _covers(layer: TracedLayer, input_shape: tuple[int, int, int]) -> tuple[bool, bool]:
    """(centre unit sees the whole input, every unit does) for the final layer."""
    fields, sizes = layer.info.fields, layer.info.sizes
    centre = all(_sees(fields[a], sizes[a] // 2, n) for a, n in zip(("h", "w"), input_shape[1:]))
    corners = all(_sees(fields[a], i, n) for a, n in zip(("h", "w"), input_shape[1:]) for i in (0, sizes[a] - 1))
    return centre, corners


def receptive_field(model_or_run: str | nn.Module, input_size: Any = None, num_classes: int | None = None,
                    **options: Any) -> ReceptiveField:
    """The receptive field (rf, jump, start) of every layer, computed through the graph of the forward pass,
    and whether the final feature layer sees the whole input. The model is left as it was."""
    target = load_model(model_or_run, input_size, num_classes, meta=True, **options)
    with inspecting(target.model):
        t = trace(target.model, target.input_shape)
    layers = []
    for layer in t.layers:
        rf, jump, start, whole = field_numbers(layer.first_info)
        layers.append(LayerField(layer.name, type(layer.module).__name__, layer.first_shape, rf, jump, start, whole,
                                 layer.calls))
    final = final_feature_layer(t)
    centre, corners = _covers(final, target.input_shape) if final else (False, False)
    return ReceptiveField(target.label, list(target.input_shape), layers, final.name if final else None,
                          field_numbers(final.info)[0] if final else None, centre, corners)


# --- measuring it -----------------------------------------------------------------------------------------


class _AveragePooling(TorchFunctionMode):
    """Max pooling passes the gradient to one input per window; average pooling to all of them, which is
    what the analytic field assumes. Swapped for every call, module or functional, inside the block."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in ("max_pool2d", "_max_pool2d") and not kwargs.get("return_indices", False):
            x, kernel = args[0], args[1] if len(args) > 1 else kwargs["kernel_size"]
            stride = args[2] if len(args) > 2 else kwargs.get("stride")
            padding = args[3] if len(args) > 3 else kwargs.get("padding", 0)
            dilation = args[4] if len(args) > 4 else kwargs.get("dilation", 1)
            ceil_mode = args[5] if len(args) > 5 else kwargs.get("ceil_mode", False)
            if dilation in (1, (1, 1), [1, 1]):
                return F.avg_pool2d(x, kernel, stride or kernel, padding, ceil_mode, count_include_pad=True)
        if name == "adaptive_max_pool2d" and not kwargs.get("return_indices", False):
            return F.adaptive_avg_pool2d(args[0], args[1] if len(args) > 1 else kwargs["output_size"])
        return func(*args, **kwargs)


def _positive_weights(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Replacement parameters and buffers for ``torch.func.functional_call``: weights 1 / fan-in (so every
    layer averages and nothing overflows or cancels), biases 0, BatchNorm an identity. The weights are expanded
    scalars: they take no memory, whatever the model's size."""
    values: dict[str, torch.Tensor] = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, p in module.named_parameters(recurse=False):
            if name.endswith("bias"):
                v = 0.0
            elif p.dim() >= 2:
                v = 1.0 / max(1, math.prod(p.shape[1:]))
            else:
                v = 1.0
            values[prefix + name] = _filled(v, p, dtype)
        for name, b in module.named_buffers(recurse=False):
            if name in ("running_mean", "running_var"):
                values[prefix + name] = _filled(0.0 if name == "running_mean" else 1.0, b, dtype)
            elif b.is_floating_point() and b.dim() == 4:  # fixed filters (fastnet's whitening): positive as well
                values[prefix + name] = _filled(1.0 / max(1, math.prod(b.shape[1:])), b, dtype)
            elif b.is_floating_point():  # a constant (fastnet BatchNorm's unit scale): its values, in the pass's dtype
                values[prefix + name] = b.to(dtype)
    return values


def _filled(value: float, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value`` in ``like``'s shape: a weight's expanded scalar; a vector (biases, BatchNorm's parameters and
    statistics) as real memory, a few values per channel: BatchNorm's CPU backward pass read expanded statistics
    wrongly for a 1x1 map (gradients of 1e247 at a strided network's last layer, torch 2.14)."""
    filled = torch.tensor(value, dtype=dtype, device=like.device).expand(like.shape)
    return filled.contiguous() if like.dim() <= 1 else filled


def _footprint(grad: torch.Tensor) -> list[list[int]]:
    """[[top, bottom], [left, right]] of the non-zero entries of a 1 x C x H x W gradient."""
    mask = grad.abs().sum(dim=(0, 1)) > 0
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    if len(rows) == 0:
        return [[-1, -1], [-1, -1]]
    return [[int(rows[0]), int(rows[-1])], [int(cols[0]), int(cols[-1])]]


def _expected(f: Field, index: int, size: int) -> list[int]:
    if f.whole:
        return [0, size - 1]
    lo, hi = f.extent(index)
    return [max(0, math.ceil(lo)), min(size - 1, math.floor(hi))]


def verify_receptive_field(model_or_run: str | nn.Module | InspectedModel, layers: Sequence[str] | None = None,
                           input_size: Any = None, dtype: torch.dtype = torch.float64) -> list[FieldCheck]:
    """Measure the field of each of ``layers`` (default: the final feature layer and each top-level stage
    before it) as the input-gradient footprint of its centre unit, and compare with the analytic field
    clipped to the input. Runs a real forward and backward pass (in float64, so the tiny gradients at the
    edge of a deep network's field do not underflow); the model itself is not changed."""
    target = model_or_run if isinstance(model_or_run, InspectedModel) else load_model(model_or_run, input_size)
    model, shape = target.model, target.input_shape
    with inspecting(model):
        t = trace(model, shape)
    by_name = {layer.name: layer for layer in t.layers}
    names = list(layers) if layers else default_check_layers(t)
    for name in names:
        find_layer(model, name, target.source, target.build_args)
        if name not in by_name or not _spatial(by_name[name]):
            raise UserError(f"layer '{name}' has no spatial output to measure a field on (it is not used by the "
                            "forward pass, or comes after pooling/flatten); pick a convolutional layer")
    last = max((by_name[n] for n in names), key=lambda layer: layer.done)
    x = torch.ones(1, *shape, dtype=dtype, device=next(model.parameters()).device, requires_grad=True)
    checks = []
    with inspecting(model, grad=True), capture(model, names, detach=False) as acts:
        stop = last.module.register_forward_hook(_stop_forward)
        try:
            with _AveragePooling():
                torch.func.functional_call(model, _positive_weights(model, dtype), (x,), strict=False)
        except _StopForward:
            pass
        finally:
            stop.remove()
        for name in names:
            layer, out = by_name[name], acts[name]
            sizes = layer.info.sizes
            unit = [sizes["h"] // 2, sizes["w"] // 2]
            (grad,) = torch.autograd.grad(out[0, :, unit[0], unit[1]].sum(), x, retain_graph=True)
            expected = [_expected(layer.info.fields[a], i, n) for a, i, n in zip(("h", "w"), unit, shape[1:])]
            measured = _footprint(grad)
            checks.append(FieldCheck(name, unit, field_numbers(layer.info)[0], expected, measured,
                                     expected == measured))
    return checks


class _StopForward(Exception):
    pass


def _stop_forward(module, inputs, output):
    raise _StopForward


def default_check_layers(t: Trace, most: int = 8) -> list[str]:
    """Layers worth measuring: one per distinct field among the spatial layers down to one level below the
    final feature layer (the outermost layer where several share a field), ending with the final layer; at
    most ``most``, spread evenly."""
    final = final_feature_layer(t)
    if final is None:
        return []
    chosen: dict[tuple, TracedLayer] = {}
    for layer in sorted(t.layers, key=lambda layer: layer.done):
        if _spatial(layer) and layer.depth <= final.depth + 1 and layer.done <= final.done:
            key = (tuple(layer.info.fields.values()), tuple(layer.output_shape))
            if key not in chosen or layer.depth < chosen[key].depth:
                chosen[key] = layer
    rows = sorted(chosen.values(), key=lambda layer: layer.done)
    if len(rows) > most:
        step = (len(rows) - 1) / (most - 1)
        rows = [rows[round(i * step)] for i in range(most)]
    return [layer.name for layer in rows]


# --- what a trained network uses --------------------------------------------------------------------------


@dataclass
class EffectiveField:
    layer: str
    unit: list[int]
    rf: int | None  # the theoretical field (input pixels)
    expected: list[list[int]]  # [[top, bottom], [left, right]]: the theoretical field clipped to the input
    erf: int  # side of the smallest square around the unit that holds 95% of the gradient magnitude
    images: int
    path: str | None = None  # the heat map PNG, when one was asked for
    images_from: str | None = None  # the files or folders the images were read from; None: generated shapes images
    # (or a batch passed in as ``images``, then "a batch passed in")
    warnings: list[str] = field(default_factory=list)  # broken images of ``images_from`` passed over

    def described(self) -> str:
        """Which images the field was averaged over, counted: "16 generated shapes images", "16 images from DIR"."""
        if self.images_from is None:
            return f"{self.images} generated shapes {plural('image', self.images)}"
        return f"{self.images} {plural('image', self.images)} from {self.images_from}"

def effective_field_map(model: nn.Module, layer: TracedLayer, images: torch.Tensor) -> torch.Tensor:
    """Mean |d unit / d input| (H x W, summed over input channels, scaled to a maximum of 1) of the centre
    unit of ``layer`` (summed over its channels) over the normalised N x C x H x W ``images``."""
    device = next(model.parameters()).device
    unit = [layer.info.sizes["h"] // 2, layer.info.sizes["w"] // 2]
    total = torch.zeros(images.shape[-2:])
    with inspecting(model, grad=True), capture(model, [layer.name], detach=False) as acts:
        for img in images:
            x = img.unsqueeze(0).to(device).requires_grad_(True)
            model(x)
            (grad,) = torch.autograd.grad(acts[layer.name][0, :, unit[0], unit[1]].sum(), x)
            total += grad[0].abs().sum(0).float().cpu()
    return total / total.max().clamp_min(1e-30)


def effective_receptive_field(model_or_run: str | nn.Module | InspectedModel, layer: str | None = None,
                              images: torch.Tensor | None = None, input_size: Any = None,
                              count: int = 16, seed: int = 0, out: str | None = None,
                              images_from: Sequence[str | os.PathLike] | str | os.PathLike | None = None,
                              ) -> EffectiveField:
    """The effective field of ``layer``'s centre unit (default layer: the final feature layer), measured over
    ``images`` (a normalised N x C x H x W batch), or ``count`` images spread over ``images_from`` (image files
    or folders: your own photos, prepared as predict prepares them; a broken image inside a folder is passed over
    with a warning in ``EffectiveField.warnings``), or else ``count`` images of the generated shapes data, which
    cnnkit's default runs are trained on, with ``effective_field_map``. With ``out``, also draws it as a heat map
    with the theoretical field outlined. The model is not changed."""
    from cnnkit.data.images import load_first_images, path_list
    from cnnkit.data.shapes import make_shapes

    if images is not None and images_from is not None:
        raise UserError("pass images (a batch) or images_from (files or folders), not both")
    if out:  # a bad --out is refused before the passes, not after them
        from cnnkit.inspect import drawing

        drawing.check_picture_path(out)
    target = model_or_run if isinstance(model_or_run, InspectedModel) else load_model(model_or_run, input_size)
    model, shape = target.model, target.input_shape
    if layer:
        find_layer(model, layer, target.source, target.build_args)
    with inspecting(model):
        t = trace(model, shape)
    chosen = next((x for x in t.layers if x.name == layer), None) if layer else final_feature_layer(t)
    if chosen is None or not _spatial(chosen):
        raise UserError(f"layer '{layer}' has no spatial output; pick a convolutional layer")
    source, warnings = None if images is None else "a batch passed in", []
    if images_from is not None:
        paths = path_list(images_from)
        images, _, warnings = load_first_images(paths, count, shape[0], square_side(shape), target.mean, target.std,
                                                "--images-from", ", which the field was not averaged over",
                                                spread=True)
        source = " ".join(paths)
    if images is None:
        raw, _ = make_shapes(count, shape[1], shape[0], seed)
        mean = torch.tensor(target.mean).view(1, -1, 1, 1) * 255
        std = torch.tensor(target.std).view(1, -1, 1, 1) * 255
        images = (raw.float() - mean) / std
    heat = effective_field_map(model, chosen, images)
    fields, unit = chosen.info.fields, [chosen.info.sizes["h"] // 2, chosen.info.sizes["w"] // 2]
    centre = fields["h"].start + unit[0] * fields["h"].jump, fields["w"].start + unit[1] * fields["w"].jump
    expected = [_expected(fields[a], i, n) for a, i, n in zip(("h", "w"), unit, shape[1:])]
    result = EffectiveField(chosen.name, unit, field_numbers(chosen.info)[0], expected,
                            _mass_square(heat, centre, 0.95), len(images), images_from=source, warnings=warnings)
    if out:
        result.path = draw_effective_field(result, heat, out)
    return result


def draw_effective_field(result: EffectiveField, heat: torch.Tensor, out: str) -> str:
    """The heat map (square-root scaled, so the tails show) with the theoretical field as a white box."""
    from cnnkit.inspect import drawing

    factor = drawing.tile_factor(max(heat.shape), 320)
    image = drawing.upscale(drawing.colour(heat.sqrt(), "inferno"), factor).copy()
    (top, bottom), (left, right) = result.expected
    top, left, bottom, right = top * factor, left * factor, (bottom + 1) * factor - 1, (right + 1) * factor - 1
    image[[top, bottom], left:right + 1] = 255
    image[top:bottom + 1, [left, right]] = 255
    title = (f"effective field: {result.layer}, unit {tuple(result.unit)}\n"
             + (f"95% within {result.erf} px, theoretical rf {result.rf} px (box)" if result.erf else
                "no gradient reaches the input: the unit is off (ReLU) for every image"))
    drawing.save_png(image, title, out)
    return out


def _mass_square(heat: torch.Tensor, centre: tuple, share: float) -> int:
    """Side of the smallest square centred on ``centre`` (input pixels) holding ``share`` of ``heat``; 0 when
    no gradient reaches the input at all (a unit whose ReLUs are all off for every image)."""
    if float(heat.sum()) == 0:
        return 0
    h, w = heat.shape
    cy, cx = float(centre[0]), float(centre[1])
    ys = torch.arange(h).view(-1, 1).float()
    xs = torch.arange(w).view(1, -1).float()
    distance = torch.maximum((ys - cy).abs(), (xs - cx).abs())  # Chebyshev: squares around the centre
    order = distance.flatten().argsort()
    cumulative = heat.flatten()[order].cumsum(0) / heat.sum().clamp_min(1e-30)
    reach = distance.flatten()[order][int((cumulative < share).sum().clamp(max=len(order) - 1))]
    return int(2 * math.floor(reach) + 1)


def format_receptive_field(r: ReceptiveField) -> str:
    header = ("Layer", "Type", "Output", "RF", "Jump", "Start")
    rows = [(x.name, called(x.type, x.calls), "x".join(map(str, x.output_shape)) if x.output_shape else "-",
             "-" if x.rf is None else f"{x.rf}{'*' if x.whole else ''}",
             "-" if x.jump is None else f"{x.jump:g}", "-" if x.start is None else f"{x.start:g}") for x in r.layers]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header)] + [fmt.format(*row) for row in rows]
    size = "x".join(map(str, r.input_size[1:]))
    if r.final_layer is None:
        out.append("no layer with a spatial output")
    else:
        verdict = ("every unit sees the whole input" if r.every_unit_covers else
                   "its centre unit sees the whole input, its corner units do not" if r.covers_input else
                   "it does not see the whole input")
        out.append(f"final feature layer {r.final_layer}: rf {r.final_rf} px on a {size} input — {verdict}")
    if any(x.whole for x in r.layers):
        out.append(whole_input_note(r.input_size))
    for c in r.checks:
        out.append(f"verify {c.layer}: centre unit {tuple(c.unit)}, analytic rows {c.expected[0]} cols "
                   f"{c.expected[1]}, measured rows {c.measured[0]} cols {c.measured[1]}: "
                   f"{'agrees' if c.agrees else 'DIFFERS'}")
    return "\n".join(out)
