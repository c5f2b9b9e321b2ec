"""Top-activating patches (Zeiler & Fergus 2014, Sec. 4 / Fig. 2; Girshick et al. 2014 "R-CNN", Sec. 3.1).

For each chosen unit (channel ``c`` of a layer) keep the ``k`` probe images where the unit fires
most: per image the unit's strongest spatial position ``argmax_{i,j} A_c(i, j)``, then the global
top-``k`` over images. :func:`merge_topk` merges candidate lists -- batch after batch, and rank after
rank under DDP -- with a deterministic order: value descending, then image index ascending, so a
merge of shards equals the top-``k`` of the whole set, ties included.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..capture import Capture, capture, forward_until
from ..progress import progress
from .checks import check_chunk_size, check_eval, check_images

__all__ = ["TopK", "unit_activations", "topk_per_unit", "merge_topk", "scan_topk", "scan_topk_layers"]


@dataclass
class TopK:
    """Candidates per unit, best first: ``values/image/y/x`` all ``[U, k]`` (``image`` = global probe index)."""

    values: Tensor
    image: Tensor
    y: Tensor
    x: Tensor

    @property
    def k(self) -> int:
        return self.values.shape[1]

    def to_rows(self) -> Tensor:
        """``[k, U, 4]`` float rows ``(value, image, y, x)`` with the candidate first (what a rank sends)."""
        return torch.stack([self.values.double(), self.image.double(), self.y.double(), self.x.double()], -1).transpose(
            0, 1
        )

    @classmethod
    def from_rows(cls, rows: Tensor) -> TopK:
        """Inverse of :meth:`to_rows` (rows of several ranks concatenated on dim 0 are fine)."""
        r = rows.transpose(0, 1)
        return cls(values=r[..., 0].float(), image=r[..., 1].long(), y=r[..., 2].long(), x=r[..., 3].long())


def unit_activations(model: nn.Module, x: Tensor, layer: str, units: Sequence[int] | None = None) -> Tensor:
    """``[B, U, h, w]`` output of ``layer`` for ``units`` (channels; all if ``None``), no autograd."""
    return _layer_activations(model, x, {layer: units})[layer]


def _layer_activations(model: nn.Module, x: Tensor, units: Mapping[str, Sequence[int] | None]) -> dict[str, Tensor]:
    """:func:`unit_activations` of several layers (``{layer: units}``) from one forward."""
    with torch.no_grad(), capture(model, list(units)) as cap:
        model(x)
        return _unit_maps(cap, units)


def _unit_maps(cap: Capture, units: Mapping[str, Sequence[int] | None]) -> dict[str, Tensor]:
    """The recorded ``[B, U, h, w]`` maps of ``units`` per layer (checked: a conv map, units in range)."""
    out = {}
    for layer in units:
        act = cap[layer]
        if act.ndim != 4:
            raise ValueError(
                f"top patches need a conv feature map [B, C, h, w] from layer {layer!r}; "
                f"it outputs shape {tuple(act.shape)}"
            )
        chosen = units[layer]
        if chosen is not None:
            chosen = list(chosen)
            bad = [u for u in chosen if not 0 <= u < act.shape[1]]
            if bad:
                raise ValueError(
                    f"units {bad} out of range for layer {layer!r} with {act.shape[1]} channels (0..{act.shape[1] - 1})"
                )
            act = act[:, chosen]
        out[layer] = act
    return out


def _order(values: Tensor, image: Tensor) -> Tensor:
    """Per row, indices sorting by value descending then image ascending (stable, deterministic)."""
    by_image = torch.sort(image, dim=1, stable=True).indices
    v = values.gather(1, by_image)
    by_value = torch.sort(v, dim=1, descending=True, stable=True).indices
    return by_image.gather(1, by_value)


def _select(values: Tensor, image: Tensor, y: Tensor, x: Tensor, k: int) -> TopK:
    idx = _order(values, image)[:, : min(k, values.shape[1])]
    return TopK(values.gather(1, idx), image.gather(1, idx), y.gather(1, idx), x.gather(1, idx))


def topk_per_unit(act: Tensor, k: int, image_index: Tensor | None = None) -> TopK:
    """Top-``k`` images per unit from ``act[B, U, h, w]``.

    Each image counts once per unit, at its maximum position (the first in raster order on ties).
    ``image_index[B]``: global indices of the images (default ``0..B-1``).
    """
    b, u, _h, w = act.shape
    if image_index is None:
        image_index = torch.arange(b)
    best, pos = act.flatten(2).max(dim=2)  # [B, U]
    values = best.t().float().cpu()
    pos = pos.t().cpu()
    image = image_index.view(1, b).expand(u, b).long().cpu()
    return _select(values, image, pos // w, pos % w, k)


def merge_topk(parts: Sequence[TopK], k: int) -> TopK:
    """Top-``k`` per unit of several candidate lists (batches or ranks); order: value desc, image asc."""
    parts = [p for p in parts if p is not None and p.k > 0]
    if not parts:
        raise ValueError("merge_topk needs at least one non-empty candidate list")
    cat = [torch.cat([getattr(p, f) for p in parts], dim=1) for f in ("values", "image", "y", "x")]
    values, image, y, x = cat
    return _select(values, image, y, x, k=k)


def scan_topk(
    model: nn.Module,
    images: Tensor,
    layer: str,
    units: Sequence[int] | None,
    k: int,
    batch_size: int | None = 64,
    offset: int = 0,
) -> TopK:
    """Top-``k`` images per unit (Zeiler & Fergus 2014, Sec. 4): scan ``images[N, C, H, W]`` (on the model's
    device) in batches of ``batch_size`` (``None``: all at once; as
    :func:`~lightning_viz.methods.checks.check_chunk_size` allows); global image index = ``offset + n``. The model
    must be in eval mode (BatchNorm statistics of a batch would rank each image against the others of its batch)."""
    return scan_topk_layers(model, images, {layer: units}, k, batch_size, offset)[layer]


def scan_topk_layers(
    model: nn.Module,
    images: Tensor,
    units: Mapping[str, Sequence[int] | None],
    k: int,
    batch_size: int | None = 64,
    offset: int = 0,
) -> dict[str, TopK]:
    """:func:`scan_topk` of several layers (``{layer: units}``) in one scan: one forward per batch for all of them."""
    check_images("scan_topk", images)
    check_eval("scan_topk", model)
    batch_size = check_chunk_size(batch_size, option="batch_size") or max(1, images.shape[0])
    best: dict[str, TopK] = {}
    # The scans stop right after the layers (forward_until): what follows them adds nothing to their maps (the demo's
    # conv2 of three blocks: ~0.7x the time). A first pass of one image finds whether the model can be cut there.
    with torch.no_grad(), capture(model, list(units)) as cap, forward_until(model, list(units)) as run:
        if images.shape[0] > 1:
            run(functools.partial(model, images[:1]))
        for s in range(0, images.shape[0], batch_size):
            progress(s, images.shape[0], "images scanned")  # a line every few seconds inside a callback run (rank 0)
            batch = images[s : s + batch_size]
            cap.clear()
            run(functools.partial(model, batch))
            acts = _unit_maps(cap, units)
            index = torch.arange(offset + s, offset + s + batch.shape[0])
            for layer, act in acts.items():
                cand = topk_per_unit(act, k, index)
                best[layer] = cand if layer not in best else merge_topk([best[layer], cand], k)
    if not best:
        raise ValueError("scan_topk got no images")
    return best
