"""Dataset checks before training (``cnnkit check-data``, and run by ``cnnkit train``): what commonly makes a
run's numbers wrong before any training starts.

- **Class balance**: the images per class in training and validation; a warning when the largest training class
  is ``imbalance_ratio`` times the smallest or more (``--class-weights auto`` or ``--balanced-sampler`` help), for
  a class without validation images, and for a validation set under ``SMALL_VAL`` images (a coarse accuracy).
- **Leaks between training and validation**: every validation image that is a duplicate or near-duplicate of a
  training image, by a 64-bit perceptual hash (pHash: the signs of the 8x8 lowest DCT frequencies of a 32x32 grey
  version against their median; a re-encoded JPEG or a brightness change moves a few bits, a different picture
  about half of them). Pairs within ``threshold`` bits (Hamming distance) are reported with their paths, and as
  exact when their decoded pixels are identical. Validation accuracy over leaked images measures memory.
- **The data against the model**: channels (grey images decoded as RGB, 1-channel data into a 3-channel
  network, whose first convolution cnnkit adapts the way timm's ``adapt_input_conv`` does), sizes (below what a
  network or its pretrained weights need), and normalisation: data that, normalised as the pretrained weights
  expect, lands far from mean 0 and standard deviation 1 does not look like the data the weights learnt from.

The result is plain data (``DataCheck``); ``--json`` prints ``dataclasses.asdict`` of it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.atomic import atomic_torch_save
from cnnkit.checkpoint import load_checkpoint
from cnnkit.choices import DEFAULT_THRESHOLD, is_model_file
from cnnkit.data import cache
from cnnkit.data.loader import channel_stats
from cnnkit.data.sources import DataSpec, ImageSet, decode_files, load_splits
from cnnkit.errors import UserError
from cnnkit.models.pretrained import normalization
from cnnkit.models.registry import check_model_name, default_input_size, default_weights

IMBALANCE_RATIO = 3.0  # largest / smallest training class from which the imbalance is worth acting on
# Validation images below which accuracy is too coarse to compare by: one image moves it by more than 0.02, and
# at 0.8 accuracy its standard error, sqrt(0.8 * 0.2 / 50), is 0.057: differences between runs drown in it.
SMALL_VAL = 50
HASH_SIZE = 32  # the grey image the DCT is taken of, pixels (pHash's usual size)
LOW_FREQUENCIES = 8  # 8 x 8 DCT coefficients -> 64 bits
NORMALISED_MEAN_LIMIT = 1.0  # |mean| of the normalised data per channel beyond which it is far from the weights'
NORMALISED_STD_RANGE = (0.5, 2.0)
_COMPARE_ROWS = 64  # validation hashes compared at once: 64 x 50,000 64-bit XORs are 25.6 MB
# In a run folder: its training images' fingerprints, which `cnnkit eval` compares the images it scores with.
TRAINING_PRINTS = "train_hashes.pt"
_DIGEST_BYTES = 16

Prints = tuple[np.ndarray, list[bytes]]  # each image's 64-bit perceptual hash, and a digest of its pixels


@dataclass
class Duplicate:
    val: str  # the validation image (path, or "<source> val #index" for built-in data)
    train: str  # the closest training image
    distance: int  # Hamming distance of their 64-bit perceptual hashes, 0..64
    exact: bool  # identical pixels after decoding
    matches: int = 1  # training images within the threshold of this validation image


@dataclass
class DataCheck:
    data: str
    classes: list[str]
    train_counts: list[int]
    val_counts: list[int]
    imbalance: float  # largest / smallest training class
    channels: int
    size: int  # pixels, square, as decoded for training
    mean: list[float]  # per-channel statistics of the training images, [0, 1] units
    std: list[float]
    duplicates: list[Duplicate]  # validation images with a (near-)duplicate in training, closest first
    duplicates_checked: bool  # False when skipped: generated shapes data, or a set too large for memory in `train`
    threshold: int
    model: str | None = None
    warnings: list[str] = field(default_factory=list)  # worth acting on before training
    notes: list[str] = field(default_factory=list)  # what cnnkit does about a mismatch, for information
    bad_images: list[str] = field(default_factory=list)  # one message per broken image left out (path and reason)


def check_data(
    data: str,
    val_data: str | None = None,
    val_split: float | None = None,
    data_dir: str | None = None,
    input_size: int | None = None,
    channels: int | None = None,
    model: str | None = None,
    pretrained: bool = False,
    threshold: int = DEFAULT_THRESHOLD,
    imbalance_ratio: float = IMBALANCE_RATIO,
) -> DataCheck:
    """Load ``data`` with its validation part as ``cnnkit train`` would and check it (see the module doc).

    ``model``: a model name or a run folder / checkpoint to check the data against; ``pretrained``: with a model
    name, against torchvision's pretrained weights (their normalisation and sizes; nothing is downloaded).
    """
    if pretrained and (model is None or os.path.exists(model)):
        raise UserError("--pretrained needs --model NAME (a torchvision model); a run or checkpoint brings its own weights")
    ckpt = None
    if model is not None and os.path.exists(model):
        ckpt = load_checkpoint(model)  # its own input size and channels, as eval and predict use them
        input_size, channels = input_size or ckpt.input_size, channels or ckpt.channels
    elif model is not None:
        if os.sep in model or is_model_file(model):
            raise UserError(f"--model {model} does not exist; pass a model name, a run folder or a checkpoint")
        check_model_name(model)  # before minutes of decoding
    train, val = load_splits(DataSpec(data, data_dir, False, val_data, val_split, input_size, channels))
    if ckpt is None:
        result = check_splits(train, val, model, pretrained=pretrained, threshold=threshold,
                              imbalance_ratio=imbalance_ratio)
    else:
        result = check_splits(train, val, ckpt.model.cnnkit_config["name"], weights_norm=(ckpt.mean, ckpt.std),
                              weights_label=ckpt.path, threshold=threshold, imbalance_ratio=imbalance_ratio)
        if (ckpt.channels, ckpt.input_size) != (train.channels, train.size):
            result.warnings.append(f"{ckpt.path} takes {ckpt.channels}x{ckpt.input_size}x{ckpt.input_size} images; "
                                   f"these were decoded at {train.channels}x{train.size}x{train.size}")
    if result.bad_images:  # `train` says this itself, beside its bad_images.txt
        result.warnings.append(f"{len(result.bad_images)} broken image(s) left out (training skips them too, "
                               "or stops at the first with --bad-images error): fix or remove them")
    return result


def check_splits(
    train: ImageSet,
    val: ImageSet,
    model: str | None = None,
    pretrained: bool = False,
    weights_norm: tuple[list[float], list[float]] | None = None,
    weights_label: str | None = None,
    balanced: bool = False,
    threshold: int = DEFAULT_THRESHOLD,
    imbalance_ratio: float = IMBALANCE_RATIO,
    hash_files: bool = True,
    stats: tuple[list[float], list[float]] | None = None,
    same_images: bool = False,
    train_prints: Prints | None = None,
) -> DataCheck:
    """Check loaded splits. ``weights_norm``: the (mean, std) the starting weights expect, named ``weights_label``
    (a label without a normalisation means weights that record none); ``balanced``: training already compensates
    the class imbalance; ``hash_files=False`` skips the duplicate search for sets too large for memory (it decodes
    every file); ``stats``: the training set's channel (mean, std), where the caller has computed them already;
    ``same_images``: ``val`` is ``train`` on purpose (``--overfit-batches`` validates on the few batches it trains
    on), so their duplicates, the balance of so few images and a class neither holds are no warnings;
    ``train_prints``: ``fingerprints(train)``, where the caller has made them already (to store them)."""
    if not 0 <= threshold <= 64:
        raise UserError(f"--threshold is a number of differing bits of 64, from 0 to 64; got {threshold}")
    k = len(train.classes)
    train_counts = torch.bincount(train.labels, minlength=k).tolist()
    val_counts = torch.bincount(val.labels, minlength=k).tolist()
    imbalance = max(train_counts) / max(min(train_counts), 1)
    mean, std = stats or channel_stats(train)
    # (a --val-data folder's own: a split's and a dataset's validation part have none, and --overfit-batches
    # validates on the training set itself)
    warnings: list[str] = list(train.warnings) + (list(val.warnings) if val.source != train.source else [])
    notes: list[str] = []
    single = one_class(train)
    if single:  # `cnnkit train` refuses such data; check-data shows its counts and says why
        warnings.append(single)
    if imbalance >= imbalance_ratio and not same_images:
        big, small = int(np.argmax(train_counts)), int(np.argmin(train_counts))
        text = (f"classes are imbalanced: {train.classes[big]} has {train_counts[big]:,} training images, "
                f"{train.classes[small]} {train_counts[small]:,} ({imbalance:.1f}x)")
        if balanced:
            notes.append(text + "; training compensates it (class weights or balanced sampling)")
        else:
            warnings.append(text + "; pass --class-weights auto (loss weights) or --balanced-sampler, and judge the "
                            "run by per-class recall rather than accuracy")
    val_data = val.source != train.source  # a --val-data folder, not a split or a dataset's own validation set
    empty = [c for c, n in zip(train.classes, val_counts) if n == 0]
    if empty and not same_images:
        if val_data:
            advice = f"add images of them to --val-data {val.source}"
        elif all(train_counts[train.classes.index(c)] <= 1 for c in empty):
            # split() keeps a class's only image for training: no --val-split fraction gives it a validation image
            advice = ("the split keeps a class's only image for training: add images of them, or pass --val-data "
                      "DIR with images of every class in place of the split")
        else:
            advice = "add images of them to the validation data"
        named = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        warnings.append(f"no validation images of {named}: their recall cannot be measured; {advice}")
    if 0 < len(val) < SMALL_VAL and not same_images:
        more = (f"add images to --val-data {val.source}" if val_data else
                "hold out more with a larger --val-split, or pass --val-data DIR with more images")
        warnings.append(f"only {len(val)} validation image(s): one image moves validation accuracy by "
                        f"{1 / len(val):.4f}, too coarse to compare epochs or runs by; {more}")

    duplicates: list[Duplicate] = []
    checked = (hash_files and train.source != "shapes") or (hashed(train) and val.images is not None)
    if same_images:
        checked = False
        notes.append("validation images are the training images on purpose: not checked for duplicates")
    elif train.source == "shapes":
        # The hash is colour-blind, and the generator draws the same shape at the same place in other colours
        # often enough (2% of its validation set) that every demo run would warn about its own data.
        notes.append("the generated shapes data is not checked for duplicates (independent random draws)")
    elif checked:
        prints = (fingerprints(train) if train_prints is None else train_prints, fingerprints(val))  # once
        conflicts = label_conflicts(train, val, prints[0][1], prints[1][1])
        if conflicts:
            (a, ca), (b, cb) = conflicts[0][:2]
            warnings.append(f"{len(conflicts)} image(s) appear under two or more classes with identical pixels, e.g. "
                            f"{a} ({ca}) = {b} ({cb}): training is told both labels, at most one of them right; "
                            "keep each image in the folder of its class")
        duplicates = find_duplicates(train, val, prints, threshold)
        if duplicates:
            exact = sum(d.exact for d in duplicates)
            first = duplicates[0]
            warnings.append(f"{len(duplicates)} validation image(s) ({exact} exact) duplicate training images, e.g. "
                            f"{first.val} ~ {first.train}; validation accuracy over them measures memory, not "
                            "generalisation: remove them from one side (`cnnkit check-data` lists them all)")
    else:
        notes.append("duplicates between training and validation not checked (a set too large for memory); "
                     "`cnnkit check-data` checks them")

    # torchvision's default weights for the model: None for cnnkit's own, which then never import torchvision
    weights = default_weights(model) if model is not None else None
    _check_channels(train, model, weights, pretrained, notes)
    _check_size(train, model, weights, pretrained, warnings, notes)
    if pretrained and model is not None and weights_norm is None:
        weights_norm, weights_label = normalization(model, train.channels)[:2], f"torchvision's pretrained {model}"
    if weights_label is not None:
        _check_normalisation(mean, std, weights_norm, weights_label, warnings)
    return DataCheck(train.source, list(train.classes), train_counts, val_counts, round(imbalance, 3), train.channels,
                     train.size, mean, std, duplicates, checked, threshold, model, warnings, notes,
                     train.skipped + val.skipped)


def one_class(data: ImageSet) -> str | None:
    """The problem with training data of a single class (every image is that class: accuracy 1.0 from the first
    epoch, learning nothing), or None when it has two or more."""
    if len(data.classes) != 1:
        return None
    return (f"{data.source} has one class, {data.classes[0]}; a classifier needs two or more: add a folder per "
            "class, each holding that class's images")


def class_weights(labels: torch.Tensor, num_classes: int) -> list[float]:
    """Loss weights inversely proportional to class frequency, ``n / (k * count)``: 1 for every class of a
    balanced set, and a class with a tenth of its share weighs ten times as much (scikit-learn's "balanced")."""
    counts = torch.bincount(labels, minlength=num_classes).double().clamp_min(1)
    return (len(labels) / (num_classes * counts)).tolist()


# --- duplicates ----------------------------------------------------------------------------------------------

def _dct_matrix(n: int, k: int) -> torch.Tensor:
    """The first ``k`` rows of the (unscaled) DCT-II matrix of size ``n``: scaling does not change a sign test."""
    i = torch.arange(n, dtype=torch.float64)
    return torch.cos(torch.pi * (2 * i[None, :] + 1) * torch.arange(k, dtype=torch.float64)[:, None] / (2 * n)).float()


def perceptual_hashes(images: torch.Tensor) -> np.ndarray:
    """64-bit DCT perceptual hashes (as ``imagehash.phash`` computes them) of a uint8 batch N x C x H x W."""
    x = images.float()
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    elif x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (HASH_SIZE, HASH_SIZE):
        x = F.interpolate(x, size=(HASH_SIZE, HASH_SIZE), mode="bilinear", antialias=True, align_corners=False)
    d = _dct_matrix(HASH_SIZE, LOW_FREQUENCIES)
    low = (d @ x[:, 0] @ d.T).flatten(1)
    bits = (low > low.quantile(0.5, dim=1, keepdim=True)).numpy()
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


def _digests(images: torch.Tensor) -> list[bytes]:
    return [hashlib.blake2b(img.numpy().tobytes(), digest_size=_DIGEST_BYTES).digest() for img in images]


def fingerprints(data: ImageSet) -> Prints:
    """Perceptual hashes and pixel digests of every image. Sets too large for memory are decoded in chunks at
    the hash size (their exact matches are then identical 32 x 32 thumbnails)."""
    if data.images is not None:
        digests = _digests(data.images)
        # The hashes cost several times the digests, and a run on the same data finds them cached (keyed by
        # every image's pixels, in order): a second run on a folder does not spend seconds on them again.
        key = {"source": "perceptual hashes", "hash_size": HASH_SIZE, "low": LOW_FREQUENCIES,
               "pixels": hashlib.sha256(b"".join(digests)).hexdigest()}
        entry = cache.cached(key, lambda: {"hashes": torch.from_numpy(np.concatenate(
            [perceptual_hashes(data.images[i : i + 4096]) for i in range(0, len(data), 4096)]
            or [np.zeros(0, np.uint64)]).view(np.int64))}, ("hashes",))
        return entry["hashes"].numpy().view(np.uint64), digests
    hashes, digests = [], []
    for i in range(0, len(data.files), 4096):
        thumbs, ok, _ = decode_files(data.files[i : i + 4096], data.channels, HASH_SIZE)
        if not ok.all():  # a file that broke since it was checked: keep the indices aligned with a blank image
            full = torch.zeros(len(ok), *thumbs.shape[1:], dtype=torch.uint8)
            full[ok] = thumbs
            thumbs = full
        hashes.append(perceptual_hashes(thumbs))
        digests += _digests(thumbs)
    return (np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)), digests


def hashed(data: ImageSet) -> bool:
    """Whether ``cnnkit train`` looks for duplicates in ``data`` (and stores its fingerprints as a training set):
    sets decoded into memory; not the generated shapes (see ``check_splits``), nor sets too large for memory, which
    ``fingerprints`` would decode a second time."""
    return data.images is not None and data.source != "shapes"


def save_prints(prints: Prints, path: str) -> None:
    """Write ``prints`` to ``path`` (24 bytes an image), atomically."""
    hashes, digests = prints
    atomic_torch_save({"hash_size": HASH_SIZE, "low": LOW_FREQUENCIES,
                       "hashes": torch.from_numpy(hashes.view(np.int64).copy()),
                       "digests": torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8)
                       .view(-1, _DIGEST_BYTES)}, path, durable=False)


def load_prints(path: str) -> Prints | None:
    """The fingerprints ``save_prints`` wrote to ``path``; None when there is no such file or it cannot be used
    (damaged, or hashed another way by another cnnkit version)."""
    try:
        entry = torch.load(path, weights_only=True)
        hashes, digests = entry["hashes"], entry["digests"]
        if ((entry["hash_size"], entry["low"]) != (HASH_SIZE, LOW_FREQUENCIES) or hashes.dim() != 1
                or tuple(digests.shape) != (len(hashes), _DIGEST_BYTES)):
            return None
    except Exception:  # a missing or damaged file is no fingerprints, never trusted
        return None
    raw = digests.numpy().tobytes()
    return (hashes.numpy().view(np.uint64),
            [raw[i : i + _DIGEST_BYTES] for i in range(0, len(raw), _DIGEST_BYTES)])


def _popcount(x: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy 2's bitwise_count, or a byte table on older numpy)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(x)
    table = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)
    return table[x.view(np.uint8).reshape(*x.shape, 8)].sum(-1, dtype=np.uint8)


def label_conflicts(train: ImageSet, val: ImageSet, train_digests: list[bytes],
                    val_digests: list[bytes]) -> list[list[tuple[str, str]]]:
    """Images held under two or more classes: for each set of identical images (the same pixels after decoding:
    ``fingerprints``' digests) whose labels differ, across both splits, its (image, class) pairs, one per class.
    Sets in memory only (a streamed one's digests are of thumbnails, too coarse to call two labels a conflict)."""
    if train.images is None or val.images is None:
        return []
    seen: dict[bytes, dict[str, str]] = {}
    for data, split, digests in ((train, "train", train_digests), (val, "val", val_digests)):
        for i, digest in enumerate(digests):
            seen.setdefault(digest, {}).setdefault(data.classes[int(data.labels[i])], _name(data, i, split))
    return [[(image, c) for c, image in by_class.items()] for by_class in seen.values() if len(by_class) > 1]


def _name(data: ImageSet, index: int, split: str) -> str:
    return data.paths[index] if data.paths is not None else f"{data.source} {split} #{index}"


def find_duplicates(train: ImageSet, val: ImageSet, prints: tuple[Prints, Prints],
                    threshold: int = DEFAULT_THRESHOLD) -> list[Duplicate]:
    """Every validation image with a training image within ``threshold`` bits (or identical pixels), closest
    first: an exact match if there is one, else the nearest by Hamming distance. ``prints``: both sets'
    ``fingerprints`` (made once for this search and the label-conflict one)."""
    (train_hash, train_digest), (val_hash, val_digest) = prints
    same_pixels = {d: i for i, d in enumerate(train_digest)}
    found = []
    for start in range(0, len(val_hash), _COMPARE_ROWS):
        distances = _popcount(val_hash[start : start + _COMPARE_ROWS, None] ^ train_hash[None, :])
        nearest = distances.argmin(1)
        matches = (distances <= threshold).sum(1)
        for row in np.nonzero(matches)[0].tolist():  # identical pixels hash identically: always among these
            v = start + row
            exact = same_pixels.get(val_digest[v])
            t = exact if exact is not None else int(nearest[row])
            found.append(Duplicate(_name(val, v, "val"), _name(train, t, "train"), int(distances[row, t]),
                                   exact is not None, max(int(matches[row]), 1)))
    return sorted(found, key=lambda d: (not d.exact, d.distance, d.val))


# --- the data against the model --------------------------------------------------------------------------------

def _check_channels(train: ImageSet, model: str | None, weights, pretrained: bool, notes: list[str]) -> None:
    if train.channels == 1 and weights is not None:
        notes.append(f"1-channel images into {model}, a 3-channel network: cnnkit adapts its first convolution to "
                     "1 channel" + (" by summing the pretrained RGB filters (timm's adapt_input_conv), with the "
                                    "channel-averaged normalisation" if pretrained else ""))
    if train.channels == 3 and train.images is not None and len(train):
        sample = train.images[:2000]
        if torch.equal(sample[:, 0], sample[:, 1]) and torch.equal(sample[:, 1], sample[:, 2]):
            keep = " (keep 3 for pretrained RGB weights)" if pretrained else ""
            notes.append("the images are grey (R = G = B) but decoded as RGB: --channels 1 takes a third of the "
                         f"memory and first-layer compute{keep}")


def _check_size(train: ImageSet, model: str | None, weights, pretrained: bool, warnings: list[str],
                notes: list[str]) -> None:
    if weights is None:
        return
    min_size = max(weights.meta.get("min_size", (1, 1)))
    if train.size < min_size:
        warnings.append(f"{model} needs inputs of at least {min_size}x{min_size} pixels; these are "
                        f"{train.size}x{train.size}: pass --input-size {min_size} or more")
    crop = default_input_size(model)
    if pretrained and train.size * 2 <= crop:
        notes.append(f"{model}'s pretrained weights were trained at {crop}x{crop}; at {train.size}x{train.size} "
                     f"objects are {crop // train.size}x smaller than the filters learnt them (--input-size {crop} "
                     "transfers better, at a higher cost)")


def _check_normalisation(mean: list[float], std: list[float], weights_norm: tuple[list[float], list[float]] | None,
                         label: str, warnings: list[str]) -> None:
    if weights_norm is None:
        warnings.append(f"{label} records no input normalisation, so training normalises with this data's own "
                        f"statistics (mean {_fmt(mean)}, std {_fmt(std)}); if the weights were trained with other "
                        "statistics (ImageNet's, for most), their first layer sees inputs it never saw")
        return
    w_mean, w_std = weights_norm
    if len(w_mean) != len(mean):
        return  # a channel mismatch, reported on its own
    normalised_mean = [(m - wm) / ws for m, wm, ws in zip(mean, w_mean, w_std)]
    normalised_std = [s / ws for s, ws in zip(std, w_std)]
    low, high = NORMALISED_STD_RANGE
    if any(abs(m) > NORMALISED_MEAN_LIMIT for m in normalised_mean) or any(not low <= s <= high for s in normalised_std):
        warnings.append(f"normalised as {label} expects (mean {_fmt(w_mean)}, std {_fmt(w_std)}), this data comes "
                        f"out at mean {_fmt(normalised_mean)} and std {_fmt(normalised_std)} instead of about 0 and 1: "
                        "it looks unlike the data the weights learnt from, so frozen early layers transfer poorly; "
                        "fine-tune more of the network (--unfreeze, --stages) rather than --freeze backbone")


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def format_check(c: DataCheck, max_duplicates: int = 20) -> str:
    """The check as text: class counts, broken images and duplicates (up to ``max_duplicates`` of each), then
    warnings and notes."""
    width = max(len(n) for n in c.classes + ["class"])
    classes = f"{len(c.classes)} class{'es' if len(c.classes) != 1 else ''}"
    lines = [f"{c.data}: {sum(c.train_counts):,} training and {sum(c.val_counts):,} validation images of "
             f"{c.channels}x{c.size}x{c.size}, {classes}; mean {_fmt(c.mean)}, std {_fmt(c.std)}",
             f"  {'class':<{width}}  {'train':>8}  {'val':>7}"]
    lines += [f"  {n:<{width}}  {t:>8,}  {v:>7,}" for n, t, v in zip(c.classes, c.train_counts, c.val_counts)]
    lines.append(f"  largest / smallest training class: {c.imbalance:.2f}")
    if c.bad_images:
        lines.append(f"broken images: {len(c.bad_images)}, left out of the counts above")
        lines += [f"  {b}" for b in c.bad_images[:max_duplicates]]
        if len(c.bad_images) > max_duplicates:
            lines.append(f"  ... and {len(c.bad_images) - max_duplicates} more (--json lists them all)")
    if not c.duplicates_checked:
        lines.append("duplicates: not checked")
    elif not c.duplicates:
        lines.append(f"duplicates: none between training and validation (perceptual hash within {c.threshold} bits)")
    else:
        lines.append(f"duplicates: {len(c.duplicates)} validation image(s) with a training image within "
                     f"{c.threshold} bits (distance of 64-bit perceptual hashes)")
        for d in c.duplicates[:max_duplicates]:
            kind = "exact" if d.exact else f"near, {d.distance} bits"
            more = f" (+{d.matches - 1} more)" if d.matches > 1 else ""
            lines.append(f"  {d.val}  ~  {d.train}  [{kind}]{more}")
        if len(c.duplicates) > max_duplicates:
            lines.append(f"  ... and {len(c.duplicates) - max_duplicates} more (--json lists them all)")
    lines += [f"warning: {w}" for w in c.warnings] + [f"note: {n}" for n in c.notes]
    return "\n".join(lines)
