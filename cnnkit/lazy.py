"""A package whose public names are imported on first use, not when the package is imported.

Loading PyTorch takes seconds, and ``cnnkit --help``, ``cnnkit shape`` or ``cnnkit predict model.onnx`` need
none of it; with eager re-exports in ``__init__.py``, importing any submodule would load them all.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any


class _LazyPackage(types.ModuleType):
    """Importing a submodule binds it as an attribute of its package, which would hide a public name that is
    spelled the same (``cnnkit.train``, the function, and ``cnnkit/train/``); such a submodule is not bound, so
    the name stays the function (the submodule itself is still importable: ``cnnkit.train.loop``)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__.get("_lazy_api", ()) and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


def export_lazily(package: str, api: dict[str, str]) -> None:
    """Make ``api`` ({public name: the module defining it}) the public names of ``package``, each imported
    from its module when first looked up; ``__all__`` lists them, so ``from package import *`` works too."""
    module = sys.modules[package]

    def __getattr__(name: str) -> Any:
        if name not in api:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(api[name]), name)
        module.__dict__[name] = value  # looked up once
        return value

    def __dir__() -> list[str]:
        return sorted(set(module.__dict__) | set(api))

    module.__dict__.update(_lazy_api=api, __getattr__=__getattr__, __dir__=__dir__, __all__=sorted(api))
    module.__class__ = _LazyPackage
