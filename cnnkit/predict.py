"""Prediction: class probabilities for image files and folders, from a checkpoint or an exported ONNX file.

An ONNX file needs no torch: its path runs on onnxruntime, numpy and Pillow only (cnnkit/runtime.py), so torch
is imported only for a checkpoint or for test-time augmentation.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable

import numpy as np

from cnnkit.choices import is_format
from cnnkit.data.images import UNDECODABLE, image_paths, load_batch_array
from cnnkit.errors import UserError
from cnnkit.runtime import OnnxModel
from cnnkit.threads import resolve_threads, torch_threads

if TYPE_CHECKING:
    import torch

    from cnnkit.checkpoint import Checkpoint


def predict(
    checkpoint: str | Checkpoint | OnnxModel, paths: list[str | os.PathLike] | str | os.PathLike, topk: int = 5,
    batch_size: int = 64,
    ema: bool = False, tta: bool = False, tta_shift: int = 0, threads: int | None = None,
    device: "str | torch.device | None" = None,
) -> list[dict]:
    """For each image: ``{"path", "top": [{"class", "prob"}, ...]}``, most probable first; an image that
    cannot be decoded gets ``{"path", "error"}`` instead, and the others are still predicted.

    ``checkpoint``: a run folder, a checkpoint (.pt or .safetensors), or an exported ``.onnx`` file, which
    onnxruntime runs on the CPU with the preprocessing its metadata records. ``ema``: a run folder's weight EMA.
    ``tta``/``tta_shift``: the probabilities averaged over flipped/shifted views (see cnnkit/tta.py).
    ``threads``: CPU threads (torch's, or onnxruntime's for a file path); None: the physical cores this process
    may use (cnnkit/threads.py); torch's thread count is put back as it was when this returns. An ``OnnxModel``
    passed in keeps the threads it was made with.
    ``device``: where a PyTorch model runs ("cpu", "cuda" or "auto"; None: a checkpoint read from disk on the CPU, a
    ``Checkpoint`` passed in where its model is); an ONNX file always runs on the CPU."""
    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if not isinstance(checkpoint, (str, os.PathLike, OnnxModel)) and not hasattr(checkpoint, "classes"):
        # a bare nn.Module carries no classes and no preprocessing: there is nothing to name its outputs by
        raise UserError(f"predict takes a run folder, a checkpoint or .onnx file, or a cnnkit Checkpoint, not a "
                        f"{type(checkpoint).__name__}; save the model with its classes (a run folder) first")
    checkpoint = os.fspath(checkpoint) if isinstance(checkpoint, os.PathLike) else checkpoint
    threads = resolve_threads(threads)
    if isinstance(checkpoint, str) and is_format(checkpoint, "onnx"):
        if ema:
            raise UserError(f"--ema picks the EMA weights of a run folder; {checkpoint} is an ONNX file with one set "
                            "of weights (export best_ema.pt to ONNX for the EMA's)")
        checkpoint = OnnxModel(checkpoint, threads=threads)
    if isinstance(checkpoint, OnnxModel) and not (tta or tta_shift):
        return _classify(checkpoint, lambda x: _softmax(checkpoint.run(x)), paths, topk, batch_size)

    try:
        import torch
    except ImportError:  # an install for serving ONNX files only
        raise UserError("test-time augmentation (--tta, --tta-shift) and checkpoints need torch, which is not "
                        "installed: pip install cnnkit (or predict an .onnx file without --tta)") from None

    from cnnkit.modes import eval_mode
    from cnnkit.checkpoint import Checkpoint, load_checkpoint
    from cnnkit.train.precision import resolve_device
    from cnnkit.tta import with_tta

    with torch_threads(threads):  # torch's count, one for the whole process, is the caller's again afterwards
        if isinstance(checkpoint, OnnxModel):  # test-time augmentation: the views are made by torch
            forward = with_tta(checkpoint, checkpoint.mean, checkpoint.std, checkpoint.flip, tta, tta_shift,
                               checkpoint.input_size)
            return _classify(checkpoint, lambda x: forward(torch.from_numpy(x)).float().softmax(1).numpy(), paths,
                             topk, batch_size)
        ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, ema=ema)
        model = ckpt.model if device is None else ckpt.model.to(resolve_device(device) if isinstance(device, str)
                                                                else device)
        device = next(model.parameters()).device
        forward = with_tta(model, ckpt.mean, ckpt.std, ckpt.flip, tta, tta_shift,
                           ckpt.input_size)

        def probabilities(x: np.ndarray) -> np.ndarray:
            return forward(torch.from_numpy(x).to(device)).float().softmax(1).cpu().numpy()

        with torch.no_grad(), eval_mode(model):
            return _classify(ckpt, probabilities, paths, topk, batch_size)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)  # no overflow in exp
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _classify(
    prep: Checkpoint | OnnxModel, probabilities: Callable[[np.ndarray], np.ndarray],
    paths: list[str | os.PathLike] | str | os.PathLike, topk: int, batch_size: int,
) -> list[dict]:
    """The one preprocessing and top-k path for every kind of model: ``probabilities`` maps a normalised float
    batch to class probabilities, ``prep`` says how to prepare images for it (channels, input size, mean, std,
    classes)."""
    files = image_paths(paths)
    k = min(topk, len(prep.classes))
    results: list[dict] = []
    for i in range(0, len(files), batch_size):
        x, good, errors = load_batch_array(files[i : i + batch_size], prep.channels, prep.input_size, prep.mean,
                                           prep.std)
        # as train's --bad-images skip: the file is named with what to do, and the other images are predicted
        others = ", the other images are predicted" if len(files) > 1 else ""
        results += [{"path": f, "error": f"{e}; fix or remove it{others}" if e.startswith(UNDECODABLE) else e}
                    for f, e in errors.items()]
        if x is None:
            continue
        probs = probabilities(x)
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # most probable first; ties: the lower class index
        for f, p, idx in zip(good, probs, top):
            results.append({"path": f, "top": [{"class": prep.classes[j], "prob": float(p[j])} for j in idx.tolist()]})
    order = {f: n for n, f in enumerate(files)}
    return sorted(results, key=lambda r: order[r["path"]])
