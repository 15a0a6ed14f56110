"""A file given where a checkpoint or weights go that torch.load cannot read gets its own true reason: another kind
of file (a plain pickle, a zip of other files: a usage error, exit code 2) or a damaged one (exit code 1)."""

import pickle
import zipfile

import pytest
import torch

import cnnkit
from cnnkit.errors import CheckpointError
from cnnkit.transfer import load_weights


def _plain_pickle(path, protocol=None):
    with open(path, "wb") as f:
        pickle.dump({"a": 1}, f, protocol=protocol)


def test_a_plain_pickle_is_named_as_one_by_eval_predict_and_export(tmp_path, capsys):
    # `python -c "import pickle; pickle.dump({'a': 1}, open('x.pt', 'wb'))"`, then `cnnkit eval x.pt`: "checkpoint x.pt
    # is damaged or truncated (Invalid magic number; corrupt file?)" at protocol 2, and at the default protocol "holds
    # objects other than tensors and plain data () and was not loaded, since unpickling it could run code".
    from cnnkit.cli import main

    image = tmp_path / "img.png"
    image.write_bytes(b"")  # never read: the checkpoint is refused first
    for protocol in (2, None):
        path = tmp_path / f"x{protocol}.pt"
        _plain_pickle(path, protocol)
        for command in (["eval", path], ["predict", path, image],
                        ["export", path, "--format", "safetensors", "--out", tmp_path / "x.safetensors"]):
            assert main([*map(str, command)]) == 2
            err = capsys.readouterr().err.strip()
            assert err.endswith(f"error: checkpoint {path} is a plain Python pickle, without the header torch.save "
                                "writes, not a checkpoint; pass a run folder, a checkpoint file (.pt) or a "
                                ".safetensors export"), err
            assert "\n" not in err
        with pytest.raises(cnnkit.UserError, match="is a plain Python pickle") as caught:
            load_weights(cnnkit.create_model("simple_cnn"), str(path))
        assert caught.value.exit_code == 2


def test_a_zip_of_other_files_is_named_as_one(tmp_path):
    # It said "damaged or truncated ([enforce fail at inline_container.cc:180] . file in archive is not in a
    # subdirectory: notes.txt)".
    for names in (["notes.txt"], ["archive/notes.txt", "archive/more.txt"]):
        path = tmp_path / "weights.pt"
        with zipfile.ZipFile(path, "w") as z:
            for name in names:
                z.writestr(name, "hello")
        for read in (cnnkit.load_checkpoint, lambda p: load_weights(cnnkit.create_model("simple_cnn"), p)):
            with pytest.raises(cnnkit.UserError, match="is a zip archive without the data.pkl torch.save writes, "
                                                       "not ") as caught:
                read(str(path))
            assert caught.value.exit_code == 2


def test_an_empty_weights_file_is_damaged_as_an_empty_checkpoint_is(tmp_path):
    # An empty --weights file exited with 2 (a usage error) where an empty checkpoint exits with 1.
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"weights file {path} is empty \\(0 bytes\\): it was not written "
                                              "completely; restore it"):
        load_weights(cnnkit.create_model("simple_cnn"), str(path))
    with pytest.raises(CheckpointError, match="is empty"):
        cnnkit.load_checkpoint(str(path))


def test_a_cut_short_legacy_torch_file_says_so(tmp_path):
    # It said "damaged or truncated (EOFError)".
    path = tmp_path / "old.pt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:-20])  # in its last pickle
    with pytest.raises(CheckpointError, match=r"is damaged or truncated \(it ends before its data does: cut short\)"):
        cnnkit.load_checkpoint(str(path))


def test_a_legacy_torch_pickle_the_unpickler_refuses_quotes_its_reason(tmp_path):
    # Protocol 4 frames its opcodes, which the weights-only unpickler does not read: its reason comes on a later line
    # of PyTorch's message, and the refusal quoted an empty one: "holds objects other than tensors and plain data ()".
    path = tmp_path / "old4.pt"
    torch.save({"w": torch.zeros(2)}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(CheckpointError) as caught:
        cnnkit.load_checkpoint(str(path))
    assert "holds objects other than tensors and plain data (Unsupported operand 149)" in str(caught.value)


def test_a_damaged_files_reason_is_read_once(tmp_path, monkeypatch):
    # load_failure read the whole file twice on the error path: once for the refusal, once for the message.
    import cnnkit.checkpoint

    path = tmp_path / "best.pt"
    # random bytes, on which the weights-only unpickler fails as on a refused pickle ("Unsupported operand")
    path.write_bytes(bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()))
    calls, load_failure = [], cnnkit.checkpoint.load_failure

    def counted(*args):
        calls.append(args)
        return load_failure(*args)

    monkeypatch.setattr(cnnkit.checkpoint, "load_failure", counted)  # where both reads load (load_torch_file)
    for read in (cnnkit.load_checkpoint, lambda p: load_weights(cnnkit.create_model("simple_cnn"), p)):
        calls.clear()
        with pytest.raises(CheckpointError, match="damaged"):
            read(str(path))
        assert len(calls) == 1
