import copy
import json
import os

import onnx
import onnxruntime
import pytest
import torch

import cnnkit
from cnnkit.data.shapes import SHAPE_CLASSES
from cnnkit.errors import CheckpointError, DataError, UserError
from cnnkit.checkpoint import make_payload, save_checkpoint
from tests.conftest import run_cli, write_image_folder
from tests.test_cli import assert_one_line_error

# The tests read TorchScript files back themselves; its deprecation in favour of torch.export is known.
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated")

CLASSES = list(SHAPE_CLASSES[:4])
MEAN, STD = [0.48, 0.46, 0.41], [0.23, 0.22, 0.24]


def write_checkpoint(path, name, classes=CLASSES, size=32):
    """A checkpoint file as training writes it, for a model whose BatchNorm layers have seen data (a few
    training-mode passes), without the cost of training."""
    torch.manual_seed(0)
    model = cnnkit.create_model(name, num_classes=len(classes), input_size=size)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, 3, size, size) * 3 - 1)
    save_checkpoint(make_payload(model.eval(), classes, size, 3, MEAN, STD, epoch=1), str(path))
    return str(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    return {name: write_checkpoint(folder / f"{name}.pt", name) for name in ("simple_cnn", "cnn_bn", "resnet18")}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    # lr 0.01: at the default 0.05 one epoch on 256 images diverges to logits in the hundreds, where fp32
    # rounding alone (about 1e-7 of a logit) comes close to the absolute 1e-4 that verify accepts.
    cnnkit.train(model="cnn_bn", data="shapes", num_samples=256, epochs=1, lr=0.01, precision="fp32",
                 progress=False, out=str(out), log=open(os.devnull, "w"))
    return str(out)


def ort_logits(path, x):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("format, ending", [("onnx", ".onnx"), ("torchscript", ".ts")])
@pytest.mark.parametrize("name", ["simple_cnn", "cnn_bn", "resnet18"])
def test_export_verifies_below_tolerance_at_batch_1_and_7(tmp_path, checkpoints, image_folder, name, format, ending):
    out = str(tmp_path / f"model{ending}")
    r = cnnkit.export(checkpoints[name], format, out, verify=True, images=[image_folder])
    assert os.path.isfile(out) and r.size_bytes == os.path.getsize(out) and r.model == name
    assert [(c.inputs, c.batch_size) for c in r.checks] == [("random", 1), ("random", 7), ("images", 32)]
    assert r.verified and r.max_abs_diff < 1e-4, r.checks
    assert all(c.max_abs_logit > 0 for c in r.checks)
    print(name, format, [(c.inputs, c.batch_size, c.max_abs_diff, c.max_abs_logit) for c in r.checks])


def test_verify_bounds_the_difference_by_the_logits_size(tmp_path, checkpoints):
    # fp32 rounding differs between runtimes by about 1e-7 of a value: a correct export of a model whose logits
    # are in the millions (untrained, or diverging) differs by far more than 1e-4 and must still verify.
    from cnnkit.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoints["simple_cnn"])
    with torch.no_grad():
        ckpt.model.classifier[-1].weight.mul_(1e7)
    r = cnnkit.export(ckpt, "onnx", str(tmp_path / "big.onnx"), verify=True)
    assert max(c.max_abs_logit for c in r.checks) > 1e6 and r.max_abs_diff > 1e-4, r.checks
    assert r.verified, r.checks


def test_onnx_file_carries_metadata_and_a_dynamic_batch_axis(tmp_path, checkpoints):
    out = tmp_path / "m.onnx"
    cnnkit.export(checkpoints["cnn_bn"], "onnx", str(out))
    model = onnx.load(str(out))
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["classes"]) == CLASSES
    assert json.loads(meta["input_size"]) == 32 and json.loads(meta["channels"]) == 3
    assert json.loads(meta["mean"]) == MEAN and json.loads(meta["std"]) == STD
    assert json.loads(meta["model"])["name"] == "cnn_bn"
    for value in (model.graph.input[0], model.graph.output[0]):
        batch = value.type.tensor_type.shape.dim[0]
        assert batch.dim_param and not batch.dim_value  # symbolic, not a fixed size
    assert ort_logits(out, torch.randn(5, 3, 32, 32)).shape == (5, 4)
    deployed = cnnkit.OnnxModel(str(out))
    assert (deployed.classes, deployed.input_size, deployed.channels) == (CLASSES, 32, 3)
    assert (deployed.mean, deployed.std, deployed.model_name) == (MEAN, STD, "cnn_bn")


def test_torchscript_file_carries_metadata(tmp_path, checkpoints):
    out = tmp_path / "m.pt"
    cnnkit.export(checkpoints["simple_cnn"], "torchscript", str(out))
    extra = {"classes": "", "model": "", "mean": ""}
    torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["classes"]) == CLASSES and json.loads(extra["model"])["name"] == "simple_cnn"
    assert json.loads(extra["mean"]) == MEAN


@pytest.mark.parametrize("format, ending", [("onnx", ".onnx"), ("torchscript", ".ts")])
def test_a_model_left_in_train_mode_exports_eval_behaviour_and_keeps_its_modes(tmp_path, checkpoints, format, ending):
    ckpt = cnnkit.load_checkpoint(checkpoints["cnn_bn"])
    reference = cnnkit.load_checkpoint(checkpoints["cnn_bn"]).model  # eval mode
    ckpt.model.train()
    ckpt.model.features[1].eval()  # a mix of modes, as with a frozen BatchNorm, must come back as it was
    modes = [m.training for m in ckpt.model.modules()]
    state = copy.deepcopy(ckpt.model.state_dict())
    out = tmp_path / f"m{ending}"

    r = cnnkit.export(ckpt, format, str(out), verify=True)

    assert r.verified and [c.batch_size for c in r.checks] == [1, 7]
    assert [m.training for m in ckpt.model.modules()] == modes
    after = ckpt.model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # no running statistics were updated
    exported = (lambda x: ort_logits(out, x)) if format == "onnx" else torch.jit.load(str(out))
    for batch in (1, 7):
        x = torch.randn(batch, 3, 32, 32)
        with torch.no_grad():
            want = reference(x)
            got = exported(x)
            leaked = copy.deepcopy(reference).train()(x)  # what batch statistics would have given
        assert (got - want).abs().max() < 1e-4
        assert batch == 1 or (leaked - want).abs().max() > 1e-2  # the check above can tell the two apart


def test_an_export_that_fails_verify_does_not_replace_the_file_at_out(tmp_path, checkpoints):
    # It replaced it, though the message said "do not deploy it": the good export there was lost
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"the export that is deployed")
    r = cnnkit.export(checkpoints["cnn_bn"], "safetensors", str(out), verify=True, tolerance=0.0)  # nothing passes
    assert r.verified is False and r.path == str(tmp_path / "m.unverified.safetensors")
    assert out.read_bytes() == b"the export that is deployed"
    assert cnnkit.load_checkpoint(r.path).classes == CLASSES  # kept whole, to look into
    r = cnnkit.export(checkpoints["cnn_bn"], "safetensors", str(out), verify=True)
    assert r.verified and r.path == str(out) and cnnkit.load_checkpoint(str(out)).classes == CLASSES
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # the passing export went through the same name


def test_safetensors_round_trip_rebuilds_the_checkpoint(tmp_path, checkpoints, image_folder):
    out = tmp_path / "m.safetensors"
    r = cnnkit.export(checkpoints["cnn_bn"], "safetensors", str(out), verify=True)
    assert r.verified and r.max_abs_diff == 0.0
    original, loaded = cnnkit.load_checkpoint(checkpoints["cnn_bn"]), cnnkit.load_checkpoint(str(out))
    assert (loaded.classes, loaded.input_size, loaded.channels) == (CLASSES, 32, 3)
    assert (loaded.mean, loaded.std) == (MEAN, STD)
    assert loaded.model.cnnkit_config == original.model.cnnkit_config and not loaded.model.training
    for k, v in original.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    assert cnnkit.predict(str(out), [image_folder]) == cnnkit.predict(checkpoints["cnn_bn"], [image_folder])


def test_cli_export_verifies_on_random_and_real_images(tmp_path, trained_run, image_folder):
    out = tmp_path / "deploy" / "model.onnx"
    proc = run_cli("export", trained_run, "--format", "onnx", "--out", out, "--verify-images", image_folder, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["verified"] and result["max_abs_diff"] < 1e-4 and result["path"] == str(out)
    assert [(c["inputs"], c["batch_size"]) for c in result["checks"]] == [("random", 1), ("random", 7), ("images", 32)]
    print("cnn_bn onnx, trained:", result["checks"])

    text = run_cli("export", trained_run, "--format", "torchscript", "--out", tmp_path / "m.ts", "--verify")
    assert text.returncode == 0 and "ok (tolerance 0.0001 of the largest logit, at least 0.0001; logits up to" in text.stdout and "random x7" in text.stdout


def test_cli_onnx_predictions_equal_the_checkpoints(tmp_path, trained_run, image_folder):
    out = tmp_path / "model.onnx"
    cnnkit.export(trained_run, "onnx", str(out))
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    from_onnx = run_cli("predict", out, image_folder, bad, "--topk", "3", "--json")
    from_checkpoint = run_cli("predict", trained_run, image_folder, bad, "--topk", "3", "--json")
    assert from_onnx.returncode == from_checkpoint.returncode == 1 and "bad.png" in from_onnx.stderr
    onnx_items, ckpt_items = json.loads(from_onnx.stdout), json.loads(from_checkpoint.stdout)
    assert len(onnx_items) == len(ckpt_items) == 33
    assert onnx_items[-1]["path"] == str(bad) and "error" in onnx_items[-1]
    worst = 0.0
    for a, b in zip(onnx_items[:-1], ckpt_items[:-1]):
        assert a["path"] == b["path"] and [t["class"] for t in a["top"]] == [t["class"] for t in b["top"]]
        worst = max(worst, *(abs(s["prob"] - t["prob"]) for s, t in zip(a["top"], b["top"])))
    assert worst < 1e-4
    print("largest probability difference, ONNX vs checkpoint, 32 images:", worst)


@pytest.fixture
def without(tmp_path):
    """An environment in which the named packages fail to import, as when the optional extra is not installed."""
    def env(*packages):
        shadow = tmp_path / "shadow"
        for name in packages:
            (shadow / name).mkdir(parents=True)
            (shadow / name / "__init__.py").write_text(f"raise ImportError(\"No module named '{name}'\")\n")
        return {"PYTHONPATH": str(shadow)}
    return env


def test_missing_optional_packages_name_the_extra(tmp_path, checkpoints, without):
    proc = run_cli("export", checkpoints["cnn_bn"], "--format", "onnx", "--out", tmp_path / "m.onnx",
                   env=without("onnx"))
    assert_one_line_error(proc, 2, "onnx", "pip install 'cnnkit[export]'")
    assert not (tmp_path / "m.onnx").exists()
    cnnkit.export(checkpoints["cnn_bn"], "onnx", str(tmp_path / "m.onnx"))
    proc = run_cli("predict", tmp_path / "m.onnx", tmp_path, env=without("onnxruntime"))
    assert_one_line_error(proc, 2, "onnxruntime", "pip install 'cnnkit[export]'")


def test_bad_export_requests_are_one_line_errors(tmp_path, checkpoints):
    ckpt = checkpoints["cnn_bn"]
    (tmp_path / "a_file").write_text("")
    cases = [
        (["export", tmp_path / "missing", "--format", "onnx", "--out", tmp_path / "m.onnx"], ["does not exist"]),
        (["export", ckpt, "--format", "tflite", "--out", tmp_path / "m.onnx"], ["--format", "invalid choice"]),
        (["export", ckpt, "--format", "onnx", "--out", tmp_path / "a_file" / "m.onnx"], ["cannot write", "a_file"]),
    ]
    for args, words in cases:
        assert_one_line_error(run_cli(*args), 2, *words)
    # The same UserError path, through the Python API to save a process start each.
    for format, out, message in [
        ("onnx", tmp_path, "is a folder"),
        ("onnx", tmp_path / "m.pt", "must end in .onnx"),
        ("torchscript", ckpt, "is the checkpoint being exported"),
        ("tflite", tmp_path / "m.tflite", "unknown export format 'tflite'; choose one of onnx, torchscript"),
    ]:
        with pytest.raises(UserError, match=message):
            cnnkit.export(ckpt, format, str(out))
    assert sorted(os.listdir(tmp_path)) == ["a_file"]  # nothing half-written was left behind


def test_files_that_are_not_cnnkit_exports_are_refused(tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07garbage")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        cnnkit.OnnxModel(str(garbage))
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    plain = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
              [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])), str(plain))
    with pytest.raises(CheckpointError, match="not exported by cnnkit"):
        cnnkit.predict(str(plain), [str(tmp_path)])
    with pytest.raises(UserError, match="ONNX export"):
        cnnkit.load_checkpoint(str(plain))


def test_a_folder_given_as_the_onnx_file_is_named_a_folder(tmp_path):
    # It said "ONNX file model.onnx does not exist" of a folder that does.
    folder = tmp_path / "model.onnx"
    folder.mkdir()
    with pytest.raises(UserError, match=f"ONNX file {folder} is a folder, not a file; pass the .onnx file") as caught:
        cnnkit.OnnxModel(str(folder))
    assert caught.value.exit_code == 2
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match="damaged"):
        cnnkit.load_checkpoint(str(damaged))



@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_and_exports_get_an_ordinary_files_permissions(tmp_path, umask):
    """Not mkstemp's private 0600: a serving container or a colleague reads model.onnx like any new file."""
    from cnnkit.atomic import atomic_write

    old = os.umask(umask)
    try:
        ckpt = write_checkpoint(tmp_path / "best.pt", "simple_cnn")
        paths = [ckpt]
        for format, ending in (("onnx", ".onnx"), ("torchscript", ".ts"), ("safetensors", ".safetensors")):
            paths.append(cnnkit.export(ckpt, format, str(tmp_path / f"model{ending}")).path)
        atomic_write(str(tmp_path / "report.html"), lambda f: f.write(b"<html></html>"))
        paths.append(str(tmp_path / "report.html"))
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "plain.txt").st_mode & 0o777 == 0o666 & ~umask
    assert {os.path.basename(p): oct(os.stat(p).st_mode & 0o777) for p in paths} == \
        {os.path.basename(p): oct(0o666 & ~umask) for p in paths}
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_a_torchscript_export_given_where_a_checkpoint_goes_is_named_as_one(tmp_path):
    # torch.load(weights_only=True) refuses TorchScript archives with a warning and an error that read as damage.
    from cnnkit.checkpoint import load_checkpoint

    path = tmp_path / "m.ts"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    # a usage error (exit code 2, as for a .safetensors without --data), not a file that failed to load (1)
    with pytest.raises(UserError, match="is a TorchScript export, for torch.jit.load in your own code"):
        load_checkpoint(str(path))
    write_image_folder(tmp_path / "data", n_per_class=1, size=16, classes=1)
    image = next((tmp_path / "data").rglob("*.png"))
    r = run_cli("predict", path, image)
    assert r.returncode == 2 and "TorchScript export" in r.stderr and "damaged" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("bad", ["missing", "undecodable"])
def test_bad_verify_images_fail_before_an_existing_export_is_replaced(tmp_path, checkpoints, bad):
    # The export used to be written over --out first and the images read afterwards: the command failed, and the
    # file it had been asked to replace was gone all the same.
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"the export a server is reading")
    images = tmp_path / "images"
    images.mkdir()
    if bad == "undecodable":
        (images / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises((UserError, DataError)):
        cnnkit.export(checkpoints["cnn_bn"], "safetensors", str(out), images=[str(images / "none.png")
                      if bad == "missing" else str(images)])
    assert out.read_bytes() == b"the export a server is reading"
    assert sorted(os.listdir(tmp_path)) == ["images", "model.safetensors"]


def test_verify_images_passes_over_a_broken_image_in_a_folder_and_warns(tmp_path, checkpoints):
    # check-data, train and predict pass over a photo cut short; export --verify-images failed on it (exit 1,
    # nothing written), though the other images of the folder could be compared on.
    images = write_image_folder(tmp_path / "photos", n_per_class=2, classes=2)
    broken = tmp_path / "photos" / "circle" / "000_cut.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "model.safetensors"
    r = cnnkit.export(checkpoints["cnn_bn"], "safetensors", str(out), images=[images])
    assert r.verified and os.path.isfile(out)
    assert [(c.inputs, c.batch_size) for c in r.checks][-1] == ("images", 4)
    assert len(r.warnings) == 1 and str(broken) in r.warnings[0] and "left out 1 broken image(s)" in r.warnings[0]

    proc = run_cli("export", checkpoints["cnn_bn"], "--format", "safetensors", "--out", tmp_path / "cli.safetensors",
                   "--verify-images", images)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("cnnkit: warning: left out 1 broken image(s)") and str(broken) in proc.stderr

    # named on its own, the file is the user's choice: still an error, saying what to do
    with pytest.raises(DataError, match=r"cannot decode image .*000_cut.png: .*; fix it, or leave it out of "
                                        r"--verify-images"):
        cnnkit.export(checkpoints["cnn_bn"], "safetensors", str(tmp_path / "named.safetensors"),
                      images=[str(broken), images])
    assert not os.path.exists(tmp_path / "named.safetensors")
