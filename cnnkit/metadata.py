"""What a cnnkit model file says about itself: the model's description and how to prepare its input (classes,
input size, channels, mean, std), as the JSON-text metadata that safetensors and ONNX files carry.

Free of torch: ``cnnkit predict model.onnx`` reads it with onnxruntime alone.
"""

from __future__ import annotations

import json
from typing import Any

from cnnkit.errors import CheckpointError

# What rebuilds the model and its preprocessing; exports carry these as metadata.
PAYLOAD_KEYS = ("cnnkit_checkpoint", "model", "classes", "input_size", "channels", "mean", "std")
# Carried too where known: "flip", whether training mirrored the images (test-time augmentation adds a mirrored
# view only then); exports made before it was recorded lack it.
OPTIONAL_KEYS = ("flip",)


def payload_metadata(payload: dict[str, Any]) -> dict[str, str]:
    """What rebuilds the model and its preprocessing (no weights, no training state), each value as JSON text:
    the string-to-string metadata that safetensors and ONNX files carry."""
    return {key: json.dumps(payload[key]) for key in PAYLOAD_KEYS + OPTIONAL_KEYS if key in payload}


def payload_from_metadata(metadata: dict[str, str], path: str) -> dict[str, Any]:
    """The inverse of ``payload_metadata``; a CheckpointError if ``metadata`` was not written by cnnkit."""
    if "cnnkit_checkpoint" not in metadata:
        raise CheckpointError(f"{path} was not exported by cnnkit (no model description in its metadata); "
                              "export it with `cnnkit export`")
    try:
        return {key: json.loads(value) for key, value in metadata.items() if key in PAYLOAD_KEYS + OPTIONAL_KEYS}
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} has damaged cnnkit metadata ({e})") from None
