"""TopPatchesCallback: for chosen units, the input patches (receptive fields) of the probes that excite them most."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from ..capture import capture, isolated
from ..layers import get_layer, module_device, module_dtype, resolve_layers
from ..logging import VizLogger, indexed, make_tag
from ..methods.batching import images_per_forward
from ..methods.checks import check_chunk_size
from ..methods.patches import TopK, merge_topk, scan_topk_layers
from ..methods.receptive_field import NotAConvStackError, crop_boxes, receptive_field, stack_receptive_field
from ..probe import ProbeSet
from ..progress import reporting
from ..render import _shared_strip, class_name, compose
from ._options import as_layer_list, renamed_option
from .base import DEV_RUN_STEPS, VisualizationCallback

__all__ = ["TopPatchesCallback"]


def resize_patches(crops: Tensor, px: int) -> Tensor:
    """Crops ``[k, C, h, w]`` shown with their longer side at ``px`` (the aspect ratio kept: a field capped by a
    non-square image, or of a non-square kernel): small ones upsampled (nearest: crisp pixels), larger ones
    averaged down (``area``: a 230 px receptive field shown at 64 px without nearest's aliasing)."""
    h, w = crops.shape[-2:]
    size = (max(1, round(h * px / max(h, w))), max(1, round(w * px / max(h, w))))
    mode = "area" if max(h, w) > px else "nearest"
    return F.interpolate(crops, size=size, mode=mode)


class TopPatchesCallback(VisualizationCallback):
    """Top-``k`` activating patches per unit (Zeiler & Fergus 2014, Fig. 2), one image grid per unit.

    Top-scoring regions per unit as in Girshick et al. 2014, Sec. 3.1; receptive fields: Araujo et al. 2019.

    Every rank scans its shard of the (larger) probe set in batches and keeps its own top-``k`` per
    unit; rank 0 merges the candidate lists with :func:`~lightning_viz.methods.patches.merge_topk`
    (value descending, then probe index ascending, so the result does not depend on the number of
    ranks), crops each winner's receptive field around its strongest position (padding gray at the
    borders) and logs ``viz-top_patches/<layer>/unit<c>`` (grid, best first) and ``.../unit<c>/max``
    (the top activation); with ``layout="grid"`` one ``viz-top_patches/<layer>/grid`` per layer instead, one
    row per unit, each patch with the class of its probe underneath.

    Args:
        layers: layer name(s) whose channels are the units (conv feature maps ``[B, C, h, w]``).
        units: channel indices per layer; ``None``: the first ``num_units`` channels.
        num_units: how many channels when ``units`` is ``None``.
        k: patches per unit.
        chunk_size: probe images per forward while scanning (``None``: as many as the memory budget of
            :mod:`lightning_viz.methods.batching` holds).
        batch_size: deprecated alias of ``chunk_size``.
        receptive_field: ``"auto"`` (layer arithmetic on plain conv/pool chains, followed op by op through
            residual sums, concatenations and gates: the gradient support's boxes from one forward; else gradient
            support), ``"arithmetic"`` (plain chains only) or ``"gradient"``.
        patch_px: displayed size of each patch (nearest upsampling of small receptive fields, area averaging of
            large ones: a deep layer's field spans a 224 px image; 0 keeps the receptive-field size).
        layout: ``"per_unit"`` (one image per unit) or ``"grid"`` (one image per layer, a row per unit).
        num_probes: size of the scanned probe set (default 256).
        **kwargs: :class:`VisualizationCallback` options.
    """

    method = "top_patches"
    model_use = "forward"

    def __init__(
        self,
        layers: Union[str, list[str]],
        units: Optional[list[int]] = None,
        num_units: int = 8,
        k: int = 9,
        chunk_size: Optional[int] = None,
        receptive_field: Literal["auto", "arithmetic", "gradient"] = "auto",
        patch_px: int = 64,
        layout: Literal["per_unit", "grid"] = "per_unit",
        num_probes: int = 256,
        batch_size: Optional[int] = None,
        **kwargs: Any,
    ):
        super().__init__(num_probes=num_probes, **kwargs)
        owner = type(self).__name__
        chunk_size = renamed_option(owner, "batch_size", "chunk_size", batch_size, chunk_size, None)
        if not layers:
            raise ValueError("layers must name at least one layer (e.g. ['layer2', 'layer3.1.conv2'])")
        names = as_layer_list(owner, layers) or []
        if units is not None and (not units or min(units) < 0):
            raise ValueError(f"units must be a non-empty list of channel indices >= 0, or None; got {units!r}")
        for name, v in (("num_units", num_units), ("k", k)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1; got {v}")
        chunk_size = check_chunk_size(chunk_size)
        if receptive_field not in ("auto", "arithmetic", "gradient"):
            raise ValueError(f"receptive_field must be 'auto', 'arithmetic' or 'gradient'; got {receptive_field!r}")
        if patch_px < 0:
            raise ValueError(f"patch_px must be >= 0; got {patch_px}")
        if layout not in ("per_unit", "grid"):
            raise ValueError(f"TopPatchesCallback: layout must be 'per_unit' or 'grid'; got {layout!r}")
        self.layout = layout
        self.layers = names
        self.units = None if units is None else list(units)
        self.num_units, self.k, self.chunk_size = num_units, k, chunk_size
        self.receptive_field, self.patch_px = receptive_field, patch_px
        self._boxes: dict[tuple, Tensor] = {}
        self._layer_channels: dict[str, int] = {}  # seen at setup: the width of the unit tags' indices

    def state_key_parts(self) -> tuple[Any, ...]:
        return super().state_key_parts() + (
            tuple(self.layers),
            None if self.units is None else tuple(self.units),
            self.num_units,
            self.k,
        )

    def dev_run_options(self) -> dict[str, Any]:  # 2 units, 2 patches each
        units = None if self.units is None else self.units[:DEV_RUN_STEPS]
        options = {"units": units, "num_units": min(self.num_units, DEV_RUN_STEPS), "k": min(self.k, DEV_RUN_STEPS)}
        return {**super().dev_run_options(), **options}

    def _check_units(self, name: str, channels: int | None) -> None:
        """``units`` within layer ``name``'s ``channels`` (``None``: not known yet)."""
        if channels is not None:
            self._layer_channels[name] = channels
        if self.units is not None and channels is not None and max(self.units) >= channels:
            raise ValueError(
                f"TopPatchesCallback: units {self.units} out of range for layer {name!r} with {channels} channels "
                f"(0..{channels - 1})"
            )

    def check_input(self, model: Any, x: Tensor) -> None:  # the outputs' widths (also of blocks and pools)
        for name, out in self.check_layer_outputs(model, x, list(self.layers)).items():
            self._check_units(name, out.shape[1])
        if self.receptive_field == "arithmetic":  # a branched model (any residual net) is refused now, not at the
            for name in self.layers:  # first run after a whole epoch: one forward of a zero image per layer
                try:
                    stack_receptive_field(model, name, tuple(x.shape[1:]))
                except NotAConvStackError as exc:
                    raise ValueError(
                        f"TopPatchesCallback: receptive_field='arithmetic' does not apply to layer {name!r}: "
                        f"{str(exc).removesuffix('; use the gradient method')}. Use receptive_field='auto' (layer "
                        "arithmetic where it applies, else the gradient) or 'gradient'."
                    ) from None

    def check(self, pl_module: LightningModule) -> None:  # before any forward: the layers' declared widths
        self.layers = resolve_layers(pl_module, self.layers)
        self._boxes = {}  # receptive fields of this setup's model (callbacks reused for another architecture)
        self._layer_channels = {}
        for name in self.layers:
            self._check_units(name, getattr(get_layer(pl_module, name), "out_channels", None))

    def _units(self, pl_module: LightningModule, x1: Tensor) -> dict[str, list[int]]:
        if self.units is not None:
            return {name: self.units for name in self.layers}
        with torch.no_grad(), capture(pl_module, self.layers) as cap:
            pl_module(x1)
            return {name: list(range(min(self.num_units, cap[name].shape[1]))) for name in self.layers}

    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        pl_module = self.adapted(pl_module)
        x = probe.to(module_device(pl_module), module_dtype(pl_module))
        units = self._units(pl_module, x[:1])
        out: dict[str, Any] = {}
        chunk = self.chunk_size or images_per_forward(pl_module, x)
        tops = scan_topk_layers(pl_module, x, units, self.k, chunk, offset=probe.offset)  # one forward for all layers
        for name in self.layers:
            out[name] = tops[name].to_rows()  # [k_local, U, 4]: dim 0 = candidate, concatenated over ranks
            out["units:" + name] = torch.tensor(units[name]).view(1, -1)  # same on every rank
        return out

    def boxes(self, pl_module: LightningModule, layer: str, input_shape: tuple[int, ...]) -> Tensor:
        """Receptive-field boxes ``[h, w, 4]`` of ``layer`` (cached: a property of the architecture)."""
        key = (layer, tuple(input_shape), self.receptive_field)
        if key not in self._boxes:
            model = self.adapted(pl_module)
            with isolated(model), reporting(self.method):  # log_results runs on rank 0 only
                boxes = receptive_field(model, layer, input_shape, self.receptive_field).cpu()
            if not bool((boxes[..., 2:] > boxes[..., :2]).all()):  # empty supports: no gradient got through (NaN)
                return boxes.new_tensor([0, 0, *input_shape[-2:]]).expand_as(boxes)  # the whole image, not cached
            self._boxes[key] = boxes
        return self._boxes[key]

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        images = probe.display_images()
        names = self.get_class_names(trainer)
        for name in self.layers:
            units = results["units:" + name][0].tolist()
            top: TopK = merge_topk([TopK.from_rows(results[name])], self.k)
            finite = self.warn_non_finite(f"the {name} top activations", top.values, rows="units")
            if not bool(finite.any()):  # a diverged model (NaN weights): no unit to show, nor receptive fields
                continue
            boxes = self.boxes(trainer.lightning_module, name, tuple(probe.images.shape[1:]))
            rows, under = [], []
            largest = self._layer_channels.get(name, max(units) + 1) - 1
            for u, c in enumerate(units):
                if not bool(finite[u]):  # left out, as the warning says
                    continue
                img_idx = top.image[u]
                sel = boxes[top.y[u], top.x[u]]  # [k, 4]
                crops = crop_boxes(images[img_idx], sel, pad_value=0.5, max_size=images.shape[-2:])
                if self.patch_px:
                    crops = resize_patches(crops, self.patch_px)
                w = int(crops.shape[-1])
                # a probe where the unit is nowhere > 0 does not excite it: its "patch" would be an arbitrary one
                # (a dead unit's all-zero map: the top-left corner of the first probes), so none is shown
                fired = (top.values[u] > 0).tolist()
                labels = [
                    (class_name(probe.labels[j], names) if probe.labels is not None else f"#{int(j)}")
                    if on
                    else "not active"
                    for j, on in zip(img_idx.tolist(), fired)
                ]
                strips = [_shared_strip(w, [t], 11) for t in labels]
                shown = [crop if on else torch.full_like(crop, 0.9) for crop, on in zip(crops, fired)]  # light gray
                note = "" if any(fired) else f" (not active on any of the {len(probe)} probes)"
                if self.layout == "grid":
                    rows.append([_shared_strip(64, [f"unit {c}"], 14)] + shown)
                    under.append([None] + strips)
                else:  # as a row of the grid: the unit named, each patch's class under it
                    caption = f"{name} unit {c}: top-{self.k} patches, strongest first{note}"
                    image = compose([shown], None, caption, under=[strips])
                    logger.image(make_tag(self.method, name, indexed("unit", c, largest)), image)
                logger.scalar(make_tag(self.method, name, indexed("unit", c, largest), "max"), top.values[u, 0])
            if self.layout == "grid" and rows:
                caption = f"{name}: top-{self.k} patches per unit, strongest first"
                logger.image(make_tag(self.method, name, "grid"), compose(rows, None, caption, under=under))
