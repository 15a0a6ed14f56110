"""Models: the registry, cnnkit's own CNNs and torchvision's, and torchvision's pretrained weights."""

from cnnkit.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
