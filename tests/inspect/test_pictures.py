"""Feature maps, filters and class activation maps: real PNG files of the expected size, not blank."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import cnnkit
import cnnkit.progress
from cnnkit.errors import UserError
from cnnkit.inspect.cam import cam_heatmaps, default_cam_layer, last_conv_layer
from cnnkit.inspect.loading import load_model, prepare_image

from tests.conftest import run_cli
from tests.inspect.conftest import assert_picture


def test_feature_maps_one_grid_per_layer(trained_run, shape_image, tmp_path):
    maps = cnnkit.feature_maps(trained_run, ["features.0", "features.3", "classifier.1"], shape_image,
                               str(tmp_path / "maps"))
    first, second, linear = maps
    assert (first.shape, first.channels_shown) == ([32, 32, 32], 32)
    assert_picture(first.path, (6 * 64 + 5 * 2, 6 * 64 + 5 * 2 + 18))  # 6x6 grid of 32-pixel maps enlarged twice
    assert (second.shape, second.channels_shown) == ([64, 16, 16], 64)
    assert_picture(second.path, (8 * 64 + 7 * 2, 8 * 64 + 7 * 2 + 18))  # 16-pixel maps enlarged 4 times
    assert linear.shape == [256] and linear.path.endswith("classifier.1.png")
    assert_picture(linear.path, body=(64, 64))  # 256 features as one 16x16 map, enlarged 4 times


def test_feature_maps_show_at_most_max_channels(trained_run, shape_image, tmp_path):
    (m,) = cnnkit.feature_maps(trained_run, ["features.6"], shape_image, str(tmp_path), max_channels=9)
    assert m.channels_shown == 9 and m.shape == [128, 8, 8]
    assert_picture(m.path, body=(3 * 64 + 2 * 2, 3 * 64 + 2 * 2))


def test_feature_map_errors(trained_run, shape_image, tmp_path):
    with pytest.raises(UserError, match="no layer 'features.66'"):
        cnnkit.feature_maps(trained_run, ["features.66"], shape_image, str(tmp_path))
    with pytest.raises(UserError, match="nope.png does not exist"):
        cnnkit.feature_maps(trained_run, ["features.0"], str(tmp_path / "nope.png"), str(tmp_path))
    with pytest.raises(UserError, match="at least one --layer"):
        cnnkit.feature_maps(trained_run, [], shape_image, str(tmp_path))


def test_feature_maps_of_a_layer_the_forward_pass_skips_write_no_picture(shape_image, tmp_path):
    """Asked for a used layer and then an unused one (Inception's auxiliary head in eval mode), feature_maps
    wrote the first picture before it refused the second: a failed command left part of its output."""
    model = cnnkit.create_model("simple_cnn")
    model.unused = torch.nn.Conv2d(3, 4, 3)
    with pytest.raises(UserError, match="layer 'unused' was not used by the forward pass"):
        cnnkit.feature_maps(model, ["features.0", "unused"], shape_image, str(tmp_path / "maps"))
    assert not (tmp_path / "maps").exists() or os.listdir(tmp_path / "maps") == []


def test_first_layer_filters_as_colour_patches(trained_run, tmp_path):
    f = cnnkit.filters(trained_run, out=str(tmp_path / "f.png"))
    assert (f.layer, f.weight_shape, f.mode, f.filters_shown) == ("features.0", [32, 3, 3, 3], "rgb", 32)
    assert_picture(f.path, body=(6 * 48 + 5 * 2, 6 * 48 + 5 * 2))  # 3x3 kernels enlarged 16 times: not a stamp


@pytest.mark.parametrize("mode, body", [("channels", (16 * 48 + 15 * 2, 16 * 48 + 15 * 2)),
                                        ("mean", (8 * 48 + 7 * 2, 8 * 48 + 7 * 2))])
def test_deeper_filters_per_input_channel_or_averaged(trained_run, tmp_path, mode, body):
    f = cnnkit.filters(trained_run, "features.3", str(tmp_path / f"{mode}.png"), mode=mode)
    assert f.weight_shape == [64, 32, 3, 3] and f.mode == mode
    assert_picture(f.path, body=body)


def test_channels_mode_says_it_shows_only_the_first_16_input_channels(trained_run, tmp_path):
    """--mode channels draws at most 16 input channels of each filter; of features.3's 32 it said nothing (the
    picture's title and the command's line named only the filters left out)."""
    f = cnnkit.filters(trained_run, "features.3", str(tmp_path / "c.png"), mode="channels")
    assert (f.filters_shown, f.inputs_shown) == (16, 16)
    assert cnnkit.filters(trained_run, "features.3", str(tmp_path / "m.png"), mode="mean").inputs_shown == 32
    proc = run_cli("filters", trained_run, "--layer", "features.3", "--mode", "channels", "--out", tmp_path / "c.png")
    assert proc.returncode == 0 and "16 shown (channels, input channels 1-16 of 32)" in proc.stdout, proc.stdout


def test_filter_errors(trained_run, tmp_path):
    with pytest.raises(UserError, match="ReLU, not a Conv2d.*features.0, features.3"):
        cnnkit.filters(trained_run, "features.1", str(tmp_path / "f.png"))
    with pytest.raises(UserError, match="rgb needs kernels with 3 input channels"):
        cnnkit.filters(trained_run, "features.3", str(tmp_path / "f.png"), mode="rgb")


def test_fastnets_first_filters_are_its_whitening_filters(tmp_path, capsys):
    """fastnet's first convolution is a fixed 2x2 whitening, held as a buffer and applied in forward, not a Conv2d:
    `cnnkit filters fastnet` showed the first ConvGroup's 3x3 kernels (averaged over 24 channels), and no --layer
    reached the whitening filters, the most telling ones of that network."""
    from cnnkit.cli import main

    model = cnnkit.create_model("fastnet", num_classes=10, input_size=32)
    torch.manual_seed(0)
    model.init_from_data(torch.randn(64, 3, 32, 32).cumsum(dim=3))  # correlated neighbours, as in photos
    f = cnnkit.filters(model, out=str(tmp_path / "w.png"))
    assert (f.layer, f.weight_shape, f.mode, f.filters_shown) == ("whiten_weight", [24, 3, 2, 2], "rgb", 24)
    assert_picture(f.path, body=(5 * 48 + 4 * 2, 5 * 48 + 4 * 2))  # 2x2 kernels enlarged 24 times
    drawn = np.asarray(Image.open(f.path).convert("RGB"))[18:18 + 48, :48].astype(int)  # the first filter
    w = model.whiten_weight[0]
    expected = ((w - w.min()) / (w.max() - w.min()) * 255).round().permute(1, 2, 0).int().numpy()
    assert (drawn[::24, ::24] == expected).all()  # its own values, not another layer's
    assert main(["filters", "fastnet", "--layer", "whiten_weight", "--mode", "channels", "--out",
                 str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.startswith("whiten_weight: 24x3x2x2 kernels, 16 shown (channels")
    with pytest.raises(UserError, match="a GELU, not a Conv2d; convolutional layers are whiten_weight, layers.1.conv1"):
        cnnkit.filters("fastnet", "layers.0", str(tmp_path / "g.png"))
    assert cnnkit.filters("resnet18", out=str(tmp_path / "r.png"), input_size=32).layer == "conv1"  # as before


def test_default_cam_layer_is_the_last_convolution_after_its_activation():
    for name, expected in [("simple_cnn", "features.7"), ("resnet18", "layer4"), ("vgg16", "features.29"),
                           ("cnn_bn", "features.6"), ("densenet121", "features")]:
        target = load_model(name, meta=True)
        assert last_conv_layer(target.model, target.input_shape) == expected, name


def test_default_cam_layer_skips_maps_of_one_position():
    # At 32x32 a ResNet's layer4 (and the average pool after it) is 1x1: a map of it is one flat colour.
    model = cnnkit.create_model("resnet18", num_classes=3)
    assert last_conv_layer(model, (3, 32, 32)) == "layer3"
    assert last_conv_layer(model, (3, 64, 64)) == "layer4"  # 2x2, with a warning naming the finer layer3
    assert default_cam_layer(model, (3, 64, 64))[1] == [
        "the map of layer4 is 2x2 at 64x64, 4 blocks over the image; --layer layer3 (4x4) shows finer detail, "
        "from earlier in the network"]
    assert default_cam_layer(model, (3, 96, 96)) == ("layer4", [])  # 3x3
    with pytest.raises(UserError, match="every convolution's output is 1x1 at 1x1"):
        last_conv_layer(model, (3, 1, 1))


def test_default_cam_layer_is_a_stage_output_not_a_raw_convolution_or_norm_inside_a_block():
    """ConvNeXt's last convolution is its last block's depthwise one, whose block permutes to H x W x C: the
    default was that raw convolution, not the stage after it. A ResNet-50 at 32x32 (layer4 1x1 but its first
    1x1 convolution still 2x2, then the Bottleneck's one shared ReLU) got layer4.0.bn1, a BatchNorm's output
    before any activation, where the module doc promises layer3."""
    for name, size, expected in [("convnext_tiny", None, "features"), ("resnet50", 32, "layer3"),
                                 ("resnext50_32x4d", 32, "layer3"), ("resnet50", None, "layer4"),
                                 ("densenet121", 32, "features.transition3.relu"),
                                 ("mobilenet_v2", 32, "features.14.conv.0")]:
        target = load_model(name, size, meta=True)
        assert last_conv_layer(target.model, target.input_shape) == expected, (name, size)


def test_where_the_last_maps_are_1x1_the_default_cam_layer_is_what_the_rest_is_computed_from(shape_image, tmp_path):
    """`cnnkit cam inception_v3` at 75 pixels (its smallest) mapped Mixed_7a.branch7x7x3_3: Mixed_7c is 1x1 there,
    and the last convolution with more positions was one of Mixed_7a's branches, one share of the evidence. So
    were RegNet's (a block's main path beside its shortcut) and ShuffleNet's at 32. The default is now the last
    map with more positions that the rest of the network is computed from, and above 106 pixels Mixed_7c."""
    for name, size, expected in [("inception_v3", 75, "Mixed_6e"), ("inception_v3", 106, "Mixed_6e"),
                                 ("inception_v3", 107, "Mixed_7c"), ("inception_v3", None, "Mixed_7c"),
                                 ("regnet_y_400mf", 32, "trunk_output.block3"),
                                 ("shufflenet_v2_x0_5", 32, "stage3"), ("convnext_tiny", 32, "features.5"),
                                 ("googlenet", 32, "inception4e"), ("efficientnet_b0", 32, "features.6.0.block.0"),
                                 ("fastnet", None, "layers.3")]:
        target = load_model(name, size, meta=True)
        assert last_conv_layer(target.model, target.input_shape) == expected, (name, size)
    c = cnnkit.class_activation_map("inception_v3", shape_image, out=str(tmp_path / "i.png"), input_size=75,
                                    progress=False)
    assert c.layer == "Mixed_6e" and c.warnings == [
        "the last convolution's map is 1x1 at 75x75 (one value per channel: one flat colour), so the map is of "
        "Mixed_6e (3x3), the last block whose output has more positions; larger images map the layers after it"]
    # Mixed_7c is 2x2 at 107: mapped, with the finer layer to pass named (a 2x2 map came without a word).
    assert cnnkit.class_activation_map("inception_v3", shape_image, out=str(tmp_path / "j.png"), input_size=107,
                                       progress=False).warnings == [
        "the map of Mixed_7c is 2x2 at 107x107, 4 blocks over the image; --layer Mixed_6e (5x5) shows finer "
        "detail, from earlier in the network"]


def test_cam_heat_maps_are_input_sized_and_not_constant(trained_run, shape_image):
    target = load_model(trained_run)
    x, shown = prepare_image(target, shape_image)
    assert x.shape == (1, 3, 32, 32) and shown.shape == (32, 32, 3)
    maps, k, p, predicted = cam_heatmaps(target.model, x, "features.7", None, ("gradcam", "gradcam++", "scorecam"))
    assert k == predicted and 0 < p <= 1
    for method, heat in maps.items():
        assert heat.shape == (32, 32) and float(heat.min()) == 0 and float(heat.max()) == 1, method
    _, k, _, _ = cam_heatmaps(target.model, x, "features.7", 3)
    assert k == 3


def test_cam_picture_image_and_one_overlay_per_method(trained_run, shape_image, tmp_path):
    c = cnnkit.class_activation_map(trained_run, shape_image, target_class="star", method="all",
                                    out=str(tmp_path / "cam.png"))
    assert c.methods == ["gradcam", "gradcam++", "scorecam"] and c.layer == "features.7"
    assert (c.class_index, c.class_name) == (3, "star")
    # the 32-pixel image enlarged 7 times, 4 panels, each under its label, under the title
    assert_picture(c.path, (4 * 224 + 3 * 2, 18 + 18 + 224))
    pixels = np.asarray(Image.open(c.path).convert("RGB"), dtype=np.float32)
    labels = pixels[18:36]
    for i in range(4):  # each panel's label band holds dark text, centred
        band = labels[:, i * 226 : i * 226 + 224].min(axis=2)
        dark = np.nonzero((band < 128).any(axis=0))[0]
        assert len(dark) and abs((dark[0] + dark[-1]) / 2 - 112) < 12, i
    pixels = pixels[36:]
    image, overlay = pixels[:, :224], pixels[:, 226:450]
    assert np.abs(image - overlay).mean() > 20  # the heat map is drawn over the image
    assert overlay.std(axis=(0, 1)).mean() > 10


def test_cam_errors(trained_run, shape_image, tmp_path):
    out = str(tmp_path / "c.png")
    with pytest.raises(UserError, match="out of range"):
        cnnkit.class_activation_map(trained_run, shape_image, 10, out=out)
    with pytest.raises(UserError, match="unknown class 'hexagon'; classes are circle"):
        cnnkit.class_activation_map(trained_run, shape_image, "hexagon", out=out)
    with pytest.raises(UserError, match="unknown class 'cat': simple_cnn has no class names .*--class as an index"):
        cnnkit.class_activation_map("simple_cnn", shape_image, "cat", out=out)
    with pytest.raises(UserError, match="not a C x H x W map"):
        cnnkit.class_activation_map(trained_run, shape_image, layer="classifier.1", out=out)
    with pytest.raises(UserError, match="--method must be one of"):
        cnnkit.class_activation_map(trained_run, shape_image, method="lime", out=out)
    with pytest.raises(UserError, match="folder .* does not exist"):
        cnnkit.class_activation_map(trained_run, shape_image, out=str(tmp_path / "no" / "c.png"))


def test_pictures_are_written_in_the_format_their_suffix_names(trained_run, shape_image, tmp_path):
    """cam.jpg holds JPEG bytes (PNG bytes before), filters.webp WebP; a suffix that is no image format is a
    one-line error before anything is written."""
    c = cnnkit.class_activation_map(trained_run, shape_image, out=str(tmp_path / "cam.jpg"))
    with Image.open(c.path) as img:
        assert img.format == "JPEG" and img.size == (c.width, c.height)
    f = cnnkit.filters(trained_run, out=str(tmp_path / "f.webp"))
    with Image.open(f.path) as img:
        assert img.format == "WEBP"
    for name, what in (("cam.txt", "its suffix '.txt'"), ("cam", "a name without a suffix")):
        with pytest.raises(UserError, match=f"cannot write .*{name}: {what} names no image format cnnkit writes; "
                                            r"end it in \.png"):
            cnnkit.class_activation_map(trained_run, shape_image, out=str(tmp_path / name))
        assert not (tmp_path / name).exists()
    # a folder (a name without a suffix, too) was told it named no image format; it is told it is a folder
    (tmp_path / "maps").mkdir()
    with pytest.raises(UserError, match=f"cannot write {tmp_path / 'maps'}: it is a folder; name the picture to "
                                        f"write, such as {tmp_path / 'maps' / 'picture.png'}$"):
        cnnkit.class_activation_map(trained_run, shape_image, out=str(tmp_path / "maps"))


def test_a_picture_that_cannot_be_written_names_the_file_meant_not_a_temporary_one():
    # "cannot write f.png: [Errno 13] Permission denied: '/data/.f.png.k2j3.tmp'" named a file the user never chose
    from cnnkit.atomic import out_not_writable, why_not_written

    temp = PermissionError(13, "Permission denied", "/data/.f.png.k2j3.tmp")
    assert why_not_written(temp) == "Permission denied: /data"
    assert str(out_not_writable("/data/f.png", temp)) == ("cannot write --out /data/f.png (Permission denied: /data); "
                                                          "choose a path in a writable folder")
    assert why_not_written(PermissionError(13, "Permission denied", "/data/sub")) == "Permission denied: /data/sub"
    assert why_not_written(OSError("disk on fire")) == "disk on fire"


def test_a_picture_written_only_in_part_leaves_the_one_there_before(tmp_path):
    """A write stopped midway (the file-size limit standing in for a full disk) keeps the picture that was there
    whole and leaves no partial or temporary file: Pillow wrote over it in place, leaving half a PNG."""
    path = tmp_path / "cam.png"
    script = ("import resource, sys\n"
              "import numpy as np\n"
              "from cnnkit.errors import UserError\n"
              "from cnnkit.inspect.drawing import save_png\n"
              "noise = np.random.default_rng(int(sys.argv[2])).integers(0, 256, (256, 256, 3), dtype=np.uint8)\n"
              "if sys.argv[2] == '1':\n"
              "    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))\n"
              "try:\n"
              "    save_png(noise, 'title', sys.argv[1])\n"
              "except UserError as e:\n"
              "    print(e)\n")
    first = subprocess.run([sys.executable, "-c", script, str(path), "0"], capture_output=True, text=True)
    assert first.returncode == 0 and first.stdout == "", first.stderr
    before = path.read_bytes()
    assert len(before) > 100_000  # noise does not compress: far over the limit below
    second = subprocess.run([sys.executable, "-c", script, str(path), "1"], capture_output=True, text=True)
    assert second.returncode == 0 and second.stdout.startswith(f"cannot write {path}"), (second.stdout, second.stderr)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["cam.png"]


def test_score_cam_shows_its_progress(trained_run, shape_image, tmp_path, monkeypatch, capsys):
    """Score-CAM runs a forward pass per channel (2,048 for resnet50's layer4: ten minutes on a 2-core CPU), and
    ran them without a word; stderr, no terminal here, gets plain progress lines (every 0 s for the test)."""
    monkeypatch.setattr(cnnkit.progress, "PLAIN_EVERY_S", 0.0)
    cnnkit.class_activation_map(trained_run, shape_image, method="scorecam", out=str(tmp_path / "cam.png"))
    err = capsys.readouterr().err
    assert "Score-CAM  32/128 channel" in err and "Score-CAM  96/128 channel" in err, err
    cnnkit.class_activation_map(trained_run, shape_image, method="scorecam", out=str(tmp_path / "cam.png"),
                                progress=False)
    assert "Score-CAM" not in capsys.readouterr().err


def test_a_picture_path_that_cannot_be_written_is_refused_before_the_model_is_even_built(tmp_path, shape_image):
    # It was checked only when the picture was saved: after Score-CAM's forward pass per channel, for one.
    from cnnkit.inspect.receptive_field import effective_receptive_field

    for out, words in ((tmp_path / "cam.txt", "names no image format"), (tmp_path / "no" / "c.png", "does not exist"),
                       (tmp_path, "it is a folder")):
        for draw in (lambda: cnnkit.class_activation_map("no_such_model", shape_image, method="scorecam", out=str(out)),
                     lambda: cnnkit.filters("no_such_model", out=str(out)),
                     lambda: effective_receptive_field("no_such_model", out=str(out))):
            with pytest.raises(UserError, match=words):  # not "unknown model"
                draw()
