"""Class activation maps: where in the image the evidence for a class is, overlaid on the image.

- Grad-CAM (Selvaraju et al., 2017): weight each channel of a convolutional layer's output by the mean
  gradient of the class score over that channel's positions; sum, keep the positive part.
- Grad-CAM++ (Chattopadhay et al., 2018): weight positions inside each channel by second- and third-order
  gradient terms, which separates several instances of a class better than a plain mean.
- Score-CAM (Wang et al., 2020): no gradients; each channel, upsampled and scaled to 0..1, masks the image,
  and the class probability the masked image gets is that channel's weight.

The last convolutional layer is used by default: the feature maps of the last ``Conv2d`` the forward pass
runs, taken after what follows it at the same resolution (BatchNorm, the activation, a residual addition),
since a convolution's raw output before BatchNorm is mostly negative and Grad-CAM keeps only the positive
part. That is ``layer4`` for a ResNet, ``features.29`` for VGG16, ``features`` for ConvNeXt (not its last
block's depthwise convolution), ``features.7`` for ``simple_cnn``. Only
maps that keep more than one position count: at 32x32 a ResNet's ``layer4`` is 1x1, one value per
channel, and a map of it is one flat colour, so ``layer3`` (2x2) is used there, with a warning: the last map with
more positions that the rest of the network is computed from (``Mixed_6e`` for Inception-v3 at 75 to 106 pixels,
not one of ``Mixed_7a``'s branch convolutions). A default map of 2x2 or fewer positions (a ResNet's ``layer4`` at
64 pixels) comes with a warning that names the finer layer to pass instead, found the same way. A block without a shortcut is entered: MobileNetV3-Small's at 32
pixels gives ``features.9.block.0``, the expansion layer of its first stride-32 block (the last 2x2 map, receptive
field 319 px as ``features.8``'s), the layer the MobileNetV3 paper's SSDLite head (section 6.3; torchvision's
ssdlite.py) takes its stride-16 features from; at 224 it is ``features``, the tensor of pytorch-grad-cam's usual
``model.features[-1]`` (639 px). The map is
upsampled to the input size (bilinear) and scaled to 0..1. A vision transformer's (ViT's, Swin's) only
convolution is its patch embedding, before every layer that decides the class: that default comes with a
warning. A ResNet whose head also reads earlier stages (``head_from``) takes part of its evidence from them,
which a map of one layer does not show: ``--layer layer3`` maps that stage's share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit.errors import UserError
from cnnkit.inspect import drawing
from cnnkit.inspect.hooks import capture, find_layer, inspecting
from cnnkit.inspect.loading import load_model, prepare_image
from cnnkit.inspect.trace import Trace, TracedLayer, trace
from cnnkit.models.sizes import run_or_size_error
from cnnkit.progress import progress_bar

METHODS = ("gradcam", "gradcam++", "scorecam")
NAMES = {"gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM"}


@dataclass
class CamResult:
    methods: list[str]
    layer: str
    class_index: int
    class_name: str | None  # None for a model without class names (built from its name)
    probability: float  # softmax probability of that class for this image
    predicted: int  # the class the model predicts
    path: str
    width: int
    height: int
    warnings: list[str] = field(default_factory=list)  # why the map may not show what the user expects


# Outputs before the activation: a map of them is mostly negative, and Grad-CAM keeps only the positive part.
PRE_ACTIVATION = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def last_conv_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> str:
    """The default layer (see the module doc), as ``default_cam_layer`` picks it."""
    return default_cam_layer(model, input_shape)[0]


def default_cam_layer(model: nn.Module, input_shape: tuple[int, int, int]) -> tuple[str, list[str]]:
    """The default layer and why its map may not be what the user expects. Of the layers that end after the last
    ``Conv2d`` and before the resolution changes (or the next convolution starts), the last that is no convolution
    or normalisation; where several return that same tensor, the outermost. When a shared activation module (a
    ResNet Bottleneck's one ``relu``, called three times) leaves only the convolution and its BatchNorm at that
    resolution, the convolution before is taken instead. Where the last convolution's map is 1x1 (small images),
    the last block whose output has more positions (``last_block_with_positions``), with a warning."""
    with inspecting(model):
        t = trace(model, input_shape)
    convs = [x for x in t.layers if isinstance(x.module, nn.Conv2d) and x.output_shape and len(x.output_shape) == 3]
    if not convs:
        raise UserError("the model has no Conv2d layer; name a layer with a C x H x W output with --layer")
    if not any(_positions(x) > 1 for x in convs):
        raise UserError(f"every convolution's output is 1x1 at {input_shape[1]}x{input_shape[2]}: there is no "
                        "place in the image to show; use larger images")
    ordered = sorted(t.layers, key=lambda x: x.done)
    convs.sort(key=lambda x: x.done)
    block = last_block_with_positions(t) if _positions(convs[-1]) == 1 else None
    if block is not None:
        _, h, w = block.output_shape
        return block.name, [f"the last convolution's map is 1x1 at {input_shape[1]}x{input_shape[2]} (one value per "
                            f"channel: one flat colour), so the map is of {block.name} ({h}x{w}), the last block "
                            "whose output has more positions; larger images map the layers after it"]
    last = None  # the last convolution's run: the fallback when every run ends in a pre-activation layer
    name = None
    for conv in reversed(convs):
        run = _same_resolution_after(conv, ordered)
        last = last or run
        kept = [x for x in run if not isinstance(x.module, PRE_ACTIVATION)]
        if kept:
            name = _outermost(run, kept[-1])
            break
    name = name or _outermost(last, last[-1])
    return name, _coarse_map_warning(t, name, input_shape)


# A map of this many positions or fewer is a few flat blocks over the image (a ResNet's layer4 at 64 px is 2x2).
COARSE_POSITIONS = 4


def _coarse_map_warning(t: Trace, name: str, input_shape: tuple[int, int, int]) -> list[str]:
    """Where the default layer's map has only a few positions, the warning that says so and names the finer
    layer to pass instead: the last map with more positions that the rest is computed from."""
    chosen = next(x for x in t.layers if x.name == name)
    if _positions(chosen) > COARSE_POSITIONS:
        return []
    finer = last_block_with_positions(t, lambda x: _positions(x) > _positions(chosen))
    if finer is None:
        return []
    (_, h, w), (_, fh, fw) = chosen.output_shape, finer.output_shape
    return [f"the map of {name} is {h}x{w} at {input_shape[1]}x{input_shape[2]}, {h * w} blocks over the image; "
            f"--layer {finer.name} ({fh}x{fw}) shows finer detail, from earlier in the network"]


def _positions(layer: TracedLayer) -> int:
    """Positions of a C x H x W output (H x W); 0 for any other output."""
    shape = layer.output_shape
    return shape[1] * shape[2] if shape and len(shape) == 3 else 0


def last_block_with_positions(t: Trace, has_positions: Callable[[TracedLayer], bool] | None = None
                              ) -> TracedLayer | None:
    """For a network whose last maps are 1x1: the last map with more than one position that all the rest of the
    network is computed from (``has_positions`` says which maps count: by default those of more than one position;
    ``receptive_field``'s final feature layer also counts a 1x1 map no global operation has reached). Among the
    modules directly inside the model, the last whose output has more than one position (one that is no
    convolution or normalisation, as above, where there is one); where the module after it, whose output is 1x1,
    holds such maps inside and runs its parts one after another, each on the one before's
    output (a stage, a block without a shortcut), the same again inside it. A block that runs parts side by side on the
    same input (Inception's branches, a residual block's shortcut) is not entered: its parts' maps each hold one
    branch of the evidence, and the block's input (``Mixed_6e``'s output, not ``Mixed_7a``'s branch convolutions)
    is what the rest is computed from."""
    has_positions = has_positions or (lambda x: _positions(x) > 1)
    traced = {x.name: x for x in t.layers}

    def parent(name: str) -> str:  # the nearest traced ancestor ("" for the model; a ModuleList is never called)
        while "." in name:
            name = name.rpartition(".")[0]
            if name in traced:
                return name
        return ""

    inside: dict[str, list[TracedLayer]] = {}
    for x in t.layers:
        inside.setdefault(parent(x.name), []).append(x)

    def in_sequence(block: TracedLayer) -> bool:  # each part runs on the output of the one before
        parts = sorted(inside.get(block.name, []), key=lambda x: x.first)
        return bool(parts) and all(part.input_info is (before.first_info if before else block.input_info)
                                   for before, part in zip([None, *parts], parts))

    best, holder = None, ""
    while True:
        children = sorted(inside.get(holder, []), key=lambda x: x.done)
        several = [x for x in children if has_positions(x)]
        activated = [x for x in several if not isinstance(x.module, PRE_ACTIVATION)]
        if activated or (several and best is None):  # a norm's output inside does not displace the block's
            best = (activated or several)[-1]
        after = several[-1].done if several else -1
        collapsing = next((x for x in children if x.done > after and any(
            has_positions(y) for y in t.layers if y.name.startswith(x.name + "."))), None)
        if collapsing is None or not in_sequence(collapsing):
            return best
        holder = collapsing.name


def _same_resolution_after(conv: TracedLayer, ordered: list[TracedLayer]) -> list[TracedLayer]:
    """``conv`` and the layers that end after it, in that order, until the resolution changes or another
    convolution starts. Channels-last outputs at the same resolution (ConvNeXt's blocks permute to H x W x C
    for their LayerNorm and linear layers) are passed over, not ends."""
    _, h, w = conv.output_shape
    run = []
    for x in ordered:
        if x.done < conv.done:
            continue
        if x is not conv and isinstance(x.module, nn.Conv2d):
            break
        shape = x.output_shape
        if shape and len(shape) == 3 and shape[1:] == [h, w]:
            run.append(x)
        elif not (shape and len(shape) == 3 and shape[:2] == [h, w]):
            break
    return run


def _outermost(run: list[TracedLayer], last: TracedLayer) -> str:
    """Of the layers in ``run`` that return ``last``'s tensor (a block, its last ReLU, the stage), the outermost."""
    same = [x for x in run if x.info is last.info]
    return min(same, key=lambda x: (x.depth, x.done)).name


def _weighted(acts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return F.relu((weights[:, :, None, None] * acts).sum(dim=1))[0]


def grad_cam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of a 1 x C x h x w activation and the class score's gradient with respect to it (h x w)."""
    return _weighted(acts, grads.mean(dim=(2, 3)))


def grad_cam_plus_plus(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ (h x w), with the exponential of the score folded in as in the usual implementation."""
    g2, g3 = grads**2, grads**3
    denominator = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
    alpha = g2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    return _weighted(acts, (alpha * F.relu(grads)).sum(dim=(2, 3)))


def score_cam(model: nn.Module, x: torch.Tensor, acts: torch.Tensor, target: int, batch: int = 32,
              progress: bool = False) -> torch.Tensor:
    """Score-CAM (h x w): forward passes of the image masked by each channel, weighted by the class probability.
    One pass per channel (2,048 for a ResNet-50's ``layer4``: minutes on a CPU), so ``progress`` shows a bar
    (plain lines now and then when stderr is no terminal)."""
    masks = drawing.normalise(F.interpolate(acts, size=x.shape[-2:], mode="bilinear", align_corners=False))[0]
    scores = []
    bar = progress_bar(len(masks), desc="Score-CAM", unit="channel", enabled=progress)
    with torch.no_grad():
        for i in range(0, len(masks), batch):
            masked = x * masks[i:i + batch].unsqueeze(1).to(x.device, x.dtype)
            scores.append(model(masked).float().softmax(dim=1)[:, target].cpu())
            bar.update(len(scores[-1]))
    bar.close()
    weights = torch.cat(scores).softmax(dim=0).to(acts.dtype)
    return _weighted(acts.cpu(), weights.unsqueeze(0))


def cam_heatmaps(model: nn.Module, x: torch.Tensor, layer: str, target: int | None = None,
                 methods: tuple[str, ...] = ("gradcam",), progress: bool = False
                 ) -> tuple[dict[str, torch.Tensor], int, float, int]:
    """Heat maps (input size, 0..1) of ``methods`` for class ``target`` (default: the predicted one) at
    ``layer``; returns them with the class, its probability and the predicted class. Leaves the model as it was
    and its parameters' ``.grad`` untouched. ``progress``: a bar for Score-CAM's forward passes."""
    with inspecting(model, grad=True), capture(model, [layer], detach=False) as captured:
        logits = run_or_size_error(model, x.requires_grad_(True))
        if layer not in captured:
            raise UserError(f"layer '{layer}' was not used by the forward pass; pick another --layer")
        acts = captured[layer]
        if acts.dim() != 4:
            raise UserError(f"layer '{layer}' outputs {'x'.join(map(str, acts.shape[1:]))}, not a C x H x W map; "
                            "class activation maps need a convolutional layer")
        probs = logits.detach().float().softmax(dim=1)[0]
        predicted = int(probs.argmax())
        k = predicted if target is None else target
        if not 0 <= k < len(probs):
            raise UserError(f"--class {k} is out of range: the model has {len(probs)} classes (0-{len(probs) - 1})")
        (grads,) = torch.autograd.grad(logits[0, k], acts)
        maps = {}
        for method in methods:
            if method == "gradcam":
                small = grad_cam(acts.detach(), grads)
            elif method == "gradcam++":
                small = grad_cam_plus_plus(acts.detach(), grads)
            else:
                small = score_cam(model, x.detach(), acts.detach(), k, progress=progress)
            big = F.interpolate(small[None, None].float().cpu(), size=x.shape[-2:], mode="bilinear",
                                align_corners=False)[0, 0]
            maps[method] = drawing.normalise(big)
    return maps, k, float(probs[k]), predicted


def class_activation_map(model_or_run: str | nn.Module, image: str, target_class: int | str | None = None,
                         layer: str | None = None, method: str = "gradcam", out: str = "cam.png",
                         input_size: Any = None, progress: bool = True, num_classes: int | None = None,
                         **options: Any) -> CamResult:
    """Write ``out``: the image, then each method's map overlaid on it. ``method``: gradcam, gradcam++,
    scorecam or all; ``target_class``: an index or a class name (default: the predicted class); ``layer``:
    default the last convolutional layer (see the module doc). ``progress``: a bar on stderr while Score-CAM
    runs its forward pass per channel of the layer. A model name's ``num_classes`` and ``options`` go to its
    factory, as in ``summary``."""
    methods = METHODS if method == "all" else (method,)
    if any(m not in METHODS for m in methods):
        raise UserError(f"--method must be one of {', '.join(METHODS)} or all, not '{method}'")
    drawing.check_picture_path(out)
    target = load_model(model_or_run, input_size, num_classes, runs=True, **options)
    name, warnings = (layer, []) if layer else default_cam_layer(target.model, target.input_shape)
    find_layer(target.model, name, target.source, target.build_args)
    warnings += [] if layer else _patch_embedding_warning(target.model, name)
    if isinstance(target_class, str) and not target_class.lstrip("-").isdigit():
        if not target.classes or target_class not in target.classes:
            known = (f"; classes are {', '.join(target.classes)}" if target.classes else
                     f": {target.label} has no class names (a model name, not a trained run); pass --class as an index")
            raise UserError(f"unknown class '{target_class}'{known}")
        target_class = target.classes.index(target_class)
    x, shown = prepare_image(target, image)
    maps, k, prob, predicted = cam_heatmaps(target.model, x, name,
                                            None if target_class is None else int(target_class), methods,
                                            progress)
    factor = drawing.tile_factor(shown.shape[0], 224)
    panels = [shown] + [drawing.overlay(shown, maps[m].numpy()) for m in methods]
    class_name = target.classes[k] if target.classes and k < len(target.classes) else None
    label = f"class {k}" + (f" '{class_name}'" if class_name else "")
    title = f"{' | '.join(NAMES[m] for m in methods)} on {name} for {label} (p={prob:.2f})"
    labels = ["image"] + [NAMES[m] for m in methods]
    tiles = [drawing.labelled(drawing.upscale(p, factor), text) for p, text in zip(panels, labels)]
    width, height = drawing.save_png(drawing.grid(tiles, len(tiles)), title, out)
    return CamResult(list(methods), name, k, class_name, prob, predicted, out, width, height, warnings)


def _patch_embedding_warning(model: nn.Module, layer: str) -> list[str]:
    """The default layer of a vision transformer (ViT, Swin) is its only convolution, the patch embedding: its map
    is taken before every layer that decides the class, and shows the input more than the evidence."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if len(convs) != 1 or convs[0].stride[0] < 2 or tuple(convs[0].kernel_size) != tuple(convs[0].stride):
        return []
    conv = convs[0]
    k = conv.kernel_size[0]
    return [f"{layer} is this model's only convolution, a patch embedding ({k}x{k} with stride {k}): its map comes "
            "before every layer that decides the class and shows little of their evidence; the later layers hold "
            "tokens (a ViT's sequence, a Swin's H x W x C grid), not the C x H x W map Grad-CAM takes"]
