"""Lightning callbacks, one file per method family; all share :class:`VisualizationCallback`.

:data:`CALLBACKS` is the one list of the ready-to-use callbacks: the package exports
(``lightning_viz.__all__`` and this module's ``__all__``) and the shared test contracts follow it, so a new
callback is its file, one import and one entry here (plus its tiny instance in the test contracts).
"""

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

#: Every ready-to-use visualization callback, in the order of the README's method table.
CALLBACKS: tuple[type[VisualizationCallback], ...] = (
    FilterCallback,
    ActivationCallback,
    GradientCallback,
    CAMCallback,
    OcclusionCallback,
    TopPatchesCallback,
    EmbeddingCallback,
    ClassModelCallback,
    UnitCallback,
    InversionCallback,
    AdversarialCallback,
)
#: The bases to build new callbacks on.
BASES: tuple[type, ...] = (VisualizationCallback, MapCallback, GradientMapCallback)

__all__ = ["CALLBACKS", "VisualizationError", *(c.__name__ for c in BASES + CALLBACKS)]
