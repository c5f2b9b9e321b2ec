"""lightning-viz: PyTorch Lightning callbacks that explain CNNs while they train, logged to TensorBoard."""

from .callbacks.base import VisualizationCallback, VisualizationError
from .callbacks.maps import MapCallback
from .capture import capture, eval_mode, isolated
from .layers import LayerNotFoundError, get_layer
from .probe import ProbeSet
from .targets import resolve_target

__version__ = "0.1.0"

__all__ = [
    "VisualizationCallback",
    "VisualizationError",
    "MapCallback",
    "ProbeSet",
    "LayerNotFoundError",
    "capture",
    "eval_mode",
    "get_layer",
    "isolated",
    "resolve_target",
]
