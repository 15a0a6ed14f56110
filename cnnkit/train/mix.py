"""Mixup and CutMix: whole batches blended with a shuffled copy of themselves, with soft targets.

Mixup (Zhang et al. 2018) blends two images pixel by pixel, ``lam * x + (1 - lam) * x[perm]``; CutMix (Yun et al.
2019) pastes a box of the partner image into each image, and ``lam`` becomes the share of pixels left from the
image itself. The targets blend the same way, so the loss is cross-entropy against a soft target. One ``lam``
is drawn per batch from Beta(alpha, alpha), as timm's ``Mixup`` does in its default batch mode; with both
methods on, each batch takes one of them with probability 1/2.

Every draw comes from a seed the loader gives each batch (run seed, epoch, batch number), never from a
global generator: a resumed run mixes each batch exactly as the uninterrupted run did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_MIX_STREAM = 0x6D6978  # keeps the mixing draws apart from the crop/flip draws of the same batch seed


@dataclass
class Mix:
    """Mixing of training batches: Beta parameters of mixup and of CutMix (0: that method is off)."""

    num_classes: int
    mixup: float = 0.0
    cutmix: float = 0.0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed batch and its soft targets (N x classes, rows summing to 1)."""
        rng = np.random.default_rng([seed % 2**64, _MIX_STREAM])
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or rng.random() < 0.5)
        lam = float(rng.beta(*(2 * [self.cutmix if use_cutmix else self.mixup])))
        perm = torch.from_numpy(rng.permutation(len(images))).to(images.device)
        if use_cutmix:
            images, lam = cutmix(images, perm, lam, rng)
        else:
            images = lam * images + (1 - lam) * images[perm]
        one_hot = F.one_hot(labels, self.num_classes).float()
        return images, lam * one_hot + (1 - lam) * one_hot[perm]


def cutmix(images: torch.Tensor, perm: torch.Tensor, lam: float, rng: np.random.Generator) -> tuple[torch.Tensor, float]:
    """Paste one box of ``images[perm]`` into every image: a box of about (1 - lam) of the area, centred
    anywhere, clipped at the borders. Returns the images and the share of pixels each keeps of itself."""
    h, w = images.shape[-2:]
    cut = np.sqrt(1.0 - lam)
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    y0, y1 = np.clip([cy - int(h * cut) // 2, cy + int(h * cut) // 2], 0, h)
    x0, x1 = np.clip([cx - int(w * cut) // 2, cx + int(w * cut) // 2], 0, w)
    mixed = images.clone()
    mixed[:, :, y0:y1, x0:x1] = images[perm][:, :, y0:y1, x0:x1]
    return mixed, float(1.0 - (y1 - y0) * (x1 - x0) / (h * w))
