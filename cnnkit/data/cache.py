"""Decode once: decoded datasets as uint8 tensors, kept in memory and on disk, keyed by the data's content.

The key of a folder of images is a hash over every file's relative path, size, modification and change time
(the way build tools detect changed inputs without reading every byte) plus the decode settings, so an
edited, added or removed image makes a new entry. Entries are written to a temporary file in the cache
folder and renamed into place, so an interrupted write never leaves a half entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from cnnkit.atomic import atomic_torch_save

CACHE_VERSION = 3  # bump whenever the layout of an entry changes
_MEMORY: dict[str, dict[str, Any]] = {}
_MEMORY_ENTRIES = 4


def cache_dir() -> Path:
    """``$CNNKIT_CACHE``, else ``$XDG_CACHE_HOME/cnnkit``, else ``~/.cache/cnnkit``."""
    if os.environ.get("CNNKIT_CACHE"):
        return Path(os.environ["CNNKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "cnnkit"


def files_fingerprint(root: str, files: list[str]) -> str:
    """A hash of the relative path, size, modification and change time of each file."""
    h = hashlib.sha256()
    # The files come from a walk of ``root`` (os.path.join of it and normalised names below it), so each starts
    # with it: cutting the prefix gives relpath's answer without normalising both paths for every file.
    prefix = os.path.join(root, "")
    for f in files:
        try:
            st = os.stat(f)
            # the change time too, which no tool sets back: a file replaced by one of the same size with its old
            # modification time kept (tar, rsync -t, cp -p; every uncompressed BMP of one size has one length)
            stamp = f"{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
        except OSError as e:  # a dangling link or a link loop: part of the key, reported when decoding
            stamp = f"error {e.errno}"
        relative = f[len(prefix):] if f.startswith(prefix) else os.path.relpath(f, root)
        h.update(f"{relative}\0{stamp}\n".encode("utf-8", "surrogateescape"))  # names that are not UTF-8 too
    return h.hexdigest()


def cached(key: dict[str, Any], build: Callable[[], dict[str, Any]], fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """The entry for ``key`` (a JSON-able dict): from memory, from disk, or made by ``build()`` and stored.
    An entry on disk without all of ``fields`` (written by another cnnkit version) is rebuilt."""
    digest = hashlib.sha256(json.dumps({**key, "v": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:24]
    if digest in _MEMORY:
        return _MEMORY[digest]
    path = cache_dir() / f"{digest}.pt"
    entry = None
    if path.exists():
        try:
            entry = torch.load(path, weights_only=True)
            if not isinstance(entry, dict) or not all(f in entry for f in fields):
                entry = None
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            entry = None
    if entry is None:
        entry = build()
        _store(path, entry)
    if len(_MEMORY) >= _MEMORY_ENTRIES:
        _MEMORY.pop(next(iter(_MEMORY)))
    _MEMORY[digest] = entry
    return entry


_UNWRITABLE: set[Path] = set()  # cache folders already reported: a run stores several entries, one note is enough


def _store(path: Path, entry: dict[str, Any]) -> None:
    try:
        atomic_torch_save(entry, str(path), durable=False)  # a lost cache entry is only decoded again
    except OSError as e:  # a read-only or full cache disk costs speed on the next run, not this run
        if path.parent in _UNWRITABLE:
            return
        _UNWRITABLE.add(path.parent)
        # (makedirs on a path through a file says "File exists" or "Not a directory": name the file instead)
        blocker = next((p for p in (path.parent, *path.parent.parents) if p.exists() and not p.is_dir()), None)
        why = f"{blocker} is a file, not a folder" if blocker is not None else e.strerror or str(e)
        print(f"cnnkit: note: could not write the data cache at {path.parent} ({why}); the next run decodes "
              "again (set CNNKIT_CACHE to a writable folder)", file=sys.stderr)
