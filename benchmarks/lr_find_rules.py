"""Which rule turns the learning-rate range test's curve into a rate that trains?

    python -m benchmarks.lr_find_rules [--epochs 3] [--fixed 0.01 0.03 0.1 0.3]
        [--pairs cifar3a:simple_cnn cifar3b:simple_cnn cifar3a:convnet]

On two small data sets, 3-class subsets of CIFAR-10 (``cifar3a``: airplane, automobile, bird; ``cifar3b``: cat,
ship, truck; 600 images a class, the first by file name, from $CIFAR10_JPEG, default
/work/shared/datasets/cifar10-jpeg/train; 10% held out), the range test runs once per pair of data set and
model (seed 0, 200 steps, lr 1e-6 to 10, the settings of ``cnnkit lr-find``), and each rule reads the same curve:

- ``edge``: the end of the valley around the lowest smoothed loss (cnnkit's one-cycle rule before issue 24),
- ``edge/3``: a third of it (cnnkit's one-cycle rule since), or the default rate for a flat curve, as
  ``cnnkit.train.lr_find.suggest`` says,
- ``valley``: fastai's rule, halfway along the longest stretch over which the smoothed loss keeps falling,
- ``slide``: fastai's interval slide rule,
- ``min/10``: a tenth of the rate at the lowest smoothed loss (fastai's classic ``lr_min``; shown, not trained).

The generated ``shapes`` data is left out: at a size that fits a few CPU minutes (2,000 images, 3 epochs) neither
network learns it (``convnet``: val acc 0.10-0.16 at every rate from 0.004 to 0.75), and ``simple_cnn`` sits on
its starting plateau through the whole test, where cnnkit keeps the default rate and every rule reads noise.

Then the same short one-cycle run (SGD with Nesterov momentum, batch 64, seed 0) trains at each rule's rate and
at each fixed rate of ``--fixed``, and the table gives the validation accuracy, or the epoch in which the loss
became non-finite. A rule is good when its rate is never among those that diverge and close to the best fixed
rate. One torch thread. Writes benchmarks/results/lr_find_rules.json and .md.
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

from benchmarks.record import write_json, write_markdown
import cnnkit
from cnnkit.errors import NonFiniteLoss
from cnnkit.train.lr_find import _valley_edge, lr_find, suggest
from cnnkit.train.optim import DEFAULT_LR

CIFAR = os.environ.get("CIFAR10_JPEG", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets",
                                                    "cifar10-jpeg", "train"))
SUBSETS, PER_CLASS = {"cifar3a": ("airplane", "automobile", "bird"), "cifar3b": ("cat", "ship", "truck")}, 600


def fastai_valley(lrs: list[float], smoothed: list[float]) -> int:
    """Index of fastai's ``valley`` suggestion: the longest stretch over which the smoothed loss keeps falling
    (its longest decreasing subsequence), and the point halfway along it."""
    n = len(smoothed)
    run_length, start, end = [1] * n, 0, 0
    for i in range(1, n):
        for j in range(i):
            if smoothed[i] < smoothed[j] and run_length[i] < run_length[j] + 1:
                run_length[i] = run_length[j] + 1
            if run_length[end] < run_length[i]:
                end, start = i, i - run_length[i]
    third = (end - start) / 3
    return max(0, start + int(third) + int(third / 2))


def fastai_slide(lrs: list[float], smoothed: list[float], steps: int) -> int:
    """Index of fastai's ``slide`` suggestion: walking down from the highest rate, the last point where the
    slope of the smoothed loss still differs by more than a threshold from the slope a fixed interval lower.
    fastai's interval (15 points) and threshold (0.005 per point) are for its 100-step test; scaled to ``steps``."""
    n = len(smoothed)
    interval, threshold = max(1, round(15 * steps / 100)), 0.005 * 100 / steps
    slope = [(smoothed[min(i + 1, n - 1)] - smoothed[max(i - 1, 0)]) / (min(i + 1, n - 1) - max(i - 1, 0))
             for i in range(n)]
    right, left = n - 1, n - 1 - interval
    found = max(left, 0)
    while left >= 0 and abs(slope[right] - slope[left]) > threshold:
        found, right, left = left, right - 1, left - 1
    return found


def cifar_subset(folder: str, classes: tuple[str, ...]) -> str:
    """The first PER_CLASS images (by file name) of each of ``classes``, copied into ``folder``."""
    for name in classes:
        os.makedirs(os.path.join(folder, name))
        for file in sorted(os.listdir(os.path.join(CIFAR, name)))[:PER_CLASS]:
            shutil.copy(os.path.join(CIFAR, name, file), os.path.join(folder, name, file))
    return folder


def rules(r) -> dict[str, float]:
    """Each rule's rate, read from one range test's curve (the first tenth left out, as cnnkit and fastai do)."""
    settled = max(1, len(r.lrs) // 10)
    lrs, smoothed = r.lrs[settled:], r.smoothed[settled:]
    low = min(range(len(smoothed)), key=smoothed.__getitem__)
    return {"edge": lrs[_valley_edge(smoothed, low, smoothed[0])],
            "cnnkit: edge/3 (default if flat)": suggest(r.lrs, r.smoothed, "onecycle", DEFAULT_LR["sgd"])[0],
            "valley": lrs[fastai_valley(lrs, smoothed)], "slide": lrs[fastai_slide(lrs, smoothed, 200)],
            "min/10": lrs[low] / 10}


def train(model: str, data: dict, lr: float, epochs: int, folder: str) -> dict:
    try:
        r = cnnkit.train(model=model, **data, lr=lr, epochs=epochs, seed=0, progress=False, check_data=False,
                         out=tempfile.mkdtemp(dir=folder), log=io.StringIO())
        return {"val_acc": r.val_acc, "diverged_epoch": None, "train_time_s": r.train_time_s}
    except NonFiniteLoss as e:
        return {"val_acc": None, "diverged_epoch": int(str(e).split(":")[0].split()[1]), "train_time_s": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", default=["cifar3a:simple_cnn", "cifar3b:simple_cnn", "cifar3a:convnet"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--fixed", type=float, nargs="*", default=[0.01, 0.03, 0.1, 0.3])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        datasets = {name: dict(data=cifar_subset(os.path.join(folder, name), classes), val_split=0.1)
                    for name, classes in SUBSETS.items()}
        for pair in args.pairs:
            data_name, model = pair.split(":")
            data = datasets[data_name]
            # 200 steps, as measured: on these 1,620 images the default would now be 4 passes, 100 steps
            found = lr_find(model=model, **data, steps=200, seed=0, progress=False, log=io.StringIO())
            suggested = rules(found)
            print(data_name, model, {k: f"{v:.3g}" for k, v in suggested.items()}, flush=True)
            rows.append({"data": data_name, "model": model, "setting": "min/10", "lr": suggested.pop("min/10"),
                         "val_acc": None, "diverged_epoch": None, "train_time_s": None})
            rows.append({"data": data_name, "model": model, "setting": f"cnnkit's suggestion ({found.method})",
                         "lr": found.suggestion, "val_acc": None, "diverged_epoch": None, "train_time_s": None})
            rates = {**suggested, **{f"fixed {lr:g}": lr for lr in args.fixed}}
            for name, lr in rates.items():
                row = {"data": data_name, "model": model, "setting": name, "lr": lr,
                       **train(model, data, lr, args.epochs, folder)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"epochs": args.epochs, "cpu": cpu_name(), "cpus": os.cpu_count(), "machine": platform.machine(),
            "torch": torch.__version__, "torch_threads": 1, "load_before": load_before,
            "load_after": os.getloadavg()[0], "seconds": time.perf_counter() - start}
    write_json("lr_find_rules", {"meta": meta, "rows": rows})
    lines = [
        "# Range-test rules against fixed learning rates",
        "",
        f"One-cycle runs of {args.epochs} epochs, batch 64, SGD with Nesterov momentum, seed 0, on {PER_CLASS} CIFAR-10 "
        f"images a class, 10% held out (180 validation images: one image is 0.0056 of accuracy); "
        + "; ".join(f"`{name}`: {', '.join(classes)}" for name, classes in SUBSETS.items())
        + ". The range test: 200 steps, lr 1e-6 to 10, seed 0. "
        f"{meta['cpu']} ({meta['cpus']} cores shared with other work), torch {meta['torch']} on 1 thread, default "
        f"precision (bf16 autocast on a CPU with AVX512_BF16); {meta['seconds'] / 60:.0f} minutes in all.",
        "",
        "| data | model | rate from | lr | val acc after the last epoch |",
        "| --- | --- | --- | ---: | --- |",
    ]
    for r in rows:
        outcome = (f"{r['val_acc']:.4f}" if r["val_acc"] is not None else "(not trained)" if not r["diverged_epoch"]
                   else f"**diverged** in epoch {r['diverged_epoch']}")
        lines.append(f"| {r['data']} | {r['model']} | {r['setting']} | {r['lr']:.3g} | {outcome} |")
    write_markdown("lr_find_rules", lines)


def cpu_name() -> str:
    """The CPU's model name, and whether it has AVX512_BF16 (then the default precision is bf16 autocast)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        name = next(line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name"))
        return name + (" with AVX512_BF16" if "avx512_bf16" in info else "")
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
