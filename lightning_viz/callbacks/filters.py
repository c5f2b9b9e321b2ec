"""FilterCallback: the learned first-layer filters (or linear templates) as an image grid, every epoch.

Tags (step = epoch):
* ``viz-filters/<layer>/grid`` -- RGB tiles when the filters have 3 input channels, otherwise one
  grayscale tile per (filter, input channel): one row per filter;
* ``viz-filters/<layer>/mean_norm`` -- mean L2 norm of the filters;
* ``viz-filters/<layer>/rel_change`` -- ``||W_t - W_prev|| / ||W_prev||`` since the previous logged
  epoch (from the second run on; kept across resume).
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from ..layers import (
    canonical_name,
    first_conv_name,
    get_layer,
    has_lazy_parameters,
    linear_layer_names,
    require_conv,
)
from ..logging import VizLogger, make_tag
from ..methods.filters import conv_filters, first_linear_name, linear_templates
from ..probe import ProbeSet, read_item
from ..render import class_name, compose, image_grid, labeled_grid, normalize_maps
from ._options import LayersSpec, reject_options, renamed_option, single_layer
from .base import VisualizationCallback, _find_dataset

__all__ = ["FilterCallback", "filter_grid", "filter_tiles"]

#: Tiles are upscaled (nearest) by an integer factor to at least this many pixels, so 3x3 kernels are visible.
MIN_TILE_PX = 24
#: The logged image is at least this wide: room for its caption.
MIN_WIDTH_PX = 200


def filter_grid(
    weights: Tensor, normalize: str = "per_filter", max_filters: int = 64, rgb: Optional[bool] = None
) -> Tensor:
    """``[out, in, kh, kw]`` weights -> one ``[3, H, W]`` grid image in ``[0, 1]``.

    The first ``max_filters`` filters are shown (and, without RGB, at most ``max_filters`` input channels,
    one row per filter; single-channel filters fill a square grid), min-max scaled per filter (``"per_filter"``)
    or on one range for all shown filters (``"global"``). ``rgb``: whether 3 input channels are the image's colors
    (default: when there are 3; not for a grouped convolution, whose 3 are another group's channels).
    """
    tiles, nrow = filter_tiles(weights, normalize, max_filters, rgb)
    return image_grid(tiles, nrow=nrow, padding=1)


def filter_tiles(
    weights: Tensor, normalize: str = "per_filter", max_filters: int = 64, rgb: Optional[bool] = None
) -> tuple[Tensor, int | None]:
    """The tiles of :func:`filter_grid` (``[T, 1 or 3, h, w]`` in ``[0, 1]``, upscaled) and its tiles per row
    (``None``: a square grid)."""
    w = weights.detach().float()[:max_filters]
    rgb = w.shape[1] == 3 and rgb is not False
    if not rgb:
        w = w[:, :max_filters]
    out, cin, kh, kw = w.shape
    flat = w.reshape(out, cin * kh, kw)
    if normalize == "per_filter":
        w01 = normalize_maps(flat, "per_image")
    else:
        w01 = normalize_maps(flat, "fixed", vmin=float(w.min()), vmax=float(w.max()))
    w01 = w01.view(out, cin, kh, kw)
    tiles = w01 if rgb else w01.reshape(out * cin, 1, kh, kw)
    scale = max(1, -(-MIN_TILE_PX // max(kh, kw)))
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    return tiles, None if rgb or cin == 1 else cin


class FilterCallback(VisualizationCallback):
    """Log the weights of a conv layer (default: the first) or a linear layer's per-class templates.

    First-layer kernels as images: Krizhevsky et al. 2012, Fig. 3; linear class templates: Simonyan et al. 2014.

    Args:
        layers: the layer (one dotted name of ``model.named_modules()``, or a one-element list); default the
            first conv (``kind="conv"``) or the first linear layer (``kind="linear"``). One layer per instance.
        kind: ``"conv"`` (kernels ``[out, in, kh, kw]``) or ``"linear"`` (rows of a linear layer fed by
            the flattened image, reshaped to the input shape).
        scale: ``"per_filter"`` (each filter on its own range) or ``"global"`` (one range for all).
        max_filters: at most this many filters (and grayscale input channels) in the grid.
        input_shape: ``[C, H, W]`` of one input, for ``kind="linear"``; default: the probe images' shape.
        layer: deprecated alias of ``layers``.
        normalize: deprecated alias of ``scale``.
        **kwargs: schedule options of :class:`VisualizationCallback` (``every_n_epochs``, ``run_on``, ...);
            ``probe_source``/``probes`` give the input shape of ``kind="linear"`` templates (one image is read).

    Only rank 0 computes (``per_probe = False``); a probe image is only read for ``kind="linear"`` without
    ``input_shape``.
    """

    method = "filters"
    per_probe = False
    needs_probes = False
    model_use = "none"

    def __init__(
        self,
        layers: LayersSpec = None,
        kind: Literal["conv", "linear"] = "conv",
        scale: Literal["per_filter", "global"] = "per_filter",
        max_filters: int = 64,
        input_shape: Optional[list[int]] = None,
        layer: Optional[str] = None,
        normalize: Optional[str] = None,
        **kwargs: Any,
    ):
        owner = type(self).__name__
        reject_options(
            owner,
            kwargs,
            ("num_probes", "probe_seed"),
            "only the input shape of linear templates is read from one probe image",
        )
        super().__init__(num_probes=1, probe_seed=0, **kwargs)
        layer = single_layer(owner, renamed_option(owner, "layer", "layers", layer, layers, None))
        scale = renamed_option(owner, "normalize", "scale", normalize, scale, "per_filter")
        if kind not in ("conv", "linear"):
            raise ValueError(f"FilterCallback: kind must be 'conv' or 'linear'; got {kind!r}")
        if scale not in ("per_filter", "global"):
            raise ValueError(f"FilterCallback: scale must be 'per_filter' or 'global'; got {scale!r}")
        if max_filters < 1:
            raise ValueError(f"FilterCallback: max_filters must be >= 1; got {max_filters}")
        if input_shape is not None and len(input_shape) != 3:
            raise ValueError(f"FilterCallback: input_shape must be [C, H, W]; got {input_shape}")
        self.layer = layer
        self.kind = kind
        self.scale = scale
        self.max_filters = max_filters
        self.input_shape = None if input_shape is None else [int(s) for s in input_shape]
        # Linear templates need the input shape; take it from the probe images when not given.
        self.needs_probes = kind == "linear" and input_shape is None
        self.previous: Optional[Tensor] = None

    def state_key_parts(self) -> tuple[Any, ...]:
        return (self.name, self.method, self.kind, self.layer)

    def layer_name(self, pl_module: nn.Module) -> str:
        if self.layer is not None:
            return canonical_name(self.layer)
        return first_conv_name(pl_module) if self.kind == "conv" else first_linear_name(pl_module)

    def check(self, pl_module: LightningModule) -> None:
        name = self.layer_name(pl_module)
        if self.kind == "conv":
            conv = require_conv(pl_module, name, "conv_filters")
            if not has_lazy_parameters(conv):  # a lazy layer's weights come with the first training step
                conv_filters(pl_module, name)
            return
        lin = get_layer(pl_module, name)
        if not isinstance(lin, nn.Linear):
            raise ValueError(
                f"FilterCallback(kind='linear'): layer {name!r} is a {type(lin).__name__}, not nn.Linear. "
                f"Valid linear layers: {linear_layer_names(pl_module)}."
            )
        if self.input_shape is not None and not has_lazy_parameters(lin):
            linear_templates(pl_module, name, self.input_shape)

    def check_model(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().check_model(trainer, pl_module, stage)
        if self.needs_probes and self.probes is None and stage in ("fit", "validate"):
            # Templates take their shape from the images: check it on one dataset item now, not at the first epoch end.
            dataset = _find_dataset(trainer, self.probe_source)
            lazy = has_lazy_parameters(get_layer(pl_module, self.layer_name(pl_module)))
            if dataset is not None and not lazy:  # dataloaders given to fit() are attached later
                image, _, _ = read_item(dataset, 0)
                linear_templates(pl_module, self.layer_name(pl_module), list(torch.as_tensor(image).shape))

    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        name = self.layer_name(pl_module)
        if self.kind == "conv":
            weights = conv_filters(pl_module, name)
            if getattr(get_layer(pl_module, name), "groups", 1) != 1:  # each group reads its own input channels
                return {"layer": name, "weights": weights.float().cpu(), "rgb": False}
        else:
            if self.input_shape is not None:
                shape = self.input_shape
            else:
                assert probe is not None  # needs_probes is True for kind="linear" without input_shape
                shape = list(probe.images.shape[1:])
            weights = linear_templates(pl_module, name, shape)
        return {"layer": name, "weights": weights.float().cpu(), "rgb": None}

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        name, w = results["layer"], results["weights"]
        self.warn_non_finite(f"the {name} weights", w, rows="filters")
        logger.image(make_tag(self.method, name, "grid"), self.render(name, w, trainer, results.get("rgb")))
        logger.scalar(make_tag(self.method, name, "mean_norm"), w.flatten(1).norm(dim=1).mean())
        if self.previous is not None and self.previous.shape == w.shape:
            change = (w - self.previous).norm() / self.previous.norm().clamp_min(1e-12)
            logger.scalar(make_tag(self.method, name, "rel_change"), change)
        self.previous = w.clone()

    def render(self, name: str, w: Tensor, trainer: Optional[Trainer], rgb: Optional[bool] = None) -> Tensor:
        """The grid with a caption saying what it shows; linear templates (one tile each) labeled with their class
        (the data's class names when the layer has one output per class), else their output index."""
        out, cin = int(w.shape[0]), int(w.shape[1])
        shown = min(out, self.max_filters)
        scale = "each on its own range" if self.scale == "per_filter" else "one range for all"
        what = "filters" if self.kind == "conv" else "templates of outputs"
        caption = f"{name}: {what} 0-{shown - 1} of {out} ({cin}x{w.shape[2]}x{w.shape[3]}), {scale}"
        if cin != 1 and (cin != 3 or rgb is False):
            caption += f"; a row per {what.split()[0][:-1]}, a column per input channel"
        if self.kind == "linear" and cin in (1, 3):
            names = self.get_class_names(trainer)
            names = names if names is not None and len(names) == out else None
            tiles, _ = filter_tiles(w, self.scale, self.max_filters)
            labels = [class_name(k, names) for k in range(shown)]
            return labeled_grid(tiles, labels, caption=caption, label_px=12, min_width=MIN_WIDTH_PX)
        grid = filter_grid(w, self.scale, self.max_filters, rgb)
        return compose([[grid]], None, caption, pad=0, min_width=MIN_WIDTH_PX)

    def extra_state(self) -> dict[str, Any]:
        return {"previous": self.previous}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.previous = state.get("previous")
