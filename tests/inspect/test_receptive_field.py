"""Receptive fields, analytic and measured.

Published values, each also checked by hand with rf_out = rf_in + (k - 1) * jump_in, jump_out = jump_in * s:
- ResNet-18 (torchvision) layer4: 435 (conv1 7, maxpool 11, layer1 43, layer2 99, layer3 211, layer4 435).
- VGG-16: conv5_3 196, pool5 212; AlexNet: conv5 163, pool5 195; Inception-v3: 1311. The table of
  google-research/receptive_field (the library of Araujo et al., "Computing Receptive Fields of
  Convolutional Neural Networks", Distill 2019) lists vgg_16 212, alexnet_v2 195 and inception_v3 1311 for
  the last feature layers.
"""

import pytest
import torch

import cnnkit
from cnnkit.errors import UserError
from cnnkit.inspect.cam import last_conv_layer
from cnnkit.inspect.loading import load_model

from tests.inspect.conftest import assert_picture


def rf_of(result, name):
    return next(x for x in result.layers if x.name == name)


def test_resnet18_layer4_is_435_and_its_centre_unit_sees_the_whole_image():
    r = cnnkit.receptive_field("resnet18")
    assert r.input_size == [3, 224, 224]
    assert [rf_of(r, n).rf for n in ("conv1", "maxpool", "layer1", "layer2", "layer3", "layer4")] == \
        [7, 11, 43, 99, 211, 435]
    assert rf_of(r, "layer4").jump == 32 and rf_of(r, "layer4").start == 0
    assert r.final_layer == "layer4" and r.final_rf == 435
    assert r.covers_input and not r.every_unit_covers  # a corner unit at 0 sees [-217, 217]
    fc = rf_of(r, "fc")
    assert fc.whole and fc.jump == 0  # after global pooling every unit sees everything


def test_residual_branches_take_the_larger_field():
    r = cnnkit.receptive_field("resnet18")
    assert rf_of(r, "layer2.0.downsample").rf == 43  # the 1x1 stride-2 skip path: 43 + 0 * 4 = 43, jump 8
    assert rf_of(r, "layer2.0").rf == 67  # max(skip, main path 43 + 2*4 + 2*8)


@pytest.mark.parametrize("model, expected, final", [
    ("vgg16", {"features.28": 196, "features.30": 212}, "features"),
    ("alexnet", {"features.10": 163, "features.12": 195}, "features"),
])
def test_published_fields(model, expected, final):
    r = cnnkit.receptive_field(model)
    assert {name: rf_of(r, name).rf for name in expected} == expected
    assert r.final_layer == final


def test_concatenating_and_gated_architectures():
    dense = cnnkit.receptive_field("densenet121")  # torch.cat of every layer's output
    assert dense.final_layer == "features" and dense.final_rf == 2071
    inception = cnnkit.receptive_field("inception_v3")  # branches of different kernels, functional pooling
    assert inception.final_layer == "Mixed_7c" and inception.final_rf == 1311
    efficient = cnnkit.receptive_field("efficientnet_b0")  # squeeze-and-excitation gates see everything
    assert rf_of(efficient, "features.1").whole and efficient.covers_input
    vit = cnnkit.receptive_field("vit_b_16")  # 16x16 patches, then attention across all of them
    assert (rf_of(vit, "conv_proj").rf, rf_of(vit, "conv_proj").jump) == (16, 16)
    assert vit.final_layer == "encoder" and rf_of(vit, "encoder.layers.encoder_layer_0").whole


def test_small_network_does_not_see_the_whole_input():
    r = cnnkit.receptive_field("simple_cnn")
    assert r.final_layer == "features" and r.final_rf == 22 and not r.covers_input
    assert (rf_of(r, "features").jump, rf_of(r, "features").start) == (8, 3.5)
    assert "does not see the whole input" in r.table()
    # its classifier's linear layer on the flattened map sees every pixel, and the footnote says why
    assert rf_of(r, "classifier.1").whole and "a linear layer on the flattened map" in r.table().splitlines()[-1]


def test_the_star_footnote_says_why_a_field_exceeds_the_image():
    # "46*" on a 32 px input puzzled a beginner: the footnote said the layer "also sees every input pixel" and not
    # why its number is larger than the image. By hand: features (3x3 convs, padding 1, 2x2 max pools) 22 px,
    # jump 8, on a 4x4 map; the linear layer on it spans the 4 positions: 22 + 3 * 8 = 46, from pixel -7 to 38.
    r = cnnkit.receptive_field("simple_cnn")
    assert (rf_of(r, "features").rf, rf_of(r, "classifier.1").rf, rf_of(r, "classifier.1").jump) == (22, 46, 0)
    assert "46*" in r.table()
    note = r.table().splitlines()[-1]
    assert note.startswith("RF*: the layer sees every pixel of the 32x32 input")
    assert "padding beyond the image's edges included, so it can exceed the image" in note
    assert cnnkit.summary("simple_cnn").table().splitlines()[-1] == note  # one footnote, in both tables
    wide = cnnkit.receptive_field("resnet18", input_size=(3, 160, 200)).table().splitlines()[-1]
    assert wide.startswith("RF*: the layer sees every pixel of the 160x200 input")


def test_verify_simple_cnn_every_distinct_field():
    checks = cnnkit.verify_receptive_field("simple_cnn")
    assert [c.layer for c in checks] == ["features.0", "features.2", "features.3", "features.5", "features.6",
                                         "features"]
    assert all(c.agrees for c in checks), checks
    assert checks[-1].measured == [[9, 30], [9, 30]]  # 22 pixels around unit (2, 2), centred at 19.5


def test_verify_vgg11():
    checks = cnnkit.verify_receptive_field("vgg11")
    assert all(c.agrees for c in checks), checks
    assert checks[-1].layer == "features" and checks[-1].rf == 150 and checks[-1].measured == [[37, 186]] * 2


def test_verify_resnet18_unclipped_at_448():
    checks = cnnkit.verify_receptive_field("resnet18", ["layer3", "layer4"], input_size=448)
    assert all(c.agrees for c in checks), checks
    assert checks[-1].measured == [[7, 441], [7, 441]]  # 435 pixels: the field fits inside 448


def test_verify_refuses_layers_without_positions():
    with pytest.raises(UserError, match="no spatial output"):
        cnnkit.verify_receptive_field("simple_cnn", ["classifier.1"])
    with pytest.raises(UserError, match="no layer 'features.99'"):
        cnnkit.verify_receptive_field("simple_cnn", ["features.99"])


def test_effective_field_of_a_trained_network_is_smaller_than_the_theoretical(trained_run, tmp_path):
    out = tmp_path / "erf.png"
    e = cnnkit.effective_receptive_field(trained_run, count=8, out=str(out))
    assert e.layer == "features" and e.rf == 22 and e.images == 8
    assert 1 <= e.erf <= 22
    assert_picture(out, (320, 320 + 2 * 18))


def test_effective_field_over_your_own_images_is_the_field_over_that_batch(tmp_path):
    from PIL import Image

    from cnnkit.data.images import load_batch

    for i, (folder, name) in enumerate([("a", "0"), ("a", "1"), ("a", "2"), ("b", "0"), ("b", "1"), ("b", "2")]):
        (tmp_path / "photos" / folder).mkdir(parents=True, exist_ok=True)
        noise = torch.randint(0, 256, (40, 48, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(noise.numpy()).save(tmp_path / "photos" / folder / f"{name}.png")
    (tmp_path / "photos" / "b" / "1.png").write_bytes(b"")  # one of the three spread over the folder: passed over
    target = load_model("cnn_bn", input_size=32)
    e = cnnkit.effective_receptive_field(target, count=3, images_from=tmp_path / "photos")
    photos = str(tmp_path / "photos")
    assert e.images == 3 and e.images_from == photos and e.described() == f"3 images from {photos}"
    assert len(e.warnings) == 1 and str(tmp_path / "photos" / "b" / "1.png") in e.warnings[0]
    # spread over the folder (a/0, a/2, b/1), b/1 broken: the next file not yet taken, a/1, in its place
    used = [str(tmp_path / "photos" / f) for f in ("a/0.png", "a/2.png", "a/1.png")]
    batch = load_batch(used, 3, 32, target.mean, target.std)[0]
    assert e.erf == cnnkit.effective_receptive_field(target, images=batch).erf
    shapes = cnnkit.effective_receptive_field(target, count=2)
    assert shapes.images_from is None and shapes.described() == "2 generated shapes images"


def test_verify_takes_a_loaded_target_and_leaves_weights_alone():
    target = load_model("cnn_bn", input_size=32)
    before = {k: v.clone() for k, v in target.model.state_dict().items()}
    assert all(c.agrees for c in cnnkit.verify_receptive_field(target))
    assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())


def test_effective_field_of_a_dead_unit_is_zero_not_the_whole_image(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU is off: no gradient reaches the input
    e = cnnkit.effective_receptive_field(model, "1", input_size=(3, 16, 16), count=2, out=str(tmp_path / "erf.png"))
    assert e.erf == 0 and e.rf == 3


def test_functional_graph_concat_pad_slice_and_gate():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.small = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.large = torch.nn.Conv2d(3, 4, 5)
            self.after = torch.nn.Identity()

        def forward(self, x):
            a = self.small(x)  # rf 3
            b = self.large(torch.nn.functional.pad(x, (2, 2, 2, 2)))  # rf 5, centred like a
            y = torch.cat([a, b], dim=1)[:, :, ::2, ::2]  # every second unit: jump 2
            gate = y.mean(dim=(2, 3), keepdim=True).sigmoid()  # squeeze-and-excitation style
            return self.after(y * gate)

    r = cnnkit.receptive_field(Net(), input_size=(3, 16, 16))
    assert (rf_of(r, "small").rf, rf_of(r, "large").rf, rf_of(r, "large").start) == (3, 5, 0)
    after = rf_of(r, "after")
    assert (after.rf, after.jump, after.start, after.whole) == (5, 2, 0, True)
    assert r.covers_input  # through the gate


def test_a_network_that_downsamples_to_1x1_ends_its_features_there():
    # The final feature layer is the conv stack's 1x1 output (no global operation made it), not the last layer
    # with several positions before it; global pooling's 1x1 output is not one.
    strided = cnnkit.receptive_field("convnet", widths=(32, 64, 128, 256, 512), downsample="stride")
    assert (strided.final_layer, strided.final_rf, strided.covers_input) == ("features", 63, True)
    pooled = cnnkit.receptive_field("convnet", widths=(32, 64, 128, 256, 512))
    assert (pooled.final_layer, pooled.final_rf, pooled.covers_input) == ("features", 94, True)
    small = cnnkit.receptive_field("resnet18", input_size=32)
    assert (small.final_layer, small.final_rf, small.covers_input) == ("layer4", 435, True)
    gap = cnnkit.receptive_field("convnet", widths=(32, 64))  # 8x8 features, then global average pooling
    assert gap.final_layer == "features" and rf_of(gap, "classifier.0").whole
    # measured too: the 1x1 layer's BatchNorm passes the gradient on (its statistics as real memory)
    checks = cnnkit.verify_receptive_field(load_model("convnet", widths=(32, 64, 128, 256, 512), downsample="stride"))
    assert checks[-1].layer == "features" and checks[-1].measured == [[0, 31], [0, 31]]
    assert all(c.agrees for c in checks), checks


def test_fastnets_final_feature_layer_is_its_last_conv_group_not_the_global_pool():
    """fastnet's global max-pool is a max-pool window of the map's size (for ONNX), which read as one more window:
    `cnnkit rf fastnet` named it, layers.4, the final feature layer. By hand (even sizes: the 2x2 whitening pads
    right and bottom; each group: 3x3 conv, 2x2 pool, 3x3 conv): whitening rf 2 jump 1 start 0.5; layers.1
    2 + 2 + 1 + 2*2 = 9, jump 2; layers.2 9 + 2*2 + 2 + 2*4 = 23, jump 4; layers.3 23 + 2*4 + 4 + 2*8 = 51, jump
    8, start 4; the pool over its 4x4 map: 51 + 3*8 = 75, the whole input. Measured too (which crashed: the
    whitening filters and BatchNorm's unit scale, buffers, stayed float32 in the float64 pass)."""
    r = cnnkit.receptive_field("fastnet")
    assert [(rf_of(r, n).rf, rf_of(r, n).jump, rf_of(r, n).start) for n in ("layers.0", "layers.1", "layers.2",
                                                                            "layers.3")] == \
        [(2, 1, 0.5), (9, 2, 1), (23, 4, 2), (51, 8, 4)]
    pool = rf_of(r, "layers.4")
    assert (pool.rf, pool.jump, pool.whole) == (75, 0, True)
    assert (r.final_layer, r.final_rf, r.covers_input, r.every_unit_covers) == ("layers.3", 51, True, False)
    unpadded = cnnkit.receptive_field("fastnet", even_sizes=False)  # airbench's 31, 15, 7, 3: the same fields
    assert (unpadded.final_layer, unpadded.final_rf, rf_of(unpadded, "layers.3").output_shape) == \
        ("layers.3", 51, [256, 3, 3])
    checks = cnnkit.verify_receptive_field("fastnet")
    assert checks[-1].layer == "layers.3" and checks[-1].measured == [[0, 31], [0, 31]]
    assert all(c.agrees for c in checks), checks


def test_where_the_last_maps_are_1x1_the_final_feature_layer_is_what_the_rest_is_computed_from():
    """`cnnkit rf MODEL --input-size 32` named a layer inside a block, as `cnnkit cam` once did: efficientnet_b0
    features.5.2.block.1 (a depthwise convolution inside a residual block, whose gated 2x2 field equalled that of
    the 2x2 map after it), regnet_y_400mf trunk_output.block4.block4-0.f.a (a block's main path beside its
    shortcut), shufflenet_v2_x1_0 stage4.0.branch1 (one branch). Now the layer cam's default is chosen by. By hand
    at 32: shufflenet conv1 3 (jump 2), maxpool 7 (4), stage2 15 + 3*2*8 = 63 (8), stage3 63 + 2*8 + 7*2*16 = 303
    (16); regnet stem 3 (2), block1 7 (4), block2 15 + 2*2*8 = 47 (8), block3 63 + 5*2*16 = 223 (16);
    mobilenet_v3_small stem 3 (2), features.1-3 (3x3 depthwise) 7 (4), 15 (8), 31 (8), features.4-8 (5x5) 63 (16),
    127, 191, 255, 319, which features.9.block.0 (1x1, the expansion before the stride-2 depthwise) keeps."""
    for name, expected, rf in [("shufflenet_v2_x1_0", "stage3", 303), ("regnet_y_400mf", "trunk_output.block3", 223),
                               ("efficientnet_b0", "features.6.0.block.0", 339),
                               ("mobilenet_v3_small", "features.9.block.0", 319)]:
        r = cnnkit.receptive_field(name, input_size=32)
        assert (r.final_layer, r.final_rf) == (expected, rf), name
        target = load_model(name, 32, meta=True)
        assert last_conv_layer(target.model, target.input_shape) == expected, name
    r = cnnkit.receptive_field("shufflenet_v2_x1_0", input_size=32)
    assert [(rf_of(r, n).rf, rf_of(r, n).jump) for n in ("conv1", "maxpool", "stage2", "stage3")] == \
        [(3, 2), (7, 4), (63, 8), (303, 16)]
    assert r.covers_input and r.every_unit_covers
