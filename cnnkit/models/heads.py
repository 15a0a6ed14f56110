"""Find and replace a network's classifier head, for every torchvision family and cnnkit's own models.

The head is found without a per-model list: it is the last ``nn.Linear`` in the module tree (ResNet ``fc``,
VGG/AlexNet/EfficientNet/MobileNet ``classifier[-1]``, DenseNet ``classifier``, ViT ``heads.head``, ...), or,
in networks without one (SqueezeNet), the last 1x1 ``nn.Conv2d``. A ResNet's head can also read several stages at once
(``--model-opt head_from=layer2,layer3,layer4``: ``pool_stages`` in models/torchvision.py).
"""

from __future__ import annotations

import torch.nn as nn

from cnnkit.errors import UserError


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the classifier head."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if convs:
        return convs[-1]
    raise UserError(f"{type(model).__name__} has no linear or 1x1-convolution classifier to replace")


def replace_head(model: nn.Module, num_classes: int) -> str:
    """Give ``model`` a fresh head with ``num_classes`` outputs (see ``reset_head``); returns the head's name."""
    name, old = find_head(model)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, 1, bias=old.bias is not None)
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    reset_head(new)
    return name


def reset_head(head: nn.Module) -> None:
    """Start a new linear head on pretrained features at zero, as Big Transfer does (Kolesnikov et al., 2020):
    its first predictions are uniform (loss ln(classes)). With PyTorch's default initialisation, the large
    features of a trained backbone make them confidently wrong instead (losses of 5-6 for 5 classes were
    measured), and a head-only run spends its first epochs undoing that. A 1x1-convolution head (SqueezeNet)
    keeps its default initialisation: a ReLU follows it, and at zero no gradient would pass."""
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        if head.bias is not None:
            nn.init.zeros_(head.bias)
