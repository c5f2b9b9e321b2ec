"""Lightning callbacks, one file per method family; all share :class:`VisualizationCallback`."""

from .base import VisualizationCallback, VisualizationError
from .maps import MapCallback

__all__ = ["VisualizationCallback", "VisualizationError", "MapCallback"]
