"""How fast does an exported ONNX model run under onnxruntime, against the same model in PyTorch eager, on the CPU?

    python -m benchmarks.predict_speed [--repeats 7] [--seconds 0.3]

For simple_cnn and resnet18 (3x32x32 input, 10 classes, untrained weights: speed does not depend on their
values) at batch sizes 1 and 64, it times the forward pass as ``cnnkit predict`` calls it (a normalised float
batch in, logits out; image decoding is left out because both share it), with both runtimes given the same
number of threads: 1, and torch's default (one per core). Each repeat times a run of calls of each runtime
back to back, so both see the same machine load; the table gives the medians over the repeats.
Writes benchmarks/results/predict_speed.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable

import onnxruntime
import torch

import cnnkit
from cnnkit.checkpoint import Checkpoint

MODELS = ("simple_cnn", "resnet18")
BATCH_SIZES = (1, 64)
RESULTS = os.path.join(os.path.dirname(__file__), "results")


def seconds_per_call(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def measure(name: str, threads: int, folder: str, repeats: int, seconds: float) -> list[dict]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)  # the same weights each time, so the export made on the first call fits
    model = cnnkit.create_model(name, num_classes=10, input_size=32).eval()
    path = os.path.join(folder, f"{name}.onnx")
    if not os.path.exists(path):
        ckpt = Checkpoint(model=model, classes=[str(i) for i in range(10)], input_size=32, channels=3,
                          mean=[0.5] * 3, std=[0.25] * 3, path=f"<{name} in memory>")
        cnnkit.export(ckpt, "onnx", path)
    runtimes = {"pytorch_eager": model, "onnxruntime": cnnkit.OnnxModel(path, threads=threads)}
    rows = []
    for batch_size in BATCH_SIZES:
        x = torch.randn(batch_size, 3, 32, 32)
        with torch.inference_mode():
            diff = float((runtimes["pytorch_eager"](x) - runtimes["onnxruntime"](x)).abs().max())
            calls = {}
            for runtime, forward in runtimes.items():
                seconds_per_call(lambda: forward(x), 10)  # warm-up: allocations, one-time kernel choices
                calls[runtime] = max(3, round(seconds / seconds_per_call(lambda: forward(x), 3)))
            times: dict[str, list[float]] = {runtime: [] for runtime in runtimes}
            for _ in range(repeats):
                for runtime, forward in runtimes.items():
                    times[runtime].append(seconds_per_call(lambda: forward(x), calls[runtime]))
        row = {"model": name, "batch_size": batch_size, "threads": threads, "max_abs_diff": diff}
        for runtime, values in times.items():
            median = statistics.median(values)
            row[runtime] = {"median_ms": median * 1e3, "images_per_s": batch_size / median,
                            "calls_per_repeat": calls[runtime], "repeats_ms": [v * 1e3 for v in values]}
        row["speedup"] = row["pytorch_eager"]["median_ms"] / row["onnxruntime"]["median_ms"]
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# `cnnkit predict`: PyTorch eager vs onnxruntime on the CPU",
        "",
        f"Forward pass only (3x32x32, 10 classes), median of {report['repeats']} repeats, both runtimes given the "
        f"same threads. {m['cpu_count']} CPUs ({m['processor'] or m['machine']}), torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}; load average {m['load_average'][0]:.1f} at the start, "
        f"{m['load_average_end'][0]:.1f} at the end (other processes share these cores). Rows with more than one "
        "thread suffer most from other load (torch's OpenMP threads wait for each other at every layer): on a "
        "busy machine, compare the 1-thread rows.",
        "",
        "| model | batch | threads | PyTorch eager ms/batch | onnxruntime ms/batch | PyTorch images/s "
        "| onnxruntime images/s | onnxruntime speed-up | max abs diff |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        pt, ort = r["pytorch_eager"], r["onnxruntime"]
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['threads']} "
                     f"| {pt['median_ms']:.2f} | {ort['median_ms']:.2f} "
                     f"| {pt['images_per_s']:,.0f} | {ort['images_per_s']:,.0f} | {r['speedup']:.2f}x "
                     f"| {r['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.3, help="length of one timed run of calls")
    args = parser.parse_args()
    machine = {
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "onnxruntime": onnxruntime.__version__, "load_average": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory() as folder:
        results = [row for name in MODELS for threads in sorted({1, machine["torch_threads"]})
                   for row in measure(name, threads, folder, args.repeats, args.seconds)]
    machine["load_average_end"] = os.getloadavg()
    report = {"machine": machine, "repeats": args.repeats, "results": results}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "predict_speed.json"), "w") as f:
        json.dump(report, f, indent=2)
    table = markdown(report)
    with open(os.path.join(RESULTS, "predict_speed.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
