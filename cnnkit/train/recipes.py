"""Recipes: named sets of training options, applied under whatever the user sets explicitly.

``fast`` is tuned for time-to-accuracy on small images (CIFAR-sized, 32x32), after airbench94_muon
(Jordan 2024, arXiv 2404.00498): its network (``fastnet``), the Muon optimizer for the filters, a short
linear decay, strong label smoothing, alternating flips and test-time augmentation at the end.
"""

from __future__ import annotations

from typing import Any

from cnnkit.errors import UserError

RECIPES: dict[str, dict[str, Any]] = {
    "fast": {
        "model": "fastnet",
        "optimizer": "muon",
        "lr": 0.24,  # the filters' rate; biases and head get theirs from it (see optim._muon)
        # Few large steps suit Muon's orthogonalised updates, but not a CPU's caches: fastnet's training step
        # slowed down markedly at airbench's 2000 and not at 1000 or below, and 500 or a 9th epoch did not reach
        # a better accuracy in the time (docs/design.md, "The fast recipe", has the runs).
        "batch_size": 1000,
        "weight_decay": 2e-6,  # per example; the SGD groups decay by weight_decay * batch_size per step
        "schedule": "linear",  # from the peak straight down to zero; no warm-up needed with Muon
        "epochs": 8,
        "label_smoothing": 0.2,  # a short run overfits the training labels' confidence quickly
        "crop_pad": 2,  # 32x32 images: translations of 2 pixels keep the objects in view
        "flip": True,
        "alternate_flip": True,
        "tta": True,  # the final validation averages mirrored and shifted views
    },
}


# `--overfit-batches N` checks that the model and the pipeline can memorise N batches, so its defaults take away
# what works against memorising or wastes the few steps: weight decay, label smoothing, a warm-up and a decaying
# schedule (augmentation and mixing are off in any case), and give it enough steps. On 2 batches of the shapes
# data (128 images, 10 classes) simple_cnn reached, in eval mode on those images: 0.13 with the general defaults
# (SGD, onecycle, 10 epochs); 0.72 with SGD at a constant rate without weight decay over 30 epochs; with AdamW at
# its default 2e-3, constant, no weight decay: 0.34 after 10 epochs, 0.75 after 20, 1.0 at 36 and 0.99 at 40
# (dropout makes the last epochs noisy), so 60 leave a margin: a ceiling, since the run stops at the first epoch
# that gets every image right.
OVERFIT_OPTIONS: dict[str, Any] = {
    "optimizer": "adamw",
    "schedule": "constant",
    "weight_decay": 0.0,
    "label_smoothing": 0.0,
    "epochs": 60,
}


def recipe_options(name: str | None, overfit_batches: int = 0) -> dict[str, Any]:
    """The options of recipe ``name`` (empty for None), under those of ``--overfit-batches`` when it is set."""
    if name is not None and name not in RECIPES:
        raise UserError(f"unknown recipe '{name}'; recipes: {', '.join(RECIPES)}")
    return {**RECIPES.get(name, {}), **(OVERFIT_OPTIONS if overfit_batches else {})}
