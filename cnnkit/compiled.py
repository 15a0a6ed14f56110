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
import os
import platform
from typing import Callable

import torch

MIN_BATCHES = 2000
MIN_BATCHES_ALONE = 20000

# Compiled on first use (static shapes: each caller runs one shape); None once compiling has failed.
_compiled: dict[Callable, Callable] | None = {}
# Why compiling failed in this process, and whether a loop has run without its compiled version since the training
# run last took the warning that says so (``failure_warning``).
_failure: str | None = None
_unreported = False

# ATEN_CPU_CAPABILITY (PyTorch's variable: =avx2 runs an older CPU's vector code) holds ATen below what the CPU
# has, but torch.compile still builds its C++ with -march=native: ATen's vector headers then take their 512-bit
# form in the generated code while the code counts AVX2's 8 floats to a vector. The batch preparation with random
# crops crashed (segmentation fault) and the fused pools gave NaN losses on an AVX-512 CPU run with
# ATEN_CPU_CAPABILITY=avx2. Built for the capability's own instruction level, they agree.
MARCH_FOR_CAPABILITY = {"AVX2": "x86-64-v3", "DEFAULT": "x86-64"}


def build_for_aten_capability() -> None:
    """Have torch.compile build for ATen's vector capability where ATEN_CPU_CAPABILITY set it (x86 only), unless
    the user chose an instruction level (TORCHINDUCTOR_CPP_MARCH). Inductor's setting is the process's: with ATen
    held below the CPU, every torch.compile in the process needs it, the caller's own included."""
    if not os.environ.get("ATEN_CPU_CAPABILITY") or platform.machine().lower() not in ("x86_64", "amd64"):
        return
    from torch._inductor import config

    march = MARCH_FOR_CAPABILITY.get(torch.backends.cpu.get_cpu_capability())
    if config.cpp.march is None and march:
        config.cpp.march = march


class _NoCudaRuntimeNote(logging.Filter):
    """Drops PyTorch's "No CUDA runtime is found, using CUDA_HOME=..." (torch/utils/cpp_extension.py, logged when
    torch.compile's C++ code generation first imports it on a machine with a CUDA toolkit but no CUDA device): on
    a CPU run it is about nothing the run uses. Every other record of that logger passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


_NO_CUDA_RUNTIME_NOTE = _NoCudaRuntimeNote()


def quiet_cuda_home_note() -> None:
    """Silence PyTorch's CUDA_HOME note (``_NoCudaRuntimeNote``) in this process; call it before compiling on the
    CPU. Adding it again is a no-op. The note is logged only where CUDA is unavailable, so a CUDA run never
    loses anything to it."""
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NO_CUDA_RUNTIME_NOTE)


# A loop is built for one input shape and one thread count (torch.compile guards on torch's count): a model's
# fused layers of several shapes, times the counts that training may move between (cnnkit/threads.py), can pass
# torch.compile's default of 8 builds per function, which with fullgraph=True is an error, not a fallback.
BUILDS_PER_LOOP = 64


def allow_builds() -> None:
    """Let each compiled function keep at least ``BUILDS_PER_LOOP`` builds in this process."""
    import torch._dynamo.config as dynamo

    name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    if getattr(dynamo, name) < BUILDS_PER_LOOP:
        setattr(dynamo, name, BUILDS_PER_LOOP)


def available() -> bool:
    """Whether compiled loops can run: False once compiling has failed in this process (no C++ compiler). Asked
    by a caller about to run a loop, and only then: a False answer means the loop runs without its compiled
    version, which ``failure_warning`` reports."""
    global _unreported
    if _compiled is None:
        _unreported = True
    return _compiled is not None


def failure_warning() -> str | None:
    """The warning that compiling failed in this process (it names the loop and the error) where a loop has run
    without its compiled version since the last call, else None: a training run shows it in its log and keeps it
    in ``TrainResult.warnings`` (``cnnkit.errors.warn``), once. Every later run of the process that would use the
    loops runs without them too, and gets it again: compiling is not tried again in the process."""
    global _unreported
    unreported, _unreported = _unreported, False
    return _failure if unreported else None


def run(fn: Callable, *args, what: str):
    """``fn(*args)`` through its compiled loop; the same function run eagerly where compiling fails, with a
    warning (once a training run, ``failure_warning``) that names ``what``. One failure turns every compiled loop
    off for the process."""
    global _compiled, _failure, _unreported
    if _compiled is not None:
        try:
            if fn in _compiled:
                return _compiled[fn](*args)
            # The first call compiles. PyTorch's C++ extension helper, imported then, logs a note about CUDA on
            # machines without it: not ours to show.
            quiet_cuda_home_note()
            build_for_aten_capability()
            allow_builds()
            _compiled[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
            return _compiled[fn](*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the same result, computed eagerly
            _compiled = None
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _failure = (f"could not compile the {what} ({type(e).__name__}: {first_line}); compiled loops are off "
                        "in this process, and training goes on with PyTorch's operations, a little slower")
    _unreported = True
    return fn(*args)
