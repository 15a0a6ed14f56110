"""torchvision's pretrained weights read from the cache under $TORCH_HOME: a file there that cannot be read is named,
with what it is and the fix (delete it), as a damaged file (exit code 1), not a usage error."""

import pickle
import warnings
import zipfile

import pytest
import torch

import cnnkit
from cnnkit.errors import CheckpointError
from cnnkit.models.pretrained import cached_weights_path


def _random_bytes(path):
    path.write_bytes(bytes(torch.randint(0, 256, (5000,), generator=torch.Generator().manual_seed(0)).tolist()))


def _plain_pickle(path):
    with open(path, "wb") as f:
        pickle.dump({"a": 1}, f)


def _other_zip(path):
    with zipfile.ZipFile(path, "w") as z:  # two members: torch.hub extracts a zip of one (its legacy format)
        z.writestr("notes/readme.txt", "hello")
        z.writestr("notes/todo.txt", "more")


# (what the cache holds, the reason the message gives)
CACHED = [
    (_random_bytes, "(the file is damaged or cut short: neither a zip archive nor a pickle: "),
    (lambda p: p.write_bytes(b""), "(the file is damaged or cut short: empty (0 bytes))"),
    (_plain_pickle, "(it is a plain Python pickle, without the header torch.save writes)"),
    (_other_zip, "(it is a zip archive without the data.pkl torch.save writes)"),
    (lambda p: p.write_text("<html>503 Service Unavailable</html>"), "(it is text)"),
    (lambda p: p.mkdir(), "(it is a folder)"),
]


@pytest.mark.parametrize("write, why", CACHED)
def test_an_unreadable_cached_file_is_named_damaged_with_its_true_reason_and_exit_code_1(tmp_path, monkeypatch,
                                                                                         write, why):
    # Random bytes were "damaged or cut short: Weights only load failed", and every such file exited with 2 (a
    # usage error) where damaged checkpoints and exports exit with 1; a plain pickle also printed torch's two-line
    # warning about its pickle protocol.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cached = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert cached_weights_path("resnet18") == str(cached)
    cached.parent.mkdir(parents=True)
    write(cached)
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError) as caught:
            cnnkit.create_model("resnet18", pretrained=True)
    message = str(caught.value)
    assert caught.value.exit_code == 1
    assert message.startswith(f"the cached pretrained weights for resnet18 ({cached}) cannot be read {why}"), message
    assert "delete it so that it is downloaded again" in message and "\n" not in message
    assert "Weights only load failed" not in message
    assert not [w for w in caught_warnings if "pickle protocol" in str(w.message)]
