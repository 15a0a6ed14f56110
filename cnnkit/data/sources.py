"""Where images come from: ``shapes``, torchvision's datasets, or a folder of images -> uint8 tensors.

Every source ends as an ``ImageSet``: labels, class names and either the decoded images as one uint8
tensor N x C x H x W (small images: decoded once, cached) or the list of files (datasets too large for
memory, decoded per batch by loader workers).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pickle
import shutil
import unicodedata
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

from cnnkit.choices import BUILTIN, SHAPES_TRAIN, SHAPES_VAL, TORCHVISION_DATASETS, builtin_meant, is_model_file
from cnnkit.data import cache
from cnnkit.data.images import (DECODER_VERSION, header_size, image_size, is_image_file, load_image, max_pixels,
                                why_missing)
from cnnkit.data.shapes import SHAPE_CLASSES, make_shapes
from cnnkit.errors import DataError, UserError
from cnnkit.runs import run_info

DEFAULT_FOLDER_SPLIT = 0.1  # the fraction of a folder held out for validation when no --val-split is given
SPLIT_SEED = 0  # the validation split never depends on the training seed: changing --seed must not leak val into train
DEFAULT_MEMORY_BUDGET = 4 * 2**30
BAD_IMAGE_POLICIES = ("skip", "error")
SIZE_SAMPLE = 64  # images whose sizes choose a folder's input size (read from their headers: cheap)
MAX_DEFAULT_SIZE = 224  # a folder of larger images is read at ImageNet's size unless --input-size says otherwise
MIXED_SIZES = 2  # largest / smallest (capped) shorter side in that sample from which the choice is warned about
_READ_TYPES = "cnnkit reads " + ", ".join(e.lstrip(".") for e in (".jpg", ".png", ".bmp", ".webp", ".tif"))


@dataclass
class ImageSet:
    """Images and labels of one split."""

    labels: torch.Tensor
    classes: list[str]
    images: torch.Tensor | None = None  # uint8 N x C x H x W, in memory
    files: list[str] | None = None  # decoded on the fly when the set is too large for memory
    channels: int = 3
    size: int = 32
    source: str = ""
    skipped: list[str] = field(default_factory=list)  # one message per image left out because it is broken
    paths: list[str] | None = None  # each image's file, for a folder (also when decoded in memory), to name it
    warnings: list[str] = field(default_factory=list)  # what loading found worth acting on (mixed image sizes)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        return replace(
            self,
            labels=self.labels[idx],
            images=None if self.images is None else self.images[idx],
            files=None if self.files is None else [self.files[i] for i in idx.tolist()],
            paths=None if self.paths is None else [self.paths[i] for i in idx.tolist()],
        )


def fingerprint(data: ImageSet) -> dict[str, Any]:
    """Which images ``data`` holds: their count and a hash of their files' paths below the folder and their labels
    (for a set without files, a built-in one generated or read the same each time, of the labels alone). A resumed
    run compares its splits' with those it started with: a folder changed since would redraw the split."""
    h = hashlib.sha256()
    if data.paths is not None:
        prefix = os.path.join(data.source, "")
        # (a name that is not UTF-8 comes back from os.walk with surrogate escapes: encoded back to its bytes)
        h.update("\n".join(p[len(prefix):] if p.startswith(prefix) else p for p in data.paths)
                 .encode("utf-8", "surrogateescape"))
    h.update(data.labels.to(torch.int64).numpy().tobytes())
    return {"images": len(data), "hash": h.hexdigest()[:16]}


@dataclass
class DataSpec:
    """What ``--data`` and its companions ask for."""

    data: str = "shapes"
    data_dir: str | None = None
    download: bool = False
    val_data: str | None = None
    val_split: float | None = None
    input_size: int | None = None
    channels: int | None = None
    num_samples: int | None = None
    bad_images: str = "skip"  # skip: leave broken images out and list them; error: stop at the first


def default_data_dir() -> str:
    return os.environ.get("CNNKIT_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "cnnkit", "datasets")


def load_splits(spec: DataSpec) -> tuple[ImageSet, ImageSet]:
    """The training and validation sets that ``spec`` describes."""
    _check_spec(spec)
    name = spec.data
    if name == "shapes":
        n = spec.num_samples or SHAPES_TRAIN
        train = _shapes(n, spec, seed=0)
        val = _shapes(max(SHAPES_VAL, n // 10), spec, seed=1) if spec.val_split is None else None
    elif name in TORCHVISION_DATASETS:
        train = _torchvision(name, spec, train=True)
        val = _torchvision(name, spec, train=False) if spec.val_split is None and spec.val_data is None else None
    else:
        train = _folder(name, spec)
        val = None
    if spec.val_data is not None:
        val = _folder(spec.val_data, replace(spec, input_size=train.size, channels=train.channels), "--val-data",
                      scored=True)
        val = by_class_name(val, train.classes, f"--val-data {spec.val_data}", f"the training data {name}")
    elif val is None:
        train, val = split(train, spec.val_split if spec.val_split is not None else DEFAULT_FOLDER_SPLIT)
    if spec.num_samples and name != "shapes" and spec.num_samples < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))[: spec.num_samples]
        train = train.subset(keep.sort().values)
    return train, val


def load_eval_set(spec: DataSpec, option: str = "--data") -> ImageSet:
    """The set ``cnnkit eval`` measures: the validation part under the same rules as training
    (the shapes validation set, a torchvision test split, a ``--val-split`` of a folder) or a whole folder.
    ``option``: the flag that named ``spec.data``, for the errors about that folder."""
    _check_spec(spec)
    if spec.data in BUILTIN or spec.val_split is not None or spec.val_data is not None:
        train, val = load_splits(spec)
        # what reading the folder found (split() gives it to the training part) concerns the part scored too
        return val if spec.val_data is not None else replace(val, warnings=train.warnings)
    return _folder(spec.data, spec, None if option == "--data" else option, scored=True)


def by_class_name(data: ImageSet, classes: list[str], what: str, against: str) -> ImageSet:
    """``data`` with its labels mapped by class name onto ``classes`` (the training classes, or a checkpoint's),
    as its set of classes: a folder may hold only some of them. ImageFolder alone would number a folder's classes
    0, 1, ... by its own sub-folders, so a validation folder without ``cat`` would score its ``dog`` images as
    ``cat``. A class of ``data`` that is not among ``classes`` is a UserError naming it (``what``: the data, as the
    user gave it; ``against``: whose classes ``classes`` are)."""
    if data.classes == classes:
        return data
    # by name as a person reads it: a folder named on macOS (decomposed, NFD: u + combining diaeresis) and one named
    # elsewhere (NFC: one character) are the same class, though their bytes differ
    index_of = {unicodedata.normalize("NFC", c): i for i, c in enumerate(classes)}
    unknown = [c for c in data.classes if unicodedata.normalize("NFC", c) not in index_of]
    if unknown:
        fix = ("rename or remove those class folders: classes are matched by name" if data.source not in BUILTIN
               else f"pass images of {against}'s classes: {data.source} is another dataset")
        raise UserError(f"{what} has class(es) {_names(unknown)} that {against} does not have (its classes: "
                        f"{_names(classes)}); {fix}")
    index = torch.tensor([index_of[unicodedata.normalize("NFC", c)] for c in data.classes], dtype=torch.int64)
    return replace(data, labels=index[data.labels], classes=list(classes))


def _names(names: list[str], most: int = 20) -> str:
    """``names`` for a one-line message: the first ``most`` of them, and how many there are in all."""
    return ", ".join(names[:most]) + (f", ... ({len(names)} in all)" if len(names) > most else "")


def split(data: ImageSet, fraction: float) -> tuple[ImageSet, ImageSet]:
    """A stratified split: ``fraction`` of each class to validation, at least one image and all but one of each
    class with two or more (a class without training images cannot be learnt: --val-split 0.99 held out every
    image, and training failed on an empty set)."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    train_idx, val_idx = [], []
    for c in range(len(data.classes)):
        idx = (data.labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * fraction))
        k = min(max(k, 1), len(idx) - 1) if len(idx) >= 2 else 0
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
    if len(va) == 0:
        # (each class of two or more images gives one at least: these have one image each, or none)
        raise UserError("no class has two images, so --val-split can hold none out for validation; add images "
                        "(two or more per class) or pass --val-data DIR")
    # broken files and warnings are reported once, with train
    return data.subset(tr), replace(data.subset(va), skipped=[], warnings=[])


def _check_spec(spec: DataSpec) -> None:
    if spec.val_split is not None and spec.val_data is not None:  # else the split would be dropped unseen
        # DATA is named by its path: check-data and probe take it as an argument, train and eval as --data
        raise UserError(f"--val-split {spec.val_split} splits {spec.data} into training and validation images, but "
                        f"with --val-data {spec.val_data} the validation images are that folder: drop one of the two")
    if spec.val_split is not None and not 0 < spec.val_split < 1:
        raise UserError(f"--val-split must be between 0 and 1 (exclusive), got {spec.val_split}")
    size = spec.input_size
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        # (3, 32, 32), the inspection commands' C H W, is no size here: the images are square, their channels apart
        channels = ("; not C H W: the channels come from the data and the model (train and check-data: --channels "
                    "1 or 3)" if isinstance(size, (list, tuple)) else "")
        raise UserError(f"--input-size takes one positive whole number, the side of the square images in pixels, "
                        f"got {size}{channels}")
    if spec.channels is not None and spec.channels not in (1, 3):
        raise UserError(f"--channels must be 1 (grayscale) or 3 (RGB), got {spec.channels}")
    if spec.bad_images not in BAD_IMAGE_POLICIES:
        raise UserError(f"--bad-images must be one of {', '.join(BAD_IMAGE_POLICIES)}, not '{spec.bad_images}'")
    if spec.num_samples is not None and spec.num_samples < 1:
        raise UserError(f"--num-samples must be positive, got {spec.num_samples}")


def _shapes(n: int, spec: DataSpec, seed: int) -> ImageSet:
    size, channels = spec.input_size or 32, spec.channels or 3
    entry = cache.cached(
        {"source": "shapes", "n": n, "size": size, "channels": channels, "seed": seed},
        lambda: dict(zip(("images", "labels"), make_shapes(n, size, channels, seed))),
        ("images", "labels"),
    )
    return ImageSet(entry["labels"], list(SHAPE_CLASSES), entry["images"], None, channels, size, "shapes")


def _torchvision(name: str, spec: DataSpec, train: bool) -> ImageSet:
    import torchvision

    cls_name, native_channels, native_size, folder = TORCHVISION_DATASETS[name]
    root = spec.data_dir or default_data_dir()
    where = os.path.join(root, folder)
    if os.path.exists(root) and not os.path.isdir(root):  # else "check the network", for a path typed wrong
        if spec.data_dir:
            raise UserError(f"--data-dir {root} is a file, not a folder; pass the folder that holds (or is to hold) "
                            f"{folder}")
        how = "set CNNKIT_DATA to a folder" if os.environ.get("CNNKIT_DATA") else "move that file"
        raise UserError(f"the data folder {root} is a file, not a folder; {how}, or pass --data-dir DIR where "
                        f"DIR/{folder} holds (or is to hold) the {name} files")
    # Files there that torchvision refuses (a failed checksum, a truncated or altered file) are damaged, not
    # missing: the fix is to fetch them again, which torchvision skips while the folder passes its own check.
    # Damaged files are no usage error: exit code 1 (DataError), as for a damaged image or checkpoint.
    damaged = (f"delete {where} and run with --download to fetch {name} again (needs internet), or copy intact "
               f"torchvision {cls_name} files there")
    try:
        ds = _open_dataset(getattr(torchvision.datasets, cls_name), root, folder, train, spec.download)
    except (RuntimeError, OSError, ValueError, AssertionError, EOFError, pickle.UnpicklingError) as e:
        present = os.path.isdir(where) and any(not f.startswith(".") for f in os.listdir(where))
        # torchvision downloads only what is missing (MNIST) or fails its checksum (CIFAR): with files there, an
        # error that is no network error came from reading them
        if spec.download and not (present and not isinstance(e, OSError) and "download" not in str(e).lower()):
            raise DataError(
                f"could not download {name} into {root} ({_reason(e)}); "
                f"check the network, or copy the dataset files to {where}"
                + (f" and pass --data-dir {root}" if spec.data_dir else "")  # the default folder needs no option
            ) from None
        if present:
            raise DataError(f"{name} not found or damaged in {where} (its files there failed torchvision's check); "
                            f"{damaged}") from None
        # another built-in dataset's files there: the wrong --data more likely than a missing dataset
        others = [n for n, entry in TORCHVISION_DATASETS.items()
                  if n != name and os.path.isdir(os.path.join(root, entry[3]))]
        held = (f" ({root} holds the files of {' and '.join(others)}: pass {others[0]} as the data if that is the one "
                f"meant)" if others else "")
        raise UserError(
            f"{name} not found in {where}{held}; run with --download to fetch it (needs internet), "
            f"or pass --data-dir DIR where DIR/{folder} holds torchvision's {cls_name} files"
        ) from None
    images = torch.as_tensor(ds.data)
    images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    bad = ((labels < 0) | (labels >= len(ds.classes))).nonzero().flatten()
    if len(bad):  # else a label indexes past the class names wherever they are looked up
        raise DataError(f"{name} in {where} is damaged: its {'training' if train else 'test'} labels include "
                        f"{int(labels[bad[0]])}, outside its {len(ds.classes)} classes (0 to {len(ds.classes) - 1}); "
                        f"{damaged}")
    if len(labels) != len(images):
        raise DataError(f"{name} in {where} is damaged: {len(images):,} {'training' if train else 'test'} images "
                        f"but {len(labels):,} labels; {damaged}")
    images = _convert(images.contiguous(), spec.channels or native_channels, spec.input_size or native_size)
    return ImageSet(labels, list(ds.classes), images, None, images.shape[1], images.shape[-1], name)


def _open_dataset(cls: Any, root: str, folder: str, train: bool, download: bool) -> Any:
    """torchvision's dataset ``cls`` in ``root``; a download that fails removes what it made, and only that. It
    left an empty ``MNIST/raw`` (and the data folder it made for it), which a later run took for another
    dataset's files."""
    if not download:
        return cls(root, train=train, download=False)
    made = _first_missing(root)
    # what the folders the download writes into held before it: an archive lands in root, the files in folder
    parts = folder.split("/")
    folders = [os.path.join(root, *parts[:depth]) for depth in range(len(parts) + 1)]
    before = {d: set(os.listdir(d)) if os.path.isdir(d) else set() for d in folders}
    try:
        return cls(root, train=train, download=True)
    except BaseException:  # an interrupted download is half-written too
        _remove_new(before, root, made)
        raise


def _remove_new(before: dict[str, set[str]], root: str, made: str | None) -> None:
    """Remove what is in the folders of ``before`` and was not then, and the folders from ``root`` up to ``made``
    (the outermost one made for it) while nothing else has been put in them. What cannot be removed stays: the
    error the caller is about to raise is the one to show."""
    try:
        for d, held in before.items():
            for entry in sorted(set(os.listdir(d)) - held) if os.path.isdir(d) else ():
                path = os.path.join(d, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    os.remove(path)
        path = os.path.abspath(root)
        while made is not None and os.path.commonpath([path, made]) == made:
            os.rmdir(path)  # only an empty folder: OSError otherwise, and the ones above it stay too
            path = os.path.dirname(path)
    except OSError:
        pass


def _first_missing(path: str) -> str | None:
    """The outermost folder of ``path`` (itself included) that does not exist, the one makedirs would create
    first; None if ``path`` exists."""
    path, missing = os.path.abspath(path), None
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        missing, path = path, os.path.dirname(path)
    return missing


def _reason(e: Exception) -> str:
    """``e`` in one line: torchvision's download error is several ("Error downloading X:", "Tried URL, got:", then
    the cause), its first line alone said nothing of why."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1]}"


def _convert(images: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Bring a uint8 batch to ``channels`` and ``size`` (antialiased resize)."""
    if images.shape[1] != channels:
        if channels == 1:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * w).sum(1, keepdim=True).round().to(torch.uint8)
        else:
            images = images.expand(-1, channels, -1, -1).contiguous()
    if images.shape[-1] != size or images.shape[-2] != size:
        out = torch.empty(len(images), channels, size, size, dtype=torch.uint8)
        for i in range(0, len(images), 4096):
            chunk = F.interpolate(images[i : i + 4096].float(), size=(size, size), mode="bilinear",
                                  antialias=True, align_corners=False)
            out[i : i + 4096] = chunk.round().clamp(0, 255).to(torch.uint8)
        images = out
    return images


def _dataset_meant(root: str) -> str:
    """``"; did you mean fashion_mnist?"`` for a ``--data`` that is no folder but reads as a built-in dataset's
    name in another spelling (``fashion-mnist``, ``FashionMNIST``, ``CIFAR10``, ``cifar-10``), else ``""``."""
    meant = builtin_meant(root)
    return f"; did you mean {meant}?" if meant else ""


def scan_folder(root: str, option: str | None = None,
                scored: bool = False) -> tuple[list[str], torch.Tensor, list[str]]:
    """Image files, labels and class names of an ImageFolder-layout directory (one sub-folder per class).

    Hidden files and folders (``.ipynb_checkpoints``, ``.DS_Store``) are ignored; files are sorted so the
    order, and with it every split, is the same on every machine. ``option``: the flag that named ``root``
    where it is not ``--data`` (``--val-data``), so that an error says which of the two paths is wrong.
    ``scored``: the folder is only scored, never trained on, so an empty class folder is a class without images
    (left out of the classes: a validation folder, ``--val-data`` or what eval scores), not an error.
    """
    return _scan_folder(root, option, scored)[:3]


def _scan_folder(root: str, option: str | None,
                 scored: bool) -> tuple[list[str], torch.Tensor, list[str], list[str]]:
    """``scan_folder``'s files, labels and classes, and the other entries it saw at the top of ``root``: the files
    beside the class folders (sorted; hidden ones left out), which no class reads (``_loose_files`` warns)."""
    named = root if option is None else f"{option} {root}"
    if not os.path.exists(root):
        # a config file's relative path is read from where the command runs, not from the file's folder
        where = "" if os.path.isabs(root) else f" (a relative path, read from the current folder {os.getcwd()})"
        if option is None:
            # the names are exact (a folder may be called Mnist); a near miss is only named as the likely intent
            raise UserError(f"data path {root} does not exist{where}; pass a folder with one sub-folder per class, "
                            f"or one of: {', '.join(BUILTIN)}{_dataset_meant(root)}")
        raise UserError(f"{named} does not exist{where}; pass a folder with one sub-folder of images per class")
    mistaken = _run_or_checkpoint(root) or _torchvision_files(root)
    if mistaken:
        raise UserError(mistaken if option is None else f"{option} {mistaken}")
    if not os.path.isdir(root):
        raise UserError(f"{'data path ' + root if option is None else named} is not a folder; pass a folder with "
                        "one sub-folder per class")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    # a class folder that is a broken link (an unmounted disk, a moved folder) is no folder: its class was left
    # out without a word, and the model trained without it
    broken = [e for e in entries
              if os.path.islink(os.path.join(root, e)) and not os.path.exists(os.path.join(root, e))]
    if broken:
        path = os.path.join(root, broken[0])
        raise UserError(f"{'class folder ' + path if option is None else f'{option} {root}: class folder {path}'} "
                        f"{why_missing(path)}; fix the link or remove it")
    classes = [e for e in entries if os.path.isdir(os.path.join(root, e))]
    others = sorted(set(entries) - set(classes))  # files beside the class folders
    if not classes:
        loose = [e for e in entries if is_image_file(e)]
        if loose:
            parent = _parent_of_class_folder(root)
            if parent:  # `--data photos/cat`: one class's folder of a data folder that is right as it is
                folder, siblings = parent
                shown = ", ".join(siblings[:3]) + (", ..." if len(siblings) > 3 else "")
                raise UserError(f"{named} holds images but no class sub-folders: it looks like one class's folder; "
                                f"pass the folder above it, {folder}, whose sub-folders ({shown}) are the classes")
            raise UserError(f"{named} holds images but no class sub-folders; put each class's images in "
                            f"{root}/<class name>/")
        if entries:  # files, none an image: "is empty" sent the user looking at a folder that was not
            shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
            raise UserError(f"{named} holds no class sub-folders, only {len(entries)} file(s) that are not images "
                            f"({shown}): expected one sub-folder per class with images in it ({_READ_TYPES})")
        raise UserError(f"{named} is empty: expected one sub-folder per class with images in it")
    splits = _split_folders(root, classes)
    if splits:
        raise UserError(splits if option is None else f"{option} {splits}")
    files: list[str] = []
    labels: list[int] = []
    empty = []
    for c, name in enumerate(classes):
        found = []
        # through linked sub-folders too, as predict reads them (they were left out without a word), each once and
        # never the data folder again: a link back up the tree would otherwise be walked forever, or read the
        # other classes' images as this one's
        visited = {os.path.realpath(root)}
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
            visited.add(os.path.realpath(dirpath))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and os.path.realpath(os.path.join(dirpath, d)) not in visited)
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
        if not found:
            empty.append(name)
        files += found
        labels += [c] * len(found)
    loose = [e for e in entries if is_image_file(e)]
    if len(loose) > len(files):  # a class's own folder, say, with a sub-folder of a few images in it
        parent = os.path.dirname(os.path.abspath(root))
        raise UserError(f"{named} holds {len(loose)} images of its own, which cnnkit does not read, and "
                        f"{len(files)} in its sub-folder(s) ({', '.join(classes[:3])}), which it would take for "
                        f"the classes; pass the folder whose sub-folders are the classes (perhaps {parent}), or "
                        f"move the images into {root}/<class name>/")
    if not files:
        raise UserError(f"no images found under {named}'s class folders ({', '.join(classes[:5])}...); "
                        f"{_READ_TYPES}")
    if empty and scored:
        # Its classes are matched to the training classes by name (by_class_name): an empty folder is a class
        # without validation images, as a missing folder is, and the data check warns about those.
        kept = [c for c in classes if c not in empty]
        labels = [kept.index(classes[label]) for label in labels]
        classes = kept
    elif empty:
        raise UserError(f"class folder(s) without images in {named}: {', '.join(empty)}; "
                        "add images or remove the folder (a class without images cannot be learnt)")
    return files, torch.tensor(labels, dtype=torch.int64), classes, others


def _parent_of_class_folder(root: str) -> tuple[str, list[str]] | None:
    """The folder above ``root`` (as the user would type it) and its sub-folders, where it is a data folder as
    cnnkit reads one: two or more sub-folders, ``root`` among them, each with images in it (at any depth); else
    None."""
    path = os.path.normpath(root)
    above = os.path.dirname(os.path.abspath(root))
    if above == os.path.abspath(root):  # the root of the file system
        return None
    folder = above if os.path.basename(path) in (".", "..") else (os.path.dirname(path) or ".")
    try:
        classes = sorted(e for e in os.listdir(above) if not e.startswith(".") and os.path.isdir(os.path.join(above, e)))
    except OSError:
        return None

    def has_images(d: str) -> bool:
        return any(is_image_file(f) for _, _, names in os.walk(d, followlinks=True) for f in names)

    if len(classes) < 2 or not all(has_images(os.path.join(above, c)) for c in classes):
        return None
    return folder, classes


# Folder names of a dataset's splits, each holding the class folders: taken for classes they would make a
# "train" and a "val" class of every image.
TRAIN_NAMES = ("train", "training")
VAL_NAMES = ("val", "valid", "validation", "dev", "test", "testing", "eval")


def _split_folders(root: str, classes: list[str]) -> str | None:
    """The error for a folder whose class folders are a dataset's splits (``train/``, ``val/``, ... each holding
    sub-folders and no images of its own), with the options that name them; None for anything else."""
    if not all(c.lower() in TRAIN_NAMES + VAL_NAMES for c in classes):
        return None
    for c in classes:
        entries = [e for e in os.listdir(os.path.join(root, c)) if not e.startswith(".")]
        if any(is_image_file(e) for e in entries) or not any(os.path.isdir(os.path.join(root, c, e)) for e in entries):
            return None
    train = next((c for c in classes if c.lower() in TRAIN_NAMES), None)
    val = min((c for c in classes if c.lower() in VAL_NAMES), key=lambda c: VAL_NAMES.index(c.lower()), default=None)
    problem = (f"{root} holds the splits {', '.join(classes)}, each a folder of class folders, not one folder per "
               f"class (they would be taken as classes {', '.join(classes)})")
    if train is None:
        return f"{problem}; pass one of them as the data, e.g. {os.path.join(root, classes[0])}"
    train, val = os.path.join(root, train), val and os.path.join(root, val)
    if val is None:
        return f"{problem}; pass {train} as the data (to train: cnnkit train --data {train})"
    # check-data takes the data as its argument, train and eval as --data
    return (f"{problem}; pass {train} as the data and {val} as --val-data (to train: cnnkit train --data {train} "
            f"--val-data {val}; to score a run on {val}: cnnkit eval RUN --val-data {val})")


def _torchvision_files(root: str) -> str | None:
    """The error for a folder of torchvision's files of a built-in dataset (``cifar-10-batches-py``, ``MNIST/raw``),
    the folder above them or one between, given as a folder of images: found no images in "class folders" such as
    ``MNIST``, and did not say which option reads them; None for anything else."""
    path = os.path.abspath(root)
    for name, (_, _, _, folder) in TORCHVISION_DATASETS.items():
        parts = folder.split("/")
        for depth in range(len(parts) + 1):  # root is the data dir (depth 0), or that many of folder's parts below it
            data_dir = os.path.normpath(os.path.join(path, *[".."] * depth))
            if os.path.join(data_dir, *parts[:depth]) == path and os.path.isdir(os.path.join(data_dir, folder)):
                # check-data takes the data as its argument, train and eval as --data
                return (f"{root} holds torchvision's {name} files, not class folders of images; pass {name} as the "
                        f"data, with --data-dir {data_dir} (to train: cnnkit train --data {name} "
                        f"--data-dir {data_dir})")
    return None


RUN_FILES = ("best.pt", "last.pt", "metrics.csv")  # beside config.json, what makes a folder a training run's


def _run_or_checkpoint(root: str) -> str | None:
    """The error for a training run's folder, a folder of runs or a model file given where data goes (the run
    folder's plots and confusion pictures would otherwise pass for classes of images), naming the data the run
    trained on; None for anything else."""
    if os.path.isdir(root):
        found = [f for f in RUN_FILES if os.path.isfile(os.path.join(root, f))]
        run = run_info(root) if found else None
        if run is None:
            # runs/ itself: its run folders would pass for classes
            names = sorted(e for e in os.listdir(root) if not e.startswith(".")
                           and any(os.path.isfile(os.path.join(root, e, f)) for f in RUN_FILES)
                           and os.path.isfile(os.path.join(root, e, "config.json")))
            if not names:
                return None
            return (f"{root} holds training runs ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}), not "
                    f"class folders of images; pass the data instead: a folder with one sub-folder of images per "
                    f"class, or {', '.join(BUILTIN)} (each run's config.json names its data)")
        what = f"{root} is a training run's folder (config.json, {', '.join(found)}), not images"
    elif is_model_file(root):
        run = run_info(os.path.dirname(root) or ".")
        what = f"{root} is a model file, not images"
    else:
        return None
    if run is not None and run.data != "?":
        return f"{what}; pass the data instead: the run trained on {run.data} (\"data\" in its config.json)"
    return f"{what}; pass the data instead: a folder with one sub-folder of images per class, or {', '.join(BUILTIN)}"


def _folder(root: str, spec: DataSpec, option: str | None = None, scored: bool = False) -> ImageSet:
    """The images of folder ``root``; ``option``: the flag that named it, where not ``--data``, and ``scored``:
    see scan_folder."""
    files, labels, classes, others = _scan_folder(root, option, scored)
    channels = spec.channels or 3
    size, warnings = (spec.input_size, []) if spec.input_size else _default_size(files, root)
    warnings = _loose_files(root, root if option is None else f"{option} {root}", others) + warnings
    budget = int(os.environ.get("CNNKIT_MEMORY_BUDGET", DEFAULT_MEMORY_BUDGET))
    in_memory = len(files) * channels * size * size <= budget
    if in_memory:
        # the pixel limit decides which images are broken: an entry made under another CNNKIT_MAX_PIXELS would
        # keep leaving out the images that the message told the user to allow by raising it; the decoder's version,
        # what their pixels are (a dark 16-bit image was cached as the bright one an older version made of it)
        key = {"source": "folder", "files": cache.files_fingerprint(root, files), "size": size, "channels": channels,
               "max_pixels": max_pixels(), "decoder": DECODER_VERSION}
        entry = cache.cached(key, lambda: _decode_entry(files, channels, size), ("images", "ok", "errors"))
        images, ok = entry["images"], entry["ok"]
        errors = [e.replace(FILE_MARK, files[i]) for i, e in zip((~ok).nonzero().flatten().tolist(), entry["errors"])]
    else:  # too large for memory: only check that every file opens; loader workers decode per batch
        images, ok, errors = None, *check_files(files)
    if errors:
        _apply_policy(errors, spec.bad_images, root)
        keep = ok.nonzero().flatten()
        labels, files, images = labels[keep], [files[i] for i in keep.tolist()], images
        missing = sorted(set(range(len(classes))) - set(labels.unique().tolist()))
        if missing:
            raise DataError(f"every image of class {classes[missing[0]]} in {root} is broken; fix them or remove the folder")
    return ImageSet(labels, classes, images, None if in_memory else files, channels, size, root, list(errors),
                    paths=files, warnings=warnings)


def _loose_files(root: str, named: str, loose: list[str]) -> list[str]:
    """The warning, if any, that folder ``root`` (``named``, as the user gave it) holds the files ``loose`` beside
    its class folders, as ``_scan_folder`` saw them: no class takes them, and images put there were left out
    without a word. Hidden files (``.DS_Store``, ``._photo.jpg``) are no one's images and go unmentioned."""
    if not loose:
        return []
    loose = sorted(loose, key=lambda e: (not is_image_file(e), e))  # images first: they are what was lost
    shown = ", ".join(loose[:2]) + (f" and {len(loose) - 2} more" if len(loose) > 2 else "")
    return [f"{len(loose)} file(s) at the top of {named}, beside its class folders, are not read ({shown}): only "
            f"images inside a class folder are; move images into {os.path.join(root, '<class name>', '')}"]


FILE_MARK = "\0file\0"  # in a cached message about a broken image, where its path goes


def _decode_entry(files: list[str], channels: int, size: int) -> dict[str, Any]:
    """The cache entry of decoded ``files``: the key holds their paths below the folder, not the folder's, so the
    messages about broken images hold FILE_MARK for the file: a folder moved, or spelt another way, since the
    entry was made named paths that no longer exist."""
    images, ok, errors = decode_files(files, channels, size)
    bad = (~ok).nonzero().flatten().tolist()  # errors come in the order of the files
    return {"images": images, "ok": ok, "errors": [e.replace(files[i], FILE_MARK) for i, e in zip(bad, errors)]}


def _default_size(files: list[str], root: str) -> tuple[int, list[str]]:
    """A folder's input size, pixels: the median shorter side, at most MAX_DEFAULT_SIZE, of up to SIZE_SAMPLE
    images spread evenly over ``files`` (sorted by class, so over the classes), with a one-line warning when the
    sample's sizes differ widely. The first image alone used to decide: one photo among thumbnails made every
    image 224 pixels (49x the compute of 32), one thumbnail among photos shrank them all."""
    step = max(len(files) / SIZE_SAMPLE, 1)
    sides = []
    for i in range(min(SIZE_SAMPLE, len(files))):
        try:
            sides.append(min(header_size(files[int(i * step)])))
        except DataError:  # broken images are reported when the folder is decoded
            continue
    if not sides:
        return MAX_DEFAULT_SIZE, []
    sides.sort()
    size = min(sides[(len(sides) - 1) // 2], MAX_DEFAULT_SIZE)  # the lower median: a size the images have
    if min(sides[-1], MAX_DEFAULT_SIZE) < MIXED_SIZES * min(sides[0], MAX_DEFAULT_SIZE):
        return size, []
    sample = f"{len(sides)} of its {len(files):,} images" if len(sides) < len(files) else f"its {len(sides)} images"
    return size, [f"the images of {root} differ in size (shorter sides {sides[0]} to {sides[-1]} pixels in "
                  f"{sample}): all are resized to {size}x{size}, the median (at most {MAX_DEFAULT_SIZE}); pass "
                  "--input-size N to choose the size"]


def _apply_policy(errors: list[str], policy: str, root: str) -> None:
    if policy == "error":
        more = f" (and {len(errors) - 1} more broken image(s))" if len(errors) > 1 else ""
        raise DataError(f"{errors[0]}{more}; fix or remove it, or pass --bad-images skip to leave broken images out")


def _decode_chunk(args: tuple[list[str], int, int, bool]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    files, channels, size, decode = args
    out = torch.empty(len(files) if decode else 0, channels, size, size, dtype=torch.uint8)
    ok = torch.ones(len(files), dtype=torch.bool)
    errors = []
    for i, f in enumerate(files):
        try:
            if decode:
                out[i] = load_image(f, channels, size)
            else:
                image_size(f)
        except DataError as e:
            ok[i] = False
            errors.append(str(e))
    return out, ok, errors


def _run_chunks(files: list[str], channels: int, size: int, decode: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    chunk = 512
    jobs = [(files[i : i + chunk], channels, size, decode) for i in range(0, len(files), chunk)]
    workers = min(os.cpu_count() or 1, len(jobs))
    # Threads, not forked processes: Pillow releases the GIL while it decodes, and forking a process whose
    # torch thread pools are running can deadlock the children (seen here: a pool hung after training).
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(_decode_chunk, jobs))
    images = torch.cat([r[0] for r in results])
    ok = torch.cat([r[1] for r in results])
    return images, ok, [e for r in results for e in r[2]]


def decode_files(files: list[str], channels: int, size: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Decode ``files`` into one uint8 tensor, in parallel over the CPU cores.

    Returns the images (broken ones left as zeros), a mask of the files that decoded, and one message per
    broken file naming it and the reason.
    """
    images, ok, errors = _run_chunks(files, channels, size, decode=True)
    return images[ok], ok, errors


def check_files(files: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Open every file's header (no full decode): the mask of good files and the messages for broken ones."""
    _, ok, errors = _run_chunks(files, 1, 1, decode=False)
    return ok, errors
