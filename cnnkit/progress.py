"""Progress of a long loop: a tqdm bar on a terminal, and on anything else (a CI log, a file, a pipe) a plain
line now and then, since a bar's carriage returns turn a log into one unreadable line.

Both have tqdm's interface as the training loop uses it (``update``, ``set_postfix``, ``close``, ``n``,
``disable``), so the loop does not care which it has.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm import tqdm

PLAIN_EVERY_S = 30.0  # seconds between two plain lines: a few per minute keeps a log readable and alive


class PlainProgress:
    """Writes ``desc  n/total unit  key value ...`` to ``file`` at most every ``every`` seconds (and never at
    the end: the caller prints its own summary)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "", unit: str = "it", file: IO[str] | None = None,
                 every: float | None = None) -> None:
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.file = file or sys.stderr
        self.every = PLAIN_EVERY_S if every is None else every
        self.disable = False
        self.postfix: dict[str, Any] = {}
        self._last = time.monotonic()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.every and self.n < self.total:
            self._last = now
            values = "  ".join(f"{k.replace('_s', '/s')} {v}" for k, v in self.postfix.items())  # img_s: img/s
            print(f"{self.desc}  {self.n}/{self.total} {self.unit}  {values}".rstrip(), file=self.file, flush=True)

    def close(self) -> None:
        pass


def progress_bar(total: int, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True,
                 file: IO[str] | None = None) -> Any:
    """A tqdm bar when ``file`` (stderr by default) is a terminal, else a PlainProgress; a disabled tqdm when
    not ``enabled`` (quiet runs, processes other than rank 0)."""
    file = file or sys.stderr
    terminal = hasattr(file, "isatty") and file.isatty()
    if enabled and not terminal:
        return PlainProgress(total, initial, desc, unit, file)
    return tqdm(total=total, initial=initial, desc=desc, leave=False, unit=unit, dynamic_ncols=True, file=file,
                disable=not enabled)
