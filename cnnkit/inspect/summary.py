"""``summary``: one row per layer — output shape, parameters, MACs, receptive field — and the totals.

MACs are multiply-accumulates for one image (FLOPs are about twice as many), counted for convolutions
(with groups), linear layers and matrix products (attention), the way torchvision counted the ``_ops`` of its
weights: resnet18 at 224x224 is 1.814 G. Container rows (a ResNet ``BasicBlock``, a ``Sequential``) hold
the totals of everything inside them, including functional operations in their ``forward`` such as the
residual ``+``; the totals at the bottom count every parameter once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from cnnkit.inspect.hooks import inspecting
from cnnkit.inspect.loading import load_model
from cnnkit.inspect.trace import TensorInfo, trace, whole_input_note
from cnnkit.models.registry import default_weights
from cnnkit.transfer import plan_stages, set_trainable, stage_at


@dataclass
class LayerInfo:
    name: str
    type: str
    depth: int  # 1 for the model's direct children
    output_shape: list[int] | None  # C x H x W (or features), without the batch dimension
    params: int  # every parameter inside the layer
    trainable_params: int
    macs: int  # of all its calls, for one image
    rf: int | None  # receptive field, input pixels (the larger of the two axes)
    jump: int | float | None  # input pixels between neighbouring units
    start: int | float | None  # centre of the first unit's field, input pixels
    whole: bool = False  # also sees every input pixel through a global operation (pooling, SE gate, attention)
    calls: int = 1


@dataclass
class Summary:
    model: str
    input_size: list[int]  # C, H, W
    layers: list[LayerInfo]
    total_params: int
    trainable_params: int
    frozen_params: int
    unused_params: int  # in layers this forward pass did not call (Inception's auxiliary head in eval mode)
    total_macs: int
    activation_bytes: int  # every tensor the forward pass creates for one image
    param_bytes: int
    output_shape: list[int]
    unknown_ops: list[str] = field(default_factory=list)  # ops without a receptive-field rule (largest field kept)
    trained: str | None = None  # a run that trained part of the model: what its last stage trained
    # a torchvision model name whose count differs from the one its default weights list, and why
    published: str | None = None

    def table(self, depth: int | None = None) -> str:
        """The summary as text: a row per layer (down to ``depth``), then the totals."""
        return format_summary(self, depth)


def called(type_name: str, calls: int) -> str:
    """A layer table's Type for a module the forward pass calls ``calls`` times: "ReLU x2" where that is more than
    once. Its row stands at its first call and shows that call's output; the later calls' outputs are not in
    the table (a BasicBlock's second ReLU call gives the block's own output, on the block's row)."""
    return f"{type_name} x{calls}" if calls > 1 else type_name


def field_numbers(info: TensorInfo | None) -> tuple[int | None, Any, Any, bool]:
    """(rf, jump, start, whole) of the larger axis of a traced tensor, or Nones for one without a field."""
    if info is None:
        return None, None, None, False
    axis = max(info.fields, key=lambda a: info.fields[a].rf)
    rf, jump, start = info.fields[axis].as_numbers()
    return rf, jump, start, any(f.whole for f in info.fields.values())


def _count(params: list[nn.Parameter]) -> tuple[int, int]:
    unique = {id(p): p for p in params}.values()
    return sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad)


def summary(model_or_run: str | nn.Module, input_size: Any = None, num_classes: int | None = None,
            **options: Any) -> Summary:
    """Summarise a model name, run folder, checkpoint or ``nn.Module`` at ``input_size`` (C H W, one number for
    a square, or None for the model's own size). The model is left as it was (modes, BatchNorm statistics)."""
    target = load_model(model_or_run, input_size, num_classes, meta=True, **options)
    model = target.model
    trained = _as_trained(model, target.config, target.epoch) if target.config is not None else None
    with inspecting(model):
        t = trace(model, target.input_shape)
    rows = []
    for layer in t.layers:
        params, trainable = _count(list(layer.module.parameters()))
        rf, jump, start, whole = field_numbers(layer.first_info)
        rows.append(LayerInfo(layer.name, type(layer.module).__name__, layer.depth, layer.first_shape, params,
                              trainable, layer.macs, rf, jump, start, whole, layer.calls))
    total, trainable = _count(list(model.parameters()))
    used = {id(p) for layer in t.layers for p in layer.module.parameters()}
    own = {id(p) for p in model.parameters(recurse=False)}  # the root's own, like ViT's class token
    unused = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()
                 if id(p) not in used and id(p) not in own)
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    published = None
    if isinstance(model_or_run, str) and target.classes is None and num_classes in (None, 1000) \
            and target.input_shape[0] == 3:
        published = _published_count(model_or_run, total, options)
    return Summary(target.label, list(target.input_shape), rows, total, trainable, total - trainable, unused,
                   t.macs, t.activation_bytes, param_bytes, t.output_shape, t.unknown_ops, trained, published)


def _published_count(name: str, total: int, options: dict[str, Any]) -> str | None:
    """For a torchvision model built as its weights were (1000 classes, RGB) whose parameter count is not the
    one the weights list, what they list and how cnnkit builds it: inception_v3's weights count the auxiliary
    classifier, which cnnkit leaves out unless told ``aux_logits=true``. None where the counts agree."""
    weights = default_weights(name)
    listed = weights.meta.get("num_params") if weights is not None else None
    if listed is None or listed == total:
        return None
    from cnnkit.models.torchvision import default_options

    built = ", ".join(f"{k}={v}" for k, v in default_options(name).items() if k not in options)
    how = f"; cnnkit builds {name} with {built} (--model-opt changes that)" if built else ""
    return f"torchvision's {name} weights ({weights.name}) list {listed:,} parameters{how}"


def _as_trained(model: nn.Module, config: dict[str, Any], epoch: int | None) -> str | None:
    """A checkpoint's freshly loaded ``model`` with the parameters that the stage of its run (``--freeze``,
    ``--unfreeze``, ``--stages``) which trained its ``epoch`` trained as the trainable ones, the others frozen, as
    training left them; what that stage trained, or None when it trained everything."""
    plan = plan_stages(config.get("stages"), config.get("freeze"), config.get("unfreeze"), 1, 1.0)
    index = stage_at(plan, epoch or 1)  # a best.pt of stage 1 is no later stage's
    modules = plan[index].modules
    if modules is None or "all" in modules:
        return None
    set_trainable(model, modules)
    which = f"the run's stage {index + 1} of {len(plan)}" if len(plan) > 1 else "the run"
    return f"as {which} trained them: {'+'.join(modules)}"


def human(n: float, unit: str = "") -> str:
    """1814073344 -> '1.81 G' (decimal prefixes)."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {prefix}{unit}"
    return f"{n:g} {unit}".strip()


def format_summary(s: Summary, depth: int | None = None) -> str:
    rows = [r for r in s.layers if depth is None or r.depth <= depth]
    header = ("Layer", "Type", "Output", "Params", "Trainable", "MACs", "RF", "Jump")
    lines = []
    for r in rows:
        shape = "x".join(map(str, r.output_shape)) if r.output_shape else "-"
        rf = "-" if r.rf is None else f"{r.rf}{'*' if r.whole else ''}"
        lines.append(("  " * (r.depth - 1) + r.name, called(r.type, r.calls), shape, f"{r.params:,}",
                      f"{r.trainable_params:,}", human(r.macs) if r.macs else "-", rf,
                      "-" if r.jump is None else f"{r.jump:g}"))
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i < 3 else '>'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*header), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [fmt.format(*line) for line in lines]
    out.append("-" * len(out[1]))
    size = "x".join(map(str, s.input_size))
    trained = f", {s.trained}" if s.trained else ""
    out.append(f"Parameters: {s.total_params:,} (trainable {s.trainable_params:,}, frozen {s.frozen_params:,}{trained})")
    if s.unused_params:
        out.append(f"  of which {s.unused_params:,} are in layers this forward pass does not use")
    if s.published:
        out.append(f"  {s.published}")
    out.append(f"MACs: {human(s.total_macs)} multiply-accumulates for one {size} image (FLOPs ~ 2 x MACs)")
    out.append(f"Activation memory: {human(s.activation_bytes, 'B')} for one image; "
               f"parameter memory: {human(s.param_bytes, 'B')}")
    if any(r.whole for r in rows):
        out.append(whole_input_note(s.input_size))
    return "\n".join(out)
