"""The fast recipe's network: airbench's CIFAR-10 net (Jordan 2024, arXiv 2404.00498), in cnnkit's terms.

Every unusual choice below exists because it buys accuracy per second of training on small images:
- a first 2x2 convolution fixed to the *whitening* transform of the data's 2x2 patches (computed from
  training images by ``init_from_data``), so the network starts from decorrelated inputs;
- BatchNorm without a learnable scale (a scale in front of a ReLU-like activation only changes the
  effective learning rate) and with fast-moving running statistics, which suit a short run;
- convolutions initialised partly to the identity (Dirac), an implicit residual path without the cost of one;
- the pooling *before* BatchNorm and activation in each group, so those run on a quarter of the values.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from cnnkit.models.registry import register_model


class BatchNormNoScale(nn.BatchNorm2d):
    """BatchNorm with a learnable shift but no learnable scale, and running statistics that move fast.

    The scale is a constant 1, handed to the kernel as a tensor: PyTorch's CPU batch-norm accepts a bias without
    a weight, but its CUDA backward does not (it returns an empty gradient for the bias, and autograd stops).
    The constant is a non-persistent buffer, not a parameter, so no optimizer, freeze or unfreeze call can train
    it and checkpoints hold the same keys as before.
    """

    def __init__(self, channels: int, momentum: float = 0.4, eps: float = 1e-12) -> None:
        super().__init__(channels, eps=eps, momentum=momentum)
        self.weight = None  # no scale parameter at all
        self.register_buffer("unit_scale", torch.ones(channels), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or self.running_mean is None
        if self.training and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)  # kept for nn.BatchNorm2d's state dict; momentum is fixed
        return F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                            self.running_var if not self.training or self.track_running_stats else None,
                            self.unit_scale, self.bias, use_batch_stats, self.momentum, self.eps)


def sync_batchnorm(model: nn.Module) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm``, for models with ``BatchNormNoScale`` too: the conversion
    copies ``weight`` (None here) and drops the unit-scale buffer, which gives CUDA's kernels a bias without a
    weight again. Each such layer gets the constant scale back, as a non-persistent buffer under the name
    SyncBatchNorm reads, so the checkpoint's keys stay the same."""
    unscaled = {name for name, m in model.named_modules() if isinstance(m, BatchNormNoScale)}
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, m in model.named_modules():
        if name in unscaled and isinstance(m, nn.SyncBatchNorm) and m.weight is None:
            del m._parameters["weight"]
            m.register_buffer("weight", torch.ones(m.num_features, device=m.bias.device), persistent=False)
    return model


class DiracConv(nn.Conv2d):
    """3x3 'same' convolution without bias whose first ``in_channels`` filters start as the identity."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, kernel_size=3, padding="same", bias=False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class ConvGroup(nn.Module):
    """conv -> 2x2 max-pool -> BatchNorm -> GELU -> conv -> BatchNorm -> GELU."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv1 = DiracConv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNormNoScale(channels_out)
        self.conv2 = DiracConv(channels_out, channels_out)
        self.norm2 = BatchNormNoScale(channels_out)
        self.activ = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


class GlobalMaxPool(nn.AdaptiveMaxPool2d):
    """The maximum over each channel's whole map, as one max-pool window of the map's size: the same values and
    gradients as ``nn.AdaptiveMaxPool2d(1)``, but an operation every ONNX exporter translates (torch 2.11's
    exporter stops at adaptive_max_pool2d, which its onnxscript leaves unimplemented). It is an
    ``nn.AdaptiveMaxPool2d(1)`` by type, so that inspection (receptive fields, the final feature layer) knows it
    for global pooling, whatever the size of the map; it has no parameters or buffers either way."""

    def __init__(self) -> None:
        super().__init__(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=x.shape[-2:])


class FastNet(nn.Module):
    """Whitening 2x2 conv, three ConvGroups, global max-pool, a bias-free linear head."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widths: tuple[int, int, int] = (64, 256, 256),
                 whiten_kernel: int = 2, even_sizes: bool = True) -> None:
        super().__init__()
        # airbench's unpadded 2x2 whitening turns 32x32 into 31x31, then 15, 7, 3. On a CPU, oneDNN's
        # convolutions (backward above all) ran faster on even sizes (docs/design.md, "The fast recipe"), so by
        # default the whitening conv pads one pixel right and bottom: 32, 16, 8, 4, for ~7% more multiply-adds.
        self.even_sizes = even_sizes
        whiten_width = 2 * in_channels * whiten_kernel**2
        # The whitening filters are fixed, so they are a buffer: no optimizer or unfreeze call can train them.
        self.register_buffer("whiten_weight", torch.zeros(whiten_width, in_channels, whiten_kernel, whiten_kernel))
        self.whiten_bias = nn.Parameter(torch.zeros(whiten_width))
        self.layers = nn.Sequential(
            nn.GELU(),
            ConvGroup(whiten_width, widths[0]),
            ConvGroup(widths[0], widths[1]),
            ConvGroup(widths[1], widths[2]),
            GlobalMaxPool(),
            nn.Flatten(1),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        with torch.no_grad():
            self.head.weight /= self.head.weight.std()  # unit-variance weights; forward() divides by the width
        # Without data the whitening layer is a plain random projection; train() calls init_from_data.
        nn.init.kaiming_normal_(self.whiten_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.even_sizes:
            x = F.pad(x, (0, 1, 0, 1))
        x = F.conv2d(x, self.whiten_weight.to(x.dtype), self.whiten_bias.to(x.dtype))
        x = self.layers(x)
        return self.head(x) / x.size(-1)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the whitening filters from ``images`` (normalised float, N x C x H x W; a few thousand suffice):
        the eigenvectors of the 2x2-patch covariance scaled by 1/sqrt(eigenvalue), each with its negative."""
        c, (h, w) = images.shape[1], self.whiten_weight.shape[2:]
        patches = images.float().unfold(2, h, 1).unfold(3, w, 1).transpose(1, 3).reshape(-1, c * h * w)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        filters = eigenvectors.T.reshape(-1, c, h, w) / torch.sqrt(eigenvalues.view(-1, 1, 1, 1) + eps)
        self.whiten_weight.copy_(torch.cat((filters, -filters)))


@register_model
def fastnet(num_classes: int = 10, in_channels: int = 3, input_size: int = 32,
            widths: tuple[int, int, int] = (64, 256, 256), even_sizes: bool = True) -> FastNet:
    """The fast recipe's network (airbench94's): 32x32 inputs, about 2M parameters; widths are tunable;
    ``even_sizes=False`` gives airbench's exact 31-15-7-3 feature-map sizes."""
    return FastNet(num_classes, in_channels, tuple(widths), even_sizes=even_sizes)
