"""Every torchvision classification model under its torchvision name, with the head sized to num_classes.

The models are torchvision's own classes, built through ``torchvision.models.get_model``; cnnkit only
adapts the input channels (a 1-channel MNIST image into a ResNet), picks options that make a model
work at small input sizes, and offers two ResNet options: ``stem=cifar`` and ``head_from`` (a head that reads
several stages, ``MultiStageResNet``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from cnnkit.errors import CheckpointError, UserError
from cnnkit.models.heads import find_head, replace_head, reset_head
from cnnkit.models.pretrained import cached_weights_path, pretrained_state
from cnnkit.models.registry import _FACTORIES, default_input_size
from cnnkit.models.sizes import last_feature_maps, on_meta

# Options that torchvision requires for a model to be built without pretrained weights at any size:
# the auxiliary classifiers of Inception/GoogLeNet only exist for 299/224 inputs and training tricks we
# do not use; transformers need to know the image size.
_DEFAULT_OPTIONS = {
    "inception_v3": {"aux_logits": False, "init_weights": True},
    "googlenet": {"aux_logits": False, "init_weights": True},
}


def default_options(name: str) -> dict[str, Any]:
    """The options cnnkit builds torchvision model ``name`` with unless ``--model-opt`` says otherwise."""
    return dict(_DEFAULT_OPTIONS.get(name, {}))


def adapt_first_conv(model: nn.Module, in_channels: int) -> nn.Module:
    """Replace the first ``Conv2d`` so that it takes ``in_channels`` channels.

    Existing weights are kept the way timm's ``adapt_input_conv`` does: summed over RGB for one channel,
    repeated and rescaled for more, so a pretrained stem stays meaningful.
    """
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return model
                new = nn.Conv2d(
                    in_channels, child.out_channels, child.kernel_size, child.stride, child.padding,
                    child.dilation, child.groups if child.groups == 1 else in_channels, child.bias is not None,
                    child.padding_mode,
                )
                with torch.no_grad():
                    w = child.weight
                    if in_channels == 1:
                        new.weight.copy_(w.sum(dim=1, keepdim=True))
                    else:
                        reps = -(-in_channels // w.shape[1])
                        new.weight.copy_(w.repeat(1, reps, 1, 1)[:, :in_channels] * (w.shape[1] / in_channels))
                    if child.bias is not None:
                        new.bias.copy_(child.bias)
                setattr(parent, child_name, new)
                return model
    raise UserError("this model has no Conv2d layer whose input channels could be adapted")


STEMS = ("imagenet", "cifar")
# A last stage whose maps are this small (pixels a side) after an ImageNet stem gets a note (``small_image_note``):
# what the torchvision CNNs make of images of 64 pixels or less, which they shrink about 32-fold.
SMALL_MAPS = 2


def takes_cifar_stem(model: nn.Module) -> bool:
    """Whether ``model`` is ResNet-style (``conv1`` and ``maxpool``), which ``stem=cifar`` (``cifar_stem``) needs."""
    return isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")


def small_image_note(model: nn.Module, name: str, shape: tuple[int, int, int], options: dict[str, Any],
                     own_weights: str | None = None) -> str | None:
    """A note for torchvision model ``name`` (built as ``model`` with ``options``) trained on images of ``shape``
    (C, H, W pixels) where its last stage's maps are SMALL_MAPS a side or smaller: what that stage outputs, and the
    fix. ImageNet networks shrink their input about 32-fold (a stride-2 stem and a max-pool before the first stage,
    then a stride 2 per stage), so a 32x32 image reaches a ResNet's layer4 as 2x2 and leaves it as 1x1: its 3x3
    filters see mostly padding and the head pools one position. None for larger maps, and for transformers (they
    cut their input into patches: there is no stem to change, and Swin's maps are channels-last).

    The fix differs with the starting weights (``own_weights``: "pretrained" or a --weights file, None for
    random ones). From scratch, ``stem=cifar`` for a ResNet-style model (He et al.'s CIFAR stem), else a larger
    --input-size or such a model. With pretrained weights only a larger --input-size: stem=cifar would replace
    their first convolution with a random one, and the filters after it were learnt on the maps of the ImageNet
    stem, at the scale of 224-pixel images."""
    if options.get("stem") == "cifar" or isinstance(model, (torchvision.models.VisionTransformer,
                                                             torchvision.models.SwinTransformer,
                                                             torchvision.models.MaxVit)):
        return None
    found = last_feature_maps(model, shape)
    if found is None or max(found[1:]) > SMALL_MAPS:
        return None
    stage, h, w = found
    said = (f"{name}'s last stage ({stage}) outputs {h}x{w} maps from these {shape[1]}x{shape[2]} images: its "
            "ImageNet stem and stages leave the last filters little layout to see")
    if own_weights is not None:
        crop = default_input_size(name)
        trained = f" (its pretrained weights were trained at {crop}x{crop})" if own_weights == "pretrained" else ""
        return said + f"; a larger --input-size keeps larger maps{trained}, at a higher cost"
    if takes_cifar_stem(model):
        kept = _cifar_stem_maps(name, shape, options)
        keeps = f"keeps {kept[0]}x{kept[1]} maps there" if kept else "keeps larger maps there"
        return said + (f"; --model-opt stem=cifar (a 3x3 stride-1 first convolution, no max-pool) {keeps}, at a "
                       "higher cost")
    return said + ("; a larger --input-size keeps larger maps, at a higher cost, or train a network for small images "
                   "(resnet18 --model-opt stem=cifar, cnn_bn)")


def _cifar_stem_maps(name: str, shape: tuple[int, int, int], options: dict[str, Any]) -> tuple[int, int] | None:
    """The last stage's map size of ``name`` with ``stem=cifar`` for images of ``shape``: built and run on the meta
    device (no memory, no arithmetic), None where that fails."""
    try:
        model = on_meta(lambda: _FACTORIES[name](num_classes=10, in_channels=shape[0], input_size=shape[1],
                                                 stem="cifar", **{k: v for k, v in options.items() if k != "stem"}))
        found = last_feature_maps(model, shape)
    except Exception:  # an option or layer the meta device does not take: the note goes without the figure
        return None
    return found[1:] if found else None


def cifar_stem(model: nn.Module) -> nn.Module:
    """Give a ResNet-style model (``conv1`` + ``maxpool``) the CIFAR stem of He et al. (2016, section 4.2):
    a 3x3 stride-1 first convolution and no max-pool, so a 32x32 image reaches ``layer4`` at 4x4 instead of
    1x1. About 15x the multiply-adds of torchvision's 7x7 stride-2 stem with max-pool at the same input size
    (resnet18 at 32x32: 555.4 M against 37.0 M, ``cnnkit summary``).
    ``conv1`` starts freshly initialised (a pretrained 7x7 filter bank does not fit a 3x3 one)."""
    if not takes_cifar_stem(model):
        raise UserError("stem=cifar needs a ResNet-style model (conv1 and maxpool: resnet*, resnext*, "
                        "wide_resnet*); leave the option out for this model")
    old = model.conv1
    model.conv1 = nn.Conv2d(old.in_channels, old.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision's ResNet
    model.maxpool = nn.Identity()
    return model


STAGES = ("layer1", "layer2", "layer3", "layer4")


class MultiStageResNet(torchvision.models.ResNet):
    """A ResNet whose classifier ``fc`` reads pooled outputs of several stages side by side, not ``layer4``'s
    alone (Head2Toe, Evci et al. 2022). Features of the last stage are the most specific to the classes a
    network was pretrained on (Yosinski et al. 2014); a head trained on a frozen backbone for other classes does
    better with the earlier stages beside them (measured in ``benchmarks/transfer_cifar.py``).
    Each stage is pooled twice, average and maximum (fastai's concat pooling), and each pooled vector is
    standardised on its own by a layer norm without parameters, because their scales differ. Linear probes on
    cached features of the benchmark's two pretrainings (AdamW one-cycle, 15 epochs, best of rates 1e-3 / 3e-3 /
    1e-2; seed 0 / seed 1): layer4 averaged 0.788 / 0.802; layer2-4 averaged 0.817 / 0.811, standardised 0.827 /
    0.829, averaged and maxed, standardised 0.837 / 0.837. Having no parameters or buffers, the norm adds
    nothing a weights file must hold. Built by ``pool_stages``; the parameter names are torchvision's, so
    pretrained weights load unchanged except ``fc``, which is wider.
    """

    head_from: tuple[str, ...]

    @property
    def run_stages(self) -> tuple[str, ...]:
        """The stages up to the last one the head reads; the rest (``unused_stages``) are not run."""
        return STAGES[: STAGES.index(self.head_from[-1]) + 1]

    @property
    def unused_stages(self) -> tuple[str, ...]:
        """The stages after the last one the head reads: never run, so never trained (``set_trainable``)."""
        return STAGES[len(self.run_stages) :]

    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        pooled = []
        for name in self.run_stages:
            x = getattr(self, name)(x)
            if name in self.head_from:
                for features in (x.mean((2, 3)), x.amax((2, 3))):
                    pooled.append(F.layer_norm(features, features.shape[1:]))
        return self.fc(torch.cat(pooled, 1))


_HEAD_FROM_NEEDS_RESNET = ("head_from needs a ResNet-style model (resnet*, resnext*, wide_resnet*), not {}; "
                           "leave the option out for this model")


def parse_stages_option(value: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """``head_from`` as ``--model-opt`` gives it: ``layer2,layer3,layer4`` (or a list); in network order."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    unknown = [n for n in names if n not in STAGES]
    if not names or unknown:
        given = value if isinstance(value, str) else ",".join(map(str, value))
        raise UserError(f"head_from takes stage names among {', '.join(STAGES)} joined by commas "
                        f"(e.g. head_from=layer2,layer3,layer4), not '{given}'")
    return tuple(n for n in STAGES if n in names)


def pool_stages(model: nn.Module, head_from: str | tuple[str, ...] | list[str], num_classes: int) -> nn.Module:
    """Make a torchvision ResNet's head read the average- and max-pooled outputs of the stages ``head_from`` (see
    ``MultiStageResNet``). The new ``fc`` has PyTorch's default initialisation; ``load_weights`` starts it at
    zero when it loads a backbone."""
    stages = parse_stages_option(head_from)
    if not isinstance(model, torchvision.models.ResNet):
        raise UserError(_HEAD_FROM_NEEDS_RESNET.format(type(model).__name__))
    # A stage's output width: its last BatchNorm's (a block ends in one; a downsample's has the same width).
    width = 2 * sum([m for m in model.get_submodule(s).modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
                for s in stages)
    model.__class__ = MultiStageResNet
    model.head_from = stages
    model.fc = nn.Linear(width, num_classes)
    return model


def _factory(tv_name: str):
    def build(num_classes: int = 10, in_channels: int = 3, input_size: int = 224, pretrained: bool = False,
              stem: str = "imagenet", head_from: str | tuple[str, ...] | None = None, **options: Any) -> nn.Module:
        if stem not in STEMS:
            raise UserError(f"stem must be one of {', '.join(STEMS)}, not '{stem}'")
        if head_from is not None:  # checked before any weights are fetched for a model that cannot take it
            parse_stages_option(head_from)
            if not tv_name.startswith(("resnet", "resnext", "wide_resnet")):
                raise UserError(_HEAD_FROM_NEEDS_RESNET.format(tv_name))
        kwargs = {**default_options(tv_name), **options}
        if tv_name.startswith(("vit_",)):
            kwargs.setdefault("image_size", input_size)
            _check_patches(tv_name, kwargs["image_size"], "image_size" in options)
        if tv_name.startswith("maxvit_"):
            _check_windows(tv_name, input_size)
            kwargs["input_size"] = (input_size, input_size)
        try:
            if pretrained:
                # Built with the weights' own head, loaded strictly, then given the new head.
                kwargs.pop("init_weights", None)
                model = torchvision.models.get_model(tv_name, weights=None, **kwargs)
                state = pretrained_state(tv_name)
                own = model.state_dict()
                # Auxiliary classifiers (Inception, GoogLeNet) are not built for fine-tuning: their weights go.
                state = {k: v for k, v in state.items() if k in own or not k.lower().startswith("aux")}
                try:
                    model.load_state_dict(state)
                except RuntimeError:
                    raise _unfit_pretrained(tv_name, state, kwargs) from None
                # A head_from model gets its own, wider head below.
                if head_from is None and find_head(model)[1].weight.shape[0] != num_classes:
                    replace_head(model, num_classes)
            else:
                model = torchvision.models.get_model(tv_name, weights=None, num_classes=num_classes, **kwargs)
        except TypeError as e:
            raise UserError(f"torchvision model '{tv_name}' does not take these options: {e}") from None
        except ValueError as e:
            raise UserError(f"torchvision model '{tv_name}': {e}") from None
        if stem == "cifar":
            cifar_stem(model)
        if in_channels != 3:
            adapt_first_conv(model, in_channels)
        if head_from is not None:
            pool_stages(model, head_from, num_classes)
            if pretrained:
                reset_head(model.fc)
        return model

    build.__name__ = tv_name
    build.__doc__ = f"torchvision.models.{tv_name}, head sized to num_classes."
    return build


def _check_patches(tv_name: str, image_size: Any, given: bool) -> None:
    """A ViT cuts its image into square patches, and torchvision's constructor only asserts that the size is a
    multiple of the patch size (an AssertionError with no fix in it): say so, with the sizes that work. ``given``:
    the size came from ``--model-opt image_size``, not from the input size."""
    patch = int(tv_name.rsplit("_", 1)[1])  # vit_b_16: 16x16 patches, vit_h_14: 14x14
    if isinstance(image_size, int) and not isinstance(image_size, bool) and image_size > 0 and image_size % patch:
        below, above = image_size // patch * patch, (image_size // patch + 1) * patch
        sizes = f"{below} or {above}" if below else f"{above}"
        where = "--model-opt image_size" if given else "--input-size"
        raise UserError(f"{tv_name} cuts its input into {patch}x{patch} patches, so its input size must be a multiple "
                        f"of {patch}, and {image_size} is not; use {sizes} pixels ({where})")


# MaxViT's window and grid attention cut each stage's feature map into 7x7 squares (``partition_size``); its stem
# and each of its four stages halve the map with a 3x3 stride-2 convolution (padding 1: a side n becomes ceil(n/2)).
MAXVIT_WINDOW, MAXVIT_STAGES = 7, 4


def _maxvit_stage_sizes(size: int) -> list[int]:
    """The side of each MaxViT stage's feature map for a ``size`` pixels input: ceil(size / 4) ... ceil(size / 32)."""
    sides, side = [], -(-size // 2)  # the stem
    for _ in range(MAXVIT_STAGES):
        side = -(-side // 2)
        sides.append(side)
    return sides


def _takes_windows(size: int) -> bool:
    return all(side % MAXVIT_WINDOW == 0 for side in _maxvit_stage_sizes(size))


def _check_windows(tv_name: str, size: int) -> None:
    """torchvision builds a MaxViT for one input size (its attention windows are laid out for it), and refuses one
    where a stage's map is no multiple of the window (a ValueError listing every stage): say so with the sizes that
    work. They are the multiples of 224 (32 x 7: every stage then a multiple of 7) and the three sizes just below
    each, which round up to the same maps; the smallest is 221."""
    if not isinstance(size, int) or size < 1 or _takes_windows(size):
        return
    step = MAXVIT_WINDOW * 2 ** (MAXVIT_STAGES + 1)
    below, above = size // step * step, (size // step + 1) * step
    smallest = next(n for n in range(1, step + 1) if _takes_windows(n))
    sides = ", ".join(map(str, _maxvit_stage_sizes(size)))
    use = f"{below} or {above}" if below else f"{above}"
    raise UserError(f"{tv_name} cuts the feature map of each of its {MAXVIT_STAGES} stages into {MAXVIT_WINDOW}x"
                    f"{MAXVIT_WINDOW} windows, so each stage's side (the input's divided by 4, 8, 16 and 32, rounded "
                    f"up) must be a multiple of {MAXVIT_WINDOW}: at {size} pixels they are {sides}; use {use} pixels "
                    f"(--input-size; the smallest it takes: {smallest})")


def _unfit_pretrained(tv_name: str, state: dict, options: dict) -> UserError:
    """Why torchvision's pretrained weights for ``tv_name`` did not load into the model built with ``options``:
    the options change the architecture (the weights fit the default one), or the file is another model's."""
    try:
        torchvision.models.get_model(tv_name, weights=None).load_state_dict(state)
    except RuntimeError:
        # the file in the cache is wrong, not the command line: exit code 1, as for a damaged one
        return CheckpointError(f"the cached pretrained weights for {tv_name} ({cached_weights_path(tv_name)}) do not "
                               f"fit torchvision's {tv_name}: they are another model's; delete the file and run once "
                               "with internet access to download the right one")
    changed = ", ".join(f"{k}={v}" for k, v in options.items() if k != "num_classes")
    size = "; image_size follows --input-size" if "image_size" in options else ""
    return UserError(f"torchvision's pretrained weights for {tv_name} are for its default architecture, which "
                     f"these options change ({changed}{size}): drop them, or --pretrained")


def torchvision_model_names() -> list[str]:
    """torchvision's image classification models (not detection, segmentation, video or quantized)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


for _name in torchvision_model_names():
    _FACTORIES.setdefault(_name, _factory(_name))
