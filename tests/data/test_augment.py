"""Batched augmentation does what the per-image transforms it replaces do."""

import torch
import torch.nn.functional as F

from cnnkit.data.augment import alternating_flips, coin_flips, crop, crop_offsets, cutout, flip_bits, mirror
from cnnkit.data.loader import Augment, BatchLoader
from cnnkit.data.sources import ImageSet


def _images(n=16, c=3, h=12, w=10):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8)


def test_random_crop_is_each_image_shifted_by_its_own_offset_with_zero_fill():
    images, pad = _images(), 3
    out = crop(images, pad, crop_offsets(len(images), pad, torch.Generator().manual_seed(5)))
    shifts = torch.randint(0, 2 * pad + 1, (2, len(images)), generator=torch.Generator().manual_seed(5))
    padded = F.pad(images, (pad,) * 4)
    h, w = images.shape[-2:]
    for i in range(len(images)):
        dy, dx = shifts[:, i].tolist()
        assert torch.equal(out[i], padded[i, :, dy : dy + h, dx : dx + w])
    assert len({tuple(s) for s in shifts.T.tolist()}) > 1  # the offsets really differ between images


def test_random_flip_mirrors_some_images_and_keeps_the_others():
    images = _images(64)
    out = mirror(images, coin_flips(len(images), torch.Generator().manual_seed(0)))
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept)) and 10 < sum(flipped) < 54


def test_alternating_flip_shows_every_image_both_ways_over_two_epochs():
    images = _images(32)
    bits = flip_bits(32, seed=0)
    index = torch.arange(32)
    even, odd = (mirror(images, alternating_flips(bits[index], epoch)) for epoch in (0, 1))
    for i in range(32):
        assert torch.equal(even[i], images[i]) != torch.equal(odd[i], images[i])  # exactly one epoch mirrors it
        assert torch.equal(even[i], odd[i].flip(-1))
    assert torch.equal(mirror(images, alternating_flips(bits, 2)), even)  # the pattern repeats every two epochs


def test_cutout_zeroes_one_square_per_image():
    images = torch.full((50, 3, 16, 16), 7, dtype=torch.uint8)
    out = cutout(images, 4, torch.Generator().manual_seed(1))
    zeros = (out[:, 0] == 0).sum(dim=(1, 2))
    assert (zeros <= 16).all() and (zeros == 16).sum() > 20  # squares clipped at the border hold fewer
    assert ((out == 0) | (out == 7)).all() and (out[:, 0] == out[:, 1]).all()  # the same square in every channel


def test_loader_with_alternating_flip_is_reproducible_per_epoch():
    data = ImageSet(labels=torch.arange(40) % 4, classes=list("abcd"), images=_images(40, h=8, w=8), size=8)
    loader = BatchLoader(data, 8, [0.5] * 3, [0.25] * 3, torch.device("cpu"), shuffle=True, seed=3,
                         augment=Augment(crop_pad=1, flip=True, alternate_flip=True, cutout=2))
    loader.set_epoch(4)
    first = [x for x, _ in loader]
    second = [x for x, _ in loader.batches(2)]
    assert all(torch.equal(a, b) for a, b in zip(first[2:], second))  # a resumed epoch sees the same batches


def test_policies_change_images_reproducibly_per_seed():
    from cnnkit.data.augment import policy_augment

    images = _images(8, h=32, w=32)
    for policy, erasing in (("randaugment", 0.0), ("trivialaugment", 0.0), (None, 1.0)):
        a = policy_augment(images, policy, erasing, torch.Generator().manual_seed(0))
        b = policy_augment(images, policy, erasing, torch.Generator().manual_seed(0))
        assert a.dtype == torch.uint8 and a.shape == images.shape
        assert torch.equal(a, b)  # the same seed, the same augmentation: resumed runs stay exact
        assert sum(not torch.equal(x, y) for x, y in zip(a, images)) >= 4, policy  # most images really change


def test_batches_are_the_images_normalised_per_channel_in_the_asked_memory_format():
    images = _images(8, 3, 6, 5)
    data = ImageSet(labels=torch.arange(8) % 2, classes=["a", "b"], images=images, size=6)
    mean, std = [0.2, 0.5, 0.7], [0.1, 0.3, 0.25]
    expected = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    for channels_last in (True, False):
        loader = BatchLoader(data, 8, mean, std, torch.device("cpu"), channels_last=channels_last)
        (x, y), = list(loader)
        assert x.dtype == torch.float32 and torch.equal(y, data.labels)
        assert torch.allclose(x, expected, atol=1e-5)
        assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert images.dtype == torch.uint8 and torch.equal(images, data.images)  # the cache itself is left as it was


def test_fused_crop_flip_normalisation_gives_the_batches_of_the_steps_one_by_one():
    # The compiled loop must reproduce the separate steps bit for bit, from the same draws: random and
    # alternating flips, no flip, odd sizes and a pad wider than a quarter of the image, both memory formats.
    data = ImageSet(labels=torch.arange(48) % 4, classes=list("abcd"), images=_images(48, h=7, w=9), size=7)
    cases = [dict(crop_pad=2, flip=True), dict(crop_pad=3, flip=True, alternate_flip=True), dict(crop_pad=1)]
    for augment, channels_last in zip(cases, (True, False, True)):
        batches = {}
        for fused in (False, True):
            loader = BatchLoader(data, 16, [0.2, 0.5, 0.7], [0.1, 0.3, 0.25], torch.device("cpu"), shuffle=True,
                                 seed=1, augment=Augment(**augment), channels_last=channels_last)
            loader.fused = fused
            loader.set_epoch(3)
            batches[fused] = [x for x, _ in loader]
        for plain, fused in zip(batches[False], batches[True]):
            assert torch.equal(plain, fused), augment
            assert fused.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    from cnnkit import compiled
    from cnnkit.data.augment import _crop_flip_normalize

    assert compiled._compiled and _crop_flip_normalize in compiled._compiled  # the fused loop ran, not the fallback


def test_compiled_loops_follow_a_lowered_aten_capability():
    # ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU: torch.compile's C++ built for -march=native crashed in the fused
    # crop (segmentation fault) and gave the fused pools NaNs. cnnkit builds for the capability instead; the run
    # is a fresh process, since the capability is read when torch loads.
    import os
    import subprocess
    import sys

    import pytest

    with open("/proc/cpuinfo") as f:
        if "avx512f" not in f.read().split():
            pytest.skip("needs a CPU with AVX-512 to lower its capability to AVX2")
    code = """
import torch
from cnnkit import compiled
from cnnkit.data.loader import Augment, BatchLoader
from cnnkit.data.sources import ImageSet
from cnnkit.data.augment import _crop_flip_normalize
assert torch.backends.cpu.get_cpu_capability() == "AVX2"
data = ImageSet(labels=torch.arange(256) % 4, classes=list("abcd"),
                images=torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)), size=32)
batches = {}
for fused in (False, True):
    loader = BatchLoader(data, 64, [0.2, 0.5, 0.7], [0.1, 0.3, 0.25], torch.device("cpu"), shuffle=True, seed=1,
                         augment=Augment(crop_pad=4, flip=True), channels_last=True)
    loader.fused = fused
    batches[fused] = [x for x, _ in loader]
assert compiled._compiled and _crop_flip_normalize in compiled._compiled
assert all(torch.equal(a, b) for a, b in zip(batches[False], batches[True]))
from torch._inductor import config
print("same", config.cpp.march)
"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CPP_MARCH"}
    env["ATEN_CPU_CAPABILITY"] = "avx2"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "same x86-64-v3" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
    # A level the user chose stays theirs.
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "TORCHINDUCTOR_CPP_MARCH": "haswell"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "same haswell" in proc.stdout, (proc.returncode, proc.stderr[-2000:])


def test_train_compile_builds_for_a_lowered_aten_capability():
    # --compile compiles the model itself, not through cnnkit's compiled loops: it must build for ATen's level too.
    import os
    import subprocess
    import sys

    import pytest

    with open("/proc/cpuinfo") as f:
        if "avx512f" not in f.read().split():
            pytest.skip("needs a CPU with AVX-512 to lower its capability to AVX2")
    code = ("from cnnkit.train.config import TrainConfig\n"
            "from cnnkit.train.setup import start_machine\n"
            "from torch._inductor import config\n"
            "start_machine(TrainConfig(compile=True, device='cpu'))\n"
            "print('march', config.cpp.march)\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CPP_MARCH"}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "ATEN_CPU_CAPABILITY": "avx2"},
                          capture_output=True, text=True, timeout=120)
    assert "march x86-64-v3" in proc.stdout, proc.stderr[-2000:]
