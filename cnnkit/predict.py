"""Prediction: class probabilities for image files and folders, from a checkpoint or an exported ONNX file."""

from __future__ import annotations

from typing import Callable

import torch

from cnnkit.data.images import image_paths, load_batch
from cnnkit.errors import UserError
from cnnkit.export import OnnxModel
from cnnkit.modes import eval_mode
from cnnkit.train.checkpoint import Checkpoint, load_checkpoint
from cnnkit.train.precision import resolve_device
from cnnkit.tta import with_tta


@torch.no_grad()
def predict(
    checkpoint: str | Checkpoint | OnnxModel, paths: list[str] | str, topk: int = 5, batch_size: int = 64,
    ema: bool = False, tta: bool = False, tta_shift: int = 0, device: str | torch.device = "cpu",
) -> list[dict]:
    """For each image: ``{"path", "top": [{"class", "prob"}, ...]}``, most probable first; an image that
    cannot be decoded gets ``{"path", "error"}`` instead, and the others are still predicted.

    ``checkpoint``: a run folder, a checkpoint (.pt or .safetensors), or an exported ``.onnx`` file, which
    onnxruntime runs on the CPU with the preprocessing its metadata records. ``ema``: a run folder's weight EMA.
    ``tta``/``tta_shift``: the probabilities averaged over flipped/shifted views (see cnnkit/tta.py).
    ``device``: where a PyTorch model runs ("cpu", "cuda" or "auto"); an ONNX file always runs on the CPU."""
    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    if isinstance(checkpoint, str) and checkpoint.lower().endswith(".onnx"):
        checkpoint = OnnxModel(checkpoint)
    if isinstance(checkpoint, OnnxModel):
        forward = with_tta(checkpoint, checkpoint.mean, checkpoint.std, {}, tta, tta_shift)
        return _classify(checkpoint, forward, paths, topk, batch_size)
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint, ema=ema)
    model = ckpt.model.to(resolve_device(device) if isinstance(device, str) else device)
    device = next(model.parameters()).device
    forward = with_tta(model, ckpt.mean, ckpt.std, ckpt.config, tta, tta_shift)
    with eval_mode(model):
        return _classify(ckpt, lambda x: forward(x.to(device)), paths, topk, batch_size)


def _classify(
    prep: Checkpoint | OnnxModel, forward: Callable[[torch.Tensor], torch.Tensor], paths: list[str] | str,
    topk: int, batch_size: int,
) -> list[dict]:
    """The one preprocessing and top-k path for every kind of model: ``forward`` maps a normalised float
    batch to logits, ``prep`` says how to prepare images for it (channels, input size, mean, std, classes)."""
    files = image_paths([paths] if isinstance(paths, str) else list(paths))
    k = min(topk, len(prep.classes))
    results: list[dict] = []
    for i in range(0, len(files), batch_size):
        x, good, errors = load_batch(files[i : i + batch_size], prep.channels, prep.input_size, prep.mean, prep.std)
        results += [{"path": f, "error": e} for f, e in errors.items()]
        if x is None:
            continue
        top = forward(x).float().softmax(1).cpu().topk(k, dim=1)
        for f, p, idx in zip(good, top.values, top.indices):
            results.append({"path": f, "top": [{"class": prep.classes[j], "prob": float(v)}
                                                for v, j in zip(p.tolist(), idx.tolist())]})
    order = {f: n for n, f in enumerate(files)}
    return sorted(results, key=lambda r: order[r["path"]])
