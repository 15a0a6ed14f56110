"""The names and defaults that cnnkit's options accept, in a module that imports nothing but the standard library.

The command line builds its parser (and answers ``--help``) from these without loading PyTorch, which takes
seconds; the modules that act on an option import its names from here, so each list is written once.
"""

from __future__ import annotations

OPTIMIZERS = ("sgd", "adamw", "muon")  # cnnkit/train/optim.py
SCHEDULES = ("onecycle", "cosine", "linear", "step", "constant")  # cnnkit/train/optim.py
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # cnnkit/train/precision.py
# torch.compile's modes for --compile MODE ("reduce-overhead": CUDA graphs, for small steps on a GPU)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
AUGMENT_POLICIES = ("randaugment", "trivialaugment")  # cnnkit/data/augment.py
DECODE_CHOICES = ("auto", "cpu", "device")  # cnnkit/data/loader.py: where a streamed set's JPEGs are decoded
TORCHVISION_DATASETS = {  # cnnkit/data/sources.py
    # name: (torchvision class name, channels, image size, folder the files live in under --data-dir)
    "cifar10": ("CIFAR10", 3, 32, "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", 3, 32, "cifar-100-python"),
    "mnist": ("MNIST", 1, 28, "MNIST/raw"),
    "fashion_mnist": ("FashionMNIST", 1, 28, "FashionMNIST/raw"),
}
BUILTIN = ("shapes", *TORCHVISION_DATASETS)
NO_FLIP_DATA = ("mnist",)  # mirrored digits are other symbols: no random flips (flip=None) and no mirrored TTA view
# The generated data (cnnkit/data/sources.py); the demo (`cnnkit train`) trains on SHAPES_TRAIN images, see
# cnnkit/train/config.py DATA_DEFAULTS.
SHAPES_TRAIN, SHAPES_VAL = 8000, 2000
# The endings a file of each format must have: `cnnkit predict` and `load_checkpoint` recognise formats by them.
FORMATS = {"onnx": (".onnx",), "torchscript": (".pt", ".ts"), "safetensors": (".safetensors",)}  # cnnkit/export.py
# The endings of a file that holds a model: a checkpoint's (.pt, and .pth, which state dicts are often saved as)
# or an export's (FORMATS).
MODEL_SUFFIXES = tuple(dict.fromkeys((".pt", ".pth", *(end for ends in FORMATS.values() for end in ends))))
# Near-duplicates (cnnkit/data/checks.py), bits of 64, measured on CIFAR-10 (benchmarks/duplicate_threshold.py):
# within 6 bits lie 99% of copies brightened 1.2x and re-saved at JPEG quality 80 (94% within 4) and 95% of copies
# brightened 1.3x and saved at 70, while at most 0.35% of distinct photos had a different photo within 6 bits among
# 50,000 (1.3% within 8, 7% within 10). Hashes have 32 bits set, so distances are even: 6 and 7 are the same.
DEFAULT_THRESHOLD = 6


def is_model_file(path: str) -> bool:
    """Whether ``path`` ends as a checkpoint or an exported model does (MODEL_SUFFIXES), in any case (MODEL.PT is one):
    the test for "a model file was meant" where a name or data was expected, whether or not the file exists."""
    return path.lower().endswith(MODEL_SUFFIXES)


def is_format(path: str, format: str) -> bool:
    """Whether ``path`` ends as an export of ``format`` (a FORMATS key) does, in any case (model.ONNX is one)."""
    return path.lower().endswith(FORMATS[format])


def builtin_meant(name: str) -> str | None:
    """The built-in dataset that ``name``, a --data that is no folder, reads as in another spelling (``fashion-mnist``,
    ``FashionMNIST``, ``CIFAR10``, ``cifar-10``), or None. The names themselves stay exact: a folder may be called
    Mnist, so this only names the likely intent in an error."""
    import difflib
    import os

    if os.sep in name or (os.altsep and os.altsep in name):
        return None
    plain = [_plain(b) for b in BUILTIN]
    close = difflib.get_close_matches(_plain(name), plain, n=1, cutoff=0.6)
    return BUILTIN[plain.index(close[0])] if close else None


def _plain(name: str) -> str:
    return name.replace("-", "").replace("_", "").replace(" ", "").lower()
