"""Image files -> model input: one file -> a uint8 tensor of the model's channels and size; a list of files ->
one normalised float batch (what predict, and the checks of an export, feed a model); folders -> their image files.
The numpy functions need no torch: ``cnnkit predict model.onnx`` prepares images with Pillow and numpy alone.

Every mode Pillow opens is brought to what the model takes: grayscale, palette (with or without
transparency), RGBA and LA (composited on white, so transparent pixels do not turn into whatever colour
happens to sit under the alpha), CMYK, 16- and 32-bit integer images (scaled, not clipped), 32-bit float
images (on the scale their values fit: 0..1, 0..255 or 0..65535), and EXIF rotation is applied. Only an allow-list of formats is decoded.
"""

from __future__ import annotations

import errno
import os

from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cnnkit.errors import DataError, UserError, shown

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
ALLOWED_FORMATS = {"JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP", "PPM"}  # camera MPO files open through JPEG
# Bump whenever a file decodes to other pixels: decoded folders are cached under it (cnnkit/data/sources.py), and
# an entry of the old pixels must not be reused.
DECODER_VERSION = 3


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(name).startswith(".")


def path_list(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """One path, or several, as a list of strings: what the Python functions that take image files or folders
    accept."""
    return [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else [os.fspath(p) for p in paths]


def image_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Files as given, folders expanded to the image files below them (sorted, hidden ones skipped), through
    symbolic links to folders too (as training reads a class folder that is one), each folder once; a file
    reached twice (named and inside a folder given too, say) is listed once, where it is first reached."""
    out: list[str] = []
    for p in path_list(paths):
        if os.path.isdir(p):
            found = []
            visited = set()  # a link back up the tree would otherwise be walked forever
            for dirpath, dirnames, filenames in os.walk(p, followlinks=True):
                visited.add(os.path.realpath(dirpath))
                dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                     and os.path.realpath(os.path.join(dirpath, d)) not in visited)
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
            if not found:
                raise UserError(f"folder {p} holds no images")
            out += found
        elif os.path.exists(p):
            out.append(p)
        else:
            raise UserError(f"image path {p} {why_missing(p)}")
    seen: set[str] = set()
    unique = []
    for p in out:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def why_missing(path: str) -> str:
    """Why ``os.path.exists(path)`` is False, in words: a symbolic link that loops or leads nowhere, a folder
    that cannot be entered, or no such path."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "is a symbolic link that loops (it leads back to itself)"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        if e.errno != errno.ENOENT:
            return f"cannot be reached ({e.strerror})"
    return "does not exist"


# The scales a float image (mode F: 32-bit float TIFFs) is stored in, smallest first: 0..1, 8-bit and 16-bit values.
FLOAT_SCALES = (1.0, 255.0, 65535.0)
FLOAT_HEADROOM = 0.1  # values this share of a scale beyond its ends (resampling overshoot, noise) are clipped to it


def _float_to_8bit(arr: np.ndarray) -> np.ndarray:
    """A float image as 0..255, on the smallest of FLOAT_SCALES that holds its values (with FLOAT_HEADROOM): the
    file records no scale, so its values tell. 0..1 was once the only scale that was scaled: a 0..1 image with one
    value a little over 1 came out black (read as 0..255), 12- and 16-bit values as floats white (clipped at
    255). Values beyond 65535, or well below 0 (a -1..1 image), fit no scale: the image's own lowest to highest.
    NaN is black, infinities the ends. torchvision's ToTensor leaves the values as they are (0..255 stays 0..255
    where its uint8 images become 0..1), and Pillow's convert clips to 0..255 (a 0..1 image turns black)."""
    finite = arr[np.isfinite(arr)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    top = next((s for s in FLOAT_SCALES if hi <= s * (1 + FLOAT_HEADROOM)), None)
    if top is not None and lo >= -top * FLOAT_HEADROOM:
        low = 0.0
    else:
        low, top = lo, (hi if hi > lo else lo + 1.0)
    arr = np.clip(np.nan_to_num(arr.astype(np.float64), nan=low, posinf=top, neginf=low), low, top)
    return ((arr - low) * (255.0 / (top - low))).round().astype(np.uint8)


def _high_bit_depth_to_8bit(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        return Image.fromarray(_float_to_8bit(arr), "L")
    # The range comes from the mode, never from the values: a dark 16-bit image (a 12-bit sensor's, every value
    # at most 255) read as 8-bit came out up to 257x too bright. I;16* and the 16-bit PNG and PGM files Pillow opens
    # as mode I span 0..65535: scaled, never clipped to 255. Mode I is Pillow's signed 32-bit mode too: values
    # beyond 16 bits (a 32-bit TIFF's) span its range, and negative ones are black (they wrapped around).
    maximum = 65535 if img.mode != "I" or arr.max() <= 65535 else 2**31 - 1
    arr = np.clip(arr, 0, maximum).astype(np.float64)
    return Image.fromarray((arr * (255.0 / maximum)).round().astype(np.uint8), "L")


def convert_mode(img: Image.Image, channels: int) -> Image.Image:
    """``img`` as mode ``L`` (channels=1) or ``RGB`` (channels=3)."""
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _high_bit_depth_to_8bit(img)
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba).convert("RGB")
    if channels == 1:
        return img.convert("L")
    return img.convert("RGB")


def resize_and_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` pixels, then the centre ``size`` x ``size`` square (torchvision's eval transform)."""
    if img.size == (size, size):
        return img
    w, h = img.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    img = img.resize(new, Image.BILINEAR, reducing_gap=None)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return img.crop((left, top, left + size, top + size))


def max_pixels() -> int:
    """The largest image (width x height) cnnkit decodes: ``$CNNKIT_MAX_PIXELS``, else Pillow's own limit.

    Pillow's decompression-bomb check stays on regardless; this limit can only be stricter or equal.
    """
    default = Image.MAX_IMAGE_PIXELS or 89_478_485
    text = os.environ.get("CNNKIT_MAX_PIXELS")
    if not (text or "").strip():
        return default
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise UserError(f"CNNKIT_MAX_PIXELS must be a positive whole number of pixels (width x height), got "
                        f"{shown(text, 40)}; unset it for Pillow's limit of {default:,}")
    return limit


def open_image(path: str) -> Image.Image:
    """Open and fully decode ``path``, applying EXIF rotation; a DataError names the file if it cannot be read."""
    limit = max_pixels()  # outside the try: a bad CNNKIT_MAX_PIXELS is the setting's fault, not the file's
    try:
        with Image.open(path, formats=sorted(ALLOWED_FORMATS)) as img:
            w, h = img.size
            if w * h > limit:
                raise DataError(f"image {path} is {w}x{h} = {w * h:,} pixels, over the limit of {limit:,} "
                                "(set CNNKIT_MAX_PIXELS to allow larger images)")
            img.load()
            return ImageOps.exif_transpose(img)
    except DataError:
        raise
    except Exception as e:  # any decoder failure on hostile bytes is the file's fault, reported with its path
        raise _undecodable(path, e) from None


def image_size(path: str) -> tuple[int, int]:
    """(width, height) of ``path`` after EXIF rotation. Decodes every pixel (a file whose header reads but whose
    data is cut short must fail here, as it would in training); ``header_size`` reads the header alone."""
    return open_image(path).size


def header_size(path: str) -> tuple[int, int]:
    """(width, height) of ``path`` as stored (before EXIF rotation), read from its header without decoding the
    pixels; a DataError names the file if it cannot be opened."""
    try:
        with Image.open(path, formats=sorted(ALLOWED_FORMATS)) as img:
            return img.size
    except Exception as e:  # hostile bytes are the file's fault, reported with its path
        raise _undecodable(path, e) from None


UNDECODABLE = "cannot decode image"  # how the message about a file that does not decode begins


def _undecodable(path: str, e: Exception) -> DataError:
    """The one-line error for image ``path`` that PIL failed on with ``e``: what is wrong with the file, in words
    (Pillow's "cannot identify image file '<path>'" named the file twice and said nothing of why)."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty:
        reason = "the file is empty (0 bytes)"
    elif isinstance(e, UnidentifiedImageError):
        reason = "its contents are not an image cnnkit reads (JPEG, PNG, BMP, GIF, TIFF, WebP, PPM)"
    else:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in reason.lower():  # "Truncated File Read", "image file is truncated (21 bytes not processed)"
            reason = f"the file is cut short ({reason})"
    return DataError(f"{UNDECODABLE} {path}: {reason}")


def load_image_array(path: str, channels: int, size: int | None) -> np.ndarray:
    """``path`` as a uint8 array C x H x W; resized and centre-cropped to ``size`` unless it is None."""
    img = convert_mode(open_image(path), channels)
    if size is not None:
        img = resize_and_crop(img, size)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr.transpose(2, 0, 1).copy()  # a writable, contiguous copy: Pillow's buffer is read-only


def load_image(path: str, channels: int, size: int | None) -> torch.Tensor:
    """``path`` as a uint8 tensor C x H x W; resized and centre-cropped to ``size`` unless it is None."""
    import torch

    return torch.from_numpy(load_image_array(path, channels, size))


def load_batch_array(
    paths: list[str], channels: int, size: int, mean: list[float], std: list[float],
) -> tuple[np.ndarray | None, list[str], dict[str, str]]:
    """``paths`` as one model input: float32 N x C x H x W normalised with ``mean`` and ``std`` (per channel,
    in [0, 1] units, as checkpoints store them). Returns (batch or None if nothing decoded, the paths in it,
    {path: error} for the files that did not decode)."""
    images, good, errors = [], [], {}
    for path in paths:
        try:
            images.append(load_image_array(path, channels, size))
            good.append(path)
        except DataError as e:
            errors[path] = str(e)
    if not images:
        return None, good, errors
    shift = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1) * np.float32(255)
    scale = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1) * np.float32(255)
    return (np.stack(images).astype(np.float32) - shift) / scale, good, errors


def load_batch(
    paths: list[str], channels: int, size: int, mean: list[float], std: list[float],
) -> tuple[torch.Tensor | None, list[str], dict[str, str]]:
    """``load_batch_array`` as a torch tensor."""
    import torch

    x, good, errors = load_batch_array(paths, channels, size, mean, std)
    return (None if x is None else torch.from_numpy(x)), good, errors


def left_out_warning(skipped: list[str], data: str, count: int | None = None, why: str = "") -> list[str]:
    """The warning, if any, that broken images of ``data`` were left out: ``count`` of them (default: one per
    message of ``skipped``, the ones found when the folder was read, the first of which it names); ``why``: what
    that means for the command's output."""
    count = len(skipped) if count is None else count
    if not count:
        return []
    first = f": {skipped[0]}" + (f" (and {count - 1} more)" if count > 1 else "") if skipped else ""
    return [f"left out {count} broken image(s) of {data}{why}{first}; fix or remove them"]


def load_first_images(
    paths: list[str], limit: int, channels: int, size: int, mean: list[float], std: list[float], option: str,
    why: str, spread: bool = False,
) -> tuple[torch.Tensor, list[str], list[str]]:
    """The first ``limit`` images of ``paths`` (files and folders, as ``image_paths`` lists them) that decode, as
    one normalised batch (``load_batch``); ``spread``: ``limit`` images spread evenly over the list instead (a
    folder's are sorted by class: the first 16 of a folder of photos are all of its first class). A broken image
    inside a folder is passed over, as training and predict pass over one (``--bad-images skip``), and the next
    one taken; a broken file named on its own, or nothing left to take, is a DataError saying what to do about
    ``option`` (the command line's name for ``paths``). Returns (the batch, the files in it, the warning that
    broken images were passed over, ``left_out_warning``'s, with ``why``: what that means for the
    command)."""
    import torch

    files = image_paths(paths)
    if spread and len(files) > limit:
        picked = {len(files) * i // limit for i in range(limit)}
        files = [f for i, f in enumerate(files) if i in picked] + [f for i, f in enumerate(files) if i not in picked]
    named = {os.path.realpath(p) for p in paths if not os.path.isdir(p)}
    batches, used, skipped = [], [], []
    start = 0
    while len(used) < limit and start < len(files):
        chunk = files[start : start + limit - len(used)]
        start += len(chunk)
        x, good, errors = load_batch(chunk, channels, size, mean, std)
        for f, e in errors.items():
            if os.path.realpath(f) in named:
                raise DataError(f"{e}; fix it, or leave it out of {option} (broken images inside a folder given "
                                "there are passed over)")
        skipped += errors.values()
        if x is not None:
            batches.append(x)
            used += good
    if not used:
        raise DataError(f"none of the {len(files)} image(s) of {option} decode ({skipped[0]}); pass images that do")
    return torch.cat(batches), used, left_out_warning(skipped, " ".join(paths), why=why)
