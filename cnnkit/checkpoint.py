"""Checkpoints: atomic save, safe load, and everything needed to rebuild the model and its preprocessing.

A checkpoint is a plain dict of tensors, numbers, strings and lists, so ``torch.load(weights_only=True)``
reads it: loading never runs code from the file. The same dict can also live in a ``.safetensors`` file
(``cnnkit export --format safetensors``): the weights as tensors, everything else as JSON text in its metadata.
"""

from __future__ import annotations

import glob
import os
import pickle
import random
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from cnnkit.atomic import atomic_torch_save
from cnnkit.choices import NO_FLIP_DATA, is_format
from cnnkit.errors import CheckpointError, UserError, reason
from cnnkit.metadata import payload_from_metadata
from cnnkit.models.registry import create_model
from cnnkit.runs import divergence, lower_rate
from cnnkit.torch_files import (
    NotATorchFile, load_failure, not_a_torch_file, quiet_protocol_warning, refused_objects,
)

FORMAT_VERSION = 1
# torch.load(weights_only=True) had known bypasses before 2.10; cnnkit relies on it to load untrusted files.
MIN_SAFE_TORCH = (2, 10)


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
    flip: bool | None = None  # whether training mirrored the images (a run's config says, or an export's record);
    # None: not recorded (a checkpoint saved outside a run)


def trained_with_flips(config: dict) -> bool | None:
    """Whether the run configured by ``config`` mirrored its training images: its ``flip`` option, else whether
    its data is any but digits; None when ``config`` says neither (a checkpoint saved outside a run)."""
    flips = config.get("flip")
    if flips is None and config.get("data") is not None:
        return config["data"] not in NO_FLIP_DATA
    return flips


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


def save_checkpoint(payload: dict[str, Any], path: str) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, flushed and fsynced,
    then renamed over the old file, so a crash at any moment leaves either the old or the new checkpoint.
    A failed write (no space, no permission) raises a CheckpointError; the previous file stays intact.
    (Training refuses weights that are no longer finite before it calls this: ``non_finite_tensors``.)
    """
    try:
        atomic_torch_save(payload, path, durable=True)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path} ({e.strerror or e}); the previous one is intact. "
                              "Free disk space or pass a writable --out") from None


def non_finite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors in ``state_dict`` that hold a NaN or an infinity, buffers included
    (huge activations overflow a BatchNorm layer's running variance to inf while its normalised output, and so the
    loss, stay finite). One read of the result, so a GPU waits once, not once per tensor."""
    named = [(name, v) for name, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(v).all() for _, v in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def resolve_checkpoint_path(path: str, ema: bool = False) -> str:
    """A run folder means its ``best.pt`` (else ``last.pt``); with ``ema``, the weight EMA's ``best_ema.pt``
    (else ``last_ema.pt``); a file means itself."""
    if ema and not os.path.isdir(path):
        raise UserError(f"--ema picks the EMA weights of a run folder; {path} is not one (pass best_ema.pt or "
                        "last_ema.pt itself, without --ema)")
    if os.path.isdir(path):
        names = ("best_ema.pt", "last_ema.pt") if ema else ("best.pt", "last.pt")
        for name in names:
            if os.path.isfile(os.path.join(path, name)):
                return os.path.join(path, name)
        if ema:
            raise UserError(f"{path} holds no EMA weights (best_ema.pt); they exist for runs trained with --ema DECAY")
        if os.path.isfile(os.path.join(path, "config.json")):  # a run that never wrote a checkpoint
            raise UserError(f"{path} is a run folder without a checkpoint (best.pt or last.pt): {_no_checkpoint(path)}")
        raise UserError(f"{path} is a folder without best.pt or last.pt; pass a run folder or a checkpoint file")
    if not os.path.exists(path):
        raise UserError(f"checkpoint {path} does not exist; pass a run folder (runs/...), a .pt or a .safetensors file")
    return path


def _no_checkpoint(run_dir: str) -> str:
    """Why run folder ``run_dir`` holds no checkpoint, and what to do: a run that diverged (runs.divergence) or
    stopped before the end of its first epoch (or of its first --save-every steps), or one still running."""
    again = f"cnnkit train --config {os.path.join(run_dir, 'config.json')}"
    stop = divergence(run_dir)
    if stop is not None:
        return (f"the run diverged in epoch {stop.get('epoch', '?')}, before its first checkpoint, so there are no "
                f"weights to use; train it again at a lower rate: {again} --lr {lower_rate(run_dir)} --out NEW_DIR")
    return ("the run stopped before its first checkpoint (written at the end of epoch 1, or after --save-every "
            f"steps), or is still running; wait for it, or start it again: {again} --out NEW_DIR")


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete temporary checkpoint files a killed process left in ``folder``; returns their paths."""
    stale = glob.glob(os.path.join(folder, ".*.pt.*.tmp"))
    for f in stale:
        os.unlink(f)
    return stale


def _check_torch_version() -> None:
    version = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    if version < MIN_SAFE_TORCH:
        raise CheckpointError(f"torch {torch.__version__} has known weights_only bypasses; cnnkit loads checkpoints "
                              f"only with torch >= {'.'.join(map(str, MIN_SAFE_TORCH))} (pip install -U torch)")


def _read_safetensors(path: str) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state_dict = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged or truncated ({reason(e)}); export it again from the "
                              "checkpoint it came from") from None
    return {**payload_from_metadata(metadata, path), "state_dict": state_dict}


def unpickling_refused(what: str, error: pickle.UnpicklingError) -> CheckpointError:
    """The error for a file that ``torch.load(weights_only=True)`` refused, naming the object it refused (such
    as ``eval``) rather than quoting PyTorch's advice, which suggests the unsafe way of loading it."""
    return CheckpointError(f"{what} {refused_objects(error)} and was not loaded, since unpickling it could run code; "
                           "if you trust its author, re-save its weights as a state dict "
                           "(torch.save(model.state_dict(), ...)) or .safetensors and load those")


def read_payload(path: str) -> dict[str, Any]:
    """The checkpoint dict at ``path``, read with ``weights_only=True`` (or from a .safetensors export); a
    CheckpointError names the file otherwise. There is no unsafe mode: a file that holds other Python objects
    is refused, never unpickled, since unpickling can run any code its author wrote.
    """
    _check_torch_version()
    path = resolve_checkpoint_path(path)
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); it was not written completely — use another")
    if is_format(path, "safetensors"):
        return _read_safetensors(path)
    # An export given where the checkpoint goes is a usage error (exit code 2), not a file that failed to load.
    if is_format(path, "onnx"):
        raise UserError(f"{path} is an ONNX export: `cnnkit predict` runs it; everything else needs the "
                              "checkpoint (.pt or .safetensors) it was exported from")
    if is_torchscript(path):
        raise UserError(f"{path} is a TorchScript export, for torch.jit.load in your own code; cnnkit reads the "
                              "checkpoint or run folder it was exported from, or an .onnx or .safetensors export")
    payload = load_torch_file(path, f"checkpoint {path}", "a checkpoint",
                              "a run folder, a checkpoint file (.pt) or a .safetensors export",
                              lambda why: f"checkpoint {path} is damaged or truncated ({why}); {_instead_of(path)}")
    if not isinstance(payload, dict) or "cnnkit_checkpoint" not in payload:
        raise CheckpointError(f"{path} is not a cnnkit checkpoint (no model description in it); pass a run folder "
                              "or a checkpoint cnnkit train wrote (best.pt, last.pt); a plain state dict starts a run "
                              "with train --weights")
    return payload


def _instead_of(damaged: str) -> str:
    """What to do about the damaged checkpoint ``damaged``: its run's other checkpoint where there is one."""
    folder, name = os.path.split(os.path.abspath(damaged))
    other = next((os.path.join(os.path.dirname(damaged), n) for n in ("best.pt", "last.pt")
                  if n != name and os.path.isfile(os.path.join(folder, n))), None)
    if other:
        return f"use {other} beside it, or restore it from a copy"
    return "restore it from a copy, or train again"


def load_torch_file(path: str, name: str, not_what: str, instead: str, damaged: Callable[[str], str]) -> Any:
    """``torch.load(path, weights_only=True)``, on the CPU, for ``path`` given as ``not_what``; its one-line errors
    call it ``name`` and name ``instead`` as what to pass (``refused_torch_file``), and ``damaged(reason)`` is the
    error for a file torch cannot read."""
    refused = refused_torch_file(path, name, not_what, instead)
    if refused:
        raise refused
    try:
        with quiet_protocol_warning():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # on other bytes the unpickler also fails with KeyError, IndexError, struct.error...
        failure = load_failure(path, e)
        raise refused_torch_file(path, name, not_what, instead, failure) or CheckpointError(
            damaged(reason(failure))) from None


def refused_torch_file(path: str, name: str, not_what: str, instead: str, failure: BaseException | None = None
                       ) -> Exception | None:
    """The one-line error for ``path`` (called ``name`` in it) given as ``not_what``: before torch.load (``failure``
    None) where its name or first bytes show what else it is; after torch.load failed, given what ``load_failure``
    made of its error, where the file is another kind (text, a plain pickle, a zip of other files: a usage error)
    or a pickle the unpickler refused. None where neither says more: the file is damaged."""
    kind = not_a_torch_file(path) if failure is None else str(failure) if isinstance(failure, NotATorchFile) else None
    if kind and kind.startswith("empty"):  # a file written incompletely: damaged, not a usage error
        return CheckpointError(f"{name} is {kind}: it was not written completely; restore it, or pass {instead}")
    if kind:
        return UserError(f"{name} is {kind}, not {not_what}; pass {instead}")
    if isinstance(failure, pickle.UnpicklingError):  # load_failure keeps the unpickler's error for a real pickle
        return unpickling_refused(name, failure)
    return None


def is_torchscript(path: str) -> bool:
    """A TorchScript archive: a zip with the compiled code beside the data (torch.jit.save's layout)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any(n.split("/", 1)[-1] in ("constants.pkl", "code/") or "/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def load_checkpoint(path: str, device: str | torch.device = "cpu", ema: bool = False) -> Checkpoint:
    """Rebuild the model stored at ``path`` (a checkpoint file or a run folder), in eval mode.

    ``ema``: a run folder's weight EMA (``best_ema.pt``) instead of its raw weights."""
    path = resolve_checkpoint_path(path, ema)
    return checkpoint_from_payload(read_payload(path), path, device)


def payload_model(payload: dict[str, Any]) -> nn.Module:
    """The model a checkpoint ``payload`` (``read_payload``) describes, with fresh weights; built on the meta
    device (``check_before_building``), it shows the input sizes the checkpoint's model takes without the cost of
    building the real one and loading its weights."""
    spec = payload["model"]
    model = create_model(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                         input_size=spec["input_size"], **spec["options"])
    # Built without the pretrained weights the file's own replace, but a run that began from them still did: an
    # export or a new checkpoint of this model says so ("pretrained": false in an exported fine-tuned resnet18).
    model.cnnkit_config["pretrained"] = bool(spec.get("pretrained", False))
    return model


def checkpoint_from_payload(payload: dict[str, Any], path: str, device: str | torch.device = "cpu") -> Checkpoint:
    """``load_checkpoint`` of the ``payload`` read from the checkpoint file ``path``."""
    spec = payload["model"]
    model = payload_model(payload)
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
        flip=trained_with_flips(payload["config"]) if payload.get("config") else payload.get("flip"),
    )


def rng_state() -> dict[str, Any]:
    """Every random number generator the training loop draws from, as plain data (no numpy objects, so
    ``weights_only`` loading reads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
