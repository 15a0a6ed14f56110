"""Looking inside a CNN: convolution arithmetic, summaries, receptive fields, feature maps, filters, CAMs.

Every entry point takes a model name, a run folder or checkpoint, or an ``nn.Module``, and leaves a model
exactly as it found it (each module's train/eval mode and BatchNorm statistics are restored).
"""

from cnnkit.inspect.hooks import capture, inspecting, layer_names
from cnnkit.inspect.receptive_field import (
    EffectiveField, FieldCheck, ReceptiveField, effective_receptive_field, receptive_field, verify_receptive_field,
)
from cnnkit.inspect.shapes import ConvArithmetic, Field, conv_arithmetic, conv_output_size
from cnnkit.inspect.summary import LayerInfo, Summary, summary

__all__ = [
    "ConvArithmetic", "EffectiveField", "Field", "FieldCheck", "LayerInfo", "ReceptiveField", "Summary", "capture",
    "conv_arithmetic", "conv_output_size", "effective_receptive_field", "inspecting", "layer_names",
    "receptive_field", "summary", "verify_receptive_field",
]
