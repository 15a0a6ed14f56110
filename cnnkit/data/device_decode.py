"""JPEG batches decoded on the training device: loader workers only read each file's bytes; the whole batch is
decoded at once where it trains (nvjpeg on a GPU, through ``torchvision.io.decode_jpeg``), then cropped and
resized to the model's size there.

Why: Pillow decoding and resizing an ordinary photo costs milliseconds of CPU per image, so a folder of photos
streamed to a GPU trains at the speed of the CPU's cores, not of the GPU. Decoded on the GPU, the CPU's share of
an image is reading its bytes and parsing its header.

Geometry, on the device:

- training: torchvision's ``RandomResizedCrop`` (scale (0.08, 1), aspect ratio (3/4, 4/3), the same ten attempts
  and the same centre-crop fallback), drawn from the batch's seeded generator, so a resumed epoch sees the same
  crops. It replaces the padded random translation of the other paths (cutout and the policies still follow).
- evaluation: the shorter side to ``size``, then the centre square: ``load_image``'s geometry.

Both crops are resized by one ``roi_align`` per group of equally sized images: bilinear samples, averaged over
ceil(scale) x ceil(scale) points per output pixel where the crop shrinks. That is a box filter, not Pillow's
antialiasing triangle filter (nor torchvision's ``antialias=True``): pixel values differ from ``load_image``'s
by a few levels where the image has fine detail.

A file this path does not decode (not a JPEG, not RGB or grayscale, rotated by its EXIF orientation, over
``max_pixels``) is decoded by Pillow in its worker exactly as ``load_image`` does, at full size, and then takes
the same crop. A JPEG the device cannot decode is retried alone and then through Pillow; one that fails there too
is dropped from its batch, as on the CPU path.
"""

from __future__ import annotations

import io
import math
import time
import warnings

import torch
from PIL import Image

from cnnkit.data.images import load_image, max_pixels
from cnnkit.errors import DataError

JPEG_EXTENSIONS = (".jpg", ".jpeg")
SCALE = (0.08, 1.0)  # RandomResizedCrop's defaults: the crop's share of the image's area
RATIO = (3 / 4, 4 / 3)  # and its width / height
ATTEMPTS = 10  # draws of (area, ratio) before the centre-crop fallback, as torchvision
_ORIENTATION = 0x0112  # the EXIF tag of the camera's rotation


def all_jpeg(files: list[str]) -> bool:
    """Whether every file is named as a JPEG (the extension only: the bytes are checked per batch)."""
    return all(f.lower().endswith(JPEG_EXTENSIONS) for f in files)


def _decodes_on_device(data: bytes) -> bool:
    """Whether ``data`` is a JPEG that ``decode_jpeg`` turns into what ``load_image`` would: RGB or grayscale,
    no EXIF rotation (decode_jpeg applies it only on a CPU), within the pixel limit. Reads the header only."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            w, h = img.size
            return (img.format == "JPEG" and img.mode in ("RGB", "L") and w * h <= max_pixels()
                    and img.getexif().get(_ORIENTATION, 1) == 1)
    except Exception:  # anything Pillow refuses goes to load_image, which names the problem
        return False


class FileBytes(torch.utils.data.Dataset):
    """Item i of ``files``: (its bytes as a 1-D uint8 tensor, its label) when it can be decoded on the device,
    else (its image decoded by ``load_image`` at full size, C x H x W, its label), or (empty, -1) if it is broken."""

    def __init__(self, files: list[str], labels: torch.Tensor, channels: int) -> None:
        self.files, self.labels, self.channels = files, labels, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i], int(self.labels[i])
        try:
            with open(path, "rb") as f:
                data = f.read()
            if _decodes_on_device(data):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), label
        except OSError:
            pass  # load_image raises the DataError that names the file
        try:
            return load_image(path, self.channels, None), label
        except DataError:
            # As on the CPU path: a file that broke after the pre-training check is dropped from its batch.
            return torch.empty(0, dtype=torch.uint8), -1


def collate(items: list[tuple[torch.Tensor, int]]) -> tuple[tuple[torch.Tensor, list[tuple[int, ...]]], torch.Tensor]:
    """A batch of ``FileBytes`` items as ((every payload concatenated, each one's shape), labels): two tensors
    cross from a worker to the main process, not one per image."""
    payloads = [p for p, _ in items]
    flat = torch.cat([p.reshape(-1) for p in payloads])
    return (flat, [tuple(p.shape) for p in payloads]), torch.tensor([label for _, label in items])


def _decode_jpegs(data: list[torch.Tensor], channels: int, device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of torchcodec; they still work, and nvjpeg through
        # torchvision is what a PyTorch install has.
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(data, mode=mode, device=device)


def _decode_one(data: torch.Tensor, path: str, channels: int, device: torch.device) -> torch.Tensor | None:
    try:
        return _decode_jpegs([data], channels, device)[0]
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError:
        pass
    try:  # decode_jpeg refuses some files Pillow reads (and the other way round): Pillow decides
        return load_image(path, channels, None).to(device, non_blocking=True)
    except DataError:
        return None


def decode(encoded: tuple[torch.Tensor, list[tuple[int, ...]]], labels: torch.Tensor, files: list[str],
           channels: int, device: torch.device) -> list[torch.Tensor | None]:
    """Each image of a ``collate``d batch as uint8 C x H x W on ``device``, at its own size; None for a broken
    one (label -1, or undecodable here). ``files`` are the batch's paths, to retry a JPEG that fails."""
    flat, shapes = encoded
    parts = torch.split(flat, [math.prod(s) for s in shapes])
    images: list[torch.Tensor | None] = [None] * len(shapes)
    jpegs = []
    for k, (part, shape, label) in enumerate(zip(parts, shapes, labels.tolist())):
        if label < 0:
            continue
        if len(shape) == 1:
            jpegs.append(k)
        else:  # decoded by Pillow in the worker
            images[k] = part.view(shape).to(device, non_blocking=True)
    if jpegs:
        try:
            decoded = _decode_jpegs([parts[k] for k in jpegs], channels, device)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:  # one bad file fails the whole call, which returns nothing: one by one then
            decoded = [_decode_one(parts[k], files[k], channels, device) for k in jpegs]
        for k, image in zip(jpegs, decoded):
            images[k] = image
    return images


def random_resized_boxes(sizes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop's draw for images of ``sizes`` (n x 2: height, width, in pixels): n x 4 crop boxes
    (left, top, right, bottom) in pixels, whole numbers as torchvision's, drawn on the generator's device.

    Vectorised torchvision's ``get_params``: of ten (area, ratio) draws, the first whose crop fits; where none
    does, the largest centre crop with a ratio in range. The draws are a fixed number per image, so the batch's
    other augmentation that follows draws the same values whatever the crops were."""
    dev = generator.device
    sizes = sizes.to(dev, non_blocking=True).float()
    h, w = sizes[:, 0], sizes[:, 1]
    u = torch.rand(2, ATTEMPTS, len(sizes), generator=generator, device=dev)
    area = h * w * (SCALE[0] + (SCALE[1] - SCALE[0]) * u[0])
    log_lo, log_hi = math.log(RATIO[0]), math.log(RATIO[1])
    ratio = torch.exp(log_lo + (log_hi - log_lo) * u[1])
    cw, ch = torch.round(torch.sqrt(area * ratio)), torch.round(torch.sqrt(area / ratio))
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.to(torch.uint8).argmax(0, keepdim=True)  # the first attempt that fits (0 where none does)
    found = fits.any(0)
    cw, ch = cw.gather(0, first)[0], ch.gather(0, first)[0]
    # torchvision's fallback: the whole image, narrowed to the nearest ratio in range
    aspect = w / h
    fw = torch.where(aspect > RATIO[1], torch.round(h * RATIO[1]), w)
    fh = torch.where(aspect < RATIO[0], torch.round(w / RATIO[0]), h)
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    corner = torch.rand(2, len(sizes), generator=generator, device=dev)
    top = torch.where(found, torch.floor(corner[0] * (h - ch + 1)), torch.floor((h - ch) / 2))
    left = torch.where(found, torch.floor(corner[1] * (w - cw + 1)), torch.floor((w - cw) / 2))
    return torch.stack([left, top, left + cw, top + ch], 1)


def centre_boxes(sizes: list[tuple[int, int]], size: int) -> torch.Tensor:
    """``load_image``'s geometry as crop boxes: for each (height, width), the region of the original image that
    becomes the centre ``size`` x ``size`` square once the shorter side is resized to ``size``; n x 4 in pixels."""
    boxes = []
    for h, w in sizes:
        scale = size / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        left, top = (new_w - size) // 2, (new_h - size) // 2
        sx, sy = w / new_w, h / new_h
        boxes.append([left * sx, top * sy, (left + size) * sx, (top + size) * sy])
    return torch.tensor(boxes, dtype=torch.float32).view(-1, 4)


def resized_crops(images: list[torch.Tensor], boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Each image's crop ``boxes[i]`` (left, top, right, bottom in pixels) resized to ``size`` x ``size``: uint8
    n x C x size x size on the images' device. One ``roi_align`` per group of images of the same size."""
    from torchvision.ops import roi_align

    device = images[0].device
    out = torch.empty(len(images), images[0].shape[0], size, size, dtype=torch.uint8, device=device)
    boxes = boxes.to(device, non_blocking=True).float()
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(k)
    for members in groups.values():
        where = torch.tensor(members).to(device, non_blocking=True)
        stack = torch.stack([images[k] for k in members]).float()
        rois = torch.cat([torch.arange(len(members), device=device, dtype=torch.float32)[:, None],
                          boxes.index_select(0, where)], 1)
        # aligned=True puts pixel centres at +0.5, as F.interpolate(align_corners=False) and Pillow do;
        # sampling_ratio=0 averages ceil(crop / size) samples per output pixel and direction.
        crops = roi_align(stack, rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)
        out.index_copy_(0, where, crops.round_().clamp_(0, 255).to(torch.uint8))
    return out


_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def decode_batch(encoded: tuple[torch.Tensor, list[tuple[int, ...]]], labels: torch.Tensor, files: list[str],
                 channels: int, size: int, device: torch.device,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``collate``d batch -> (uint8 n x C x size x size on ``device``, labels). With ``generator``, random
    resized crops drawn from it (training); without, the centre crop (evaluation). An image that did not decode
    is zeros with label -1, for the caller to drop.

    On CUDA the work runs on a stream of its own, beside the training step's kernels, and the current stream
    waits for the result."""
    out, labels, ready = decode_batch_async(encoded, labels, files, channels, size, device, generator)
    if ready is not None:
        use_on_current_stream(out, ready)
    return out, labels


def use_on_current_stream(images: torch.Tensor, ready: torch.cuda.Event) -> None:
    """Makes the calling thread's current stream wait for ``ready`` (the decode of ``images``), and ``images``'
    memory wait for that stream's use of it before it returns to the pool."""
    current = torch.cuda.current_stream(images.device)
    current.wait_event(ready)
    images.record_stream(current)


def decode_batch_async(encoded: tuple[torch.Tensor, list[tuple[int, ...]]], labels: torch.Tensor, files: list[str],
                       channels: int, size: int, device: torch.device, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]:
    """``decode_batch`` without the wait: on CUDA, also the event that marks the end of the decode on the side
    stream (None elsewhere), for the thread that uses the batch to wait on (``use_on_current_stream``). A decode
    made ahead in another thread must not make the training stream wait there: that wait would be queued before
    the step of the batch before it, and hold that step back until the next batch is decoded."""
    if device.type != "cuda":
        return *_decode_batch(encoded, labels, files, channels, size, device, generator), None
    # decode_jpeg takes its outputs from the caching allocator on the current stream, and nvjpeg writes them at
    # once, without waiting for the kernels queued on that stream: on the training stream it can be handed a block
    # that queued kernels are still reading, and overwrite it (torchvision PR 9606; measured here on an H200). So
    # decoding has a stream to itself, with nothing queued on it when nvjpeg starts; the one tensor that leaves it
    # is marked as used by the stream that uses it, so that its block returns to the pool only once that is done.
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    side = _side_streams[device]
    # The previous batch's crops may still be queued on the side stream: wait for them (for nothing else). Polled,
    # since torch counts side.synchronize() as a synchronising call (torch.cuda.set_sync_debug_mode), which the
    # tests check this path makes none of.
    while not side.query():
        time.sleep(0.0001)
    with torch.cuda.stream(side):
        out, labels = _decode_batch(encoded, labels, files, channels, size, device, generator)
        ready = torch.cuda.Event()
        ready.record(side)
    return out, labels, ready


def _decode_batch(encoded: tuple[torch.Tensor, list[tuple[int, ...]]], labels: torch.Tensor, files: list[str],
                  channels: int, size: int, device: torch.device,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    images = decode(encoded, labels, files, channels, device)
    good = [k for k, image in enumerate(images) if image is not None]
    kept = [images[k] for k in good]
    sizes = [tuple(image.shape[-2:]) for image in kept]
    if not kept:
        empty = torch.zeros(len(images), channels, size, size, dtype=torch.uint8, device=device)
        return empty, torch.full_like(labels, -1)
    boxes = random_resized_boxes(torch.tensor(sizes), generator) if generator is not None else centre_boxes(sizes, size)
    crops = resized_crops(kept, boxes, size)
    if len(good) == len(images):
        return crops, labels
    out = torch.zeros(len(images), channels, size, size, dtype=torch.uint8, device=device)
    out.index_copy_(0, torch.tensor(good).to(device, non_blocking=True), crops)
    labels = labels.clone()
    labels[[k for k, image in enumerate(images) if image is None]] = -1
    return out, labels
