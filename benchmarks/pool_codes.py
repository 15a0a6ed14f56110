"""Which dtype should the fused max-pool + ReLU store its codes in, on this CPU?

    python -m benchmarks.pool_codes [--isa avx2] [--precision auto|fp32|bf16] [--rounds 8] [--steps 40]

``PoolReLU`` (cnnkit/train/rewrite.py) writes one code per pooled value, which its backward pass reads: one byte
(uint8) or a value of the input's dtype (``code_dtype``; bytes where ATen runs AVX-512 code). This times
simple_cnn's whole training step, as ``cnnkit train`` builds it (the rewritten step model, the optimizer, autocast),
on real batches of the CIFAR-10 JPEG images (batch 64, the loader's augmentation), both ways alternated in one
process: ``--rounds`` rounds of ``--steps`` steps each way, the order flipping every round, so that a neighbour's
load lands on both alike. The table gives the median ms per step of each way and the median of the rounds'
ratios. ``--isa avx2`` runs it with oneDNN, ATen and MKL capped to AVX2 (as benchmarks/train_speed.py does), the
code path of an AVX2-only CPU. Writes benchmarks/results/NAME.json and .md (default pool_codes, pool_codes_avx2
with --isa avx2).
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
import statistics
import sys
import tempfile
import time

import torch

from benchmarks.record import write_json, write_markdown
from benchmarks.train_speed import DATA, ISA_CAPS, cpu_info, cpu_label


def time_steps(precision: str, rounds: int, steps: int) -> dict[str, list[float]]:
    """ms per training step with byte codes and with codes of the input's dtype, one figure per round."""
    from cnnkit.train import loop, rewrite
    from cnnkit.train.options import make_config
    from cnnkit.train.precision import autocast

    cfg = make_config(None, dict(model="simple_cnn", data=os.path.abspath(DATA), val_split=0.1, epochs=5,
                                 batch_size=64, progress=False, precision=precision,
                                 out=os.path.join(tempfile.mkdtemp(), "run")))
    t = loop._set_up(cfg, io.StringIO(), None)  # what `cnnkit train` runs: its step model, loader and optimizer
    loader, net, optimizer = t.pieces.train_loader, t.stage.net, t.stage.optimizer
    loader.set_epoch(1)
    batches = list(itertools.islice(loader.batches(), steps))

    def step(images: torch.Tensor, labels: torch.Tensor) -> None:
        with autocast(t.machine.device, t.machine.amp_dtype):
            loss = t.pieces.criterion(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ways = {"bytes": True, "input dtype": False}
    ms: dict[str, list[float]] = {way: [] for way in ways}
    for byte_codes in ways.values():  # compile both ways first (the module constant is part of what is compiled)
        rewrite.BYTE_CODES = byte_codes
        for images, labels in batches[:10]:
            step(images, labels)
    for r in range(rounds):
        for way in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            rewrite.BYTE_CODES = ways[way]
            start = time.perf_counter()
            for images, labels in batches:
                step(images, labels)
            ms[way].append((time.perf_counter() - start) / len(batches) * 1e3)
        print(f"round {r + 1}: " + ", ".join(f"{way} {v[-1]:.2f} ms" for way, v in ms.items()), file=sys.stderr)
    ms["precision"] = str(t.machine.amp_dtype or torch.float32).replace("torch.", "")  # type: ignore[assignment]
    return ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--isa", choices=sorted(ISA_CAPS), help="cap the instruction sets (a fresh process)")
    parser.add_argument("--precision", default="auto", help="cnnkit train's --precision (default auto)")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="steps per round and way (real batches, reused)")
    parser.add_argument("--name", help="results/NAME.json and .md (default pool_codes[_ISA])")
    args = parser.parse_args()
    if args.isa and any(os.environ.get(k) != v for k, v in ISA_CAPS[args.isa].items()):
        # The caps must be in the environment before torch loads: run again in a process that has them.
        argv = [a for a in sys.argv[1:] if a not in ("--isa", args.isa) and not a.startswith("--isa=")]
        if not args.name:
            argv += ["--name", f"pool_codes_{args.isa}"]
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.pool_codes", *argv],
                  {**os.environ, **ISA_CAPS[args.isa]})
    name = args.name or "pool_codes"
    isa = next((level for level, caps in ISA_CAPS.items() if all(os.environ.get(k) == v for k, v in caps.items())), None)
    cpu = cpu_info()
    ms = time_steps(args.precision, args.rounds, args.steps)
    precision = ms.pop("precision")
    ratios = [a / b for a, b in zip(ms["bytes"], ms["input dtype"])]
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_json(name, {"date": stamp, "cpu": cpu, "torch": torch.__version__, "precision": precision,
                      "steps": args.steps, "ms_per_step": ms, "ratios_bytes_over_dtype": ratios})
    lines = [f"# simple_cnn's training step with the fused pools' codes as bytes or of the input's dtype ({precision})",
             "", f"{stamp}; {cpu_label(cpu)}; torch {torch.__version__}; `python -m benchmarks.pool_codes"
             f"{' --isa ' + isa if isa else ''}`; batch 64, real CIFAR-10 JPEG batches; median ms per step "
             f"over {args.rounds} rounds of {args.steps} steps each way, alternated.", "",
             "| codes | ms per step: median (rounds) |", "|---|---|"]
    lines += [f"| {way} | {statistics.median(v):.2f} ({', '.join(f'{x:.2f}' for x in v)}) |" for way, v in ms.items()]
    faster = sum(r > 1 for r in ratios)
    lines += ["", f"Bytes' time over the input dtype's: median **{statistics.median(ratios):.3f}** (rounds: "
              f"{', '.join(f'{r:.3f}' for r in ratios)}); the input dtype faster in {faster} of {len(ratios)} rounds. "
              f"cnnkit stores bytes {'here' if torch.backends.cpu.get_cpu_capability() == 'AVX512' else 'only with AVX-512, not here'}."]
    write_markdown(name, lines)


if __name__ == "__main__":
    main()
