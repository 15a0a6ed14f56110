"""Number formats: bf16 autocast where the CPU has bf16 matrix instructions, fp16/bf16 on CUDA, fp32 elsewhere."""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from cnnkit.choices import PRECISIONS
from cnnkit.errors import UserError


# oneDNN's instruction-set names below the first with bf16 dot products (AVX512_CORE_BF16): a cap at one of them
# (ONEDNN_MAX_CPU_ISA, or DNNL_MAX_CPU_ISA) makes oneDNN emulate bf16, many times slower than fp32.
_ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices natively (AVX512_BF16 or AMX), so bf16 is faster than fp32,
    and the process may use those instructions: neither oneDNN (where the convolutions and bf16 matrix products
    run) nor ATen's vector code is capped below them (``ONEDNN_MAX_CPU_ISA=AVX2``, ``ATEN_CPU_CAPABILITY=avx2``
    make a bf16 CPU run the kernels of an AVX2-only one, bf16 emulated)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    if not any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16")):
        return False
    return (onednn_isa_cap() not in _ONEDNN_ISAS_WITHOUT_BF16
            and torch.backends.cpu.get_cpu_capability() not in ("DEFAULT", "NO AVX", "AVX2"))


def onednn_isa_cap() -> str | None:
    """The instruction set oneDNN is capped to (upper case, as ``ONEDNN_MAX_CPU_ISA`` or the older
    ``DNNL_MAX_CPU_ISA`` names it, the first taking precedence as in oneDNN), or None when it is not capped."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip()
        if value:
            return value.upper()
    return None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device '{device}'; use auto, cpu or cuda") from None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device.type == "cpu" and cpu_has_bf16() else None
    if precision == "fp16" and device.type == "cpu":
        raise UserError("--precision fp16 is for CUDA; on a CPU use bf16 or fp32")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass (weights and optimizer stay fp32), or nothing for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
