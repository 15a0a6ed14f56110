"""cnnkit: convolutional neural networks for image classification, from images to a trained, understood model."""

__version__ = "0.1.0"

from cnnkit.audit import Audit, audit  # noqa: E402
from cnnkit.data.checks import DataCheck, check_data  # noqa: E402
from cnnkit.errors import UserError  # noqa: E402
from cnnkit.evaluate import EvalResult, evaluate  # noqa: E402
from cnnkit.export import ExportResult, OnnxModel, export  # noqa: E402
from cnnkit.inspect import (  # noqa: E402
    capture, class_activation_map, conv_arithmetic, conv_output_size, effective_receptive_field, feature_maps,
    filters, receptive_field, summary, verify_receptive_field,
)
from cnnkit.models import create_model, list_models, register_model  # noqa: E402
from cnnkit.predict import predict  # noqa: E402
from cnnkit.train.checkpoint import Checkpoint, load_checkpoint  # noqa: E402
from cnnkit.train.config import TrainConfig, TrainResult  # noqa: E402
from cnnkit.train.loop import train  # noqa: E402

__all__ = [
    "Audit", "Checkpoint", "DataCheck", "EvalResult", "ExportResult", "OnnxModel", "TrainConfig", "TrainResult",
    "UserError", "capture", "audit", "check_data", "class_activation_map", "conv_arithmetic", "conv_output_size",
    "create_model", "effective_receptive_field", "evaluate", "export", "feature_maps", "filters", "list_models",
    "load_checkpoint", "predict", "receptive_field", "register_model", "summary", "train", "verify_receptive_field",
]
