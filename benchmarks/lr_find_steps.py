"""Does the range test suggest about the same rate from the shorter sweep it takes on a small data set?

    python -m benchmarks.lr_find_steps [--seeds 0 1 2]

Without ``--steps``, ``cnnkit lr-find`` takes 200 steps, but at most 4 passes over the training images and at
least 50 steps (cnnkit/train/lr_find.py, "How many steps"). On the first 300 and 600 images a class of
``cifar3a`` of benchmarks/lr_find_rules.py (airplane, automobile, bird from $CIFAR10_JPEG; 10% held out: 810 and
1,620 training images, 12 and 25 batches of 64 a pass), the test runs with that default (50 and 100 steps) and
with 200 steps, for ``convnet`` (seeds ``--seeds``) and ``simple_cnn`` (seed 0), and once with 39 steps at the
smoothing 0.98 of 200 steps against the default smoothing of 39 steps (a quarter of the sweep: 0.897), which
shows why the smoothing follows the sweep's length. One torch thread. Writes
benchmarks/results/lr_find_steps.json and .md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import tempfile
import time

import torch

from benchmarks.lr_find_rules import CIFAR, SUBSETS, cpu_name
from benchmarks.record import write_json, write_markdown
from cnnkit.train.lr_find import lr_find



def subset(folder: str, per_class: int) -> str:
    """The first ``per_class`` images (by file name) of each class of cifar3a, copied into ``folder``."""
    for name in SUBSETS["cifar3a"]:
        os.makedirs(os.path.join(folder, name))
        for file in sorted(os.listdir(os.path.join(CIFAR, name)))[:per_class]:
            shutil.copy(os.path.join(CIFAR, name, file), os.path.join(folder, name, file))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory() as folder:
        data = {n: subset(os.path.join(folder, f"cifar3a-{n}"), n) for n in (300, 600)}
        runs = [(300, "convnet", seed, steps, None) for seed in args.seeds for steps in (None, 200)]
        runs += [(600, "convnet", 0, None, None), (600, "convnet", 0, 200, None)]
        runs += [(n, "simple_cnn", 0, steps, None) for n in (300, 600) for steps in (None, 200)]
        runs += [(300, "convnet", 0, 39, 0.98), (300, "convnet", 0, 39, None)]
        for per_class, model, seed, steps, smoothing in runs:
            r = lr_find(model=model, data=data[per_class], val_split=0.1, batch_size=64, seed=seed, steps=steps,
                        smoothing=smoothing, progress=False, log=io.StringIO())
            row = {"per_class": per_class, "model": model, "seed": seed,
                   "steps": "default" if steps is None else steps, "smoothing": smoothing or "default",
                   "taken": r.steps, "suggestion": r.suggestion, "method": r.method, "edge_lr": r.edge_lr,
                   "blowup_lr": r.blowup_lr, "seconds": r.seconds}
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"cpu": cpu_name(), "machine": platform.machine(), "torch": torch.__version__, "torch_threads": 1,
            "seconds": time.perf_counter() - start}
    write_json("lr_find_steps", {"meta": meta, "rows": rows})
    lines = [
        "# Range-test length on a small data set",
        "",
        "The first 300 or 600 images a class of CIFAR-10's airplane, automobile and bird, 10% held out (810 or 1,620 "
        "training images), batch 64, lr 1e-6 to 10. `default` steps: 4 passes, at least 50 (50 and 100 steps here); "
        f"`default` smoothing: a quarter of the sweep, at most 0.98. {meta['cpu']}, torch {meta['torch']} on 1 "
        f"thread; {meta['seconds'] / 60:.0f} minutes in all (the seconds are of the sweep alone, on a shared machine).",
        "",
        "| images a class | model | seed | steps | smoothing | steps taken | suggestion | rule | valley's end | "
        "blow-up at | seconds |",
        "| ---: | --- | ---: | --- | --- | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        blowup = f"{r['blowup_lr']:.3g}" if r["blowup_lr"] is not None else "-"
        lines.append(f"| {r['per_class']} | {r['model']} | {r['seed']} | {r['steps']} | {r['smoothing']} | "
                     f"{r['taken']} | {r['suggestion']:.3g} | {r['method']} | {r['edge_lr']:.3g} | {blowup} | "
                     f"{r['seconds']:.0f} |")
    write_markdown("lr_find_steps", lines)


if __name__ == "__main__":
    main()
