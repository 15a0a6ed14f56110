"""Looking inside a model without changing it: ``capture`` (forward hooks that are always removed) and
``inspecting`` (eval mode for the look, then every module's mode and BatchNorm statistics put back).

    with cnnkit.capture(model, ["layer1.0", "layer2"]) as acts:
        model(x)
    acts["layer2"].shape        # torch.Size([1, 128, 28, 28])
"""

from __future__ import annotations

import contextlib
import shlex
from typing import Iterator, Sequence

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from cnnkit.errors import UserError, did_you_mean
from cnnkit.modes import eval_mode


def layer_names(model: nn.Module) -> list[str]:
    """Every sub-module's name, in definition order (the names ``capture`` and ``--layer`` accept)."""
    return [name for name, _ in model.named_modules() if name]


def find_layer(model: nn.Module, name: str, label: str | None = None, build_args: Sequence[str] = ()) -> nn.Module:
    """The sub-module called ``name``; a UserError with the closest names when there is none. ``label`` is what
    the user called the model on the command line (a model name, a run folder or checkpoint), and ``build_args``
    the options that built it as the command line gives them (``--input-size``, ``--model-opt``: they can change
    the names), for the command that lists the names; without a label (a module from Python) the hint is
    ``cnnkit.inspect.layer_names``."""
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    lister = (f"`cnnkit features {shlex.join([label, *build_args])} --list-layers`" if label else
              "`cnnkit.inspect.layer_names(model)`, or `--list-layers` on the command line,")
    raise UserError(f"the model has no layer '{name}'{did_you_mean(name, modules, most=3)} ({lister} shows the "
                    f"{len(modules) - 1} names)")


@contextlib.contextmanager
def capture(model: nn.Module, layers: Sequence[str] | str, detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of ``layers`` (module names) during the forward passes run inside the block.

    Yields a dict that fills in as the model runs: layer name -> output (the first tensor of a tuple output;
    a layer called several times keeps its last call). ``detach=True`` stores copies cut from the graph, so a
    later in-place ReLU does not change what was captured; ``detach=False`` keeps the live tensors for
    gradients (Grad-CAM), and the forward pass goes on with a copy of them, for the same reason: a later
    ``ReLU(inplace=True)`` or a ResNet block's ``out += identity`` would turn the captured tensor into that
    later layer's output, and its gradient into that layer's (the values are the same, the graph one step
    longer). The hooks are removed when the block ends, also when it raises.
    """
    names = [layers] if isinstance(layers, str) else list(layers)
    modules = {name: find_layer(model, name) for name in names}
    captured: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            flat, spec = tree_flatten(output)
            i = next((i for i, o in enumerate(flat) if isinstance(o, torch.Tensor)), None)
            if i is None:
                return None
            if detach:
                captured[name] = flat[i].detach().clone()
                return None
            captured[name], flat[i] = flat[i], flat[i].clone()
            return tree_unflatten(flat, spec)
        return hook

    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(hook_for(name)))
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def inspecting(model: nn.Module, grad: bool = False) -> Iterator[nn.Module]:
    """Eval mode and (unless ``grad``) no autograd for the block; afterwards every module's ``training`` flag
    and every BatchNorm's running statistics are exactly what they were, also when the block raises."""
    with eval_mode(model), torch.set_grad_enabled(grad):
        yield model
