"""Augmentation of whole batches, on the training device, on uint8 images.

Per-sample PIL transforms in DataLoader workers (the classic tutorial's path) cost more CPU than the
network itself on small images; the same random crop and flip done on a whole uint8 batch cost a few
masked copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by its own random (dy, dx) in [-pad, pad] with zero fill: RandomCrop(size, padding=pad)."""
    if pad <= 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device)
    shifts = shifts.to(images.device)
    # Two passes of masked copies, one per axis: 2 * (2*pad + 1) copies of a few images each instead of
    # one Python-level crop per image.
    rows = torch.empty(n, images.shape[1], h, w + 2 * pad, dtype=images.dtype, device=images.device)
    for s in range(2 * pad + 1):
        m = shifts[0] == s
        rows[m] = padded[m, :, s : s + h, :]
    out = torch.empty_like(images)
    for s in range(2 * pad + 1):
        m = shifts[1] == s
        out[m] = rows[m, :, :, s : s + w]
    return out


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = (torch.rand(len(images), generator=generator, device=generator.device) < 0.5).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
