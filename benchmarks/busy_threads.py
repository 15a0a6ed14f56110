"""How fast does `cnnkit train` run on a CPU another job is busy on, with the default thread count (which adapts,
cnnkit/threads.py) against the same count fixed?

    python -m benchmarks.busy_threads [--rounds 2] [--num-samples 2000] [--epochs 1]

Each condition runs `cnnkit train` on the generated shapes data (``--num-samples`` images, 20% held out, batch 32,
the demo's model and defaults otherwise) twice each way, alternated: the default, and ``--threads N`` with N the
default count, which leaves it fixed. The conditions: the cores free; beside a single-threaded job (a Python
loop, issue 22's "another job"); beside a second `cnnkit train --threads N`, a training whose count does not
adapt, started a few seconds before and killed after (two experiments at once). A run's figure is its training images per second
(result.json's ``images_per_s``: the epochs' training time, the thread tries included) and its wall time; the
table gives the median over the rounds, and the changes of thread count the default made. Writes
benchmarks/results/busy_threads.json and .md (``--name``: another name).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks.record import write_json, write_markdown
from benchmarks.train_speed import cpu_info, cpu_label

def neighbours(threads: int) -> dict[str, list[str] | None]:
    """Each condition's neighbour job (None: the cores free); ``threads``: the default count."""
    return {
        "free": None,
        "beside a 1-thread job": [sys.executable, "-c", "while True: pass"],
        # A job whose count does not adapt (another library's, or cnnkit with --threads): the pessimistic neighbour.
        f"beside another training with {threads} threads": [sys.executable, "-m", "cnnkit", "train", "--epochs",
                                                            "1000", "--threads", str(threads), "--quiet"],
    }


def environment() -> dict[str, str]:
    """This environment without OMP_NUM_THREADS, which would fix the count."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def train(args: argparse.Namespace, threads: int | None, work: str) -> dict:
    """One `cnnkit train` run; its result.json figures and wall time."""
    out = os.path.join(work, "run")
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "cnnkit", "train", "--num-samples", str(args.num_samples), "--epochs",
               str(args.epochs), "--out", out, "--quiet"] + (["--threads", str(threads)] if threads else [])
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=work)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"cnnkit train failed: {proc.stderr[-2000:]}")
    with open(os.path.join(out, "result.json")) as f:
        result = json.load(f)
    return {"images_per_s": result["images_per_s"], "wall_s": wall, "threads": result["threads"],
            "thread_changes": result["thread_changes"], "val_acc": result["val_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--name", default="busy_threads")
    args = parser.parse_args()
    from cnnkit.threads import resolve_threads

    fixed = resolve_threads(None)
    work = tempfile.mkdtemp(prefix="busy-threads-")
    runs: dict[str, dict[str, list[dict]]] = {}
    for condition, neighbour in neighbours(fixed).items():
        runs[condition] = {"default": [], f"--threads {fixed}": []}
        job = None
        if neighbour:
            job = subprocess.Popen(neighbour, env=environment(), cwd=work, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            time.sleep(8)  # past its start-up: computing when the runs begin
        try:
            for r in range(args.rounds):
                ways = [("default", None), (f"--threads {fixed}", fixed)]
                for way, threads in ways if r % 2 == 0 else ways[::-1]:
                    runs[condition][way].append(train(args, threads, work))
                    last = runs[condition][way][-1]
                    print(f"{condition}, {way}, round {r + 1}: {last['images_per_s']:,.0f} images/s, "
                          f"{last['wall_s']:.1f} s, changes {last['thread_changes']}", file=sys.stderr, flush=True)
        finally:
            if job:
                job.kill()
                job.wait()
    cpu = cpu_info()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    write_json(args.name, {"date": stamp, "cpu": cpu, "num_samples": args.num_samples, "epochs": args.epochs,
                           "default_threads": fixed, "runs": runs})
    lines = [f"# cnnkit train on a busy CPU: the default thread count against {fixed} fixed", "",
             f"{stamp}; {cpu_label(cpu)}; `python -m benchmarks.busy_threads`: `cnnkit train --num-samples "
             f"{args.num_samples} --epochs {args.epochs}` (shapes, batch 32), {args.rounds} runs each way "
             "alternated; training images/s (median; the runs) and the whole command's seconds.", "",
             "| condition | way | images/s: median (runs) | wall s (runs) | thread changes (first run) |",
             "|---|---|---|---|---|"]
    for condition, ways in runs.items():
        for way, results in ways.items():
            speeds = [r["images_per_s"] for r in results]
            walls = ", ".join(f"{r['wall_s']:.1f}" for r in results)
            changes = "; ".join(f"{c['before']}->{c['threads']} at epoch {c['epoch']}, batch {c['batch']}"
                                for c in results[0]["thread_changes"]) or "none"
            lines.append(f"| {condition} | {way} | {statistics.median(speeds):,.0f} "
                         f"({', '.join(f'{s:,.0f}' for s in speeds)}) | "
                         f"{walls} | {changes} |")
    write_markdown(args.name, lines)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
