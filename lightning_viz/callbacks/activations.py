"""ActivationCallback: each probe's feature maps at chosen layers, as one grid per (layer, probe).

Tags (step = epoch):
* ``viz-activations/<layer>/<probe-id>`` -- grid of the probe's channels (``max_channels`` of them),
  upscaled to the probe image size, on one range per probe (so weak channels look weak), with a colorbar
  of that range under them;
  with ``layout="grid"`` instead one ``viz-activations/<layer>/grid`` per layer: one row per probe
  (the probe image, then its channels), captions with class names;
* ``viz-activations/<layer>/dead_fraction`` -- fraction of all recorded activations that are ``<= 0``
  (zero after a ReLU; for a layer whose output is already rectified exactly the zeros);
* ``viz-activations/<layer>/dead_channels`` -- fraction of channels that are ``<= 0`` everywhere on
  every probe (dead units).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from ..layers import default_cam_layer, first_conv_name, module_device, module_dtype, resolve_layers
from ..logging import VizLogger, make_tag
from ..methods.activations import feature_maps
from ..methods.checks import check_chunk_size
from ..probe import ProbeSet
from ..render import (
    _fmt,
    _shared_strip,
    class_name,
    colormap,
    compose,
    labeled_grid,
    normalize_maps,
    resize_maps,
    to_uint8,
    upscale,
    with_colorbar,
)
from ._options import LayersSpec, as_layer_list, index_list
from .base import VisualizationCallback, VisualizationWarning

__all__ = ["ActivationCallback"]


def grid_tile_size(size: tuple[int, ...], display_px: int) -> tuple[int, int]:
    """Tile ``(h, w)`` of a grid row for probes of ``size``: the probe size divided by the largest integer factor
    that keeps the shorter side ``>= display_px`` (the size itself when it is not larger; ``0``: always)."""
    h, w = int(size[-2]), int(size[-1])
    factor = max(1, min(h, w) // display_px) if display_px else 1
    return h // factor, w // factor


#: the narrowest per-probe panel (a layer with one channel, ``channels=[5]``): room for its caption and colorbar labels
MIN_PANEL_PX = 160

#: how a grid's channels were chosen, in its caption
_ORDER = {"first": "first channels", "top": "strongest channels first", "list": "the chosen channels"}


class ActivationCallback(VisualizationCallback):
    """Log feature maps of ``layers`` for every probe image.

    Zeiler & Fergus 2014 (feature maps of chosen units per image); Yosinski et al. 2015 (live activations).

    Args:
        layers: dotted layer names; default the first conv layer and the last block feeding global pooling
            (:func:`~lightning_viz.layers.default_cam_layer`, e.g. ``layer4.1``; found by one forward at setup).
            Each must output a ``[B, C, h, w]`` map (a conv, a block such as ``"layer2"``, an activation module ...).
        max_channels: channels per grid.
        channels: which channels: ``"first"`` (channels ``0..max_channels-1``: the same channels every
            epoch, so each grid cell can be followed through training), ``"top"`` (each probe's
            ``max_channels`` channels with the largest mean activation, strongest first), or a list of channel
            indices (as :class:`UnitCallback` takes them; shown in that order, for every layer; ``max_channels``
            is then not used).
        cmap: matplotlib colormap for the maps.
        chunk_size: probes per forward pass (``None``: all at once).
        layout: ``"per_probe"`` (one grid image per layer and probe) or ``"grid"`` (one image per layer, a row
            per probe, tiles of about ``display_px``).
        display_px: shorter side of each tile with ``layout="grid"``: smaller probes are upscaled (nearest, integer
            factor), larger ones averaged down by an integer factor to the smallest size ``>= display_px`` (a row of
            16 channels of a 224 px probe: 56 px tiles, not 224; see :func:`grid_tile_size`); with ``"per_probe"``
            smaller probes are upscaled the same way (room for the channel labels).
        num_probes: probe images (default 4).
        **kwargs: schedule and probe options of :class:`VisualizationCallback`.
    """

    method = "activations"
    model_use = "forward"

    def __init__(
        self,
        layers: LayersSpec = None,
        max_channels: int = 16,
        channels: Union[Literal["first", "top"], list[int]] = "first",
        cmap: str = "viridis",
        chunk_size: Optional[int] = None,
        layout: Literal["per_probe", "grid"] = "per_probe",
        display_px: int = 48,
        num_probes: int = 4,
        **kwargs: Any,
    ):
        super().__init__(num_probes=num_probes, **kwargs)
        if max_channels < 1:
            raise ValueError(f"ActivationCallback: max_channels must be >= 1; got {max_channels}")
        if isinstance(channels, str) or not isinstance(channels, (list, tuple)):
            if channels not in ("first", "top"):
                raise ValueError(
                    "ActivationCallback: channels must be 'first', 'top' or a list of channel indices; "
                    f"got {channels!r}"
                )
        else:
            channels = index_list("ActivationCallback", "channels", channels, "channel")
        chunk_size = check_chunk_size(chunk_size)
        if layout not in ("per_probe", "grid"):
            raise ValueError(f"ActivationCallback: layout must be 'per_probe' or 'grid'; got {layout!r}")
        if display_px < 0:
            raise ValueError(f"ActivationCallback: display_px must be >= 0; got {display_px}")
        colormap(torch.zeros(1, 1, 1), cmap)  # an unknown colormap fails here, at construction
        self.layers = as_layer_list(type(self).__name__, layers)  # None: the first conv and the last block
        self.max_channels = max_channels
        self.channels = channels
        self.cmap = cmap
        self.chunk_size = chunk_size
        self.layout = layout
        self.display_px = display_px
        self._last_block: Optional[str] = None  # the default's deepest layer, found by one forward

    def state_key_parts(self) -> tuple[Any, ...]:
        channels = self.channels if isinstance(self.channels, str) else tuple(self.channels)
        return (*super().state_key_parts(), tuple(self.layers or ()), self.max_channels, channels)

    def layer_names(self, pl_module: LightningModule, x: Optional[torch.Tensor] = None) -> list[str]:
        """The layers to show; the default needs one forward of an input ``x`` of the data's shape (once)."""
        if self.layers is None:
            if self._last_block is None and x is not None:
                self._last_block = default_cam_layer(self.adapted(pl_module), x[:1], type(self).__name__)
            return list(dict.fromkeys([first_conv_name(pl_module)] + ([self._last_block] if self._last_block else [])))
        return list(dict.fromkeys(resolve_layers(pl_module, self.layers)))

    def check_input(self, model: Any, x: torch.Tensor) -> None:
        outs = self.check_layer_outputs(model, x, self.layer_names(model, x))
        if not isinstance(self.channels, str):
            for name, out in outs.items():
                if max(self.channels) >= out.shape[1]:
                    raise ValueError(
                        f"ActivationCallback: layer {name!r} has {out.shape[1]} channels (0..{out.shape[1] - 1}); "
                        f"got channels {self.channels}"
                    )
        flat = [n for n, a in outs.items() if a.shape[-2:].numel() == 1]
        if flat:  # e.g. the default last block of a ResNet on 32 px images: every tile one flat color
            rank_zero_warn(
                f"ActivationCallback: {'layers' if len(flat) > 1 else 'layer'} {', '.join(map(repr, flat))} "
                f"{'give' if len(flat) > 1 else 'gives'} 1x1 feature maps for {x.shape[-2]}x{x.shape[-1]} images, "
                "so each channel shows as one flat tile. Name an earlier layer with a spatial map in layers=[...] "
                "(e.g. 'layer3' of a ResNet) or use larger images.",
                category=VisualizationWarning,
            )

    def check(self, pl_module: LightningModule) -> None:
        self._last_block = None  # found again for this setup's model (callbacks reused for another architecture)
        self.layer_names(pl_module)

    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        model = self.adapted(pl_module)
        x = probe.to(module_device(model), module_dtype(model))  # e.g. a float64 network
        fmaps = feature_maps(model, x, self.layer_names(model, x), chunk_size=self.chunk_size)
        out: dict[str, Any] = {}
        for name, a in fmaps.items():
            a = a.float()
            k = min(self.max_channels, a.shape[1])
            if not isinstance(self.channels, str):
                idx = torch.tensor(self.channels, device=a.device).expand(a.shape[0], -1)
            elif self.channels == "top":
                idx = a.mean(dim=(2, 3)).topk(k, dim=1).indices  # [N, k]
            else:
                idx = torch.arange(k, device=a.device).expand(a.shape[0], k)
            sel = a.gather(1, idx.view(*idx.shape, 1, 1).expand(-1, -1, *a.shape[2:]))
            out[f"maps:{name}"] = sel.cpu()
            out[f"channels:{name}"] = idx.cpu()
            out[f"nonpos:{name}"] = (a <= 0).flatten(1).sum(dim=1).cpu()  # [N] count of values <= 0
            out[f"numel:{name}"] = torch.full((a.shape[0],), a[0].numel(), dtype=torch.long)
            out[f"chmax:{name}"] = a.amax(dim=(2, 3)).cpu()  # [N, C]
        return out

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        size = probe.images.shape[-2:]
        for key, maps in results.items():
            if not key.startswith("maps:"):
                continue
            name = key[len("maps:") :]
            nonpos, numel = results[f"nonpos:{name}"], results[f"numel:{name}"]
            logger.scalar(make_tag(self.method, name, "dead_fraction"), nonpos.sum().float() / numel.sum().float())
            dead = (results[f"chmax:{name}"].amax(dim=0) <= 0).float().mean()
            logger.scalar(make_tag(self.method, name, "dead_channels"), dead)
            ok = self.warn_non_finite(f"the {name} activations", maps)
            if self.layout == "grid":
                finite_maps = torch.where(ok.view(-1, 1, 1, 1), maps, torch.zeros_like(maps))
                logger.image(
                    make_tag(self.method, name, "grid"),
                    self.layer_grid(name, finite_maps, results[f"channels:{name}"], probe, trainer),
                )
                continue
            names = self.get_class_names(trainer)
            order = _ORDER[self.channels if isinstance(self.channels, str) else "list"]
            for i, (pid, m, finite) in enumerate(zip(probe.ids, maps, ok.tolist())):  # m: [k, h, w]
                if not finite:
                    continue
                m01 = normalize_maps(m, "fixed", vmin=float(m.min()), vmax=float(m.max()))
                tiles = to_uint8(colormap(resize_maps(m01, size, mode="nearest"), self.cmap))
                tiles = upscale(tiles, self.display_px) if self.display_px else tiles  # labels need the room
                chans = [f"ch {c}" for c in results[f"channels:{name}"][i].tolist()]
                head = pid if probe.labels is None else f"{pid} {class_name(probe.labels[i], names)}"
                caption = f"{head}: {name}, {order}"  # ~square; one or two channels: wide enough for the colorbar
                panel = labeled_grid(tiles, chans, caption=caption, label_px=12, min_width=MIN_PANEL_PX)
                logger.image(make_tag(self.method, name, pid), with_colorbar(panel, m.min(), m.max(), self.cmap))

    def layer_grid(self, name: str, maps: Any, channels: Any, probe: ProbeSet, trainer: Trainer) -> Any:
        """One image for ``layer``: a row per probe (its image, then its channels on one range per probe)."""
        size = grid_tile_size(tuple(probe.images.shape[-2:]), self.display_px)
        images = probe.display_images()
        if tuple(images.shape[-2:]) != size:  # probes larger than the tiles: averaged down
            images = F.interpolate(images.float(), size=size, mode="area")
        names = self.get_class_names(trainer)
        rows, under = [], []
        for i, (pid, m) in enumerate(zip(probe.ids, maps)):
            m01 = normalize_maps(m, "fixed", vmin=float(m.min()), vmax=float(m.max()))
            mode = "area" if m01.shape[-2] > size[0] or m01.shape[-1] > size[1] else "nearest"
            tiles = colormap(resize_maps(m01, size, mode=mode), self.cmap)
            image = images[i : i + 1].expand(-1, 3, -1, -1) if images.shape[1] == 1 else images[i : i + 1, :3]
            tiles = to_uint8(torch.cat([image, tiles]))  # uint8 before the upscale: fewer pixels to convert
            tiles = upscale(tiles, self.display_px) if self.display_px else tiles
            rows.append(list(tiles))
            label = pid if probe.labels is None else f"{pid} {class_name(probe.labels[i], names)}"
            # the row's range (what its darkest and brightest colors stand for) under the probe's label
            under.append([[label, f"min {_fmt(float(m.min()))}", f"max {_fmt(float(m.max()))}"]])
            under[-1] += [[f"ch {int(c)}"] for c in channels[i]]
        w = int(rows[0][0].shape[-1])
        strips = [[torch.cat([_shared_strip(w, [t], 12) for t in lines], dim=1) for lines in r] for r in under]
        order = _ORDER[self.channels if isinstance(self.channels, str) else "list"]
        caption = f"{name}: one row per probe ({order}), each on its own range (min, max under the probe)"
        return compose(rows, None, caption, under=strips, min_width=MIN_PANEL_PX)
