"""One instrumented forward pass: every layer's output shape, MACs, allocated bytes and receptive field.

Forward pre/post hooks on every module say which layer is running; a ``TorchDispatchMode`` sees every aten
operation the forward pass performs, including the functional ones written in ``forward`` (the ``+`` of a
residual connection, ``torch.cat`` in DenseNet and Inception, ``F.max_pool2d``, ``torch.flatten``). For
each operation it

- counts multiply-accumulates with PyTorch's own flop formulas (``torch.utils.flop_counter``: convolutions
  with groups, matrix products, attention), halved, because a MAC is one multiply and one add — the unit
  torchvision's ``_ops`` metadata uses;
- adds the bytes of each new tensor (views and in-place results share memory and are not counted again);
- carries the receptive field (``shapes.Field``) of its inputs to its output: through convolution and
  pooling windows, and as the largest over inputs where branches merge (add, multiply, concatenate).

The pass runs on the meta device: tensors there have shapes but no data, so nothing is computed, the real
weights are never touched, and tracing ``vit_h_14`` at 518 px takes a second. A model whose ``forward``
needs real values (``.item()``, data-dependent branches) is traced again with real tensors.

Receptive fields are tracked per spatial axis (``h``, ``w``). Each tensor also records which of its
dimensions hold the channels (``c``) and which the positions along each axis (``tags``), so a ``Linear``
applied at every position (Swin, ConvNeXt) leaves the field alone, while a ``Linear`` after ``flatten``, a
global mean, or attention across positions makes it global: every unit then sees the whole input. The
field of windowed attention (Swin, MaxViT) is overstated as global.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map_only
from torch.utils.flop_counter import flop_registry
from torch.utils.weak import WeakIdKeyDictionary

from cnnkit.errors import UserError
from cnnkit.inspect.shapes import Field
from cnnkit.models.sizes import SIZE_ERRORS, first_line, size_error, size_fix


def whole_input_note(input_size: Sequence[int]) -> str:
    """The footnote of a receptive field marked "*", for an input of ``input_size`` (C, H, W): which layers make a
    unit see every pixel (simple_cnn's flattened-map linear layer as much as a global pool), and why the number may
    be larger than the image (simple_cnn's classifier: 46* on 32 px, ``Field.spanning``'s 22 + 3 x 8)."""
    size = "x".join(map(str, input_size[-2:]))
    return (f"RF*: the layer sees every pixel of the {size} input, as it or a layer before it mixes all positions (a "
            "linear layer on the flattened map, global pooling, a gate or attention); the number counts the "
            "convolution and pooling windows alone (all positions' together after a flatten or a global pool), the "
            "padding beyond the image's edges included, so it can exceed the image")


AXES = ("h", "w")
NO_TAGS: frozenset[str] = frozenset()


def _axis(tag: frozenset[str]) -> str | None:
    """The spatial axis a dimension holds, if it holds exactly one and nothing else."""
    return next(iter(tag)) if len(tag) == 1 and next(iter(tag)) in AXES else None


@dataclass
class TensorInfo:
    """What the trace knows about one tensor derived from the input."""

    fields: dict[str, Field]  # per spatial axis
    sizes: dict[str, int]  # units along each axis
    tags: tuple[frozenset[str], ...]  # per dimension: the spatial axes it holds

    def spatial(self, shape: torch.Size) -> bool:
        """Whether the tensor still has a spatial layout: a dimension of positions (not mixed with channels,
        as after ``flatten``) with more than one of them, or a single position in a network no global operation
        has reached yet (one that downsamples to 1x1 before its head, unlike global pooling's output). After a
        squeeze-and-excitation gate every field is global, and a 1x1 map there does not count."""
        positions = [n for tag, n in zip(self.tags, shape) if tag and tag <= set(AXES)]
        return any(n > 1 for n in positions) or bool(positions) and not any(f.whole for f in self.fields.values())


@dataclass
class TracedLayer:
    """One module of the model, as the forward pass used it (the last call's output; MACs of all calls). A module
    called more than once (torchvision's BasicBlock calls its one ``relu`` before and after the residual sum) also
    keeps its first call's output, which is what a table that lists it at its first call shows."""

    name: str
    module: nn.Module
    depth: int
    first: int  # when its first call started (the order to list layers in)
    done: int = 0  # when its last call ended
    calls: int = 0
    macs: int = 0
    bytes: int = 0
    output_shape: list[int] | None = None  # without the batch dimension
    info: TensorInfo | None = None
    first_shape: list[int] | None = None  # the first call's output_shape and info
    first_info: TensorInfo | None = None
    input_info: TensorInfo | None = None  # the first call's input's (the same object as the output info of the
    # layer that made that tensor, so which layer feeds which can be told)


@dataclass
class Trace:
    layers: list[TracedLayer]
    macs: int
    activation_bytes: int
    input_shape: tuple[int, int, int]
    output_info: TensorInfo | None
    output_shape: list[int]
    unknown_ops: list[str] = field(default_factory=list)


def _to_meta(t: torch.Tensor) -> torch.Tensor:
    return t if t.is_meta else t.to("meta")


def _ints(value: Any, n: int, default: Any = None) -> list[int]:
    """A kernel/stride/padding argument (an int or a list of 1 or n ints; empty for 'default') as n ints."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        value = default
    if isinstance(value, int):
        return [value] * n
    value = list(value)
    return value * n if len(value) == 1 else value


def _span_axes(info: TensorInfo, axes: set[str]) -> dict[str, Field]:
    """Fields after an operation that mixes every position of ``axes``."""
    fields = dict(info.fields)
    for a in axes & set(AXES):
        fields[a] = fields[a].spanning(info.sizes[a])
    return fields


def _sizes_for(tags: tuple[frozenset[str], ...], shape: torch.Size, inherited: dict[str, int]) -> dict[str, int]:
    """Units along each axis: the size of the one dimension that holds the axis alone, else as before (a
    dimension split into windows does not change how many positions there are)."""
    sizes = dict(inherited)
    for a in AXES:
        holders = [(tag, n) for tag, n in zip(tags, shape) if a in tag]
        if len(holders) == 1 and _axis(holders[0][0]) == a:
            sizes[a] = holders[0][1]
    return sizes


def _merge(inputs: list[tuple[torch.Tensor, TensorInfo]], out: torch.Tensor,
           tags: tuple[frozenset[str], ...]) -> TensorInfo:
    """Where branches meet: per axis the largest field; jump and start from an input that has the output's
    positions along the axis (not one broadcast over it, like a squeeze-and-excitation gate)."""
    fields, sizes = {}, {}
    for a in AXES:
        full = [i for t, i in inputs if any(a in tag and n > 1 for tag, n in zip(i.tags, t.shape))]
        base = max(full or [i for _, i in inputs], key=lambda i: i.fields[a].rf)
        f = base.fields[a]
        fields[a] = Field(f.rf, f.jump, f.start, any(i.fields[a].whole for _, i in inputs))
        sizes[a] = base.sizes[a]
    return TensorInfo(fields, _sizes_for(tags, out.shape, sizes), tags)


def _broadcast_tags(inputs: list[tuple[torch.Tensor, TensorInfo]], out: torch.Tensor):
    """Tags of an elementwise result (inputs aligned from the right), or None when shapes do not broadcast."""
    n = out.dim()
    tags = [set() for _ in range(n)]
    for t, info in inputs:
        offset = n - t.dim()
        if offset < 0 or len(info.tags) != t.dim():
            return None
        for d, size in enumerate(t.shape):
            if size == out.shape[d + offset]:
                tags[d + offset] |= info.tags[d]
            elif size != 1:
                return None
    return tuple(frozenset(t) for t in tags)


def _reshape_tags(in_shape: torch.Size, in_tags: tuple, out_shape: torch.Size) -> tuple[frozenset[str], ...]:
    """Tags after view/reshape: dimensions are matched in blocks of equal size products; a block's output
    dimensions hold every axis its input dimensions held."""
    out: list[frozenset[str]] = [NO_TAGS] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        i0, j0, pi, pj = i, j, 1, 1
        if i < len(in_shape):
            pi, i = in_shape[i], i + 1
        if j < len(out_shape):
            pj, j = out_shape[j], j + 1
        while pi != pj:
            if pi < pj and i < len(in_shape):
                pi, i = pi * in_shape[i], i + 1
            elif j < len(out_shape):
                pj, j = pj * out_shape[j], j + 1
            else:
                break
        block = frozenset().union(*in_tags[i0:i]) if i > i0 else NO_TAGS
        for jj in range(j0, j):
            out[jj] = block if out_shape[jj] > 1 else NO_TAGS
    return tuple(out)


def _window(info: TensorInfo, x: torch.Tensor, out: torch.Tensor, kernel, stride, padding, dilation,
            transposed: bool = False) -> TensorInfo:
    """Convolution and pooling: each spatial dimension (2, 3, ...) goes through its window."""
    n = x.dim() - 2
    kernel, stride = _ints(kernel, n), _ints(stride, n, kernel)
    padding, dilation = _ints(padding, n, 0), _ints(dilation, n, 1)
    fields = dict(info.fields)
    for k in range(n):
        a = _axis(info.tags[k + 2]) if k + 2 < len(info.tags) else None
        if a:
            through = fields[a].through_transposed if transposed else fields[a].through_window
            fields[a] = through(kernel[k], stride[k], padding[k], dilation[k])
    return TensorInfo(fields, _sizes_for(info.tags, out.shape, info.sizes), info.tags)


# Adaptive pooling modules: their output's field is that of adaptive pooling from the input's size to the output's,
# whatever operations their forward uses. fastnet's GlobalMaxPool is one, computed as a max-pool window of the
# map's size (an operation every ONNX exporter knows), which alone would read as a window like any other: a
# global pool then looked like one more feature layer, the last one before the head.
ADAPTIVE_POOLS = (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd)


def _adaptive(info: TensorInfo, x: torch.Tensor, out: torch.Tensor) -> TensorInfo:
    fields = dict(info.fields)
    for d in range(2, x.dim()):
        a = _axis(info.tags[d])
        if a:
            fields[a] = fields[a].through_adaptive(x.shape[d], out.shape[d])
    return TensorInfo(fields, _sizes_for(info.tags, out.shape, info.sizes), info.tags)


def _reduce(info: TensorInfo, x: torch.Tensor, out: torch.Tensor, dims) -> TensorInfo:
    """mean/sum/amax/... over ``dims`` (None: all): axes held by a reduced dimension become global."""
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(x.dim()))
    dims = {d % max(x.dim(), 1) for d in _ints(dims, 1)}
    mixed = {a for d in dims for a in info.tags[d] if x.shape[d] > 1} & set(AXES)
    fields = _span_axes(info, mixed)
    kept = tuple(NO_TAGS if d in dims else t for d, t in enumerate(info.tags))
    if out.dim() != x.dim():
        kept = tuple(t for d, t in enumerate(kept) if d not in dims)
    sizes = {a: (1 if a in mixed else n) for a, n in info.sizes.items()}
    return TensorInfo(fields, sizes, kept if len(kept) == out.dim() else tuple([NO_TAGS] * out.dim()))


def _contract(a_info: TensorInfo | None, b_info: TensorInfo | None, a: torch.Tensor, b: torch.Tensor,
              out: torch.Tensor) -> TensorInfo:
    """Matrix products (Linear, attention): axes held by the contracted dimension become global."""
    infos = [(t, i) for t, i in ((a, a_info), (b, b_info)) if i is not None]
    a_tags = a_info.tags if a_info else (NO_TAGS,) * a.dim()
    b_tags = b_info.tags if b_info else (NO_TAGS,) * b.dim()
    mixed = (set(a_tags[-1]) | set(b_tags[-2] if b.dim() > 1 else NO_TAGS)) & set(AXES)
    tags = tuple(a_tags[:-1]) + ((b_tags[-1],) if b.dim() > 1 else ())
    tags = tuple(t if n > 1 else NO_TAGS for t, n in zip(tags, out.shape)) if len(tags) == out.dim() \
        else (NO_TAGS,) * out.dim()
    merged = _merge(infos, out, tags)
    sizes = {ax: n for ax, n in merged.sizes.items()}
    for ax in mixed:
        source = max((i for _, i in infos), key=lambda i: i.sizes[ax])
        merged.fields[ax] = source.fields[ax].spanning(source.sizes[ax])
        sizes[ax] = 1
    merged.sizes = sizes
    return merged


def _pad(info: TensorInfo, out: torch.Tensor, pad: list[int]) -> TensorInfo:
    """constant_pad_nd: (left, right) pairs from the last dimension backwards; left padding moves unit 0."""
    fields = dict(info.fields)
    for k in range(len(pad) // 2):
        a = _axis(info.tags[-1 - k])
        if a:
            fields[a] = fields[a].shifted(-pad[2 * k])
    return TensorInfo(fields, _sizes_for(info.tags, out.shape, info.sizes), info.tags)


def _slice(info: TensorInfo, x: torch.Tensor, out: torch.Tensor, dim: int, start, step: int) -> TensorInfo:
    fields, a = dict(info.fields), _axis(info.tags[dim % x.dim()])
    if a and x.shape[dim] > 1:
        begin = 0 if start is None else (start + x.shape[dim] if start < 0 else min(start, x.shape[dim]))
        fields[a] = fields[a].shifted(begin).strided(step)
    return TensorInfo(fields, _sizes_for(info.tags, out.shape, info.sizes), info.tags)


def _same(info: TensorInfo, out: torch.Tensor) -> TensorInfo:
    return TensorInfo(dict(info.fields), _sizes_for(info.tags, out.shape, info.sizes), info.tags)


def _with_tags(info: TensorInfo, out: torch.Tensor, tags: tuple) -> TensorInfo:
    tags = tuple(t if n > 1 else NO_TAGS for t, n in zip(tags, out.shape))
    return TensorInfo(dict(info.fields), _sizes_for(tags, out.shape, info.sizes), tags)


# aten operations that keep every element where it is (or copy it): the field passes through unchanged.
_PASS_THROUGH = {
    "clone", "contiguous", "_to_copy", "detach", "alias", "lift_fresh", "lift_fresh_copy", "roll", "flip",
    "_native_batch_norm_legit_no_training", "native_batch_norm", "_native_batch_norm_legit", "native_layer_norm",
    "native_group_norm", "dropout", "native_dropout", "_softmax", "_log_softmax", "copy", "copy_",
}
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "logsumexp",
               "prod", "linalg_vector_norm", "norm", "any", "all", "argmax", "argmin"}
_VIEWS = {"view", "_unsafe_view", "reshape", "_reshape_alias", "view_copy"}
_POOLS = {"max_pool2d_with_indices", "max_pool2d", "avg_pool2d", "max_pool1d", "avg_pool1d",
          "max_pool3d_with_indices", "avg_pool3d", "mkldnn_max_pool2d"}
_ADAPTIVE = {"_adaptive_avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "_adaptive_avg_pool3d",
             "adaptive_max_pool3d"}
# Operations whose result only borrows the input's shape or device (an attention mask built with new_zeros).
_CONSTANT = {"new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided", "zeros_like", "ones_like",
             "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "scalar_tensor"}
CONSTANT = object()
_SDPA = {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
         "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
         "scaled_dot_product_attention", "_scaled_dot_product_attention_math"}


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any = None) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


def _propagate(name: str, args: tuple, kwargs: dict, out: torch.Tensor,
               info_of: Callable[[Any], TensorInfo | None]) -> TensorInfo | object | None:
    """The TensorInfo of ``out``, the first output of aten op ``name``; CONSTANT for a result that does not
    depend on the input's values; None where the op is unknown and its output does not line up with its
    inputs (the caller records it)."""
    x = args[0] if args else None
    xi = info_of(x)
    if name in ("convolution", "_convolution", "mkldnn_convolution", "_slow_conv2d_forward"):
        if xi is None:
            return None
        w = args[1]
        transposed = bool(args[6]) if name != "mkldnn_convolution" and len(args) > 6 else False
        return _window(xi, x, out, list(w.shape[2:]), args[3], args[4], args[5], transposed)
    if name in _POOLS:
        return _window(xi, x, out, _arg(args, kwargs, 1, "kernel_size"), _arg(args, kwargs, 2, "stride"),
                       _arg(args, kwargs, 3, "padding", 0),
                       _arg(args, kwargs, 4, "dilation", 1) if "max" in name else 1) if xi else None
    if name in _ADAPTIVE:
        return _adaptive(xi, x, out) if xi else None
    if name in _CONSTANT:
        return CONSTANT
    if name in _REDUCTIONS and xi is not None:
        dims = _arg(args, kwargs, 2 if name in ("linalg_vector_norm", "norm") else 1, "dim")
        if not isinstance(dims, torch.Tensor):  # max(a, b) of two tensors is elementwise
            return _reduce(xi, x, out, dims)
    if name in ("mm", "bmm", "matmul"):
        a, b = args[0], args[1]
        return _contract(info_of(a), info_of(b), a, b, out) if (info_of(a) or info_of(b)) else None
    if name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
        return _contract(info_of(a), info_of(b), a, b, out) if (info_of(a) or info_of(b)) else None
    if name in _SDPA:
        q, k, v = args[0], args[1], args[2]
        infos = [(t, info_of(t)) for t in (q, k, v) if info_of(t) is not None]
        if not infos:
            return None
        q_tags = info_of(q).tags if info_of(q) else (NO_TAGS,) * q.dim()
        merged = _merge(infos, out, q_tags if len(q_tags) == out.dim() else (NO_TAGS,) * out.dim())
        keys = max(infos, key=lambda ti: ti[0].dim())[1]
        mixed = set(keys.tags[-2]) & set(AXES) if len(keys.tags) >= 2 else set()
        for ax in mixed:
            merged.fields[ax] = keys.fields[ax].spanning(keys.sizes[ax])
            merged.sizes[ax] = 1
        return merged
    if name in ("cat", "stack"):  # DenseNet's and Inception's concatenations
        inputs = _traced_inputs(args, kwargs, info_of)
        tags = list(inputs[0][1].tags)
        if name == "stack":
            tags.insert(_arg(args, kwargs, 1, "dim", 0) % out.dim(), NO_TAGS)
        return _merge(inputs, out, tuple(tags) if len(tags) == out.dim() else (NO_TAGS,) * out.dim())
    if xi is None or not isinstance(x, torch.Tensor):
        return _elementwise(args, kwargs, out, info_of)
    if name in _PASS_THROUGH:
        return _same(xi, out) if out.shape == x.shape else _with_tags(xi, out, (NO_TAGS,) * out.dim())
    if name in _VIEWS or name in ("flatten", "unflatten"):
        return _with_tags(xi, out, _reshape_tags(x.shape, xi.tags, out.shape))
    if name == "permute":
        dims = [d % x.dim() for d in args[1]]
        return _with_tags(xi, out, tuple(xi.tags[d] for d in dims))
    if name in ("transpose", "swapaxes"):
        tags, d0, d1 = list(xi.tags), args[1] % x.dim(), args[2] % x.dim()
        tags[d0], tags[d1] = tags[d1], tags[d0]
        return _with_tags(xi, out, tuple(tags))
    if name in ("t", "numpy_T"):
        return _with_tags(xi, out, tuple(reversed(xi.tags)))
    if name in ("expand", "expand_as", "repeat"):
        return _with_tags(xi, out, (NO_TAGS,) * (out.dim() - x.dim()) + xi.tags)
    if name == "unsqueeze":
        tags = list(xi.tags)
        tags.insert(args[1] % out.dim(), NO_TAGS)
        return _with_tags(xi, out, tuple(tags))
    if name == "squeeze":
        return _with_tags(xi, out, tuple(t for t, n in zip(xi.tags, x.shape) if n != 1)
                          if out.dim() < x.dim() else xi.tags)
    if name == "select":
        dim = args[1] % x.dim()
        return _with_tags(xi, out, xi.tags[:dim] + xi.tags[dim + 1:])
    if name in ("slice", "narrow"):
        dim = _arg(args, kwargs, 1, "dim", 0)
        start = _arg(args, kwargs, 2, "start", 0)
        step = _arg(args, kwargs, 4, "step", 1) if name == "slice" else 1
        return _slice(xi, x, out, dim, start, step or 1)
    if name == "unbind":
        dim = _arg(args, kwargs, 1, "dim", 0) % x.dim()
        return _with_tags(xi, out, xi.tags[:dim] + xi.tags[dim + 1:])
    if name in ("split", "split_with_sizes", "chunk", "unsafe_split", "tensor_split"):
        return _same(xi, out)
    if name == "constant_pad_nd":
        return _pad(xi, out, list(args[1]))
    return _elementwise(args, kwargs, out, info_of)


def _traced_inputs(args, kwargs, info_of) -> list[tuple[torch.Tensor, TensorInfo]]:
    return [(t, info_of(t)) for t in tree_flatten((args, kwargs))[0] if info_of(t) is not None]


def _elementwise(args, kwargs, out: torch.Tensor, info_of) -> TensorInfo | None:
    """Add, multiply, ReLU, ... and any op without a rule whose output lines up with its inputs (broadcast
    from the right): the merge of the inputs' fields. None when the shapes do not line up."""
    inputs = _traced_inputs(args, kwargs, info_of)
    tags = _broadcast_tags(inputs, out) if inputs else None
    return _merge(inputs, out, tags) if tags is not None else None


class _Tracer(TorchDispatchMode):
    """Sees every aten operation: converts to meta (optionally), counts MACs and bytes, carries fields."""

    def __init__(self, to_meta: bool) -> None:
        super().__init__()
        self.to_meta = to_meta
        self.info = WeakIdKeyDictionary()
        self.macs = 0
        self.bytes = 0
        self.unknown: set[str] = set()

    def info_of(self, t: Any) -> TensorInfo | None:
        return self.info.get(t) if isinstance(t, torch.Tensor) else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.to_meta:
            args, kwargs = tree_map_only(torch.Tensor, _to_meta, (args, kwargs))
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            self.macs += flop_registry[packet](*args, **kwargs, out_val=out) // 2
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.bytes += sum(t.numel() * t.element_size() for t in outputs)
        if not outputs or not any(self.info_of(t) for t in tree_flatten((args, kwargs))[0]):
            return out
        name = packet.__name__
        result = _propagate(name, args, kwargs, outputs[0], self.info_of)
        if result is None:
            self.unknown.add(name)
            result = _fallback(args, kwargs, outputs[0], self.info_of)
        if isinstance(result, TensorInfo):
            for t in outputs:  # split/chunk/unbind parts, max-pool indices: all alike
                if t.dim() == outputs[0].dim():
                    self.info[t] = result
        return out


def _fallback(args, kwargs, out: torch.Tensor, info_of) -> TensorInfo:
    """An operation without a rule: the largest field of its inputs, layout unknown from here on."""
    return _merge(_traced_inputs(args, kwargs, info_of), out, (NO_TAGS,) * out.dim())


def input_info(shape: tuple[int, ...]) -> TensorInfo:
    """The input image: every pixel its own field; dimension 1 holds the channels, 2 axis h, 3 axis w."""
    c, h, w = shape
    return TensorInfo({"h": Field.of_input(), "w": Field.of_input()}, {"h": h, "w": w},
                      (NO_TAGS, frozenset("c"), frozenset("h"), frozenset("w")))


def first_tensor(value: Any) -> torch.Tensor | None:
    return next((t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)), None)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def trace(model: nn.Module, input_shape: tuple[int, int, int], meta: bool = True) -> Trace:
    """Run ``model`` on one C x H x W input (on the meta device unless ``meta=False``) and record every layer.

    The caller is responsible for eval mode and ``torch.no_grad`` (``hooks.inspection`` does both and puts
    everything back). A UserError names an input the model cannot take.
    """
    names = {m: n for n, m in model.named_modules() if n}
    layers: dict[nn.Module, TracedLayer] = {}
    clock = [0]
    stack: list[tuple[TracedLayer, int, int]] = []
    tracer = _Tracer(to_meta=meta)

    def pre(module, inputs):
        clock[0] += 1
        layer = layers.get(module)
        if layer is None:
            layer = layers[module] = TracedLayer(names[module], module, names[module].count(".") + 1, clock[0])
            layer.input_info = tracer.info_of(first_tensor(inputs))
        stack.append((layer, tracer.macs, tracer.bytes))

    def post(module, inputs, output):
        clock[0] += 1
        layer, macs, nbytes = stack.pop()
        layer.calls += 1
        layer.done = clock[0]
        layer.macs += tracer.macs - macs
        layer.bytes += tracer.bytes - nbytes
        t = first_tensor(output)
        x = first_tensor(inputs)
        if isinstance(module, ADAPTIVE_POOLS) and tracer.info_of(x) is not None and t is not None:
            tracer.info[t] = _adaptive(tracer.info_of(x), x, t)
        if t is not None:
            layer.output_shape = list(t.shape[1:])
            layer.info = tracer.info_of(t)
            if layer.calls == 1:
                layer.first_shape, layer.first_info = layer.output_shape, layer.info

    handles = []
    failed: Exception | None = None  # handled once the hooks are gone, so a retry or size_fix's passes run without
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        x = torch.zeros(1, *input_shape, dtype=model_dtype(model),
                        device="meta" if meta else next(model.parameters(), torch.zeros(())).device)
        with tracer:
            tracer.info[x] = input_info(input_shape)
            out = model(x)
    except SIZE_ERRORS as e:
        failed = e
    except NotImplementedError as e:
        if not meta:
            raise
        failed = e
    finally:
        for h in handles:
            h.remove()
    if failed is not None:
        if meta and (isinstance(failed, NotImplementedError) or "meta" in first_line(failed).lower()):
            return trace(model, input_shape, meta=False)  # an operation the meta device lacks: run it for real
        raise size_error(failed, f"the model cannot take a {'x'.join(map(str, input_shape))} input",
                         max(input_shape[1:]), size_fix(model, input_shape, failed)) from None
    ordered = sorted(layers.values(), key=lambda layer: layer.first)
    y = first_tensor(out)
    return Trace(ordered, tracer.macs, tracer.bytes, tuple(input_shape), tracer.info_of(y),
                 list(y.shape[1:]) if y is not None else [], sorted(tracer.unknown))


def parse_input_shape(value: int | tuple | list | None, default: tuple[int, int, int]) -> tuple[int, int, int]:
    """``--input-size``: C H W, or one number for a square of the default's channels; a UserError otherwise."""
    if value is None:
        return default
    if isinstance(value, int):
        value = [value]
    value = list(value)
    if len(value) == 1:
        value = [default[0], value[0], value[0]]
    if len(value) != 3:
        raise UserError(f"--input-size takes C H W (e.g. 3 224 224) or one size, got {len(value)} numbers")
    if any(not isinstance(v, int) or v < 1 for v in value):
        raise UserError(f"--input-size values must be positive whole numbers, got {' '.join(map(str, value))}")
    return tuple(value)  # type: ignore[return-value]
