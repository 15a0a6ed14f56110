"""torchvision's pretrained weights for a registered model: the weights themselves and the preprocessing they
expect (mean, std, smallest input size).

Like timm's pretrained configuration, this travels with the model, not with training: the model files load the
weights (``create_model(..., pretrained=True)``), and training, ``check-data`` and ``embed`` read their
normalisation, so it sits here below all of them.
"""

from __future__ import annotations

import os
import pickle
import sys

import torch

from cnnkit.errors import CheckpointError, UserError, reason
from cnnkit.models.registry import default_weights
from cnnkit.torch_files import NotATorchFile, load_failure, quiet_protocol_warning, refused_objects


def pretrained_weights(name: str):
    """torchvision's default weights enum member for model ``name``."""
    weights = default_weights(name)
    if weights is None:
        raise UserError(f"torchvision has no pretrained weights for '{name}'; train it from scratch "
                        "(drop --pretrained) or pass --weights FILE")
    return weights


def cached_weights_path(name: str) -> str:
    """Where torch.hub keeps torchvision's default weights for ``name``: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(pretrained_weights(name).url))


def pretrained_state(name: str) -> dict[str, torch.Tensor]:
    """The state dict of torchvision's default weights for ``name``: downloaded when online (checked against
    the hash prefix in the file name; a failed check leaves no file behind), else read from the cache under
    ``$TORCH_HOME/hub/checkpoints``. Loaded with ``weights_only=True``."""
    weights = pretrained_weights(name)
    cached = cached_weights_path(name)
    try:
        with quiet_protocol_warning():
            return torch.hub.load_state_dict_from_url(weights.url, progress=sys.stderr.isatty(), check_hash=True,
                                                      map_location="cpu", weights_only=True)
    except Exception as e:  # offline, refused, or a bad download: say where the file has to go
        if os.path.exists(cached):  # there, but torch could not read it: a cut-off download or another file
            # Not the command line's fault (exit code 1): the file in the cache is, and deleting it is the fix.
            raise CheckpointError(f"the cached pretrained weights for {name} ({cached}) cannot be read "
                                  f"({_unreadable(cached, e)}); delete it so that it is downloaded again (run once "
                                  f"with internet access), or download {weights.url} to that path again") from None
        raise UserError(
            f"pretrained weights for {name} are not in {cached} and could not be downloaded ({reason(e)}); "
            f"run once with internet access, or download {weights.url} and put it at that path"
        ) from None


def _unreadable(path: str, error: Exception) -> str:
    """Why torch.load failed with ``error`` on the cached file ``path``: what the file is instead, or its damage."""
    failure = load_failure(path, error)
    if isinstance(failure, NotATorchFile):
        return f"it is {failure}"
    if isinstance(failure, pickle.UnpicklingError):  # a real pickle, refused for what it holds
        return f"the file {refused_objects(failure)}"
    return f"the file is damaged or cut short: {reason(failure)}"


def normalization(name: str, channels: int = 3) -> tuple[list[float], list[float], int]:
    """Mean, std and the smallest input size (pixels) of torchvision's pretrained ``name``, for ``channels``
    input channels."""
    weights = pretrained_weights(name)
    t = weights.transforms()
    mean, std = list(t.mean), list(t.std)
    if channels == 1 and len(mean) == 3:
        # The adapted first conv sums the RGB filters (timm's adapt_input_conv), so a grey image normalised with
        # the channel-averaged statistics gives it about what the RGB filters gave a grey RGB image.
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    return mean, std, max(weights.meta.get("min_size", (1, 1)))
