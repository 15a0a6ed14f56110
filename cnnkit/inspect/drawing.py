"""The pictures of cnnkit.inspect: tiles in a grid, colour maps, overlays and a title band, as PNG files.

Pillow composes the image and matplotlib supplies the colour maps (no figures, so sizes are exact: a grid of
n tiles of t pixels with 2-pixel gaps is predictable, and the tests check it).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cnnkit.atomic import atomic_path, why_not_written
from cnnkit.errors import UserError

GAP = 2  # pixels between tiles
TITLE_HEIGHT = 18  # pixels of the title band
BACKGROUND = (255, 255, 255)


def normalise(t: torch.Tensor) -> torch.Tensor:
    """Scale to 0..1 over the last two dimensions (each map on its own); a constant map becomes 0."""
    t = t.detach().float().cpu()
    lo = t.amin(dim=(-2, -1), keepdim=True)
    hi = t.amax(dim=(-2, -1), keepdim=True)
    return torch.where(hi > lo, (t - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(t))


def colour(values: torch.Tensor | np.ndarray, cmap: str = "viridis") -> np.ndarray:
    """An H x W array in 0..1 as H x W x 3 uint8 through a matplotlib colour map."""
    from matplotlib import colormaps

    arr = values.numpy() if isinstance(values, torch.Tensor) else values
    return (colormaps[cmap](np.clip(arr, 0, 1))[..., :3] * 255).round().astype(np.uint8)


def upscale(arr: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement, so small maps and 3x3 kernels stay crisp."""
    return arr if factor <= 1 else arr.repeat(factor, axis=0).repeat(factor, axis=1)


def grid(tiles: list[np.ndarray], columns: int | None = None) -> np.ndarray:
    """H x W x 3 uint8 tiles of one size, row by row with GAP pixels between them, as one image."""
    n = len(tiles)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    h, w = tiles[0].shape[:2]
    out = np.full((rows * h + (rows - 1) * GAP, columns * w + (columns - 1) * GAP, 3), BACKGROUND, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * (h + GAP): r * (h + GAP) + h, c * (w + GAP): c * (w + GAP) + w] = tile
    return out


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """``heat`` (H x W in 0..1) in colour, blended over ``image`` (H x W x 3 uint8)."""
    coloured = colour(heat, cmap).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + coloured * alpha).round().clip(0, 255).astype(np.uint8)


def labelled(tile: np.ndarray, label: str) -> np.ndarray:
    """``tile`` (H x W x 3 uint8) under a band of TITLE_HEIGHT pixels with ``label`` centred in it (cut to
    the tile's width), so a panel of a grid says what it is."""
    font = ImageFont.load_default()
    band = Image.new("RGB", (tile.shape[1], TITLE_HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(band)
    while label and draw.textlength(label, font=font) > tile.shape[1] - 4:
        label = label[:-1]
    draw.text(((tile.shape[1] - draw.textlength(label, font=font)) / 2, 3), label, fill=(0, 0, 0), font=font)
    return np.concatenate([np.asarray(band), tile])


def names_a_picture(path: str) -> bool:
    """Whether ``path`` ends in a picture's suffix (.png, .jpg, ... any PIL knows): a name for a file, not for a
    folder of them."""
    return os.path.splitext(path)[1].lower() in Image.registered_extensions()


def image_format(path: str) -> str:
    """The format PIL writes for ``path``'s suffix ("PNG" for .png, "JPEG" for .jpg): a picture named cam.jpg
    holds JPEG bytes. A suffix that names no format PIL can write is a UserError, and so is a folder."""
    if os.path.isdir(path):
        raise UserError(f"cannot write {path}: it is a folder; name the picture to write, such as "
                        f"{os.path.join(path, 'picture.png')}")
    suffix = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        what = f"its suffix '{suffix}'" if suffix else "a name without a suffix"
        raise UserError(f"cannot write {path}: {what} names no image format cnnkit writes; end it in .png "
                        "(or .jpg, .webp, ...)")
    return fmt


def check_picture_path(path: str) -> str:
    """The format to write ``path`` in (``image_format``); a UserError where its folder does not exist. For a
    command to refuse a bad --out before its work (Score-CAM's thousands of forward passes) as well as at the end."""
    fmt = image_format(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"cannot write {path}: folder {folder} does not exist")
    return fmt


def save_png(image: np.ndarray, title: str, path: str) -> tuple[int, int]:
    """Write ``image`` (H x W x 3 uint8) under ``title`` (one band of TITLE_HEIGHT pixels per line) to
    ``path``, in the format its suffix names (see ``image_format``; PNG for cnnkit's own names); returns
    (width, height). The picture widens only if a title line is wider than the image."""
    fmt = check_picture_path(path)
    font = ImageFont.load_default()
    lines = title.split("\n")
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max([image.shape[1]] + [int(measure.textlength(line, font=font)) + 8 for line in lines])
    band = TITLE_HEIGHT * len(lines)
    canvas = Image.new("RGB", (width, image.shape[0] + band), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((4, 3 + i * TITLE_HEIGHT), line, fill=(0, 0, 0), font=font)
    canvas.paste(Image.fromarray(image), (0, band))
    try:
        with atomic_path(path) as tmp:  # a failed or interrupted write leaves the picture that was there
            canvas.save(tmp, format=fmt)
    except OSError as e:
        raise UserError(f"cannot write {path} ({why_not_written(e)}); choose a path in a writable folder") from None
    return canvas.size


def tile_factor(side: int, least: int = 32) -> int:
    """How much to enlarge a map of ``side`` pixels so that it is at least ``least`` pixels wide."""
    return max(1, math.ceil(least / max(1, side)))
