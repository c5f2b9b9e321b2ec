"""MapCallback: base for every method that explains each probe with a heatmap (gradients, CAMs, occlusion).

A subclass implements :meth:`MapCallback.compute_maps` -> ``{key: Tensor[N, H, W]}`` with raw
(signed) values, ``key`` like ``"gradcam/layer4"``. This base then, on rank 0:

* logs an overlay per probe image (``viz/<key>/<probe-id>``) or one grid per key (``layout="grid"``),
  normalized per image and/or on a scale fixed for the whole run (``normalize``);
* logs summary statistics of the raw maps as scalars (``viz/<key>/stats/{mean_abs,max_abs,std}``);
* hands the maps to the optional :attr:`tracker` (filmstrips, drift, faithfulness; see ``tracking.py``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from ..logging import VizLogger, make_tag
from ..probe import ProbeSet
from ..render import FixedScale, colormap, image_grid, normalize_maps, overlay, resize_maps
from ..targets import LabelTarget, resolve_target
from ..tracking import MapTracker
from .base import VisualizationCallback

__all__ = ["MapCallback"]

MAP_PREFIX = "map:"


class MapCallback(VisualizationCallback):
    """Base for heatmap methods. See module docstring.

    Args:
        normalize: ``"per_image"`` (shape of each map), ``"fixed"`` (one scale for the whole run, so
            magnitudes compare across epochs), or ``"both"`` (two images per probe).
        layout: ``"per_probe"`` (one image tag per probe) or ``"grid"`` (one grid per method/layer).
        cmap: matplotlib colormap for the heat.
        alpha: heat opacity over the image.
        signed: treat maps as signed (diverging normalization) -- e.g. the signed gradient.
        tracker: optional :class:`lightning_viz.tracking.MapTracker` for filmstrips, drift, faithfulness,
            localization and the sanity check (it gets this callback, to render alike and recompute maps).
        **kwargs: schedule and probe options of :class:`VisualizationCallback`.
    """

    def __init__(
        self,
        normalize: Literal["per_image", "fixed", "both"] = "per_image",
        layout: Literal["per_probe", "grid"] = "per_probe",
        cmap: str = "jet",
        alpha: float = 0.5,
        signed: bool = False,
        tracker: Optional[MapTracker] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if normalize not in ("per_image", "fixed", "both"):
            raise ValueError(f"normalize must be 'per_image', 'fixed' or 'both'; got {normalize!r}")
        if layout not in ("per_probe", "grid"):
            raise ValueError(f"layout must be 'per_probe' or 'grid'; got {layout!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (heat opacity over the image); got {alpha}")
        colormap(torch.zeros(1, 1, 1), cmap)  # an unknown colormap fails here, not after the first epoch
        self.normalize = normalize
        self.layout = layout
        self.cmap = cmap
        self.alpha = alpha
        self.signed = signed
        self.tracker = tracker
        self.scales: dict[str, FixedScale] = {}

    # ------------------------------------------------------------------ subclass API
    def compute_maps(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Tensor]:
        """Raw maps ``{key: Tensor[N, H, W]}`` for this rank's probes (``key`` = ``"<method>/<layer>"``)."""
        raise NotImplementedError

    def needs_labels(self) -> bool:
        target = getattr(self, "target", None)  # the target of gradient, CAM and occlusion maps
        return target is not None and isinstance(resolve_target(target), LabelTarget)

    def check_probes(self, probe: ProbeSet) -> None:
        super().check_probes(probe)
        if self.tracker is not None and self.tracker.pointing_game and probe.masks is None:
            raise ValueError(
                f"{type(self).__name__}(tracker=MapTracker(pointing_game=True)): the pointing game needs a ground-truth "
                "mask per probe image (items (image, label, mask), e.g. the shapes dataset), but these probes have "
                "none. Use pointing_game=None (when masks exist) or False, or data with masks."
            )

    # ------------------------------------------------------------------ base implementation
    def compute(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Any]:
        model = self.adapted(pl_module)  # logits_fn applied; layer names unchanged
        maps = self.compute_maps(model, probe)
        out: dict[str, Any] = {MAP_PREFIX + k: v.detach().float().cpu() for k, v in maps.items()}
        if self.tracker is not None:
            out.update(self.tracker.compute(model, probe, maps, callback=self))
        return out

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet, trainer: Trainer) -> None:
        maps = {k[len(MAP_PREFIX):]: v for k, v in results.items() if k.startswith(MAP_PREFIX)}
        images = probe.display_images()
        for key, m in maps.items():
            self.log_map(logger, key, m, images, probe)
        if self.tracker is not None:
            self.tracker.log(logger, maps, results, probe, trainer, callback=self)

    def log_map(self, logger: VizLogger, key: str, maps: Tensor, images01: Tensor, probe: ProbeSet) -> None:
        """Overlays and statistics for one ``[N, H, W]`` raw map tensor (probes with non-finite maps: a warning,
        left out of the statistics and the fixed scale, not logged per probe, zero in a grid)."""
        ok = self.warn_non_finite(f"the {key} maps", maps)
        maps = torch.where(ok.view(-1, *[1] * (maps.ndim - 1)), maps, torch.zeros_like(maps))
        flat = maps[ok].flatten(1) if bool(ok.any()) else maps.new_zeros(1, 1)
        logger.scalar(make_tag(key, "stats", "mean_abs"), flat.abs().mean())
        logger.scalar(make_tag(key, "stats", "max_abs"), flat.abs().max())
        logger.scalar(make_tag(key, "stats", "std"), flat.std() if flat.numel() > 1 else 0.0)
        variants: list[tuple[str, Tensor]] = []
        if self.normalize in ("per_image", "both"):
            variants.append(("", normalize_maps(maps, "per_image", signed=self.signed)))
        if self.normalize in ("fixed", "both"):
            scale = self.scales.setdefault(key, FixedScale(signed=self.signed))
            vmin, vmax = scale.update(maps[ok])
            variants.append(("fixed" if self.normalize == "both" else "", normalize_maps(maps, "fixed", vmin, vmax)))
        for suffix, m01 in variants:
            over = overlay(images01, resize_maps(m01, images01.shape[-2:]), self.alpha, self.cmap)
            if self.layout == "grid":
                logger.image(make_tag(key, suffix or None, "grid"), image_grid(over))
            else:
                for pid, img, finite in zip(probe.ids, over, ok.tolist()):
                    if finite:
                        logger.image(make_tag(key, pid, suffix or None), img)

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scales": {k: s.state_dict() for k, s in self.scales.items()}}
        if self.tracker is not None and hasattr(self.tracker, "state_dict"):
            state["tracker"] = self.tracker.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        for k, s in (state.get("scales") or {}).items():
            self.scales[k] = FixedScale()
            self.scales[k].load_state_dict(s)
        if self.tracker is not None and state.get("tracker") is not None and hasattr(self.tracker, "load_state_dict"):
            self.tracker.load_state_dict(state["tracker"])
