"""Weight EMA: an exponential moving average of the weights and BatchNorm statistics, kept beside the model.

After every optimizer step, ``ema = decay * ema + (1 - decay) * weights``. The average of the last
~1 / (1 - decay) steps usually generalises better than the last weights (timm's ModelEma, Polyak averaging).
BatchNorm's running mean and variance are averaged the same way, so the averaged network is evaluated with
statistics that match its averaged weights (no extra pass over the data, unlike SWA's ``update_bn``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn


class WeightEMA:
    """The moving average of ``model``'s parameters and buffers; ``module`` is a full model to evaluate or save."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.updates = 0  # optimizer steps averaged so far
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights (call after each optimizer step)."""
        pairs = list(zip(self._tensors(self.module), self._tensors(model), strict=True))
        floats = [(e, m) for e, m in pairs if e.is_floating_point()]
        # One fused kernel for all tensors (what torch.optim.swa_utils.get_ema_multi_avg_fn uses).
        torch._foreach_lerp_([e for e, _ in floats], [m for _, m in floats], 1.0 - self.decay)
        for e, m in pairs:
            if not e.is_floating_point():  # counters such as BatchNorm's num_batches_tracked: copied
                e.copy_(m)
        self.updates += 1

    @staticmethod
    def _tensors(model: nn.Module) -> list[torch.Tensor]:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        return [*model.parameters(), *model.buffers()]

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "state_dict": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["state_dict"])
        self.updates = state["updates"]
