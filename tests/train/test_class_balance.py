"""Class weights and the balanced sampler on imbalanced data."""

import io
import json
import os

import pytest
import torch

import cnnkit
from cnnkit.data.loader import BatchLoader
from cnnkit.data.sources import ImageSet
from cnnkit.errors import UserError
from tests.conftest import write_image_folder

TINY = dict(epochs=1, batch_size=8, progress=False, precision="fp32", val_split=0.25)


@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    folder = write_image_folder(str(tmp_path_factory.mktemp("balance") / "images"), n_per_class=12, size=16)
    for name in sorted(os.listdir(os.path.join(folder, "circle")))[:8]:  # circle keeps 4 of 12
        os.unlink(os.path.join(folder, "circle", name))
    return folder


def test_class_weights_auto_weighs_the_loss_and_is_recorded(imbalanced, tmp_path):
    plain_log, weighted_log = io.StringIO(), io.StringIO()
    cnnkit.train(data=imbalanced, out=str(tmp_path / "plain"), log=plain_log, **TINY)
    cnnkit.train(data=imbalanced, out=str(tmp_path / "weighted"), class_weights="auto", log=weighted_log, **TINY)
    recorded = json.loads((tmp_path / "weighted" / "class_weights.json").read_text())
    assert recorded["classes"] == ["circle", "square", "star", "triangle"] and recorded["counts"] == [3, 9, 9, 9]
    assert recorded["weights"] == pytest.approx([30 / (4 * 3)] + [30 / (4 * 9)] * 3)
    assert not (tmp_path / "plain" / "class_weights.json").exists()
    # Same seed, same batches: only the loss weighting differs, so the weights must too.
    a = torch.load(tmp_path / "plain" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "weighted" / "last.pt", weights_only=True)["state_dict"]
    assert any(not torch.equal(a[k], b[k]) for k in a)
    # The check before training suggests the remedy, and stays quiet once it is applied.
    assert "imbalanced" in plain_log.getvalue() and "--class-weights auto" in plain_log.getvalue()
    assert "imbalanced" not in weighted_log.getvalue()


def test_balanced_sampler_draws_classes_equally_and_reproducibly():
    labels = torch.tensor([0] * 180 + [1] * 20)
    data = ImageSet(labels, ["common", "rare"], torch.zeros(200, 1, 4, 4, dtype=torch.uint8), channels=1, size=4)
    loader = BatchLoader(data, 20, [0.5], [0.25], torch.device("cpu"), shuffle=True, seed=3, balanced=True)
    loader.set_epoch(1)
    order = loader.order()
    assert len(order) == 200 and 0.4 < (labels[order] == 1).float().mean() < 0.6  # plain shuffling: 0.1
    again = BatchLoader(data, 20, [0.5], [0.25], torch.device("cpu"), shuffle=True, seed=3, balanced=True)
    again.set_epoch(1)
    assert torch.equal(order, again.order())  # a function of (seed, epoch): a resumed epoch draws the same batches
    again.set_epoch(2)
    assert not torch.equal(order, again.order())
    batches = [y for _, y in loader.batches(start=4)]
    assert torch.equal(torch.cat(batches), labels[order[4 * 20:]])


def test_balanced_sampler_trains(imbalanced, tmp_path):
    r = cnnkit.train(data=imbalanced, out=str(tmp_path / "run"), balanced_sampler=True, **TINY)
    assert r.epochs == 1 and json.loads((tmp_path / "run" / "config.json").read_text())["balanced_sampler"]


def test_unknown_class_weights_is_a_user_error():
    with pytest.raises(UserError, match="--class-weights"):
        cnnkit.train(class_weights="inverse")
