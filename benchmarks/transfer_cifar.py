"""Does transfer learning pay off? resnet18 pretrained on five CIFAR-10 classes, fine-tuned on the other five.

    python -m benchmarks.transfer_cifar [--data ../shared/datasets/cifar10-jpeg/train] [--pretrain-epochs 16]

1. Pretrain resnet18 from scratch on airplane, automobile, bird, cat, deer (all their images, 10% held out),
   with the CIFAR stem (``stem=cifar``: 3x3 stride-1 conv1, no max-pool). Why not torchvision's stem: at
   32x32 it leaves layer4 a 1x1 map, and features learned that way transferred no better than training from
   scratch (an earlier run of this benchmark: head only 0.607, head then layer4 0.680, scratch 0.685). The CIFAR
   stem costs about 15x the multiply-adds (0.56 G per image), but bf16 on this CPU trains it at about 200
   images/s, so 16 epochs of 22,500 images take about half an hour. Why 16: 8 epochs (val acc 0.874) gave
   features whose linear probe reached 0.772 on the target classes, against 0.798 after 16 (val acc 0.900);
   24 epochs (val acc 0.913, 45 minutes) gave head only 0.797 and head then layer4 0.837 against the same
   0.705 from scratch, so the extra third of the time lifts (b) by about a point and (a) hardly at all. An MLP
   projector before the classifier during pretraining (linear 2048, BatchNorm, ReLU: SL-MLP, Wang et al. 2022),
   meant to keep the backbone's features general, did worse: its loss spiked at the peak learning rate, val
   acc 0.871 after 16 epochs, head only 0.743. Nor did fastai's head for (a) (BatchNorm, dropout, linear 512,
   ReLU, BatchNorm, dropout, linear) in a probe on the seed-0 backbone's cached features with flip augmentation:
   0.797 on average-pooled and 0.793 on concatenated average- and max-pooled features, against 0.797 and 0.803
   for a linear head trained the same way (AdamW, best of 3 rates each). Pretraining with CutMix (alpha 1, 16
   epochs, seed 0) gave worse features: val acc 0.871, the same linear heads 0.773 and 0.785. Nor did
   self-supervised label augmentation (Lee et al. 2020) at the same compute: every pretraining image also
   rotated by 180 degrees, the labels class x rotation (10 classes, 45,000 images, 8 epochs, seed 0; val acc
   0.830 on the joint labels) gave a linear probe of 0.797 on the cached average-pooled features, the same as
   without it (best of 3 rates, flip augmentation).
2. On dog, frog, horse, ship, truck with only 100 training images per class, compare
   (a) head only (backbone frozen), twice: the classic new ``fc`` on layer4's pooled features, and a head that
   reads the pooled features of layer2, layer3 and layer4 side by side (``--model-opt head_from=...``; Head2Toe,
   Evci et al. 2022), (b) head, then layer4 + head at a tenth of the rate, (c) from scratch
   (three optimizer settings, so the baseline is not a straw man), all validated on the same 300 held-out
   images per class and given the same number of epochs. Each run's final weights are evaluated plainly and
   with test-time augmentation (``tta``: mirror and 1-pixel shifts, softmax averaged), every run alike, and
   plainly on every other image of the five classes (4,600 each, 23,000 in all): the head's design and rates
   were chosen on the 300 per class, and 1,500 images leave about a point of noise either way.
Writes benchmarks/results/transfer_cifar.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import cnnkit

PRETRAIN_CLASSES = ["airplane", "automobile", "bird", "cat", "deer"]
TARGET_CLASSES = ["dog", "frog", "horse", "ship", "truck"]


def link_subset(src: str, dst: str, classes: list[str], pick) -> None:
    """An ImageFolder of symlinks: for each class, the files ``pick(sorted files)`` returns, and no others (links
    left by a run with other split sizes would put training images among the test images)."""
    for c in classes:
        os.makedirs(os.path.join(dst, c), exist_ok=True)
        for f in os.listdir(os.path.join(dst, c)):
            if os.path.islink(os.path.join(dst, c, f)):
                os.unlink(os.path.join(dst, c, f))
        files = sorted(os.listdir(os.path.join(src, c)))
        for f in pick(files):
            target = os.path.join(dst, c, f)
            os.symlink(os.path.abspath(os.path.join(src, c, f)), target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/datasets/cifar10-jpeg/train")
    ap.add_argument("--work", default="runs/transfer-cifar")
    ap.add_argument("--pretrain-epochs", type=int, default=16)
    ap.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"],
                    help="cifar: 3x3 stride-1 conv1, no max-pool (layer4 sees 4x4, not 1x1); imagenet: torchvision's")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--finetune-epochs", type=int, default=15)
    ap.add_argument("--pretrained-run", help="reuse this finished pretraining run instead of training one")
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--val-per-class", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="seed of every run, pretraining included; results of a seed "
                    "other than 0 go to transfer_cifar-seedN.json/.md (one seed's margin moves by a few points)")
    ap.add_argument("--runs", nargs="+", help="only these of a_head_only, a_head_only_stages, b_head_then_layer4, "
                    "c_from_scratch, c_from_scratch_sgd, c_from_scratch_3e-3 (the table then holds only them)")
    args = ap.parse_args()

    rng = random.Random(0)
    shuffled = {}

    def fixed_order(files):
        key = tuple(files[:3])
        if key not in shuffled:
            shuffled[key] = rng.sample(files, len(files))
        return shuffled[key]

    pre_dir, ft_train, ft_val, ft_test = (os.path.join(args.work, d) for d in
                                          ("pretrain-data", "finetune-train", "finetune-val", "finetune-test"))
    link_subset(args.data, pre_dir, PRETRAIN_CLASSES, lambda files: files)
    link_subset(args.data, ft_train, TARGET_CLASSES, lambda files: fixed_order(files)[: args.per_class])
    link_subset(args.data, ft_val, TARGET_CLASSES,
                lambda files: fixed_order(files)[args.per_class : args.per_class + args.val_per_class])
    # Every other image of those classes (4,600 each): a second check that no choice was fitted to the 300.
    link_subset(args.data, ft_test, TARGET_CLASSES,
                lambda files: fixed_order(files)[args.per_class + args.val_per_class :])

    stamp = time.strftime("%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    if args.pretrained_run:
        pre = cnnkit.TrainResult(**json.load(open(os.path.join(args.pretrained_run, "result.json"))))
        pretrain_s = pre.train_time_s
    else:
        pre = cnnkit.train(model="resnet18", model_options={"stem": args.stem}, data=pre_dir, val_split=0.1, seed=args.seed,
                           epochs=args.pretrain_epochs, batch_size=128, precision=args.precision,
                           out=os.path.join(args.work, f"{stamp}-pretrain"))
        pretrain_s = time.perf_counter() - t0
    common = dict(model="resnet18", model_options={"stem": args.stem}, data=ft_train, val_data=ft_val, batch_size=32, optimizer="adamw",
                  schedule="constant", progress=False, precision=args.precision, seed=args.seed, tta=True)
    e = args.finetune_epochs
    head_epochs = max(1, e // 3)
    runs = {
        # A linear head on frozen features is a convex problem: it takes a high rate (measured on this split:
        # AdamW one-cycle 0.1: 0.792; constant 1e-3: 0.749, 1e-2: 0.788).
        "a_head_only": dict(weights=pre.run_dir, freeze="backbone", lr=0.1, epochs=e, schedule="onecycle"),
        # The same, with a head that reads layer2, layer3 and layer4 (``head_from``, Head2Toe): layer4's features
        # are the most specific to the pretraining classes. Rates measured on this split, seed 0 / seed 1:
        # 3e-3: 0.828 / 0.834, 1e-2: 0.821 / 0.814 (average pooling only, seed 0: 0.1 0.801, 0.03 0.813, 0.01 0.816).
        "a_head_only_stages": dict(weights=pre.run_dir, freeze="backbone", lr=3e-3, epochs=e, schedule="onecycle",
                                   model_options={"stem": args.stem, "head_from": "layer2,layer3,layer4"}),
        "b_head_then_layer4": dict(weights=pre.run_dir, stages=f"fc:{head_epochs}@1e-3,layer4+fc:{e - head_epochs}@1e-4"),
        "c_from_scratch": dict(lr=1e-3, epochs=e, schedule="onecycle"),
        # The baseline gets a second chance: cnnkit's default optimizer (SGD, Nesterov, one-cycle at 0.05).
        "c_from_scratch_sgd": dict(optimizer="sgd", lr=None, epochs=e, schedule="onecycle"),
        "c_from_scratch_3e-3": dict(lr=3e-3, epochs=e, schedule="onecycle"),
    }
    results = {}
    for name, options in runs.items():
        if args.runs and name not in args.runs:
            continue
        r = cnnkit.train(**{**common, **options}, out=os.path.join(args.work, f"{stamp}-{name}"))
        test_acc = cnnkit.evaluate(os.path.join(r.run_dir, "last.pt"), ft_test).acc
        results[name] = {"val_acc": r.val_acc, "tta_val_acc": r.tta_val_acc, "test_acc": test_acc,
                         "best_val_acc": r.best_val_acc, "epochs": r.epochs,
                         "train_time_s": round(r.train_time_s, 1), "options": options}
        print(name, results[name], flush=True)

    report = {
        "seed": args.seed,
        "pretrain": {"classes": PRETRAIN_CLASSES, "val_acc": pre.val_acc, "epochs": pre.epochs,
                     "images": pre.num_train, "time_s": round(pretrain_s, 1), "run": pre.run_dir,
                     "stem": {"cifar": "CIFAR (3x3/1, no max-pool)", "imagenet": "torchvision (7x7/2 + max-pool)"}[args.stem]},
        "finetune": {"classes": TARGET_CLASSES, "train_per_class": args.per_class, "val_per_class": args.val_per_class,
                     "test_images": sum(len(os.listdir(os.path.join(ft_test, c))) for c in TARGET_CLASSES)},
        "results": results,
    }
    os.makedirs("benchmarks/results", exist_ok=True)
    result_name = "transfer_cifar" + (f"-seed{args.seed}" if args.seed else "")
    with open(f"benchmarks/results/{result_name}.json", "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# Transfer on CIFAR-10 JPEG: resnet18 pretrained on {', '.join(PRETRAIN_CLASSES)} "
             f"({pre.epochs} epochs, val acc {pre.val_acc:.3f}), fine-tuned on {', '.join(TARGET_CLASSES)} "
             f"with {args.per_class} images per class (seed {args.seed})", "",
             "", f"{report['pretrain']['stem']} stem; fine-tuning and validation images are disjoint; the margin is "
             "each run's final val acc minus the best final val acc of the from-scratch runs. With TTA: the same "
             "final weights evaluated with test-time augmentation (mirror and 1-pixel shifts, softmax averaged), "
             "for every run alike. Test: the same final weights on every other image of the five classes "
             f"({report['finetune']['test_images']:,}), never used to choose anything; its margin is over the best "
             "from-scratch test acc.", "",
             "| run | val acc (last) | margin over scratch | with TTA | margin with TTA | test acc | margin on test "
             "| best val acc | epochs | time (s) | options |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    scratch = {key: max((r[key] for n, r in results.items() if n.startswith("c_")), default=None)
               for key in ("val_acc", "tta_val_acc", "test_acc")}  # the best from-scratch run, each measure

    def margin(name: str, key: str) -> str:
        if scratch[key] is None or name.startswith("c_"):
            return ""
        return f"{100 * (results[name][key] - scratch[key]):+.1f} points"

    for name, r in results.items():
        shown = {k: v for k, v in r["options"].items() if k != "weights"}
        lines.append(f"| {name} | {r['val_acc']:.3f} | {margin(name, 'val_acc')} | {r['tta_val_acc']:.3f} | "
                     f"{margin(name, 'tta_val_acc')} | {r['test_acc']:.3f} | {margin(name, 'test_acc')} | "
                     f"{r['best_val_acc']:.3f} | {r['epochs']} | "
                     f"{r['train_time_s']} | `{shown}` |")
    with open(f"benchmarks/results/{result_name}.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
