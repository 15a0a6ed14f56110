"""Is resnet18 at 224 fed from a folder of JPEGs when they are decoded on the GPU, against data already there?

    PYTHONPATH=. python3 -m benchmarks.gpu_decode [--out DIR] [--images 20000] [--batches 40] [--device cuda]
    PYTHONPATH=. python3 -m benchmarks.gpu_decode --device cpu --images 200 --batches 3 --out /tmp/x   (smoke run)

Writes ``--images`` JPEGs of 500x375 (quality 90, smooth colour fields with ellipses and grain, about 50 KB
each; in parallel over every core) into an ImageFolder of 10 classes in a temporary folder, then times
torchvision's resnet18 (10 classes, untrained: speed does not depend on the weights) training at 224x224 in bf16
autocast, channels_last, batch 256, one SGD step per batch, fed three ways:

  (a) synthetic: one random batch already on the device, the model's own ceiling;
  (b) device decode: cnnkit's BatchLoader over the folder with ``decode="device"``: workers read the files'
      bytes, each batch is decoded on the device (nvjpeg), random-resized-cropped, flipped and normalised there;
  (c) CPU decode: the same BatchLoader with ``decode="cpu"``: one DataLoader worker per core decodes and resizes
      each image with Pillow (shorter side to 224, centre crop), then the same flip and padded crop on the device.

Each is timed over ``--batches`` batches after ``--warmup`` untimed ones (cuDNN's autotuning, the workers'
start), between two device synchronisations. A DataLoader worker makes a whole batch, so batches arrive in rounds
of one per worker: the timed span covers many rounds (and epochs, as in cnnkit's training: the CPU path starts
its workers afresh each epoch, the device path keeps them), or a half-finished round would count for or against
a path. The loaders are also timed alone (no model), to show which side
bounds (b) and (c). Writes gpu_decode.json and gpu_decode.md into ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import multiprocessing
import os
import platform
import shutil
import tempfile
import time
import warnings

import numpy as np
import torch
import torchvision
from PIL import Image, ImageChops, ImageDraw

from cnnkit.data.loader import Augment, BatchLoader
from cnnkit.data.sources import ImageSet, scan_folder

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CLASSES = 10
WIDTH, HEIGHT = 500, 375
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _write_images(job: tuple[str, int, int]) -> int:
    """Writes images ``start``..``stop``-1 into ``root``; returns the bytes written."""
    root, start, stop = job
    rng = np.random.default_rng(start)
    grain = Image.fromarray(rng.integers(0, 25, (HEIGHT + 125, WIDTH + 200, 3), dtype=np.uint8))
    written = 0
    for i in range(start, stop):
        # A smooth colour field, a few ellipses and grain: JPEGs of about the size and entropy of photos.
        img = Image.fromarray(rng.integers(0, 230, (3, 4, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT), Image.BILINEAR)
        draw = ImageDraw.Draw(img)
        for _ in range(6):
            x, y, s = int(rng.integers(0, WIDTH - 50)), int(rng.integers(0, HEIGHT - 45)), int(rng.integers(20, 150))
            draw.ellipse([x, y, x + s, y + 0.8 * s], fill=tuple(int(v) for v in rng.integers(0, 230, 3)))
        x, y = int(rng.integers(0, 200)), int(rng.integers(0, 125))
        img = ImageChops.add(img, grain.crop((x, y, x + WIDTH, y + HEIGHT)))
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=90)
        with open(os.path.join(root, f"class{i % CLASSES}", f"{i:06d}.jpg"), "wb") as f:
            f.write(buffer.getvalue())
        written += buffer.tell()
    return written


def write_folder(root: str, n: int) -> tuple[float, int]:
    """``n`` JPEGs of WIDTH x HEIGHT in ``root``/class0..9; returns (seconds, bytes written)."""
    for c in range(CLASSES):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
    cores = os.cpu_count() or 1
    chunk = max(1, -(-n // (cores * 4)))
    jobs = [(root, i, min(n, i + chunk)) for i in range(0, n, chunk)]
    start = time.perf_counter()
    # Forked before anything has run on torch's thread pools or the GPU: the children use numpy and Pillow only.
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        written = sum(pool.map(_write_images, jobs))
    return time.perf_counter() - start, written


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _endless(loader: BatchLoader):
    """The loader's batches, epoch after epoch."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def images_per_s(batches, warmup: int, timed: int, device: torch.device, step=None) -> float:
    """Images per second over ``timed`` batches of ``batches`` (each made and passed to ``step``; None: only
    made) after ``warmup`` untimed ones."""
    batches = iter(batches)
    for _ in range(warmup):
        x, y = next(batches)
        if step is not None:
            step(x, y)
    _sync(device)
    start, count = time.perf_counter(), 0
    for _ in range(timed):
        x, y = next(batches)
        if step is not None:
            step(x, y)
        count += len(x)
    _sync(device)
    seconds = time.perf_counter() - start
    if hasattr(batches, "close"):
        batches.close()  # a loader's workers stop now, not when the garbage collector finds them
    return count / seconds


def decoder_images_per_s(files: list[str], device: torch.device, repeats: int = 10) -> float:
    """Images per second of ``torchvision.io.decode_jpeg`` alone on ``files`` as one batch, on ``device``: the
    ceiling of the decoding itself (on a GPU: nvjpeg), without reading, cropping or the loader around it."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(open(f, "rb").read()), dtype=torch.uint8) for f in files]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        _sync(device)
    return repeats * len(data) / (time.perf_counter() - start)


def first_batch_s(loader: BatchLoader, device: torch.device) -> float:
    """Seconds from a new loader's first epoch to its first batch: the workers' start and their first batch."""
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    _sync(device)
    seconds = time.perf_counter() - start
    batches.close()
    return seconds


def make_step(device: torch.device):
    """One SGD step of torchvision's resnet18 (10 classes) in bf16 autocast, channels_last."""
    model = torchvision.models.resnet18(num_classes=CLASSES).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-5)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=RESULTS, help="folder for gpu_decode.json and .md (default: %(default)s)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--images", type=int, default=20000, help="JPEGs to write (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=160, help="timed batches per path (default: %(default)s)")
    parser.add_argument("--warmup", type=int, help="untimed batches first (default: 16; on a CPU 1)")
    parser.add_argument("--batch-size", type=int, help="(default: 256; on a CPU 16, a smoke run's size)")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="DataLoader workers for both paths (default: one per core, %(default)s)")
    parser.add_argument("--data", help="an existing ImageFolder to read instead of writing JPEGs")
    args = parser.parse_args()
    device = torch.device(args.device)
    cpu = device.type == "cpu"
    # Warm-up: cuDNN's autotuning, and on the loaders a first round of batches from every worker at once.
    args.warmup = args.warmup if args.warmup is not None else 1 if cpu else 16
    args.batch_size = min(args.batch_size or (16 if cpu else 256), args.images)
    wall = time.perf_counter()
    torch.backends.cudnn.benchmark = True

    tmp = None
    generate_s, written = 0.0, 0
    if args.data is None:
        tmp = tempfile.mkdtemp(prefix="cnnkit-gpu-decode-")
        generate_s, written = write_folder(tmp, args.images)
        print(f"wrote {args.images:,} JPEGs of {WIDTH}x{HEIGHT} ({written / args.images / 1000:.0f} KB each) "
              f"in {generate_s:.1f} s", flush=True)
    root = args.data or tmp
    try:
        files, labels, classes = scan_folder(root)
        data = ImageSet(labels, classes, files=files, size=args.input_size, paths=files, source=root)
        size, batch = args.input_size, args.batch_size
        step = make_step(device)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(batch, 3, size, size, device=device, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, CLASSES, (batch,), device=device, generator=g)
        results = {"synthetic": images_per_s(iter(lambda: (x, y), None), args.warmup, args.batches, device, step)}
        print(f"(a) synthetic data on the device: {results['synthetic']:,.0f} images/s", flush=True)

        def loader(decode: str) -> BatchLoader:
            augment = Augment(crop_pad=size // 8, flip=True)  # as cnnkit train's defaults
            return BatchLoader(data, batch, IMAGENET_MEAN, IMAGENET_STD, device, shuffle=True, augment=augment,
                               drop_last=True, workers=args.workers, decode=decode)

        diagnostics = {"decoder_alone": decoder_images_per_s(files[:batch], device)}
        print(f"the JPEG decoder alone (decode_jpeg on {device.type}, batches of {batch}): "
              f"{diagnostics['decoder_alone']:,.0f} images/s", flush=True)
        for name, decode in (("device_decode", "device"), ("cpu_decode", "cpu")):
            results[name] = images_per_s(_endless(loader(decode)), args.warmup, args.batches, device, step)
            results[name + "_loader_only"] = images_per_s(_endless(loader(decode)), args.warmup, args.batches, device)
            diagnostics[name + "_epoch_start_s"] = first_batch_s(loader(decode), device)
            print(f"({'b' if decode == 'device' else 'c'}) {decode} decode: {results[name]:,.0f} images/s "
                  f"({results[name] / results['synthetic']:.0%} of synthetic); the loader alone "
                  f"{results[name + '_loader_only']:,.0f} images/s; a new loader's first batch after "
                  f"{diagnostics[name + '_epoch_start_s']:.2f} s", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "torchvision": torchvision.__version__, "cpu_cores": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "images": len(files), "image_size": None if args.data else f"{WIDTH}x{HEIGHT}",
        "jpeg_kb": round(written / max(1, args.images) / 1000, 1) if written else None,
        "generate_s": round(generate_s, 1), "input_size": size, "batch_size": batch, "workers": args.workers,
        "warmup_batches": args.warmup, "timed_batches": args.batches,
        "images_per_s": {k: round(v, 1) for k, v in results.items()},
        "device_decode_vs_synthetic": round(results["device_decode"] / results["synthetic"], 3),
        "cpu_decode_vs_synthetic": round(results["cpu_decode"] / results["synthetic"], 3),
        "diagnostics": {k: round(v, 3 if k.endswith("_s") else 1) for k, v in diagnostics.items()},
        "wall_s": round(time.perf_counter() - wall, 1),
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_decode.json"), "w") as f:
        json.dump(report, f, indent=2)
    r = results
    lines = [
        "# Feeding resnet18 at 224 from a folder of JPEGs",
        "",
        f"{report['device']}, torch {report['torch']}, torchvision {report['torchvision']}, "
        f"{report['cpu_cores']} CPU cores, {report['date']}. `python -m benchmarks.gpu_decode` "
        f"({report['images']:,} JPEGs" + (f" of {WIDTH}x{HEIGHT}, {report['jpeg_kb']} KB each" if written else "")
        + f"; batch {batch}, {size}x{size}, bf16 autocast, channels_last, one SGD step per batch; "
        f"{args.batches} batches timed after {args.warmup}; {args.workers} DataLoader workers).",
        "",
        "| fed by | training images/s | of synthetic | loader alone, images/s |",
        "|---|---:|---:|---:|",
        f"| (a) synthetic batch already on the device | {r['synthetic']:,.0f} | 100% | |",
        f"| (b) cnnkit, JPEGs decoded on the device (`decode=\"device\"`) | {r['device_decode']:,.0f} | "
        f"{r['device_decode'] / r['synthetic']:.0%} | {r['device_decode_loader_only']:,.0f} |",
        f"| (c) cnnkit, JPEGs decoded by CPU workers (`decode=\"cpu\"`) | {r['cpu_decode']:,.0f} | "
        f"{r['cpu_decode'] / r['synthetic']:.0%} | {r['cpu_decode_loader_only']:,.0f} |",
        "",
        f"Where the time goes: `decode_jpeg` alone decodes {diagnostics['decoder_alone']:,.0f} images/s on "
        f"{device.type} (one batch of {batch} over and over); a new loader's first batch (starting its "
        f"{args.workers} workers) comes after {diagnostics['device_decode_epoch_start_s']:.2f} s with device "
        f"decoding and {diagnostics['cpu_decode_epoch_start_s']:.2f} s with CPU decoding; an epoch is "
        f"{len(files) // batch} batches. Writing the JPEGs took {generate_s:.1f} s; the whole run "
        f"{report['wall_s']:.0f} s.",
        "",
    ]
    with open(os.path.join(args.out, "gpu_decode.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"(b)/(a) = {report['device_decode_vs_synthetic']:.2f}, (c)/(a) = {report['cpu_decode_vs_synthetic']:.2f}; "
          f"wrote {os.path.join(args.out, 'gpu_decode.md')} and .json")


if __name__ == "__main__":
    main()
