"""Prediction: class probabilities for image files and folders, from a checkpoint."""

from __future__ import annotations

import os

import torch

from cnnkit.data.images import is_image_file, load_image
from cnnkit.errors import DataError, UserError
from cnnkit.train.checkpoint import Checkpoint, load_checkpoint


def image_paths(paths: list[str]) -> list[str]:
    """Files as given, folders expanded to the image files below them (sorted, hidden ones skipped)."""
    out: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f)]
            if not found:
                raise UserError(f"folder {p} holds no images")
            out += found
        elif os.path.exists(p):
            out.append(p)
        else:
            raise UserError(f"image path {p} does not exist")
    return out


@torch.no_grad()
def predict(checkpoint: str | Checkpoint, paths: list[str] | str, topk: int = 5, batch_size: int = 64) -> list[dict]:
    """For each image: ``{"path", "top": [{"class", "prob"}, ...]}``, most probable first; an image that
    cannot be decoded gets ``{"path", "error"}`` instead, and the others are still predicted."""
    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
    files = image_paths([paths] if isinstance(paths, str) else list(paths))
    model = ckpt.model
    was_training = model.training
    model.eval()
    mean = torch.tensor(ckpt.mean).view(1, -1, 1, 1) * 255
    std = torch.tensor(ckpt.std).view(1, -1, 1, 1) * 255
    k = min(topk, len(ckpt.classes))
    results: list[dict] = []
    try:
        for i in range(0, len(files), batch_size):
            batch, good = [], []
            for f in files[i : i + batch_size]:
                try:
                    batch.append(load_image(f, ckpt.channels, ckpt.input_size))
                    good.append(f)
                except DataError as e:
                    results.append({"path": f, "error": str(e)})
            if not batch:
                continue
            device = next(model.parameters()).device
            x = ((torch.stack(batch).float() - mean) / std).to(device)
            probs = model(x).float().softmax(1).cpu()
            top = probs.topk(k, dim=1)
            for f, p, idx in zip(good, top.values, top.indices):
                results.append({"path": f, "top": [{"class": ckpt.classes[j], "prob": float(v)}
                                                    for v, j in zip(p.tolist(), idx.tolist())]})
    finally:
        model.train(was_training)
    order = {f: n for n, f in enumerate(files)}
    return sorted(results, key=lambda r: order[r["path"]])
