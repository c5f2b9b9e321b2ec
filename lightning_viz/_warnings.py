"""The warning classes every other module raises under: one public base, :class:`LightningVizWarning`, so that
``warnings.filterwarnings("ignore", category=LightningVizWarning)`` silences every warning of the library (and
``"error"`` turns them into exceptions) without touching Lightning's or torch's."""

from __future__ import annotations

__all__ = ["LightningVizWarning", "VisualizationWarning"]


class LightningVizWarning(UserWarning):
    """The base of every warning lightning-viz issues (the counterpart of
    :class:`~lightning_viz.callbacks.base.VisualizationError`); its subclasses say more: ``VisualizationWarning``,
    ``NothingWrittenWarning``, ``NondeterministicOpWarning``, ``VizDeprecationWarning`` (also a
    ``DeprecationWarning``)."""


class VisualizationWarning(LightningVizWarning):
    """A visualization did less than asked (a run that failed under ``on_error="warn"``, options or data that limit
    it: fewer items than ``num_probes``, non-finite maps), and training goes on."""
