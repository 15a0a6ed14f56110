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
- ``unfold``: ``F.unfold`` and a batched matrix product, the textbook way.

Each repeat times ``--calls`` calls; the table gives the median per call. Writes
benchmarks/results/first_conv.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
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
    with torch.no_grad():  # every way computes the same convolution, to bf16 rounding
        diff = (conv(x).float() - im2col_conv(x, conv.weight, conv.bias).float()).abs().max().item()
        assert diff < 0.05, f"im2col differs from the convolution by {diff}"
    ways = {"oneDNN": lambda x, w, b: conv(x), "im2col": im2col_conv,
            "im2col compiled": torch.compile(im2col_conv), "unfold": unfold_conv}
    result = {}
    for name, forward in ways.items():
        def step() -> None:
            forward(x, conv.weight, conv.bias).backward(grad)
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
    lines = [f"# simple_cnn's first convolution, forward + weight gradient (batch {BATCH}, {SIZE}x{SIZE}, 3 -> {OUT})",
             "", f"{stamp}; {cpu_label(cpu)}; torch {torch.__version__}; `python -m benchmarks.first_conv`; "
             f"median ms per call over {args.repeats} repeats of {args.calls} calls.", "",
             "| dtype | " + " | ".join(ways) + " |", "|---|" + "---:|" * len(ways)]
    lines += [f"| {dtype} | " + " | ".join(f"{ms[w]:.2f}" for w in ways) + " |" for dtype, ms in rows.items()]
    write_markdown(args.name, lines)


if __name__ == "__main__":
    main()
