"""lightning-viz: PyTorch Lightning callbacks that explain CNNs while they train, logged to TensorBoard.

Attach callbacks from :mod:`lightning_viz.callbacks` to a ``Trainer``; the pure-torch methods they
use live in :mod:`lightning_viz.methods`.
"""

from . import callbacks as _callbacks
from ._warnings import LightningVizWarning
from .callbacks import *  # noqa: F403 - exactly callbacks.__all__ (its CALLBACKS list)
from .capture import capture, eval_mode, isolated, read_as_map
from .layers import LayerNotFoundError, MapLayout, get_layer
from .probe import ProbeSet
from .targets import resolve_target
from .tracking import MapTracker

__version__ = "0.1.0"

__all__ = [
    *_callbacks.__all__,
    "LightningVizWarning",
    "MapTracker",
    "ProbeSet",
    "LayerNotFoundError",
    "MapLayout",
    "capture",
    "eval_mode",
    "get_layer",
    "isolated",
    "read_as_map",
    "resolve_target",
]
