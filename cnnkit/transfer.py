"""Transfer learning: pretrained and saved weights, freezing, and staged fine-tuning.

Most people with their own images should not train from scratch: they start from a pretrained network,
train its new head, then unfreeze the last stage at a lower learning rate. The pieces:
torchvision's weights and the preprocessing they expect (``cnnkit.models.pretrained``, below the data and
training code that use them), ``load_weights`` (a state dict, a torchvision file, a .safetensors file or a
cnnkit run), ``set_trainable`` / ``freeze_batchnorm_stats`` and ``plan_stages`` (the stages as written: ``cnnkit.stages``).
"""

from __future__ import annotations

import os
import sys
from typing import IO, Any

import torch
import torch.nn as nn

from cnnkit.checkpoint import is_torchscript, load_torch_file, read_payload, resolve_checkpoint_path
from cnnkit.choices import is_format
from cnnkit.errors import CheckpointError, UserError
from cnnkit.metadata import payload_from_metadata
from cnnkit.stages import Stage, parse_stages
from cnnkit.models.heads import find_head, reset_head


def _read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, str]:
    """(state dict, cnnkit checkpoint payload or None) from any weights file cnnkit understands, or from a run
    folder's checkpoint (``resolve_checkpoint_path``: best.pt, else last.pt), whose path comes back third: the
    file read."""
    # A folder (a run) or a missing path first, whatever its name: safetensors calls both "cannot read".
    if os.path.isdir(path):
        path = resolve_checkpoint_path(path)
        payload = read_payload(path)
        return payload["state_dict"], payload, path
    if not os.path.isfile(path):
        raise UserError(f"weights file {path} does not exist")
    if is_format(path, "safetensors"):
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}
        except Exception as e:
            raise CheckpointError(f"cannot read {path} as safetensors ({str(e).splitlines()[0][:120]})") from None
        # cnnkit's own export describes its model, classes and normalisation, as its checkpoint does
        cnnkit_export = "cnnkit_checkpoint" in metadata
        return state, {**payload_from_metadata(metadata, path), "state_dict": state} if cnnkit_export else None, path
    instead = "a state dict (.pt/.pth), a .safetensors file or a cnnkit run"
    if is_torchscript(path):
        raise UserError(f"weights file {path} is a TorchScript export, not weights; pass {instead}")
    # One read, then decide what the file holds. Other kinds of file and refused pickles get their own line: what
    # is left is a file torch cannot read, most often one cut short (a download or copy that stopped), whose error
    # says only "[Errno 22] Invalid argument".
    state = load_torch_file(path, f"weights file {path}", "weights", instead,
                            lambda why: f"weights file {path} is damaged, truncated or not a PyTorch file ({why}); "
                                        f"restore or download it again, or pass {instead}")
    if isinstance(state, dict) and "cnnkit_checkpoint" in state:
        return state["state_dict"], state, path
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a Lightning-style or training checkpoint wrapping the weights
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return state, None, path


def load_weights(model: nn.Module, path: str, log: IO[str] | None = None,
                 classes: list[str] | None = None) -> dict[str, Any] | None:
    """Load ``path`` into ``model``: strictly, except the classifier head, which starts fresh (see
    ``reset_head``) when its shape does not fit the new number of classes, when the file's head is built
    differently (say, an MLP projector before the classifier) or missing (a backbone-only file), or when
    ``path`` is a cnnkit checkpoint whose class names differ from ``classes`` (the new data's): a head trained
    on airplane..deer says nothing about dog..truck, even with as many outputs. Prints what was loaded and
    skipped, naming the file read (a run folder's best.pt or last.pt); returns the cnnkit checkpoint payload when
    ``path`` was one (its normalisation then applies)."""
    state, payload, path = _read_weights(path)
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    head_name = find_head(model)[0]
    own = model.state_dict()
    other_classes = bool(payload and classes is not None and list(payload["classes"]) != list(classes))
    file_head = [k for k in state if k.startswith(head_name + ".")]
    own_head = [k for k in own if k.startswith(head_name + ".")]
    other_structure = set(file_head) != set(own_head)  # a projector before the classifier, or no head at all
    # A head that read other stages (head_from) can have the same shape and still mean nothing here.
    file_stages = ((payload or {}).get("model") or {}).get("options", {}).get("head_from")
    if file_stages is not None:  # the file held a MultiStageResNet: torchvision is loaded already
        from cnnkit.models.torchvision import parse_stages_option

        file_stages = parse_stages_option(file_stages)
    other_features = (file_stages or ()) != getattr(model, "head_from", ())
    fresh = (other_classes or other_structure or other_features
             or any(state[k].shape != own[k].shape for k in file_head))
    skipped = file_head if fresh else []
    for k in skipped:
        del state[k]
    missing = [k for k in own if k not in state and not (fresh and k in own_head)]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    # A flatten head's first linear layer is sized for the input size: a run trained at another size says so.
    trained, built = (payload or {}).get("input_size"), (getattr(model, "cnnkit_config", None) or {}).get("input_size")
    size_fix = (f"; {path} was trained on {trained}x{trained} images and this model is built for {built}x{built}: "
                f"pass --input-size {trained}" if mismatched and trained and built and trained != built else "")
    # A cnnkit run or export names its model: another one here is the likelier mistake than a damaged file.
    built_config = getattr(model, "cnnkit_config", None) or {}
    file_model, built_model = ((payload or {}).get("model") or {}).get("name"), built_config.get("name")
    if (missing or unexpected or mismatched) and file_model and built_model and file_model != built_model:
        size_fix += f"; {path} holds a {file_model} and this model is a {built_model}: pass --model {file_model}"
    file_channels, built_channels = (payload or {}).get("channels"), built_config.get("in_channels")
    if mismatched and file_channels and built_channels and file_channels != built_channels:
        size_fix += (f"; {path} was trained on {file_channels}-channel images and this model takes {built_channels}: "
                     f"pass --channels {file_channels}")
    if not size_fix:
        size_fix = (f"; pass weights saved from {'a ' + built_model if built_model else 'this model'} at these "
                    "options, or leave out --weights")
    if missing or unexpected or mismatched:
        # A usage error (exit code 2), not a damaged file: the file reads fine, and the command line pairs it with
        # a model of another shape; the fix is another option.
        raise UserError(
            f"weights in {path} do not fit the model: "
            + "; ".join(part for part in (
                f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "",
                f"unexpected {', '.join(unexpected[:4])}{' ...' if len(unexpected) > 4 else ''}" if unexpected else "",
                f"shape mismatch {'; '.join(mismatched[:3])}" if mismatched else "") if part)
            + size_fix
        )
    model.load_state_dict(state, strict=False)
    if fresh:
        reset_head(model.get_submodule(head_name))
        why = (_other_classes(list(payload["classes"]), list(classes)) if other_classes else
               "the file has no head" if not file_head else
               "the file's head is built differently" if other_structure else
               "the file's head read other stages (head_from)" if other_features else
               "its shape does not fit the new number of classes")
        shown = f" ({', '.join(skipped[:6])}{' ...' if len(skipped) > 6 else ''})" if skipped else ""
    print(f"cnnkit: loaded {len(state)} tensors from {path}"
          + (f"; the head {head_name}{shown} starts fresh, at zero: {why}" if fresh else ""), file=log or sys.stdout)
    return payload


def _other_classes(trained: list[str], here: list[str]) -> str:
    """Why a head trained on the classes ``trained`` does not fit ``here``: its outputs are numbered, so a class
    at another number, or a set with other classes in it, would read them wrongly."""
    if sorted(trained) == sorted(here):
        return "it was trained on the same classes in another order"
    common = len(set(trained) & set(here))
    return f"it was trained on other classes ({len(trained)} in the file, {len(here)} here, {common} in common)"


def trainable_modules(model: nn.Module, names: list[str] | None) -> list[str]:
    """The qualified module names ``names`` asks to train (see ``set_trainable``; [""] for the whole model),
    checked: a UserError names a module the model lacks or never runs."""
    never_run = tuple(getattr(model, "unused_stages", ()))
    asked = [n for n in names or [] if n.split(".")[0] in never_run]
    if asked:
        raise UserError(f"{', '.join(asked)} never runs: the head reads up to {model.head_from[-1]} (head_from); "
                        f"add {asked[0].split('.')[0]} to head_from to train it")
    if names is None or "all" in names:
        return [""]
    modules = dict(model.named_modules())
    head = find_head(model)[0]
    wanted = [head if n == "head" else n for n in names]
    unknown = [n for n in wanted if n not in modules]
    if unknown:
        top = ", ".join(n for n, _ in model.named_children())
        raise UserError(f"no module named {', '.join(unknown)} in this model; its top-level modules are {top}")
    return wanted


def is_within(name: str, modules: list[str]) -> bool:
    """Whether the parameter or module ``name`` lies in one of ``modules`` (qualified names; "" is the model)."""
    return any(m == "" or name == m or name.startswith(m + ".") for m in modules)


def check_head_trains(model: nn.Module, stage: Stage, option: str) -> None:
    """A UserError when ``stage`` leaves the head frozen while it is all zero, as a new head starts
    (``reset_head``): its zero weights pass no gradient to the layers below, so nothing at all would train.
    ``option``: how the user chose the stage's modules, for the message."""
    name, head = find_head(model)
    wanted = trainable_modules(model, stage.modules)
    if is_within(name, wanted) or bool(head.weight.detach().any()):
        return
    raise UserError(f"{option} leaves the classifier head {name} frozen, but it is new for these classes and starts "
                    f"at zero, which passes no gradient back: nothing would train; train it too, adding {name} "
                    "to the modules (or 'head')")


def first_epochs(stages: list[Stage]) -> list[int]:
    """Each stage's first epoch (1-based)."""
    return [1 + sum(s.epochs for s in stages[:i]) for i in range(len(stages))]


def stage_at(stages: list[Stage], epoch: int) -> int:
    """The index of the stage that trains ``epoch`` (1-based; the last stage for any epoch past the plan)."""
    return max((i for i, first in enumerate(first_epochs(stages)) if first <= epoch), default=0)


def set_trainable(model: nn.Module, names: list[str] | None) -> list[str]:
    """Train only the modules named in ``names`` (qualified names such as ``layer4`` or ``classifier.6``;
    ``head`` means the classifier head, ``all`` everything); ``None`` trains everything.
    Returns the names of the parameters left trainable. Modules the model never runs (``unused_stages`` of a
    ResNet whose head reads earlier stages, ``head_from``) never train: they would get no gradient, and
    DistributedDataParallel stops on parameters that get none."""
    wanted = trainable_modules(model, names)
    never_run = tuple(getattr(model, "unused_stages", ()))
    trainable = []
    for name, p in model.named_parameters():
        p.requires_grad = is_within(name, wanted) and name.split(".")[0] not in never_run
        if p.requires_grad:
            trainable.append(name)
    return trainable


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put BatchNorm layers whose parameters are all frozen in eval mode, so that their running statistics
    stay those of the pretrained network instead of drifting towards the new data's (a common silent bug)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = [p for p in (m.weight, m.bias) if p is not None]
            if params and not any(p.requires_grad for p in params):
                m.eval()


def check_stage_options(stages: str | None, freeze: str | None, unfreeze: str | None) -> None:
    """Refuse options of which ``plan_stages`` would drop one unseen: ``--stages`` beside ``--freeze`` or
    ``--unfreeze``, or those two together. For options a user gives now; a run's recorded configuration from
    before this check is planned as it trained (``--stages`` first, then ``--unfreeze``)."""
    if stages and (freeze or unfreeze):
        raise UserError(f"--stages sets what trains in each stage, so {'--freeze' if freeze else '--unfreeze'} "
                        "would be ignored; drop it, or make it a stage of --stages")
    if freeze and unfreeze:
        raise UserError(f"--freeze backbone trains only the head and --unfreeze {unfreeze} only those modules: pass "
                        "one of the two (--unfreeze NAMES,head trains those modules and the head)")


def plan_stages(stages: str | None, freeze: str | None, unfreeze: str | None, epochs: int, lr: float) -> list[Stage]:
    """The run's stages: ``--stages`` as written, or one stage from ``--freeze``/``--unfreeze`` and ``--epochs``
    (``check_stage_options`` refuses the combinations of which one would be dropped)."""
    if stages:
        return parse_stages(stages)
    if freeze not in (None, "backbone"):
        raise UserError(f"--freeze takes 'backbone' (train only the head), not '{freeze}'; "
                        "use --unfreeze NAMES to choose what trains")
    modules = ["head"] if freeze == "backbone" else None
    if unfreeze:
        modules = [n.strip() for n in unfreeze.split(",") if n.strip()]
    return [Stage(modules=modules, epochs=epochs, lr=lr)]
