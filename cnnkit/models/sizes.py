"""Whether a built model runs on images of a given size.

A model built for one input size may not run on another: a flatten head (``simple_cnn``, ``cnn_bn``,
``linear``, ``mlp``) has its first linear layer sized for the input size it was built for, so a trained run's
model takes that size only, while a global-average-pool head (ResNet, fastnet) takes any size large enough.
Commands that run a trained model at a user's ``--input-size`` check it here first, so a size the model cannot
take is a one-line error, not a shape mismatch deep in the forward pass. ``check_before_building`` runs such a
check on the model built on the meta device (shapes without data: no memory, no initialisation), so the error
comes before seconds of building the real one (vgg11's 133 M parameters).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

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


def check_runs_on(model: nn.Module, shape: tuple[int, int, int]) -> None:
    """Raise ``run_or_size_error``'s UserError unless ``model`` runs on one image of ``shape`` (C, H, W pixels).
    The model is left as it was."""
    error = _forward_error(model, shape)
    if error is not None:
        raise _cannot_take(model, shape, error)


ADAPTIVE_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def last_feature_maps(model: nn.Module, shape: tuple[int, int, int]) -> tuple[str, int, int] | None:
    """(name, height, width) of the maps that ``model``'s last stage outputs for one image of ``shape`` (C, H, W
    pixels): the last of its direct children, in the order its forward pass calls them, whose output is a batch of
    maps (N, C, H, W), as a ResNet's ``layer4`` or VGG's ``features``. An adaptive pool is no stage (VGG's
    ``avgpool`` makes 7x7 of a 1x1 map; SqueezeNet's head ends in one): a child whose output is an adaptive pool's
    is passed over. None where no child outputs maps, or the pass fails. One forward pass of zeros in eval mode,
    without gradients; the model is left as it was, its hooks removed."""
    pooled: list[torch.Tensor] = []  # the adaptive pools' outputs
    outputs: list[tuple[str, torch.Tensor]] = []
    children = {m: name for name, m in model.named_children()}

    def record(module: nn.Module, inputs: tuple, output: object) -> None:
        if isinstance(module, ADAPTIVE_POOLS):
            pooled.append(output)
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
    maps = [(name, out) for name, out in outputs if out.dim() == 4 and not any(out is p for p in pooled)]
    if not maps:
        return None
    name, out = maps[-1]
    return name, out.shape[2], out.shape[3]


def _forward_error(model: nn.Module, shape: tuple[int, int, int]) -> Exception | None:
    """What ``model`` raises (one of SIZE_ERRORS) on one image of zeros of ``shape``, None where it runs: one
    forward pass in eval mode, without gradients, on the model's device and in its dtype. On the meta device, an
    operation it lacks is a NotImplementedError (no answer; ``check_before_building`` leaves it to the real model)."""
    param = next(model.parameters(), None)
    x = torch.zeros(1, *shape, dtype=param.dtype if param is not None and param.is_floating_point() else None,
                    device=param.device if param is not None else None)
    try:
        with torch.no_grad(), eval_mode(model):
            model(x)
    except SIZE_ERRORS as e:
        if x.is_meta and "meta" in first_line(e).lower():  # "Tensor.item() cannot be called on meta tensors"
            raise NotImplementedError(first_line(e)) from e
        return e
    return None


# Fewer parameters than this, and a model is built for real (initialised) in less time than one pass on the meta
# device takes (its shape functions are Python, about as slow per operation as a small layer's initialisation):
# check_before_building leaves such a model to the check after the real build. vgg11 has 133 M, resnet18 11.7 M.
CHECKED_BEFORE_BUILDING = 10_000_000


def check_before_building(check: Callable[[nn.Module], None], build: Callable[[], nn.Module],
                          shape: tuple[int, int, int]) -> None:
    """Run ``check`` (``check_trains_on``, ``check_input_size``, ... on the model given, for images of ``shape``,
    C x H x W pixels) on the model ``build()`` makes, built on the meta device: no memory, no initialisation, so a
    size the model cannot take is its one-line error before seconds of building the real one. ``build``'s own
    UserErrors (its options, an input too small for a flatten head) are the real build's, and come now too. A model
    the meta device cannot build or run, or one quick to build (CHECKED_BEFORE_BUILDING), is left to the same check
    on the real model, which the caller runs after building it either way."""
    try:
        model = on_meta(build)
    except UserError as e:
        if "meta" in str(e).lower():  # create_model's words for a builder that failed on the meta device
            return
        raise
    except Exception:  # the builder computes with real tensors: the real build says what is wrong, if anything
        return
    if sum(p.numel() for p in model.parameters()) < CHECKED_BEFORE_BUILDING:
        return
    try:
        check(model)
    except NotImplementedError:
        return
    except UserError as e:
        # The meta device words some shape errors its own way ("a and b must have same reduction dim" for "mat1
        # and mat2 shapes cannot be multiplied"): PyTorch's usual words come from one pass of the model's real
        # tensors, left uninitialised (memory reserved, not computed), which also has the last word on the size.
        try:
            meta_error, real_error = _forward_error(model, shape), _forward_error(model.to_empty(device="cpu"), shape)
        except Exception:  # no memory for it, or values the pass cannot use: the real build says what is wrong
            return
        if meta_error is None or real_error is None:
            return
        raise UserError(str(e).replace(first_line(meta_error), first_line(real_error))) from None


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device: tensors with shapes but no data, so nothing is allocated or initialised
    (``vit_h_14``'s 632 M parameters in a second). The random number generators are left as they were, so a real
    build after it gets the weights it would have got without it."""
    with torch.random.fork_rng(devices=[]), _NoValuesOnMeta():
        try:
            with torch.device("meta"):
                return build()
        except NotImplementedError:
            with _parameters_on_meta():
                return build()


class _NoValuesOnMeta(TorchFunctionMode):
    """Skip the initialisation of a meta tensor: it has no values to set, and PyTorch's Python path for
    ``normal_`` and its kin on the meta device is slower than initialising real tensors of a small model."""

    OPS = frozenset({"normal_", "uniform_", "fill_", "zero_", "erfinv_", "mul_", "add_", "clamp_", "copy_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in self.OPS and args and isinstance(args[0], torch.Tensor) \
                and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move each parameter and buffer to the meta device as it is registered (the idea of accelerate's
    ``init_empty_weights``), for builders that compute with real tensors and so fail under
    ``torch.device("meta")`` (RegNet works out its stage widths with torch ops)."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def on_meta_parameter(module, name, param):
        register_parameter(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    def on_meta_buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, None if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = on_meta_parameter, on_meta_buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


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
        raise _cannot_take(model, tuple(x.shape[1:]), e) from None


def _cannot_take(model: nn.Module, shape: tuple[int, ...], e: Exception) -> UserError:
    return size_error(e, f"the model cannot take a {'x'.join(map(str, shape))} input", max(shape[1:]),
                      size_fix(model, shape, e))


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
