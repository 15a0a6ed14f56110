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
        raise size_error(error, f"{name} cannot take {'x'.join(map(str, shape))} images", shape[1])


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


def first_line(e: Exception) -> str:
    """``e``'s message as an error line quotes it: its first line, shortened (its type where it has none)."""
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def size_error(e: Exception, what: str, size: int, fix: str = "use a larger --input-size") -> UserError:
    """The UserError for ``e``, which a model's forward pass raised on images of ``size`` pixels a side: too
    large for the memory (PyTorch's allocator refused), or else too small for the network (``what`` says which
    model and size, ``fix`` what to do)."""
    if isinstance(e, torch.OutOfMemoryError) or "not enough memory" in str(e) or "tried to allocate" in str(e):
        return UserError(f"input size {size}: one image does not fit in memory ({first_line(e)}); use a smaller "
                         "--input-size")
    return UserError(f"{what} ({first_line(e)}); {fix}")
