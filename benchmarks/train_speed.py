"""How fast does cnnkit train a CNN on this machine, against the plain PyTorch loop a tutorial reader writes?

    python -m benchmarks.train_speed                     # everything below, about 25 minutes on 2 cores
    python -m benchmarks.train_speed --parts seed,cnnkit --epochs 3 --rounds 3
    python -m benchmarks.train_speed --isa avx2 --parts peak,cnnkit_fp32 --name train_speed_avx2

Parts, each run in its own child process (so its peak resident memory is its own):
- ``peak``: the machine's matrix-product rate in fp32, and in bf16 where the CPU multiplies bf16 natively:
  the better of a 2048x2048 product (PyTorch's BLAS) and a 3x3 convolution in channels_last (oneDNN, the
  library the convolutions of the training step run in), on all of PyTorch's threads, the best of 12 repeats;
- ``seed``: the seed-style loop, written plainly below: SimpleCNN, torchvision ImageFolder with per-sample
  PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader
  with 2 workers, fp32, SGD lr 0.01 momentum 0.9, batch 64;
- ``cnnkit``: ``cnnkit.train``'s loop (with the benchmark's callbacks, which time each epoch) on the same model,
  data, validation images, batch size and epochs, with its defaults (uint8 cache, batched augmentation, bf16 where the CPU has bf16 matrix instructions,
  channels_last, SGD with a one-cycle schedule); ``cnnkit_fp32`` the same in fp32; ``cnnkit_compile``
  the same with ``--compile``;
- ``fast``: ``cnnkit train --recipe fast`` on the same data: validation accuracy (with test-time
  augmentation) and wall time from the call to the result, data loading included.

Speeds are training images per second of each epoch (data loading and augmentation included, validation
not); a run's speed is the median over its epochs. Achieved FLOP/s count the training step's arithmetic:
2 x MACs forward, as much again for the weights' gradients and for the inputs' gradients, except that the
first layer computes no gradient for the images. Every result records the CPU (model, flags) it ran on.
The speed parts and the peak run in ``--rounds`` rounds, each round one run of each part in turn (peak, seed,
cnnkit, cnnkit_fp32, ...), so that a neighbour's load on this shared machine lands on all of them alike: a
part's figure is the median over the rounds, its ratio to the seed loop the median of the ratios within each
round, and fp32's share of the peak the median of its shares of each round's peak. The data are the CIFAR-10 JPEG images in
``../shared/datasets/cifar10-jpeg/train``; 10% of each class is held out for validation, the same images
for every part. Writes benchmarks/results/train_speed.json and .md (``--name``: another name).

``--isa avx2`` runs every part's process with oneDNN, ATen and MKL capped to AVX2 and torch.compile's loops built
for AVX2 (``ISA_CAPS``), the kernels an AVX2-only CPU runs; the CPU label beside the figures then says "capped
to AVX2". ``--threads N``: every part computes with N threads. cnnkit's parts also report images per second of
the process's CPU time and the peak GFLOP per CPU-second, which a neighbour's load stretches less than wall time.
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
from typing import Any

import torch

from cnnkit.train.evaluation import EvalStats
from cnnkit.train.loop import Callbacks, Training

RESULTS = os.path.join(os.path.dirname(__file__), "results")
DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "datasets", "cifar10-jpeg", "train")
PARTS = ("peak", "seed", "cnnkit", "cnnkit_fp32", "fast")
SPEED_PARTS = ("seed", "cnnkit", "cnnkit_fp32", "cnnkit_compile")  # run in rounds
ROUND_PARTS = ("peak",) + SPEED_PARTS  # the peak too, so that each round's speeds have a peak measured beside them


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

class EpochClock(Callbacks):
    """cnnkit's training loop's callbacks that note each epoch's training images per second (its metrics.csv
    row) and the process's CPU time from the start of training to each epoch's end: the CPU seconds of each epoch
    (training, then validation), which a neighbour's load on a shared machine does not stretch the way it
    stretches wall time."""

    def __init__(self) -> None:
        self.images_per_s: list[float] = []
        self.epoch_cpu_s: list[float] = []
        self.mark = 0.0  # the process's CPU time at the start of the epoch running, seconds

    def on_start(self, run: Training) -> None:
        self.mark = time.process_time()

    def on_epoch(self, run: Training, row: dict[str, Any], val: EvalStats) -> None:
        now = time.process_time()
        self.epoch_cpu_s.append(now - self.mark)
        self.mark = now
        self.images_per_s.append(row["images_per_s"])


def run_cnnkit(root: str, epochs: int, out: str, **options) -> dict:
    import cnnkit
    from cnnkit.train import loop

    clock = EpochClock()
    # What cnnkit.train runs, with these callbacks instead of its own (TensorBoard, test-time augmentation, plots),
    # which these options leave off.
    result = loop.train(model="simple_cnn", data=root, val_split=0.1, epochs=epochs, batch_size=64, out=out,
                        progress=False, log=sys.stderr, callbacks=clock, **options)
    speeds = clock.images_per_s
    # Per CPU-second, each epoch's training and validation together; the first epoch also compiles the fused loops.
    per_cpu = [result.num_train / s for s in clock.epoch_cpu_s]
    summary = cnnkit.summary("simple_cnn", input_size=(3, 32, 32))
    layer_macs = [row.macs for row in summary.layers if row.type in ("Conv2d", "Linear")]
    return {"images_per_s_epochs": speeds, "images_per_s": statistics.median(speeds), "val_acc": result.val_acc,
            "precision": result.precision, "num_train": result.num_train, "num_val": result.num_val,
            "macs_per_image": summary.total_macs, "flop_per_image": train_flop_per_image(layer_macs),
            "wall_time_s": result.wall_time_s, "threads": result.threads, "images_per_cpu_s_epochs": per_cpu,
            "images_per_cpu_s": statistics.median(per_cpu[1:] or per_cpu) if per_cpu else None}


def run_fast(root: str, out: str) -> dict:
    import cnnkit

    result = cnnkit.train(recipe="fast", data=root, val_split=0.1, out=out, progress=False, log=sys.stderr)
    return {"tta_val_acc": result.tta_val_acc, "val_acc": result.val_acc, "wall_time_s": result.wall_time_s,
            "train_time_s": result.train_time_s, "epochs": result.epochs, "images_per_s": result.images_per_s,
            "num_train": result.num_train, "num_val": result.num_val}


# ``--isa avx2``: the environment that makes a CPU with AVX-512 and bf16 run the kernels an AVX2-only CPU runs,
# set in each part's process before torch loads: oneDNN's (convolutions, bf16 products), ATen's vector code and
# MKL's (fp32 products) instruction sets, each capped to AVX2. bf16 is then emulated, and cnnkit's precision
# auto picks fp32, as on an AVX2-only CPU. The hardware stays what it is (its clock, caches, and on a Zen 4
# two 256-bit halves per AVX-512 instruction anyway), so a capped run stands in for an AVX2-only CPU's code
# path, not for its speed. torch.compile's C++ loops (cnnkit/compiled.py) are built for AVX2 too
# (TORCHINDUCTOR_CPP_MARCH): with its default -march=native on an AVX-512 CPU, ATen's vector headers take their
# 512-bit form while the generated code, following ATen's AVX2 capability, counts 8 floats to a vector, and the
# fused max-pool returned wrong values (NaN losses; two runs crashed); built for x86-64-v3 they are exact.
ISA_CAPS = {"avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                     "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3"}}
CAP_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                 "TORCHINDUCTOR_CPP_MARCH")

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")  # the ones that set the speed


def parse_cpuinfo(text: str) -> dict:
    """The CPU's model name, family and model numbers, and which of ``CPU_FLAGS`` it has, from the text of
    /proc/cpuinfo. A virtual machine often shows a bare "AMD EPYC": the numbers tell its generation (AMD family
    25 is Zen 3 and Zen 4, model 17 a Zen 4 EPYC; family 26 is Zen 5, whose AVX-512 units are twice as wide)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():  # the first processor's fields
        if ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            fields.setdefault(key, value)
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", platform.processor() or platform.machine()),
            "family": fields.get("cpu family", ""), "model_number": fields.get("model", ""),
            "flags": [f for f in CPU_FLAGS if f in flags]}


def cpu_info() -> dict:
    """This machine's CPU: model, speed-relevant flags, PyTorch's vector code path and threads."""
    try:
        with open("/proc/cpuinfo") as f:
            info = parse_cpuinfo(f.read())
    except OSError:
        info = {"model": platform.processor() or platform.machine(), "flags": []}
    caps = {name: os.environ[name] for name in CAP_VARIABLES if os.environ.get(name)}
    return {**info, "capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "isa_caps": caps}


def cpu_label(cpu: dict) -> str:
    """'AMD EPYC (family 25 model 17; avx2 fma avx512f avx512_bf16; AVX512 code, 2 threads)': the CPU named
    beside a figure, with '; capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ...)' when its instruction sets were capped
    (``--isa``)."""
    caps = cpu.get("isa_caps") or {}
    capped = ""
    if caps:
        level = caps.get("ONEDNN_MAX_CPU_ISA") or caps.get("DNNL_MAX_CPU_ISA") or next(iter(caps.values()))
        capped = f"; capped to {level.upper()} ({' '.join(f'{k}={v}' for k, v in caps.items())})"
    threads = f"{cpu['threads']} thread{'s' if cpu['threads'] != 1 else ''}"
    generation = (f"family {cpu['family']} model {cpu['model_number']}; " if cpu.get("family") else "")
    return (f"{cpu['model']} ({generation}{' '.join(cpu['flags']) or 'no AVX2'}; {cpu['capability']} code, "
            f"{threads}{capped})")


def train_flop_per_image(layer_macs: list[int]) -> int:
    """FLOPs of one image's training step through layers with these MACs, in order (the first sees the images).

    Forward 2 x MACs; backward 2 x MACs for the weights' gradients and 2 x MACs for the inputs' gradients,
    except the first layer's: nothing asks for the images' gradient, so 6 x MACs less 2 x the first layer's.
    """
    return 6 * sum(layer_macs) - 2 * (layer_macs[0] if layer_macs else 0)


def part_flop_per_image(part: dict) -> float | None:
    """The FLOPs of one image's training step in a part's result (cnnkit's parts; None for the others): its
    ``flop_per_image``, or for results written before that was recorded, the count used then, 6 x MACs."""
    if "flop_per_image" in part:
        return part["flop_per_image"]
    return 6 * part["macs_per_image"] if "macs_per_image" in part else None


def percent_of(images_per_s: float, flop_per_image: float, gflops: float) -> float:
    """The share, in percent, of a rate of ``gflops`` GFLOP/s that training at ``images_per_s`` uses."""
    return 100 * images_per_s * flop_per_image / (gflops * 1e9)


def best_rate(fn, flop: float, repeats: int = 12) -> tuple[float, float, float]:
    """GFLOP/s of ``fn`` (``flop`` operations a call): the best and the median of ``repeats`` timed calls, and the
    best per second of the process's CPU time (all its threads'). The best is the rate the machine can reach: a
    neighbour's load on a shared machine only ever slows a call."""
    fn()
    fn()
    rates, cpu_rates = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        rates.append(flop / (time.perf_counter() - start) / 1e9)
        cpu_rates.append(flop / max(time.process_time() - cpu, 1e-9) / 1e9)
    return max(rates), statistics.median(rates), max(cpu_rates)


def run_peak(repeats: int = 12) -> dict:
    """Matrix-product rates in GFLOP/s, fp32 everywhere and bf16 where the CPU has bf16 matrix instructions.

    Two kernels each, on all of PyTorch's threads (as training uses them): a 2048x2048 product through
    PyTorch's BLAS (MKL, whose fp32 code on AMD CPUs is its AVX2 path) and a 3x3 convolution, 256 to 256
    channels on 64 images of 16x16 in channels_last, through oneDNN, where the training step's convolutions
    run (with AVX-512 where the CPU has it). ``{dtype}_gflops`` is the better of the two: the peak that every
    achieved rate is compared with.
    """
    import torch.nn.functional as F

    from cnnkit.train.precision import cpu_has_bf16

    out: dict = {"repeats": repeats}
    dtypes = [("fp32", torch.float32)] + ([("bf16", torch.bfloat16)] if cpu_has_bf16() else [])
    for name, dtype in dtypes:
        n = 2048
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        matmul = best_rate(lambda: a @ b, 2 * n**3, repeats)
        images, channels, size = 64, 256, 16
        x = torch.randn(images, channels, size, size, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.randn(channels, channels, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
        conv = best_rate(lambda: F.conv2d(x, w, padding=1), 2 * images * channels * channels * 9 * size * size,
                         repeats)
        out[f"{name}_matmul_gflops"], out[f"{name}_matmul_median_gflops"], out[f"{name}_matmul_cpu_gflops"] = matmul
        out[f"{name}_conv_gflops"], out[f"{name}_conv_median_gflops"], out[f"{name}_conv_cpu_gflops"] = conv
        out[f"{name}_gflops"] = max(matmul[0], conv[0])
        out[f"{name}_cpu_gflops"] = max(matmul[2], conv[2])  # per second of CPU time, all threads together
    out["threads"] = torch.get_num_threads()
    return out


def run_part(part: str, args: argparse.Namespace) -> dict:
    out = os.path.join(args.work, part)
    if args.threads:  # every part computes with the same threads (cnnkit would otherwise pick its own default)
        torch.set_num_threads(args.threads)
    threads = {"threads": args.threads} if args.threads else {}
    if part == "peak":
        return run_peak()
    if part == "seed":
        return run_seed(args.data, args.epochs)
    if part == "cnnkit":
        return run_cnnkit(args.data, args.epochs, out, **threads)
    if part == "cnnkit_fp32":
        return run_cnnkit(args.data, args.epochs, out, precision="fp32", **threads)
    if part == "cnnkit_compile":
        return run_cnnkit(args.data, args.epochs, out, compile=True, **threads)
    if part == "fast":
        return run_fast(args.data, out)
    raise SystemExit(f"unknown part {part}")


def child(part: str, args: argparse.Namespace) -> dict:
    """Run one part in a fresh process; its result plus the process's peak resident memory."""
    cmd = [sys.executable, "-m", "benchmarks.train_speed", "--child", part, "--data", args.data,
           "--epochs", str(args.epochs), "--work", args.work]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    start = time.perf_counter()
    env = {**os.environ, **ISA_CAPS.get(args.isa or "", {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=os.path.dirname(RESULTS) + "/..", env=env)
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
    if all(r.get("images_per_cpu_s") for r in runs):
        out["images_per_cpu_s"] = statistics.median(r["images_per_cpu_s"] for r in runs)
    out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    if seed_runs:
        out["x_seed_rounds"] = [r["images_per_s"] / s["images_per_s"] for r, s in zip(runs, seed_runs)]
        out["x_seed"] = statistics.median(out["x_seed_rounds"])
    return out


def combine_peak(runs: list[dict]) -> dict:
    """The peak over its rounds: each rate the median of the rounds' (each round's the best of its repeats)."""
    out = dict(runs[-1])
    out["rounds"] = runs
    for key in runs[-1]:
        if key.endswith("_gflops"):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def percent_rounds(part: dict, peak: dict) -> list[float] | None:
    """A part's share of the fp32 peak in each round, against the peak measured in that same round."""
    flop = part_flop_per_image(part)
    if "rounds" not in part or len(peak.get("rounds", [])) != len(part["rounds"]) or flop is None:
        return None
    return [percent_of(q["images_per_s"], flop, pk["fp32_gflops"]) for q, pk in zip(part["rounds"], peak["rounds"])]


def product_share(part: dict, peak: dict, cpu: bool = False) -> str:
    """', X% of the 2048x2048 product's rate alone' (the kernel issue 22 measured other CPUs with), or ''."""
    key = "fp32_matmul_cpu_gflops" if cpu else "fp32_matmul_gflops"
    flop = part_flop_per_image(part)
    if key not in peak or flop is None:
        return ""
    rate = part["images_per_cpu_s" if cpu else "images_per_s"] * flop / 1e9
    return f"; {100 * rate / peak[key]:.0f}% of the 2048x2048 product's {peak[key]:.1f} alone"


def cpu_time_line(part: dict, peak: dict) -> str | None:
    """The fp32 part's share of the peak counted per second of CPU time instead of wall time."""
    flop = part_flop_per_image(part)
    if not part.get("images_per_cpu_s") or not peak.get("fp32_cpu_gflops") or flop is None:
        return None
    gflops = part["images_per_cpu_s"] * flop / 1e9
    rounds = [r["fp32_cpu_gflops"] for r in peak.get("rounds", [])]
    spread = f" (rounds: {', '.join(f'{x:.0f}' for x in rounds)})" if len(rounds) > 1 else ""
    return (f"Per second of CPU time, which a neighbour's load stretches less than wall time (with several threads it "
            f"includes the time they wait for each other): {part['images_per_cpu_s']:,.0f} training images per "
            f"CPU-second, each epoch's validation included, = {gflops:.1f} GFLOP per CPU-second, "
            f"**{100 * gflops / peak['fp32_cpu_gflops']:.0f}%** of the fp32 peak's {peak['fp32_cpu_gflops']:.1f}"
            f"{spread}{product_share(part, peak, cpu=True)}; {part.get('threads', '?')} thread(s).")


def peak_line(peak: dict) -> str:
    """The measured peaks, each with the two kernels it is the better of."""
    parts = []
    for name in ("fp32", "bf16"):
        if f"{name}_gflops" not in peak:
            continue
        kernels = (f" (product {peak[f'{name}_matmul_gflops']:.0f}, convolution {peak[f'{name}_conv_gflops']:.0f})"
                   if f"{name}_conv_gflops" in peak else "")
        parts.append(f"{peak[f'{name}_gflops']:.0f} GFLOP/s {name}{kernels}")
    if "bf16_gflops" not in peak:
        parts.append("no bf16 (no bf16 matrix instructions on this CPU, or none under its cap)")
    best = f"best of {peak.get('repeats', 7)} repeats"
    if len(peak.get("rounds", [])) > 1:
        rounds = ", ".join(f"{r['fp32_gflops']:.0f}" for r in peak["rounds"])
        best = f"median over {len(peak['rounds'])} rounds (fp32: {rounds}) of the {best} in each"
    return f"Matrix-product peak, {best}: " + ", ".join(parts) + "."


def achieved(p: dict, peak: dict) -> tuple[float, float, float | None] | None:
    """A cnnkit part's achieved GFLOP/s, its percentage of the fp32 peak and of its own precision's peak."""
    flop = part_flop_per_image(p)
    if flop is None or not peak:
        return None
    gflops = p["images_per_s"] * flop / 1e9
    own = peak.get(f"{p['precision']}_gflops")
    return (gflops, percent_of(p["images_per_s"], flop, peak["fp32_gflops"]),
            None if own is None else percent_of(p["images_per_s"], flop, own))


def table(r: dict) -> str:
    some = next((p for p in r["parts"].values() if "num_train" in p), {})
    lines = [f"# Training speed on {r['machine']}", "",
             f"{r['epochs']} epoch{'s' if r['epochs'] > 1 else ''} of CIFAR-10 JPEG ({some.get('num_train', '?')} "
             f"training images, 10% held out), {r['rounds']} round{'s' if r['rounds'] > 1 else ''} of the speed "
             "runs, one after another within each round. A run's images/s is the median over its epochs; the table "
             "gives each round's and their median. x seed is the median of the ratios within each round.", ""]
    peak = r["parts"].get("peak")
    if peak:
        lines += [peak_line(peak), ""]
    lines += ["| run | images/s: median (rounds) | x seed (rounds) | val acc | achieved GFLOP/s (% of its precision's "
              "peak; % of fp32 peak) | peak RSS MB |", "|---|---|---|---|---|---|"]
    for name in SPEED_PARTS:
        p = r["parts"].get(name)
        if not p:
            continue
        rounds = ", ".join(f"{q['images_per_s']:,.0f}" for q in p["rounds"])
        ratio = (f"{p['x_seed']:.2f} ({', '.join(f'{x:.2f}' for x in p['x_seed_rounds'])})"
                 if "x_seed" in p else "")
        accs = sorted({f"{q['val_acc']:.4f}" for q in p["rounds"]})
        flops = ""
        got = achieved(p, peak)
        if got:
            own = "" if got[2] is None or p["precision"] == "fp32" else f"{got[2]:.0f}% of {p['precision']}; "
            flops = f"{got[0]:.0f} ({own}{got[1]:.0f}% of fp32)"
        lines.append(f"| {name} | {p['images_per_s']:,.0f} ({rounds}) | {ratio} | {' / '.join(accs)} | {flops} "
                     f"| {p['peak_rss_mb']:,.0f} |")
    fp32 = next((r["parts"][n] for n in ("cnnkit_fp32", "cnnkit") if n in r["parts"]
                 and r["parts"][n].get("precision") == "fp32"), None)
    got = achieved(fp32, peak) if fp32 else None
    if got:
        per_round = percent_rounds(fp32, peak)
        share = (f"**{statistics.median(per_round):.0f}%** (rounds: {', '.join(f'{x:.0f}%' for x in per_round)}; "
                 "each round against the peak measured in it)" if per_round else f"**{got[1]:.0f}%**")
        lines += ["", f"simple_cnn end to end in fp32 runs at {share} of the fp32 matrix-product rate "
                      f"measured in this run ({fp32['images_per_s']:,.0f} images/s x "
                      f"{part_flop_per_image(fp32) / 1e6:.1f} MFLOP per image / "
                      f"{peak['fp32_gflops']:.0f} GFLOP/s: {got[1]:.0f}% of the medians; the target on AVX2-only "
                      "CPUs is 90% or more)" + product_share(fp32, peak) + "."]
        per_cpu = cpu_time_line(fp32, peak)
        if per_cpu:
            lines += ["", per_cpu]
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
    parser.add_argument("--threads", type=int, help="threads every part computes with (default: each one's own)")
    parser.add_argument("--isa", choices=sorted(ISA_CAPS),
                        help="cap every part's instruction sets (oneDNN, ATen, MKL) to run an older CPU's kernels")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import shutil

        shutil.rmtree(os.path.join(args.work, args.child), ignore_errors=True)
        print(json.dumps({**run_part(args.child, args), "cpu": cpu_info()}))  # the CPU beside every figure
        return
    os.makedirs(args.work, exist_ok=True)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "epochs": args.epochs, "rounds": args.rounds,
               "isa": args.isa, "parts": {}}
    parts = args.parts.split(",")
    speed = [p for p in parts if p in ROUND_PARTS]
    runs: dict[str, list[dict]] = {p: [] for p in speed}
    for round_ in range(1, args.rounds + 1):
        for part in speed:
            print(f"== {part}, round {round_} of {args.rounds}", file=sys.stderr, flush=True)
            runs[part].append(child(part, args))
            print(json.dumps(runs[part][-1]), file=sys.stderr, flush=True)
    for part in parts:
        if part == "peak":
            results["parts"][part] = combine_peak(runs[part])
        elif part in runs:
            results["parts"][part] = combine(runs[part], runs.get("seed"))
        else:
            print(f"== {part}", file=sys.stderr, flush=True)
            results["parts"][part] = child(part, args)
            print(json.dumps(results["parts"][part]), file=sys.stderr, flush=True)
    # The CPU as the parts saw it (their processes carry the --isa caps; this one does not).
    cpu = next(iter(results["parts"].values()))["cpu"]
    results["cpu"] = cpu
    results["machine"] = f"{cpu_label(cpu)}, {os.cpu_count()} cores, torch {torch.__version__}"
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"{args.name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
        f.write(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
