"""lightning-viz: PyTorch Lightning callbacks that explain CNNs while they train, logged to TensorBoard.

Attach callbacks from :mod:`lightning_viz.callbacks` to a ``Trainer``; the pure-torch methods they
use live in :mod:`lightning_viz.methods`.
"""

from .callbacks import (
    ActivationCallback,
    AdversarialCallback,
    CAMCallback,
    ClassModelCallback,
    EmbeddingCallback,
    FilterCallback,
    GradientCallback,
    InversionCallback,
    MapCallback,
    OcclusionCallback,
    TopPatchesCallback,
    UnitCallback,
    VisualizationCallback,
    VisualizationError,
)
from .capture import capture, eval_mode, isolated
from .layers import LayerNotFoundError, get_layer
from .probe import ProbeSet
from .targets import resolve_target
from .tracking import MapTracker

__version__ = "0.1.0"

__all__ = [
    "VisualizationCallback",
    "VisualizationError",
    "MapCallback",
    "FilterCallback",
    "ActivationCallback",
    "GradientCallback",
    "CAMCallback",
    "OcclusionCallback",
    "TopPatchesCallback",
    "EmbeddingCallback",
    "ClassModelCallback",
    "UnitCallback",
    "InversionCallback",
    "AdversarialCallback",
    "MapTracker",
    "ProbeSet",
    "LayerNotFoundError",
    "capture",
    "eval_mode",
    "get_layer",
    "isolated",
    "resolve_target",
]
