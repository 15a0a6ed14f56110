"""Test-time augmentation: a model's outputs averaged over mirrored and shifted views of each image.

``TTAModel`` (``cnnkit eval/predict --tta``, ``--tta-shift N``, and the final validation of ``train --tta``)
averages the softmax over the image itself, its mirror image and, with ``shift`` pixels, the image moved up,
down, left and right by that much (the gap filled with black, as training's random crop pads). Small shifts
and flips are what the training augmentation showed the network, so each view is a fair guess and their
average a steadier one.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn

from cnnkit.errors import UserError


class TTAModel(nn.Module):
    """Wraps a model (or any callable from a normalised batch to logits, such as an ONNX session): the output is
    the log of the mean softmax over the views, so argmax, top-k, softmax and cross-entropy read it as logits."""

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], mean: list[float], std: list[float],
                 flip: bool = True, shift: int = 0) -> None:
        super().__init__()
        self.model = model  # a Module is registered as a child, so eval()/train() reach it
        self.flip, self.shift = flip, shift
        # A black pixel after normalisation, (0 - mean) / std: what fills the gap a shift opens.
        self.register_buffer("black", (-torch.tensor(mean) / torch.tensor(std)).view(1, -1, 1, 1), persistent=False)

    @property
    def num_views(self) -> int:
        return 1 + self.flip + (4 if self.shift else 0)

    def views(self, x: torch.Tensor) -> list[torch.Tensor]:
        views = [x]
        if self.flip:
            views.append(x.flip(-1))
        s = self.shift
        for dy, dx in ((s, 0), (-s, 0), (0, s), (0, -s)) if s else ():
            views.append(_shifted(x, dy, dx, self.black.to(x.device, x.dtype)))
        return views

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([self.model(v).float().softmax(1) for v in self.views(x)]).mean(0)
        return probs.clamp_min(torch.finfo(torch.float32).tiny).log()


def _shifted(x: torch.Tensor, dy: int, dx: int, fill: torch.Tensor) -> torch.Tensor:
    """``x`` moved down by ``dy`` and right by ``dx`` pixels (negative: up, left), the gap filled with ``fill``."""
    h, w = x.shape[-2:]
    out = fill.expand_as(x).clone()
    out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = \
        x[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def with_tta(model: Any, mean: list[float], std: list[float], flips: bool | None, tta: bool, shift: int,
             input_size: int | None = None) -> Any:
    """``model`` wrapped for test-time augmentation as asked (``tta``: add the mirror image; ``shift``: add four
    shifted views), or ``model`` itself when neither is asked. ``flips``: whether training mirrored the images
    (``Checkpoint.flip``, an ONNX export's ``flip``; None: not recorded); ``input_size``: its input's side in
    pixels, which a shift must stay below."""
    if shift < 0:
        raise UserError(f"--tta-shift takes a number of pixels, 0 or more, got {shift}")
    if input_size is not None and shift >= input_size:  # each shifted view would be black from edge to edge
        raise UserError(f"--tta-shift {shift} moves the model's {input_size}x{input_size} input out of view; "
                        "shift by a few pixels, as training's random crops did")
    if not tta and not shift:
        return model
    if tta and flips is False:
        raise UserError("this model trained without horizontal flips (mirrored digits are other symbols), so a "
                        "mirrored view is an image it never learned; use --tta-shift N alone")
    return TTAModel(model, mean, std, flip=tta, shift=shift)
