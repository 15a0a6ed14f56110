"""The single door to every model: ``create_model(name, num_classes=..., in_channels=..., **options)``.

Like timm's registry: model files define their ``nn.Module`` classes and register small factory functions
by name. Every model that leaves ``create_model`` carries ``model.cnnkit_config`` (name, options,
num_classes, in_channels, input_size), which is what a checkpoint stores to rebuild it.
"""

from __future__ import annotations

import collections.abc
import inspect
import numbers
import types
import typing
from typing import Any, Callable

import torch.nn as nn

from cnnkit.errors import UserError, did_you_mean, shown

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory ``fn(num_classes, in_channels, input_size, **options)`` under its own name."""
    _FACTORIES[fn.__name__] = fn
    return fn


def _ensure_loaded(name: str | None = None) -> None:
    """Import the model files, which registers their factories. torchvision's only when ``name`` is not one of
    cnnkit's own: importing torchvision adds about 160 MB to the resident memory of a simple_cnn run."""
    from cnnkit.models import fast, simple  # noqa: F401

    if name is None or name not in _FACTORIES:
        from cnnkit.models import torchvision  # noqa: F401


def list_models(pattern: str | None = None) -> list[str]:
    """Names that ``create_model`` accepts, sorted; ``pattern`` is a shell-style filter like ``resnet*``."""
    import fnmatch

    _ensure_loaded()
    names = sorted(_FACTORIES)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def is_torchvision_model(name: str) -> bool:
    """True when ``name`` is one of torchvision's models (False for cnnkit's own and for unknown names)."""
    _ensure_loaded(name)
    return getattr(_FACTORIES.get(name), "__module__", "") == "cnnkit.models.torchvision"


def default_input_size(name: str) -> int:
    """Square input size for a model name: what torchvision's default weights were measured at, else 32."""
    if not is_torchvision_model(name):
        return 32
    weights = default_weights(name)
    try:
        return int(weights.transforms.keywords.get("crop_size", 224))
    except AttributeError:  # no weights, or transforms without keywords
        return 224


def default_weights(name: str):
    """torchvision's default weights enum member for model ``name`` (its URL, transforms, metadata), or None:
    for cnnkit's own models (without importing torchvision), unknown names and torchvision models that have no
    pretrained weights."""
    if not is_torchvision_model(name):
        return None
    import torchvision

    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):
        return None


def check_model_name(name: str) -> None:
    """Raise a UserError, with close matches, unless ``name`` is a registered model."""
    _ensure_loaded(name)
    if name not in _FACTORIES:
        raise UserError(f"unknown model '{name}'{did_you_mean(name, _FACTORIES, most=3)} (`cnnkit models` lists "
                        f"the {len(_FACTORIES)} available)")


def create_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 3,
    input_size: int = 32,
    pretrained: bool = False,
    **options: Any,
) -> nn.Module:
    """Build the registered model ``name`` with a head of ``num_classes`` outputs.

    ``input_size`` (pixels, square) lets flatten heads size their first linear layer; models with a
    global-average-pool head accept any size. ``pretrained`` loads torchvision's default weights (then
    replaces the head if ``num_classes`` differs). ``options`` go to the model's factory.
    """
    check_model_name(name)
    if num_classes < 1 or in_channels < 1 or input_size < 1:
        raise UserError("num_classes, in_channels and input_size must be positive integers")
    factory = _FACTORIES[name]
    accepted = inspect.signature(factory).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in options if k not in accepted and not takes_any]
    if unknown:
        names = ", ".join(k if len(k) <= 40 else shown(k) for k in unknown[:5])
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        own = [k for k, p in accepted.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
               and k not in ("num_classes", "in_channels", "input_size", "pretrained")]  # set by cnnkit itself
        hint = did_you_mean(unknown[0], own) if len(unknown) == 1 else ""
        listing = f"its options: {', '.join(own)}" if own else "it takes no options"
        raise UserError(f"model '{name}' has no option {names}{more}{hint} ({listing})")
    _check_option_types(name, factory, options)
    if pretrained:
        if "pretrained" not in accepted:
            raise UserError(f"there are no pretrained weights for '{name}'; pretrained weights exist for "
                            "torchvision's models (resnet18, efficientnet_b0, ...)")
        options = {**options, "pretrained": True}
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels, input_size=input_size, **options)
    except (TypeError, ValueError, RuntimeError) as e:
        given = {k: v for k, v in options.items() if k != "pretrained"}
        if not given:  # without options a failure is cnnkit's bug, not the caller's
            raise
        values = ", ".join(f"{k}={shown(v, 40)}" for k, v in given.items())
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"model '{name}' cannot be built with {values}: {reason}") from None
    options.pop("pretrained", None)
    model.cnnkit_config = {
        "name": name,
        "options": dict(options),
        "num_classes": num_classes,
        "in_channels": in_channels,
        "input_size": input_size,
        "pretrained": pretrained,  # informational: a checkpoint's own weights replace these when it is loaded
    }
    return model


_KIND_NAMES = {int: "a whole number", float: "a number", str: "text", bool: "true or false", type(None): "null"}


def _check_option_types(name: str, factory: Callable[..., nn.Module], options: dict[str, Any]) -> None:
    """A UserError naming the first option whose value does not have the type the factory's signature gives it
    (``--model-opt`` and config files hand over whatever JSON or YAML holds); options without a type are left
    to the factory."""
    try:
        hints = typing.get_type_hints(factory)
    except Exception:  # an annotation that does not resolve: the factory checks its own options
        return
    for key, value in options.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise UserError(f"model '{name}': option {key} must be {_describe(hint)}, got {shown(value, 60)}")


def _alternatives(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type ``hint`` (int, float, str, bool, None, tuple[...], Sequence[...], unions);
    True for any other annotation."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_fits(value, h) for h in _alternatives(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, numbers.Integral if hint is int else numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list, collections.abc.Sequence):
        if not isinstance(value, (tuple, list)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, h) for v, h in zip(value, args))
        return not args or all(_fits(v, args[0]) for v in value)
    return True


def _describe(hint: Any) -> str:
    """``hint`` in words: "a whole number", "a list of 3 whole numbers", "text or null"."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in _alternatives(hint))
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (tuple, list, collections.abc.Sequence) and args:
        fixed = origin is tuple and args[-1] is not Ellipsis
        item = _describe(args[0]).removeprefix("a ").removeprefix("an ")
        plural = {"whole number": "whole numbers", "number": "numbers", "text": "texts",
                  "true or false": "true or false values"}.get(item, item)
        return f"a list of {len(args)} {plural}" if fixed and len(set(args)) == 1 else f"a list of {plural}"
    return _KIND_NAMES.get(hint, getattr(hint, "__name__", str(hint)))
