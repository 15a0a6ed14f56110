"""``audit``: which modules are in train or eval mode, and which BatchNorm layers a training step would update.

The silent bug this looks for: parameters frozen with ``requires_grad = False`` inside a model put in train
mode with ``model.train()``. The optimizer leaves such a BatchNorm's weight and bias alone, but every forward
pass in train mode still moves its running mean and variance towards the new data's, so a "frozen" backbone
changes anyway and evaluates differently from the network it was taken from.

- An ``nn.Module`` is audited as it is now (what a forward pass would do in its current state).
- A run folder or checkpoint is audited as cnnkit's training treats it: for each stage of the run's
  ``--freeze`` / ``--unfreeze`` / ``--stages`` plan, the parameters that stage trains, then ``model.train()``
  and frozen BatchNorm layers put back in eval mode, as ``train_one_epoch`` does.
- A model name is built (random weights) and audited the same way, with the plan given as options.
``plain_train=True`` shows what a hand-written loop's bare ``model.train()`` would do instead.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from cnnkit.choices import is_model_file
from cnnkit.errors import UserError
from cnnkit.modes import preserve_modes
from cnnkit.transfer import Stage, check_stage_options, freeze_batchnorm_stats, plan_stages, set_trainable


@dataclass
class ModuleMode:
    name: str  # "" is the model itself
    type: str
    training: bool


@dataclass
class BatchNormState:
    name: str
    type: str
    training: bool
    tracks_stats: bool  # track_running_stats: has running statistics at all
    frozen: bool  # has weight/bias and none of them requires a gradient
    updates_stats: bool  # a forward pass in this state moves running_mean / running_var


@dataclass
class AuditView:
    """The model in one state: as given, or as one training stage sets it up."""

    label: str
    train_modules: int
    eval_modules: int
    modes: list[ModuleMode]  # the model itself, then each module whose mode differs from its parent's
    batchnorms: list[BatchNormState]
    trainable_params: int
    frozen_params: int
    warnings: list[str] = field(default_factory=list)


@dataclass
class Audit:
    model: str
    views: list[AuditView]
    warnings: list[str]  # every view's, with the view's label in front

    def table(self) -> str:
        """The audit as text, as ``cnnkit audit`` prints it."""
        return format_audit(self)


def inspect_modes(model: nn.Module, label: str = "as given") -> AuditView:
    """The modes, BatchNorm states and frozen-but-updating warnings of ``model`` as it is now."""
    modules = dict(model.named_modules())
    modes = []
    for name, m in modules.items():
        parent = modules[name.rpartition(".")[0]] if name else None
        if parent is None or parent.training != m.training:
            modes.append(ModuleMode(name, type(m).__name__, m.training))
    batchnorms = []
    for name, m in modules.items():
        if not isinstance(m, _BatchNorm):
            continue
        params = [p for p in (m.weight, m.bias) if p is not None]
        frozen = bool(params) and not any(p.requires_grad for p in params)
        # momentum 0 keeps the running averages where they are (only the batch counter moves).
        updates = m.training and m.track_running_stats and m.momentum != 0
        batchnorms.append(BatchNormState(name, type(m).__name__, m.training, m.track_running_stats, frozen, updates))
    drifting = [b.name for b in batchnorms if b.frozen and b.updates_stats]
    warnings = []
    if drifting:
        names = ", ".join(drifting[:4]) + (f" and {len(drifting) - 4} more" if len(drifting) > 4 else "")
        warnings.append(f"{len(drifting)} frozen BatchNorm layer(s) (requires_grad=False) are in train mode, so "
                        f"every training step still moves their running statistics: {names}; call .eval() on "
                        "them after model.train() (cnnkit train does this for frozen BatchNorm layers)")
    unique = {id(p): p for p in model.parameters()}.values()
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    total = sum(p.numel() for p in unique)
    training = sum(m.training for m in modules.values())
    return AuditView(label, training, len(modules) - training, modes, batchnorms, trainable, total - trainable,
                     warnings)


@contextlib.contextmanager
def _restoring_requires_grad(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def training_views(model: nn.Module, stages: list[Stage], plain_train: bool = False,
                   show_epochs: bool = True) -> list[AuditView]:
    """One view per stage: the stage's parameters trainable, then the modes a training step runs in.
    The model's modes, BatchNorm statistics and ``requires_grad`` flags are restored afterwards."""
    views = []
    first = 1
    with preserve_modes(model), _restoring_requires_grad(model):
        for i, stage in enumerate(stages):
            set_trainable(model, stage.modules)
            model.train()
            if not plain_train:
                freeze_batchnorm_stats(model)  # as train_one_epoch does
            what = "everything" if stage.modules is None else "+".join(stage.modules)
            epochs = f"epoch {first}" if stage.epochs == 1 else f"epochs {first}-{first + stage.epochs - 1}"
            prefix = f"stage {i + 1} of {len(stages)}, " if len(stages) > 1 else ""
            how = "plain model.train()" if plain_train else "cnnkit train"
            when = f"{prefix}{epochs}" if show_epochs or len(stages) > 1 else "training"
            views.append(inspect_modes(model, f"{when}: trains {what} ({how})"))
            first += stage.epochs
    return views


def audit(model_or_run: str | nn.Module, freeze: str | None = None, unfreeze: str | None = None,
          stages: str | None = None, plain_train: bool = False, **options: Any) -> Audit:
    """Audit a module as it is, or a run folder, checkpoint or model name as training would set it up (see the
    module doc). ``freeze``, ``unfreeze``, ``stages`` are ``cnnkit train``'s options; for a run they replace the
    run's own plan. ``options`` go to a model name's factory, as ``cnnkit train --model-opt`` does. Nothing about
    the model is changed."""
    if options and (not isinstance(model_or_run, str) or os.path.exists(model_or_run)):
        raise UserError("model options apply to model names, not to a module, run folder or checkpoint, which "
                        "hold their model already")
    plan_given = any(x is not None for x in (freeze, unfreeze, stages))
    check_stage_options(stages, freeze, unfreeze)  # the options given; a run's own are planned as it trained
    if isinstance(model_or_run, nn.Module):
        label = getattr(model_or_run, "cnnkit_config", {}).get("name", type(model_or_run).__name__)
        if not plan_given and not plain_train:
            views = [inspect_modes(model_or_run)]
        else:
            views = training_views(model_or_run, plan_stages(stages, freeze, unfreeze, 1, 1.0), plain_train, False)
        return _result(label, views)
    if os.path.exists(model_or_run):
        from cnnkit.checkpoint import load_checkpoint

        ckpt = load_checkpoint(model_or_run)
        model, cfg, label = ckpt.model, ckpt.config or {}, ckpt.path
        if not plan_given:
            freeze, unfreeze, stages = cfg.get("freeze"), cfg.get("unfreeze"), cfg.get("stages")
        epochs = cfg.get("epochs")
    elif os.sep in model_or_run or is_model_file(model_or_run):
        raise UserError(f"{model_or_run} does not exist; pass a run folder, a checkpoint file or a model name")
    else:
        from cnnkit.models.registry import create_model

        model, label, epochs = create_model(model_or_run, **options), model_or_run, None
    plan = plan_stages(stages, freeze, unfreeze, epochs or 1, 1.0)
    return _result(label, training_views(model, plan, plain_train, show_epochs=epochs is not None))


def _result(label: str, views: list[AuditView]) -> Audit:
    warnings = [f"{v.label}: {w}" if len(views) > 1 else w for v in views for w in v.warnings]
    return Audit(label, views, warnings)


def format_audit(a: Audit) -> str:
    """The audit as text: per view, the modes (the model's, then each module that differs from its parent),
    the BatchNorm layers, and the warnings."""
    lines = [f"audit of {a.model}"]
    for v in a.views:
        updating = sum(b.updates_stats for b in v.batchnorms)
        lines += ["", f"{v.label}",
                  f"  {v.train_modules} modules in train mode, {v.eval_modules} in eval mode; parameters: "
                  f"{v.trainable_params:,} trainable, {v.frozen_params:,} frozen"]
        bn_types = {b.type for b in v.batchnorms}
        width = max([len(m.name) for m in v.modes] + [len(b.name) for b in v.batchnorms] + [7])
        for m in v.modes:
            if m.type in bn_types:
                continue  # in the BatchNorm table below
            lines.append(f"    {m.name or '(model)':<{width}}  {'train' if m.training else 'eval':<5}  {m.type}")
        if v.batchnorms:
            lines.append(f"  BatchNorm layers: {len(v.batchnorms)}, of which {updating} update their running "
                         "statistics in a training step")
            for b in v.batchnorms:
                state = "updates statistics" if b.updates_stats else "statistics fixed"
                lines.append(f"    {b.name:<{width}}  {'train' if b.training else 'eval':<5}  "
                             f"{'frozen' if b.frozen else 'trains':<6}  {state}"
                             + ("" if b.tracks_stats else " (no running statistics)"))
        else:
            lines.append("  no BatchNorm layers")
        lines += [f"  warning: {w}" for w in v.warnings]
    return "\n".join(lines)

