"""cnnkit's own CNNs: the classic conv-ReLU-pool network, a BatchNorm network, and a configurable builder.

Flatten heads size their first linear layer from the input size (a forward pass of an empty batch through
the convolutional part), so the same model works at 28x28, 32x32 or 64x64 instead of hard-coding 128*4*4.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from cnnkit.errors import UserError
from cnnkit.models.registry import register_model
from cnnkit.models.sizes import larger_size_fix, size_error


def _flat_features(features: nn.Module, in_channels: int, input_size: int) -> int:
    """Number of values ``features`` produces per image of ``in_channels`` x ``input_size`` x ``input_size``."""
    was_training = features.training
    features.eval()  # a probe pass must not move BatchNorm running statistics
    with torch.no_grad():
        try:
            out = features(torch.zeros(1, in_channels, input_size, input_size))
        except RuntimeError as e:
            raise size_error(e, f"input size {input_size} is too small for this network", input_size,
                             larger_size_fix(features, (in_channels, input_size, input_size),
                                             " or fewer downsampling stages")) from None
        finally:
            features.train(was_training)
    return out[0].numel()


class ConvNet(nn.Module):
    """A plain CNN: ``features`` (convolutional stages) then ``classifier`` (the head)."""

    def __init__(self, features: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features = features
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model
def simple_cnn(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, dropout: float = 0.5) -> ConvNet:
    """The classic CIFAR-10 CNN: three conv3x3-ReLU-maxpool blocks (32, 64, 128), FC 256, dropout, FC.

    620,362 parameters at 32x32 input with 10 classes.
    """
    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    flat = _flat_features(features, in_channels, input_size)
    classifier = nn.Sequential(
        nn.Flatten(1),  # torch.flatten(x, 1): works on channels_last tensors, unlike x.view(n, -1)
        nn.Linear(flat, 256), nn.ReLU(inplace=True), nn.Dropout(dropout),
        nn.Linear(256, num_classes),
    )
    return ConvNet(features, classifier)


@register_model
def cnn_bn(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ConvNet:
    """Two conv3x3-BatchNorm-ReLU-maxpool blocks (32, 64 channels) and one linear layer (64*8*8 -> classes at 32x32)."""
    features = nn.Sequential(
        nn.Conv2d(in_channels, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(2),
    )
    flat = _flat_features(features, in_channels, input_size)
    return ConvNet(features, nn.Sequential(nn.Flatten(1), nn.Linear(flat, num_classes)))


@register_model
def linear(num_classes: int = 10, in_channels: int = 3, input_size: int = 32) -> ConvNet:
    """A linear classifier on raw pixels: the baseline a CNN must beat."""
    return ConvNet(nn.Identity(), nn.Sequential(nn.Flatten(1), nn.Linear(in_channels * input_size**2, num_classes)))


@register_model
def mlp(num_classes: int = 10, in_channels: int = 3, input_size: int = 32, hidden: int = 512) -> ConvNet:
    """A two-hidden-layer perceptron on raw pixels: no weight sharing, no translation invariance."""
    if hidden < 1:
        raise UserError(f"mlp: hidden must be a positive whole number, got {hidden}")
    return ConvNet(
        nn.Identity(),
        nn.Sequential(
            nn.Flatten(1),
            nn.Linear(in_channels * input_size**2, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        ),
    )


DOWNSAMPLING = ("max", "avg", "stride")
HEADS = ("flatten", "gap")


@register_model
def convnet(
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    widths: Sequence[int] = (32, 64, 128),
    depth: int = 1,
    downsample: str = "max",
    head: str = "gap",
    conv1x1: bool = False,
    batchnorm: bool = True,
    dropout: float = 0.0,
    hidden: int = 0,
) -> ConvNet:
    """A configurable CNN: one stage per entry of ``widths``, each ``depth`` conv3x3 layers, then downsampling.

    ``downsample``: ``max`` or ``avg`` (2x2 pooling after the stage) or ``stride`` (the stage's first conv has
    stride 2). ``head``: ``flatten`` (all positions into a linear layer) or ``gap`` (global average pooling,
    any input size). ``conv1x1`` adds a 1x1 convolution (channel mixing, no spatial extent) at the end of each
    stage. ``hidden`` > 0 puts a hidden linear layer in the head.
    """
    if downsample not in DOWNSAMPLING:
        raise UserError(f"convnet: downsample must be one of {', '.join(DOWNSAMPLING)}, not '{downsample}'")
    if head not in HEADS:
        raise UserError(f"convnet: head must be one of {', '.join(HEADS)}, not '{head}'")
    if not widths:
        raise UserError("convnet: widths needs at least one stage, e.g. widths=[32,64,128]")
    if depth < 1:
        raise UserError(f"convnet: depth must be a positive whole number, got {depth}")
    # Checked here, in the builder's words: torch builds a layer of 0 channels and fails at the first forward
    # pass (after a run folder exists), and words a negative one as "negative dimension".
    if any(w < 1 for w in widths):
        raise UserError(f"convnet: widths must be positive whole numbers, got {list(widths)}")
    if hidden < 0:
        raise UserError(f"convnet: hidden must be 0 (no hidden layer) or a positive whole number, got {hidden}")

    def conv(cin: int, cout: int, k: int, stride: int = 1) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.ReLU(inplace=True)]

    layers: list[nn.Module] = []
    cin = in_channels
    for width in widths:
        stage: list[nn.Module] = []
        for i in range(depth):
            stride = 2 if (downsample == "stride" and i == 0) else 1
            stage += conv(cin, width, 3, stride)
            cin = width
        if conv1x1:
            stage += conv(cin, cin, 1)
        if downsample == "max":
            stage.append(nn.MaxPool2d(2))
        elif downsample == "avg":
            stage.append(nn.AvgPool2d(2))
        layers.append(nn.Sequential(*stage))
    features = nn.Sequential(*layers)

    head_layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(1)] if head == "gap" else []
    head_layers.append(nn.Flatten(1))
    # Probed for both heads: global average pooling takes any size, but pooling stages that halve the input
    # below one pixel fail inside the first forward pass, so a size too small is refused here, before training.
    probed = _flat_features(features, in_channels, input_size)
    flat = cin if head == "gap" else probed
    if hidden:
        head_layers += [nn.Linear(flat, hidden), nn.ReLU(inplace=True)]
        flat = hidden
    if dropout:
        head_layers.append(nn.Dropout(dropout))
    head_layers.append(nn.Linear(flat, num_classes))
    return ConvNet(features, nn.Sequential(*head_layers))
