"""Mixup and CutMix: what a mixed batch holds, and that training sees it."""

import csv

import torch

import cnnkit
from cnnkit.train.mix import Mix

TINY = dict(data="shapes", num_samples=128, val_split=0.25, batch_size=32, model="cnn_bn",
            precision="fp32", progress=False)


def constant_batch(n=8, classes=8):
    """Image i is filled with the value i and labelled i: every pixel says which image it came from."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 16, 16).contiguous()
    return images, torch.arange(n) % classes


def test_mixup_blends_images_and_targets_by_the_same_lam():
    images, labels = constant_batch()
    mixed, targets = Mix(8, mixup=0.4)(images, labels, seed=5)
    assert torch.allclose(targets.sum(1), torch.ones(8))
    for i in range(8):  # labels are the image numbers: target i names the two images blended, and how much
        value = sum(share * j for j, share in enumerate(targets[i].tolist()))  # lam * i + (1 - lam) * partner
        assert torch.allclose(mixed[i], torch.full_like(mixed[i], value), atol=1e-5)
    assert not torch.equal(mixed, images)  # a no-op would leave the batch as it was


def test_cutmix_pastes_a_box_whose_area_matches_the_target_share():
    images, labels = constant_batch()
    mixed, targets = Mix(8, cutmix=1.0)(images, labels, seed=3)
    pasted = (mixed != images).float().mean(dim=(1, 2, 3))  # share of pixels taken from the partner
    lam = torch.stack([targets[i, labels[i]] for i in range(8)])
    moved = pasted > 0
    assert moved.any()  # a no-op would paste nothing
    assert torch.allclose(1 - lam[moved], pasted[moved], atol=1e-6)
    for i in moved.nonzero().flatten().tolist():  # the pasted pixels come from the partner the target names
        partner = [j for j in targets[i].nonzero().flatten().tolist() if j != i]
        assert mixed[i][mixed[i] != i].unique().tolist() == [float(partner[0])]


def test_the_mix_depends_only_on_the_batch_seed():
    images, labels = constant_batch()
    mix = Mix(8, mixup=0.2, cutmix=1.0)
    a, b = mix(images, labels, seed=11), mix(images, labels, seed=11)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    draws = {tuple(mix(images, labels, seed=s)[1][:, 0].tolist()) for s in range(6)}
    assert len(draws) > 1


def test_training_mixes_batches_and_stops_mixing_for_the_last_epochs(tmp_path):
    runs = {"plain": {}, "mixed": dict(mixup=0.4, cutmix=1.0), "off": dict(mixup=0.4, cutmix=1.0, mix_off_epochs=1)}
    for name, options in runs.items():
        cnnkit.train(**TINY, epochs=2, seed=1, **options, out=str(tmp_path / name))
    steps = {name: [(int(r["epoch"]), float(r["loss"])) for r in csv.DictReader(open(tmp_path / name / "steps.csv"))]
             for name in runs}
    epoch = lambda name, e: [loss for ep, loss in steps[name] if ep == e]  # noqa: E731
    # The first step starts from the same weights: its loss differs only because the batch was mixed.
    assert epoch("plain", 1)[0] != epoch("mixed", 1)[0]
    # --mix-off-epochs 1: the same mixed first epoch, then plain batches where "mixed" goes on mixing.
    assert epoch("off", 1) == epoch("mixed", 1)
    assert epoch("off", 2) != epoch("mixed", 2)
