"""Checkpoints: atomic save, safe load, and everything needed to rebuild the model and its preprocessing.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so ``torch.load(weights_only=True)``
reads it: loading never runs code from the file. The same dict can also live in a ``.safetensors`` file
(``cnnkit export --format safetensors``): the weights as tensors, everything else as JSON text in its metadata.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from cnnkit.errors import CheckpointError, UserError
from cnnkit.models.registry import create_model

FORMAT_VERSION = 1
# What rebuilds the model and its preprocessing; exports carry these as metadata.
_PAYLOAD_KEYS = ("cnnkit_checkpoint", "model", "classes", "input_size", "channels", "mean", "std")


@dataclass
class Checkpoint:
    """A loaded checkpoint: the rebuilt model (in eval mode) and how its inputs must be prepared."""

    model: nn.Module
    classes: list[str]
    input_size: int
    channels: int
    mean: list[float]
    std: list[float]
    path: str
    epoch: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)


def make_payload(
    model: nn.Module, classes: list[str], input_size: int, channels: int, mean: list[float], std: list[float],
    **extra: Any,
) -> dict[str, Any]:
    """The dict a checkpoint file holds. ``extra``: epoch, metrics, config, optimizer and schedule state."""
    return {
        "cnnkit_checkpoint": FORMAT_VERSION,
        "model": model.cnnkit_config,
        "state_dict": model.state_dict(),
        "classes": list(classes),
        "input_size": input_size,
        "channels": channels,
        "mean": list(mean),
        "std": list(std),
        **extra,
    }


def payload_metadata(payload: dict[str, Any]) -> dict[str, str]:
    """What rebuilds the model and its preprocessing (no weights, no training state), each value as JSON text:
    the string-to-string metadata that safetensors and ONNX files carry."""
    return {key: json.dumps(payload[key]) for key in _PAYLOAD_KEYS}


def payload_from_metadata(metadata: dict[str, str], path: str) -> dict[str, Any]:
    """The inverse of ``payload_metadata``; a CheckpointError if ``metadata`` was not written by cnnkit."""
    if "cnnkit_checkpoint" not in metadata:
        raise CheckpointError(f"{path} was not exported by cnnkit (no model description in its metadata); "
                              "export it with `cnnkit export`")
    try:
        return {key: json.loads(value) for key, value in metadata.items() if key in _PAYLOAD_KEYS}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has damaged cnnkit metadata ({e})") from None


def save_checkpoint(payload: dict[str, Any], path: str) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, flushed and fsynced,
    then renamed over the old file, so a crash at any moment leaves either the old or the new checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def resolve_checkpoint_path(path: str) -> str:
    """A run folder means its ``best.pt`` (else ``last.pt``); a file means itself."""
    if os.path.isdir(path):
        for name in ("best.pt", "last.pt"):
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        raise UserError(f"{path} is a folder without best.pt or last.pt; pass a run folder or a checkpoint file")
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; pass a run folder (runs/...), a .pt or a .safetensors file")
    return path


def _read_safetensors(path: str) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({str(e).splitlines()[0][:160]})") from None
    return {**payload_from_metadata(metadata, path), "state_dict": state_dict}


def read_payload(path: str) -> dict[str, Any]:
    """The checkpoint dict at ``path``, read with ``weights_only=True`` (or from a .safetensors export); a
    CheckpointError names the file otherwise."""
    path = resolve_checkpoint_path(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was not written completely — use another")
    if path.lower().endswith(".safetensors"):
        return _read_safetensors(path)
    if path.lower().endswith(".onnx"):
        raise CheckpointError(f"{path} is an ONNX export: `cnnkit predict` runs it; everything else needs the "
                              "checkpoint (.pt or .safetensors) it was exported from")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} holds objects other than tensors and plain data and was not loaded, "
            f"since that could run code ({str(e).splitlines()[0][:160]})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(payload, dict) or "cnnkit_checkpoint" not in payload:
        raise CheckpointError(f"{path} is not a cnnkit checkpoint (no model description in it)")
    return payload


def load_checkpoint(path: str, device: str | torch.device = "cpu") -> Checkpoint:
    """Rebuild the model stored at ``path`` (a checkpoint file or a run folder), in eval mode."""
    payload = read_payload(path)
    spec = payload["model"]
    model = create_model(
        spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
        input_size=spec["input_size"], **spec["options"],
    )
    try:
        result = model.load_state_dict(payload["state_dict"], strict=False)
    except RuntimeError as e:  # shape mismatches: name them
        lines = [line.strip() for line in str(e).splitlines() if "size mismatch" in line]
        raise CheckpointError(f"checkpoint {path} does not fit model {spec['name']}: {'; '.join(lines[:3])}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not fit model {spec['name']}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    model.to(device).eval()
    return Checkpoint(
        model=model, classes=payload["classes"], input_size=payload["input_size"], channels=payload["channels"],
        mean=payload["mean"], std=payload["std"], path=resolve_checkpoint_path(path),
        epoch=payload.get("epoch", 0), metrics=payload.get("metrics", {}), config=payload.get("config", {}),
    )
