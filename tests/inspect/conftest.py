import pytest
from PIL import Image

import cnnkit
from cnnkit.data.shapes import SHAPE_CLASSES, make_shapes


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A real run folder: simple_cnn trained for one epoch on 256 generated shapes images."""
    out = tmp_path_factory.mktemp("inspect") / "run"
    cnnkit.train(data="shapes", num_samples=256, epochs=1, progress=False, out=str(out))
    return str(out)


@pytest.fixture(scope="session")
def shape_image(tmp_path_factory):
    """A 32x32 PNG of a star from the shapes generator."""
    images, labels = make_shapes(20, 32, 3, seed=7)
    index = labels.tolist().index(SHAPE_CLASSES.index("star"))
    path = tmp_path_factory.mktemp("images") / "star.png"
    Image.fromarray(images[index].permute(1, 2, 0).numpy()).save(path)
    return str(path)


def assert_picture(path, size=None, body=None):
    """The PNG exists, has the expected (width, height) — or a picture of ``body`` (width, height) under a
    one-line title, which may be wider than the picture — and is not blank or constant."""
    import numpy as np

    with Image.open(path) as img:
        assert img.format == "PNG"
        if size is not None:
            assert img.size == tuple(size)
        if body is not None:
            assert img.height == body[1] + 18 and img.width >= body[0], img.size
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    below_title = pixels[40:]
    assert below_title.std() > 10, f"{path} is (nearly) constant"
    assert len(np.unique(below_title.reshape(-1, 3), axis=0)) > 16, f"{path} has almost no distinct colours"
