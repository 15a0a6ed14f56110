"""An exported ONNX model run by onnxruntime: numpy in, numpy out, no PyTorch needed.

``cnnkit predict model.onnx photos/`` goes through this module, ``cnnkit/data/images.py`` (Pillow, numpy) and
``cnnkit/metadata.py`` only, so it works in an install without torch (see the README: serving without torch).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from cnnkit.errors import CheckpointError, UserError
from cnnkit.metadata import payload_from_metadata


class OnnxModel:
    """An exported ``.onnx`` file run by onnxruntime on the CPU. Called like the PyTorch model (a normalised
    float batch N x C x H x W in, logits out: torch tensors through ``__call__``, numpy arrays through ``run``);
    ``classes``, ``input_size``, ``channels``, ``mean``, ``std`` come from its metadata.
    ``threads``: onnxruntime's intra-op threads (default: onnxruntime's own choice, one per physical core)."""

    def __init__(self, path: str, threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError:
            raise UserError("running an ONNX model needs onnxruntime, which is not installed: "
                            "pip install onnxruntime (or pip install 'cnnkit[export]')") from None
        if os.path.isdir(path):  # it exists: "does not exist" would send the user looking for a typo
            raise UserError(f"ONNX file {path} is a folder, not a file; pass the .onnx file that `cnnkit export` "
                            "wrote")
        if not os.path.isfile(path):
            raise UserError(f"ONNX file {path} does not exist; "
                            f"make one with `cnnkit export RUN --format onnx --out {path}`")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0
        try:
            self.session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception only
            raise CheckpointError(f"{path} is not a readable ONNX model ({str(e).splitlines()[0][:160]})") from None
        payload = payload_from_metadata(self.session.get_modelmeta().custom_metadata_map, path)
        self.path = path
        self.model_name: str = payload["model"]["name"]
        self.classes: list[str] = payload["classes"]
        self.input_size: int = payload["input_size"]
        self.channels: int = payload["channels"]
        self.mean: list[float] = payload["mean"]
        self.std: list[float] = payload["std"]
        self.flip: bool | None = payload.get("flip")  # whether training mirrored the images; None: not recorded
        self._input = self.session.get_inputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits N x classes (float32) of a normalised float batch N x C x H x W."""
        return self.session.run(None, {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def __call__(self, x: Any) -> Any:
        """``run`` for a torch tensor: a CPU float tensor of logits."""
        import torch

        return torch.from_numpy(self.run(x.detach().cpu().float().numpy()))
