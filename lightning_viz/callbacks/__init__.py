"""Lightning callbacks, one file per method family; all share :class:`VisualizationCallback`."""

from .activations import ActivationCallback
from .base import VisualizationCallback, VisualizationError
from .cam import CAMCallback
from .embeddings import EmbeddingCallback
from .filters import FilterCallback
from .gradients import GradientCallback, GradientMapCallback
from .maps import MapCallback
from .occlusion import OcclusionCallback
from .patches import TopPatchesCallback
from .synthesis import AdversarialCallback, ClassModelCallback, InversionCallback, UnitCallback

__all__ = [
    "VisualizationCallback",
    "VisualizationError",
    "MapCallback",
    "GradientMapCallback",
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
]
