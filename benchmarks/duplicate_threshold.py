"""Which Hamming distance should `cnnkit check-data` call a near-duplicate? Measured on real photos.

    python -m benchmarks.duplicate_threshold [--data ../shared/datasets/cifar10-jpeg/train] [--sample 2000]

1. Every image of --data (CIFAR-10's 50,000 training JPEGs) is decoded and hashed the way check-data hashes
   (``cnnkit.data.checks.perceptual_hashes`` of the uint8 pixels).
2. Edited copies: --sample images (a fixed random choice) are edited the ways a copy drifts from its original
   (re-saved as JPEG at several qualities, brighter or darker, more contrast, and brighter then re-saved) and
   hashed; the distance to the original is what the threshold must reach to catch the copy.
3. Distinct images: for the same sample, the distance to the nearest *other* image of the whole set (images
   with identical pixels left out): what a validation image that is not a copy looks like against a training
   set of 50,000. Every one within the threshold would be a false alarm -- except that CIFAR-10 holds some
   real near-duplicates of its own, so the lowest of these are not all false.
Writes benchmarks/results/duplicate_threshold.json and .md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance

from cnnkit.data.checks import DEFAULT_THRESHOLD, _popcount, perceptual_hashes
from cnnkit.data.images import image_paths


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def edit(img: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        img.save(buffer, "JPEG", quality=quality)
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    return edit


def _enhance(kind: type, factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda img: kind(img).enhance(factor)


def _then(*edits: Callable[[Image.Image], Image.Image]) -> Callable[[Image.Image], Image.Image]:
    def edit(img: Image.Image) -> Image.Image:
        for e in edits:
            img = e(img)
        return img
    return edit


EDITS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg q90": _jpeg(90),
    "jpeg q80": _jpeg(80),
    "jpeg q70": _jpeg(70),
    "jpeg q50": _jpeg(50),
    "brightness 1.1": _enhance(ImageEnhance.Brightness, 1.1),
    "brightness 1.2": _enhance(ImageEnhance.Brightness, 1.2),
    "brightness 1.3": _enhance(ImageEnhance.Brightness, 1.3),
    "brightness 0.8": _enhance(ImageEnhance.Brightness, 0.8),
    "contrast 1.2": _enhance(ImageEnhance.Contrast, 1.2),
    "brightness 1.2 + jpeg q80": _then(_enhance(ImageEnhance.Brightness, 1.2), _jpeg(80)),
    "brightness 1.3 + jpeg q70": _then(_enhance(ImageEnhance.Brightness, 1.3), _jpeg(70)),
    "contrast 1.2 + jpeg q70": _then(_enhance(ImageEnhance.Contrast, 1.2), _jpeg(70)),
}
THRESHOLDS = range(0, 17)
FALSE_ALARMS = 0.005  # the share of distinct images flagged as another photo that a threshold may cost at most
SAME_PHOTO = 0.9  # grey-pixel correlation from which two images are taken as one photo (checked by eye, see the montage)


def _montage(images: torch.Tensor, sample: list[int], partner: list[int], nearest: np.ndarray,
             correlation: np.ndarray, path: str) -> None:
    """Rows of (image, its nearest other image) pairs at distances 0, 2, ... 12, up to 6 pairs a row, each
    pair's correlation under it, enlarged 3 times: to judge by eye what a distance means."""
    from PIL import ImageDraw

    rows = []
    for distance in range(0, 13, 2):
        picks = [k for k in np.argsort(-correlation) if nearest[k] == distance]
        picks = picks[:3] + picks[-3:] if len(picks) > 6 else picks  # the most and the least alike
        if not picks:
            continue
        canvas = Image.new("RGB", (6 * 210, 122), "white")
        draw = ImageDraw.Draw(canvas)
        draw.text((2, 2), f"distance {distance}", fill="black")
        for slot, k in enumerate(picks):
            for side, index in enumerate((sample[k], partner[k])):
                tile = Image.fromarray(images[index].permute(1, 2, 0).numpy()).resize((96, 96), Image.NEAREST)
                canvas.paste(tile, (slot * 210 + side * 100, 14))
            draw.text((slot * 210, 110), f"r={correlation[k]:.2f}", fill="black")
        rows.append(canvas)
    out = Image.new("RGB", (6 * 210, 122 * len(rows)), "white")
    for r, row in enumerate(rows):
        out.paste(row, (0, r * 122))
    out.save(path)


def _pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/cifar10-jpeg/train")
    ap.add_argument("--sample", type=int, default=2000)
    args = ap.parse_args()

    start = time.perf_counter()
    files = image_paths([args.data])
    images = torch.stack([_pixels(Image.open(f)) for f in files])  # CIFAR: all 32 x 32, the size hashed
    hashes = perceptual_hashes(images)
    flat = images.flatten(1).numpy()
    print(f"{len(files):,} images decoded and hashed in {time.perf_counter() - start:.0f} s", flush=True)

    sample = sorted(random.Random(0).sample(range(len(files)), args.sample))
    originals = [Image.open(files[i]).convert("RGB") for i in sample]
    edited = {name: _popcount(hashes[sample] ^ perceptual_hashes(torch.stack([_pixels(edit(img)) for img in originals])))
              .astype(np.int64) for name, edit in EDITS.items()}
    nearest, partner = [], []
    for i in sample:
        d = _popcount(hashes ^ hashes[i]).astype(np.int64)
        zero = np.nonzero(d == 0)[0]  # identical pixels hash identically: only these can be copies
        d[zero[(flat[zero] == flat[i]).all(1)]] = 65  # itself, and any exact copy: exact, not near
        nearest.append(int(d.min()))
        partner.append(int(d.argmin()))
    nearest = np.array(nearest)
    # Is the nearest image the same photo (CIFAR-10's own near-duplicates) or another one? The correlation of
    # the two grey images: brightness and contrast changes leave it near 1, a different photo far below.
    grey = images.float().mean(1).flatten(1)
    grey = (grey - grey.mean(1, keepdim=True)) / grey.std(1, keepdim=True).clamp_min(1e-6)
    correlation = np.array([float((grey[i] * grey[j]).mean()) for i, j in zip(sample, partner)])
    same_photo = correlation >= SAME_PHOTO
    _montage(images, sample, partner, nearest, correlation, "benchmarks/results/duplicate_threshold_pairs.png")

    def share(d: np.ndarray, t: int) -> float:
        return round(float((d <= t).mean()), 4)

    result = {
        "data": args.data, "images": len(files), "sample": args.sample, "default_threshold": DEFAULT_THRESHOLD,
        "edited": {name: {"median": float(np.median(d)), "p90": float(np.percentile(d, 90)),
                          "p99": float(np.percentile(d, 99)), "max": int(d.max()),
                          "caught": {t: share(d, t) for t in THRESHOLDS}} for name, d in edited.items()},
        "distinct_nearest": {"min": int(nearest.min()), "p1": float(np.percentile(nearest, 1)),
                             "p5": float(np.percentile(nearest, 5)), "median": float(np.median(nearest)),
                             "flagged": {t: share(nearest, t) for t in THRESHOLDS},
                             "same_photo_correlation": SAME_PHOTO,
                             "flagged_same_photo": {t: round(float(((nearest <= t) & same_photo).mean()), 4)
                                                    for t in THRESHOLDS},
                             "flagged_other_photo": {t: round(float(((nearest <= t) & ~same_photo).mean()), 4)
                                                     for t in THRESHOLDS}},
        "seconds": round(time.perf_counter() - start, 1),
    }
    other = result["distinct_nearest"]["flagged_other_photo"]
    result["suggested_threshold"] = max(t for t in THRESHOLDS if t % 2 == 0 and other[t] <= FALSE_ALARMS)
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/duplicate_threshold.json", "w") as f:
        json.dump(result, f, indent=2)
    shown = range(2, 17, 2)  # every hash has 32 bits set (above its median), so distances are even
    lines = [f"# Near-duplicate threshold: perceptual-hash distances on {len(files):,} CIFAR-10 JPEGs", "",
             f"{args.sample:,} images (fixed random choice). Edited copy: distance to its original. Distinct: "
             f"distance to the nearest other image of all {len(files):,} (identical pixels left out). "
             f"`python -m benchmarks.duplicate_threshold`, {result['seconds']:.0f} s. Every hash has 32 of its 64 bits "
             "set (those above its median), so every distance is even: a threshold of 5 is one of 4.", "",
             "Share of edited copies caught (distance <= threshold):", "",
             "| edit | median | p90 | p99 | max | " + " | ".join(f"<= {t}" for t in shown) + " |",
             "|---|---|---|---|---|" + "---|" * len(shown)]
    for name, r in result["edited"].items():
        lines.append(f"| {name} | {r['median']:g} | {r['p90']:g} | {r['p99']:g} | {r['max']} | "
                     + " | ".join(f"{r['caught'][t]:.3f}" for t in shown) + " |")
    n = result["distinct_nearest"]
    lines += ["", f"Distinct images: nearest other image at min {n['min']}, 1st percentile {n['p1']:g}, 5th "
              f"{n['p5']:g}, median {n['median']:g} bits. Share flagged (a false alarm, unless CIFAR-10's own "
              "near-duplicate):", "",
              "| threshold | " + " | ".join(str(t) for t in shown) + " |", "|---|" + "---|" * len(shown),
              "| flagged | " + " | ".join(f"{n['flagged'][t]:.4f}" for t in shown) + " |",
              f"| of which the same photo (grey correlation >= {SAME_PHOTO}) | "
              + " | ".join(f"{n['flagged_same_photo'][t]:.4f}" for t in shown) + " |",
              "| of which another photo: false alarms | "
              + " | ".join(f"{n['flagged_other_photo'][t]:.4f}" for t in shown) + " |",
              "", "`duplicate_threshold_pairs.png`: sample images beside their nearest other image, by distance "
              "(the three most and least alike of each). Pairs at r 0.8-0.9 there are mostly still the same photo, "
              "so the false-alarm row is an upper bound.", "",
              f"Suggested threshold: the largest (even) one whose false alarms stay at or below {FALSE_ALARMS:.1%} of "
              f"distinct images: **{result['suggested_threshold']}** (check-data's default: {DEFAULT_THRESHOLD})."]
    with open("benchmarks/results/duplicate_threshold.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
