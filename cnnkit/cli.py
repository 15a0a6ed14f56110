"""The ``cnnkit`` command: argument parsing and dispatch only; every command calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from cnnkit.errors import UserError

EXAMPLES = {
    "train": "examples:\n  cnnkit train\n  cnnkit train --model simple_cnn --data cifar10 --download --epochs 15\n"
             "  cnnkit train --model resnet18 --data photos/ --val-split 0.1 --input-size 64 --json",
    "eval": "examples:\n  cnnkit eval runs/20260101-120000-simple_cnn\n  cnnkit eval best.pt --data test_images/ --json",
    "predict": "examples:\n  cnnkit predict runs/20260101-120000-simple_cnn cat.jpg dog.png\n"
               "  cnnkit predict best.pt photos/ --topk 3 --json\n"
               "  cnnkit predict model.onnx photos/     # onnxruntime on the CPU, preprocessing from the file",
    "export": "examples:\n  cnnkit export runs/20260101-120000-simple_cnn --format onnx --out model.onnx --verify\n"
              "  cnnkit export best.pt --format torchscript --out model.ts --verify-images photos/\n"
              "  cnnkit export best.pt --format safetensors --out model.safetensors --json\n\n"
              "Exports take what the PyTorch model takes: a float batch N x C x H x W, resized, centre-cropped and\n"
              "normalised, (pixel/255 - mean) / std; classes, input size, channels, mean and std are in the metadata.",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _model_options(pairs: list[str]) -> dict:
    """``--model-opt key=value``: values parsed as JSON where they are JSON (numbers, lists, true), else text."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--model-opt wants key=value, got '{pair}'")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
        if isinstance(options[key], list):
            options[key] = tuple(options[key])
    return options


def build_parser() -> argparse.ArgumentParser:
    from cnnkit import __version__
    from cnnkit.data.sources import BUILTIN
    from cnnkit.export import FORMATS
    from cnnkit.train.config import TrainConfig
    from cnnkit.train.optim import OPTIMIZERS, SCHEDULES
    from cnnkit.train.precision import PRECISIONS

    parser = _Parser(prog="cnnkit", description="Train, evaluate and use convolutional neural networks.")
    parser.add_argument("--version", action="version", version=f"cnnkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter
    d = TrainConfig()

    def data_options(p: argparse.ArgumentParser, default_data: str | None) -> None:
        p.add_argument("--data", default=default_data,
                       help=f"{', '.join(BUILTIN)}, or a folder with one sub-folder of images per class"
                            + (f" (default: {default_data})" if default_data else ""))
        p.add_argument("--data-dir", help="where torchvision datasets are (default: $CNNKIT_DATA or ~/.cache/cnnkit/datasets)")
        p.add_argument("--val-data", metavar="DIR", help="a separate validation folder with the same class sub-folders")
        p.add_argument("--val-split", type=_fraction, metavar="F",
                       help="hold out this fraction of each class for validation (default for folders: 0.1)")

    t = sub.add_parser("train", help="train a model", epilog=EXAMPLES["train"], formatter_class=fmt)
    t.add_argument("--model", default=d.model, help=f"a name from `cnnkit models` (default: {d.model})")
    t.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="an option of the model's factory, e.g. --model-opt head=flatten (repeatable)")
    data_options(t, d.data)
    tl = t.add_argument_group("transfer learning")
    tl.add_argument("--pretrained", action="store_true",
                    help="start from torchvision's default weights (downloaded, or from $TORCH_HOME's cache)")
    tl.add_argument("--weights", metavar="PATH", help="start from a state dict, .safetensors file or cnnkit run")
    tl.add_argument("--freeze", choices=("backbone",), help="train only the classifier head")
    tl.add_argument("--unfreeze", metavar="NAMES", help="train only these modules, e.g. layer4,fc")
    tl.add_argument("--lr-backbone", type=_positive_float, metavar="LR",
                    help="learning rate for everything but the head (discriminative learning rates)")
    tl.add_argument("--stages", metavar="PLAN",
                    help="staged fine-tuning, e.g. 'fc:3@1e-3,layer4+fc:5@1e-4' (modules:epochs@lr; overrides --epochs/--lr)")
    t.add_argument("--download", action="store_true", help="download torchvision datasets (needs internet)")
    t.add_argument("--input-size", type=_positive_int, metavar="PIXELS", help="square input size (default: the data's)")
    t.add_argument("--channels", type=int, choices=(1, 3), help="image channels (default: the data's)")
    t.add_argument("--num-samples", type=_positive_int, metavar="N",
                   help="use N training images (for shapes: generate N; default 20000)")
    t.add_argument("--epochs", type=_positive_int, default=d.epochs, help=f"(default: {d.epochs})")
    t.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help=f"(default: {d.batch_size})")
    t.add_argument("--lr", type=_positive_float, help="peak learning rate (default: 0.05 for sgd, 0.002 for adamw)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    t.add_argument("--momentum", type=float, default=d.momentum)
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov)
    t.add_argument("--weight-decay", type=float, default=d.weight_decay)
    t.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    t.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs,
                   help="linear warm-up length (onecycle: 30%% of the run when 0)")
    t.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    t.add_argument("--crop-pad", type=int, metavar="PIXELS", help="random translation by up to this many pixels (default: size/8)")
    t.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, off for mnist)")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    t.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 on CPUs with bf16 matrix instructions and on recent GPUs, else fp32/fp16")
    t.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last)
    t.add_argument("--clip-grad", type=_positive_float, metavar="NORM",
                   help="clip the gradient norm (the norm before clipping goes to metrics.csv)")
    t.add_argument("--nan", choices=("stop", "skip"), default=d.nan,
                   help="a NaN/inf loss stops the run (keeping the last good checkpoint) or skips the batch")
    t.add_argument("--bad-images", choices=("skip", "error"), default=d.bad_images,
                   help="broken images in a folder: leave them out and list them, or stop at the first")
    t.add_argument("--out", metavar="DIR", help="run folder (default: runs/<timestamp>-<model>)")
    t.add_argument("--save-every", type=int, default=d.save_every, metavar="STEPS",
                   help="also write last.pt every STEPS steps (default: once per epoch)")
    t.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run exactly where it stopped (its own settings are used)")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")

    e = sub.add_parser("eval", help="evaluate a run or checkpoint", epilog=EXAMPLES["eval"], formatter_class=fmt)
    e.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    data_options(e, None)
    e.add_argument("--batch-size", type=_positive_int)
    e.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint holding arbitrary Python objects (runs code from the file: only for files you trust)")
    e.add_argument("--device", default="auto")
    e.add_argument("--json", action="store_true")

    p = sub.add_parser("predict", help="classify images", epilog=EXAMPLES["predict"], formatter_class=fmt)
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", help="a run folder, a .pt, .safetensors or .onnx file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--topk", type=_positive_int, default=5)
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load a checkpoint holding arbitrary Python objects (runs code from the file: only for files you trust)")
    p.add_argument("--json", action="store_true")

    em = sub.add_parser("embed", help="penultimate-layer features of a folder of images",
                        epilog="examples:\n  cnnkit embed runs/<run> photos/ --out feats.npy\n"
                               "  cnnkit embed resnet18 --pretrained photos/ --out feats.npy", formatter_class=fmt)
    em.add_argument("model", metavar="MODEL_OR_RUN")
    em.add_argument("data", metavar="DATA")
    em.add_argument("--out", required=True, metavar="FILE.npy")
    em.add_argument("--pretrained", action="store_true")
    em.add_argument("--input-size", type=_positive_int, metavar="PIXELS")

    pr = sub.add_parser("probe", help="linear probe: how good a backbone's features are for a dataset",
                        epilog="examples:\n  cnnkit probe resnet18 --pretrained photos/ --val-split 0.2",
                        formatter_class=fmt)
    pr.add_argument("model", metavar="MODEL_OR_RUN")
    pr.add_argument("data", metavar="DATA")
    pr.add_argument("--pretrained", action="store_true")
    pr.add_argument("--val-split", type=_fraction, metavar="F")
    pr.add_argument("--val-data", metavar="DIR")
    pr.add_argument("--input-size", type=_positive_int, metavar="PIXELS")
    pr.add_argument("--json", action="store_true")
    x = sub.add_parser("export", help="export a model for deployment: ONNX, TorchScript or safetensors",
                       epilog=EXAMPLES["export"], formatter_class=fmt)
    x.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT")
    x.add_argument("--format", required=True, choices=FORMATS)
    x.add_argument("--out", required=True, metavar="PATH",
                   help=f"the file to write, ending in {', '.join(e for ends in FORMATS.values() for e in ends)}")
    x.add_argument("--verify", action="store_true",
                   help="run the export on random inputs at batch sizes 1 and 7 and report its largest difference "
                        "from PyTorch (fails above 1e-4)")
    x.add_argument("--verify-images", nargs="+", metavar="PATH",
                   help="also compare on these image files or folders (the first 64 images; implies --verify)")
    x.add_argument("--json", action="store_true")

    m = sub.add_parser("models", help="list the model names")
    m.add_argument("pattern", nargs="?", help="a filter such as 'resnet*'")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from cnnkit.train.config import TrainConfig
    from cnnkit.train.loop import train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values["model_options"] = _model_options(args.model_opt)
    result = train(TrainConfig(**values), log=sys.stderr if args.json else sys.stdout, resume=args.resume)
    if args.json:
        print(json.dumps(dataclasses.asdict(result)))
    else:
        print(f"done: val acc {result.val_acc:.4f} (best {result.best_val_acc:.4f} at epoch {result.best_epoch}), "
              f"{result.images_per_s:,.0f} images/s, {result.train_time_s:.1f} s; run folder {result.run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cnnkit.evaluate import confusion_text, evaluate
    from cnnkit.train.checkpoint import load_checkpoint

    r = evaluate(load_checkpoint(args.checkpoint, trust=args.trust_checkpoint), args.data, data_dir=args.data_dir, val_split=args.val_split,
                 val_data=args.val_data, batch_size=args.batch_size, device=args.device)
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
        return 0
    print(f"{r.checkpoint} on {r.count:,} images of {r.data}: acc {r.acc:.4f}  top-5 {r.top5:.4f}  loss {r.loss:.4f}")
    print(f"{'class':<16}{'precision':>10}{'recall':>10}{'support':>9}")
    for c in r.per_class:
        print(f"{c['class'][:15]:<16}{c['precision']:>10.4f}{c['recall']:>10.4f}{c['support']:>9}")
    print(confusion_text(r))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnkit.predict import predict
    from cnnkit.train.checkpoint import load_checkpoint

    model = load_checkpoint(args.checkpoint, trust=True) if args.trust_checkpoint else args.checkpoint
    results = predict(model, args.paths, topk=args.topk)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"cnnkit: error: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            if "top" in r:
                print(r["path"] + ": " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
    return 1 if failed else 0


def cmd_embed(args: argparse.Namespace) -> int:
    from cnnkit.embed import embed

    r = embed(args.model, args.data, args.out, pretrained=args.pretrained, input_size=args.input_size)
    print(f"wrote {r['images']:,} x {r['dim']} features to {r['out']} (labels beside it)")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from cnnkit.embed import probe

    r = probe(args.model, args.data, pretrained=args.pretrained, val_split=args.val_split, val_data=args.val_data,
              input_size=args.input_size)
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
    else:
        print(f"linear probe on {r.feature_dim}-d features: train acc {r.train_acc:.4f} ({r.num_train:,} images), "
              f"val acc {r.val_acc:.4f} ({r.num_val:,} images)")
def cmd_export(args: argparse.Namespace) -> int:
    from cnnkit.export import export

    r = export(args.checkpoint, args.format, args.out, verify=args.verify, images=args.verify_images)
    if args.json:
        print(json.dumps(dataclasses.asdict(r)))
    else:
        print(f"exported {r.checkpoint} ({r.model}) as {r.format} to {r.path}: "
              f"{r.size_bytes / 1e6:.1f} MB in {r.export_time_s:.1f} s")
        if r.checks:
            diffs = ", ".join(f"{c.inputs} x{c.batch_size} {c.max_abs_diff:.1e}" for c in r.checks)
            print(f"largest difference from PyTorch: {diffs}; {'ok' if r.verified else 'FAILED'} "
                  f"(tolerance {r.tolerance:g}; logits up to {max(c.max_abs_logit for c in r.checks):.3g})")
    if r.verified is False:
        print(f"cnnkit export: error: {r.path} differs from the PyTorch model by up to {r.max_abs_diff:.2e} "
              f"(tolerance {r.tolerance:g}); do not deploy it, and please report it", file=sys.stderr)
        return 1
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cnnkit.models import list_models

    for name in list_models(args.pattern):
        print(name)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    command = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export,
               "models": cmd_models, "embed": cmd_embed, "probe": cmd_probe}[args.command]
    try:
        return command(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"cnnkit {args.command}: {e.label}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug, not the user's fault: one line, the traceback behind --debug
        if args.debug:
            raise
        print(f"cnnkit {args.command}: internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              "(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
