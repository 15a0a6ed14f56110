"""Whether a built model runs on images of a given size.

A model built for one input size may not run on another: a flatten head (``simple_cnn``, ``cnn_bn``,
``linear``, ``mlp``) has its first linear layer sized for the input size it was built for, so a trained run's
model takes that size only, while a global-average-pool head (ResNet, fastnet) takes any size large enough.
Commands that run a trained model at a user's ``--input-size`` check it here first, so a size the model cannot
take is a one-line error, not a shape mismatch deep in the forward pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnnkit.errors import UserError
from cnnkit.modes import eval_mode

# What a model's forward pass raises for an input size it cannot take: PyTorch's shape errors, and the `assert` or
# ValueError with which some models check the size themselves (torchvision's ViT: "Wrong image width!").
SIZE_ERRORS = (RuntimeError, AssertionError, ValueError)


def check_input_size(model: nn.Module, shape: tuple[int, int, int], own: tuple[int, int, int], label: str) -> None:
    """Raise a UserError unless ``model`` runs on one image of ``shape`` (C, H, W pixels). ``own`` is the shape it
    was built or trained for (not tried again: it runs on that); ``label`` names the model (a checkpoint's path)
    in the message. The model is left as it was."""
    if tuple(shape) == tuple(own):
        return
    error = _forward_error(model, shape)
    if error is not None:
        c, h, w = own
        size = f"{h}" if h == w else f"{c} {h} {w}"
        raise UserError(f"{label} takes {c}x{h}x{w} images and cannot run on {'x'.join(map(str, shape))} "
                        f"({first_line(error)}); leave out --input-size, or pass --input-size {size}")


def check_trains_on(model: nn.Module, name: str, shape: tuple[int, int, int]) -> None:
    """Raise a UserError unless ``model``, a fresh ``name`` built for ``shape`` (C, H, W: the training images),
    runs on one image of that shape. vgg16's five pools leave nothing of a 16x16 image, and PyTorch says so only in
    the first training step, after the run folder exists. The model is left as it was."""
    error = _forward_error(model, shape)
    if error is not None:
        raise size_error(error, f"{name} cannot take {'x'.join(map(str, shape))} images", shape[1],
                         size_fix(model, shape, error))


ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def last_feature_maps(model: nn.Module, shape: tuple[int, int, int]) -> tuple[str, int, int] | None:
    """(name, height, width) of the maps that ``model``'s last stage outputs for one image of ``shape`` (C, H, W
    pixels): the last of its direct children, in the order its forward pass calls them, whose output is a batch of
    maps (N, C, H, W), as a ResNet's ``layer4`` or VGG's ``features``. An adaptive pool is no stage (VGG's
    ``avgpool`` makes 7x7 of a 1x1 map; SqueezeNet's head ends in one): a child whose output is an adaptive pool's
    is passed over. None where no child outputs maps, or the pass fails. One forward pass of zeros in eval mode,
    without gradients; the model is left as it was, its hooks removed."""
    pooled: set[int] = set()  # ids of the adaptive pools' outputs, held alive in ``outputs`` until compared
    outputs: list[tuple[str, torch.Tensor]] = []
    children = {m: name for name, m in model.named_children()}

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(module, ADAPTIVE_POOLS):
            pooled.add(id(output))
            outputs.append(("", output))  # kept so that its id is not reused by a later tensor
        if module in children and torch.is_tensor(output):
            outputs.append((children[module], output))

    handles = [m.register_forward_hook(record) for m in model.modules() if m in children or
               isinstance(m, ADAPTIVE_POOLS)]
    try:
        if _forward_error(model, shape) is not None:
            return None
    finally:
        for h in handles:
            h.remove()
    maps = [(name, out) for name, out in outputs if name and out.dim() == 4 and id(out) not in pooled]
    if not maps:
        return None
    name, out = maps[-1]
    return name, out.shape[2], out.shape[3]


def _forward_error(model: nn.Module, shape: tuple[int, int, int]) -> Exception | None:
    """What ``model`` raises (one of SIZE_ERRORS) on one image of zeros of ``shape``, None where it runs: one
    forward pass in eval mode, without gradients, on the model's device and in its dtype."""
    param = next(model.parameters(), None)
    x = torch.zeros(1, *shape, dtype=param.dtype if param is not None and param.is_floating_point() else None,
                    device=param.device if param is not None else None)
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    except SIZE_ERRORS as e:
        return e
    return None


# The largest side tried in looking for the smallest one a model takes: every torchvision classifier takes 75
# or less (inception_v3's minimum; vgg16's is 32), and one forward pass at this size stays quick on a CPU.
LARGEST_TRIED = 256


def smallest_size(model: nn.Module, shape: tuple[int, int, int]) -> int | None:
    """The smallest square side above ``shape``'s height (C, H, W; one the model cannot take) that ``model`` runs
    on, or None where no side up to LARGEST_TRIED does, ``shape`` is not square or a pass fails otherwise. One
    forward pass of zeros per side tried: doubling, then halving the gap (an output size never shrinks as its input
    grows)."""
    c, h, w = shape
    low, high = h, 2 * h
    if h != w or high > LARGEST_TRIED:
        return None
    try:
        while _forward_error(model, (c, high, high)) is not None:
            if high >= LARGEST_TRIED:
                return None
            low, high = high, min(2 * high, LARGEST_TRIED)
        while high - low > 1:
            middle = (low + high) // 2
            if _forward_error(model, (c, middle, middle)) is None:
                high = middle
            else:
                low = middle
    except Exception:  # an operation the meta device lacks, memory: the plain advice then
        return None
    return high


def larger_size_fix(model: nn.Module, shape: tuple[int, int, int], also: str = "") -> str:
    """The fix for an input too small for ``model``, with the smallest size it takes where one is found."""
    side = smallest_size(model, shape)
    return f"use a larger --input-size{also}" + (f" (the smallest it takes: {side})" if side is not None else "")


def size_fix(model: nn.Module, input_shape: tuple[int, int, int], e: Exception) -> str:
    """What to do about an input ``model`` failed on with ``e``. "A larger --input-size" is the fix for a network
    that pools a small image away, and the wrong one for a module built for 1-channel images (asked about 3, as
    ``summary(module)`` does by default) or with a linear layer sized for one input size (a flatten head)."""
    c, h, w = input_shape
    message = str(e)
    if _out_of_memory(e):
        return "use a smaller --input-size"  # size_error says so; no larger sizes to try
    first = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if "channel" in message.lower() and first is not None and first.in_channels != c:
        return (f"its first convolution takes {first.in_channels}-channel images: use --input-size "
                f"{first.in_channels} {h} {w}")
    if "mat1 and mat2" in message or "same reduction dim" in message:
        return "a linear layer is sized for another input size (a flatten head): use the size the model was built for"
    return larger_size_fix(model, input_shape)


def run_or_size_error(model: nn.Module, x: torch.Tensor):
    """``model(x)``, where an input the model cannot take is a UserError with the fix (``size_fix``)."""
    try:
        return model(x)
    except SIZE_ERRORS as e:
        shape = tuple(x.shape[1:])
        raise size_error(e, f"the model cannot take a {'x'.join(map(str, shape))} input", max(shape[1:]),
                         size_fix(model, shape, e)) from None


def first_line(e: Exception) -> str:
    """``e``'s message as an error line quotes it: its first line, shortened (its type where it has none)."""
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def size_error(e: Exception, what: str, size: int, fix: str = "use a larger --input-size") -> UserError:
    """The UserError for ``e``, which a model's forward pass raised on images of ``size`` pixels a side: too
    large for the memory (PyTorch's allocator refused), or else too small for the network (``what`` says which
    model and size, ``fix`` what to do)."""
    if _out_of_memory(e):
        return UserError(f"input size {size}: one image does not fit in memory ({first_line(e)}); use a smaller "
                         "--input-size")
    return UserError(f"{what} ({first_line(e)}); {fix}")


def _out_of_memory(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "not enough memory" in str(e) or "tried to allocate" in str(e)
