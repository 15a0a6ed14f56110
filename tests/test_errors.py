"""cnnkit/errors.py: the close-match suffix that every "unknown name" error ends with."""

import pytest

from cnnkit.errors import UserError, did_you_mean


def test_did_you_mean_names_the_closest_or_nothing():
    assert did_you_mean("epochz", ["lr", "epochs", "momentum"]) == "; did you mean epochs?"
    assert did_you_mean("zzz", ["lr", "epochs", "momentum"]) == ""
    assert did_you_mean("epochz", []) == ""


def test_did_you_mean_lists_several_closest_first():
    names = ["conv1", "layer1", "layer2", "layer3", "fc"]
    three = did_you_mean("layer5", names, most=3)  # equally close: difflib's order among them
    assert three.startswith("; did you mean layer") and three.endswith("?") and three.count(", ") == 1
    assert sorted(three[len("; did you mean "):-1].replace(" or ", ", ").split(", ")) == ["layer1", "layer2", "layer3"]
    assert did_you_mean("layer5", names, most=2).count(" or ") == 1
    assert did_you_mean("layr2", names, most=3).startswith("; did you mean layer2")


def test_did_you_mean_compares_by_key_and_shows_the_name():
    options = ["-h", "--help", "--epochs", "--layer"]
    assert did_you_mean("epochz", options, key=lambda o: o.lstrip("-")) == "; did you mean --epochs?"
    # the command line's stricter cutoff: --lrate is 0.6 like --layer, not 0.7
    assert did_you_mean("lrate", options, key=lambda o: o.lstrip("-")) == "; did you mean --layer?"
    assert did_you_mean("lrate", options, cutoff=0.7, key=lambda o: o.lstrip("-")) == ""


def test_an_unknown_model_without_a_close_name_still_names_the_fix():
    import cnnkit

    with pytest.raises(UserError) as e:
        cnnkit.create_model("qqqqqqqq")
    message = str(e.value)
    assert "did you mean" not in message and "`cnnkit models` lists" in message and "\n" not in message
    with pytest.raises(UserError, match=r"unknown model 'resnet81'; did you mean resnet18.*\(`cnnkit models` lists"):
        cnnkit.create_model("resnet81")


def test_plural_is_singular_only_for_one():
    from cnnkit.errors import plural

    assert [f"{n} {plural('image', n)}" for n in (0, 1, 2)] == ["0 images", "1 image", "2 images"]
    assert plural("image", None) == "images"  # a count not known yet
