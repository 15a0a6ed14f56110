"""cnnkit: convolutional neural networks for image classification, from images to a trained, understood model.

The public API below is imported on first use, not by ``import cnnkit``: loading PyTorch takes seconds, and
``cnnkit --help``, ``--version`` and ``cnnkit predict model.onnx`` (onnxruntime only) need none of it.
"""

__version__ = "0.1.0"

from cnnkit.lazy import export_lazily  # noqa: E402

# Each public name and the module that defines it.
_API = {
    "Audit": "cnnkit.audit", "audit": "cnnkit.audit",
    "DataCheck": "cnnkit.data.checks", "check_data": "cnnkit.data.checks",
    "UserError": "cnnkit.errors",
    "EvalResult": "cnnkit.evaluate", "evaluate": "cnnkit.evaluate",
    "ExportResult": "cnnkit.export", "export": "cnnkit.export",
    "OnnxModel": "cnnkit.runtime",
    "capture": "cnnkit.inspect", "class_activation_map": "cnnkit.inspect", "conv_arithmetic": "cnnkit.inspect",
    "conv_output_size": "cnnkit.inspect", "effective_receptive_field": "cnnkit.inspect",
    "feature_maps": "cnnkit.inspect", "filters": "cnnkit.inspect", "receptive_field": "cnnkit.inspect",
    "summary": "cnnkit.inspect", "verify_receptive_field": "cnnkit.inspect",
    "create_model": "cnnkit.models", "list_models": "cnnkit.models", "register_model": "cnnkit.models",
    "predict": "cnnkit.predict",
    "ReportResult": "cnnkit.report.html", "write_report": "cnnkit.report.html",
    "write_plots": "cnnkit.report.plots",
    "RunInfo": "cnnkit.runs", "list_runs": "cnnkit.runs",
    "Checkpoint": "cnnkit.checkpoint", "load_checkpoint": "cnnkit.checkpoint",
    "TrainConfig": "cnnkit.train.config", "TrainResult": "cnnkit.train.config",
    "train": "cnnkit.training", "lr_find": "cnnkit.training",
    "LrFindResult": "cnnkit.train.lr_find",
}
export_lazily(__name__, _API)
