"""Tensors -> uint8 images for TensorBoard: normalization, colormaps, heatmap overlays, grids, filmstrips.

All functions are pure torch on CPU tensors. Images are ``[B, 3, H, W]`` floats in ``[0, 1]`` until
:func:`to_uint8_hwc`, which produces the ``[H, W, 3]`` uint8 array handed to ``add_image``.

Normalization of maps:
* ``"per_image"``: each map min-max (or 0..max|m| for signed maps) on its own -- shape, not magnitude;
* ``"fixed"``: one ``(vmin, vmax)`` for all images and epochs (see :class:`FixedScale`) -- so
  magnitudes can be compared across epochs of training.
"""

from __future__ import annotations

import math

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "normalize_maps",
    "FixedScale",
    "colormap",
    "overlay",
    "resize_maps",
    "to_rgb",
    "image_grid",
    "filmstrip",
    "to_uint8_hwc",
    "label_strip",
]


def normalize_maps(maps: Tensor, mode: str = "per_image", vmin: float | None = None, vmax: float | None = None, signed: bool = False) -> Tensor:
    """Scale ``[B, H, W]`` maps to ``[0, 1]``.

    ``mode="per_image"``: each map on its own range (``signed``: ``0.5 + m / (2 max|m|)``).
    ``mode="fixed"``: the given ``vmin``/``vmax`` for all maps (values outside are clipped).
    """
    m = maps.detach().float()
    if mode == "fixed":
        if vmin is None or vmax is None:
            raise ValueError("mode='fixed' needs vmin and vmax")
        return ((m - vmin) / max(vmax - vmin, 1e-12)).clamp(0, 1)
    if mode != "per_image":
        raise ValueError(f"unknown normalization {mode!r}; allowed: 'per_image', 'fixed'")
    flat = m.flatten(1)
    if signed:
        scale = flat.abs().amax(dim=1).clamp_min(1e-12).view(-1, 1, 1)
        return (0.5 + m / (2 * scale)).clamp(0, 1)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    hi = flat.amax(dim=1).view(-1, 1, 1)
    return ((m - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


class FixedScale:
    """A map scale fixed once and kept for the whole run (and across resume via ``state_dict``).

    The first call to :meth:`update` sets ``vmax`` to the ``quantile`` of ``|maps|`` (``vmin`` is 0,
    or ``-vmax`` for signed maps) unless ``vmax`` was given; later epochs reuse it, so a map that grows
    brighter over training really has grown.
    """

    def __init__(self, vmax: float | None = None, quantile: float = 0.99, signed: bool = False):
        self.vmax = vmax
        self.quantile = quantile
        self.signed = signed

    def update(self, maps: Tensor) -> tuple[float, float]:
        """``(vmin, vmax)``; set on the first call with finite values (non-finite entries are ignored; while there
        are none, ``vmax`` stays unset and ``(.., 1)`` is returned)."""
        if self.vmax is None:
            flat = maps.detach().float().abs().flatten()
            flat = flat[torch.isfinite(flat)]
            if flat.numel() == 0:
                return (-1.0 if self.signed else 0.0), 1.0
            if flat.numel() > 1_000_000:
                flat = flat[torch.linspace(0, flat.numel() - 1, 1_000_000).long()]
            self.vmax = float(torch.quantile(flat, self.quantile).clamp_min(1e-12))
        return (-self.vmax if self.signed else 0.0), self.vmax

    def state_dict(self) -> dict:
        return {"vmax": self.vmax, "quantile": self.quantile, "signed": self.signed}

    def load_state_dict(self, state: dict) -> None:
        self.vmax, self.quantile, self.signed = state["vmax"], state["quantile"], state["signed"]
        if self.vmax is not None and not math.isfinite(self.vmax):  # e.g. saved by an older version from a NaN run
            self.vmax = None


@lru_cache(maxsize=16)
def _lut(name: str) -> Tensor:
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(f"unknown colormap {name!r}; use any matplotlib colormap name, e.g. 'jet', 'viridis', 'inferno', 'bwr'") from None
    return torch.tensor(cmap(torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)


def colormap(maps01: Tensor, name: str = "jet") -> Tensor:
    """``[B, H, W]`` values in ``[0, 1]`` -> ``[B, 3, H, W]`` RGB through a matplotlib colormap (NaN as 0)."""
    idx = (maps01.detach().float().nan_to_num(0.0).clamp(0, 1) * 255).round().long()
    return _lut(name)[idx].permute(0, 3, 1, 2).contiguous()


def resize_maps(maps: Tensor, size: Sequence[int], mode: str = "bilinear") -> Tensor:
    """Resize ``[B, h, w]`` maps to ``size=(H, W)``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps.unsqueeze(1).float(), size=tuple(size), mode=mode, **kw).squeeze(1)


def to_rgb(images: Tensor) -> Tensor:
    """``[B, C, H, W]`` with C in {1, 3} (or more: first 3) -> ``[B, 3, H, W]``."""
    if images.shape[1] == 1:
        return images.expand(-1, 3, -1, -1)
    if images.shape[1] >= 3:
        return images[:, :3]
    return torch.cat([images, images[:, :1]], dim=1)[:, :3]


def overlay(images01: Tensor, maps01: Tensor, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """Blend colored maps over images: ``(1 - alpha) * image + alpha * cmap(map)``; maps are resized to the images."""
    heat = colormap(resize_maps(maps01, images01.shape[-2:]), cmap)
    return ((1 - alpha) * to_rgb(images01.float()) + alpha * heat).clamp(0, 1)


def image_grid(images01: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """``[B, C, H, W]`` -> one ``[3, H', W']`` grid (``nrow`` images per row, default ~square)."""
    from torchvision.utils import make_grid

    b = images01.shape[0]
    if nrow is None:
        nrow = max(1, int(round(b ** 0.5 + 0.499)))
    return make_grid(to_rgb(images01.float()), nrow=nrow, padding=padding, pad_value=pad_value)


def filmstrip(frames01: Sequence[Tensor], max_frames: int = 12, padding: int = 2) -> Tensor:
    """Frames ``[3, H, W]`` (one per epoch) side by side; beyond ``max_frames`` keep an even subsample
    that always includes the first and the latest frame, so the image width stays bounded."""
    frames = list(frames01)
    if len(frames) > max_frames:
        keep = torch.linspace(0, len(frames) - 1, max_frames).round().long().tolist()
        frames = [frames[i] for i in keep]
    if len(frames) == 1:  # make_grid returns a lone image unpadded; keep the border (and height) consistent
        return F.pad(to_rgb(frames[0].float().unsqueeze(0))[0], (padding,) * 4, value=1.0)
    return image_grid(torch.stack(frames), nrow=len(frames), padding=padding)


def label_strip(width: int, text: str, height: int = 12) -> Tensor:
    """A small white strip with black text (for captions under grids); ``[3, height, width]``."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    fig.text(0.01, 0.5, text, fontsize=max(6, height * 0.6), va="center", ha="left")
    canvas.draw()
    arr = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def to_uint8_hwc(image01: Tensor):
    """``[3, H, W]`` (or ``[H, W]``) floats in ``[0, 1]`` -> numpy uint8 ``[H, W, 3]`` for ``add_image(dataformats='HWC')``."""
    img = image01.detach().float().cpu()
    if img.ndim == 2:
        img = img.unsqueeze(0)
    img = to_rgb(img.unsqueeze(0))[0]
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
