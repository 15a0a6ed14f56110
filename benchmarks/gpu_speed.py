"""How fast does cnnkit train on a GPU, against the seed-style loop on the same GPU, and how fast is the recipe?

    PYTHONPATH=. python3 -m benchmarks.gpu_speed --data DIR [--parts ...] [--epochs 3] [--out benchmarks/results]

Parts, each in its own child process:
- ``seed_simple`` / ``seed_resnet``: the seed-style loop (``benchmarks/train_speed.py``'s, moved to the GPU):
  torchvision ImageFolder with per-sample PIL transforms (RandomCrop(32, padding=4), RandomHorizontalFlip,
  ToTensor, Normalize) in a DataLoader with as many workers as cores, fp32, SGD lr 0.01 momentum 0.9, each
  batch copied to the GPU; SimpleCNN at batch 64, resnet18 with the CIFAR stem at batch 256;
- ``cnnkit_simple`` / ``cnnkit_resnet``: ``cnnkit.train`` on the same model, images and batch size, with its
  defaults on a GPU (the uint8 set on the device, batched augmentation there, bf16, channels_last);
- ``fast``: ``cnnkit train --recipe fast`` twice as a command, the first with empty data and compile caches,
  the second with both warm: training time, the whole command's wall time, accuracy with TTA;
- ``profile``: one epoch of the fast recipe under torch.profiler: the kernels that take the GPU's time, and
  how much of the wall time the GPU is busy at all.

Speeds are training images per second of each epoch (augmentation included, validation not); a run's figure is
the median over its epochs after the first (which holds cuDNN's autotuning and the workers' start). The data are
the CIFAR-10 JPEG training images, 10% of each class held out for validation (cnnkit's split, the same images for
every part). Writes gpu_speed.json and gpu_speed.md to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.train_speed import SimpleCNN, split_files

PARTS = ("fast", "seed_simple", "cnnkit_simple", "seed_resnet", "cnnkit_resnet")  # the default: gpu_check's 8 minutes
MORE_PARTS = ("profile", "fast_warm", "fast_no_autotune", "fast_cprofile", "fast_compile", "fast_reduce_overhead",
              "cnnkit_simple_compile", "cnnkit_simple_reduce_overhead", "cnnkit_resnet_compile",
              "cnnkit_resnet_reduce_overhead")
BATCH = {"simple": 64, "resnet": 256}


def seed_model(kind: str) -> torch.nn.Module:
    if kind == "simple":
        return SimpleCNN()
    import cnnkit

    return cnnkit.create_model("resnet18", num_classes=10, input_size=32, stem="cifar")


def run_seed(root: str, kind: str, epochs: int) -> dict:
    import torchvision
    import torchvision.transforms as T

    torch.manual_seed(0)
    device = torch.device("cuda")
    workers = len(os.sched_getaffinity(0))
    normalize = T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    train_files, _ = split_files(root)
    full = torchvision.datasets.ImageFolder(root, transform=train_tf)
    index = {os.path.abspath(path): i for i, (path, _) in enumerate(full.samples)}
    train_set = torch.utils.data.Subset(full, [index[os.path.abspath(f)] for f in train_files])
    loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH[kind], shuffle=True, num_workers=workers)
    model = seed_model(kind).to(device)
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    speeds = []
    for epoch in range(epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(model(images), labels)
            loss.backward()
            optimizer.step()
            seen += len(labels)
        torch.cuda.synchronize()
        speeds.append(seen / (time.perf_counter() - start))
        print(f"seed {kind} epoch {epoch + 1}: {speeds[-1]:,.0f} images/s ({workers} workers)", file=sys.stderr)
    return {"images_per_s_epochs": speeds, "images_per_s": statistics.median(speeds[1:] or speeds),
            "workers": workers, "batch_size": BATCH[kind], "num_train": len(train_set)}


def run_cnnkit(root: str, kind: str, epochs: int, out: str, compile_mode: bool | str = False) -> dict:
    import cnnkit

    model, options = ("simple_cnn", {}) if kind == "simple" else ("resnet18", {"stem": "cifar"})
    result = cnnkit.train(model=model, model_options=options, data=root, val_split=0.1, epochs=epochs,
                          batch_size=BATCH[kind], out=out, progress=False, log=sys.stderr, device="cuda",
                          compile=compile_mode)
    with open(os.path.join(out, "metrics.csv")) as f:
        speeds = [float(row["images_per_s"]) for row in csv.DictReader(f)]
    return {"images_per_s_epochs": speeds, "images_per_s": statistics.median(speeds[1:] or speeds),
            "val_acc": result.val_acc, "precision": result.precision, "batch_size": BATCH[kind], "compile": compile_mode,
            "num_train": result.num_train}


# For the measurement of what cuDNN's autotuning costs only: the command run with torch.backends.cudnn.benchmark
# held False (cnnkit sets it True for CUDA training).
NO_AUTOTUNE = ("import sys, torch.backends.cudnn as c; type(c).benchmark = property(lambda s: False, lambda s, v: None); "
               "from cnnkit.cli import main; sys.exit(main(sys.argv[1:]))")


def run_fast(root: str, work: str, extra: list[str], caches: tuple[str, ...] = ("cold", "warm"),
             no_autotune: bool = False, cprofile: str | None = None) -> dict:
    """The recipe as a user runs it: "cold" empties the data and compile caches first, "warm" keeps them."""
    env = {**os.environ, "CNNKIT_CACHE": os.path.join(work, "cache"),
           "TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor")}
    runs = []
    for name in caches:
        if name == "cold":
            for d in ("cache", "inductor"):
                shutil.rmtree(os.path.join(work, d), ignore_errors=True)
        out = os.path.join(work, f"fast-{name}")
        shutil.rmtree(out, ignore_errors=True)
        args = ["train", "--recipe", "fast", "--data", root, "--val-split", "0.1", "--device", "cuda", "--out", out,
                "--quiet", "--json", *extra]
        if no_autotune:
            cmd = [sys.executable, "-c", NO_AUTOTUNE, *args]
        elif cprofile:
            cmd = [sys.executable, "-m", "cProfile", "-o", cprofile, "-m", "cnnkit", *args]
        else:
            cmd = [sys.executable, "-m", "cnnkit", *args]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            runs.append({"caches": name, "error": proc.stderr[-1500:]})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        with open(os.path.join(out, "metrics.csv")) as f:
            epoch_s = [float(row["epoch_time_s"]) for row in csv.DictReader(f)]
        runs.append({"caches": name, "command_wall_s": wall, "train_time_s": r["train_time_s"],
                     "epoch_time_sum_s": sum(epoch_s), "epoch_times_s": epoch_s, "val_acc": r["val_acc"],
                     "tta_val_acc": r["tta_val_acc"], "num_train": r["num_train"], "extra": extra,
                     "cudnn_autotune": not no_autotune})
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    if cprofile:
        import io
        import pstats

        text = io.StringIO()
        pstats.Stats(cprofile, stream=text).sort_stats("cumulative").print_stats(40)
        return {"runs": runs, "cprofile": text.getvalue()[-12000:]}
    return {"runs": runs}


def run_profile(root: str, work: str) -> dict:
    import cnnkit
    from torch.profiler import ProfilerActivity, profile

    cnnkit.train(recipe="fast", data=root, val_split=0.1, epochs=1, device="cuda", progress=False,
                 out=os.path.join(work, "profile-warm"), tta=False, log=sys.stderr)  # data cached, kernels loaded
    shutil.rmtree(os.path.join(work, "profile"), ignore_errors=True)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = cnnkit.train(recipe="fast", data=root, val_split=0.1, epochs=2, device="cuda", progress=False,
                         out=os.path.join(work, "profile"), tta=False, log=sys.stderr)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    gpu_total = sum(e.self_device_time_total for e in events) / 1e6
    by_gpu = sorted(events, key=lambda e: -e.self_device_time_total)[:25]
    by_cpu = sorted(events, key=lambda e: -e.self_cpu_time_total)[:20]
    return {"wall_s": wall, "train_time_s": r.train_time_s, "gpu_busy_s": gpu_total,
            "top_gpu": [(e.key, e.count, e.self_device_time_total / 1e3) for e in by_gpu],
            "top_cpu": [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in by_cpu]}


def run_part(part: str, args: argparse.Namespace) -> dict:
    work = args.work
    if part.startswith("seed_"):
        return run_seed(args.data, part[5:], args.epochs)
    if part.startswith("cnnkit_"):  # cnnkit_simple, cnnkit_resnet; + "_compile" or "_reduce_overhead"
        kind, _, mode = part[7:].partition("_")
        compile_mode = {"": False, "compile": True, "reduce_overhead": "reduce-overhead"}[mode]
        return run_cnnkit(args.data, kind, args.epochs, os.path.join(work, part), compile_mode)
    if part == "fast":
        return run_fast(args.data, work, [])
    if part == "fast_warm":
        return run_fast(args.data, work, [], ("warm",))
    if part == "fast_no_autotune":
        return run_fast(args.data, work, [], ("warm",), no_autotune=True)
    if part == "fast_cprofile":
        return run_fast(args.data, work, [], ("warm",), cprofile=os.path.join(work, "fast.prof"))
    if part == "fast_compile":
        return run_fast(args.data, work, ["--compile"])
    if part == "fast_reduce_overhead":
        return run_fast(args.data, work, ["--compile", "reduce-overhead"])
    if part == "profile":
        return run_profile(args.data, work)
    raise SystemExit(f"unknown part {part}")


def table(r: dict) -> str:
    p = r["parts"]
    lines = [f"# Training speed on a GPU: {r['gpu']}", "",
             f"{r['date']}; torch {r['torch']}, CUDA {r['cuda']}, {r['cores']} CPU cores. CIFAR-10 JPEG training "
             f"images, 10% held out (cnnkit's split). Images/s: median over epochs 2-{r['epochs']} "
             "(the first holds cuDNN's autotuning and the workers' start).", "",
             "| model | seed-style loop images/s | cnnkit images/s | x seed | cnnkit val acc |", "|---|---|---|---|---|"]
    for kind, label in (("simple", "simple_cnn, batch 64"), ("resnet", "resnet18 (stem=cifar), batch 256")):
        seed = p.get(f"seed_{kind}")
        for mode, how in (("", ""), ("_compile", ", --compile"), ("_reduce_overhead", ", --compile reduce-overhead")):
            ours = p.get(f"cnnkit_{kind}{mode}")
            if not (ours or (seed and not mode)):
                continue
            s = f"{seed['images_per_s']:,.0f} (fp32, {seed['workers']} workers)" if seed and "images_per_s" in seed else "-"
            o = f"{ours['images_per_s']:,.0f} ({ours['precision']}{how})" if ours and "images_per_s" in ours else "-"
            x = f"{ours['images_per_s'] / seed['images_per_s']:.2f}" if s != "-" and o != "-" else "-"
            acc = f"{ours['val_acc']:.4f}" if o != "-" else "-"
            lines.append(f"| {label} | {s} | {o} | {x} | {acc} |")
    titles = {"fast": "", "fast_warm": " (caches warm)", "fast_no_autotune": " (cuDNN autotuning held off)",
              "fast_cprofile": " (under cProfile)", "fast_compile": " --compile",
              "fast_reduce_overhead": " --compile reduce-overhead"}
    for name, title in titles.items():
        if name not in p or "runs" not in p[name]:
            continue
        runs = p[name]["runs"]
        lines += ["", f"`cnnkit train --recipe fast{title}` ({runs[0].get('num_train', '?') if runs else '?'} training images):", "",
                  "| caches | training s | sum of epochs s | first epoch s | whole command s | val acc | with TTA |",
                  "|---|---|---|---|---|---|---|"]
        for run in runs:
            if "error" in run:
                lines.append(f"| {run['caches']} | failed: {run['error'].splitlines()[-1][:120]} | | | | | |")
                continue
            lines.append(f"| {run['caches']} | {run['train_time_s']:.2f} | {run['epoch_time_sum_s']:.2f} | "
                         f"{run['epoch_times_s'][0]:.2f} | {run['command_wall_s']:.1f} | {run['val_acc']:.4f} | "
                         f"{run['tta_val_acc']:.4f} |")
        if "cprofile" in p[name]:
            lines += ["", "```", p[name]["cprofile"][:6000], "```"]
    prof = p.get("profile")
    if prof and "top_gpu" in prof:
        lines += ["", f"Profile of 2 epochs of the recipe: wall {prof['wall_s']:.2f} s, training {prof['train_time_s']:.2f} s, "
                      f"GPU busy {prof['gpu_busy_s']:.2f} s.", "", "| kernel (GPU self time) | calls | ms |", "|---|---|---|"]
        lines += [f"| {k[:90]} | {n} | {ms:.1f} |" for k, n, ms in prof["top_gpu"][:15]]
        lines += ["", "| operation (CPU self time) | calls | ms |", "|---|---|---|"]
        lines += [f"| {k[:90]} | {n} | {ms:.1f} |" for k, n, ms in prof["top_cpu"][:12]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {PARTS + MORE_PARTS} (default: {','.join(PARTS)})")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default=os.path.join("/tmp", "cnnkit-gpu-speed"))
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--name", default="gpu_speed")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_part(args.child, args)))
        return
    os.makedirs(args.work, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
               "cores": len(os.sched_getaffinity(0)), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "epochs": args.epochs, "parts": {}}
    for part in args.parts.split(","):
        print(f"== {part}", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "benchmarks.gpu_speed", "--child", part, "--data", args.data,
               "--epochs", str(args.epochs), "--work", args.work]
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            results["parts"][part] = {"error": f"exit {proc.returncode}"}
            continue
        results["parts"][part] = json.loads(proc.stdout.strip().splitlines()[-1])
        results["parts"][part]["process_wall_s"] = time.perf_counter() - start
        print(json.dumps(results["parts"][part])[:2000], file=sys.stderr, flush=True)
        write(results, args)  # after every part: a run stopped by its time limit keeps what it measured
    print(table(results))


def write(results: dict, args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"{args.name}.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.out, f"{args.name}.md"), "w") as f:
        f.write(table(results))


if __name__ == "__main__":
    main()
