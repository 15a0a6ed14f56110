import json
import os

import pytest
from PIL import Image

from tests.conftest import run_cli, write_image_folder
from tests.inspect.conftest import assert_picture
from tests.test_cli import assert_one_line_error


def test_shape_prints_the_formula_with_the_numbers():
    proc = run_cli("shape", "--size", 5, "--kernel", 3, "--stride", 2, "--padding", 1)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "conv output size: 3",
        "  floor((H + 2p - d(k-1) - 1) / s) + 1",
        "  = floor((5 + 2*1 - (3-1) - 1) / 2) + 1 = floor(4 / 2) + 1 = 3",
    ]
    pool = json.loads(run_cli("shape", "--size", 7, "--kernel", 2, "--stride", 2, "--pool", "max", "--ceil-mode",
                              "--json").stdout)
    assert pool["output_size"] == 4 and pool["kind"] == "maxpool"


def test_summary_json_for_resnet18():
    proc = run_cli("summary", "resnet18", "--input-size", 3, 224, 224, "--json")
    assert proc.returncode == 0, proc.stderr
    s = json.loads(proc.stdout)
    assert s["total_params"] == 11_689_512 and abs(s["total_macs"] / 1.814e9 - 1) < 0.01
    layer = next(x for x in s["layers"] if x["name"] == "layer1.0")
    assert layer["output_shape"] == [64, 56, 56]
    assert {"name", "type", "output_shape", "params", "macs", "rf", "jump"} <= set(layer)
    assert {"layers", "total_params", "trainable_params", "total_macs"} <= set(s)


def test_rf_json_and_verify():
    r = json.loads(run_cli("rf", "resnet18", "--json").stdout)
    assert next(x for x in r["layers"] if x["name"] == "layer4")["rf"] == 435
    assert r["input_size"] == [3, 224, 224] and r["covers_input"] is True
    assert {"name", "rf", "jump", "start"} <= set(r["layers"][0])
    proc = run_cli("rf", "simple_cnn", "--verify", "--depth", 1)
    assert proc.returncode == 0, proc.stderr
    assert "features: rf 22 px on a 32x32 input" in proc.stdout and "DIFFERS" not in proc.stdout
    assert proc.stdout.count("agrees") == 6


def test_features_filters_cam_and_effective_field_of_a_run(trained_run, shape_image, tmp_path):
    layers = run_cli("features", trained_run, "--list-layers")
    assert layers.returncode == 0 and "features.3" in layers.stdout and "64x16x16" in layers.stdout
    proc = run_cli("features", trained_run, "--layer", "features.0", "--layer", "features.5", "--image", shape_image,
                   "--out", tmp_path / "maps")
    assert proc.returncode == 0, proc.stderr
    assert sorted(os.listdir(tmp_path / "maps")) == ["features.0.png", "features.5.png"]
    assert_picture(tmp_path / "maps" / "features.5.png")
    proc = run_cli("filters", trained_run, "--out", tmp_path / "filters.png", "--json")
    assert json.loads(proc.stdout)["mode"] == "rgb"
    assert_picture(tmp_path / "filters.png")
    proc = run_cli("cam", trained_run, "--image", shape_image, "--method", "gradcam++", "--out", tmp_path / "cam.png",
                   "--json")
    cam = json.loads(proc.stdout)
    assert cam["methods"] == ["gradcam++"] and cam["layer"] == "features.7"
    assert_picture(tmp_path / "cam.png", (2 * 224 + 2, 18 + 18 + 224))  # title, panel labels, image and overlay
    proc = run_cli("rf", trained_run, "--effective", tmp_path / "erf.png", "--images", 4)
    assert proc.returncode == 0, proc.stderr
    assert "effective field of features" in proc.stdout
    assert_picture(tmp_path / "erf.png")


def test_features_and_filters_of_a_model_name_note_its_random_weights(trained_run, shape_image, tmp_path):
    proc = run_cli("features", "simple_cnn", "--layer", "features.0", "--image", shape_image, "--out", tmp_path / "m")
    assert proc.returncode == 0 and proc.stderr.startswith(
        "cnnkit: note: simple_cnn is a model name, built with random weights: the maps show an untrained network's "
        "response, nothing learned; pass a run folder or checkpoint"), proc.stderr
    proc = run_cli("filters", "simple_cnn", "--out", tmp_path / "f.png")
    assert proc.returncode == 0 and proc.stderr.startswith(
        "cnnkit: note: simple_cnn is a model name, built with random weights: its kernels are the random initial "
        "values, nothing learned"), proc.stderr
    for args in (["features", trained_run, "--layer", "features.0", "--image", shape_image, "--out", tmp_path / "m2"],
                 ["features", "simple_cnn", "--list-layers"], ["filters", trained_run, "--out", tmp_path / "f2.png"]):
        proc = run_cli(*args)
        assert proc.returncode == 0 and "random weights" not in proc.stderr, (args, proc.stderr)


def test_cam_and_embed_of_a_model_name_note_its_random_weights(trained_run, shape_image, tmp_path):
    note = "cnnkit: note: simple_cnn is a model name, built with random weights: the map shows no learned evidence"
    proc = run_cli("cam", "simple_cnn", "--image", shape_image, "--out", tmp_path / "cam.png")
    assert proc.returncode == 0 and proc.stderr.startswith(note), proc.stderr
    proc = run_cli("cam", trained_run, "--image", shape_image, "--out", tmp_path / "cam2.png")
    assert proc.returncode == 0 and "random weights" not in proc.stderr, proc.stderr
    write_image_folder(tmp_path / "data", n_per_class=4, size=32, classes=2)
    proc = run_cli("embed", "simple_cnn", tmp_path / "data", "--out", tmp_path / "f.npy")
    assert proc.returncode == 0 and "simple_cnn is a model name, built with random weights: its features are an " \
        "untrained network's; add --pretrained or pass a run folder or checkpoint" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, words", [
    (["summary", "resnet18", "--input-size", "3", "224"], ["--input-size takes C H W", "2 numbers"]),
    (["shape", "--size", "5", "--kernel", "7"], ["impossible conv", "larger than the padded input"]),
    (["features", "resnet18", "--layer", "layer9", "--image", "x.png", "--out", "maps"], ["no layer 'layer9'"]),
    (["cam", "simple_cnn", "--image", "no/such.png", "--out", "c.png"], ["no/such.png does not exist"]),
])
def test_bad_input_is_one_line(args, words, tmp_path):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), 2, *words)


def test_an_image_that_is_a_folder_and_a_features_out_that_is_a_file_are_one_line(trained_run, tmp_path):
    (tmp_path / "photos").mkdir()
    proc = run_cli("cam", trained_run, "--image", tmp_path / "photos", "--out", tmp_path / "c.png")
    assert_one_line_error(proc, 2, "photos is a folder", "pass one image file")
    (tmp_path / "taken").write_text("")
    image = tmp_path / "star.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    proc = run_cli("features", trained_run, "--layer", "features.0", "--image", image, "--out", tmp_path / "taken")
    assert_one_line_error(proc, 2, "--out", "taken is a file", "folder")
    proc = run_cli("features", trained_run, "--layer", "features.0", "--image", image,
                   "--out", tmp_path / "taken" / "maps")
    assert_one_line_error(proc, 2, "cannot create the folder", "maps")
    assert (tmp_path / "taken").read_text() == ""


@pytest.mark.parametrize("option", [["--layer", "features.3"], ["--images", "4"], ["--images-from", "photos"]])
def test_rf_options_of_the_effective_field_without_it_are_refused(option):
    """`rf simple_cnn --layer features.3` printed the whole table as if --layer were not there."""
    assert_one_line_error(run_cli("rf", "simple_cnn", *option), 2, f"{option[0]} applies to the effective field",
                          "add --effective PNG")


def test_features_filters_and_cam_build_a_model_name_with_its_options(capsys, shape_image, tmp_path):
    """A model trained with --model-opt could be summarised by name with those options but not looked at:
    features, filters and cam refused --model-opt and --num-classes as unrecognised arguments."""
    from cnnkit.cli import main

    build = ["--model-opt", "widths=[8,16]", "--num-classes", "3"]
    assert main(["features", "convnet", *build, "--list-layers", "--json"]) == 0
    rows = {x["name"]: x["output_shape"] for x in json.loads(capsys.readouterr().out)}
    assert rows["features.1.0"] == [16, 16, 16] and rows["classifier.2"] == [3]
    assert main(["features", "convnet", *build, "--layer", "features.1", "--image", shape_image,
                 "--out", str(tmp_path / "maps"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["shape"] == [16, 8, 8]
    assert main(["filters", "convnet", *build, "--out", str(tmp_path / "f.png"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["weight_shape"] == [8, 3, 3, 3]
    assert main(["cam", "convnet", *build, "--image", shape_image, "--class", "2", "--out", str(tmp_path / "c.png"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layer"] == "features.1.2"
    for command in (["features", "--list-layers"], ["filters", "--out", str(tmp_path / "g.png")],
                    ["cam", "--image", shape_image, "--out", str(tmp_path / "d.png")]):
        assert main([command[0], "convnet", "--model-opt", "num_classes=3", *command[1:]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].endswith("--model-opt num_classes: this option is set by --num-classes; use that instead")


def test_the_python_api_builds_a_model_name_with_its_options(shape_image, tmp_path):
    import cnnkit

    assert cnnkit.filters("convnet", out=str(tmp_path / "f.png"), widths=(8, 16)).weight_shape == [8, 3, 3, 3]
    maps = cnnkit.feature_maps("convnet", ["features.1"], shape_image, str(tmp_path / "m"), widths=(8, 16))
    assert maps[0].shape == [16, 8, 8]
    cam = cnnkit.class_activation_map("convnet", shape_image, 4, out=str(tmp_path / "c.png"), num_classes=5,
                                      widths=(8, 16))
    assert cam.class_index == 4 and cam.layer == "features.1.2"


def test_list_layers_says_which_layers_run_more_than_once_and_which_call_is_drawn(capsys, shape_image, tmp_path):
    """resnet50's layer4.2.relu was listed as a 512-channel ReLU, and `--layer layer4.2.relu` drew 2048 channels
    (the block's output, its third call) with nothing to say why."""
    from cnnkit.cli import main

    assert main(["features", "resnet50", "--input-size", "64", "--list-layers"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert next(x for x in out if x.startswith("layer4.2.relu ")).split()[1:] == ["ReLU", "x3", "512x2x2"]
    assert out[-1].startswith("xN: the layer runs N times in one forward pass; the shape is its first call's")
    assert main(["features", "resnet50", "--input-size", "64", "--list-layers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert next(x for x in rows if x["name"] == "layer4.2.relu")["calls"] == 3
    assert main(["features", "resnet50", "--input-size", "64", "--layer", "layer4.2.relu", "--image", shape_image,
                 "--out", str(tmp_path / "maps"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["shape"] == [2048, 2, 2]
    assert main(["features", "simple_cnn", "--list-layers"]) == 0
    assert "xN:" not in capsys.readouterr().out


def test_cam_of_a_vision_transformer_warns_that_its_default_layer_is_the_patch_embedding(shape_image, tmp_path):
    """`cnnkit cam vit_b_16` mapped conv_proj, the patch embedding before all of the attention, with no word that
    such a map shows little of what decided the class."""
    import cnnkit

    c = cnnkit.class_activation_map("vit_b_16", shape_image, out=str(tmp_path / "vit.png"), input_size=32)
    assert c.layer == "conv_proj" and len(c.warnings) == 1
    assert c.warnings[0].startswith("conv_proj is this model's only convolution, a patch embedding (16x16 with "
                                    "stride 16)")
    asked = cnnkit.class_activation_map("vit_b_16", shape_image, layer="conv_proj", out=str(tmp_path / "v2.png"),
                                        input_size=32)
    assert asked.warnings == []  # chosen on purpose
    assert cnnkit.class_activation_map("simple_cnn", shape_image, out=str(tmp_path / "s.png")).warnings == []
    proc = run_cli("cam", "vit_b_16", "--input-size", 32, "--image", shape_image, "--out", tmp_path / "v3.png")
    assert proc.returncode == 0 and "cnnkit: warning: conv_proj is this model's only convolution" in proc.stderr


@pytest.mark.parametrize("command", [
    ["features", "vgg16", "--input-size", "16", "--layer", "features.0", "--out", "maps"],
    ["cam", "vgg16", "--input-size", "16", "--layer", "features.0", "--out", "cam.png"],
])
def test_an_input_too_small_for_features_or_a_chosen_cam_layer_is_one_line_with_the_smallest_size(
        capsys, shape_image, tmp_path, command):
    """`cnnkit features vgg16 --input-size 16` ran the forward pass unchecked: an internal error, RuntimeError."""
    from cnnkit.cli import main

    command = [str(tmp_path / x) if x in ("maps", "cam.png") else x for x in command]
    assert main([*command, "--image", shape_image]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "internal error" not in err, err
    assert err.endswith("cannot take a 3x16x16 input (Given input size: (512x1x1). Calculated output size: "
                        "(512x0x0). Output size is too small); use a larger --input-size (the smallest it takes: 32)")
    assert not os.path.exists(command[command.index("--out") + 1])  # features made no empty --out folder


@pytest.mark.parametrize("name, size, smallest", [("vgg16", 16, 32), ("alexnet", 32, 63), ("inception_v3", 64, 75)])
def test_an_input_too_small_names_the_smallest_size_the_model_takes(name, size, smallest):
    import cnnkit
    from cnnkit.errors import UserError

    with pytest.raises(UserError, match=rf"use a larger --input-size \(the smallest it takes: {smallest}\)$"):
        cnnkit.summary(name, input_size=size)
    cnnkit.summary(name, input_size=smallest)  # it does take that one
    with pytest.raises(UserError, match=rf"the smallest it takes: {smallest}\)$"):  # and not one pixel less
        cnnkit.summary(name, input_size=smallest - 1)


def test_features_out_naming_a_picture_is_refused_not_made_a_folder(shape_image, tmp_path):
    # --out is features' folder for one PNG per layer: maps/y.png became a folder holding features.0.png.
    out = tmp_path / "maps" / "y.png"
    proc = run_cli("features", "simple_cnn", "--layer", "features.0", "--image", shape_image, "--out", out)
    assert_one_line_error(proc, 2, f"--out {out} names a picture", "one PNG per layer into a folder",
                          f"pass a folder, such as {tmp_path / 'maps'} (for {tmp_path / 'maps' / 'features.0.png'})")
    assert not (tmp_path / "maps").exists()


def test_rf_effective_says_which_images_and_takes_your_own(tmp_path):
    """`rf RUN --effective` averaged over generated shapes images, said only "16 images", and could not be given
    the user's photos (the Python function took images=, the command line nothing)."""
    photos = write_image_folder(tmp_path / "photos", n_per_class=2, classes=2)
    broken = tmp_path / "photos" / "circle" / "000_cut.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n")
    proc = run_cli("rf", "simple_cnn", "--effective", tmp_path / "erf.png", "--images-from", photos, "--images", 3)
    assert proc.returncode == 0, proc.stderr
    assert f"(theoretical rf 22 px, 3 images from {photos}); heat map in" in proc.stdout
    assert proc.stderr.count("cnnkit: warning: left out 1 broken image(s) of") == 1 and str(broken) in proc.stderr
    proc = run_cli("rf", "simple_cnn", "--effective", tmp_path / "erf.png", "--images", 2)
    assert "(theoretical rf 22 px, 2 generated shapes images); heat map in" in proc.stdout
