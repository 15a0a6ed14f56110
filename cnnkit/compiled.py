"""Small loops compiled by torch.compile for the CPU training step, and the same functions run eagerly where
compiling fails.

cnnkit compiles a few pure tensor functions, not models: the fused max-pool + ReLU of the training step
(``cnnkit/train/rewrite.py``) and the batch's crop, flip and normalisation (``cnnkit/data/augment.py``). Each
replaces several PyTorch operations, each a pass over memory and a dispatch, by one loop. The first loop a
process compiles costs seconds, most of it loading torch.compile itself (more on a machine's first compilation,
before torch.compile's disk cache holds the loops); each further one far less. So only runs long enough to repay
that use them: ``MIN_BATCHES`` batches for the pools, which save the most per step, and for the batch preparation
beside them; ``MIN_BATCHES_ALONE`` for the batch preparation alone, which saves less per batch. The measured
costs and savings are in docs/design.md ("Compiled loops").
"""

from __future__ import annotations

import logging
import warnings
from typing import Callable

import torch

MIN_BATCHES = 2000
MIN_BATCHES_ALONE = 20000

# Compiled on first use (static shapes: each caller runs one shape); None once compiling has failed.
_compiled: dict[Callable, Callable] | None = {}


def available() -> bool:
    """Whether compiled loops can run: False once compiling has failed in this process (no C++ compiler)."""
    return _compiled is not None


def run(fn: Callable, *args, what: str):
    """``fn(*args)`` through its compiled loop; the same function run eagerly where compiling fails, after a
    warning (once per process) that names ``what``. One failure turns every compiled loop off for the process."""
    global _compiled
    if _compiled is not None:
        try:
            if fn in _compiled:
                return _compiled[fn](*args)
            # The first call compiles. PyTorch's C++ extension helper, imported then, logs a warning about CUDA on
            # machines without it: not ours to show, so its logger is quiet for that call only.
            logger = logging.getLogger("torch.utils.cpp_extension")
            level = logger.level
            logger.setLevel(logging.ERROR)
            try:
                _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
                return _compiled[fn](*args)
            finally:
                logger.setLevel(level)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the same result, computed eagerly
            _compiled = None
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            warnings.warn(f"cnnkit: could not compile the {what} ({type(e).__name__}: {first_line}); compiled "
                          "loops are off in this process, and training goes on with PyTorch's operations, a little "
                          "slower")
    return fn(*args)
