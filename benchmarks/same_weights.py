"""Proof that a refactor of the training code changed nothing: fixed-seed CPU fp32 runs, and the sha256 of
their final weights (every tensor of the saved state dict, in key order) and of their printed metrics.

Run it on two checkouts and compare the lines it prints; they must be identical:

    python benchmarks/same_weights.py                    # this checkout (the folder above benchmarks/)
    python benchmarks/same_weights.py --repo /tmp/base   # another one, e.g. a `git worktree add` of the base

Each run uses one CPU thread, so the float sums are taken in one fixed order. Four training runs (a few minutes
in all on a small CPU): the demo defaults, the fast recipe, the weight EMA with mixup and test-time
augmentation, and convnet (which learns in 2 epochs) with gradient clipping and class weights; and a
learning-rate range test (``lr_find``: its figures, which follow from every step's loss).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

COMMON = ["--data", "shapes", "--num-samples", "600", "--precision", "fp32", "--threads", "1"]
RUNS = {
    "plain": ["--epochs", "2"],
    "fast": ["--recipe", "fast", "--epochs", "1"],
    "ema_mixup_tta": ["--epochs", "2", "--ema", "0.9", "--mixup", "0.2", "--tta"],
    "convnet_clip": ["--model", "convnet", "--epochs", "2", "--clip-grad", "1.0", "--class-weights", "auto",
                     "--keep-best", "1"],
}
CHECKPOINTS = ("last.pt", "best.pt", "last_ema.pt", "best_ema.pt")
LR_FIND = ["lr-find", *COMMON, "--model", "convnet", "--start-lr", "1e-3", "--end-lr", "100", "--steps", "60", "--json"]


def weights_hash(path: str) -> str:
    """sha256 over every tensor of the checkpoint's state dict, in key order (names, dtypes, shapes, bytes)."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    digest = hashlib.sha256()
    for name, tensor in payload["state_dict"].items():
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def metric_lines(stdout: str) -> list[str]:
    """The lines that report figures, without their speed (which differs from run to run)."""
    lines = [line for line in stdout.splitlines()
             if re.match(r"epoch \d+/\d+  train loss", line) or line.startswith("test-time augmentation")]
    return [re.sub(r"\s+[\d,]+ images/s$", "", line) for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        help="the checkout whose cnnkit trains (default: this one)")
    parser.add_argument("--runs", nargs="*", default=[*RUNS, "lr_find"], choices=[*RUNS, "lr_find"])
    parser.add_argument("--show", action="store_true", help="also print the metric lines themselves")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.repo)}
    for name in args.runs:
        out = os.path.join(tempfile.mkdtemp(prefix="same-weights-"), name)
        if name == "lr_find":
            done = subprocess.run([sys.executable, "-m", "cnnkit", *LR_FIND, "--out", out], env=env,
                                  capture_output=True, text=True, cwd=args.repo)
            if done.returncode:
                sys.exit(f"{name}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
            figures = {k: v for k, v in json.loads(done.stdout.splitlines()[-1]).items() if k != "plot"}
            print(f"lr_find figures {hashlib.sha256(json.dumps(figures, sort_keys=True).encode()).hexdigest()}")
            if args.show:
                print(f"    {figures}")
            continue
        command = [sys.executable, "-m", "cnnkit", "train", *COMMON, *RUNS[name], "--out", out]
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=args.repo)
        if done.returncode:
            sys.exit(f"{name}: exit {done.returncode}\n{done.stdout}\n{done.stderr}")
        lines = metric_lines(done.stdout)
        print(f"{name} metrics {hashlib.sha256(chr(10).join(lines).encode()).hexdigest()}")
        if args.show:
            print("\n".join("    " + line for line in lines))
        for checkpoint in CHECKPOINTS:
            path = os.path.join(out, checkpoint)
            if os.path.exists(path):
                print(f"{name} {checkpoint} {weights_hash(path)}")


if __name__ == "__main__":
    main()
