import torch

from cnnkit.data.shapes import SHAPE_CLASSES, make_shapes


def test_deterministic_by_seed_and_balanced():
    a, la = make_shapes(200, 24, 3, seed=5)
    b, lb = make_shapes(200, 24, 3, seed=5)
    c, _ = make_shapes(200, 24, 3, seed=6)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.shape == (200, 3, 24, 24) and a.dtype == torch.uint8
    assert torch.bincount(la, minlength=len(SHAPE_CLASSES)).tolist() == [20] * 10


def test_any_size_and_grayscale():
    x, _ = make_shapes(20, 64, 1, seed=0)
    assert x.shape == (20, 1, 64, 64)
    assert x.float().std() > 10


def test_shapes_vary_in_position():
    # The foreground's centre of mass moves from image to image: what makes a CNN necessary.
    x, y = make_shapes(400, 32, 3, seed=0)
    bg = x.float().mean(1)
    centers = []
    for img in bg[y == 0][:20]:
        w = (img - img.median()).abs()
        w = w / w.sum()
        centers.append((w.sum(0) * torch.arange(32)).sum().item())
    assert max(centers) - min(centers) > 6
