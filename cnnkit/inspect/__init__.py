"""Looking inside a CNN: convolution arithmetic, summaries, receptive fields, feature maps, filters, CAMs.

Every entry point takes a model name, a run folder or checkpoint, or an ``nn.Module``, and leaves a model
exactly as it found it (each module's train/eval mode and BatchNorm statistics are restored).
"""

from cnnkit.inspect.hooks import capture, inspecting, layer_names
from cnnkit.inspect.shapes import ConvArithmetic, Field, conv_arithmetic, conv_output_size
from cnnkit.inspect.summary import LayerInfo, Summary, summary

__all__ = [
    "ConvArithmetic", "Field", "LayerInfo", "Summary", "capture", "conv_arithmetic", "conv_output_size",
    "inspecting", "layer_names", "summary",
]
