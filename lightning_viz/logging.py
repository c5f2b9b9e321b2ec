"""Writing to TensorBoard: find the TensorBoardLogger, build tags, write only on rank 0.

Tag scheme: the first segment is ``viz-<family>``, the callback's ``method`` (``viz-cam``, ``viz-gradients``,
``viz-embeddings``, ...), so TensorBoard shows each callback family as its own collapsible group, apart from
the user's own metrics. The rest names what is shown: ``viz-cam/panel/<probe-id>`` (per-probe panel),
``viz-cam/<method>/<layer>/<probe-id>`` and ``.../stats/<stat>`` (per map key), ``viz-cam/time_s`` (seconds
the callback took). A callback's ``name`` goes right after the family: ``viz-cam/<name>/panel/p000``.
The global step is the epoch.

TensorBoard serves only 10 images per tag by default (a random sample of the epochs); start it with
:func:`tensorboard_command` (``--samples_per_plugin images=1000``) to see every epoch. Note that
``images=0`` serves *no* image at all in current TensorBoard (2.21), not "all of them".
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import Tensor

from .render import to_uint8_hwc

__all__ = ["find_tensorboard", "make_tag", "namespaced", "TAG_PREFIX", "tensorboard_command",
           "TENSORBOARD_SAMPLES_FLAG", "VizLogger",
           "NoTensorBoardLoggerWarning"]

#: Keep up to 1000 images per tag (one per epoch) instead of TensorBoard's default sample of 10.
TENSORBOARD_SAMPLES_FLAG = "--samples_per_plugin images=1000"


def tensorboard_command(logdir: str) -> str:
    """The command that shows a run's visualizations, every epoch of them."""
    return f"tensorboard --logdir {logdir} {TENSORBOARD_SAMPLES_FLAG}"


class NoTensorBoardLoggerWarning(UserWarning):
    """Raised (as a warning) once when a visualization callback finds no TensorBoardLogger."""


def find_tensorboard(trainer: Any):
    """The first ``TensorBoardLogger`` in ``trainer.loggers`` (or ``None``)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in getattr(trainer, "loggers", []) or []:
        if isinstance(lg, TensorBoardLogger):
            return lg
    return None


def _clean(part: Any) -> str:
    s = str(part).strip("/").replace(" ", "_")
    return s or "_"


#: First characters of every lightning-viz tag: ``viz-<family>/...``.
TAG_PREFIX = "viz-"


def make_tag(family: str, *parts: Any) -> str:
    """``make_tag("cam", "gradcam", "layer4", "p003")`` -> ``"viz-cam/gradcam/layer4/p003"``: the first
    segment ``viz-<family>`` is TensorBoard's group (``family`` = the callback's ``method``); empty parts skipped.
    A part may hold several segments (``"gradcam/layer4"``)."""
    return "/".join([TAG_PREFIX + _clean(family)] + [_clean(p) for p in parts if p is not None and str(p) != ""])


def namespaced(tag: str, namespace: str | None) -> str:
    """Insert ``namespace`` after the family segment: ``viz-cam/panel/p000`` -> ``viz-cam/<namespace>/panel/p000``
    (tags that are not lightning-viz tags are left alone)."""
    if not namespace or not tag.startswith(TAG_PREFIX):
        return tag
    family, _, rest = tag.partition("/")
    return "/".join(p for p in (family, _clean(namespace), rest) if p)


class VizLogger:
    """Thin writer over a TensorBoard ``SummaryWriter`` that is a no-op off rank 0 or without TensorBoard.

    Every write goes through here, so callbacks never have to check the rank themselves.
    """

    def __init__(self, writer: Any | None, step: int, enabled: bool = True, namespace: str | None = None):
        self.writer = writer
        self.step = int(step)
        self.enabled = enabled and writer is not None
        self.namespace = namespace
        self.written: list[str] = []

    def _tag(self, tag: str) -> str:
        """Insert the namespace after the family (``viz-cam/...`` -> ``viz-cam/<namespace>/...``)."""
        return namespaced(tag, self.namespace)

    @classmethod
    def from_trainer(cls, trainer: Any, step: int, warn: bool = True, namespace: str | None = None) -> "VizLogger":
        tb = find_tensorboard(trainer)
        if tb is None and warn and trainer.is_global_zero:
            warnings.warn(
                "lightning-viz: no TensorBoardLogger in trainer.loggers, so visualizations are computed but not "
                "written. Add one: Trainer(logger=TensorBoardLogger('lightning_logs')) (the default logger when "
                "tensorboard is installed).",
                NoTensorBoardLoggerWarning,
                stacklevel=2,
            )
        return cls(tb.experiment if tb is not None else None, step, enabled=trainer.is_global_zero, namespace=namespace)

    def image(self, tag: str, image01: Tensor) -> None:
        """Log one ``[3, H, W]`` float image in ``[0, 1]``."""
        if self.enabled:
            tag = self._tag(tag)
            self.writer.add_image(tag, to_uint8_hwc(image01), self.step, dataformats="HWC")
            self.written.append(tag)

    def scalar(self, tag: str, value: float | Tensor) -> None:
        if self.enabled:
            tag = self._tag(tag)
            self.writer.add_scalar(tag, float(value), self.step)
            self.written.append(tag)

    def scalars(self, values: dict[str, float | Tensor]) -> None:
        for tag, v in values.items():
            self.scalar(tag, v)

    def figure(self, tag: str, fig: Any) -> None:
        """Log a matplotlib figure (closed afterwards)."""
        if self.enabled:
            tag = self._tag(tag)
            self.writer.add_figure(tag, fig, self.step, close=True)
            self.written.append(tag)
        else:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def embedding(self, features: Tensor, metadata: list | None = None, label_img: Tensor | None = None,
                  tag: str = "default", metadata_header: list[str] | None = None) -> None:
        if self.enabled:
            tag = self._tag(tag)
            self.writer.add_embedding(features, metadata=metadata, label_img=label_img, global_step=self.step,
                                      tag=tag, metadata_header=metadata_header)
            self.written.append(tag)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            tag = self._tag(tag)
            self.writer.add_text(tag, text, self.step)
            self.written.append(tag)

    def custom_scalars(self, layout: dict) -> None:
        if self.enabled:
            self.writer.add_custom_scalars(layout)

    def flush(self) -> None:
        if self.enabled:
            self.writer.flush()
