"""The ``cnnkit`` command: argument parsing and dispatch only; every command calls the library."""

from __future__ import annotations

import argparse
import os
import dataclasses
import json
import re
import sys
from typing import Sequence

from cnnkit import strict_json
# Only modules free of torch: the parser answers --help and --version without loading it (seconds).
from cnnkit.choices import (
    AUGMENT_POLICIES, BUILTIN, COMPILE_MODES, DECODE_CHOICES, DEFAULT_THRESHOLD, FORMATS, OPTIMIZERS, PRECISIONS,
    SCHEDULES, SHAPES_TRAIN,
)
from cnnkit.errors import WARNING, TrainingStopped, UserError, did_you_mean, plural
from cnnkit.train.config import DATA_DEFAULTS, GENERAL_DEFAULTS, SESSION_OPTIONS, TrainConfig
from cnnkit.train.recipes import RECIPES

EXAMPLES = {
    "train": "examples:\n  cnnkit train\n  cnnkit train --model simple_cnn --data cifar10 --download --epochs 15\n"
             "  cnnkit train --model resnet18 --data photos/ --val-split 0.1 --input-size 64 --json\n"
             "  cnnkit train --lr auto --report                # learning rate from the range test; report.html at the end\n"
             "  cnnkit train --tensorboard --quiet             # then: tensorboard --logdir runs\n"
             "  cnnkit train --config run.yaml --epochs 5          # the file's options, then the flags given here\n"
             "  cnnkit train --config runs/<run>/config.json --out again   # replay a run\n"
             "  cnnkit train --cutmix 1.0 --mix-off-epochs 2 --ema 0.999 --early-stop 5 --keep-best 3",
    "eval": "examples:\n  cnnkit eval runs/20260101-120000-simple_cnn\n  cnnkit eval best.pt --data test_images/ --json",
    "predict": "examples:\n  cnnkit predict runs/20260101-120000-simple_cnn cat.jpg dog.png\n"
               "  cnnkit predict best.pt photos/ --topk 3 --json\n"
               "  cnnkit predict model.onnx photos/     # onnxruntime on the CPU, preprocessing from the file",
    "export": "examples:\n  cnnkit export runs/20260101-120000-simple_cnn --format onnx --out model.onnx --verify\n"
              "  cnnkit export best.pt --format torchscript --out model.ts --verify-images photos/\n"
              "  cnnkit export best.pt --format safetensors --out model.safetensors --json\n\n"
              "Exports take what the PyTorch model takes: a float batch N x C x H x W, resized, centre-cropped and\n"
              "normalised, (pixel/255 - mean) / std; classes, input size, channels, mean and std are in the metadata.",
    "shape": "examples:\n  cnnkit shape --size 5 --kernel 3 --stride 2 --padding 1\n"
             "  cnnkit shape --size 224 --kernel 3 --stride 2 --padding 1 --pool max\n"
             "  cnnkit shape --size 7 --kernel 3 --dilation 2 --json",
    "summary": "examples:\n  cnnkit summary resnet18\n  cnnkit summary resnet18 --input-size 3 224 224 --json\n"
               "  cnnkit summary runs/20260101-120000-simple_cnn --depth 1\n"
               "  cnnkit summary convnet --model-opt widths=[16,32] --input-size 1 28 28",
    "rf": "examples:\n  cnnkit rf resnet18 --depth 1\n  cnnkit rf vgg16 --json\n"
          "  cnnkit rf simple_cnn --verify\n  cnnkit rf resnet18 --input-size 448 --verify --verify-layer layer4\n"
          "  cnnkit rf runs/20260101-120000-simple_cnn --effective erf.png\n"
          "  cnnkit rf runs/20260101-120000-simple_cnn --effective erf.png --images-from photos/",
    "features": "examples:\n  cnnkit features resnet18 --list-layers\n"
                "  cnnkit features runs/20260101-120000-simple_cnn --layer features.0 --layer features.3 "
                "--image cat.png --out maps/",
    "filters": "examples:\n  cnnkit filters runs/20260101-120000-simple_cnn --out filters.png\n"
               "  cnnkit filters best.pt --layer features.3 --mode channels --out conv2.png",
    "cam": "examples:\n  cnnkit cam runs/20260101-120000-simple_cnn --image star.png --out cam.png\n"
           "  cnnkit cam best.pt --image star.png --class circle --method all --out cam.png",
    "embed": "examples:\n  cnnkit embed runs/<run> photos/ --out feats.npy\n"
             "  cnnkit embed resnet18 --pretrained photos/ --out feats.npy",
    "probe": "examples:\n  cnnkit probe resnet18 --pretrained photos/ --val-split 0.2",
    "models": "examples:\n  cnnkit models\n  cnnkit models 'resnet*'\n  cnnkit models '*mobilenet*'",
    "report": "examples:\n  cnnkit report                                  # the newest run under ./runs\n"
              "  cnnkit report runs/20260101-120000-simple_cnn\n"
              "  cnnkit report runs/20260101-120000-simple_cnn --out ~/simple_cnn.html --json\n\n"
              "The page is one file: pictures embedded, no scripts, no network requests. The plots also go to\n"
              "RUN_DIR/plots/: curves.png, lr.png, confusion.png, top_losses.png.",
    "runs": "examples:\n  cnnkit runs\n  cnnkit runs experiments/ --json",
    "lr-find": "examples:\n  cnnkit lr-find\n  cnnkit lr-find --model resnet18 --data photos/ --batch-size 32 --out runs/lrf\n"
               "  cnnkit lr-find --optimizer adamw --steps 300 --json\n"
               "  cnnkit train --lr auto                         # runs the test first and trains with its suggestion\n\n"
               "Takes the training options that shape the data, model and optimizer. For one-cycle, the suggestion is\n"
               "a third of the end of the valley around the lowest smoothed loss (cnnkit/train/lr_find.py says why).",
    "check-data": "examples:\n  cnnkit check-data photos/\n  cnnkit check-data photos/train --val-data photos/val --json\n"
                  "  cnnkit check-data photos/ --val-split 0.2 --model resnet18 --pretrained --input-size 224",
    "audit": "examples:\n  cnnkit audit runs/20260101-120000-resnet18\n  cnnkit audit resnet18 --freeze backbone\n"
             "  cnnkit audit resnet18 --freeze backbone --plain-train     # the silent bug cnnkit train avoids\n"
             "  cnnkit audit cnn_bn --stages 'classifier:2@1e-3,all:3@1e-4' --json",
}
OVERVIEW = """examples:
  cnnkit train                                   # simple_cnn on the generated shapes data
  cnnkit train --data photos/ --report           # your images; report.html in the run folder at the end
  cnnkit runs                                    # the runs so far: model, data, epochs, best accuracy
  cnnkit report                                  # report.html for the newest run
  cnnkit lr-find --data photos/                  # a learning rate for your data, or: train --lr auto
  cnnkit eval runs/<run>   cnnkit predict runs/<run> cat.jpg   cnnkit export runs/<run> --format onnx --out m.onnx

`cnnkit COMMAND --help` shows each command's options and examples."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2) instead of the usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        if getattr(self, "probing", False):  # _given_positionals parses a trial command line: no exit, no output
            raise _Probed(message)
        if message.startswith("the following arguments are required: "):
            message = (_positional_as_option(self, getattr(self, "words", [])) or
                       message + (_missing_image_hint(self) if "--image" in message.split(": ", 1)[1] else ""))
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)

    def _check_value(self, action: argparse.Action, value: object) -> None:
        # `cnnkit trian`: argparse lists the choices; a mistyped one also gets the near match, as options do
        try:
            super()._check_value(action, value)
        except argparse.ArgumentError as e:
            if not isinstance(value, str) or action.choices is None:
                raise
            raise argparse.ArgumentError(action, e.message + did_you_mean(value, map(str, action.choices))) from None

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self.words = list(sys.argv[1:] if args is None else args)  # what this parser was given, for error()
        if not getattr(self, "probing", False) and self._subparsers is None:
            # `cnnkit features --model resnet18 cat.jpg`: argparse would take --model for --model-opt, which it
            # abbreviates, and fail on its value; a positional argument's name as an option is said as such first.
            flags = _positional_flags(self)
            if any(word.split("=", 1)[0] in flags for word in self.words) and not {"-h", "--help"} & set(self.words):
                self.error(_positional_as_option(self, self.words))
        return super().parse_known_args(args, namespace)

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        # argparse's own parse_args reports a command's unknown options from the top parser, which points at
        # `cnnkit --help`; the command's parser knows its options, so it reports them and names a close match.
        if self._subparsers is not None and (before := _option_before_command(self, list(
                sys.argv[1:] if args is None else args))):
            self.error(before)
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            commands = self._subparsers._group_actions[0].choices if self._subparsers else {}
            parser = commands.get(getattr(parsed, "command", None), self)
            top = [word for word in extras if parser is not self and word in self._option_string_actions]
            if top:  # `cnnkit runs RUN --debug`: cnnkit's own options go before the command
                parser.error(f"{top[0]} is cnnkit's own option, given before the command: "
                             f"cnnkit {top[0]} {parsed.command} ...")
            if square := _square_input_size(parser):  # `cnnkit train --input-size 3 32 32`: 32 32 left over
                parser.error(square)
            # `cnnkit embed resnet18 --data photos/`: argparse took photos/ as DATA and left --data over
            flags = _positional_flags(parser)
            if all(word.split("=", 1)[0] in flags for word in extras if word.startswith("-")):
                parser.error(_positional_as_option(parser, parser.words) or _unrecognised(parser, extras))
            parser.error(_unrecognised(parser, extras))
        return parsed


def _option_before_command(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """The error for a command's option given before the command, or with none (`cnnkit --epochs 3`, where argparse
    took 3 for the command), with the line that gives it after the command; None where ``words`` has none."""
    commands = parser._subparsers._group_actions[0].choices
    for i, word in enumerate(words):
        if word in commands or not word.startswith("-") or word == "--":
            return None
        flag = word.split("=", 1)[0]
        if flag in parser._option_string_actions:  # cnnkit's own: --debug, --version, --help
            continue
        # the commands with the option in full, else those where it abbreviates one (a prefix none other has)
        owners = [name for name, command in commands.items() if flag in command._option_string_actions] or \
            [name for name, command in commands.items()
             if len({a for o, a in command._option_string_actions.items() if o.startswith(flag)}) == 1]
        later = next((j for j in range(i + 1, len(words)) if words[j] in commands), None)
        if not owners:  # no command's option either
            if later is not None:
                return None  # the command's parser names it, and an option of its own close to it
            options = {o for command in commands.values() for o in command._option_string_actions}
            return f"unrecognized arguments: {' '.join(words[i:])}" + did_you_mean(
                flag.lstrip("-"), sorted(options), cutoff=0.7, key=lambda o: o.lstrip("-"))
        own = [w for w in words[:i] if w.split("=", 1)[0] in parser._option_string_actions]
        named = ", ".join(owners) if len(owners) <= 4 else f"{', '.join(owners[:3])} and {len(owners) - 3} more"
        if later is None:
            command = "train" if "train" in owners else owners[0]
            line = ["cnnkit", *own, command, *words[i:]]
            return (f"{flag} belongs to a command{f' ({named})' if len(owners) > 1 else ''}, and none is given: "
                    f"{' '.join(line)}")
        command = words[later]
        if command not in owners:
            return f"{flag} is an option of {named}, not of cnnkit or of {command}"
        line = ["cnnkit", *own, command, *words[i:later], *words[later + 1:]]
        return f"{flag} is an option of {command}, given before the command: {' '.join(line)}"
    return None


class _Probed(Exception):
    """A usage error met while _given_positionals parses a trial command line."""


def _given_positionals(parser: argparse.ArgumentParser, words: list[str]) -> argparse.Namespace:
    """What ``parser`` takes from ``words`` before any usage error: the positional arguments given by position
    have their values, the others their defaults."""
    namespace, saved = argparse.Namespace(), getattr(parser, "words", [])
    parser.probing = True
    try:
        parser.parse_known_args(words, namespace)  # fills ``namespace`` as it goes, up to an error
    except _Probed:
        pass
    finally:
        parser.probing, parser.words = False, saved
    return namespace


def _positional_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """``parser``'s positional arguments by the option a user may type for them (``--model`` for MODEL_OR_RUN,
    as ``cnnkit train`` takes it), where ``parser`` has no option of that name."""
    flags = {"--" + a.dest.replace("_", "-"): a for a in parser._actions if not a.option_strings}
    return {flag: a for flag, a in flags.items() if flag not in parser._option_string_actions}


def _positional_as_option(parser: argparse.ArgumentParser, words: list[str]) -> str | None:
    """The error for positional arguments that ``words`` gave as options of their names (``_positional_flags``),
    with the command line that gives them by position; None where ``words`` has none."""
    words, given, removed = list(words), {}, set()
    for flag, action in _positional_flags(parser).items():
        i = next((i for i, w in enumerate(words) if i not in removed and w.split("=", 1)[0] == flag), None)
        if i is None:
            continue
        if "=" in words[i]:
            value, taken = words[i].split("=", 1)[1], [i]
        elif i + 1 < len(words) and i + 1 not in removed and not words[i + 1].startswith("-"):
            value, taken = words[i + 1], [i, i + 1]
        else:
            value, taken = action.metavar, [i]
        given[action.dest] = (action, flag, value, taken)
        removed.update(taken)
    if not given:
        return None
    as_options = set(removed)
    rest = [w for i, w in enumerate(words) if i not in removed]
    taken = _given_positionals(parser, rest)
    positionals = [a for a in parser._actions if not a.option_strings]
    by_position = {a.dest: getattr(taken, a.dest, None) for a in positionals}
    by_position = {d: v for d, v in by_position.items() if v not in (None, [])
                   and v != next(a.default for a in positionals if a.dest == d)}
    # The words given by position go, in their order, to the positional arguments not given as options: `cnnkit
    # embed --data photos/ resnet18` took resnet18 for MODEL_OR_RUN, the first, and that is what it is.
    pool = [w for a in positionals if a.dest in by_position
            for w in (by_position[a.dest] if isinstance(by_position[a.dest], list) else [by_position[a.dest]])]
    cursor = 0
    for word in pool:  # out of ``words``: positional words are met in order, and are no option's value
        at = [i for i in range(cursor, len(words)) if i not in removed and words[i] == word]
        at = [i for i in at if not _takes_a_value(parser, words[i - 1] if i else "")] or at
        if at:
            cursor = at[0]
            removed.add(cursor)
    by_position_at = sorted(removed - as_options)
    line, left = [], list(pool)
    for action in positionals:
        if action.dest in given:
            line.append(given[action.dest][2])
        elif action.nargs in ("+", "*"):
            line.extend(left or ([action.metavar or action.dest] if action.nargs == "+" else []))
            left = []
        elif left:
            line.append(left.pop(0))
        elif action.nargs not in ("?", "*"):
            line.append(action.metavar or action.dest)
    # `cnnkit features --model resnet18 cat.jpg`: features and cam take their image as an option, not by position
    image = []
    if len(left) == 1 and "--image" in parser._option_string_actions and \
            not any(w.split("=", 1)[0] == "--image" for w in words):
        image, left = ["--image", left[0]], []
    # Where the words given by position fill every positional argument already, and the option came after them (or
    # its value in their place would leave one over), the option is one too many: `cnnkit eval RUN --checkpoint
    # last` (moving `last` into RUN's place would give `cnnkit eval last RUN`, which does not parse). Given before
    # them, its value is the positional argument it names: `cnnkit predict --checkpoint RUN a.jpg b.jpg`.
    if all(a.dest in by_position or a.nargs in ("?", "*") for a in positionals) and (
            left or (by_position_at and by_position_at[0] < min(as_options))):
        return _option_too_many(parser, words, given, by_position, as_options)
    # First, as the usage shows them: after an option of several values (--input-size 64) they would be its values.
    words = line + image + [w for i, w in enumerate(words) if i not in removed]
    words = _with_required_options(parser, words)
    names = " and ".join(g[0].metavar or g[0].dest for g in given.values())
    flags = " and ".join(g[1] for g in given.values())
    verb = "is" if len(given) == 1 else "are"
    also = ", and the image with --image" if image else ""
    return f"{names} {verb} given by position, without {flags}{also}: {parser.prog} {' '.join(words)}"


def _option_too_many(parser: argparse.ArgumentParser, words: list[str], given: dict, by_position: dict,
                     as_options: set[int]) -> str:
    """The error for an option named after a positional argument that the words given by position fill already:
    what each of those words was taken as, and the command line without the option."""
    positionals = [a for a in parser._actions if not a.option_strings]
    taken_as = []  # `RUN was taken as RUN_DIR_OR_CHECKPOINT and cat.jpg as PATH`
    for a in positionals:
        if (value := by_position.get(a.dest)) is not None:
            taken_as.append(f"{' '.join(value) if isinstance(value, list) else value} "
                            f"{'as' if taken_as else 'was taken as'} {a.metavar or a.dest}")
    action, flag, _, at = next((g for dest, g in given.items() if dest in by_position), next(iter(given.values())))
    name = action.metavar or action.dest
    typed = " ".join(words[i] for i in at)
    rest = _with_required_options(parser, [w for i, w in enumerate(words) if i not in as_options])
    return (f"there is no {flag} option; {' and '.join(taken_as)} (by position), so {typed} is one too many: "
            f"give one {name}, {action.help}: {parser.prog} {' '.join(rest)}")


def _with_required_options(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """``words`` and, at their end, each required option they lack (embed's --out) with its metavar: a suggested
    line says where it goes, so that it is the one that runs."""
    words = list(words)
    for action in parser._actions:
        if action.required and action.option_strings and not any(w.split("=", 1)[0] in action.option_strings
                                                                  for w in words):
            words += [action.option_strings[0], action.metavar or
                      ("{" + ",".join(map(str, action.choices)) + "}" if action.choices else action.dest.upper())]
    return words


def _takes_a_value(parser: argparse.ArgumentParser, word: str) -> bool:
    """Whether ``word`` is an option of ``parser`` whose value is the next word."""
    action = parser._option_string_actions.get(word)
    return action is not None and action.nargs != 0


def _unrecognised(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """The error for ``extras``, the words ``parser`` does not know, with the nearest option to the first unknown
    option where one is close."""
    message = f"unrecognized arguments: {' '.join(extras)}"
    word = next((w for w in extras if w.startswith("-")), None)
    if word is None:
        return message + (_repeat_hint(parser, extras[0]) or _image_hint(parser, extras))
    # Compared without their dashes, which every option shares and which would make unrelated names look close.
    # A stricter cutoff than elsewhere: option names are short and share their hyphenated parts, so at the usual
    # 0.6 --lrate would get --layer, --out-dir --data-dir and --threads --threshold.
    options = [o for a in parser._actions for o in a.option_strings]
    return message + did_you_mean(word.split("=", 1)[0].lstrip("-"), options, cutoff=0.7, key=lambda o: o.lstrip("-"))


def _repeat_hint(parser: argparse.ArgumentParser, extra: str) -> str:
    """Where ``extra`` came right after the value of a repeatable option (`features --layer a b`), the hint that
    the option takes one value at a time; else ""."""
    words = getattr(parser, "words", [])
    for i in range(len(words) - 2):
        action = parser._option_string_actions.get(words[i])
        if isinstance(action, argparse._AppendAction) and words[i + 2] == extra:
            return (f"; {words[i]} takes one {action.metavar or 'value'} at a time, so repeat it: "
                    f"{words[i]} {words[i + 1]} {words[i]} {extra}")
    return ""


def _image_hint(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """Where ``extras`` is one word and ``parser`` takes the image as an option (features, cam: `cnnkit features
    resnet18 cat.jpg`), the hint that gives it with --image; else ""."""
    words = getattr(parser, "words", [])
    if len(extras) != 1 or "--image" not in parser._option_string_actions or extras[0] not in words or \
            any(w.split("=", 1)[0] == "--image" for w in words):
        return ""
    at = len(words) - 1 - words[::-1].index(extras[0])
    return f"; the image goes after --image: {parser.prog} {' '.join(words[:at] + ['--image'] + words[at:])}"


def _missing_image_hint(parser: argparse.ArgumentParser) -> str:
    """Where --image is missing and one word was left over (`cnnkit cam resnet18 cat.jpg --out c.png`: argparse
    says only that --image is required), ``_image_hint`` for that word; else ""."""
    saved = getattr(parser, "words", [])
    parser.probing = True
    try:
        _, extras = parser.parse_known_args(saved + ["--image", "-"])
    except _Probed:
        return ""
    finally:
        parser.probing, parser.words = False, saved
    return _image_hint(parser, extras)


def _square_input_size(parser: argparse.ArgumentParser) -> str | None:
    """The error for ``--input-size C H W`` (or ``H W``), the inspection commands' form, given to a command whose
    --input-size is one number (train, lr-find, check-data, embed, probe: the side of square images, read at that
    size): argparse took the first number and left the others over."""
    action = parser._option_string_actions.get("--input-size")
    words = getattr(parser, "words", [])
    if action is None or action.nargs is not None or "--input-size" not in words:
        return None
    numbers = []
    for word in words[words.index("--input-size") + 1:]:
        if not word.isdigit():
            break
        numbers.append(word)
    if len(numbers) < 2:
        return None
    channels = " (and --channels 1 or 3 for the channels)" if "--channels" in parser._option_string_actions else ""
    return (f"--input-size takes one number in {parser.prog}, the side of the square images in pixels, as in "
            f"--input-size {numbers[-1]}{channels}; got {len(numbers)} numbers (C H W is the form of the inspection "
            "commands: summary, rf, features, filters, cam)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {value}")
    return value


def _finite_float(text: str, zero_ok: bool) -> float:
    """``text`` as a finite number above 0 (or 0 too, with ``zero_ok``): the comparisons also refuse nan and inf,
    which would pass a plain range check and fail only later, mid-run."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not (0 <= value if zero_ok else 0 < value) or not value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}" if zero_ok
                                         else f"must be a positive finite number, got {text}")
    return value


def _positive_float(text: str) -> float:
    return _finite_float(text, zero_ok=False)


def _nonnegative_float(text: str) -> float:
    return _finite_float(text, zero_ok=True)


def _learning_rate(text: str) -> float | str:
    """A positive number, or 'auto' (the range test's suggestion)."""
    return "auto" if text == "auto" else _positive_float(text)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def _without_option(argv: list[str], name: str) -> list[str]:
    """``argv`` less ``name VALUE`` / ``name=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


# A number as Python writes it but JSON does not: .5, 5., -.5, 1.e-3 (JSON wants 0.5); not nan or inf.
_PY_NUMBER = re.compile(r"[+-]?(\d+\.\d*|\.\d+)([eE][+-]?\d+)?")

# The options that the inspection commands pass to the model's factory themselves, and the flag that sets each.
_BUILD_FLAGS = {"num_classes": "--num-classes", "input_size": "--input-size", "in_channels": "--input-size C H W"}


def _model_options(pairs: list[str], set_by: dict[str, str] | None = None) -> dict:
    """``--model-opt key=value``: values parsed as JSON where they are JSON (numbers, lists, true), or as a Python
    number (.5), else text. ``set_by`` maps the options the command sets itself to the flag that sets them: the
    factory would get them twice."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--model-opt wants key=value, got '{pair}'")
        if key in (set_by or {}):
            raise UserError(f"--model-opt {key}: this option is set by {set_by[key]}; use that instead")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = float(value) if _PY_NUMBER.fullmatch(value.strip()) else value
        if isinstance(options[key], list):
            options[key] = tuple(options[key])
    return options


class _Version(argparse.Action):
    """``--version``: cnnkit's, and torch's and torchvision's from their package metadata (importing torch to ask
    would take seconds; a predict-only install has none)."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs) -> None:
        super().__init__(option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # type: ignore[override]
        import platform
        from importlib import metadata

        from cnnkit import __version__

        def installed(package: str) -> str:
            try:
                return metadata.version(package)
            except metadata.PackageNotFoundError:
                return "not installed"

        print(f"cnnkit {__version__} (torch {installed('torch')}, torchvision {installed('torchvision')}, "
              f"Python {platform.python_version()})")
        parser.exit()


HEAD_FROM_HELP = ("a ResNet's stages whose pooled outputs are the features, side by side, e.g. layer2,layer3,layer4 "
                  "(default: the last stage's, the input of the classifier); as --model-opt head_from= in train")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command. Its defaults are TrainConfig's; recipe and config-file values join the flags
    given in cnnkit/train/options.py's one merge (``main`` passes on only the flags given)."""
    parser = _Parser(prog="cnnkit", description="Train, evaluate and use convolutional neural networks.",
                     epilog=OVERVIEW, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=_Version, help="show the versions of cnnkit, torch, torchvision and "
                        "Python, and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _train_options(_command(sub, "train", "train a model"))
    _lr_find_options(_command(sub, "lr-find", "learning-rate range test: loss against a growing learning rate"))
    _eval_options(_command(sub, "eval", "evaluate a run or checkpoint"))
    _predict_options(_command(sub, "predict", "classify images"))
    _embed_options(_command(sub, "embed", "penultimate-layer features of a folder of images"))
    _probe_options(_command(sub, "probe", "linear probe: how good a backbone's features are for a dataset"))
    _export_options(_command(sub, "export", "export a model for deployment: ONNX, TorchScript or safetensors"))
    _models_options(_command(sub, "models", "list the model names"))
    _shape_options(_command(sub, "shape", "convolution arithmetic: the output size of a conv or pooling layer"))
    _summary_options(_command(sub, "summary", "layers, output shapes, parameters, MACs and receptive fields"))
    _rf_options(_command(sub, "rf", "receptive field, jump and start of every layer"))
    _features_options(_command(sub, "features", "feature maps of chosen layers for one image, one PNG per layer"))
    _filters_options(_command(sub, "filters", "a convolution's kernels as a picture"))
    _cam_options(_command(sub, "cam", "class activation map (Grad-CAM, Grad-CAM++, Score-CAM) over an image"))
    _report_options(_command(sub, "report", "one self-contained HTML page about a run: curves, errors, CAMs, model"))
    _runs_options(_command(sub, "runs", "list runs: model, data, epochs, best accuracy, date"))
    _check_data_options(_command(sub, "check-data", "class counts, train/val duplicates, the data against a model"))
    _audit_options(_command(sub, "audit", "which modules train, and which BatchNorm layers update their statistics"))
    return parser


def _command(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse.ArgumentParser:
    """The parser of command ``name``: ``summary`` is its line in `cnnkit --help`, EXAMPLES[name] ends its own."""
    return sub.add_parser(name, help=summary, epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)


# Option groups that several commands share.

def _data_options(p: argparse.ArgumentParser, default_data: str | None) -> None:
    p.add_argument("--data", default=default_data,
                   help=f"{', '.join(BUILTIN)}, or a folder with one sub-folder of images per class"
                        + (f" (default: {default_data})" if default_data else ""))
    p.add_argument("--data-dir", help="where torchvision datasets are (default: $CNNKIT_DATA or ~/.cache/cnnkit/datasets)")
    p.add_argument("--val-data", metavar="DIR", help="a separate validation folder, its sub-folders named after "
                                                     "the training classes (all or some of them); not with --val-split")
    p.add_argument("--val-split", type=_fraction, metavar="F",
                   help="hold out this fraction of each class of --data for validation (default for folders: 0.1); "
                        "not with --val-data")


def _threads_option(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="CPU threads to compute with (default: the physical cores this process may use, less one "
                        "per image-loading process; OMP_NUM_THREADS where set)")


def _tta_options(p: argparse.ArgumentParser) -> None:
    """eval and predict: which weights of a run, and test-time augmentation."""
    p.add_argument("--ema", action="store_true", help="a run folder's weight EMA (best_ema.pt) instead of best.pt")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average the probabilities of each image and its mirror image")
    p.add_argument("--tta-shift", type=int, default=0, metavar="PIXELS",
                   help="test-time augmentation: also average over the image shifted by PIXELS up, down, left, right")


def _model_or_run_options(p: argparse.ArgumentParser) -> None:
    """The inspection commands: the model to look at and its input size."""
    p.add_argument("model", metavar="MODEL_OR_RUN", help="a model name, a run folder or a checkpoint file")
    p.add_argument("--input-size", type=_positive_int, nargs="+", metavar="N",
                   help="C H W, or one size for a square (default: the checkpoint's, or the model's usual)")


def _build_options(p: argparse.ArgumentParser) -> None:
    """The inspection commands (summary, rf, features, filters, cam): how to build a model given by name."""
    p.add_argument("--num-classes", type=_positive_int,
                   help="head size for a model name (default: 1000 for torchvision models, else 10)")
    _model_opt_option(p, "widths=[16,32]")


def _model_opt_option(p: argparse.ArgumentParser, example: str) -> None:
    """--model-opt, as train, the inspection commands and audit take it (parsed by ``_model_options``)."""
    p.add_argument("--model-opt", action="append", default=[], metavar="KEY=VALUE",
                   help=f"an option of a model name's factory, e.g. --model-opt {example} (repeatable)")


# The training options, in groups: train takes them all, lr-find those that shape the data, model and optimizer.
# ``d`` holds TrainConfig's defaults.

def _model_and_data_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    p.add_argument("--model", default=d.model, help=f"a name from `cnnkit models` (default: {d.model})")
    _model_opt_option(p, "head=flatten")
    _data_options(p, d.data)


def _start_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The weights training starts from, and which modules train."""
    p.add_argument("--pretrained", action="store_true",
                   help="start from torchvision's default weights (downloaded, or from $TORCH_HOME's cache)")
    p.add_argument("--weights", metavar="PATH", help="start from a state dict, .safetensors file or cnnkit run")
    p.add_argument("--freeze", choices=("backbone",), help="train only the classifier head")
    p.add_argument("--unfreeze", metavar="NAMES", help="train only these modules, e.g. layer4,fc")


def _input_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """The images as the model sees them, and how many at a time."""
    p.add_argument("--download", action="store_true", help="download torchvision datasets (needs internet)")
    p.add_argument("--input-size", type=_positive_int, metavar="PIXELS", help="square input size (default: the data's)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="image channels (default: the data's)")
    p.add_argument("--num-samples", type=_positive_int, metavar="N",
                   help=f"use N training images (for shapes: generate N; default {SHAPES_TRAIN})")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                   help=f"(default: {GENERAL_DEFAULTS['batch_size']}; {DATA_DEFAULTS['shapes']['batch_size']} for shapes)")


def _optimizer_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                   help="sgd (with --momentum), adamw, or muon for the filters (the fast recipe's) "
                        "(default: %(default)s)")
    p.add_argument("--momentum", type=_nonnegative_float, default=d.momentum,
                   help="sgd's momentum (default: %(default)s)")
    p.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=d.nesterov,
                   help="sgd: Nesterov momentum (default: on)")
    p.add_argument("--weight-decay", type=_nonnegative_float, default=d.weight_decay,
                   help="weight decay of conv and linear weights; biases and BatchNorm are not decayed "
                        "(default: %(default)s)")
    p.add_argument("--label-smoothing", type=_nonnegative_float, default=d.label_smoothing, metavar="EPS",
                   help="the target puts EPS of its weight evenly on all classes, below 1 (default: %(default)s)")


def _pipeline_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """How each training batch is made and computed."""
    p.add_argument("--crop-pad", type=int, metavar="PIXELS", help="random translation by up to this many pixels (default: size/8; 0 for shapes, which sit anywhere already)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on, off for mnist)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seeds the initial weights, shuffling and augmentation; the validation split stays fixed "
                        "(default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="auto: bf16 on CPUs with bf16 matrix instructions and on recent GPUs, else fp32/fp16")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last,
                   help="keep images and activations in channels-last memory order, which the convolution kernels "
                        "run faster on (default: on)")
    p.add_argument("--decode", choices=DECODE_CHOICES, default=d.decode,
                   help="sets too large for memory: decode in CPU workers, or each batch of JPEGs on the device with "
                        "random resized crops for training (auto: device on CUDA when every file is a JPEG)")
    p.add_argument("--bad-images", choices=("skip", "error"), default=d.bad_images,
                   help="broken images in a folder: leave them out and list them, or stop at the first")


def _class_balance_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--class-weights", choices=("auto",),
                   help="auto: loss weights inversely proportional to class frequency, n / (k * count)")
    p.add_argument("--balanced-sampler", action="store_true",
                   help="draw training batches with every class equally likely (with replacement)")


def _check_data_option(p: argparse.ArgumentParser | argparse._ArgumentGroup, d: TrainConfig) -> None:
    p.add_argument("--check-data", action=argparse.BooleanOptionalAction, default=d.check_data,
                   help="check class balance, train/val duplicates and the data against the model before "
                        "training; warnings only (default: on)")


def _speed_options(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    p.add_argument("--recipe", choices=tuple(RECIPES),
                   help="a tuned set of options; 'fast': fastnet, Muon, 8 epochs, test-time augmentation, for "
                        "32x32 images such as CIFAR-10 (options you pass explicitly win)")
    _threads_option(p)


def _augment_options(p: argparse.ArgumentParser | argparse._ArgumentGroup, d: TrainConfig) -> None:
    p.add_argument("--augment-policy", choices=AUGMENT_POLICIES, default=d.augment_policy,
                   help="torchvision's RandAugment or TrivialAugmentWide on every training image (per image, in "
                        "Python: worth it for larger images and longer runs)")
    p.add_argument("--random-erasing", type=_nonnegative_float, default=d.random_erasing, metavar="P",
                   help="erase a random rectangle of each training image with probability P (torchvision's)")
    p.add_argument("--cutout", type=int, default=d.cutout, metavar="PIXELS",
                   help="zero one random square of this side in every training image")
    p.add_argument("--alternate-flip", action=argparse.BooleanOptionalAction, default=d.alternate_flip,
                   help="flip each image every other epoch instead of at random")


def _output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar and no per-epoch lines: the warnings and the result only")


# The options of train alone.

def _schedule_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """How long the run is, and its learning rate over time."""
    p.add_argument("--epochs", type=_positive_int, default=d.epochs,
                   help=f"(default: {GENERAL_DEFAULTS['epochs']}; {DATA_DEFAULTS['shapes']['epochs']} for shapes)")
    p.add_argument("--lr", type=_learning_rate, help="peak learning rate, or auto: the suggestion of `cnnkit lr-find` "
                   "(default: 0.05 for sgd, 0.002 for adamw, 0.24 for muon)")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning rate over the run: onecycle (warm-up, then cosine to 0), cosine, linear (to 0), "
                        "step (x0.1 at 50%% and 75%%), constant (default: %(default)s)")
    p.add_argument("--warmup-epochs", type=_nonnegative_float, default=d.warmup_epochs,
                   help="linear warm-up length (onecycle: 30%% of the run when 0)")


def _run_folder_options(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    """Where the run goes, how often it saves, and how many processes train it."""
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/<timestamp>-<model>)")
    p.add_argument("--save-every", type=int, default=d.save_every, metavar="STEPS",
                   help="also write last.pt every STEPS steps (default: once per epoch)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue an interrupted run exactly where it stopped (its own settings are used)")
    p.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                   help="train with N processes on this machine (DistributedDataParallel through torchrun; "
                        "for several machines run torchrun yourself: see cnnkit/train/distributed.py)")


def _regularisation_options(p: argparse._ArgumentGroup, d: TrainConfig) -> None:
    p.add_argument("--mixup", type=_nonnegative_float, default=d.mixup, metavar="ALPHA",
                   help="mixup: blend image pairs, lam ~ Beta(ALPHA, ALPHA), e.g. 0.2 (default: off)")
    p.add_argument("--cutmix", type=_nonnegative_float, default=d.cutmix, metavar="ALPHA",
                   help="CutMix: paste a box of another image, e.g. 1.0 (with --mixup: one or the other per batch)")
    p.add_argument("--mix-off-epochs", type=int, default=d.mix_off_epochs, metavar="N",
                   help="no mixup/CutMix in the last N epochs")
    p.add_argument("--ema", type=float, metavar="DECAY",
                   help="keep an exponential moving average of the weights, e.g. 0.999; evaluated every epoch "
                        "(ema_val_acc) and saved as best_ema.pt / last_ema.pt")
    p.add_argument("--accum-steps", type=_positive_int, default=d.accum_steps, metavar="N",
                   help="gradient accumulation: one optimizer step every N batches (an N times larger batch)")
    p.add_argument("--early-stop", type=_positive_int, metavar="PATIENCE",
                   help="stop after PATIENCE epochs without improvement of --monitor")
    p.add_argument("--monitor", choices=("val_acc", "val_loss"), default=d.monitor,
                   help="what picks best.pt and --keep-best and drives --early-stop (default: val_acc)")
    p.add_argument("--min-delta", type=_nonnegative_float, default=d.min_delta, metavar="DELTA",
                   help="--early-stop: the least change of --monitor that counts as an improvement (default: 0)")
    p.add_argument("--keep-best", type=int, default=d.keep_best, metavar="N",
                   help="also keep the N best epochs as best-epochNNN.pt")
    p.add_argument("--overfit-batches", type=_positive_int, default=d.overfit_batches, metavar="N",
                   help="sanity check: train and validate on the same N batches, without augmentation; stops "
                        "once every image is right")
    p.add_argument("--smoke", action="store_true",
                   help="a quick sanity run of this command line: at most 2 epochs (with --stages, one per stage) "
                        "of 5 batches, small validation")


def _show_options(p: argparse._ArgumentGroup) -> None:
    p.add_argument("--plots", action="store_true",
                   help="at the end, write plots/ in the run folder: curves, learning rate, confusion matrix, top losses")
    p.add_argument("--report", action="store_true",
                   help="at the end, write report.html in the run folder (and the plots); see `cnnkit report`")
    p.add_argument("--tensorboard", action="store_true",
                   help="write TensorBoard events to RUN/tensorboard (needs pip install 'cnnkit[tensorboard]')")


# One function per command.

def _train_options(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    _model_and_data_options(p, d)
    tl = p.add_argument_group("transfer learning")
    _start_options(tl)
    tl.add_argument("--lr-backbone", type=_positive_float, metavar="LR",
                    help="learning rate for everything but the head (discriminative learning rates)")
    tl.add_argument("--stages", metavar="PLAN",
                    help="staged fine-tuning, e.g. 'fc:3@1e-3,layer4+fc:5@1e-4' (modules:epochs@lr; overrides --epochs/--lr)")
    _input_options(p, d)
    _schedule_options(p, d)
    _optimizer_options(p, d)
    _pipeline_options(p, d)
    p.add_argument("--clip-grad", type=_positive_float, metavar="NORM",
                   help="clip the gradient norm (the norm before clipping goes to metrics.csv)")
    p.add_argument("--nan", choices=("stop", "skip"), default=d.nan,
                   help="a NaN/inf loss stops the run (keeping the last good checkpoint) or skips the batch")
    cb = p.add_argument_group("class balance and data checks")
    _class_balance_options(cb)
    _check_data_option(cb, d)
    _run_folder_options(p, d)
    sp = p.add_argument_group("speed")
    _speed_options(sp)
    sp.add_argument("--compile", nargs="?", const=True, default=False, choices=COMPILE_MODES, metavar="MODE",
                    help="torch.compile the model, in torch's MODE if given (" + ", ".join(COMPILE_MODES) + "; "
                    "reduce-overhead: CUDA graphs, for small steps on a GPU). Compiling takes time first: measure "
                    "before relying on it (benchmarks/train_speed.py, benchmarks/gpu_speed.py)")
    _augment_options(sp, d)
    sp.add_argument("--tta", action="store_true",
                    help="also report the final validation accuracy with test-time augmentation")
    p.add_argument("--sync-bn", action="store_true",
                   help="with several processes on CUDA: BatchNorm statistics over the whole global batch")
    p.add_argument("--config", metavar="FILE",
                   help="a YAML or JSON file of training options (keys: TrainConfig's fields, e.g. batch_size); "
                        "flags given on the command line override it; a run folder's config.json replays that run")
    _regularisation_options(p.add_argument_group("regularisation and run control"), d)
    _output_options(p)
    _show_options(p.add_argument_group("showing the run"))


def _lr_find_options(p: argparse.ArgumentParser) -> None:
    """The training options that shape the data, model and optimizer, then the range test's own."""
    d = TrainConfig()
    _model_and_data_options(p, d)
    _start_options(p)
    _input_options(p, d)
    _optimizer_options(p, d)
    _pipeline_options(p, d)
    _class_balance_options(p)
    _check_data_option(p, d)
    _speed_options(p)
    _augment_options(p, d)
    _output_options(p)
    p.add_argument("--start-lr", type=_positive_float, default=1e-6, metavar="LR", help="(default: 1e-6)")
    p.add_argument("--end-lr", type=_positive_float, default=10.0, metavar="LR", help="(default: 10)")
    p.add_argument("--steps", type=_positive_int,
                   help="steps of the test; it stops earlier when the loss blows up (default: 200, but at most 4 "
                        "passes over the training images and at least 50 steps)")
    p.add_argument("--out", metavar="DIR", help="the folder for lr_find.png and lr_find.json, made if missing "
                                                "(default: a new runs/<timestamp>-lr_find)")


def _eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", help="a run folder (its best.pt) or a checkpoint "
                                                                       "file (.pt, .safetensors)")
    # Not _data_options: what eval scores differs from what training holds out (a folder is scored whole).
    p.add_argument("--data", help=f"a folder with one sub-folder of images per class, scored whole unless "
                                  f"--val-split or --val-data is given; or {', '.join(BUILTIN)} (its validation "
                                  "or test split) (default: the run's own validation images)")
    p.add_argument("--data-dir", help="where torchvision datasets are (default: $CNNKIT_DATA or ~/.cache/cnnkit/datasets)")
    p.add_argument("--val-data", metavar="DIR", help="score this folder, all of it (sub-folders named after the run's "
                                                     "classes, all or some of them)")
    p.add_argument("--val-split", type=_fraction, metavar="F",
                   help="score only the part training holds out with this fraction of each class of --data "
                        "(default: all of --data); without --data, of the run's training data, at most the "
                        "fraction the run held out")
    p.add_argument("--batch-size", type=_positive_int, help="images per forward pass (default: the run's evaluation "
                                                           "batch size)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    _threads_option(p)
    _tta_options(p)
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _predict_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT", help="a run folder, a .pt, .safetensors or .onnx file")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--topk", type=_positive_int, default=5, metavar="K",
                   help="show the K most likely classes of each image (default: %(default)s)")
    _threads_option(p)
    _tta_options(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (an .onnx file runs on the CPU)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON list on the last line, an "
                                                       "object per image")


def _features_of_data_options(p: argparse.ArgumentParser) -> None:
    """What embed and probe share: a backbone (a model name or a run), the data it reads, and where it runs."""
    p.add_argument("model", metavar="MODEL_OR_RUN",
                   help="the backbone: a model name, a run folder or a checkpoint file")
    p.add_argument("data", metavar="DATA", help=f"a folder with one sub-folder per class, or {', '.join(BUILTIN)}")
    p.add_argument("--pretrained", action="store_true",
                   help="a model name with torchvision's pretrained weights (downloaded, needs internet)")
    p.add_argument("--input-size", type=_positive_int, metavar="PIXELS",
                   help="square size to read the images at (default: a run's own; for a model name, the data's, "
                        "which the model is built for)")
    p.add_argument("--head-from", metavar="STAGES", help=HEAD_FROM_HELP)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def _embed_options(p: argparse.ArgumentParser) -> None:
    _features_of_data_options(p)
    p.add_argument("--out", required=True, metavar="FILE.npy",
                   help="the features, one row per image; beside it FILE.labels.npy (class indices) and "
                        "FILE.paths.csv (each row's image file, label and class)")


def _probe_options(p: argparse.ArgumentParser) -> None:
    _features_of_data_options(p)
    p.add_argument("--val-split", type=_fraction, metavar="F",
                   help="hold out this fraction of each class of DATA to measure the probe (default for folders: "
                        "0.1; a warning says when that part includes images a run's backbone trained on)")
    p.add_argument("--val-data", metavar="DIR", help="measure the probe on this folder instead (sub-folders named "
                                                     "after DATA's classes, all or some of them)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _export_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="RUN_DIR_OR_CHECKPOINT",
                   help="a run folder (its best.pt) or a checkpoint file")
    p.add_argument("--format", required=True, choices=FORMATS, help="the file format to write")
    p.add_argument("--out", required=True, metavar="PATH",
                   help=f"the file to write, ending in {', '.join(e for ends in FORMATS.values() for e in ends)}")
    p.add_argument("--verify", action="store_true",
                   help="run the export on random inputs at batch sizes 1 and 7 and report its largest difference "
                        "from PyTorch (fails above 1e-4)")
    p.add_argument("--verify-images", nargs="+", metavar="PATH",
                   help="also compare on these image files or folders (the first 64 images that decode: a broken one "
                        "in a folder is passed over with a warning; implies --verify)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _models_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("pattern", nargs="?", help="a filter such as 'resnet*'")


def _shape_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=int, required=True, help="input size along one axis (pixels or units)")
    p.add_argument("--kernel", type=int, required=True, help="kernel (window) size along that axis")
    p.add_argument("--stride", type=int, help="step between windows (default: 1 for a convolution, the kernel size "
                                              "for pooling, as PyTorch's layers)")
    p.add_argument("--padding", type=int, default=0, help="zeros added on each side (default: 0)")
    p.add_argument("--dilation", type=int, default=1, help="spacing between kernel taps (default: 1)")
    p.add_argument("--pool", choices=("max", "avg"), help="a pooling layer instead of a convolution")
    p.add_argument("--ceil-mode", action="store_true", help="pooling: round up instead of down")
    p.add_argument("--json", action="store_true", help="the result as JSON")


def _summary_options(p: argparse.ArgumentParser) -> None:
    _model_or_run_options(p)
    _build_options(p)
    p.add_argument("--depth", type=_positive_int, help="show layers down to this nesting depth")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _rf_options(p: argparse.ArgumentParser) -> None:
    _model_or_run_options(p)
    _build_options(p)
    p.add_argument("--depth", type=_positive_int, help="show layers down to this nesting depth")
    p.add_argument("--verify", action="store_true",
                   help="measure the fields as input-gradient footprints and compare with the analytic values")
    p.add_argument("--verify-layer", action="append", default=[], metavar="NAME",
                   help="measure these layers (repeatable; implies --verify; default: one per distinct field, "
                        "up to the final layer)")
    p.add_argument("--effective", metavar="PNG",
                   help="draw the effective receptive field of a (trained) model: mean gradient magnitude")
    p.add_argument("--layer", metavar="NAME", help="--effective: the layer (default: the final feature layer)")
    p.add_argument("--images-from", nargs="+", metavar="PATH",
                   help="--effective: average over these image files or folders (your own images, as predict "
                        "prepares them; a broken one in a folder is passed over with a warning) instead of "
                        "generated shapes images")
    p.add_argument("--images", type=_positive_int, metavar="N",
                   help="--effective: how many images to average over: generated shapes images, or N spread evenly "
                        "over the files of --images-from (default: 16)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _features_options(p: argparse.ArgumentParser) -> None:
    _model_or_run_options(p)
    _build_options(p)
    p.add_argument("--layer", action="append", default=[], metavar="NAME", help="a layer name (repeatable)")
    p.add_argument("--image", metavar="IMG", help="the image to run through the model (required unless --list-layers)")
    p.add_argument("--out", metavar="DIR", help="folder for the PNG files (created if missing)")
    p.add_argument("--max-channels", type=_positive_int, default=64, metavar="N",
                   help="draw at most the first N channels of each layer, one tile each (default: 64)")
    p.add_argument("--list-layers", action="store_true", help="list the layer names, types and output shapes")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _filters_options(p: argparse.ArgumentParser) -> None:
    _model_or_run_options(p)
    _build_options(p)
    p.add_argument("--layer", metavar="NAME", help="a Conv2d layer, or a filter bank the model holds itself, such as "
                   "fastnet's whiten_weight (default: the first convolution the forward pass runs)")
    p.add_argument("--out", metavar="PNG", required=True, help="the picture to write")
    p.add_argument("--mode", choices=("auto", "rgb", "channels", "mean"), default="auto",
                   help="rgb: colour patches (3-channel kernels); channels: one patch per input channel; "
                        "mean: averaged over input channels (default auto: rgb where possible, else mean)")
    p.add_argument("--max-filters", type=_positive_int, default=64, metavar="N",
                   help="draw at most the first N filters (default: 64)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _cam_options(p: argparse.ArgumentParser) -> None:
    _model_or_run_options(p)
    _build_options(p)
    p.add_argument("--image", metavar="IMG", required=True, help="the image to explain")
    p.add_argument("--class", dest="target_class", metavar="K", help="class index or name (default: the predicted)")
    p.add_argument("--layer", metavar="NAME", help="a layer with a C x H x W output (default: the last layer before "
                   "the resolution changes after the last Conv2d, e.g. its ReLU)")
    p.add_argument("--method", choices=("gradcam", "gradcam++", "scorecam", "all"), default="gradcam",
                   help="default: gradcam; scorecam runs one forward pass per channel of the layer (2,048 for "
                   "resnet50's layer4: minutes on a CPU)")
    p.add_argument("--out", metavar="PNG", required=True,
                   help="the picture to write: the image beside each method's map over it")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run folder (default: the newest under ./runs)")
    p.add_argument("--out", metavar="HTML", help="where to write it (default: RUN_DIR/report.html)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda: where the report's predictions are computed")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _runs_options(p: argparse.ArgumentParser) -> None:
    # None: the default folder, whose absence only means no run has started here yet (a DIR given must exist)
    p.add_argument("root", nargs="?", default=None, metavar="DIR", help="the folder holding the runs (default: runs)")
    p.add_argument("--json", action="store_true", help="print the runs as one JSON list on the last line, an "
                                                       "object per run")


def _check_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help=f"a folder with one sub-folder per class, or {', '.join(BUILTIN)}")
    p.add_argument("--data-dir", help="where torchvision datasets are (default: $CNNKIT_DATA or ~/.cache/cnnkit/datasets)")
    p.add_argument("--val-data", metavar="DIR", help="a separate validation folder, its sub-folders named after "
                                                     "DATA's classes (all or some of them); not with --val-split")
    p.add_argument("--val-split", type=_fraction, metavar="F",
                   help="the validation fraction training would hold out (default for folders: 0.1); not with "
                        "--val-data")
    p.add_argument("--input-size", type=_positive_int, metavar="PIXELS", help="square size to decode at (default: the data's)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="image channels (default: the data's)")
    p.add_argument("--model", metavar="MODEL_OR_RUN", help="check channels, sizes and normalisation against this "
                                                           "model name, run folder or checkpoint")
    p.add_argument("--pretrained", action="store_true", help="against torchvision's pretrained weights for --model")
    p.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, metavar="BITS",
                   help=f"near-duplicates: perceptual hashes differing in at most BITS of 64 (default: {DEFAULT_THRESHOLD})")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def _audit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL_OR_RUN", help="a model name, a run folder or a checkpoint file")
    p.add_argument("--freeze", choices=("backbone",), help="audit training with only the head trainable")
    p.add_argument("--unfreeze", metavar="NAMES", help="audit training with only these modules trainable")
    p.add_argument("--stages", metavar="PLAN", help="audit each stage of a staged plan (as cnnkit train --stages)")
    p.add_argument("--plain-train", action="store_true",
                   help="show what a bare model.train() does (no frozen BatchNorm kept in eval), as hand-written loops do")
    _model_opt_option(p, "head_from=layer3,layer4")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object on the last line")


def cmd_train(args: argparse.Namespace) -> int:
    from cnnkit.errors import NonFiniteLoss, TrainingStopped
    from cnnkit.training import train

    if args.config and args.resume:
        raise UserError("--resume continues a run with its own settings; drop --config")
    given = _given_train_options(args)
    if args.resume:  # a folder that is no run is the error to see first, before the flags beside it
        from cnnkit.train.loop import refuse_not_a_run

        refuse_not_a_run(args.resume)
    ignored = sorted(set(given) - set(SESSION_OPTIONS)) if args.resume else []
    if ignored:  # a resumed run takes its settings from its checkpoint, but for this session's SESSION_OPTIONS
        flags = ", ".join("--model-opt" if n == "model_options" else "--" + n.replace("_", "-") for n in ignored)
        # The way on keeps what the run learned: a new run from its settings alone would start from scratch
        # (or from the pretrained weights), not what `--epochs 30` beside --resume asks for.
        raise UserError(f"--resume continues a run with its own settings; drop {flags} (to change them, start a new "
                        f"run from its settings and weights: cnnkit train --config "
                        f"{os.path.join(args.resume, 'config.json')} --weights {os.path.join(args.resume, 'last.pt')} "
                        "[changed flags] --out NEW_DIR)")
    if args.nproc > 1:
        from cnnkit.train import distributed
        from cnnkit.train.config import is_pipe

        if args.config and is_pipe(args.config):  # each process reads it: the first would take all, the rest wait
            raise UserError(f"--config {args.config} is a pipe, which only one of the {args.nproc} processes of "
                            "--nproc could read; save the options to a .yaml file and pass that")
        if not args.resume:  # once here, rather than from every process, each line under torchrun's report
            _check_before_launch(args.config, given)
        return distributed.launch(args.nproc, _without_option(args.argv, "--nproc"))
    log = _WarningsOnly() if args.quiet else sys.stderr if args.json else sys.stdout
    ended = None
    try:
        result = train(args.config, log=log, resume=args.resume, **given)
    except (NonFiniteLoss, TrainingStopped) as e:
        # a diverged run wrote its result.json (unless it had no run folder yet), and so did one stopped after its
        # training (in the final measurements, or while the plots were drawn): --json prints it as for any run,
        # then the error still goes to stderr
        result, ended = e.result, e
    reports = _reports()  # under torchrun, rank 0 alone
    if args.json and reports and result is not None:
        print(strict_json.dumps(dataclasses.asdict(result)))
    if ended is not None:
        raise ended
    if not reports:
        return 0
    if not args.json:
        tta = f", with test-time augmentation {result.tta_val_acc:.4f}" if result.tta_val_acc is not None else ""
        # The best epoch is the monitored metric's: name it, so that a lower accuracy there does not read as a mistake
        best = (f"best {result.best_val_acc:.4f} at epoch {result.best_epoch}" if result.monitor == "val_acc" else
                f"best {result.monitor} {result.best_score:.4g} at epoch {result.best_epoch}, val acc "
                f"{result.best_val_acc:.4f} there")
        from cnnkit.runs import run_info

        info = run_info(result.run_dir)  # a resumed smoke run is one too: its config.json says so
        smoke = " (a smoke run: it checks that the command line runs; its accuracy is no score)" if (
            info is not None and info.smoke) else ""
        print(f"done: val acc {result.val_acc:.4f} ({best}){tta}, "
              f"{result.images_per_s:,.0f} images/s, {result.train_time_s:.1f} s training"
              f"{' over its sessions' if args.resume else ''}, {result.wall_time_s:.1f} s in all"
              f"{' this time' if args.resume else ''}{smoke}; run folder {result.run_dir}")
        if not (args.quiet or os.path.exists(os.path.join(result.run_dir, "report.html"))):
            print(f"see it: cnnkit report {result.run_dir}")
    return 0


class _WarningsOnly:
    """--quiet's log: of what a run writes there, its warnings still reach stderr (a data problem is worth a line
    however quiet the run), and nothing else does. As the run writes them, not from TrainResult.warnings at its
    end: a warning before minutes of training is worth seeing then, and a run stopped or failed returns none."""

    def __init__(self) -> None:
        self.pending = ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.startswith(WARNING):
                _error_line(line)
        return len(text)

    def flush(self) -> None:
        pass


def _check_before_launch(config: str | None, given: dict) -> None:
    """The options, the device and the data paths of a run about to start in several processes: a UserError for
    what each process would refuse."""
    from cnnkit.choices import BUILTIN
    from cnnkit.data.sources import scan_folder
    from cnnkit.train.options import make_config
    from cnnkit.train.precision import resolve_device

    cfg = make_config(config, given)
    resolve_device(cfg.device)
    if cfg.data not in BUILTIN:
        scan_folder(cfg.data)
    if cfg.val_data is not None:
        scan_folder(cfg.val_data, "--val-data", scored=True)


class _NotGiven:
    """The default of every training option while ``_given_train_options`` parses: what still holds it was not
    given on the command line."""

    def __repr__(self) -> str:
        return "<not given>"


def _given_train_options(args: argparse.Namespace) -> dict:
    """The TrainConfig fields that the command line of ``train`` or ``lr-find`` (``args.argv``) gives. The rest are
    left to the one merge of options, where defaults < recipe < config file < these (cnnkit/train/options.py)."""
    from cnnkit.train.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    not_given = _NotGiven()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands.choices[args.command].set_defaults(**{name: not_given for name in fields})
    values = {k: v for k, v in vars(parser.parse_args(args.argv)).items() if k in fields and v is not not_given}
    if args.command == "lr-find":
        values.pop("out", None)  # lr-find's --out is the folder of its curve, not a run folder
    if args.model_opt:
        values["model_options"] = _model_options(args.model_opt)
    values["progress"] = not args.quiet
    return values


def cmd_lr_find(args: argparse.Namespace) -> int:
    from cnnkit.train.lr_find import default_out
    from cnnkit.training import lr_find

    log = _WarningsOnly() if args.quiet else sys.stderr if args.json else sys.stdout
    out = args.out or default_out()
    r = lr_find(start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps, out=out, log=log,
                **_given_train_options(args))
    if args.json:
        print(strict_json.dumps(r.summary()))
    else:
        # a flat curve has a lowest point, somewhere in its noise, but no valley to report
        valley = ("" if r.method.startswith("default") else
                  f"; the smoothed loss is lowest at {r.min_loss_lr:.3g}, its valley ends at {r.edge_lr:.3g}")
        print(f"suggested learning rate: {r.suggestion:.3g} ({r.method}{valley}); {r.steps} steps"
              f"{', stopped when the loss blew up' if r.diverged else ''}")
        print(_lr_find_files(r.plot, os.path.join(out, "lr_find.json")))
        print(f"train with it: cnnkit train --lr {r.suggestion:.3g} ...  (or --lr auto)")
    return 0


def _lr_find_files(plot: str | None, figures: str) -> str:
    """The line naming the files `cnnkit lr-find` wrote: it named the curve alone ("curve in ./lr_find.png"), and
    lr_find.json beside it went unmentioned."""
    return f"wrote {plot} (the curve) and {figures} (the figures)" if plot else f"wrote {figures} (the figures)"


def cmd_report(args: argparse.Namespace) -> int:
    from cnnkit.report.html import write_report
    from cnnkit.runs import latest_run

    r = write_report(args.run_dir or latest_run(), out=args.out, device=args.device)
    if args.json:
        print(strict_json.dumps(dataclasses.asdict(r)))
    else:
        print(f"wrote {r.path} ({r.size_bytes / 1e6:.1f} MB, {r.seconds:.1f} s); plots in "
              f"{os.path.join(r.run_dir, 'plots')}")
        for note in r.notes:
            print(f"left out: {note}")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from cnnkit.runs import DEFAULT_ROOT, folders_with_runs, format_runs, list_runs

    root = DEFAULT_ROOT if args.root is None else args.root
    runs = [] if args.root is None and not os.path.exists(root) else list_runs(root)
    if args.json:
        print(strict_json.dumps([dataclasses.asdict(r) for r in runs]))
    elif not runs:
        print(_no_runs(root, folders_with_runs() if args.root is None else []))
    else:
        print(format_runs(runs))
    return 0


def _no_runs(root: str, elsewhere: list[tuple[str, list[str]]]) -> str:
    """What `cnnkit runs` says when ``root`` holds no runs: where it looked, and the folders of this one that hold
    runs (``elsewhere``, as ``folders_with_runs`` finds them: made with train --out), each with its command."""
    import shlex

    looked = f"no runs in {root}/ ({os.path.abspath(root)})"
    if not elsewhere:
        return f"{looked} yet; start one with: cnnkit train, or list another folder's with: cnnkit runs DIR"
    found = []
    for folder, names in elsewhere:
        shown = f" ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if folder == "." else ""
        found.append(f"cnnkit runs {shlex.quote(folder)} lists {len(names)} {plural('run', len(names))}{shown}")
    return f"{looked}; runs elsewhere in this folder: {'; '.join(found)}"


def cmd_eval(args: argparse.Namespace) -> int:
    from cnnkit.evaluate import confusion_text, evaluate
    from cnnkit.checkpoint import load_checkpoint

    r = evaluate(load_checkpoint(args.checkpoint, ema=args.ema), args.data, data_dir=args.data_dir, val_split=args.val_split,
                 val_data=args.val_data, batch_size=args.batch_size, device=args.device, tta=args.tta,
                 tta_shift=args.tta_shift, threads=args.threads)
    _warn(r.warnings)
    for note in r.notes:
        _error_line(f"cnnkit: note: {note}")
    if args.json:
        print(strict_json.dumps(dataclasses.asdict(r)))
        return 0
    views = f" (test-time augmentation: {r.tta_views} views)" if r.tta_views > 1 else ""
    top5 = f"top-5 {r.top5:.4f}  " if r.top5 is not None else ""  # None with 5 classes or fewer: 1 by definition
    print(f"{r.checkpoint} on {r.count:,} {r.scored}{views}: acc {r.acc:.4f}  {top5}"
          f"loss {r.loss:.4f}  macro-F1 {r.macro_f1:.4f}")
    name = max(len(c) for c in r.classes + ["class"]) + 1  # names in full, as in the confusion matrix
    print(f"{'class':<{name}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
    # "-" where there is no figure (None): the precision of a class never predicted (0/0), the recall and F1 of a
    # class without images here (a folder of some of the classes)
    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for c in r.per_class:
        print(f"{c['class']:<{name}}{shown(c['precision']):>10}{shown(c['recall']):>10}{shown(c['f1']):>10}"
              f"{c['support']:>9}")
    print(f"{'macro avg':<{name}}{r.macro_precision:>10.4f}{r.macro_recall:>10.4f}{r.macro_f1:>10.4f}{r.count:>9}")
    # A class never predicted counts 0 in the macro precision only where it has images here: with none, it is in
    # neither the images nor the predictions, and every macro average leaves it out (as scikit-learn's does)
    if any(c["precision"] is None and c["support"] for c in r.per_class):  # as its UndefinedMetricWarning says
        print("precision -: no image was predicted as that class (0/0); the macro average counts it as 0, "
              "as scikit-learn does by default (zero_division)")
    if any(c["precision"] is None and not c["support"] for c in r.per_class):
        print("a row of -: no image of that class here and none predicted as it; the macro averages leave it out, "
              "as scikit-learn does")
    print(confusion_text(r))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cnnkit.predict import predict  # for an .onnx file, without torch

    results = predict(args.checkpoint, args.paths, topk=args.topk, ema=args.ema, tta=args.tta,
                      tta_shift=args.tta_shift, threads=args.threads, device=args.device)
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"cnnkit predict: error: {r['error']}", file=sys.stderr)
    if args.json:
        print(strict_json.dumps(results))
    else:
        for r in results:
            if "top" in r:
                print(r["path"] + ": " + ", ".join(f"{t['class']} {t['prob']:.3f}" for t in r["top"]))
    return 1 if failed else 0


def _note_random_weights(model: str, pretrained: bool, shows: str, fix: str) -> None:
    """A one-line note on stderr when ``model`` is a model name built with random weights (no run, checkpoint or
    --pretrained): what the command ``shows`` then is an untrained network's."""
    if not pretrained and not os.path.exists(model):
        print(f"cnnkit: note: {model} is a model name, built with random weights: {shows}; {fix}", file=sys.stderr)


def cmd_embed(args: argparse.Namespace) -> int:
    from cnnkit.embed import embed

    r = embed(args.model, args.data, args.out, pretrained=args.pretrained, input_size=args.input_size,
              head_from=args.head_from, device=args.device)
    rows = "image file, label and class" if r["files"] else "label and class"
    # Which classes the labels number: a run's own (so embeds of one run combine), or the data's.
    whose = {"run": " (the run's class indices)",
             "new": f" ({args.data}'s own classes: the run has none of them)"}.get(r["labelled_by"], "")
    _warn(r["warnings"])
    print(f"wrote {r['images']:,} x {r['dim']} features to {r['out']}, their labels{whose} to {r['labels']} and "
          f"each row's {rows} to {r['paths']}")
    _note_random_weights(args.model, args.pretrained, "its features are an untrained network's",
                         "add --pretrained or pass a run folder or checkpoint")
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from cnnkit.embed import probe

    r = probe(args.model, args.data, pretrained=args.pretrained, val_split=args.val_split, val_data=args.val_data,
              input_size=args.input_size, head_from=args.head_from, device=args.device)
    _warn(r.warnings)
    if args.json:
        print(strict_json.dumps(dataclasses.asdict(r)))
    else:
        print(f"linear probe on {r.feature_dim}-d features: train acc {r.train_acc:.4f} ({r.num_train:,} "
              f"{plural('image', r.num_train)}), val acc {r.val_acc:.4f} ({r.num_val:,} {plural('image', r.num_val)})")
    _note_random_weights(args.model, args.pretrained, "the probe measured an untrained network's features",
                         "add --pretrained or pass a run folder or checkpoint")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cnnkit.export import export

    r = export(args.checkpoint, args.format, args.out, verify=args.verify, images=args.verify_images)
    _warn(r.warnings)
    if args.json:
        print(strict_json.dumps(dataclasses.asdict(r)))
    else:
        print(f"exported {r.checkpoint} ({r.model}) as {r.format} to {r.path}: "
              f"{r.size_bytes / 1e6:.1f} MB in {r.export_time_s:.1f} s")
        if r.checks:
            diffs = ", ".join(f"{c.inputs} x{c.batch_size} {c.max_abs_diff:.1e}" for c in r.checks)
            print(f"largest difference from PyTorch: {diffs}; {'ok' if r.verified else 'FAILED'} "
                  f"(tolerance {r.tolerance:g} of the largest logit, at least {r.tolerance:g}; logits up to "
                  f"{max(c.max_abs_logit for c in r.checks):.3g})")
    if r.verified is False:
        bad = max(r.checks, key=lambda c: c.max_abs_diff / c.allowed(r.tolerance))
        print(f"cnnkit export: error: {r.path} differs from the PyTorch model by up to {bad.max_abs_diff:.2e} on "
              f"logits up to {bad.max_abs_logit:.3g} (allowed {bad.allowed(r.tolerance):.2e}); do not deploy it "
              f"({args.out} was left as it was), and please report it", file=sys.stderr)
        return 1
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cnnkit.models import list_models

    names = list_models(args.pattern)
    if not names:
        # A pattern matches whole names, and the names are lower case: `cnnkit models resnet` or 'ResNet*' found
        # nothing where seven names hold "resnet"; the pattern that finds them is suggested.
        wider = args.pattern.lower() if any(c in args.pattern for c in "*?[") else f"*{args.pattern.lower()}*"
        found = list_models(wider) if wider != args.pattern else []
        hint = (f"try '{wider}' ({len(found)} name{'s' if len(found) > 1 else ''}: {', '.join(found[:3])}"
                f"{', ...' if len(found) > 3 else ''})"
                if found else "`cnnkit models` lists them all")
        raise UserError(f"no model name matches '{args.pattern}'; {hint}")
    for name in names:
        print(name)
    return 0


def _print_json(result) -> None:
    print(strict_json.dumps(dataclasses.asdict(result) if dataclasses.is_dataclass(result) else result))


def cmd_shape(args: argparse.Namespace) -> int:
    from cnnkit.inspect.shapes import conv_arithmetic

    kind = {"max": "maxpool", "avg": "avgpool", None: "conv"}[args.pool]
    r = conv_arithmetic(args.size, args.kernel, args.stride, args.padding, args.dilation, kind, args.ceil_mode)
    if args.json:
        _print_json(r)
    else:
        print(f"{r.kind} output size: {r.output_size}")
        print(f"  {r.formula}")
        print(f"  = {r.steps}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from cnnkit.inspect.summary import summary

    s = summary(args.model, args.input_size, args.num_classes, **_model_options(args.model_opt, _BUILD_FLAGS))
    if args.json:
        _print_json(s)
    else:
        print(s.table(args.depth))
    return 0


def cmd_rf(args: argparse.Namespace) -> int:
    from cnnkit.inspect.loading import load_model
    from cnnkit.inspect.receptive_field import (
        effective_receptive_field, format_receptive_field, receptive_field, verify_receptive_field,
    )

    for option, value in (("--layer", args.layer), ("--images", args.images), ("--images-from", args.images_from)):
        if value is not None and not args.effective:  # else ignored: the table is of every layer anyway
            raise UserError(f"{option} applies to the effective field; add --effective PNG (the table and "
                            "--verify-layer cover every layer)")
    options = _model_options(args.model_opt, _BUILD_FLAGS)
    r = receptive_field(args.model, args.input_size, args.num_classes, **options)
    effective = None
    if args.verify or args.verify_layer or args.effective:
        target = load_model(args.model, args.input_size, args.num_classes, **options)
        if args.verify or args.verify_layer:
            r.checks = verify_receptive_field(target, args.verify_layer or None)
        if args.effective:
            effective = effective_receptive_field(target, args.layer, count=args.images or 16, out=args.effective,
                                                  images_from=args.images_from)
            _warn(effective.warnings)
    if args.json:
        out = dataclasses.asdict(r)
        if effective:
            out["effective"] = dataclasses.asdict(effective)
        _print_json(out)
        return 0
    if args.depth:
        r = dataclasses.replace(r, layers=[x for x in r.layers if x.name.count(".") < args.depth])
    print(format_receptive_field(r))
    if effective:
        print(f"effective field of {effective.layer}: 95% of the gradient within {effective.erf} px "
              f"(theoretical rf {effective.rf} px, {effective.described()}); "
              f"heat map in {effective.path}")
    return 0 if all(c.agrees for c in r.checks) else 1


def cmd_features(args: argparse.Namespace) -> int:
    from cnnkit.inspect.feature_maps import feature_maps
    from cnnkit.inspect.summary import called, summary

    options = _model_options(args.model_opt, _BUILD_FLAGS)
    if args.list_layers:
        rows = [{"name": x.name, "type": x.type, "output_shape": x.output_shape, "calls": x.calls}
                for x in summary(args.model, args.input_size, args.num_classes, **options).layers]
        if args.json:
            _print_json(rows)
            return 0
        for x in rows:
            print(f"{x['name']:<40} {called(x['type'], x['calls']):<24} "
                  f"{'x'.join(map(str, x['output_shape'] or [])) or '-'}")
        if any(x["calls"] > 1 for x in rows):  # a Bottleneck's one ReLU: 512 channels first, the block's 2048 last
            print("xN: the layer runs N times in one forward pass; the shape is its first call's output, and "
                  "--layer draws its last call's")
        return 0
    for option, value in (("--image IMG", args.image), ("--out DIR", args.out)):
        if not value:
            raise UserError(f"features needs {option} (or --list-layers to see the layer names)")
    maps = feature_maps(args.model, args.layer, args.image, args.out, args.input_size, args.max_channels,
                        args.num_classes, **options)
    _note_random_weights(args.model, False, "the maps show an untrained network's response, nothing learned",
                         "pass a run folder or checkpoint")
    if args.json:
        _print_json([dataclasses.asdict(m) for m in maps])
    for m in maps if not args.json else []:
        print(f"{m.layer}: {'x'.join(map(str, m.shape))}, {m.channels_shown} channels shown -> {m.path} "
              f"({m.width}x{m.height} px)")
    return 0


def cmd_filters(args: argparse.Namespace) -> int:
    from cnnkit.inspect.filters import filters

    f = filters(args.model, args.layer, args.out, args.mode, args.max_filters, args.input_size, args.num_classes,
                **_model_options(args.model_opt, _BUILD_FLAGS))
    _note_random_weights(args.model, False, "its kernels are the random initial values, nothing learned",
                         "pass a run folder or checkpoint")
    if args.json:
        _print_json(f)
    else:
        inputs = ""
        if f.inputs_shown < f.weight_shape[1]:
            inputs = f", input channels 1-{f.inputs_shown} of {f.weight_shape[1]}"
        print(f"{f.layer}: {'x'.join(map(str, f.weight_shape))} kernels, {f.filters_shown} shown ({f.mode}{inputs}) "
              f"-> {f.path} ({f.width}x{f.height} px)")
    return 0


def cmd_cam(args: argparse.Namespace) -> int:
    from cnnkit.inspect.cam import class_activation_map

    c = class_activation_map(args.model, args.image, args.target_class, args.layer, args.method, args.out,
                             args.input_size, num_classes=args.num_classes,
                             **_model_options(args.model_opt, _BUILD_FLAGS))
    if args.json:
        _print_json(c)
    else:
        name = f" '{c.class_name}'" if c.class_name else ""
        print(f"{', '.join(c.methods)} on {c.layer} for class {c.class_index}{name} (p={c.probability:.3f}; "
              f"predicted {c.predicted}) -> {c.path} ({c.width}x{c.height} px)")
    _warn(c.warnings)
    _note_random_weights(args.model, False, "the map shows no learned evidence", "pass a run folder or checkpoint")
    return 0


def cmd_check_data(args: argparse.Namespace) -> int:
    from cnnkit.data.checks import check_data, format_check

    c = check_data(args.data, val_data=args.val_data, val_split=args.val_split, data_dir=args.data_dir,
                   input_size=args.input_size, channels=args.channels, model=args.model, pretrained=args.pretrained,
                   threshold=args.threshold)
    if args.json:
        _print_json(c)
    else:
        print(format_check(c))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from cnnkit.audit import audit, format_audit

    a = audit(args.model, freeze=args.freeze, unfreeze=args.unfreeze, stages=args.stages, plain_train=args.plain_train,
              **_model_options(args.model_opt))
    if args.json:
        _print_json(a)
    else:
        print(format_audit(a))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader went away (`cnnkit predict ... | head -1`): nothing is wrong, and nothing more can be said.
        # Python would report the failed flush of stdout at exit, so stdout is pointed at /dev/null first; the exit
        # status is the one a process killed by SIGPIPE has, as `git log | head` gives.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


def _main(argv: Sequence[str] | None) -> int:
    import warnings

    # A file name that is not UTF-8 comes from the file system with surrogate escapes; printed (a warning naming
    # the image, a prediction's row), strict encoding would fail the command: its bytes are shown escaped instead.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure") and getattr(stream, "errors", "strict") == "strict":
            stream.reconfigure(errors="backslashreplace")

    # An image over the pixel limit gets cnnkit's one line naming the file; Pillow's two-line warning about the same
    # image (DecompressionBombWarning, matched by its text so that PIL need not be imported here) would precede it.
    warnings.filterwarnings("ignore", message=r"Image size \(\d+ pixels\) exceeds limit")
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    command = {"train": cmd_train, "eval": cmd_eval, "predict": cmd_predict, "export": cmd_export,
               "models": cmd_models, "embed": cmd_embed, "probe": cmd_probe, "shape": cmd_shape,
               "summary": cmd_summary, "rf": cmd_rf, "features": cmd_features, "filters": cmd_filters,
               "cam": cmd_cam, "check-data": cmd_check_data, "audit": cmd_audit, "lr-find": cmd_lr_find,
               "report": cmd_report, "runs": cmd_runs}[args.command]
    try:
        _check_dataset_name(args)
        return command(args)
    except UserError as e:
        if args.debug:  # the traceback is --debug's point; the exit code stays the error's own (2 for usage)
            import traceback

            traceback.print_exc()
            return e.exit_code
        if not isinstance(e, TrainingStopped) or _reports():  # every rank stopped alike: rank 0 says so
            _error_line(f"cnnkit {args.command}: {e.label}: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        print("cnnkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        raise
    except Exception as e:  # a bug, not the user's fault: one line, the traceback behind --debug
        if args.debug:
            raise
        _error_line(f"cnnkit {args.command}: internal error: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''} (rerun as cnnkit --debug {args.command} ... "
                    "for the traceback, and please report it)")
        return 1


def _check_dataset_name(args: argparse.Namespace) -> None:
    """A UserError for a --data (or DATA) that is no folder but a built-in dataset's name in another spelling
    (`--data Mnist`), with the command line that names it as it is spelt. The name is not taken as the dataset's:
    a folder may be called Mnist (cnnkit/choices.py, builtin_meant)."""
    import shlex

    from cnnkit.choices import builtin_meant

    data = getattr(args, "data", None)
    if not isinstance(data, str) or data in BUILTIN or os.path.exists(data) or not (meant := builtin_meant(data)):
        return
    line = list(args.argv)
    for i, word in enumerate(line):
        if word in (data, f"--data={data}"):
            line[i] = word[:-len(data)] + meant
            break
    else:
        return  # not given on the command line (a config file's): the data's own error names the likely intent
    raise UserError(f"data path {data} does not exist; for the built-in dataset {meant}: cnnkit {shlex.join(line)}")


def _reports() -> bool:
    from cnnkit.train.distributed import reports

    return reports()


def _warn(warnings: Sequence[str]) -> None:
    """A result's warnings on stderr, a line each, as a run's own reach it (``_WarningsOnly`` passes those on)."""
    for w in warnings:
        _error_line(WARNING + w)


def _error_line(line: str) -> None:
    """``line`` and its newline on stderr in one write: under torchrun every process may fail at once into the same
    pipe, and print's two writes (text, then newline) let their lines run together. A control character in it (a
    file named with a newline) is shown escaped: the error stays one line."""
    line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
