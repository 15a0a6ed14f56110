"""Parameters and MACs of every torchvision classification model against the metadata of its weights.

Each weights enum carries ``num_params`` and ``_ops`` (GFLOPS counted as multiply-adds, measured at the
weights' own input size: 224, 299 for inception_v3, 384/512/518 for some ViT and RegNet weights). Models are
built on the meta device, so even vit_h_14 and regnet_y_128gf cost no memory and no arithmetic.

Exceptions: none. Every model family (CNNs, ViT, Swin, MaxViT) matches within 1% — attention's matrix
products are counted the way torchvision counted them. ``_ops`` is rounded to three decimals, so the
smallest models (shufflenet_v2_x0_5: 0.0405 G counted, 0.04 published) are compared within that rounding.
"""

import pytest
import torchvision

import cnnkit
from cnnkit.inspect.loading import build_model

EXCEPTIONS: dict[str, str] = {}  # model name -> why it cannot match; empty: all of them do


def _cases():
    seen = set()
    for name in sorted(torchvision.models.list_models(module=torchvision.models)):
        for weights in torchvision.models.get_model_weights(name):
            size = weights.transforms.keywords["crop_size"]
            options = {}
            if name.startswith("vit_"):
                options["image_size"] = weights.meta["min_size"][0]  # the position embedding depends on it
            if name == "inception_v3":
                options["aux_logits"] = True  # its weights (and num_params) include the auxiliary head
            key = (name, size, tuple(sorted(options.items())))
            if key not in seen:
                seen.add(key)
                yield pytest.param(name, size, options, weights.meta, id=f"{name}-{weights.name}")


CASES = list(_cases())


def test_every_classification_model_is_covered():
    assert len({c.values[0] for c in CASES}) == len(torchvision.models.list_models(module=torchvision.models))


@pytest.mark.parametrize("name, size, options, meta", CASES)
def test_params_and_macs_match_torchvision(name, size, options, meta):
    if name in EXCEPTIONS:
        pytest.skip(EXCEPTIONS[name])
    classes = len(meta["categories"] or range(1000))
    model = build_model(name, (3, size, size), num_classes=classes, meta=True, **options)
    s = cnnkit.summary(model, input_size=(3, size, size))
    assert s.total_params == meta["num_params"]
    gmacs = s.total_macs / 1e9
    assert abs(gmacs - meta["_ops"]) <= max(0.01 * meta["_ops"], 0.0005), (gmacs, meta["_ops"])
    assert not s.unknown_ops, s.unknown_ops
