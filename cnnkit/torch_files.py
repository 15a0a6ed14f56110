"""What a file that should hold PyTorch weights is instead: named before torch.load where its name or first bytes show
it (an image, an ONNX export), and after torch.load failed on it, whether it is another kind of file (text, a plain
Python pickle, a zip of other files, a folder), a pickle the weights-only unpickler refused, or a damaged one.

It sits below the models (torchvision's pretrained weights in their cache) and the checkpoints (checkpoints and
``--weights`` files), which both ask.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from typing import Iterator

from cnnkit.choices import is_format

# What a file is, from its first bytes, where that cannot be a file torch.save wrote.
_MAGIC = ((b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
          (b"BM", "a BMP image"), (b"RIFF", "a RIFF file (WebP image?)"), (b"II*\x00", "a TIFF image"),
          (b"MM\x00*", "a TIFF image"), (b"\x93NUMPY", "a NumPy array file"))

# The number torch.save's legacy format (before PyTorch 1.6, or _use_new_zipfile_serialization=False) pickles first:
# torch.serialization.MAGIC_NUMBER, written here so that this module needs no torch.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@contextlib.contextmanager
def quiet_protocol_warning() -> Iterator[None]:
    """Within the block, torch.load's "Detected pickle protocol" warning is silenced: a file of other bytes may
    name any protocol, and the one-line error that follows its failure says what the file is."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        yield


def not_a_torch_file(path: str) -> str | None:
    """What ``path`` is ('a JPEG image', 'an ONNX export', 'empty', ...) where its name or first bytes show that it
    is no file torch.save wrote; None where it may be one (``load_failure`` names what torch then fails on)."""
    if is_format(path, "onnx"):
        return "an ONNX export"
    with open(path, "rb") as f:
        head = f.read(16)
    if not head:
        return "empty (0 bytes)"
    kind = next((kind for magic, kind in _MAGIC if head.startswith(magic)), None)
    if kind:
        return kind
    # safetensors: an 8-byte little-endian header length, then the header's JSON
    if len(head) > 8 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000:
        return "a safetensors file without the .safetensors suffix (rename it so)"
    return None


def looks_like_text(path: str) -> str | None:
    """'JSON' or 'text' for a file whose first bytes read as such (asked once torch has failed to load it: the
    oldest pickle protocols are text too); None otherwise."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return None
    # torch.save's zip (a damaged one included) names its members in plain letters after control bytes
    return "text" if text and all(c.isprintable() or c in "\t\n\r" for c in text) else None


class NotATorchFile(ValueError):
    """``load_failure``'s answer for a file that torch.save did not write; its text says what the file is ('text',
    'a folder', ...), to follow "is"."""


def load_failure(path: str, error: BaseException) -> BaseException:
    """What torch.load's ``error`` on ``path`` means, read from the file without running any of it:

    - a ``NotATorchFile`` saying what the file is where torch.save did not write it: a folder, text or JSON, a plain
      Python pickle (no PyTorch header: pickle.dump), a zip archive of other files (no ``data.pkl``);
    - ``error`` itself for torch.save's zip (complete or cut short: its reason says which) or a torch pickle that
      reads through, which the weights-only unpickler refused for the objects it holds (``unpickling_refused``);
    - a ValueError with the true reason for a damaged file: empty, or bytes that are no pickle at all (random or
      damaged bytes), on which the unpickler says what it says of a refused pickle ("Unsupported operand") or
      fails inside (a KeyError quoting a number); pickletools reads their opcodes instead.
    """
    if os.path.isdir(path):
        return NotATorchFile("a folder")
    if os.path.getsize(path) == 0:
        return ValueError("empty (0 bytes)")
    kind = looks_like_text(path)
    if kind:
        return NotATorchFile(kind)
    with open(path, "rb") as f:
        if f.read(2) == b"PK":
            return _foreign_zip(path) or error
        f.seek(0)
        try:  # the first pickle: all of a plain one, the header of torch.save's legacy format
            legacy = any(arg == _LEGACY_MAGIC for _, arg, _ in pickletools.genops(f))
        except Exception as e:  # ValueError for an unknown opcode or a file that ends mid-pickle, and the like
            return ValueError(f"neither a zip archive nor a pickle: {e}")
    if not legacy:
        return NotATorchFile("a plain Python pickle, without the header torch.save writes")
    if isinstance(error, EOFError):  # torch.save's legacy format ends before its tensors' bytes do
        return ValueError("it ends before its data does: cut short")
    return error


def _foreign_zip(path: str) -> NotATorchFile | None:
    """A NotATorchFile for a complete zip archive without the ``data.pkl`` that torch.save writes into its folder;
    None for one that is (or may be, cut short) torch.save's."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):  # cut short or damaged: torch's error says so
        return None
    if any(name.endswith("/data.pkl") for name in names):
        return None
    return NotATorchFile("a zip archive without the data.pkl torch.save writes")


def refused_objects(error: pickle.UnpicklingError) -> str:
    """What the weights-only unpickler's ``error`` refused, to follow the file's name: "refers to eval, which is not
    a tensor or plain data", naming the object rather than quoting PyTorch's advice (the unsafe way of loading)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # PyTorch colours part of its message
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"refers to {found.group(1)}, which is not a tensor or plain data"
    # the detail may follow on a later line: "WeightsUnpickler error: \n\nUnsupported operand 149"
    detail = re.search(r"WeightsUnpickler error:\s*([^\n]*)", text)
    reason = (detail.group(1) if detail else text.strip().splitlines()[0] if text.strip() else "").strip()
    return "holds objects other than tensors and plain data" + (f" ({reason[:120]})" if reason else "")
