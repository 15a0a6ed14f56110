"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file written here ends with the permissions an ordinary new file gets from the user's umask (0644 under
the usual 022), not the 0600 of the private temporary file it starts as: a checkpoint, an export or a report
is meant to be read by a serving container or a colleague like any other file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Any, Callable, Iterator

import torch

from cnnkit import strict_json
from cnnkit.errors import UserError


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: 0o666 less the process's umask."""
    try:  # Linux reports the umask without changing it (os.umask can only be read by setting it)
        with open("/proc/self/status") as f:
            umask = next((int(line.split()[1], 8) for line in f if line.startswith("Umask:")), None)
    except OSError:
        umask = None
    if umask is None:
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str, durable: bool = False) -> Iterator[str]:
    """A temporary path in ``path``'s folder (the same filesystem, so the rename is atomic) to write to; when
    the block succeeds it gets an ordinary file's permissions and replaces ``path``. ``durable`` also fsyncs the
    file and the folder, so the new file survives a power cut once the block ends. A failure leaves the
    previous file and no temp file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())  # mkstemp made it private (0600)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def move_into_place(src: str, dst: str) -> None:
    """Replace ``dst`` with ``src``, a finished file in the same folder (written through ``atomic_path``, then
    checked): one rename, so a reader sees the old file or the new one."""
    os.replace(src, dst)


def out_not_writable(out: str, error: OSError) -> UserError:
    """The error of a command whose ``--out`` cannot be written (``error``: what ``atomic_path`` or
    ``check_writable`` raised)."""
    return UserError(f"cannot write --out {out} ({why_not_written(error)}); choose a path in a writable folder")


def why_not_written(error: OSError) -> str:
    """``error``'s reason and the file or folder it names, for a line that already names the file meant: where
    that is a temporary file of ``atomic_path``'s (a name the user never chose), its folder."""
    reason = error.strerror or str(error)
    where = error.filename if isinstance(error.filename, str) else ""
    if os.path.basename(where).startswith(".") and where.endswith(".tmp"):
        where = os.path.dirname(where) or "."
    return f"{reason}: {where}" if where else reason


def check_writable(path: str) -> None:
    """Raise OSError unless ``atomic_path(path)`` can write there: a temporary file is created in its folder and
    removed. For a command to fail before its work rather than after it. The folders made for the test are removed
    again (``atomic_path`` makes them when the file is written): a command that fails in between, or is
    interrupted, leaves no empty folder behind."""
    folder = os.path.dirname(os.path.abspath(path))
    made = []
    parent = folder
    while not os.path.exists(parent):
        made.append(parent)
        parent = os.path.dirname(parent)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
        os.unlink(tmp)
    finally:
        for made_folder in made:  # deepest first
            try:
                os.rmdir(made_folder)
            except OSError:
                pass


def atomic_torch_save(obj: Any, path: str, durable: bool = True) -> None:
    """``torch.save(obj)`` to ``path`` through ``atomic_path`` (``durable``: fsynced). A failed write raises
    OSError and leaves no temp file."""
    with atomic_path(path, durable) as tmp, open(tmp, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:  # torch's zip writer reports a failed write (disk full) as RuntimeError
            raise OSError(f"write failed: {str(e).splitlines()[0][:120]}") from None


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a temporary file in ``path``'s folder, then rename it over ``path``: a reader (a
    browser refreshing a report) never sees half a file, and a failure leaves the previous file and no temp."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def write_json(path: str, data: Any) -> None:
    """``data`` as strict JSON (cnnkit/strict_json.py: a non-finite number becomes null), written atomically."""
    text = strict_json.dumps(data, indent=2).encode()
    atomic_write(path, lambda f: f.write(text))
