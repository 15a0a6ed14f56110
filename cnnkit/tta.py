"""Test-time augmentation: average a model's outputs over mirrored and shifted views of each image."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def tta_logits(model: nn.Module, images: torch.Tensor, shift: int = 1) -> torch.Tensor:
    """Logits of ``images`` (a normalised batch) averaged over views, weighted as the training
    augmentation would draw them: half from the image as it is, half from the image shifted by ``shift``
    pixels up-left and down-right (reflect-padded); each of those with and without a left-right mirror."""

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * model(x).float() + 0.5 * model(x.flip(-1)).float()

    logits = mirrored(images)
    if shift <= 0:
        return logits
    h, w = images.shape[-2:]
    padded = F.pad(images, (shift,) * 4, mode="reflect")
    shifted = [padded[..., :h, :w], padded[..., 2 * shift :, 2 * shift :]]
    return 0.5 * logits + 0.25 * sum(mirrored(x.contiguous(memory_format=torch.channels_last)) for x in shifted)
