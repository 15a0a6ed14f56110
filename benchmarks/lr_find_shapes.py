"""Does `cnnkit train --lr auto` (the learning-rate range test's suggestion) train as well as the default rate?

    python -m benchmarks.lr_find_shapes [--models simple_cnn cnn_bn convnet] [--epochs 3] [--num-samples 20000]
        [--seeds 0 1 2] [--sweep 0.03 0.1 0.2 0.3]

For each model and seed, on the generated ``shapes`` data: a short run with ``lr="auto"`` (the range test runs
first, with the run's own settings, and its suggestion becomes the peak of the one-cycle schedule), the same
run with the default rate (0.05, SGD with Nesterov momentum, one-cycle), and the same run at each fixed peak rate
of ``--sweep``, which shows whether any rate would have done better than the default. Everything else is equal,
including the seed, so when the test falls back to the default the two runs are the same run. Networks that sit
on a plateau at first (simple_cnn, cnn_bn) leave it after a number of steps that varies a lot from seed to seed,
so the table gives each setting's mean and median over the seeds. One torch thread, so that other processes on a
shared machine slow the runs down without changing their results.
Writes benchmarks/results/lr_find_shapes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch

from benchmarks.record import write_json, write_markdown
import cnnkit
from cnnkit.train.optim import DEFAULT_LR



def setting(lr: float | str | None) -> str:
    return "auto" if lr == "auto" else "default" if lr is None else f"fixed {lr:g}"


def run(model: str, lr: float | str | None, seed: int, epochs: int, num_samples: int, folder: str) -> dict:
    name = f"{model}-{setting(lr).replace(' ', '-')}-{seed}"
    with open(os.devnull, "w") as quiet:
        r = cnnkit.train(model=model, data="shapes", num_samples=num_samples, epochs=epochs, lr=lr, seed=seed,
                         progress=False, out=os.path.join(folder, name), log=quiet)
    with open(os.path.join(r.run_dir, "config.json")) as f:
        config = json.load(f)
    lr_find = None
    if os.path.exists(os.path.join(r.run_dir, "lr_find.json")):
        with open(os.path.join(r.run_dir, "lr_find.json")) as f:
            lr_find = json.load(f)
    return {"model": model, "seed": seed, "lr_setting": setting(lr), "lr": config["lr"],
            "lr_find": lr_find, "val_acc": r.val_acc, "best_val_acc": r.best_val_acc,
            "val_loss": r.val_loss, "train_time_s": r.train_time_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["simple_cnn", "cnn_bn", "convnet"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.03, 0.1, 0.2, 0.3],
                        help="also train at these fixed peak rates (none: only auto and the default)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            for seed in args.seeds:
                for lr in ("auto", None, *args.sweep):
                    rows.append(run(model, lr, seed, args.epochs, args.num_samples, folder))
                    print(json.dumps(rows[-1]), flush=True)
    meta = {"epochs": args.epochs, "num_samples": args.num_samples, "data": "shapes", "default_lr": DEFAULT_LR["sgd"],
            "cpus": os.cpu_count(), "machine": platform.machine(), "torch": torch.__version__, "torch_threads": 1,
            "load_before": load_before, "load_after": os.getloadavg()[0], "seconds": time.perf_counter() - start}
    write_json("lr_find_shapes", {"meta": meta, "rows": rows})
    lines = [
        "# `--lr auto` (learning-rate range test) against the default learning rate on `shapes`",
        "",
        f"{args.epochs} epochs on {args.num_samples:,} generated training images (2,000 validation images), batch 64, "
        f"SGD with Nesterov momentum, one-cycle schedule; the default peak rate is {DEFAULT_LR['sgd']}. The range "
        "test: 200 steps, lr 1e-6 to 10; for one-cycle it suggests the end of the valley around the lowest smoothed "
        "loss, or the optimizer's default when the loss does not fall by 5% (a flat curve; see "
        "cnnkit/train/lr_find.py). "
        f"{meta['cpus']} CPUs, torch {meta['torch']} on 1 thread; load average {load_before:.1f} at the start, "
        f"{meta['load_after']:.1f} at the end (other processes share these cores; times are not comparable).",
        "",
        "| model | seed | lr | range test | val acc (last) | best val acc | val loss | train s |",
        "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        found = r["lr_find"]
        test = (f"{found['method']}; lowest loss at {found['min_loss_lr']:.3g}, valley ends at "
                f"{found['edge_lr']:.3g}; {found['steps']} steps"
                if found else "-")
        lines.append(f"| {r['model']} | {r['seed']} | {r['lr_setting']} = {r['lr']:.3g} | {test} | {r['val_acc']:.4f} | "
                     f"{r['best_val_acc']:.4f} | {r['val_loss']:.4f} | {r['train_time_s']:.0f} |")
    lines += ["", "Each setting over the seeds (val acc, last epoch):", "",
              "| model | lr | mean | median | per seed |", "| --- | --- | ---: | ---: | --- |"]
    groups: dict[tuple[str, str], list[dict]] = {}  # (model, lr setting) -> its runs, one per seed, in run order
    for r in rows:
        groups.setdefault((r["model"], r["lr_setting"]), []).append(r)
    for (model, name), group in groups.items():
        accs = [r["val_acc"] for r in group]
        lrs = sorted({f"{r['lr']:.3g}" for r in group})
        lines.append(f"| {model} | {name} ({', '.join(lrs)}) | {statistics.mean(accs):.3f} | "
                     f"{statistics.median(accs):.3f} | {' / '.join(f'{a:.3f}' for a in accs)} |")
    write_markdown("lr_find_shapes", lines)


if __name__ == "__main__":
    main()
