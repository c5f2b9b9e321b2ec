"""OcclusionCallback: Zeiler-Fergus occlusion sensitivity maps of the probe images, every n epochs."""

from __future__ import annotations

from numbers import Integral
from typing import Any, Literal, Optional, Union

from lightning.pytorch import LightningModule
from torch import Tensor

from ..layers import module_device, module_dtype
from ..methods.occlusion import FILLS, Fill, occlusion, positions_per_forward, spread_to_pixels
from ..probe import ProbeSet
from ..targets import resolve_target
from .maps import MapCallback

__all__ = ["OcclusionCallback"]


class OcclusionCallback(MapCallback):
    """Occlusion sensitivity (Zeiler & Fergus 2014, Sec. 4.2) as heatmap overlays per probe.

    Logs one panel per probe ``viz-occlusion/panel/<probe-id>`` with the map ``occlusion/score`` (drop of the
    target's logit) and, if asked, ``occlusion/prob`` (drop of its probability: softmax, or its sigmoid with
    ``probabilities="sigmoid"``), plus the :class:`MapCallback` statistics. Each pixel shows the mean drop of the
    windows covering it.

    Args:
        window: the occluding window, pixels: an int (a square) or ``(h, w)`` (``[h, w]`` in YAML); ``None``
            (default): scales with the image, ``ceil(side / 8)`` per axis (8 px on 64 px images, 28 px on 224 px),
            so the number of window positions -- and the cost -- does not grow with the resolution (at most
            16 x 16 positions).
        stride: step between window positions, pixels, an int or ``(h, w)`` (a last window flush with the border
            is added); ``None`` (default): ``ceil(window / 2)`` per axis.
        fill: ``"gray"`` (0.5 after un-normalizing with the probe set's mean/std; 0 in normalized space
            when they are unknown), ``"mean"`` (image's channel mean), ``"zero"`` (0 in normalized space)
            or ``"blur"`` (Gaussian-blurred image).
        target: ``"label"``, ``"predicted"`` or a class index.
        outputs: which drops to log, one name or a list: ``"score"`` and/or ``"prob"``.
        memory_mb: activation memory per forward; the number of occluded images per forward is this
            divided by one image's activations (measured once by a single-image forward). ``None``
            (default): :func:`lightning_viz.methods.batching.default_memory_mb` (512 MiB on the CPU, a
            quarter of the free memory up to 4 GiB on a GPU). Results do not depend on it.
        **kwargs: :class:`MapCallback` / :class:`VisualizationCallback` options.
    """

    method = "occlusion"

    def __init__(
        self,
        window: Optional[Union[int, tuple[int, int]]] = None,
        stride: Optional[Union[int, tuple[int, int]]] = None,
        fill: Literal["gray", "mean", "zero", "blur"] = "gray",
        target: Union[int, str] = "label",
        outputs: Union[Literal["score", "prob"], list[Literal["score", "prob"]]] = ["score", "prob"],
        memory_mb: Optional[float] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        window, stride = _side_option("window", window), _side_option("stride", stride)
        if fill not in FILLS:
            raise ValueError(f"fill must be one of {', '.join(map(repr, FILLS))}; got {fill!r}")
        outputs = [outputs] if isinstance(outputs, str) else outputs
        bad = [o for o in outputs if o not in ("score", "prob")]
        if bad or not outputs:
            raise ValueError(f"outputs must be a non-empty list of 'score' and/or 'prob'; got {outputs!r}")
        if memory_mb is not None and memory_mb <= 0:
            raise ValueError(f"memory_mb must be > 0; got {memory_mb}")
        resolve_target(target)  # validates the spelling now
        self.fill: Fill
        self.window, self.stride, self.fill = window, stride, fill
        self.target, self.outputs, self.memory_mb = target, list(outputs), memory_mb

    def state_key_parts(self) -> tuple[Any, ...]:
        return super().state_key_parts() + (self.window, self.stride, self.fill, str(self.target))

    def check_input(self, model: Any, x: Tensor) -> None:
        super().check_input(model, x)
        self._check_window(x.shape[-2:])

    def _check_window(self, size: Any) -> None:
        if self.window is None:
            return
        wh, ww = (self.window, self.window) if isinstance(self.window, int) else self.window
        if wh > size[0] or ww > size[1]:
            most = min(size) if isinstance(self.window, int) else (int(size[0]), int(size[1]))
            raise ValueError(
                f"occlusion window={self.window} is larger than the {size[0]}x{size[1]} probe images; "
                f"use window <= {most}"
            )

    def compute_maps(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Tensor]:
        pl_module = self.adapted(pl_module)
        device = module_device(pl_module)
        x = probe.to(device, module_dtype(pl_module))
        size = x.shape[-2:]
        self._check_window(size)
        chunk = positions_per_forward(pl_module, x, self.memory_mb)
        labels = None if probe.labels is None else probe.labels.to(device)
        drops = occlusion(
            pl_module,
            x,
            self.target,
            labels,
            window=self.window,
            stride=self.stride,
            fill=self.fill,
            mean=probe.mean,
            std=probe.std,
            chunk_size=chunk,
            probabilities=self.probabilities,
        )
        return {
            f"occlusion/{o}": spread_to_pixels(drops[o], size, self.window, self.stride)
            for o in self.outputs
            if o in drops
        }


def _side_option(option: str, value: Any) -> Union[int, tuple[int, int], None]:
    """``window`` / ``stride``: ``None``, an int >= 1 (a square) or a pair ``(h, w)`` of them (a list from YAML)."""
    if value is None:
        return None

    def whole(v: Any) -> bool:
        return isinstance(v, Integral) and not isinstance(v, bool) and int(v) >= 1

    if whole(value):
        return int(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(whole(v) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(
        f"{option} must be an int >= 1 (pixels, a square) or a pair (h, w) of them, or None for the default; "
        f"got {value!r}"
    )
