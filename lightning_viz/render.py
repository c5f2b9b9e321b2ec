"""Tensors -> uint8 images for TensorBoard: normalization, colormaps, heatmap overlays, grids, filmstrips.

Images are ``[B, 3, H, W]`` floats in ``[0, 1]`` (torch, CPU) until they are laid out: :func:`compose` pastes
tiles into one uint8 canvas (numpy), and :func:`to_uint8_hwc` produces the ``[H, W, 3]`` uint8 array handed to the
loggers. Text strips are rendered once and cached as uint8.

Normalization of maps:
* ``"per_image"``: each map min-max (or 0..max|m| for signed maps) on its own -- shape, not magnitude;
* ``"fixed"``: one ``(vmin, vmax)`` for all images and epochs (see :class:`FixedScale`) -- so
  magnitudes can be compared across epochs of training.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
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
    "to_uint8",
    "to_uint8_hwc",
    "label_strip",
    "text_strip",
    "upscale",
    "colorbar",
    "compose",
    "labeled_grid",
    "with_colorbar",
    "text_px",
    "diverging_cmap",
    "class_name",
    "DIVERGING_CMAP",
]

#: Colormap of signed maps (zero is white, the middle of the map).
DIVERGING_CMAP = "RdBu_r"


def diverging_cmap(cmap: str | None, signed: bool) -> str:
    """The colormap to use: ``cmap`` when given, else ``"jet"`` (unsigned) or :data:`DIVERGING_CMAP` (signed)."""
    return cmap if cmap else (DIVERGING_CMAP if signed else "jet")


def class_name(index: int | Tensor, names: Sequence[str] | None) -> str:
    """``names[index]`` when known, else the index as text."""
    index = int(index)
    return str(names[index]) if names is not None and 0 <= index < len(names) else str(index)


def normalize_maps(
    maps: Tensor, mode: str = "per_image", vmin: float | None = None, vmax: float | None = None, signed: bool = False
) -> Tensor:
    """Scale ``[B, H, W]`` maps to ``[0, 1]``.

    ``mode="per_image"``: each map on its own range (``signed``: ``0.5 + m / (2 max|m|)``).
    ``mode="fixed"``: the given ``vmin``/``vmax`` for all maps (values outside are clipped).
    """
    m = maps.detach().float()
    if mode == "fixed":
        if vmin is None or vmax is None:
            raise ValueError("mode='fixed' needs vmin and vmax")
        return ((m - vmin) / (vmax - vmin if vmax > vmin else 1e-12)).clamp(0, 1)
    if mode != "per_image":
        raise ValueError(f"unknown normalization {mode!r}; allowed: 'per_image', 'fixed'")
    flat = m.flatten(1)
    if signed:
        top = flat.abs().amax(dim=1).view(-1, 1, 1)
        scale = torch.where(top > 0, top, 1.0)  # no floor but 0: a map of 1e-14 (an untrained net) fills the colormap
        return (0.5 + m / (2 * scale)).clamp(0, 1)
    lo = flat.amin(dim=1).view(-1, 1, 1)
    hi = flat.amax(dim=1).view(-1, 1, 1)
    span = torch.where(is_flat(lo, hi), torch.inf, hi - lo)  # flat: all 0, not rounding noise; else hi > lo
    return ((m - lo) / span).clamp(0, 1)


def is_flat(lo: Tensor, hi: Tensor) -> Tensor:
    """Whether maps with these minima and maxima are constant up to float rounding (a spread of at most 1e-5 of
    their magnitude, e.g. a 1 x 1 CAM upsampled bilinearly): stretched to the full colormap, that rounding noise
    would show as stripes."""
    return (hi - lo) <= 1e-5 * torch.maximum(lo.abs(), hi.abs())


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
            q = float(torch.quantile(flat, self.quantile))
            self.vmax = q if q > 0 else 1e-12  # only a zero quantile gets a floor: tiny maps keep their own scale
        return (-self.vmax if self.signed else 0.0), self.vmax

    def state_dict(self) -> dict:
        return {"vmax": self.vmax, "quantile": self.quantile, "signed": self.signed}

    def load_state_dict(self, state: dict) -> None:
        self.vmax, self.quantile, self.signed = state["vmax"], state["quantile"], state["signed"]
        if self.vmax is not None and not math.isfinite(self.vmax):  # e.g. saved by an older version from a NaN run
            self.vmax = None


@lru_cache(maxsize=16)
def _lut(name: str) -> np.ndarray:
    """The ``[256, 3]`` float32 RGB table of a matplotlib colormap (read-only: cached)."""
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(
            f"unknown colormap {name!r}; use any matplotlib colormap name, e.g. 'jet', 'viridis', 'inferno', 'bwr'"
        ) from None
    lut = cmap(torch.linspace(0, 1, 256).numpy())[:, :3].astype(np.float32)  # 256 float32 steps into the colormap
    lut.flags.writeable = False
    return lut


def _levels(values01: Tensor) -> np.ndarray:
    """``round(255 * value)`` (float32) of the values clipped to ``[0, 1]``, NaN as 0: the uint8 level of an image
    and the colormap row of a map. In numpy: one thread, no torch thread pool to wake for each small step (which
    dominates on a busy machine)."""
    a = np.fmax(values01.detach().cpu().float().numpy(), 0.0, order="C")  # a new C-ordered array; NaN -> 0
    np.fmin(a, 1.0, out=a)
    a *= 255
    return np.rint(a, out=a)


def colormap(maps01: Tensor, name: str = "jet") -> Tensor:
    """``[B, H, W]`` values in ``[0, 1]`` -> ``[B, 3, H, W]`` RGB through a matplotlib colormap (NaN as 0)."""
    idx = _levels(maps01).astype(np.intp)
    return torch.from_numpy(np.stack([_lut(name)[:, c][idx] for c in range(3)], axis=1))


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
    idx = _levels(resize_maps(maps01, images01.shape[-2:])).astype(np.intp)
    out = np.multiply(to_rgb(images01.detach().float().cpu()).numpy(), 1 - alpha, order="C")
    heat = alpha * _lut(cmap)  # alpha * cmap(map) entry by entry: the same float32 products, 256 of them
    for c in range(3):
        out[:, c] += heat[:, c][idx]
    return torch.from_numpy(np.clip(out, 0, 1, out=out))


def image_grid(images01: Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0) -> Tensor:
    """``[B, C, H, W]`` -> one ``[3, H', W']`` grid (``nrow`` images per row, default ~square)."""
    from torchvision.utils import make_grid

    b = images01.shape[0]
    if nrow is None:
        nrow = max(1, round(b**0.5 + 0.499))
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


def label_strip(width: int, text: str, height: int = 14) -> Tensor:
    """A small white strip with black text, left-aligned (captions under grids); ``[3, height, width]``."""
    return text_strip(width, [text], height, align="left")


@lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:  # older Pillow: the fixed bitmap font
        return ImageFont.load_default()


def text_px(text: str, height: int = 14) -> int:
    """Pixels a :func:`text_strip` of this ``height`` needs to show ``text`` uncut (its margins included)."""
    font = _font(max(6, round(height * 0.78)))
    try:
        width = _text_length(text, font)
    except AttributeError:  # a bitmap font of an old Pillow
        width = 6.0 * len(text)
    return math.ceil(width) + 4


@lru_cache(maxsize=4096)
def _text_length(text: str, font: Any) -> float:
    """Pixels ``font`` advances over ``text`` (Pillow's ``textlength``), measured once per text and font: a caption
    is measured to fit it (:func:`fit_names`, :func:`wrap_caption`) and again when drawn (:func:`_fit`)."""
    return float(font.getlength(text))


def wrap_caption(text: str, width: int, height: int, max_lines: int = 3) -> list[str]:
    """``text`` in lines (split at spaces) that each fit a ``width`` px :func:`text_strip` of this ``height``; at
    most ``max_lines`` (the last one cut as the strip cuts it). One line when it fits."""
    if not text or text_px(text, height) <= width:
        return [text] if text else []
    lines: list[str] = []
    for word in text.split(" "):
        if lines and text_px(lines[-1] + " " + word, height) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines[: max_lines - 1] + [" ".join(lines[max_lines - 1 :])] if len(lines) > max_lines else lines


def fit_names(make: Callable[[int | None], str], width: int, height: int = 16, min_chars: int = 12) -> str:
    """``make(n)``: a caption with each class name cut to ``n`` characters (``None``: whole). The caption with
    names as long as fit in ``width`` pixels of a :func:`text_strip` of this ``height``, so that long names
    (``"n01440764 tench, Tinca tinca"``) do not push what follows them (the prediction, its probability) out;
    names keep at least ``min_chars`` (the strip then cuts the caption's end)."""
    text = make(None)
    if text_px(text, height) <= width:
        return text
    lo, hi = min_chars, max(min_chars, len(text))  # the longest cut that fits, by bisection (width grows with n)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if text_px(make(mid), height) <= width:
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


def cut_name(name: str, n: int | None) -> str:
    """``name`` cut to ``n`` characters with an ellipsis (whole when ``n`` is ``None`` or it is short enough)."""
    return name if n is None or len(name) <= n else name[: max(1, n - 3)].rstrip(" ,") + "..."


_ONE_LINE = str.maketrans("\t\n\r\v\f", "     ")


def one_line(text: str) -> str:
    """``text`` with its line breaks and tabs as spaces (a class name read from a labels file): a caption strip, a
    legend entry and a cell of the projector's ``metadata.tsv`` hold one line."""
    return text.translate(_ONE_LINE)


def _fit(draw: object, text: str, font: object, width: float) -> str:
    """``text`` cut (with an ellipsis) so that it fits in ``width`` pixels."""
    if _text_length(text, font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:  # type: ignore[attr-defined]
        text = text[:-1]
    return text + "..." if text else ""


def text_strip(
    width: int, texts: Sequence[str], height: int = 14, align: str = "center", cell: int | None = None, pad: int = 0
) -> Tensor:
    """A white ``[3, height, width]`` strip with black text: one text per cell of ``cell`` pixels
    (default: equal cells over the width) separated by ``pad`` pixels, centered (or ``align="left"``)."""
    return _shared_strip(width, texts, height, align, cell, pad).float() / 255.0


def _shared_strip(
    width: int, texts: Sequence[str], height: int = 14, align: str = "center", cell: int | None = None, pad: int = 0
) -> Tensor:
    """:func:`text_strip` as uint8 ``[3, height, width]`` (0..255), the cached tensor itself: for callers that only
    read it (never write), e.g. as a tile of :func:`compose`."""
    key = (int(width), tuple(str(t) for t in texts), int(height), align, cell, pad)
    global _strip_bytes
    with _strip_lock:
        strip = _strip_cache.get(key)
        if strip is not None:
            _strip_cache.move_to_end(key)
            return strip
    strip = _text_strip(*key)
    with _strip_lock:
        if key not in _strip_cache:
            _strip_cache[key] = strip
            _strip_bytes += strip.numel()
        while _strip_cache and (_strip_bytes > STRIP_CACHE_BYTES or len(_strip_cache) > 4096):
            _strip_bytes -= _strip_cache.popitem(last=False)[1].numel()
    return strip


#: Bytes of text strips kept for reuse (least recently used dropped first): the same labels (method names, epochs)
#: come back every probe and epoch, but captions with per-epoch values (probabilities) are new every epoch.
STRIP_CACHE_BYTES = 16 * 2**20
_strip_cache: OrderedDict[tuple, Tensor] = OrderedDict()
_strip_bytes = 0
_strip_lock = threading.Lock()


def _text_strip(width: int, texts: tuple[str, ...], height: int, align: str, cell: int | None, pad: int) -> Tensor:
    """:func:`_shared_strip`, drawn. A ``[3, h, w]`` view of an ``[h, w, 3]`` uint8 array (the layout that
    :func:`compose` pastes)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (max(1, int(width)), max(1, int(height))), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = _font(max(6, round(height * 0.78)))
    n = max(1, len(texts))
    cw = cell if cell is not None else (width - pad * (n - 1)) / n
    for i, t in enumerate(texts):
        x0 = i * (cw + pad)
        t = _fit(draw, one_line(str(t)), font, cw - 2)  # Pillow measures no multi-line text
        x = x0 + 2 if align == "left" else x0 + (cw - _text_length(t, font)) / 2
        try:
            draw.text((x, height / 2), t, fill=(0, 0, 0), font=font, anchor="lm")
        except ValueError:  # a bitmap font (old Pillow without FreeType) has no anchors
            draw.text((x, 1), t, fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def _nearest_index(n: int, factor: int) -> np.ndarray:
    """The source index of each of ``n * factor`` outputs, as torch's ``nearest`` upsampling computes it."""
    src = np.floor(np.arange(n * factor, dtype=np.float32) * np.float32(1 / factor))
    return np.minimum(src, n - 1).astype(np.intp)


def upscale(images: Tensor, min_px: int, mode: str = "nearest") -> Tensor:
    """``[B, C, H, W]`` upscaled by the smallest integer factor that makes the shorter side ``>= min_px``
    (nearest: pixels stay crisp) as float32 (uint8 stays uint8 with ``"nearest"``), but with the longer side at most
    ``4 * min_px`` (a 16 x 256 spectrogram: 32 x 512, not 128 x 2048); images already that large are returned as
    they are."""
    h, w = images.shape[-2:]
    factor = min(-(-int(min_px) // max(1, min(h, w))), max(1, 4 * int(min_px) // max(1, h, w)))
    if factor <= 1:
        return images
    if mode == "nearest":  # torch's pixels, gathered by numpy (one thread: no thread pool to wake)
        x = images.detach().cpu()
        rows, cols = _nearest_index(h, factor), _nearest_index(w, factor)
        # columns first (element by element, on the small array), then rows (whole rows copied): ~4x faster
        # than the other order on [8, 32, 32, 3] -> [8, 128, 128, 3]
        if x.dtype == torch.uint8 and x.ndim >= 3:  # gathered as [..., H, W, C] (to_uint8's layout), viewed as CHW
            a = x.movedim(-3, -1).numpy()
            return torch.from_numpy(a.take(cols, axis=-2).take(rows, axis=-3)).movedim(-1, -3)
        a = (x if x.dtype == torch.uint8 else x.float()).numpy()
        return torch.from_numpy(a.take(cols, axis=-1).take(rows, axis=-2))
    kw = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(images.float(), scale_factor=factor, mode=mode, **kw)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if v == 0 or 1e-2 <= abs(v) < 1e4 else f"{v:.1e}"


def colorbar(width: int, vmin: float, vmax: float, cmap: str = "jet", height: int = 24) -> Tensor:
    """A horizontal colorbar ``[3, height, width]`` in ``[0, 1]``: the colormap from ``vmin`` to ``vmax`` with both
    values written underneath, and ``0`` marked (a black tick and label) when the range spans zero. Its pixels are
    uint8 levels (``/ 255``): :func:`_shared_colorbar`'s."""
    return _shared_colorbar(width, vmin, vmax, cmap, height).float() / 255.0


def _shared_colorbar(width: int, vmin: float, vmax: float, cmap: str = "jet", height: int = 24) -> Tensor:
    """:func:`colorbar` as uint8 ``[3, height, width]`` (the pixels ``to_uint8(colorbar(...))`` gave), built in
    numpy from the cached bar of this width and colormap and the cached text strips of the two values: a panel
    has a colorbar under every tile, ~100 an epoch, whose values change every epoch."""
    bar_h = max(3, height // 3)
    top = _bar_rows(int(width), cmap, bar_h).copy()  # the colormap, then 2 white rows for the zero tick
    zero = None
    if vmin < 0 < vmax:  # a black line through the bar and a tick under it at zero
        zero = round(-vmin / (vmax - vmin) * (width - 1))
        top[:, zero] = 0
    label_h = height - bar_h - 2
    labels = _hwc(_shared_strip(width, [_fmt(vmin)], label_h, align="left")).copy()
    right = _hwc(_shared_strip(width // 2, [_fmt(vmax)], label_h, align="left"))
    ink = np.flatnonzero((right.min(axis=2) < 128).any(axis=0))  # a level under 128: a value under 0.5
    if len(ink):  # right-align the vmax label: keep only the width of its text
        right = right[:, : int(ink[-1]) + 3]
    rw = int(right.shape[1])
    np.minimum(labels[:, width - rw :], right, out=labels[:, width - rw :])
    if zero is not None and 0.2 * width < zero < 0.8 * width:  # "0" centered on 16 px (or the bar's width) at zero
        zw = min(16, width)
        z = _hwc(_shared_strip(zw, ["0"], label_h))
        x0 = max(0, min(width - zw, zero - zw // 2))
        np.minimum(labels[:, x0 : x0 + zw], z, out=labels[:, x0 : x0 + zw])
    return torch.from_numpy(np.concatenate([top, labels])).permute(2, 0, 1)


@lru_cache(maxsize=64)
def _bar_rows(width: int, cmap: str, bar_h: int) -> np.ndarray:
    """The top of a :func:`colorbar` without its zero mark, uint8 ``[bar_h + 2, width, 3]``: ``bar_h`` rows of the
    colormap from 0 to 1, then 2 white rows (read-only: cached)."""
    levels = _levels(torch.from_numpy(_lut(cmap).copy())).astype(np.uint8)  # to_uint8 of each colormap entry
    out = np.full((bar_h + 2, width, 3), 255, np.uint8)
    out[:bar_h] = levels[_levels(torch.linspace(0, 1, width)).astype(np.intp)]
    out.flags.writeable = False
    return out


def compose(
    rows: Sequence[Sequence[Tensor | None]],
    col_labels: Sequence[str] | None = None,
    caption: str | None = None,
    under: Sequence[Sequence[Tensor | None]] | None = None,
    pad: int = 2,
    label_px: int = 14,
    min_width: int = 0,
) -> Tensor:
    """Tiles ``[C, h, w]`` (``None``: blank; floats in ``[0, 1]`` or uint8, see :func:`to_uint8_hwc`) in rows -> one
    uint8 ``[3, H, W]`` image on white: a ``caption`` strip on top, ``col_labels`` over the columns, and for each
    row an optional strip per column under it (``under[r][c]``, e.g. a colorbar). A column is as wide as its widest
    tile; wider labels and strips under it are cut. The image is at least ``min_width`` wide (white on the right:
    room for the caption, and for a colorbar added under it)."""
    ncol = max(len(r) for r in rows)
    widths = [0] * ncol
    for r in rows:
        for c, t in enumerate(r):
            if t is not None:
                widths[c] = max(widths[c], int(t.shape[-1]))
    widths = [w or 1 for w in widths]
    total_w = max(sum(widths) + pad * (ncol + 1), min_width)
    # the layout first (a full-width strip, a band of tiles, or white space, each with its height), then one white
    # uint8 canvas that every piece is pasted into as uint8 (the pixels to_uint8_hwc gives it)
    parts: list[tuple[int, Tensor | Sequence[Tensor | None] | None]] = []

    def band(tiles: Sequence[Tensor | None]) -> tuple[int, Sequence[Tensor | None]]:
        return max([int(t.shape[-2]) for t in tiles if t is not None] or [1]), tiles

    for line in wrap_caption(caption or "", total_w, label_px + 2):  # a narrow image: its caption on more lines
        strip = _shared_strip(total_w, [line], label_px + 2, align="left")
        parts.append((int(strip.shape[-2]), strip))
    if col_labels:
        parts.append(
            band(
                [
                    _shared_strip(widths[c], [col_labels[c]], label_px) if c < len(col_labels) else None
                    for c in range(ncol)
                ]
            )
        )
    for ri, tiles in enumerate(rows):
        parts.append((pad, None))
        parts.append(band(tiles))
        if under is not None and ri < len(under) and any(u is not None for u in under[ri]):
            parts.append((1, None))
            parts.append(band(under[ri]))
    parts.append((pad, None))
    out = np.full((sum(h for h, _ in parts), total_w, 3), 255, np.uint8)
    y = 0
    for h, part in parts:
        if isinstance(part, Tensor):
            out[y : y + h] = _hwc(part)
        elif part is not None:
            x = pad
            for c in range(ncol):
                t = part[c] if c < len(part) else None
                if t is not None:
                    tile = _hwc(t)[:, : widths[c]]
                    out[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
                x += widths[c] + pad
        y += h
    return torch.from_numpy(out).permute(2, 0, 1)


def _hwc(image: Tensor) -> np.ndarray:
    """:func:`to_uint8_hwc` without making the result contiguous (a view of a uint8 image that is one already)."""
    if image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3 and image.device.type == "cpu":
        return image.numpy().transpose(1, 2, 0)  # the common tile (compose pastes ~1000 an epoch): a numpy view
    img = image.detach().cpu()
    if img.ndim == 2:
        img = img.unsqueeze(0)
    img = to_rgb(img.unsqueeze(0))[0]
    if img.dtype == torch.uint8:
        return img.permute(1, 2, 0).numpy()
    return _levels(img.permute(1, 2, 0)).astype(np.uint8)  # NaN as 0, what torch's uint8 cast gave


def to_uint8(images01: Tensor) -> Tensor:
    """Floats in ``[0, 1]`` (any shape) -> uint8 levels ``round(255 * value)`` (clipped; NaN as 0): the pixels the
    loggers get, e.g. before a nearest :func:`upscale` (fewer pixels to convert, the same result). Images
    ``[..., C, H, W]`` come back as a view of ``[..., H, W, C]`` memory, the layout :func:`compose` pastes and
    PNG rows take (no strided copy later)."""
    if images01.ndim < 3:
        return torch.from_numpy(_levels(images01).astype(np.uint8))
    return torch.from_numpy(_levels(images01.movedim(-3, -1)).astype(np.uint8)).movedim(-1, -3)


def to_uint8_hwc(image: Tensor) -> np.ndarray:
    """``[C, H, W]`` (or ``[H, W]``) floats in ``[0, 1]`` (clipped), or uint8 (0..255, e.g. from :func:`compose`) ->
    a contiguous numpy uint8 ``[H, W, 3]`` (gray repeated, channels beyond 3 dropped), for the loggers."""
    return np.ascontiguousarray(_hwc(image))


def labeled_grid(
    tiles: Tensor,
    labels: Sequence[str],
    nrow: int | None = None,
    caption: str | None = None,
    label_px: int = 13,
    min_width: int = 0,
) -> Tensor:
    """``[B, C, h, w]`` tiles in rows of ``nrow`` (default ~square), each with its label underneath, and an
    optional caption on top -> one uint8 ``[3, H, W]`` image (:func:`compose`), at least ``min_width`` wide."""
    b = tiles.shape[0]
    if nrow is None:
        nrow = max(1, round(b**0.5 + 0.499))
    w = int(tiles.shape[-1])
    rows = [list(tiles[i : i + nrow]) for i in range(0, b, nrow)]
    under = [[_shared_strip(w, [labels[j]], label_px) for j in range(i, min(i + nrow, b))] for i in range(0, b, nrow)]
    return compose(rows, None, caption, under=under, min_width=min_width)


def with_colorbar(panel: Tensor, vmin: Tensor | float, vmax: Tensor | float, cmap: str, pad: int = 2) -> Tensor:
    """A uint8 ``[3, H, W]`` image (:func:`compose`'s) with a :func:`colorbar` from ``vmin`` to ``vmax`` under it,
    as wide as the image less its padding: the values the colors of its maps stand for."""
    width = int(panel.shape[-1])
    bar = _shared_colorbar(width - 2 * pad, float(vmin), float(vmax), cmap)
    strip = torch.full((3, int(bar.shape[-2]) + pad, width), 255, dtype=torch.uint8)
    strip[:, : bar.shape[-2], pad : width - pad] = bar
    return torch.cat([panel, strip], dim=1)
