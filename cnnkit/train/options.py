"""The one place where a run's options are merged and checked, for ``cnnkit train``, ``cnnkit lr-find`` and the
Python API alike: TrainConfig's defaults < the recipe's (and ``--overfit-batches``') < the config file's < the
options given (flags, or keyword arguments); then the data's defaults fill what is still unset, and every value
is checked before minutes of data loading.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NoReturn

from cnnkit.choices import AUGMENT_POLICIES, COMPILE_MODES, DECODE_CHOICES, OPTIMIZERS, PRECISIONS, SCHEDULES
from cnnkit.errors import UserError, did_you_mean
from cnnkit.threads import bad_threads
from cnnkit.train.config import TrainConfig, check_recorded_paths, read_config_file, with_data_defaults
from cnnkit.train.recipes import recipe_options
from cnnkit.transfer import check_stage_options, plan_stages

NAN_POLICIES = ("stop", "skip")
# The options training hands the model's factory itself, and what sets each.
MODEL_OPTIONS_SET_BY = {"num_classes": "the data (one class per class folder)", "in_channels": "--channels",
                        "input_size": "--input-size", "pretrained": "--pretrained"}
MONITORS = {"val_acc": 1, "val_loss": -1}  # the metrics that pick best.pt and stop early: +1 higher is better


# `cnnkit train` options that are no training option, and what does their work from Python (cnnkit.train)
COMMAND_LINE_ONLY = {
    "quiet": "from Python pass progress=False, and log=open(os.devnull, 'w') for no output at all",
    "json": "from Python the TrainResult returned holds the figures (dataclasses.asdict(result) for a dict)",
    "nproc": "from Python run `torchrun --nproc-per-node N -m cnnkit train ...` instead",
}


def make_config(config: TrainConfig | str | os.PathLike | None = None,
                overrides: Mapping[str, Any] | None = None, *, resumed: bool = False) -> TrainConfig:
    """The checked configuration of a run: ``overrides`` (TrainConfig fields) over ``config``.

    ``config``: None (TrainConfig's defaults under the recipe that ``overrides`` or the file names), a YAML or
    JSON file of TrainConfig fields (a run folder's ``config.json`` replays that run; its recipe, or the one in
    ``overrides``, lies under it), or a TrainConfig, whose every field is taken as set. ``model_options`` are
    merged key by key, so ``--model-opt`` adds to a file's. Options left to the data (None) get the data's
    defaults; a value out of range is a UserError naming it. ``resumed``: the configuration of a run that started
    before, which rules added since (the warm-up's length) do not refuse: it goes on as it began.
    """
    overrides = dict(overrides or {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        first = str(unknown[0])
        hint = (f"; --{first} is the command line's: {COMMAND_LINE_ONLY[first]}" if first in COMMAND_LINE_ONLY
                else did_you_mean(first, sorted(names)))
        raise UserError(f"unknown training option(s): {', '.join(map(str, unknown))}{hint}")
    sources: dict[str, str] = {}  # the options whose value comes from the config file: its errors name the file
    if isinstance(config, TrainConfig):
        base = config
    else:
        values = read_config_file(os.fspath(config)) if config is not None else {}
        sources = {name: os.fspath(config) for name in values if name not in overrides}
        run_dir = os.path.dirname(os.fspath(config)) if config is not None else None
        if run_dir is not None and os.path.basename(os.fspath(config)) == "config.json" \
                and os.path.isfile(os.path.join(run_dir, "stages.json")):
            # a run's configuration, replayed: one from before runs recorded their paths absolute names them
            # relative to the folder the run was trained in
            check_recorded_paths({name: values[name] for name in sources}, run_dir,
                                 fix="pass --data DIR (and --val-data DIR), which override the file's")
        # The recipe sets its options first; the file's values and then the options given win over it.
        recipe = overrides["recipe"] if "recipe" in overrides else values.get("recipe")
        overfit = overrides["overfit_batches"] if "overfit_batches" in overrides else values.get("overfit_batches", 0)
        preset = recipe_options(recipe, overfit)
        given = {**values, **overrides}
        if "lr" in preset and given.get("optimizer", preset.get("optimizer")) != preset.get("optimizer") \
                and "lr" not in given:
            # The recipe's rate was tuned for its optimizer (Muon's 0.24 would be five times SGD's default):
            # another optimizer starts from its own default rate.
            preset = {k: v for k, v in preset.items() if k != "lr"}
        base = TrainConfig(**{**preset, **values})
    if "model_options" in overrides:
        overrides["model_options"] = {**base.model_options, **overrides["model_options"]}
    cfg = with_data_defaults(dataclasses.replace(base, **overrides))  # config.json records what they became
    if cfg.report and not cfg.plots:  # the report embeds the plots, so they are written too: config.json says so
        cfg = dataclasses.replace(cfg, plots=True)
    check_config(cfg, sources, resumed=resumed)
    return cfg


def model_options_error(error: UserError, config: TrainConfig | str | os.PathLike | None,
                        overrides: Mapping[str, Any] | None = None) -> UserError:
    """``error``, the model's refusal of a run's ``model_options``, naming the config file and its key where the
    file set them ("--config run.yaml: model_options: convnet: head must be one of ..."), as check_config's errors
    name a file's options; as it is where they were given as options (``--model-opt``, keyword arguments)."""
    if config is None or isinstance(config, TrainConfig) or "model_options" in (overrides or {}):
        return error
    return UserError(f"--config {os.fspath(config)}: model_options: {error}")


def check_config(cfg: TrainConfig, sources: Mapping[str, str] | None = None, *, resumed: bool = False) -> None:
    """Raise a UserError naming the first option of ``cfg`` that is out of range. ``sources`` maps the options a
    config file set to its path: their error names the file and the key as written there ("--config run.yaml:
    epochs must be ..."), where the same value given as a flag or keyword is named as an option."""
    sources = sources or {}

    def refuse(name: str, problem: str, label: str | None = None) -> NoReturn:
        if name in sources:
            raise UserError(f"--config {sources[name]}: {name} {problem}")
        raise UserError(f"{label or '--' + name.replace('_', '-')} {problem}")

    for key in cfg.model_options:  # the factory would get them twice: create_model's own, set from these
        if key in MODEL_OPTIONS_SET_BY:
            refuse("model_options", f"{key}: this option is set by {MODEL_OPTIONS_SET_BY[key]}; use that instead",
                   "--model-opt")
    for f in dataclasses.fields(cfg):  # nan slips through the range checks below, inf through some: both fail mid-run
        value = getattr(cfg, f.name)
        if isinstance(value, float) and not -float("inf") < value < float("inf"):
            refuse(f.name, f"must be a finite number, got {value}", f.name)
    for name in ("epochs", "batch_size", "eval_batch_size"):
        if not isinstance(getattr(cfg, name), int) or getattr(cfg, name) < 1:
            refuse(name, f"must be a positive whole number, got {getattr(cfg, name)}", name.replace('_', ' '))
    if cfg.lr is not None and cfg.lr != "auto" and not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0):
        refuse("lr", f"must be positive or 'auto', got {cfg.lr}", "learning rate")
    if cfg.lr_backbone is not None and not (isinstance(cfg.lr_backbone, (int, float)) and cfg.lr_backbone > 0):
        # 0 would freeze the backbone unseen (--freeze backbone says it), a negative rate climb the loss
        refuse("lr_backbone", f"must be positive, got {cfg.lr_backbone}")
    if not 0 <= cfg.label_smoothing < 1:
        refuse("label_smoothing", f"must be in [0, 1), got {cfg.label_smoothing}", "label smoothing")
    for name, label in (("weight_decay", "weight decay"), ("warmup_epochs", "warm-up"), ("save_every", "--save-every")):
        if getattr(cfg, name) < 0:
            refuse(name, f"cannot be negative, got {getattr(cfg, name)}", label)
    if cfg.clip_grad is not None and not cfg.clip_grad > 0:
        refuse("clip_grad", f"must be positive, got {cfg.clip_grad}")
    if cfg.compile not in (False, True, *COMPILE_MODES):
        refuse("compile", f"takes no value or one of {', '.join(COMPILE_MODES)}, not '{cfg.compile}'")
    if cfg.augment_policy not in (None, *AUGMENT_POLICIES):
        refuse("augment_policy", f"must be one of {', '.join(AUGMENT_POLICIES)}, not '{cfg.augment_policy}'")
    if not 0 <= cfg.random_erasing <= 1:
        refuse("random_erasing", f"is a probability in [0, 1], got {cfg.random_erasing}")
    if cfg.threads is not None and (wrong := bad_threads(cfg.threads)) is not None:  # here, to name a config key
        refuse("threads", wrong)
    if cfg.crop_pad is not None and (not isinstance(cfg.crop_pad, int) or isinstance(cfg.crop_pad, bool)
                                     or cfg.crop_pad < 0):
        refuse("crop_pad", f"must be 0 (no translation) or a number of pixels, got {cfg.crop_pad}")
    if cfg.cutout < 0:
        refuse("cutout", f"must be 0 (off) or a side in pixels, got {cfg.cutout}")
    if cfg.class_weights not in (None, "auto"):
        refuse("class_weights", f"takes 'auto' (weights inversely proportional to class frequency), "
                                f"not '{cfg.class_weights}'")
    if cfg.decode not in DECODE_CHOICES:  # before minutes of data loading (BatchLoader checks it too, for its callers)
        refuse("decode", f"must be one of {', '.join(DECODE_CHOICES)}, not '{cfg.decode}'")
    if cfg.nan not in NAN_POLICIES:
        refuse("nan", f"must be one of {', '.join(NAN_POLICIES)}, not '{cfg.nan}'")
    for name in ("mixup", "cutmix", "min_delta"):
        if not isinstance(getattr(cfg, name), (int, float)) or not getattr(cfg, name) >= 0:
            refuse(name, f"must be a number, 0 or more, got {getattr(cfg, name)}")
    for name in ("accum_steps", "mix_off_epochs", "keep_best", "overfit_batches"):
        least = 1 if name == "accum_steps" else 0
        if not isinstance(getattr(cfg, name), int) or isinstance(getattr(cfg, name), bool) or getattr(cfg, name) < least:
            refuse(name, f"must be a whole number, {least} or more, got {getattr(cfg, name)}")
    if cfg.mix_off_epochs and not (cfg.mixup or cfg.cutmix):
        raise UserError("--mix-off-epochs switches mixing off for the last epochs; it needs --mixup or --cutmix")
    if cfg.mix_off_epochs and not cfg.stages and cfg.mix_off_epochs >= cfg.epochs:
        raise UserError(f"--mix-off-epochs {cfg.mix_off_epochs} leaves no epoch of the {cfg.epochs} to mix in; "
                        "make it smaller than --epochs")
    check_stage_options(cfg.stages, cfg.freeze, cfg.unfreeze)
    stages = plan_stages(cfg.stages, cfg.freeze, cfg.unfreeze, cfg.epochs, 1.0)  # --stages read and checked
    if cfg.warmup_epochs >= (shortest := min(stage.epochs for stage in stages)) and not resumed:
        # The rate would still be rising when the run (or a stage, which warms up anew) ends: it never reaches its
        # peak, nor decays. A usage error, not a warning in a log read after the run: timm lets such a run go
        # unremarked, and fastai's warm-up is a fraction of the run (pct_start), so there it cannot happen.
        span, fix = (f"a stage of --stages, {shortest} epoch(s) long (each stage warms up anew)", "lengthen the stage"
                     ) if cfg.stages else (f"the run's {cfg.epochs} epoch(s)", "raise --epochs")
        refuse("warmup_epochs", f"{cfg.warmup_epochs:g} is not shorter than {span}: the learning rate would still be "
                                f"rising when it ends, never reaching its peak; give it less than {shortest} (a few "
                                f"percent of the run is usual) or {fix}")
    if cfg.lr_backbone is not None and cfg.freeze == "backbone":  # the rate of layers that never train
        raise UserError(f"--lr-backbone {cfg.lr_backbone:g} sets the rate of the layers below the head, which "
                        "--freeze backbone keeps frozen: drop one of the two (--unfreeze NAMES,head trains some)")
    if cfg.lr_backbone is not None and cfg.optimizer == "muon":  # Muon sets its own rate for each kind of parameter
        raise UserError(f"--lr-backbone {cfg.lr_backbone:g} sets the rate of the layers below the head for sgd and "
                        "adamw; muon gives its filters, biases and head rates of its own and would ignore it: pass "
                        "--optimizer adamw (or sgd), or drop --lr-backbone")
    if cfg.ema is not None and not (isinstance(cfg.ema, (int, float)) and 0 < cfg.ema < 1):
        refuse("ema", f"takes the decay of the moving average, between 0 and 1 (e.g. 0.999), got {cfg.ema}")
    if cfg.early_stop is not None and (not isinstance(cfg.early_stop, int) or cfg.early_stop < 1):
        refuse("early_stop", f"takes the patience in epochs, a whole number of 1 or more, got {cfg.early_stop}")
    if cfg.monitor not in MONITORS:
        refuse("monitor", f"must be one of {', '.join(MONITORS)}, not '{cfg.monitor}'")
    # The choices the command line's parser checks, here for config files and Python callers, before any data loads
    for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS)):
        if getattr(cfg, name) not in choices:
            refuse(name, f"must be one of {', '.join(choices)}, not '{getattr(cfg, name)}'")
    if not 0 <= cfg.momentum < 1:  # a momentum of 1 or more never forgets a gradient: the steps grow without bound
        refuse("momentum", f"must be in [0, 1), got {cfg.momentum}")
    if cfg.val_split is not None and not 0 < cfg.val_split < 1:
        refuse("val_split", f"must be between 0 and 1 (exclusive), got {cfg.val_split}")
    if cfg.val_split is not None and cfg.val_data is not None:  # the validation images would come from val_data,
        # and the split would be dropped unseen: named where each was set, as a flag or a config file's key
        def named(name: str, value: Any) -> str:
            if name in sources:
                return f"{name} {value} (in --config {sources[name]})"
            return f"--{name.replace('_', '-')} {value}"

        raise UserError(f"{named('val_split', cfg.val_split)} splits --data, but with {named('val_data', cfg.val_data)} "
                        "the validation images are that folder: drop one of the two")
    if cfg.overfit_batches and cfg.val_data is not None:  # it validates on its training batches, on purpose
        def where(name: str) -> str:
            return f" (in --config {sources[name]})" if name in sources else ""

        raise UserError(f"--overfit-batches {cfg.overfit_batches}{where('overfit_batches')} validates on the very "
                        f"batches it trains on, so --val-data {cfg.val_data}{where('val_data')} would be ignored: "
                        "drop one of the two")
