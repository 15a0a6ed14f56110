import os
import pathlib

import pytest
import torch

import cnnkit
from cnnkit.errors import CheckpointError, UserError
from tests.conftest import write_malicious_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    result = cnnkit.train(data="shapes", num_samples=512, epochs=3, batch_size=32, model="cnn_bn",
                          progress=False, out=str(out))
    return result, str(out)


def test_reloaded_checkpoint_gives_the_accuracy_training_reported(run):
    result, out = run
    last = cnnkit.evaluate(os.path.join(out, "last.pt"))
    best = cnnkit.evaluate(out)
    assert last.acc == result.val_acc and last.loss == pytest.approx(result.val_loss, rel=1e-9)
    assert best.acc == result.best_val_acc
    assert last.count == result.num_val


def test_checkpoint_alone_rebuilds_model_and_preprocessing(run):
    _, out = run
    ckpt = cnnkit.load_checkpoint(os.path.join(out, "best.pt"))
    assert ckpt.classes[:3] == ["circle", "square", "triangle"]
    assert (ckpt.input_size, ckpt.channels) == (32, 3) and len(ckpt.mean) == len(ckpt.std) == 3
    assert not ckpt.model.training
    assert ckpt.model.cnnkit_config["name"] == "cnn_bn"
    payload = torch.load(os.path.join(out, "best.pt"), weights_only=True)
    assert payload["model"]["num_classes"] == 10 and payload["config"]["epochs"] == 3


def test_a_run_begun_from_pretrained_weights_is_still_called_so_once_reloaded(tmp_path):
    # An export of a --pretrained run said "pretrained": false: the model rebuilt from the checkpoint (without
    # downloading the weights its own replace) described itself, not the run.
    from cnnkit.checkpoint import make_payload
    from cnnkit.metadata import payload_metadata

    model = cnnkit.create_model("simple_cnn", num_classes=2)
    model.cnnkit_config["pretrained"] = True  # as create_model(..., pretrained=True) records it
    torch.save(make_payload(model, ["a", "b"], 32, 3, [0.5] * 3, [0.25] * 3), tmp_path / "best.pt")
    ckpt = cnnkit.load_checkpoint(str(tmp_path / "best.pt"))
    assert ckpt.model.cnnkit_config["pretrained"] is True
    exported = payload_metadata(make_payload(ckpt.model, ckpt.classes, 32, 3, ckpt.mean, ckpt.std))
    assert '"pretrained": true' in exported["model"]


def test_evaluate_result_fields(run):
    _, out = run
    r = cnnkit.evaluate(out, "shapes")
    assert 0 <= r.acc <= r.top5 <= 1
    assert len(r.per_class) == 10 and set(r.per_class[0]) == {"class", "precision", "recall", "f1", "support"}
    assert sum(c["support"] for c in r.per_class) == r.count == sum(map(sum, r.confusion_matrix))
    assert r.acc == pytest.approx(sum(r.confusion_matrix[i][i] for i in range(10)) / r.count)


def test_predict_gives_sorted_probabilities(run, image_folder):
    _, out = run
    results = cnnkit.predict(out, [image_folder], topk=3)
    assert len(results) == 32
    for r in results:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert cnnkit.predict(pathlib.Path(out), [image_folder], topk=3) == results  # a Path is a path
    with pytest.raises(UserError, match="predict takes a run folder, a checkpoint or .onnx file, or a cnnkit "
                                        "Checkpoint, not a ConvNet"):
        cnnkit.predict(cnnkit.create_model("simple_cnn"), [image_folder])


def test_bad_checkpoints_are_refused_with_their_path(tmp_path, run):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt"):
        cnnkit.load_checkpoint(str(empty))
    data = open(os.path.join(run[1], "last.pt"), "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pt") as e:
        cnnkit.load_checkpoint(str(truncated))
    # torch's text is cut at its first sentence, not mid-way through its advice to PyTorch's developers
    assert "failed finding central directory); restore it from a copy, or train again" in str(e.value), str(e.value)
    with pytest.raises(UserError, match="does not exist"):
        cnnkit.load_checkpoint(str(tmp_path / "missing.pt"))
    plain = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match=r"not a cnnkit checkpoint \(no model description in it\); pass a run "
                                              r"folder .* a plain state dict starts a run with train --weights"):
        cnnkit.load_checkpoint(str(plain))


def test_files_that_are_no_checkpoint_at_all_are_named_for_what_they_are(tmp_path, run, image_folder):
    # Not pickles, so not "objects that unpickling could run": a usage error (exit 2) that says what the file is.
    from tests.conftest import run_cli

    image = sorted(pathlib.Path(image_folder).rglob("*.png"))[0]
    for path, kind in ((os.path.join(run[1], "config.json"), "is JSON, not a checkpoint"),
                       (str(image), "is a PNG image, not a checkpoint")):
        with pytest.raises(UserError, match=kind) as caught:
            cnnkit.load_checkpoint(path)
        assert not isinstance(caught.value, CheckpointError)
    proc = run_cli("predict", image, run[1])  # the arguments the wrong way round
    assert proc.returncode == 2 and "is a PNG image, not a checkpoint" in proc.stderr, proc.stderr
    notes = tmp_path / "notes.txt"
    notes.write_text("not weights")
    proc = run_cli("train", "--data", "shapes", "--num-samples", "64", "--epochs", "1", "--weights", notes,
                   "--out", tmp_path / "w")
    assert proc.returncode == 2 and f"weights file {notes} is text, not weights" in proc.stderr, proc.stderr
    from cnnkit.transfer import load_weights
    from safetensors.torch import save_file

    named_wrong = tmp_path / "weights.bin"  # a safetensors file under another suffix
    save_file({"w": torch.zeros(2)}, str(named_wrong))
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    for path, kind in ((named_wrong, "a safetensors file without the .safetensors suffix"), (empty, "empty")):
        with pytest.raises(UserError, match=f"weights file {path} is {kind}"):
            load_weights(cnnkit.create_model("cnn_bn"), str(path))
    legacy = tmp_path / "legacy.pt"  # the oldest pickle protocol starts as text: torch reads it first, not cnnkit
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False, pickle_protocol=1)
    with pytest.raises(CheckpointError) as caught:
        cnnkit.load_checkpoint(str(legacy))
    assert "is text" not in str(caught.value)

    script = tmp_path / "model.ts"
    cnnkit.export(run[1], "torchscript", str(script))
    with pytest.raises(UserError, match="is a TorchScript export, not weights"):
        load_weights(cnnkit.create_model("cnn_bn"), str(script))


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    path, marker = write_malicious_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="could run code"):
        cnnkit.load_checkpoint(str(path))
    assert not marker.exists()


def test_the_refusal_names_the_refused_object_without_pytorchs_advice(tmp_path):
    path, marker = write_malicious_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as e:
        cnnkit.load_checkpoint(str(path))
    message = str(e.value)
    assert "refers to io.open" in message and "could run code" in message  # _CreatesFileWhenUnpickled calls open
    assert "\x1b" not in message and "torch." not in message.replace("torch.save", "") and "\n" not in message
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"weights file .*evil.pt refers to io.open, which is not a tensor"):
        cnnkit.train(weights=str(path), num_samples=64, smoke=True, out=str(tmp_path / "run"), progress=False)
    assert not marker.exists()


class _CallsEval:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_the_refusal_names_eval_as_the_readme_says(tmp_path):
    torch.save({"cnnkit_checkpoint": 1, "model": _CallsEval()}, tmp_path / "eval.pt")
    with pytest.raises(CheckpointError, match="eval.pt refers to eval, which is not a tensor or plain data"):
        cnnkit.load_checkpoint(str(tmp_path / "eval.pt"))


@pytest.mark.parametrize("content, kind", [(b"hi\n", "is text, not a checkpoint"),
                                           (b"uanaagm", "is text, not a checkpoint"),
                                           (b"\x80\x60abc", "is damaged or truncated"),
                                           (b"j\x01\x02", "is damaged or truncated")])
def test_bytes_the_unpickler_chokes_on_are_a_one_line_error(tmp_path, content, kind):
    """torch's weights-only unpickler fails on such files with KeyError, IndexError or struct.error (an internal
    error, after torch's two-line warning about the pickle protocol the first bytes seem to name)."""
    from tests.conftest import run_cli
    from tests.test_cli import assert_one_line_error

    path = tmp_path / "model.pt"
    path.write_bytes(content)
    assert_one_line_error(run_cli("summary", path), 2 if "text" in kind else 1, f"checkpoint {path} {kind}")


def test_random_bytes_are_a_damaged_checkpoint_not_a_refused_pickle(tmp_path):
    # 300 random bytes were said to hold "objects other than tensors and plain data ()", refused as unsafe.
    path = tmp_path / "best.pt"
    path.write_bytes(bytes(torch.randint(0, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist()))
    with pytest.raises(CheckpointError) as caught:
        cnnkit.load_checkpoint(str(path))
    message = str(caught.value)
    assert message.startswith(f"checkpoint {path} is damaged or truncated (neither a zip archive nor a pickle: ")
    assert "could run code" not in message


def test_a_damaged_checkpoint_names_the_runs_other_one(tmp_path):
    # "checkpoint runs/x/best.pt is damaged or truncated (...)" named no way out; the run's last.pt usually is one
    (tmp_path / "best.pt").write_bytes(b"PK\x03\x04 cut short")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"best.pt is damaged or truncated \(.*\); use .*last.pt beside it, "
                                              r"or restore it from a copy"):
        cnnkit.load_checkpoint(str(tmp_path / "best.pt"))
