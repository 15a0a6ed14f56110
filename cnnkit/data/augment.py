"""Augmentation of whole batches, on the training device, on uint8 images.

Per-sample PIL transforms in DataLoader workers (the classic tutorial's path) cost more CPU than the
network itself on small images; the same random crop and flip done on a whole uint8 batch cost a few
tensor operations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cnnkit import compiled


def crop_offsets(n: int, pad: int, generator: torch.Generator) -> torch.Tensor:
    """The random crop's draw: each of ``n`` images' crop corner (row, column) in its image padded by ``pad``,
    2 x n in [0, 2*pad], so each image is shifted by its own (dy, dx) in [-pad, pad]: RandomCrop(size, padding=pad)."""
    return torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=generator.device)


def crop(images: torch.Tensor, pad: int, offsets: torch.Tensor) -> torch.Tensor:
    """Each image padded by ``pad`` zeros and cropped back to its size at its own corner in ``offsets``."""
    n, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    offsets = offsets.to(images.device)
    # Every crop of every image, as a view (n, c, 2*pad+1, 2*pad+1, h, w) of the padded batch, then one
    # advanced index picks each image's own: a single copy of the output. A gather over precomputed flat
    # offsets gives the same images several times slower (an int64 index per pixel), and boolean-mask copies per
    # shift value cost ~20 small indexing ops per batch (docs/design.md, "The data path").
    windows = padded.unfold(2, h, 1).unfold(3, w, 1)
    return windows[torch.arange(n, device=images.device), :, offsets[0], offsets[1]]


def coin_flips(n: int, generator: torch.Generator) -> torch.Tensor:
    """The random flip's draw: which of ``n`` images to mirror (bool), each with probability 1/2."""
    return torch.rand(n, generator=generator, device=generator.device) < 0.5


def mirror(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """The images mirrored left-right where ``flips`` (bool, one per image) is set."""
    return torch.where(flips.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


def crop_flip_normalize(images: torch.Tensor, pad: int, offsets: torch.Tensor, flips: torch.Tensor,
                        shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``crop`` at ``offsets``, then ``mirror`` where ``flips``, then (x - shift) * scale in float32: the same
    values bit for bit as those steps one after another, in one loop compiled by torch.compile
    (``cnnkit/compiled.py``). uint8 N x C x H x W in, float32 N x C x H x W out.

    The steps one by one are a dozen operations and passes over the batch, each small; the compiled loop is
    one pass (docs/design.md, "The training step", has the times).
    """
    padded = F.pad(images, (pad, pad, pad, pad))
    return compiled.run(_crop_flip_normalize, padded, pad, offsets[0], offsets[1], flips, shift, scale,
                        what="fused crop + flip + normalisation")


def _crop_flip_normalize(padded: torch.Tensor, pad: int, rows: torch.Tensor, cols: torch.Tensor,
                         flips: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # Output pixel (y, x) of image i is padded pixel (rows[i] + y, cols[i] + x), or (rows[i] + y, cols[i] + w-1-x)
    # where the image is mirrored. Written as flat offsets with the mirror as arithmetic (no select per pixel):
    # the compiled loop then runs 16 columns at a time.
    n, c, hp, wp = padded.shape
    h, w = hp - 2 * pad, wp - 2 * pad
    x = torch.arange(w, device=padded.device).view(1, 1, 1, w)
    y = torch.arange(h, device=padded.device).view(1, 1, h, 1)
    mirror = flips.view(n, 1, 1, 1).long()
    col = cols.view(n, 1, 1, 1) + x + mirror * (w - 1 - 2 * x)
    row = rows.view(n, 1, 1, 1) + y
    plane = torch.arange(n * c, device=padded.device).view(n, c, 1, 1) * (hp * wp)
    values = padded.reshape(-1)[plane + row * wp + col].float()
    return (values - shift) * scale


def flip_bits(num_images: int, seed: int) -> torch.Tensor:
    """One fixed random bit per image of a set, for ``alternating_flips``."""
    return torch.randint(0, 2, (num_images,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def alternating_flips(bits: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images to mirror this epoch (bool): those whose fixed random bit (``flip_bits`` of their index)
    xor (``epoch`` is odd) is 1.

    Over any two consecutive epochs every image is seen once each way, where independent random flips
    show about half of the images the same way twice; on CIFAR-10 this buys the accuracy of about a
    tenth of the epochs (Jordan 2024, airbench's "alternating flip").
    """
    return (bits ^ (epoch % 2)).bool()


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
