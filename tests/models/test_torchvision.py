"""The note for a torchvision network trained on images too small for its ImageNet stem, from a model built
without training (cnnkit/models/torchvision.py), and the map sizes it reads (cnnkit/models/sizes.py)."""

from cnnkit.models.registry import create_model
from cnnkit.models.sizes import last_feature_maps
from cnnkit.models.torchvision import small_image_note


def test_a_resnet_on_32_pixel_images_gets_a_note_naming_its_1x1_layer4_and_the_cifar_stem():
    model = create_model("resnet18", num_classes=10, input_size=32)
    note = small_image_note(model, "resnet18", (3, 32, 32), {})
    assert note.startswith("resnet18's last stage (layer4) outputs 1x1 maps from these 32x32 images"), note
    assert "--model-opt stem=cifar (a 3x3 stride-1 first convolution, no max-pool) keeps 4x4 maps there" in note


def test_the_sizes_are_the_models_own():
    # 64 px: layer4 2x2, with the CIFAR stem 8x8; 28 px (MNIST's): 1x1 and 4x4
    assert "outputs 2x2 maps from these 64x64 images" in small_image_note(
        create_model("resnet18", input_size=64), "resnet18", (3, 64, 64), {})
    note = small_image_note(create_model("resnet18", in_channels=1, input_size=28), "resnet18", (1, 28, 28), {})
    assert "outputs 1x1 maps from these 28x28 images" in note and "keeps 4x4 maps there" in note, note


def test_no_note_with_the_cifar_stem_or_on_larger_images():
    assert small_image_note(create_model("resnet18", input_size=32, stem="cifar"), "resnet18", (3, 32, 32),
                            {"stem": "cifar"}) is None
    assert small_image_note(create_model("resnet18", input_size=96), "resnet18", (3, 96, 96), {}) is None  # 3x3


def test_a_network_without_the_cifar_stem_is_told_of_other_fixes():
    model = create_model("mobilenet_v3_small", num_classes=10, input_size=32)
    note = small_image_note(model, "mobilenet_v3_small", (3, 32, 32), {})
    assert note.startswith("mobilenet_v3_small's last stage (features) outputs 1x1 maps"), note
    assert "a larger --input-size" in note and "resnet18 --model-opt stem=cifar" in note


def test_pretrained_weights_are_told_of_a_larger_input_size_not_the_cifar_stem():
    # stem=cifar would replace the pretrained first convolution with a random one
    note = small_image_note(create_model("resnet18", input_size=32), "resnet18", (3, 32, 32), {}, "pretrained")
    assert "stem=cifar" not in note and "a larger --input-size" in note and "trained at 224x224" in note, note


def test_the_last_feature_maps_pass_over_adaptive_pools():
    # VGG's avgpool makes 7x7 of features' 1x1; SqueezeNet's classifier ends in a pool to 1x1
    assert last_feature_maps(create_model("squeezenet1_0", input_size=64), (3, 64, 64)) == ("features", 3, 3)
    assert last_feature_maps(create_model("simple_cnn", input_size=32), (3, 32, 32)) == ("features", 4, 4)
