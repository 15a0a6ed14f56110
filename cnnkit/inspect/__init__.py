"""Looking inside a CNN: convolution arithmetic, summaries, receptive fields, feature maps, filters, CAMs.

Every entry point takes a model name, a run folder or checkpoint, or an ``nn.Module``, and leaves a model
exactly as it found it (each module's train/eval mode and BatchNorm statistics are restored).
"""

from cnnkit.inspect.cam import CamResult, class_activation_map
from cnnkit.inspect.feature_maps import FeatureMapImage, feature_maps
from cnnkit.inspect.filters import FilterImage, filters
from cnnkit.inspect.hooks import capture, inspecting, layer_names
from cnnkit.inspect.receptive_field import (
    EffectiveField, FieldCheck, ReceptiveField, effective_receptive_field, receptive_field, verify_receptive_field,
)
from cnnkit.inspect.shapes import ConvArithmetic, Field, conv_arithmetic, conv_output_size
from cnnkit.inspect.summary import LayerInfo, Summary, summary

__all__ = [
    "CamResult", "ConvArithmetic", "EffectiveField", "FeatureMapImage", "Field", "FieldCheck", "FilterImage",
    "LayerInfo", "ReceptiveField", "Summary", "capture", "class_activation_map", "conv_arithmetic",
    "conv_output_size", "effective_receptive_field", "feature_maps", "filters", "inspecting", "layer_names",
    "receptive_field", "summary", "verify_receptive_field",
]
