"""MapCallback: base for every method that explains each probe with a heatmap (gradients, CAMs, occlusion).

A subclass implements :meth:`MapCallback.compute_maps` -> ``{key: Tensor[N, H, W]}`` with raw
(signed) values, ``key`` like ``"gradcam/layer4"``. This base then, on rank 0:

* logs, by default, one panel per probe image (``viz-<family>/panel/<probe-id>``): the probe image and every
  map key as an overlay side by side, under a caption strip (probe id, true class, predicted class and its
  probability) and the method names, a colorbar under every map tile giving its numeric range (on its own
  scale: the map's minimum to maximum); with ``normalize="both"`` a second row shows the maps on the fixed
  scale, each with a colorbar of the fixed range. ``layout="per_probe"`` logs one overlay per key
  and probe (``viz-<family>/<key>/<probe-id>``), ``layout="grid"`` one grid per key (each tile named by its
  probe id and true class);
* logs summary statistics of the raw maps as scalars (``viz-<family>/<key>/stats/{mean_abs,max_abs,std}``);
* hands the maps to the optional :attr:`tracker` (filmstrips, drift, faithfulness; see ``tracking.py``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from ..layers import module_device, module_dtype
from ..logging import VizLogger, make_tag
from ..probe import ProbeSet
from ..render import (
    FixedScale,
    _shared_colorbar,
    _shared_strip,
    class_name,
    colormap,
    compose,
    cut_name,
    diverging_cmap,
    fit_names,
    is_flat,
    labeled_grid,
    normalize_maps,
    overlay,
    to_uint8,
    upscale,
    with_colorbar,
)
from ..targets import LabelTarget, Probabilities, check_probabilities, class_probabilities, resolve_target
from ..tracking import MapTracker
from .base import DEV_RUN_STEPS, VisualizationCallback

__all__ = ["MapCallback"]

MAP_PREFIX = "map:"
PRED_PREFIX = "pred:"


class MapCallback(VisualizationCallback):
    """Base for heatmap methods. See module docstring.

    Args:
        normalize: ``"per_image"`` (shape of each map), ``"fixed"`` (one scale for the whole run, so
            magnitudes compare across epochs), or ``"both"`` (a second row of the panel; two images per
            probe and key with the other layouts).
        layout: ``"panel"`` (one image per probe: the image and every method/layer, with captions),
            ``"per_probe"`` (one image per probe and method/layer) or ``"grid"`` (one grid per method/layer).
        display_px: shorter side, in pixels, that each tile is upscaled to (integer factor; 0 keeps the
            probe size), so a 32 px probe shows at 128 px. Overlays are blended at the probe size and zoomed
            with the image (nearest): one block per probe pixel.
        cmap: matplotlib colormap for the heat (default ``"jet"``, or the diverging ``"RdBu_r"`` for signed maps,
            zero in white).
        alpha: heat opacity over the image.
        signed: treat maps as signed (diverging normalization) -- e.g. the signed gradient.
        tracker: optional :class:`lightning_viz.tracking.MapTracker` for filmstrips, drift, faithfulness,
            localization and the sanity check (it gets this callback, to render alike and recompute maps).
        probabilities: how logits become the class probabilities shown and used (captions, the tracker's
            deletion/insertion curves, occlusion's ``prob``, Score-CAM): ``"softmax"`` over the classes, or
            ``"sigmoid"`` of each class's own logit (multi-label heads trained with ``BCEWithLogitsLoss``).
        **kwargs: schedule and probe options of :class:`VisualizationCallback`.
    """

    def __init__(
        self,
        normalize: Literal["per_image", "fixed", "both"] = "per_image",
        layout: Literal["panel", "per_probe", "grid"] = "panel",
        display_px: int = 128,
        cmap: Optional[str] = None,
        alpha: float = 0.5,
        signed: bool = False,
        tracker: Optional[MapTracker] = None,
        probabilities: Literal["softmax", "sigmoid"] = "softmax",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        check_probabilities(probabilities, f"{type(self).__name__}(probabilities=...)")
        if normalize not in ("per_image", "fixed", "both"):
            raise ValueError(f"normalize must be 'per_image', 'fixed' or 'both'; got {normalize!r}")
        if layout not in ("panel", "per_probe", "grid"):
            raise ValueError(f"layout must be 'panel', 'per_probe' or 'grid'; got {layout!r}")
        if display_px < 0:
            raise ValueError(f"display_px must be >= 0 (0 keeps the probe size); got {display_px}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (heat opacity over the image); got {alpha}")
        if cmap is not None:
            colormap(torch.zeros(1, 1, 1), cmap)  # an unknown colormap fails here, not after the first epoch
        self.normalize = normalize
        self.layout = layout
        self.display_px = display_px
        self.cmap = cmap
        self.alpha = alpha
        self.signed = signed
        self.tracker = tracker
        self.probabilities = probabilities
        self.scales: dict[str, FixedScale] = {}

    def shared_tags(self) -> set[str]:
        tags = {"panel"} if self.layout == "panel" else set()
        if self.tracker is not None and self.tracker.filmstrip:
            tags.add("filmstrip")
        if self.tracker is not None and self.tracker.drift:
            tags |= {"drift/prediction_flips", "probe_accuracy"}
        return tags

    def dev_run_options(self) -> dict[str, Any]:
        options = super().dev_run_options()
        if self.tracker is not None:  # deletion/insertion curves of 3 points
            options["tracker.deletion_steps"] = min(self.tracker.deletion_steps, DEV_RUN_STEPS)
        return options

    # ------------------------------------------------------------------ subclass API
    def compute_maps(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Tensor]:
        """Raw maps ``{key: Tensor[N, H, W]}`` for this rank's probes (``key`` = ``"<method>/<layer>"``)."""
        raise NotImplementedError

    def needs_labels(self) -> bool:
        target = getattr(self, "target", None)  # the target of gradient, CAM and occlusion maps
        return target is not None and isinstance(resolve_target(target), LabelTarget)

    def check_probes(self, probe: ProbeSet) -> None:
        super().check_probes(probe)
        tracker = self.tracker
        if (
            tracker is not None
            and tracker.faithfulness
            and tracker.target is not None
            and isinstance(resolve_target(tracker.target), LabelTarget)
            and probe.labels is None
        ):
            raise ValueError(
                f"{type(self).__name__}(tracker=MapTracker(target='label')): the deletion/insertion curves follow "
                "each probe's label, but these probes have none. Use MapTracker target='predicted', a class index or "
                "None (the callback's target; the prediction on unlabeled probes), or data that yields (x, y)."
            )
        if self.tracker is not None and self.tracker.pointing_game and probe.masks is None:
            raise ValueError(
                f"{type(self).__name__}(tracker=MapTracker(pointing_game=True)): the pointing game needs a "
                "ground-truth mask per probe image (items (image, label, mask), e.g. the shapes dataset), but these "
                "probes have none. Use pointing_game=None (when masks exist) or False, or data with masks."
            )

    # ------------------------------------------------------------------ base implementation
    @property
    def heat_cmap(self) -> str:
        """The colormap in use (``cmap``, or the default for signed / unsigned maps)."""
        return diverging_cmap(self.cmap, self.signed)

    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        model = self.adapted(pl_module)  # logits_fn applied; layer names unchanged
        maps = self.compute_maps(model, probe)
        out: dict[str, Any] = {MAP_PREFIX + k: v.detach().float().cpu() for k, v in maps.items()}
        if self.layout == "panel":
            out.update(self.predict(model, probe))
        if self.tracker is not None:
            out.update(self.tracker.compute(model, probe, maps, callback=self))
        return out

    def predict(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Tensor]:
        """Predicted class and probability per probe for the panel captions (see :func:`predictions`)."""
        return predictions(pl_module, probe, getattr(self, "chunk_size", None), self.probabilities)

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        maps = {k[len(MAP_PREFIX) :]: v for k, v in results.items() if k.startswith(MAP_PREFIX)}
        images = probe.display_images()
        if self.layout == "panel":
            shown, oks = {}, {}
            for key, m in maps.items():
                oks[key], shown[key] = self.finite(key, m)
                self.log_stats(logger, key, shown[key], oks[key])
            self.log_panels(logger, shown, images, probe, results, self.get_class_names(trainer), oks)
        else:
            names = self.get_class_names(trainer)
            for key, m in maps.items():
                self.log_map(logger, key, m, images, probe, names)
        if self.tracker is not None:
            self.tracker.log(logger, maps, results, probe, trainer, callback=self)

    def finite(self, key: str, maps: Tensor) -> tuple[Tensor, Tensor]:
        """``(ok, maps)``: which probes' maps are all finite (a warning otherwise), and the maps with the others
        zeroed (left out of the statistics and the fixed scale, zero in panels and grids, not logged per probe)."""
        ok = self.warn_non_finite(f"the {key} maps", maps)
        return ok, torch.where(ok.view(-1, *[1] * (maps.ndim - 1)), maps, torch.zeros_like(maps))

    def log_stats(self, logger: VizLogger, key: str, maps: Tensor, ok: Tensor | None = None) -> None:
        """``viz-<family>/<key>/stats/{mean_abs,max_abs,std}`` of the raw maps (of the ``ok`` probes)."""
        ok = torch.ones(maps.shape[0], dtype=torch.bool) if ok is None else ok
        flat = maps[ok].flatten(1) if bool(ok.any()) else maps.new_zeros(1, 1)
        logger.scalar(make_tag(self.method, key, "stats", "mean_abs"), flat.abs().mean())
        logger.scalar(make_tag(self.method, key, "stats", "max_abs"), flat.abs().max())
        logger.scalar(make_tag(self.method, key, "stats", "std"), flat.std() if flat.numel() > 1 else 0.0)

    def variants(
        self, key: str, maps: Tensor, ok: Tensor | None = None
    ) -> list[tuple[str, Tensor, tuple[float, float] | None]]:
        """``(suffix, maps in [0, 1], fixed (vmin, vmax) or None)`` for each asked normalization (the fixed scale
        is set from the ``ok`` probes only)."""
        out: list[tuple[str, Tensor, tuple[float, float] | None]] = []
        if self.normalize in ("per_image", "both"):
            out.append(("", normalize_maps(maps, "per_image", signed=self.signed), None))
        if self.normalize in ("fixed", "both"):
            scale = self.scales.setdefault(key, FixedScale(signed=self.signed))
            vmin, vmax = scale.update(maps if ok is None else maps[ok])
            out.append(
                ("fixed" if self.normalize == "both" else "", normalize_maps(maps, "fixed", vmin, vmax), (vmin, vmax))
            )
        return out

    def overlays(self, images01: Tensor, maps01: Tensor) -> Tensor:
        """uint8 overlays of ``[N, h, w]`` maps (in ``[0, 1]``) on the probe images, blended at the probes' own
        resolution (maps resized to it, bilinear) and then zoomed to ``display_px`` as the images are (nearest):
        each probe pixel and its value are one block, as Captum's ``visualize_image_attr`` (matplotlib's
        nearest upsampling) and torchcam's ``overlay_mask`` (at the image's size) show them. Cheaper, too: the
        blend, its uint8 conversion and the PNG rows (a zoomed row repeats) scale with the probe's pixels."""
        over = to_uint8(overlay(images01, maps01, self.alpha, self.heat_cmap))
        return upscale(over, self.display_px) if self.display_px else over

    def log_map(
        self,
        logger: VizLogger,
        key: str,
        maps: Tensor,
        images01: Tensor,
        probe: ProbeSet,
        class_names: list[str] | None = None,
    ) -> None:
        """Overlays (``layout="per_probe"`` or ``"grid"``) and statistics for one ``[N, H, W]`` raw map tensor."""
        ok, maps = self.finite(key, maps)
        self.log_stats(logger, key, maps, ok)
        for suffix, m01, rng in self.variants(key, maps, ok):
            over = self.overlays(images01, m01)
            if self.layout == "grid":  # each tile named (probe id, true class), the scale in the caption
                labels = [
                    pid if probe.labels is None else f"{pid} {class_name(probe.labels[i], class_names)}"
                    for i, pid in enumerate(probe.ids)
                ]
                scale = "each map on its own range" if rng is None else "one fixed range"
                grid = labeled_grid(over, labels, caption=f"{key}: {scale}")
                if rng is not None:  # the fixed scale's numeric range under the grid
                    grid = with_colorbar(grid, rng[0], rng[1], self.heat_cmap)
                logger.image(make_tag(self.method, key, suffix or None, "grid"), grid)
            else:
                for i, (pid, img, finite, bar) in enumerate(
                    zip(probe.ids, over, ok.tolist(), self.bars(maps, ok, rng, int(over.shape[-1])))
                ):
                    if finite:  # the image has no text: the caption (W&B shows it) names the probe, class and map
                        true = "" if probe.labels is None else f"  true: {class_name(probe.labels[i], class_names)}"
                        logger.image(
                            make_tag(self.method, key, pid, suffix or None),
                            img if bar is None else torch.cat([img, bar], dim=1),
                            caption=f"{pid}{true}  {key}" + (f" ({suffix} scale)" if suffix else ""),
                        )

    def bars(self, maps: Tensor, ok: Tensor | None, rng: tuple[float, float] | None, width: int) -> list[Tensor | None]:
        """Per probe, the uint8 strip under its overlay of raw ``maps``: the colorbar of the fixed range ``rng``, else
        of the map's own range (signed: ``-max|m|..max|m|``, zero marked), or a note on a constant map."""
        if rng is not None:  # fixed scale: one range for every probe
            return [_shared_colorbar(width, rng[0], rng[1], self.heat_cmap)] * len(maps)
        if self.signed:  # per image, signed: each probe's own symmetric range, zero marked
            top, notes = maps.flatten(1).abs().amax(dim=1).tolist(), _empty_map_notes(maps, ok, width)
            return [_shared_colorbar(width, -t, t, self.heat_cmap) if t > 0 else n for t, n in zip(top, notes)]
        return _per_image_bars(maps, ok, width, self.heat_cmap)  # per image: own range, or a note

    def log_panels(
        self,
        logger: VizLogger,
        maps: dict[str, Tensor],
        images01: Tensor,
        probe: ProbeSet,
        results: dict[str, Any],
        class_names: list[str] | None,
        oks: dict[str, Tensor] | None = None,
    ) -> None:
        """One ``viz-<family>/panel/<probe-id>`` image per probe: image | one overlay per key, a second row on
        the fixed scale (with colorbars) when ``normalize="both"``, captions with class names."""
        big8 = to_uint8(images01)  # uint8 before the nearest zoom: fewer pixels to convert, the same levels
        big8 = upscale(big8, self.display_px) if self.display_px else big8
        size = big8.shape[-2:]
        keys = list(maps)
        width = int(size[-1])
        rows: list[list[Tensor]] = []  # per variant: [N, 3, h, w] overlays per key
        bars: list[list[list[Tensor | None]]] = []  # per variant, per key: a colorbar per probe (or None)
        for key in keys:
            for v, (_, m01, rng) in enumerate(self.variants(key, maps[key], (oks or {}).get(key))):
                if len(rows) <= v:
                    rows.append([])
                    bars.append([])
                rows[v].append(self.overlays(images01, m01))  # uint8 once per key and variant: what compose pastes
                bars[v].append(self.bars(maps[key], (oks or {}).get(key), rng, width))
        layers = {k.split("/", 1)[-1] for k in keys}
        labels = ["image"] + [k.split("/", 1)[0] if len(layers) == 1 else k.replace("/", " ") for k in keys]
        both = self.normalize == "both"
        fixed_tile = _shared_strip(int(size[-1]), ["fixed scale"], 14)
        for i, pid in enumerate(probe.ids):
            tiles = [[big8[i] if v == 0 else fixed_tile] + [r[i] for r in row] for v, row in enumerate(rows)]
            under: list[list[Tensor | None]] = [[None, *(per_key[i] for per_key in bar)] for bar in bars]
            suffix = "   top: per image, bottom: fixed scale" if both else ""
            width = sum(int(t.shape[-1]) for t in tiles[0]) + 2 * (len(tiles[0]) + 1)  # compose's, pad 2
            caption = panel_caption(pid, probe, results, i, class_names, width, suffix)
            logger.image(
                make_tag(self.method, "panel", pid), compose(tiles, labels, caption, under=under), caption=caption
            )  # drawn in the image; also shown by backends that keep captions (W&B)

    def extra_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"scales": {k: s.state_dict() for k, s in self.scales.items()}}
        if self.tracker is not None and hasattr(self.tracker, "state_dict"):
            state["tracker"] = self.tracker.state_dict()
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.scales = {}
        for k, s in (state.get("scales") or {}).items():
            self.scales[k] = FixedScale()
            self.scales[k].load_state_dict(s)
        if self.tracker is not None and hasattr(self.tracker, "load_state_dict"):
            self.tracker.load_state_dict(state.get("tracker") or {})


def probabilities(logits: Tensor, probabilities: Probabilities = "softmax") -> dict[str, Tensor]:
    """``{"pred:class": [N], "pred:prob": [N]}`` from logits ``[N, K]``: argmax and its probability (softmax, or
    with ``probabilities="sigmoid"`` ``sigmoid`` of the largest logit: multi-label heads)."""
    return _predicted(logits, probabilities)


def _predicted(logits: Tensor, how: Probabilities) -> dict[str, Tensor]:
    probs = class_probabilities(logits.detach().float(), how)
    prob, cls = probs.max(dim=1)
    out = {PRED_PREFIX + "class": cls.cpu(), PRED_PREFIX + "prob": prob.cpu()}
    if how == "sigmoid":  # multi-label: every class's own probability, for captions naming each predicted class
        out[PRED_PREFIX + "probs"] = probs.cpu()
    return out


#: most predicted classes a multi-label caption names (by probability), the others counted as "+n"
CAPTION_CLASSES = 3


def predicted_text(results: dict[str, Any], i: int, class_names: list[str] | None, n: int | None = None) -> str:
    """``"circle 87%"``: probe ``i``'s predicted class and its probability; with per-class sigmoid probabilities
    (``pred:probs``, multi-label) every class over 50%, most probable first (``"circle 91%, cross 77%"``, beyond
    :data:`CAPTION_CLASSES` ``"+2"``), or the most probable one when none is. Names cut to ``n`` characters."""
    cls, prob, probs = results[PRED_PREFIX + "class"], results[PRED_PREFIX + "prob"], results.get(PRED_PREFIX + "probs")
    picked = [(int(cls[i]), float(prob[i]))]
    if probs is not None:
        p = probs[i]
        yes = [(int(c), float(p[c])) for c in p.argsort(descending=True, stable=True) if float(p[c]) > 0.5]
        picked = yes or picked
    text = ", ".join(f"{cut_name(class_name(c, class_names), n)} {q:.0%}" for c, q in picked[:CAPTION_CLASSES])
    return text + (f" +{len(picked) - CAPTION_CLASSES}" if len(picked) > CAPTION_CLASSES else "")


def predictions(
    pl_module: LightningModule, probe: ProbeSet, chunk_size: int | None = None, probabilities: Probabilities = "softmax"
) -> dict[str, Tensor]:
    """``{"pred:class": [N], "pred:prob": [N]}``: the model's predicted class and its probability
    (softmax or per-class sigmoid: :func:`probabilities`; no-grad forwards of ``chunk_size`` probes; nothing
    when the model does not return logits ``[N, K]``)."""
    x = probe.to(module_device(pl_module), module_dtype(pl_module))
    step = chunk_size or len(x)
    parts = []
    with torch.no_grad():
        for s in range(0, len(x), step):
            logits = pl_module(x[s : s + step])
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                return {}
            parts.append(logits.float())
    return _predicted(torch.cat(parts), probabilities)


def _per_image_bars(maps: Tensor, ok: Tensor | None, width: int, cmap: str) -> list[Tensor | None]:
    """Per probe, the strip under a panel tile of an unsigned map on its own scale: a colorbar from the map's
    minimum to its maximum (the range the colormap spans for that probe), or the note of :func:`_empty_map_notes`
    for a constant or non-finite map."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(dim=1).tolist(), flat.amax(dim=1).tolist()
    notes = _empty_map_notes(maps, ok, width)
    return [_shared_colorbar(width, lo[i], hi[i], cmap) if n is None else n for i, n in enumerate(notes)]


def _empty_map_notes(maps: Tensor, ok: Tensor | None, width: int) -> list[Tensor | None]:
    """Per probe, a text strip under a panel tile whose map is constant (nothing but the colormap's lowest color
    would show): ``"not finite"`` for maps zeroed for non-finite values, ``"map all zero"`` / ``"map constant"``
    otherwise; ``None`` for a map with structure."""
    flat = maps.flatten(1)
    lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    notes: list[Tensor | None] = []
    for i in range(len(flat)):
        if ok is not None and not bool(ok[i]):
            notes.append(_shared_strip(width, ["not finite"], 14))
        elif bool(is_flat(lo[i], hi[i])):  # constant up to float rounding, drawn as constant by normalize_maps
            notes.append(_shared_strip(width, ["map all zero" if float(hi[i]) == 0 else "map constant"], 14))
        else:
            notes.append(None)
    return notes


def panel_caption(
    pid: str,
    probe: ProbeSet,
    results: dict[str, Any],
    i: int,
    class_names: list[str] | None,
    width: int | None = None,
    suffix: str = "",
) -> str:
    """``"p003  true: circle  pred: square 87%"`` (parts that are unknown are left out), then ``suffix``; with
    ``width`` (pixels of the caption strip) the class names are cut so that the whole caption fits."""

    def make(n: int | None) -> str:
        parts = [pid]
        if probe.labels is not None:
            parts.append(f"true: {cut_name(class_name(probe.labels[i], class_names), n)}")
        if results.get(PRED_PREFIX + "class") is not None and results.get(PRED_PREFIX + "prob") is not None:
            parts.append(f"pred: {predicted_text(results, i, class_names, n)}")
        return "  ".join(parts) + suffix

    return make(None) if width is None else fit_names(make, width)
