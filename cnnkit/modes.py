"""Leaving a model as it was found: every module's train/eval flag and every BatchNorm's running statistics.

Inspection, evaluation and export run a model in eval mode, and a library that calls ``model.eval()`` and
then ``model.train()`` behind the user's back silently changes a model that mixed modes (BatchNorm layers
frozen in eval inside a network that trains) or one the user had put in eval mode. Every such entry point
runs inside ``preserve_modes`` (or ``eval_mode``, which is the same plus ``model.eval()``): afterwards each
module's ``training`` flag and each BatchNorm's ``running_mean``, ``running_var`` and ``num_batches_tracked``
are exactly what they were, also when the block raises.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


@contextlib.contextmanager
def preserve_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Record each module's ``training`` flag and each BatchNorm's buffers; put them back when the block ends."""
    modes = [(m, m.training) for m in model.modules()]
    # Copies, not references: a forward pass in training mode updates the buffers in place.
    stats = [(m, {k: v.detach().clone() for k, v in m.named_buffers(recurse=False)})
             for m in model.modules() if isinstance(m, _BatchNorm)]
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
        with torch.no_grad():
            for m, buffers in stats:
                for k, v in buffers.items():
                    getattr(m, k).copy_(v)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block (BatchNorm uses its running statistics, Dropout is off); afterwards
    modes and BatchNorm statistics are restored as by ``preserve_modes``."""
    with preserve_modes(model):
        model.eval()
        yield model
