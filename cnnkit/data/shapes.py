"""``shapes``: a generated dataset of 10 geometric shape classes, deterministic by seed, no download needed.

Each image holds one shape (circle, square, triangle, star, cross, ring, crescent, bar, half disk, arrow)
at a random position, scale, rotation and colour, on a textured, noisy background of another colour.
Because the position varies, a classifier has to recognise the shape wherever it sits: a CNN's weight
sharing and pooling do that, a linear model on pixels cannot. Shapes are drawn analytically on a 2x finer
grid and averaged down, so edges are anti-aliased at every image size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross", "ring", "crescent", "bar", "half_disk", "arrow")
_SUPERSAMPLE = 2


def _star(u: torch.Tensor, v: torch.Tensor, inner: float = 0.42) -> torch.Tensor:
    sector = 2 * math.pi / 5
    rho = torch.sqrt(u * u + v * v)
    alpha = (torch.atan2(v, u) % sector - sector / 2).abs()  # 0 at an inner corner, sector/2 at a tip
    alpha = sector / 2 - alpha  # 0 at a tip
    qx, qy = rho * torch.cos(alpha), rho * torch.sin(alpha)
    p2x, p2y = inner * math.cos(sector / 2), inner * math.sin(sector / 2)
    # The origin side of the edge from the tip (1, 0) to the inner corner (p2x, p2y).
    return (p2x - 1) * qy - p2y * (qx - 1) >= 0


def _inside(shape: str, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the points (u, v), in the shape's own unit-radius frame, that lie inside it."""
    rho2 = u * u + v * v
    if shape == "circle":
        return rho2 < 0.85**2
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) < 0.7
    if shape == "triangle":
        s3 = math.sqrt(3.0)
        return (v > -0.5) & (s3 * u + v < 1) & (-s3 * u + v < 1)
    if shape == "star":
        return _star(u, v) & (rho2 < 1)
    if shape == "cross":
        return ((u.abs() < 0.28) & (v.abs() < 0.9)) | ((v.abs() < 0.28) & (u.abs() < 0.9))
    if shape == "ring":
        return (rho2 > 0.5**2) & (rho2 < 0.9**2)
    if shape == "crescent":
        return (rho2 < 0.9**2) & ((u - 0.45) ** 2 + v * v > 0.7**2)
    if shape == "bar":
        return (u.abs() < 0.95) & (v.abs() < 0.22)
    if shape == "half_disk":
        return (rho2 < 0.95**2) & (v > -0.1)
    if shape == "arrow":
        shaft = (u > -0.9) & (u < 0.15) & (v.abs() < 0.15)
        head = (u >= 0.1) & (u < 0.95) & (v.abs() < (0.95 - u) * 0.85)
        return shaft | head
    raise ValueError(shape)


def make_shapes(n: int, size: int = 32, channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (uint8, n x channels x size x size) and their labels (int64), balanced over the classes."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    k = len(SHAPE_CLASSES)
    labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
    radius = size * (0.22 + 0.16 * rand(n))  # pixels
    cx = radius + (size - 2 * radius) * rand(n)
    cy = radius + (size - 2 * radius) * rand(n)
    angle = 2 * math.pi * rand(n)

    fine = size * _SUPERSAMPLE
    coords = (torch.arange(fine, dtype=torch.float32) + 0.5) / _SUPERSAMPLE
    ys, xs = coords.view(1, fine, 1), coords.view(1, 1, fine)
    mask = torch.zeros(n, fine, fine)
    for c, shape in enumerate(SHAPE_CLASSES):
        idx = (labels == c).nonzero().flatten()
        if len(idx) == 0:
            continue
        dx, dy = xs - cx[idx].view(-1, 1, 1), ys - cy[idx].view(-1, 1, 1)
        cos, sin = torch.cos(angle[idx]).view(-1, 1, 1), torch.sin(angle[idx]).view(-1, 1, 1)
        r = radius[idx].view(-1, 1, 1)
        u, v = (dx * cos + dy * sin) / r, (-dx * sin + dy * cos) / r
        mask[idx] = _inside(shape, u, v).float()
    alpha = F.avg_pool2d(mask.unsqueeze(1), _SUPERSAMPLE)  # n x 1 x size x size, anti-aliased coverage

    # Background: a base colour, a smooth random texture and pixel noise. Foreground: a colour far enough
    # from the background's that the shape is always visible.
    base = rand(n, 3, 1, 1)
    texture = F.interpolate(rand(n, 3, 4, 4) - 0.5, size=(size, size), mode="bilinear", align_corners=False)
    background = base + 0.35 * texture + 0.06 * torch.randn(n, 3, size, size, generator=g)
    fg = rand(n, 3, 1, 1)
    too_close = (fg - base).norm(dim=1, keepdim=True) < 0.5
    fg = torch.where(too_close, (base + 0.5) % 1.0, fg)
    foreground = fg + 0.04 * torch.randn(n, 3, size, size, generator=g)
    images = (alpha * foreground + (1 - alpha) * background).clamp(0, 1)
    if channels == 1:
        images = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif channels != 3:
        images = images.mean(1, keepdim=True).expand(n, channels, size, size)
    return (images * 255).round().to(torch.uint8).contiguous(), labels
