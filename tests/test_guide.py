"""docs/guide.md cannot drift from the code: every ```python block runs, in order, in one namespace, and
what it prints must equal the ```text block right after it (a block with no text block after it must print
nothing). Lines are compared exactly after trailing spaces are stripped; the guide rounds its floats with
format specs so that they are stable, and prints no timings or accuracies.

After changing the guide or the code on purpose: ``python -m tests.test_guide --update`` rewrites the
text blocks with what the code prints now (then read the diff).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys

GUIDE = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "docs", "guide.md"))
BLOCK = re.compile(r"```python\n(.*?)```\n(?:\s*```text\n(.*?)```\n)?", re.S)


def blocks(text: str) -> list[re.Match]:
    return list(BLOCK.finditer(text))


def run_blocks(text: str) -> list[tuple[re.Match, str]]:
    """Run every python block of ``text`` in one namespace; (block, what it printed) for each."""
    namespace: dict = {"__name__": "__guide__"}
    results = []
    for i, block in enumerate(blocks(text)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(block.group(1), f"guide.md block {i + 1}", "exec"), namespace)
        results.append((block, out.getvalue()))
    return results


def normal(text: str | None) -> list[str]:
    lines = [line.rstrip() for line in (text or "").splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def test_every_block_prints_what_the_guide_says(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    with open(GUIDE) as f:
        text = f.read()
    results = run_blocks(text)
    assert len(results) >= 15
    for i, (block, printed) in enumerate(results, 1):
        assert normal(printed) == normal(block.group(2)), f"guide.md block {i}:\n{block.group(1)}"


def update() -> None:
    with open(GUIDE) as f:
        text = f.read()
    pieces, last = [], 0
    for block, printed in run_blocks(text):
        pieces.append(text[last:block.start()])
        pieces.append(f"```python\n{block.group(1)}```\n")
        if printed.strip():
            pieces.append(f"```text\n{printed.rstrip()}\n```\n")
        last = block.end()
    pieces.append(text[last:])
    with open(GUIDE, "w") as f:
        f.write("".join(pieces))


if __name__ == "__main__" and "--update" in sys.argv:
    import tempfile

    os.chdir(tempfile.mkdtemp())
    update()
