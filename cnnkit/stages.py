"""The staged schedule of ``--stages``: which modules train, for how many epochs, at which rate, stage by stage.

Read here, without torch, so that ``cnnkit runs`` (which must not load it) reads a staged run's plan with the same
parser that ``train`` uses; cnnkit/transfer.py plans and applies the stages.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from cnnkit.errors import UserError

SMOKE_EPOCHS = 2  # --smoke: the epochs of a run of one stage (a staged one trains each of its stages 1 epoch)


@dataclass
class Stage:
    """One phase of a staged schedule: which modules train, for how many epochs, at which peak learning rate."""

    modules: list[str] | None  # None: everything
    epochs: int
    lr: float


def parse_stages(text: str) -> list[Stage]:
    """``"fc:3@1e-3,layer4+fc:5@1e-4"``: stages separated by commas, each ``MODULES:EPOCHS@LR`` with
    module names joined by ``+`` (``head`` and ``all`` allowed)."""
    stages = []
    for part in text.split(","):
        try:
            modules, rest = part.strip().split(":")
            epochs, lr = rest.split("@")
            stage = Stage(modules=[m.strip() for m in modules.split("+")], epochs=int(epochs), lr=float(lr))
        except ValueError:
            raise UserError(f"--stages: cannot read '{part}'; write MODULES:EPOCHS@LR, e.g. "
                            "'fc:3@1e-3,layer4+fc:5@1e-4'") from None
        if "" in stage.modules:  # an empty name is the whole model to named_modules(): everything would train
            raise UserError(f"--stages: '{part.strip()}' has an empty module name; name each module to train, "
                            "joined by '+' (e.g. 'layer4+fc'), or 'all' for the whole model")
        if stage.epochs < 1 or not 0 < stage.lr < math.inf:
            raise UserError(f"--stages: '{part}' needs at least one epoch and a positive, finite learning rate")
        stages.append(stage)
    return stages


def smoke_epochs(epochs: int, stages: int) -> int:
    """The epochs a --smoke run trains of a stage planned for ``epochs``, in a run of ``stages`` stages: at most
    SMOKE_EPOCHS alone, 1 each of several."""
    return min(epochs, SMOKE_EPOCHS if stages == 1 else 1)


def smoke_stages(stages: list[Stage]) -> list[Stage]:
    """The stages a --smoke run trains: ``stages`` cut short (``smoke_epochs``); the run's records, and the
    report and `cnnkit runs` of one stopped before its end, count them so."""
    return [dataclasses.replace(s, epochs=smoke_epochs(s.epochs, len(stages))) for s in stages]
