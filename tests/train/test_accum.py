"""Gradient accumulation: N batches of B are one step of N x B."""

import torch

import cnnkit
from cnnkit.data.loader import BatchLoader
from cnnkit.data.sources import DataSpec, load_splits
from cnnkit.train.loop import train_one_epoch
from cnnkit.train.optim import make_optimizer, make_scheduler

# No BatchNorm (its statistics depend on the batch) and no dropout (its masks on the random stream).
NO_BN = {"batchnorm": False, "widths": (8, 16)}


def one_epoch(batch_size, accum_steps, images=64):
    """One epoch over ``images`` training images (one step of 64, or four of 16, ...) from the same start."""
    torch.manual_seed(0)
    model = cnnkit.create_model("convnet", **NO_BN)
    train_set = load_splits(DataSpec("shapes", num_samples=128, val_split=0.25))[0].subset(torch.arange(images))
    loader = BatchLoader(train_set, batch_size, [0.5] * 3, [0.25] * 3, torch.device("cpu"), shuffle=True, seed=3)
    loader.set_epoch(1)
    optimizer = make_optimizer(model, "sgd", 0.1, 5e-4)
    scheduler = make_scheduler(optimizer, "constant", 10, 0)
    train_one_epoch(model, loader, optimizer, scheduler, torch.amp.GradScaler("cpu", enabled=False),
                    torch.nn.CrossEntropyLoss(), torch.device("cpu"), None, progress=False, accum_steps=accum_steps)
    return model.state_dict(), scheduler.last_epoch


def test_four_accumulated_batches_of_16_are_one_step_of_64():
    big, big_steps = one_epoch(64, 1)
    accumulated, accumulated_steps = one_epoch(16, 4)
    small, _ = one_epoch(16, 1)
    assert big_steps == accumulated_steps == 1  # the schedule counts optimizer steps
    for name in big:
        torch.testing.assert_close(accumulated[name], big[name], rtol=1e-5, atol=1e-6)
    assert not all(torch.allclose(small[n], big[n], atol=1e-4) for n in big)  # four real steps differ


def test_accumulation_in_a_whole_run_matches_the_larger_batch(tmp_path):
    common = dict(model="convnet", model_options=NO_BN, data="shapes", num_samples=256, val_split=0.25, epochs=2,
                  crop_pad=0, flip=False, precision="fp32", seed=5, progress=False)
    cnnkit.train(**common, batch_size=64, out=str(tmp_path / "big"))
    cnnkit.train(**common, batch_size=16, accum_steps=4, out=str(tmp_path / "accum"))
    big = torch.load(tmp_path / "big" / "last.pt", weights_only=True)["state_dict"]
    accum = torch.load(tmp_path / "accum" / "last.pt", weights_only=True)["state_dict"]
    for name in big:
        torch.testing.assert_close(accum[name], big[name], rtol=1e-5, atol=1e-6)
    lr = lambda run: [line.split(",")[1] for line in (tmp_path / run / "metrics.csv").read_text().splitlines()]  # noqa: E731
    assert lr("big") == lr("accum")  # the same schedule: it counts optimizer steps, not batches
