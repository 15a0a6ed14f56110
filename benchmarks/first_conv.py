"""Can simple_cnn's first convolution (3 input channels) be computed faster than oneDNN computes it?

    python -m benchmarks.first_conv [--repeats 5] [--calls 50] [--name first_conv]

The first convolution of a CIFAR network has 27 values per output position (3 channels x 3 x 3), too few for the
convolution kernels' blocking; docs/design.md ("Training speed against the tutorial loop") names it as the least
efficient layer of the step. This times its training work, forward plus the weight and bias gradients (the input
needs no gradient), at batch 64, 32x32, channels-last, in bf16 and fp32, four ways:

- ``oneDNN``: ``nn.Conv2d`` as cnnkit trains it;
- ``im2col``: the 9 shifted views of the padded input concatenated along the channels (N x H x W x 27, which is
  channels-last already) and one matrix product with the 27 x 32 weights;
- ``im2col compiled``: the same function under ``torch.compile``;
- ``unfold``: ``F.unfold`` and a batched matrix product, the textbook way;
- ``space-to-depth``: the padded input's 2x2 blocks as 12 channels of a 17x17 map (``pixel_unshuffle``), and one
  2x2 convolution with 128 outputs, the 32 filters once for each of the four output positions of a block (their
  weights gathered from the 3x3 ones). The 2x2 max-pool after it would then be a maximum over the four groups of
  32 channels. 48 values per output position instead of 27, 1.78x the arithmetic, in a shape the kernels block
  better: does oneDNN run it faster?

Each repeat times ``--calls`` calls; the table gives the median per call. Writes
benchmarks/results/first_conv.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from benchmarks.record import write_json, write_markdown
from benchmarks.train_speed import cpu_info, cpu_label

BATCH, SIZE, OUT = 64, 32, 32


def im2col_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 3x3, padding-1 convolution of channels-last ``x`` as one matrix product; the result is channels-last."""
    n, c, h, w = x.shape
    padded = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))
    cols = torch.cat([padded[:, i:i + h, j:j + w, :] for i in range(3) for j in range(3)], dim=3)
    y = torch.addmm(bias, cols.reshape(-1, 9 * c), weight.permute(2, 3, 1, 0).reshape(9 * c, -1))
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)


def _space_to_depth_index() -> torch.Tensor:
    """Where each weight of the 2x2 convolution comes from in the flattened 3x3 weights (OUT x 3 x 3 x 3); the
    index OUT * 27 names an appended zero. Output channel (a * 2 + b) * OUT + o is filter o at row offset a and
    column offset b of the block; input channel c * 4 + dy * 2 + dx is pixel (dy, dx) of channel c in the block."""
    index = torch.full((4, OUT, 3, 2, 2, 2, 2), OUT * 27, dtype=torch.long)  # o', c, dy, dx, block row, block col
    for a, b, ky, kx in itertools.product(range(2), range(2), range(3), range(3)):
        row, col = a + ky, b + kx  # in the padded input, relative to the block's top left pixel
        for o, c in itertools.product(range(OUT), range(3)):
            index[a * 2 + b, o, c, row % 2, col % 2, row // 2, col // 2] = ((o * 3 + c) * 3 + ky) * 3 + kx
    return index.view(4 * OUT, 12, 2, 2)


SPACE_TO_DEPTH = _space_to_depth_index()


def space_to_depth_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The 3x3, padding-1 convolution as a 2x2 convolution over the padded input's 2x2 blocks: N x (4 * OUT) x
    H/2 x W/2, output channel (a * 2 + b) * OUT + o holding filter o at pixel (2i + a, 2j + b)."""
    blocks = F.pixel_unshuffle(F.pad(x, (1, 1, 1, 1)), 2)
    weights = torch.cat([weight.reshape(-1), weight.new_zeros(1)])[SPACE_TO_DEPTH]
    return F.conv2d(blocks, weights, bias.repeat(4))


def unfold_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    y = torch.matmul(weight.reshape(weight.shape[0], -1), F.unfold(x, 3, padding=1)) + bias.view(1, -1, 1)
    return y.view(n, -1, h, w)


def median_ms(step: Callable[[], object], repeats: int, calls: int) -> float:
    for _ in range(5):
        step()  # warm-up: oneDNN's kernel choice, allocations, compiling
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        times.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(times)


def measure(dtype: torch.dtype, repeats: int, calls: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(BATCH, 3, SIZE, SIZE).to(dtype).contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(3, OUT, 3, padding=1).to(dtype).to(memory_format=torch.channels_last)
    grad = torch.randn(BATCH, OUT, SIZE, SIZE).to(dtype).contiguous(memory_format=torch.channels_last)
    blocks_grad = torch.randn(BATCH, 4 * OUT, SIZE // 2, SIZE // 2).to(dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():  # every way computes the same convolution, to bf16 rounding
        diff = (conv(x).float() - im2col_conv(x, conv.weight, conv.bias).float()).abs().max().item()
        assert diff < 0.05, f"im2col differs from the convolution by {diff}"
        phases = space_to_depth_conv(x, conv.weight, conv.bias).float()  # N x (4 * OUT) x H/2 x W/2
        pixels = F.pixel_shuffle(phases.view(BATCH, 4, OUT, SIZE // 2, SIZE // 2).transpose(1, 2)
                                 .reshape(BATCH, OUT * 4, SIZE // 2, SIZE // 2), 2)
        diff = (conv(x).float() - pixels).abs().max().item()
        assert diff < 0.05, f"space-to-depth differs from the convolution by {diff}"
    ways = {"oneDNN": lambda x, w, b: conv(x), "im2col": im2col_conv,
            "im2col compiled": torch.compile(im2col_conv), "unfold": unfold_conv,
            "space-to-depth": space_to_depth_conv}
    result = {}
    for name, forward in ways.items():
        def step() -> None:
            y = forward(x, conv.weight, conv.bias)
            y.backward(grad if y.shape == grad.shape else blocks_grad)
        result[name] = round(median_ms(step, repeats, calls), 3)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--name", default="first_conv", help="results/NAME.json and .md (default first_conv)")
    args = parser.parse_args()
    cpu = cpu_info()
    rows = {"bf16": measure(torch.bfloat16, args.repeats, args.calls),
            "fp32": measure(torch.float32, args.repeats, args.calls)}
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_json(args.name, {"date": stamp, "cpu": cpu, "torch": torch.__version__, "ms": rows})
    ways = list(rows["bf16"])
    command = "".join(f" {a}" for a in sys.argv[1:])
    lines = [f"# simple_cnn's first convolution, forward + weight gradient (batch {BATCH}, {SIZE}x{SIZE}, 3 -> {OUT})",
             "", f"{stamp}; {cpu_label(cpu)}; torch {torch.__version__}; `python -m benchmarks.first_conv{command}`; "
             f"median ms per call over {args.repeats} repeats of {args.calls} calls.", "",
             "| dtype | " + " | ".join(ways) + " |", "|---|" + "---:|" * len(ways)]
    lines += [f"| {dtype} | " + " | ".join(f"{ms[w]:.2f}" for w in ways) + " |" for dtype, ms in rows.items()]
    write_markdown(args.name, lines)


if __name__ == "__main__":
    main()
