"""TrainConfig: every option of a training run; TrainResult: what a run reports.

``config.json`` in a run folder is ``dataclasses.asdict(TrainConfig)``, and ``--json`` prints
``dataclasses.asdict(TrainResult)``: one source of truth for the CLI and the Python API.
"""

from __future__ import annotations

import functools
import json
import os
import stat
import types
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from cnnkit.choices import BUILTIN, TORCHVISION_DATASETS
from cnnkit.errors import UserError, did_you_mean, shown


@dataclass
class TrainConfig:
    model: str = "simple_cnn"
    model_options: dict[str, Any] = field(default_factory=dict)
    # transfer learning
    pretrained: bool = False  # torchvision's default weights for the model
    weights: str | None = None  # a state dict, torchvision file, .safetensors file or cnnkit run to start from
    freeze: str | None = None  # "backbone": train only the classifier head
    unfreeze: str | None = None  # comma-separated module names: train only these
    lr_backbone: float | None = None  # a lower learning rate for everything but the head
    stages: str | None = None  # staged fine-tuning, e.g. "fc:3@1e-3,layer4+fc:5@1e-4" (overrides epochs/lr)
    # data
    data: str = "shapes"
    data_dir: str | None = None
    download: bool = False
    val_data: str | None = None
    val_split: float | None = None
    input_size: int | None = None  # pixels, square; None: the data's own size
    channels: int | None = None  # 1 or 3; None: the data's own
    num_samples: int | None = None  # training images to use (for shapes: to generate)
    crop_pad: int | None = None  # random-translation padding in pixels; None: the data's default (DATA_DEFAULTS)
    flip: bool | None = None  # random horizontal flips; None: on, except for digits
    # optimisation
    epochs: int | None = None  # None: the data's default (DATA_DEFAULTS)
    batch_size: int | None = None  # None: the data's default (DATA_DEFAULTS)
    lr: float | Literal["auto"] | None = None  # peak rate; None: 0.05 for SGD, 2e-3 for AdamW; "auto": lr_find's
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0
    clip_grad: float | None = None  # clip the gradient norm to this value (the norm before clipping is logged)
    # machinery
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    eval_batch_size: int = 500
    workers: int = 2  # loader processes, only for sets too large for memory
    decode: str = "auto"  # streamed sets: "cpu" in the workers, "device" (JPEGs, random resized crops), "auto"
    threads: int | None = None  # CPU threads torch computes with; None: the usable physical cores (cnnkit/threads.py)
    # (config.json records this request, not the count it resolved to: TrainResult.threads is that)
    out: str | None = None  # run folder; None: runs/<timestamp>-<model>
    save_every: int = 0  # also write last.pt every N steps (0: at the end of each epoch only)
    nan: str = "stop"  # a non-finite loss: stop (keeping the last good checkpoint) or skip the batch
    bad_images: str = "skip"  # broken images in a folder: skip (listed in bad_images.txt) or error
    progress: bool = True
    sync_bn: bool = False  # with several processes on CUDA: BatchNorm statistics over the global batch
    # speed
    recipe: str | None = None  # a named set of options (cnnkit.train.recipes), e.g. "fast"; explicit options win
    compile: bool | str = False  # torch.compile the training step's model; a mode name (COMPILE_MODES) or True: "default"
    alternate_flip: bool = False  # flips alternate per image from epoch to epoch instead of coin tosses
    cutout: int = 0  # side in pixels of a zeroed square per training image (0: none)
    augment_policy: str | None = None  # "randaugment" or "trivialaugment" (per image: meant for larger images)
    random_erasing: float = 0.0  # probability of erasing a random rectangle of each training image
    tta: bool = False  # the final validation also averages mirrored and shifted views (tta_val_acc)
    # class balance and data checks
    class_weights: str | None = None  # "auto": loss weights n / (k * class count), recorded in class_weights.json
    balanced_sampler: bool = False  # training batches drawn with every class equally likely (with replacement)
    check_data: bool = True  # before training: class counts, train/val duplicates, model mismatches (warnings)
    # regularisation and run control (cnnkit/train/mix.py, cnnkit/train/ema.py)
    mixup: float = 0.0  # mixup's Beta(alpha, alpha) parameter, e.g. 0.2; 0: off
    cutmix: float = 0.0  # CutMix's Beta(alpha, alpha) parameter, e.g. 1.0; 0: off (both on: one or the other per batch)
    mix_off_epochs: int = 0  # no mixing in the last N epochs
    ema: float | None = None  # weight EMA decay, e.g. 0.999 (an average over ~1/(1-decay) steps); None: off
    accum_steps: int = 1  # an optimizer step every N batches, on their mean gradient
    early_stop: int | None = None  # patience: stop after this many epochs without improvement of `monitor`
    monitor: str = "val_acc"  # val_acc (higher is better) or val_loss (lower): best.pt, keep_best, early_stop
    min_delta: float = 0.0  # the least change of `monitor` that counts as an improvement
    keep_best: int = 0  # also keep the N best epochs by `monitor` as best-epochE.pt
    overfit_batches: int = 0  # train and validate on the same first N batches, no augmentation (a sanity check)
    smoke: bool = False  # a quick sanity run: at most 2 epochs of a few batches, a small validation set
    # showing the run (cnnkit/report/); opt-in, since drawing costs a few seconds that short runs notice
    plots: bool = False  # plots/ at the end: curves, learning rate, confusion matrix, top losses
    report: bool = False  # report.html at the end (with the plots)
    tensorboard: bool = False  # TensorBoard events in <run>/tensorboard (needs the tensorboard extra)


@dataclass
class TrainResult:
    # The figures are the last finished epoch's; None in the result.json of a run that diverged before one did.
    val_acc: float | None
    val_loss: float | None
    best_val_acc: float | None
    best_epoch: int
    epochs: int
    train_acc: float | None
    train_loss: float | None
    # the training loop's wall time, validation and saves included; a resumed run's over all its sessions
    train_time_s: float
    images_per_s: float | None  # of the epochs' training time (metrics.csv's epoch_time_s), over all sessions too
    run_dir: str
    model: str
    data: str
    precision: str
    num_train: int
    num_val: int
    params: int
    skipped_images: int = 0
    skipped_batches: int = 0  # batches with a non-finite loss, with nan="skip"
    tta_val_acc: float | None = None  # the last epoch's validation accuracy with test-time augmentation
    wall_time_s: float = 0.0  # from the call to train() to its return: data loading, set-up and evaluation included
    epochs_run: int = 0  # fewer than `epochs` when early stopping ended the run
    stop_reason: str = ""  # why the run ended: "completed", the early-stopping rule that fired, "memorised the N
    # batches at epoch E" (--overfit-batches got every image right), or "diverged: ..."
    # (a diverged run's result.json holds the last finished epoch's figures, null where no epoch finished)
    monitor: str = "val_acc"  # the metric that picked best.pt (best_epoch; best_val_acc is that epoch's val acc)
    best_score: float = 0.0  # the monitored metric at best_epoch
    ema_val_acc: float | None = None  # the weight EMA's validation accuracy after the last epoch
    threads: int = 0  # CPU threads torch computed with (config.json's threads: the request, None for the default)
    # where the default count changed during the run, because other processes were busy on the cores or no longer
    # were (cnnkit/threads.py, ThreadGovernor): {epoch, batch, before, threads, s_before, s_after} each, the count
    # changed after that batch of that epoch (numbered within the epoch, as steps.csv's step); in a resumed run,
    # those of all its sessions, up to the checkpoint each later one resumed from
    thread_changes: list[dict[str, Any]] = field(default_factory=list)
    # what the run warned about, each as its log's line shows it after "cnnkit: warning: " (a resumed run: each
    # warning of all its sessions once, the earlier sessions' first); they are in result.json and `train --json` too
    warnings: list[str] = field(default_factory=list)



# A config file is a few dozen lines. Hostile files are stopped before they cost time or memory: the bytes read,
# and the values in the parsed file, where YAML's aliases count each time they are used (nine levels of nine
# aliases are 387 million values in a file of 400 bytes), and how deeply they nest (PyYAML recurses per level).
# Text is bounded too (a path is at most 4,096 bytes on Linux), since messages quote names and paths.
MAX_CONFIG_BYTES = 256 * 1024
MAX_CONFIG_VALUES = 10_000
MAX_CONFIG_DEPTH = 20
MAX_CONFIG_TEXT = 4096


# What an option left at None means: the data's own default, else the general one (crop_pad's: an eighth of
# the image size). The generated shapes sit anywhere in the image already, so random translation teaches
# nothing new there and slows the start: simple_cnn stays on its initial plateau (loss ~2.30) for the first
# few hundred optimizer steps, whatever the learning rate, and the plateau ends after a number of steps, not
# of images, so batches of 32 reach it in half the images of 64. With these, `cnnkit train` (the demo:
# simple_cnn on the shapes data) trains to val acc 0.95 or more in 4 epochs of cnnkit.data.sources.SHAPES_TRAIN
# images, where the general defaults needed 10 epochs of 20,000 (docs/design.md, "The demo's defaults"); in fp32,
# seeds 0, 1 and 2 reached 0.9750, 0.9525 and 0.9535, so there is no margin for less work. The plateau lasts about
# 8,000 images at batch 32 and the climb after it about 23,000 more: 3 epochs reached only 0.61-0.82 (seed 1)
# at lr 0.1, with a warm-up of 0.2 epochs, at batch 16, without flips or with momentum 0.95; AdamW (2e-3:
# 0.68-0.74, 5e-3: no learning) and Muon (diverged at its default rate) did no better, He-initialised layers
# (tried, not kept) still sat on the plateau, and 24-pixel images (0.56x the FLOPs) reached 0.935.
GENERAL_DEFAULTS: dict[str, Any] = {"epochs": 10, "batch_size": 64}
DATA_DEFAULTS: dict[str, dict[str, Any]] = {"shapes": {"epochs": 4, "batch_size": 32, "crop_pad": 0}}


def with_data_defaults(config: TrainConfig) -> TrainConfig:
    """``config`` with each option it leaves to the data (None) set to the data's default or the general one."""
    defaults = {**GENERAL_DEFAULTS, **DATA_DEFAULTS.get(config.data, {})}
    return replace(config, **{name: value for name, value in defaults.items() if getattr(config, name) is None})


# The options a resumed run takes from the command that resumes it: how this session computes and shows it, not
# what the run trains. The thread count is the machine's (a run with the default count changes it as it goes,
# cnnkit/threads.py); a resumed run's checkpoints record the one it used last.
SESSION_OPTIONS = ("threads", "progress")


# The options that name a file or folder. A run records them absolute (``recorded``), so that eval, report and
# --resume work from any folder; "data" may be a built-in dataset's name instead, recorded as it is.
PATH_OPTIONS = ("data", "val_data", "data_dir", "weights")


def recorded(config: TrainConfig) -> dict[str, Any]:
    """``config`` as a run records it (config.json, its checkpoints' config): its PATH_OPTIONS absolute."""
    values = asdict(config)
    for name in PATH_OPTIONS:
        value = values[name]
        if isinstance(value, str) and value and not (name == "data" and value in BUILTIN):
            values[name] = os.path.abspath(value)
    return values


def check_recorded_paths(config: dict[str, Any], run_dir: str | None, command: str = "the command",
                         fix: str | None = None) -> None:
    """Raise a UserError when a folder that a run's recorded ``config`` reads its images from is a relative path
    that does not exist from the current folder: a run from before paths were recorded absolute, used from
    another folder than the one it was trained in. ``run_dir``: the run's folder (its config.json's "out" then
    names that folder, where it can); ``command``: the one at hand, as typed ("cnnkit eval"); ``fix``: what else
    it can do, e.g. "pass --data DIR"."""
    gone = moved_data(config)
    if gone is not None:
        raise UserError(f'the run\'s "{gone}" folder {config[gone]} (its config.json) is not there any more: moved '
                        f"or deleted; put it back to run {command} on the run's own images"
                        + (f", or {fix}" if fix else ""))
    for name in ("data", "val_data", "data_dir"):
        value = config.get(name)
        if not isinstance(value, str) or not value or os.path.isabs(value) or os.path.exists(value):
            continue
        if name == "data" and value in BUILTIN or name == "data_dir" and config.get("data") not in TORCHVISION_DATASETS:
            continue
        folder = _trained_in(run_dir, value)
        where = f"from {folder}, the folder it was trained in" if folder else "from the folder it was trained in"
        raise UserError(f'"{name}": "{value}" in the run\'s config.json is relative to the folder the run was trained '
                        f"in, and {value} does not exist from this folder ({os.getcwd()}); run {command} {where}"
                        + (f", or {fix}" if fix else ""))


def moved_data(config: dict[str, Any]) -> str | None:
    """Which of a run's recorded image folders, "data" or "val_data", is an absolute path that no longer exists
    (the folder was moved or deleted since training), or None. A built-in dataset's name is no folder."""
    for name in ("data", "val_data"):
        value = config.get(name)
        if isinstance(value, str) and os.path.isabs(value) and not os.path.exists(value) \
                and not (name == "data" and value in BUILTIN):
            return name
    return None


def _trained_in(run_dir: str | None, path: str) -> str | None:
    """The folder a run in ``run_dir`` was started from, when its config.json's relative "out" tells and
    ``path`` exists there; else None."""
    if not run_dir:
        return None
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            out = json.load(f).get("out")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(out, str) or not out or os.path.isabs(out):
        return None
    run, out = os.path.abspath(run_dir), os.path.normpath(out)
    if not run.endswith(os.sep + out):
        return None
    folder = run[: -len(out) - 1] or os.sep
    return folder if os.path.exists(os.path.join(folder, path)) else None


def read_config_file(path: str) -> dict[str, Any]:
    """The TrainConfig fields that a YAML or JSON file sets (a run folder's ``config.json`` is one), checked:
    an unknown key or a value of the wrong type is a UserError naming it. Files over ``MAX_CONFIG_BYTES``, or
    holding more than ``MAX_CONFIG_VALUES`` values, nesting deeper than ``MAX_CONFIG_DEPTH`` or holding text
    longer than ``MAX_CONFIG_TEXT`` characters, are refused."""
    kind = os.path.splitext(path)[1].lower()
    # a pipe (bash's --config <(cat run.yaml), /dev/fd/63) has no extension: read as YAML, JSON's superset
    if kind not in (".yaml", ".yml", ".json") and not is_pipe(path):
        raise UserError(f"--config {path}: expected a .yaml, .yml or .json file")
    try:
        with open(path, "rb") as f:  # read once: a pipe or FIFO gives its text to one read only
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"--config {path}: over {MAX_CONFIG_BYTES // 1024} KB, too large for a file of training "
                        "options")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        utf16 = " (it starts like UTF-16)" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise UserError(f"--config {path}: not UTF-8 text{utf16}: byte 0x{data[e.start]:02x} at offset {e.start}; "
                        "save it as UTF-8") from None
    if kind == ".json":
        try:
            values = json.loads(text, object_pairs_hook=_unique_keys)
        except _DuplicateKey as e:
            raise e.error(path) from None
        except json.JSONDecodeError as e:
            raise UserError(f"--config {path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise UserError(f"--config {path}: nested more than {MAX_CONFIG_DEPTH} levels deep") from None
    else:
        values = _load_yaml(text, path)
    _check_size(values, path)
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, got {type(values).__name__}")
    hints = typing.get_type_hints(TrainConfig)
    unknown = sorted((key for key in values if key not in hints), key=str)
    if unknown:
        names = ", ".join(k if isinstance(k, str) and len(k) <= 40 else shown(k) for k in unknown[:5])
        names += f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        first = unknown[0] if isinstance(unknown[0], str) and len(unknown[0]) <= 40 else ""
        hint = ((did_you_mean(first, hints) if first else "")
                or f"; known keys: {', '.join(f.name for f in fields(TrainConfig))}")
        raise UserError(f"--config {path}: unknown key(s) {names}{hint}")
    checked = {name: _checked(name, value, hints[name], path) for name, value in values.items()}
    if "model_options" in checked:  # as --model-opt reads them: lists become tuples
        checked["model_options"] = {k: tuple(v) if isinstance(v, list) else v for k, v in checked["model_options"].items()}
    return checked


def is_pipe(path: str) -> bool:
    """Whether ``path`` is a pipe or FIFO, whose text only its first reader gets."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


class _DuplicateKey(Exception):
    """A mapping of a config file that gives one key twice: JSON and YAML parsers keep the last, unseen."""

    def __init__(self, key: Any, line: int | None = None) -> None:
        super().__init__(key)
        self.key = key if isinstance(key, str) and len(key) <= 40 else shown(key)
        self.where = f" (the second at line {line})" if line is not None else ""

    def error(self, path: str) -> UserError:
        return UserError(f"--config {path}: key {self.key} is given twice{self.where}; keep one (the last would "
                         "silently win)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json.loads' object_pairs_hook: the object, unless it gives a key twice."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


@functools.cache
def _unique_key_loader() -> type:
    """PyYAML's safe loader, refusing a mapping that gives a key twice (keys merged in with ``<<`` may be
    overridden: that is what a merge is for). Made once, on first use: yaml is imported only for YAML files."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> dict:
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, key_node.start_mark.line + 1)
                    seen.add(key)
                except TypeError:  # an unhashable key: the safe loader refuses it in its own words
                    pass
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def _load_yaml(text: str, path: str) -> Any:
    """``text`` parsed as YAML, after a pass over its events that refuses too many values or too deep a nesting
    before PyYAML builds anything (its composer recurses once per level)."""
    import yaml

    try:
        depth = count = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
                depth += 1
                if depth > MAX_CONFIG_DEPTH:
                    raise UserError(f"--config {path}: nested more than {MAX_CONFIG_DEPTH} levels deep")
            elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
                depth -= 1
            if isinstance(event, yaml.NodeEvent):
                count += 1
                if count > MAX_CONFIG_VALUES:
                    raise UserError(f"--config {path}: more than {MAX_CONFIG_VALUES:,} values, too many for a file "
                                    "of training options")
        return yaml.load(text, Loader=_unique_key_loader())
    except _DuplicateKey as e:
        raise e.error(path) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = str(getattr(e, "problem", None) or e).splitlines()[0][:160]
        raise UserError(f"--config {path}: not valid YAML ({problem}{where})") from None


def _check_size(values: Any, path: str) -> None:
    """Refuse ``values`` if it holds more than MAX_CONFIG_VALUES values, nests deeper than MAX_CONFIG_DEPTH or
    holds a text longer than MAX_CONFIG_TEXT, counting a value reached along several paths (a YAML alias) each
    time; stops as soon as a limit is passed."""
    count, stack = 0, [(values, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise UserError(f"--config {path}: more than {MAX_CONFIG_VALUES:,} values (YAML aliases counted each "
                            "time they are used), too many for a file of training options")
        if isinstance(value, str) and len(value) > MAX_CONFIG_TEXT:
            raise UserError(f"--config {path}: a text of {len(value):,} characters, over the {MAX_CONFIG_TEXT:,} a "
                            f"name or path can take: {shown(value, 40)}")
        if isinstance(value, (dict, list, tuple)):
            if depth > MAX_CONFIG_DEPTH:
                raise UserError(f"--config {path}: nested more than {MAX_CONFIG_DEPTH} levels deep")
            items = [x for kv in value.items() for x in kv] if isinstance(value, dict) else value
            stack.extend((x, depth + 1) for x in items)


_TYPE_NAMES = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "null"}


def _checked(name: str, value: Any, hint: Any, path: str) -> Any:
    """``value`` if it has the type ``hint`` allows (an int where a float is expected becomes a float)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    for option in options:
        if option is type(None) and value is None or option is bool and isinstance(value, bool):
            return value
        if option is str and isinstance(value, str) or typing.get_origin(option) is dict and isinstance(value, dict):
            return value
        if typing.get_origin(option) is Literal and value in typing.get_args(option):  # lr: auto
            return value
        if isinstance(value, bool):
            continue
        if option is int and isinstance(value, int):
            return value
        if option is float and isinstance(value, (int, float)):
            return float(value)
        if option is float and isinstance(value, str):
            try:  # YAML 1.1 reads 1e-3 (no dot) as text
                return float(value)
            except ValueError:
                pass
    wanted = " or ".join(" or ".join(map(repr, typing.get_args(o))) if typing.get_origin(o) is Literal
                         else _TYPE_NAMES.get(o, "a mapping") for o in options)
    raise UserError(f"--config {path}: {name} must be {wanted}, got {shown(value)}")
