"""cnnkit/choices.py's file endings: what makes a path a model file (a checkpoint or an export), in any case."""

import os

import pytest
import torch
from safetensors.torch import save_file

import cnnkit
from cnnkit.choices import is_format, is_model_file
from cnnkit.errors import UserError
from cnnkit.transfer import load_weights


def test_model_files_are_recognised_by_their_ending_in_any_case():
    for name in ("best.pt", os.path.join("runs", "r", "BEST.PT"), "w.pth", "w.Pth", "m.onnx", "m.ONNX", "m.ts",
                 "m.safetensors", "m.SafeTensors"):
        assert is_model_file(name), name
    for name in ("photo.png", "pt", "notes.txt", "data.ptx", "resnet18", "m.onnx.png"):
        assert not is_model_file(name), name
    assert is_format("m.ONNX", "onnx") and is_format("w.SAFETENSORS", "safetensors") and is_format("m.TS", "torchscript")
    assert not is_format("m.pt", "onnx") and not is_format("m.onnx", "safetensors")


def test_upper_case_endings_are_read_as_their_format(tmp_path):
    source = cnnkit.create_model("simple_cnn")
    weights = tmp_path / "W.SAFETENSORS"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(weights))
    target = cnnkit.create_model("simple_cnn")
    load_weights(target, str(weights))  # read as safetensors, not handed to torch.load
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))

    export = tmp_path / "MODEL.ONNX"
    export.write_bytes(b"\x08\x07not a checkpoint")
    with pytest.raises(UserError, match="is an ONNX export"):  # not "damaged or truncated"
        cnnkit.load_checkpoint(str(export))


@pytest.mark.parametrize("name", ["gone.PT", "gone.onnx", "gone.Safetensors"])
def test_a_missing_model_file_is_said_not_to_exist_rather_than_an_unknown_model(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)  # a bare file name, without a folder separator to give it away
    with pytest.raises(UserError, match=f"{name} does not exist"):
        cnnkit.summary(name)
    with pytest.raises(UserError, match=f"{name} does not exist"):
        cnnkit.audit(name)
