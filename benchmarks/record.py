"""Where a benchmark's figures go: benchmarks/results/NAME.json (everything it measured, for later analysis) and
NAME.md (its table, also printed)."""

from __future__ import annotations

import json
import os

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def write_json(name: str, record: dict) -> str:
    """``record`` as benchmarks/results/``name``.json; its path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    return path


def write_markdown(name: str, lines: list[str]) -> str:
    """``lines`` as benchmarks/results/``name``.md, and printed; the file's path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path
