"""JSON that every parser reads: Python's own writer puts a bare NaN or Infinity where a float is not finite, which
strict parsers (JavaScript's JSON.parse, jq, Go's encoding/json) reject; here such a number is written as null.

Standard library only, so the command line prints ``--json`` results with it without loading PyTorch.
"""

from __future__ import annotations

import json
import math
from typing import Any


def dumps(data: Any, indent: int | None = None) -> str:
    """``data`` as strict JSON, each non-finite float as null."""
    return json.dumps(finite_or_null(data), indent=indent, allow_nan=False)


def finite_or_null(data: Any) -> Any:
    """``data`` with every non-finite float (in dicts, lists and tuples, at any depth) replaced by None."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_or_null(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_or_null(v) for v in data]
    return data
