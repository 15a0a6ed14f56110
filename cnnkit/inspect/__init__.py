"""Looking inside a CNN: convolution arithmetic, summaries, receptive fields, feature maps, filters, CAMs.

Every entry point takes a model name, a run folder or checkpoint, or an ``nn.Module``, and leaves a model
exactly as it found it (each module's train/eval mode and BatchNorm statistics are restored).
"""

from cnnkit.lazy import export_lazily

# Each public name and the module that defines it: imported on first use, so that `cnnkit shape` (plain
# arithmetic) does not load PyTorch.
export_lazily(__name__, {
    **dict.fromkeys(("CamResult", "class_activation_map"), "cnnkit.inspect.cam"),
    **dict.fromkeys(("FeatureMapImage", "feature_maps"), "cnnkit.inspect.feature_maps"),
    **dict.fromkeys(("FilterImage", "filters"), "cnnkit.inspect.filters"),
    **dict.fromkeys(("capture", "inspecting", "layer_names"), "cnnkit.inspect.hooks"),
    **dict.fromkeys(("EffectiveField", "FieldCheck", "ReceptiveField", "effective_receptive_field", "receptive_field",
                     "verify_receptive_field"), "cnnkit.inspect.receptive_field"),
    **dict.fromkeys(("ConvArithmetic", "Field", "conv_arithmetic", "conv_output_size"), "cnnkit.inspect.shapes"),
    **dict.fromkeys(("LayerInfo", "Summary", "summary"), "cnnkit.inspect.summary"),
})
