import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cnnkit.data.shapes import SHAPE_CLASSES, make_shapes


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    # Tests never read or write the user's cache.
    os.environ["CNNKIT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["CNNKIT_DATA"] = str(tmp_path_factory.mktemp("datasets"))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


def run_cli(*args, cwd=None, env=None):
    """The real `cnnkit` command in a subprocess."""
    return subprocess.run([sys.executable, "-m", "cnnkit", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=600)


class _CreatesFileWhenUnpickled:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def write_malicious_checkpoint(folder, name="evil.pt"):
    """A checkpoint whose unpickling would create the file ``folder/pwned``; returns (path, marker)."""
    marker = folder / "pwned"
    path = folder / name
    torch.save({"cnnkit_checkpoint": 1, "model": _CreatesFileWhenUnpickled(marker)}, path)
    return path, marker
