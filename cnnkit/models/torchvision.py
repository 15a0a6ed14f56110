"""Every torchvision classification model under its torchvision name, with the head sized to num_classes.

The models are torchvision's own classes, built through ``torchvision.models.get_model``; cnnkit only
adapts the input channels (a 1-channel MNIST image into a ResNet) and picks options that make a model
work at small input sizes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torchvision

from cnnkit.errors import UserError
from cnnkit.models.heads import find_head, replace_head
from cnnkit.models.registry import _FACTORIES

# Options that torchvision requires for a model to be built without pretrained weights at any size:
# the auxiliary classifiers of Inception/GoogLeNet only exist for 299/224 inputs and training tricks we
# do not use; transformers need to know the image size.
_DEFAULT_OPTIONS = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}


def adapt_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first ``Conv2d`` so that it takes ``in_channels`` channels.

    Existing weights are kept the way timm's ``adapt_input_conv`` does: summed over RGB for one channel,
    repeated and rescaled for more, so a pretrained stem stays meaningful.
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return model
                new = nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups if child.groups == 1 else in_channels, child.bias is not None,
                    child.padding_mode,
                )
                with torch.no_grad():
                    w = child.weight
                    if in_channels == 1:
                        new.weight.copy_(w.sum(dim=1, keepdim=True))
                    else:
                        reps = -(-in_channels // w.shape[1])
                        new.weight.copy_(w.repeat(1, reps, 1, 1)[:, :in_channels] * (w.shape[1] / in_channels))
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return model
    raise UserError("this model has no Conv2d layer whose input channels could be adapted")


STEMS = ("imagenet", "cifar")


def cifar_stem(model: nn.Module) -> nn.Module:
    """Give a ResNet-style model (``conv1`` + ``maxpool``) the CIFAR stem of He et al. (2016, section 4.2):
    a 3x3 stride-1 first convolution and no max-pool, so a 32x32 image reaches ``layer4`` at 4x4 instead of
    1x1. About 16x the multiply-adds of torchvision's 7x7 stride-2 stem with max-pool at the same input size.
    ``conv1`` starts freshly initialised (a pretrained 7x7 filter bank does not fit a 3x3 one)."""
    if not isinstance(getattr(model, "conv1", None), nn.Conv2d) or not hasattr(model, "maxpool"):
        raise UserError("stem=cifar needs a ResNet-style model (conv1 and maxpool: resnet*, resnext*, "
                        "wide_resnet*); leave the option out for this model")
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's ResNet
    model.maxpool = nn.Identity()
    return model


def _factory(tv_name: str):
    def build(num_classes: int = 10, in_channels: int = 3, input_size: int = 224, pretrained: bool = False,
              stem: str = "imagenet", **options: Any) -> nn.Module:
        if stem not in STEMS:
            raise UserError(f"stem must be one of {', '.join(STEMS)}, not '{stem}'")
        kwargs = {**_DEFAULT_OPTIONS.get(tv_name, {}), **options}
        if tv_name.startswith(("vit_",)):
            kwargs.setdefault("image_size", input_size)
        try:
            if pretrained:
                # Built with the weights' own head, loaded strictly, then given the new head.
                from cnnkit.transfer import pretrained_state

                kwargs.pop("init_weights", None)
                model = torchvision.models.get_model(tv_name, weights=None, **kwargs)
                state = pretrained_state(tv_name)
                own = model.state_dict()
                # Auxiliary classifiers (Inception, GoogLeNet) are not built for fine-tuning: their weights go.
                state = {k: v for k, v in state.items() if k in own or not k.lower().startswith("aux")}
                model.load_state_dict(state)
                if find_head(model)[1].weight.shape[0] != num_classes:
                    replace_head(model, num_classes)
            else:
                model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
        except TypeError as e:
            raise UserError(f"torchvision model '{tv_name}' does not take these options: {e}") from None
        except ValueError as e:
            raise UserError(f"torchvision model '{tv_name}': {e}") from None
        if stem == "cifar":
            cifar_stem(model)
        if in_channels != 3:
            adapt_first_conv(model, in_channels)
        return model

    build.__name__ = tv_name
    build.__doc__ = f"torchvision.models.{tv_name}, head sized to num_classes."
    return build


def torchvision_model_names() -> list[str]:
    """torchvision's image classification models (not detection, segmentation, video or quantized)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


for _name in torchvision_model_names():
    _FACTORIES.setdefault(_name, _factory(_name))
