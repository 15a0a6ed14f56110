"""Export a checkpoint for deployment (ONNX, TorchScript, safetensors) and check that the copy computes what
the PyTorch model computes.

Every export takes the same input as the PyTorch model: a float batch N x C x H x W of images resized and
centre-cropped to the input size, then normalised per channel, ``(pixel / 255 - mean) / std``. Normalisation
is deliberately not baked into the graph: the export stays a faithful copy of the checkpoint's model, verify
compares like with like, and the class names, input size, channels, mean and std travel in the file's metadata
(ONNX ``metadata_props``, safetensors metadata, TorchScript extra files), each as JSON text under its name.
``cnnkit predict model.onnx`` prepares images from that metadata through the same code as for a checkpoint.

The model is exported in eval mode whatever mode it was left in (BatchNorm uses its running statistics,
dropout is off), and afterwards every module is back in the mode it was in, with its BatchNorm statistics.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

from cnnkit.atomic import atomic_path, move_into_place, out_not_writable
from cnnkit.choices import FORMATS, is_format
from cnnkit.data.images import load_first_images, path_list
from cnnkit.errors import UserError
from cnnkit.modes import eval_mode
from cnnkit.metadata import payload_metadata
from cnnkit.runtime import OnnxModel
from cnnkit.checkpoint import Checkpoint, load_checkpoint, make_payload

# The largest |exported - PyTorch| logit difference accepted, per unit of the largest |logit| (at least 1): fp32
# rounding differs between runtimes by about 1e-7 of a value, and an untrained or diverging model's logits can be
# in the millions, where an absolute bound would fail a correct file.
TOLERANCE = 1e-4
# Tracing happens at batch 2 (torch.export specialises a batch of 1); checking 1 and an odd 7 catches a batch
# size frozen into the graph.
EXAMPLE_BATCH = 2
VERIFY_BATCH_SIZES = (1, 7)
VERIFY_MAX_IMAGES = 64
INSTALL_HINT = "pip install 'cnnkit[export]'"
# torch.jit is deprecated in favour of torch.export, but TorchScript is still what libtorch (C++) deployments load.
_JIT_DEPRECATED = r"`torch\.jit\.\w+` is deprecated"


@dataclass
class VerifyCheck:
    """One comparison of the exported model with the PyTorch model (in eval mode) on the same input."""

    inputs: str  # "random" (standard normal) or "images" (the files given, prepared as predict prepares them)
    batch_size: int
    max_abs_diff: float  # the largest |exported - PyTorch| over every logit of the batch
    max_abs_logit: float  # the largest |PyTorch logit|: fp32 rounding grows with it (about 1e-7 of it)

    def allowed(self, tolerance: float) -> float:
        """The largest difference accepted on this check: ``tolerance`` times the largest |logit|, at least 1."""
        return tolerance * max(1.0, self.max_abs_logit)


@dataclass
class ExportResult:
    path: str
    format: str
    checkpoint: str
    model: str  # the registered model name
    size_bytes: int
    export_time_s: float
    checks: list[VerifyCheck] = field(default_factory=list)  # empty unless verified
    max_abs_diff: float | None = None  # the largest over ``checks``
    tolerance: float = TOLERANCE  # per unit of the largest |logit| (VerifyCheck.allowed)
    verified: bool | None = None  # None when not verified, else whether every check is within what it allows
    warnings: list[str] = field(default_factory=list)  # broken images of --verify-images passed over


def _require(*packages: str, purpose: str) -> None:
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"{purpose} needs the optional package {name}, which is not installed: "
                            f"{INSTALL_HINT}") from None


def _write_onnx(model: nn.Module, metadata: dict[str, str], example: torch.Tensor, path: str) -> None:
    # The dynamo exporter (torch.export + onnxscript) is torch 2.14's default; the TorchScript-based one still
    # runs with dynamo=False but warns that it will be removed.
    program = torch.onnx.export(
        model, (example,), None, dynamo=True, input_names=["input"], output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
    )
    program.model.metadata_props.update(metadata)
    program.save(path, external_data=False)


def _write_torchscript(model: nn.Module, metadata: dict[str, str], example: torch.Tensor, path: str) -> None:
    # Tracing, not scripting: every registered model is a plain feed-forward graph, and tracing works for all.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED)
        traced = torch.jit.trace(model, example)
        torch.jit.save(traced, path, _extra_files=metadata)


def _write_safetensors(model: nn.Module, metadata: dict[str, str], example: torch.Tensor, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path, metadata=metadata)


def _load_torchscript(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_JIT_DEPRECATED)
        return torch.jit.load(path, map_location="cpu")


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors}
# Each reads an export back as a function of a CPU batch, to compare with the PyTorch model.
_READERS: dict[str, Callable[[str], Callable[[torch.Tensor], torch.Tensor]]] = {
    "onnx": OnnxModel, "torchscript": _load_torchscript, "safetensors": lambda path: load_checkpoint(path).model,
}


@contextlib.contextmanager
def _output_file(out: str) -> Iterator[str]:
    """``atomic_path(out)``: a failed export leaves no half-written file, and the export gets an ordinary file's
    permissions; a UserError when the folder cannot be written."""
    with contextlib.ExitStack() as stack:
        try:
            tmp = stack.enter_context(atomic_path(out))
        except OSError as e:
            raise out_not_writable(out, e) from None
        yield tmp


def _check_out(out: str, format: str, source: str) -> None:
    endings = FORMATS[format]
    if os.path.isdir(out):
        raise UserError(f"--out {out} is a folder; give a file path such as {os.path.join(out, 'model' + endings[0])}")
    if not is_format(out, format):
        raise UserError(f"--out {out}: {format} exports must end in {' or '.join(endings)}, "
                        "which is how cnnkit recognises them")
    if os.path.exists(out) and os.path.exists(source) and os.path.samefile(out, source):
        raise UserError(f"--out {out} is the checkpoint being exported; choose another path")


def _verify_inputs(ckpt: Checkpoint, images: list[str] | None) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """The batches verify compares on: random ones at ``VERIFY_BATCH_SIZES``, then the first 64 of ``images`` that
    decode; and the warning, if any, that broken images in their folders were passed over. Made before the export
    is written, so a missing image, or none that decodes, fails the command without replacing a file already at
    ``--out``."""
    generator = torch.Generator().manual_seed(0)
    size = (ckpt.channels, ckpt.input_size, ckpt.input_size)
    inputs = [("random", torch.randn(n, *size, generator=generator)) for n in VERIFY_BATCH_SIZES]
    if not images:
        return inputs, []
    x, _, passed_over = load_first_images(path_list(images), VERIFY_MAX_IMAGES, ckpt.channels, ckpt.input_size,
                                          ckpt.mean, ckpt.std, "--verify-images", ", which verify did not compare on")
    inputs.append(("images", x))
    return inputs, passed_over


@torch.no_grad()
def _compare(
    model: nn.Module, exported: Callable[[torch.Tensor], torch.Tensor], inputs: list[tuple[str, torch.Tensor]],
) -> list[VerifyCheck]:
    device = next(model.parameters()).device
    checks = []
    for kind, x in inputs:
        want = model(x.to(device)).float().cpu()
        diff = (exported(x).float() - want).abs().max()
        checks.append(VerifyCheck(kind, len(x), float(diff), float(want.abs().max())))
    return checks


def export(
    checkpoint: str | Checkpoint,
    format: str,
    out: str,
    verify: bool = False,
    images: list[str] | None = None,
    tolerance: float = TOLERANCE,
) -> ExportResult:
    """Write the model of ``checkpoint`` (a run folder, a checkpoint file or a loaded Checkpoint) to ``out`` as
    ``format`` (``onnx``, ``torchscript`` or ``safetensors``), exported in eval mode with a dynamic batch axis.

    ``verify`` reads the file back (onnxruntime for ONNX, ``torch.jit.load`` for TorchScript, ``load_checkpoint``
    for safetensors) and compares its logits with the PyTorch model's in eval mode on random inputs at batch
    sizes 1 and 7 and, when ``images`` (files or folders) are given, on the first 64 of them that decode (a broken
    image in a folder is passed over, with a warning in ``ExportResult.warnings``; a broken file named on its own is
    a DataError).
    """
    if format not in FORMATS:
        raise UserError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    _check_out(out, format, ckpt.path)
    verify = verify or bool(images)
    if format == "onnx":
        _require("onnx", "onnxscript", *(["onnxruntime"] if verify else []), purpose="ONNX export")
    inputs, passed_over = _verify_inputs(ckpt, images) if verify else ([], [])
    model = ckpt.model
    metadata = payload_metadata(make_payload(model, ckpt.classes, ckpt.input_size, ckpt.channels, ckpt.mean, ckpt.std,
                                             flip=ckpt.flip))
    example = torch.randn(EXAMPLE_BATCH, ckpt.channels, ckpt.input_size, ckpt.input_size,
                          device=next(model.parameters()).device)
    # A verified export is written beside --out first and replaces it only once it has passed: one that fails
    # stays there, named unverified, and a good file already at --out is not lost to it.
    path = unverified_path(out) if verify else out
    with eval_mode(model):
        start = time.perf_counter()
        with _output_file(path) as tmp:
            _WRITERS[format](model, metadata, example, tmp)
        export_time = time.perf_counter() - start
        try:
            checks = _compare(model, _READERS[format](path), inputs) if verify else []
        except BaseException:
            os.unlink(path)
            raise
    worst = max((c.max_abs_diff for c in checks), default=None)
    verified = None if worst is None else all(c.max_abs_diff < c.allowed(tolerance) for c in checks)
    if verified:
        move_into_place(path, out)
        path = out
    return ExportResult(
        path=path, format=format, checkpoint=ckpt.path, model=model.cnnkit_config["name"],
        size_bytes=os.path.getsize(path), export_time_s=round(export_time, 3), checks=checks, max_abs_diff=worst,
        tolerance=tolerance, verified=verified, warnings=passed_over,
    )


def unverified_path(out: str) -> str:
    """Where an export being verified is written before it replaces ``out``: ``model.onnx`` -> ``model.unverified.onnx``
    (the same ending, by which cnnkit recognises the format)."""
    folder, name = os.path.split(out)
    stem, dot, ending = name.rpartition(".")
    return os.path.join(folder, f"{stem}.unverified.{ending}" if dot else f"{name}.unverified")
