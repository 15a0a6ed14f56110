import os

# `make test` runs the tests in two processes (pytest-xdist, `-n 2` in the Makefile). Each computes with one
# thread, and so do the commands the tests start (OMP_NUM_THREADS is cnnkit's default --threads where set): two
# processes of two threads each on a 2-core machine wait for each other's time slices at every parallel
# operation, and a training test ran 7x slower so. Set before torch is imported; the tests of the default thread
# count take OMP_NUM_THREADS out of their commands' environment themselves.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image

from cnnkit.data.shapes import SHAPE_CLASSES, make_shapes
from tests import preloaded


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Tests never read or write the user's cache.
    os.environ["CNNKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["CNNKIT_DATA"] = str(tmp_path_factory.mktemp("datasets"))
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))


def write_image_folder(root, n_per_class=8, size=16, classes=4, seed=0):
    """A real ImageFolder tree of PNG files drawn from the shapes generator."""
    images, labels = make_shapes(n_per_class * classes * 3, size, 3, seed)
    counts = {}
    for img, lab in zip(images, labels.tolist()):
        if lab >= classes or counts.get(lab, 0) >= n_per_class:
            continue
        counts[lab] = counts.get(lab, 0) + 1
        folder = os.path.join(root, SHAPE_CLASSES[lab])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{counts[lab]:03d}.png"))
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(str(tmp_path / "images"))


_PRELOADED = preloaded.Server()


def run_cli(*args, cwd=None, env=None):
    """The real `cnnkit` command in its own process (forked from one that has imported torch: tests/preloaded.py)."""
    return _PRELOADED.run(list(map(str, args)), cwd=cwd, env=env)


class _CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_idx(folder, prefix, images, labels):
    """MNIST's raw files (``prefix``-images/labels-idx*-ubyte) of 28x28 uint8 ``images`` and their ``labels`` in
    ``folder``: what torchvision's MNIST reads, written here since the tests cannot download it."""
    import struct

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
        f.write(struct.pack(">IIII", 0x803, len(images), 28, 28) + images.tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
        f.write(struct.pack(">II", 0x801, len(labels)) + labels.tobytes())


def write_malicious_checkpoint(folder, name="evil.pt"):
    """A checkpoint whose unpickling would create the file ``folder/pwned``; returns (path, marker)."""
    marker = folder / "pwned"
    path = folder / name
    torch.save({"cnnkit_checkpoint": 1, "model": _CreatesFileWhenUnpickled(marker)}, path)
    return path, marker
