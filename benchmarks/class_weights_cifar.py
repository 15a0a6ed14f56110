"""Do class weights help on imbalanced data? simple_cnn on CIFAR-10 with three classes cut to a tenth.

    python -m benchmarks.class_weights_cifar [--data ../shared/datasets/cifar10-jpeg/train] [--epochs 3]

1. A balanced validation set is held out first: 500 images of every class (a fixed random choice).
2. The training folder keeps the other 4,500 images of seven classes and 10% of those of automobile, cat and
   deer (450 each): each rare class has a close neighbour (truck, dog, horse) to be mistaken for.
   Both are folders of symlinks under --work.
3. simple_cnn trains with the same seed, data order and settings: plainly, and with --class-weights auto
   (and, with --sampler, with --balanced-sampler).
4. last.pt of each run is evaluated on the validation folder: recall of every class from the confusion matrix,
   and macro recall, their mean (accuracy on a balanced set counts every image once, so it weighs classes equally
   too, but recall per class is what shows where the errors are).
Writes benchmarks/results/class_weights_cifar.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import cnnkit
from benchmarks.transfer_cifar import link_subset

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
RARE = ["automobile", "cat", "deer"]


def macro_recall(confusion: list[list[int]]) -> tuple[float, list[float]]:
    """Mean over classes of recall (diagonal / row sum; rows are the true classes), and the recalls."""
    recalls = [row[i] / max(sum(row), 1) for i, row in enumerate(confusion)]
    return sum(recalls) / len(recalls), recalls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/cifar10-jpeg/train")
    ap.add_argument("--work", default="runs/class-weights-cifar")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--val-per-class", type=int, default=500)
    ap.add_argument("--rare-fraction", type=float, default=0.1)
    ap.add_argument("--sampler", action="store_true", help="also train with --balanced-sampler")
    args = ap.parse_args()

    rng = random.Random(0)
    order = {}
    for c in CLASSES:
        files = sorted(os.listdir(os.path.join(args.data, c)))
        order[c] = rng.sample(files, len(files))
    n_val = args.val_per_class
    n_common = min(len(files) for files in order.values()) - n_val
    n_rare = round(n_common * args.rare_fraction)
    train_dir, val_dir = os.path.join(args.work, "train"), os.path.join(args.work, "val")
    for c in CLASSES:
        link_subset(args.data, val_dir, [c], lambda files, c=c: order[c][:n_val])
        keep = n_rare if c in RARE else n_common
        link_subset(args.data, train_dir, [c], lambda files, c=c, keep=keep: order[c][n_val : n_val + keep])

    common = dict(model="simple_cnn", data=train_dir, val_data=val_dir, epochs=args.epochs, batch_size=128,
                  seed=0, progress=False)
    arms = {"plain": {}, "class_weights_auto": {"class_weights": "auto"}}
    if args.sampler:
        arms["balanced_sampler"] = {"balanced_sampler": True}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = {}
    for name, options in arms.items():
        t0 = time.perf_counter()
        r = cnnkit.train(**common, **options, out=os.path.join(args.work, f"{stamp}-{name}"))
        ev = cnnkit.evaluate(os.path.join(r.run_dir, "last.pt"), val_dir)
        macro, recalls = macro_recall(ev.confusion_matrix)
        results[name] = {
            "macro_recall": round(macro, 4), "acc": round(ev.acc, 4),
            "recall": {c: round(x, 4) for c, x in zip(ev.classes, recalls)},
            "rare_recall_mean": round(sum(recalls[ev.classes.index(c)] for c in RARE) / len(RARE), 4),
            "train_images": r.num_train, "val_images": ev.count, "precision": r.precision,
            "time_s": round(time.perf_counter() - t0, 1), "run_dir": r.run_dir, "options": options,
        }
        print(name, json.dumps(results[name]), flush=True)

    report = {"data": args.data, "rare_classes": RARE, "rare_train_images": n_rare, "common_train_images": n_common,
              "val_per_class": n_val, "model": "simple_cnn", "epochs": args.epochs, "batch_size": 128, "seed": 0,
              "evaluated": "last.pt", "results": results}
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/class_weights_cifar.json", "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# Class weights on imbalanced CIFAR-10 JPEG: simple_cnn, {args.epochs} epochs, one seed",
             "",
             f"Training: {n_common} images of seven classes, {n_rare} of {', '.join(RARE)}; validation: {n_val} "
             "held-out images of every class. Recall per class from the confusion matrix of last.pt; macro recall is "
             "their mean.",
             "",
             "| run | macro recall | accuracy | " + " | ".join(f"recall {c}" for c in RARE) + " | time (s) |",
             "|---|---|---|" + "---|" * len(RARE) + "---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['macro_recall']:.3f} | {r['acc']:.3f} | "
                     + " | ".join(f"{r['recall'][c]:.3f}" for c in RARE) + f" | {r['time_s']} |")
    lines += ["", "Recall of every class:", "", "| run | " + " | ".join(CLASSES) + " |",
              "|---|" + "---|" * len(CLASSES)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['recall'][c]:.3f}" for c in CLASSES) + " |")
    with open("benchmarks/results/class_weights_cifar.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
