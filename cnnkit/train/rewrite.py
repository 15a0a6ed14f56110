"""Rewrites of a model for a faster training step: the same function and gradients (for dropout, masks drawn
from the same distribution), less work.

``pool_before_relu``: ReLU then max-pool computes exactly what max-pool then ReLU computes, because ReLU is
monotone: max(relu(a), relu(b)) = relu(max(a, b)). Pooled first, the ReLU (and its backward pass) touches a
quarter of the values for a 2x2 pool. The gradients agree too: the pool routes each window's gradient to the
first maximum in both orders, and ReLU's backward zeroes it in both when that maximum is not positive.

``fuse_pool_relu``: the reordered 2x2 max-pool and ReLU as one layer, ``PoolReLU``, whose forward and backward
passes are each one loop compiled by torch.compile on a CPU. PyTorch's CPU pool writes a 64-bit index per
output value, and its backward pass zero-fills the whole input gradient and then scatters into it. The fused
forward pass writes the output and a small code per output value instead: which of the window's four
positions holds its first maximum (the one PyTorch's pool picks: ties go up, then left), or that the maximum is
not positive, so ReLU's backward zeroes it. The backward pass writes every input gradient value once from that
code. The code is one byte where ATen runs AVX-512 code, a value of the input's dtype elsewhere
(``code_dtype``). The one difference: a window whose maximum is NaN passes no gradient here, where PyTorch's pair passes
one to its last NaN; a step with a NaN is stopped or skipped anyway (``--nan``).

``rand_dropout``: every ``nn.Dropout`` draws its mask from ``torch.rand`` instead of ``bernoulli_``. Each value is
kept with the same probability, 1 - p, and scaled by the same 1 / (1 - p); only the draws differ (PyTorch's CPU
``bernoulli_`` draws through MKL's own generator, seeded from torch's), and that one is several times slower
than ``torch.rand`` for the values after simple_cnn's first linear layer. Only for CPU training: on a GPU dropout
is one fast kernel already.

docs/design.md ("The training step") has what each rewrite saved, measured side by side.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn

from cnnkit import compiled

# Inputs of fewer values keep the plain layers: there the compiled loops save too little to matter.
# (Runs of fewer than compiled.MIN_BATCHES batches keep them too: compiling would not pay.)
FUSE_MIN_VALUES = 2**19


def pool_before_relu(module: nn.Module) -> nn.Module:
    """``module`` with every ReLU directly followed by a MaxPool2d in an ``nn.Sequential`` run after the pool.

    The result shares every layer, parameter and buffer with ``module``, which is left as it is (its printed
    layer order, hooks by name, checkpoints): only the containers whose order changes are copied. Modules whose
    ``forward`` calls ReLU and pool itself (torchvision's ResNet stem) are left alone.
    """

    def swap(layers: list[nn.Module]) -> list[nn.Module]:
        i = 0
        while i < len(layers) - 1:
            if isinstance(layers[i], nn.ReLU) and _plain_pool(layers[i + 1]):
                layers[i], layers[i + 1] = layers[i + 1], layers[i]
                i += 1
            i += 1
        return layers

    return _rewrite_sequentials(module, swap)


def fuse_pool_relu(module: nn.Module, batches: int) -> nn.Module:
    """``module`` with every 2x2 stride-2 MaxPool2d directly followed by a ReLU in an ``nn.Sequential`` (the order
    ``pool_before_relu`` leaves) replaced by one ``PoolReLU`` and an ``nn.Identity`` in the ReLU's place, so
    that names do not change; ``module`` as it is for a run of fewer than ``compiled.MIN_BATCHES`` ``batches``.
    Shares layers and parameters as ``pool_before_relu`` does."""
    if batches < compiled.MIN_BATCHES:
        return module

    def fuse(layers: list[nn.Module]) -> list[nn.Module]:
        for i in range(len(layers) - 1):
            if _halving_pool(layers[i]) and isinstance(layers[i + 1], nn.ReLU):
                layers[i], layers[i + 1] = PoolReLU(layers[i], layers[i + 1]), nn.Identity()
        return layers

    return _rewrite_sequentials(module, fuse)


class PoolReLU(nn.Module):
    """relu(max_pool2d(x, 2)) in one compiled loop each way, where that is faster; else the two layers as they are.

    The compiled loops run while training on a CPU, for float32 or bfloat16 channels-last inputs with even
    height and width and at least ``FUSE_MIN_VALUES`` values, of the first such shape this layer sees (the
    training batch): other shapes (the epoch's last, shorter batch) run the two layers, so nothing recompiles.
    Where compiling fails (no C++ compiler, say) a warning says so (once a run) and every PoolReLU runs the two
    layers.
    """

    def __init__(self, pool: nn.MaxPool2d, relu: nn.ReLU) -> None:
        super().__init__()
        self.pool, self.relu = pool, relu
        self.shape: torch.Size | None = None  # the one input shape the compiled loops run on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (compiled.available() last: it is asked only where the loop would run)
        if self.training and x.device.type == "cpu" and x.dim() == 4 \
                and x.dtype in (torch.float32, torch.bfloat16) and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0 \
                and x.numel() >= FUSE_MIN_VALUES and x.is_contiguous(memory_format=torch.channels_last) \
                and compiled.available():
            self.shape = self.shape or x.shape
            if x.shape == self.shape:
                return _PoolReLUFunction.apply(x)
        return self.relu(self.pool(x))


# The dtype the fused pool's codes are stored in. One byte is a quarter of a float32's memory traffic, but the
# compiled loops load bytes well only with AVX-512: built for AVX2, each load of a few bytes into a vector goes
# through a slow partial load, and the loops ran several times slower than with codes of the input's dtype
# (docs/design.md, "The training step"). ATen's capability is fixed when torch loads.
BYTE_CODES = torch.backends.cpu.get_cpu_capability() == "AVX512"


def code_dtype(dtype: torch.dtype) -> torch.dtype:
    """What ``_pool_relu`` stores the codes of an input of ``dtype`` in: uint8 on AVX-512, ``dtype`` elsewhere."""
    return torch.uint8 if BYTE_CODES else dtype


def _pool_relu(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(max_pool2d(x, 2)) of a channels-last ``x``, and each output value's code (``code_dtype``,
    N x H/2 x W/2 x C): 0-3, the window position of its first maximum in the order top left, top right, bottom
    left, bottom right; 4 where the maximum is not positive (ReLU's gradient is zero there)."""
    n, c, h, w = x.shape
    windows = x.permute(0, 2, 3, 1).reshape(n, h // 2, 2, w // 2, 2, c)
    a, b = windows[:, :, 0, :, 0], windows[:, :, 0, :, 1]  # top row of each window
    d, e = windows[:, :, 1, :, 0], windows[:, :, 1, :, 1]  # bottom row
    top, bottom = torch.maximum(a, b), torch.maximum(d, e)
    highest = torch.maximum(top, bottom)
    code = torch.where(top >= bottom, torch.where(a >= b, 0, 1), torch.where(d >= e, 2, 3))
    code = torch.where(highest > 0, code, 4).to(code_dtype(x.dtype))
    return torch.relu(highest).permute(0, 3, 1, 2), code


def _pool_relu_grad(code: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The input gradient of ``_pool_relu`` from its codes and output gradient ``grad``: each window position
    gets ``grad`` where the code names it, zero elsewhere."""
    n, h2, w2, c = code.shape
    grad = grad.permute(0, 2, 3, 1).reshape(n, h2, 1, w2, 1, c)
    # Compared in the gradient's dtype (a no-op conversion where the codes are stored in it): a uint8 comparison
    # kept the compiled loop from being vectorised.
    position = torch.arange(4, dtype=grad.dtype).view(1, 1, 2, 1, 2, 1)
    routed = torch.where(code.to(grad.dtype).view(n, h2, 1, w2, 1, c) == position, grad, torch.zeros((), dtype=grad.dtype))
    return routed.reshape(n, 2 * h2, 2 * w2, c).permute(0, 3, 1, 2)


class _PoolReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out, code = compiled.run(_pool_relu, x, what=_WHAT)
        ctx.save_for_backward(code)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (code,) = ctx.saved_tensors
        return compiled.run(_pool_relu_grad, code, grad.contiguous(memory_format=torch.channels_last), what=_WHAT)


_WHAT = "fused max-pool + ReLU"


def rand_dropout(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.Dropout`` (0 < p < 1) in an ``nn.Sequential`` wrapped in a ``RandDropout``;
    shares layers and parameters as ``pool_before_relu`` does."""

    def wrap(layers: list[nn.Module]) -> list[nn.Module]:
        return [RandDropout(layer) if type(layer) is nn.Dropout and 0 < layer.p < 1 else layer for layer in layers]

    return _rewrite_sequentials(module, wrap)


class RandDropout(nn.Module):
    """``dropout`` (an ``nn.Dropout``, whose p and train/eval mode it follows) with its mask drawn by ``torch.rand``
    from torch's generator: the same computation as ``F.dropout`` (keep with probability 1 - p, then divide by
    1 - p), with a faster draw on a CPU."""

    def __init__(self, dropout: nn.Dropout) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.dropout.p
        if not self.dropout.training or not 0 < p < 1:
            return self.dropout(x)  # the layer itself: identity in eval mode, its own edge cases (p = 1: zeros)
        keep = torch.rand(x.shape, device=x.device) >= p  # float32 draws: P(keep) is 1 - p to 2**-24
        return x * keep.to(x.dtype).div_(1 - p)


def _plain_pool(layer: nn.Module) -> bool:
    return isinstance(layer, nn.MaxPool2d) and not layer.return_indices


def _halving_pool(layer: nn.Module) -> bool:
    """Whether ``layer`` is the plain 2x2 stride-2 max-pool that ``PoolReLU`` computes."""
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    return (_plain_pool(layer) and pair(layer.kernel_size) == pair(layer.stride or layer.kernel_size) == (2, 2)
            and pair(layer.padding) == (0, 0) and pair(layer.dilation) == (1, 1) and not layer.ceil_mode)


def _rewrite_sequentials(module: nn.Module, change: Callable[[list[nn.Module]], list[nn.Module]]) -> nn.Module:
    """``module`` with ``change`` applied to the layer list of every ``nn.Sequential`` in it. Containers whose
    layers change are shallow copies (the same parameters, buffers and hooks); the rest are shared as they are."""
    children = {name: _rewrite_sequentials(child, change) for name, child in module.named_children()}
    if isinstance(module, nn.Sequential):
        children = dict(zip(children, change(list(children.values()))))  # the same names in place
    if all(children[name] is child for name, child in module.named_children()):
        return module
    rewritten = copy.copy(module)
    rewritten._modules = children
    return rewritten
