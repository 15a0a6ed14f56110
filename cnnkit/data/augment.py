"""Augmentation of whole batches, on the training device, on uint8 images.

Per-sample PIL transforms in DataLoader workers (the classic tutorial's path) cost more CPU than the
network itself on small images; the same random crop and flip done on a whole uint8 batch cost a few
tensor operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Each image shifted by its own random (dy, dx) in [-pad, pad] with zero fill: RandomCrop(size, padding=pad)."""
    if pad <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device).to(images.device)
    # Every crop of every image, as a view (n, c, 2*pad+1, 2*pad+1, h, w) of the padded batch, then one
    # advanced index picks each image's own: a single copy of the output. A gather over precomputed flat
    # offsets gives the same images 3.7x slower (an int64 index per pixel), and boolean-mask copies per
    # shift value cost ~20 small indexing ops per batch, more than the network's own step on 2 cores.
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(n, device=images.device), :, shifts[0], shifts[1]]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image mirrored left-right with probability 1/2."""
    flip = (torch.rand(len(images), generator=generator, device=generator.device) < 0.5).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def flip_bits(num_images: int, seed: int) -> torch.Tensor:
    """One fixed random bit per image of a set, for ``alternating_flip``."""
    return torch.randint(0, 2, (num_images,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def alternating_flip(images: torch.Tensor, bits: torch.Tensor, epoch: int) -> torch.Tensor:
    """Mirror each image when its fixed random bit (``flip_bits`` of its index) xor (``epoch`` is odd) is 1.

    Over any two consecutive epochs every image is seen once each way, where independent random flips
    show about half of the images the same way twice; on CIFAR-10 this buys the accuracy of about a
    tenth of the epochs (Jordan 2024, airbench's "alternating flip").
    """
    flip = (bits ^ (epoch % 2)).bool().to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def cutout(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Each image gets one ``size`` x ``size`` square of zeros at a random place (DeVries & Taylor 2017),
    clipped at the borders as in the original."""
    if size <= 0:
        return images
    n, _, h, w = images.shape
    centres = torch.rand(2, n, generator=generator, device=generator.device).to(images.device)
    cy, cx = (centres[0] * h).long(), (centres[1] * w).long()
    ys = torch.arange(h, device=images.device)[None, :]
    xs = torch.arange(w, device=images.device)[None, :]
    inside_y = (ys >= (cy - size // 2)[:, None]) & (ys < (cy - size // 2 + size)[:, None])
    inside_x = (xs >= (cx - size // 2)[:, None]) & (xs < (cx - size // 2 + size)[:, None])
    keep = ~(inside_y[:, :, None] & inside_x[:, None, :])
    return images * keep[:, None].to(images.dtype)


AUGMENT_POLICIES = ("randaugment", "trivialaugment")


def policy_augment(images: torch.Tensor, policy: str | None, erasing: float, generator: torch.Generator) -> torch.Tensor:
    """torchvision's RandAugment / TrivialAugmentWide and RandomErasing (transforms v2), each image drawn on its
    own. These policies pick their operation per call, so they run image by image; their random draws are
    seeded from ``generator``, so a batch's augmentation stays reproducible (and a resumed run exact)."""
    if policy is None and not erasing:
        return images
    from torchvision.transforms import v2

    steps = []
    if policy is not None:
        steps.append(v2.RandAugment() if policy == "randaugment" else v2.TrivialAugmentWide())
    if erasing:
        steps.append(v2.RandomErasing(p=erasing, value=0))
    transform = v2.Compose(steps)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = torch.stack([transform(image) for image in images.cpu()])
    return out.to(images.device)
