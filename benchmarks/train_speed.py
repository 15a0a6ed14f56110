"""How fast does cnnkit train a CNN on this machine, against the plain PyTorch loop a tutorial reader writes?

    python -m benchmarks.train_speed                     # everything below, about 25 minutes on 2 cores
    python -m benchmarks.train_speed --parts seed,cnnkit --epochs 3 --rounds 3

Parts, each run in its own child process (so its peak resident memory is its own):
- ``peak``: the machine's matrix-product rate, fp32 and bf16 (2048x2048 products, median of repeats);
- ``seed``: the seed-style loop, written plainly below: SimpleCNN, torchvision ImageFolder with per-sample
  PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader
  with 2 workers, fp32, SGD lr 0.01 momentum 0.9, batch 64;
- ``cnnkit``: ``cnnkit.train`` on the same model, data, validation images, batch size and epochs, with its
  defaults (uint8 cache, batched augmentation, bf16 where the CPU has bf16 matrix instructions,
  channels_last, SGD with a one-cycle schedule); ``cnnkit_fp32`` the same in fp32; ``cnnkit_compile``
  the same with ``--compile``;
- ``fast``: ``cnnkit train --recipe fast`` on the same data: validation accuracy (with test-time
  augmentation) and wall time from the call to the result, data loading included.

Speeds are training images per second of each epoch (data loading and augmentation included, validation
not); a run's speed is the median over its epochs. The speed parts run in ``--rounds`` rounds, each round
one run of each part in turn (seed, cnnkit, cnnkit_fp32, ...), so that a neighbour's load on this shared
machine lands on all of them alike: a part's figure is the median over the rounds, and its ratio to the
seed loop the median of the ratios within each round. The data are the CIFAR-10 JPEG images in
``../shared/datasets/cifar10-jpeg/train``; 10% of each class is held out for validation, the same images
for every part. Writes benchmarks/results/train_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

RESULTS = os.path.join(os.path.dirname(__file__), "results")
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10-jpeg", "train")
PARTS = ("peak", "seed", "cnnkit", "cnnkit_fp32", "fast")
SPEED_PARTS = ("seed", "cnnkit", "cnnkit_fp32", "cnnkit_compile")  # run in rounds


# ---------------------------------------------------------------------------------------------------------
# The seed-style loop, as the tutorials write it.
# ---------------------------------------------------------------------------------------------------------

class SimpleCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(64, 128, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.fc1 = torch.nn.Linear(128 * 4 * 4, 256)
        self.dropout = torch.nn.Dropout(0.5)
        self.fc2 = torch.nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = self.pool(torch.relu(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.dropout(torch.relu(self.fc1(x))))


def split_files(root: str) -> tuple[list[str], list[str]]:
    """The training and validation files of cnnkit's own 10% stratified split of ``root``."""
    from cnnkit.data.sources import ImageSet, scan_folder, split

    files, labels, classes = scan_folder(root)
    train, val = split(ImageSet(labels=labels, classes=classes, files=files), 0.1)
    return train.files, val.files


def run_seed(root: str, epochs: int) -> dict:
    import torchvision
    import torchvision.transforms as T

    torch.manual_seed(0)
    normalize = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.ToTensor(), normalize])
    train_files, val_files = split_files(root)
    full_train = torchvision.datasets.ImageFolder(root, transform=train_tf)
    full_val = torchvision.datasets.ImageFolder(root, transform=val_tf)
    index = {os.path.abspath(path): i for i, (path, _) in enumerate(full_train.samples)}
    train_set = torch.utils.data.Subset(full_train, [index[os.path.abspath(f)] for f in train_files])
    val_set = torch.utils.data.Subset(full_val, [index[os.path.abspath(f)] for f in val_files])
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=64, shuffle=True, num_workers=2)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=500, num_workers=2)

    model = SimpleCNN()
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    speeds, accs = [], []
    for epoch in range(epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        speeds.append(seen / (time.perf_counter() - start))
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for images, labels in val_loader:
                correct += (model(images).argmax(1) == labels).sum().item()
                total += len(labels)
        accs.append(correct / total)
        print(f"seed epoch {epoch + 1}: {speeds[-1]:,.0f} images/s, val acc {accs[-1]:.4f}", file=sys.stderr)
    return {"images_per_s_epochs": speeds, "images_per_s": statistics.median(speeds), "val_acc": accs[-1],
            "val_acc_epochs": accs, "num_train": len(train_set), "num_val": len(val_set)}


# ---------------------------------------------------------------------------------------------------------
# cnnkit, the machine's peak, the fast recipe.
# ---------------------------------------------------------------------------------------------------------

def run_cnnkit(root: str, epochs: int, out: str, **options) -> dict:
    import csv

    import cnnkit

    result = cnnkit.train(model="simple_cnn", data=root, val_split=0.1, epochs=epochs, batch_size=64, out=out,
                          progress=False, log=sys.stderr, **options)
    with open(os.path.join(out, "metrics.csv")) as f:
        speeds = [float(row["images_per_s"]) for row in csv.DictReader(f)]
    macs = cnnkit.summary("simple_cnn", input_size=(3, 32, 32)).total_macs
    return {"images_per_s_epochs": speeds, "images_per_s": statistics.median(speeds), "val_acc": result.val_acc,
            "precision": result.precision, "num_train": result.num_train, "num_val": result.num_val,
            "macs_per_image": macs, "wall_time_s": result.wall_time_s}


def run_fast(root: str, out: str) -> dict:
    import cnnkit

    result = cnnkit.train(recipe="fast", data=root, val_split=0.1, out=out, progress=False, log=sys.stderr)
    return {"tta_val_acc": result.tta_val_acc, "val_acc": result.val_acc, "wall_time_s": result.wall_time_s,
            "train_time_s": result.train_time_s, "epochs": result.epochs, "images_per_s": result.images_per_s,
            "num_train": result.num_train, "num_val": result.num_val}


def run_peak(repeats: int = 7, n: int = 2048) -> dict:
    """Matrix-product rate in GFLOP/s (2 n^3 per product), the median of ``repeats``, fp32 and bf16."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        rates = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(3):
                a @ b
            rates.append(3 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
        out[f"{name}_gflops"] = statistics.median(rates)
    return out


def run_part(part: str, args: argparse.Namespace) -> dict:
    out = os.path.join(args.work, part)
    if part == "peak":
        return run_peak()
    if part == "seed":
        return run_seed(args.data, args.epochs)
    if part == "cnnkit":
        return run_cnnkit(args.data, args.epochs, out)
    if part == "cnnkit_fp32":
        return run_cnnkit(args.data, args.epochs, out, precision="fp32")
    if part == "cnnkit_compile":
        return run_cnnkit(args.data, args.epochs, out, compile=True)
    if part == "fast":
        return run_fast(args.data, out)
    raise SystemExit(f"unknown part {part}")


def child(part: str, args: argparse.Namespace) -> dict:
    """Run one part in a fresh process; its result plus the process's peak resident memory."""
    cmd = [sys.executable, "-m", "benchmarks.train_speed", "--child", part, "--data", args.data,
           "--epochs", str(args.epochs), "--work", args.work]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(RESULTS) + "/..")
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"part {part} failed (status {status})")
    result = json.loads(output.strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    result["process_wall_s"] = time.perf_counter() - start
    return result


def combine(runs: list[dict], seed_runs: list[dict] | None) -> dict:
    """One speed part over its rounds: the last round's result plus the medians across rounds."""
    out = dict(runs[-1])
    out["rounds"] = runs
    out["images_per_s"] = statistics.median(r["images_per_s"] for r in runs)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    if seed_runs:
        out["x_seed_rounds"] = [r["images_per_s"] / s["images_per_s"] for r, s in zip(runs, seed_runs)]
        out["x_seed"] = statistics.median(out["x_seed_rounds"])
    return out


def table(r: dict) -> str:
    some = r["parts"].get("cnnkit", r["parts"].get("seed", {}))
    lines = [f"# Training speed on {r['machine']}", "",
             f"{r['epochs']} epochs of CIFAR-10 JPEG ({some.get('num_train', '?')} training images, 10% held out), "
             f"{r['rounds']} rounds of the speed runs, one after another within each round. A run's images/s is "
             "the median over its epochs; the table gives each round's and their median. x seed is the median "
             "of the ratios within each round.", ""]
    peak = r["parts"].get("peak")
    if peak:
        lines += [f"Matrix-product peak: {peak['fp32_gflops']:.0f} GFLOP/s fp32, {peak['bf16_gflops']:.0f} GFLOP/s bf16.", ""]
    lines += ["| run | images/s: median (rounds) | x seed (rounds) | val acc | achieved GFLOP/s (% of peak) | peak RSS MB |",
              "|---|---|---|---|---|---|"]
    for name in SPEED_PARTS:
        p = r["parts"].get(name)
        if not p:
            continue
        rounds = ", ".join(f"{q['images_per_s']:,.0f}" for q in p["rounds"])
        ratio = (f"{p['x_seed']:.2f} ({', '.join(f'{x:.2f}' for x in p['x_seed_rounds'])})"
                 if "x_seed" in p else "")
        accs = sorted({f"{q['val_acc']:.4f}" for q in p["rounds"]})
        flops = ""
        if "macs_per_image" in p and peak:
            achieved = p["images_per_s"] * 6 * p["macs_per_image"] / 1e9  # forward 2*MACs, backward about twice that
            ref = peak["bf16_gflops"] if p["precision"] == "bf16" else peak["fp32_gflops"]
            flops = f"{achieved:.0f} ({100 * achieved / ref:.0f}% of {p['precision']})"
        lines.append(f"| {name} | {p['images_per_s']:,.0f} ({rounds}) | {ratio} | {' / '.join(accs)} | {flops} "
                     f"| {p['peak_rss_mb']:,.0f} |")
    fast = r["parts"].get("fast")
    if fast:
        lines += ["", f"`--recipe fast`: val acc {fast['val_acc']:.4f}, with test-time augmentation "
                      f"{fast['tta_val_acc']:.4f}, after {fast['epochs']} epochs; wall time {fast['wall_time_s']:.0f} s "
                      f"({fast['wall_time_s'] / 60:.1f} min, data loading from the cache included; training "
                      f"{fast['train_time_s']:.0f} s); peak RSS {fast['peak_rss_mb']:,.0f} MB."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {PARTS + ('cnnkit_compile',)}")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each speed part, interleaved")
    parser.add_argument("--data", default=os.path.abspath(DATA))
    parser.add_argument("--work", default=os.path.join("/tmp", "cnnkit-train-speed"))
    parser.add_argument("--name", default="train_speed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import shutil

        shutil.rmtree(os.path.join(args.work, args.child), ignore_errors=True)
        print(json.dumps(run_part(args.child, args)))
        return
    os.makedirs(args.work, exist_ok=True)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "date": time.strftime("%Y-%m-%d %H:%M"), "epochs": args.epochs, "rounds": args.rounds, "parts": {}}
    parts = args.parts.split(",")
    speed = [p for p in parts if p in SPEED_PARTS]
    runs: dict[str, list[dict]] = {p: [] for p in speed}
    for round_ in range(1, args.rounds + 1):
        for part in speed:
            print(f"== {part}, round {round_} of {args.rounds}", file=sys.stderr, flush=True)
            runs[part].append(child(part, args))
            print(json.dumps(runs[part][-1]), file=sys.stderr, flush=True)
    for part in parts:
        if part in runs:
            results["parts"][part] = combine(runs[part], runs.get("seed"))
        else:
            print(f"== {part}", file=sys.stderr, flush=True)
            results["parts"][part] = child(part, args)
            print(json.dumps(results["parts"][part]), file=sys.stderr, flush=True)
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
        f.write(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
