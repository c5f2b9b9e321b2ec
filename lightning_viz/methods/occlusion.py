"""Occlusion sensitivity (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks", ECCV 2014, Sec. 4.2).

A window of ``fill`` values slides over the image; at each position ``p`` the drop of the target's
score is recorded: ``drop_p = s(x) - s(x with window p filled)`` (and likewise for the softmax
probability of the target class). The (image, position) pairs are run in batched forwards whose size
is set by a memory budget (:func:`positions_per_forward`); chunking does not change the result
(beyond the float rounding of batched kernels).

``occlusion`` returns the drops on the grid of window positions ``[B, nY, nX]``;
:func:`spread_to_pixels` turns them into a ``[B, H, W]`` map where each pixel averages the drops of
every window covering it (as Captum does).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from ..progress import progress
from ..targets import Probabilities, Target, TargetSpec, check_probabilities, class_probability, resolve_target
from .batching import activation_bytes_per_image, images_per_forward, throughput_images
from .checks import (
    check_chunk_size,
    check_eval,
    check_images,
    check_labels_per_image,
    check_logits,
    input_matches_model,
)

__all__ = [
    "FILLS",
    "window_positions",
    "fill_values",
    "activation_bytes_per_image",
    "positions_per_forward",
    "default_window",
    "occlusion",
    "spread_to_pixels",
]

FILLS = ("gray", "mean", "zero", "blur")
Fill = Literal["gray", "mean", "zero", "blur"]
IntPair = Union[int, Sequence[int]]


def _pair(v: IntPair, what: str) -> tuple[int, int]:
    t: tuple[Any, ...] = (v, v) if isinstance(v, Integral) else tuple(v) if isinstance(v, Sequence) else ()
    ints = len(t) == 2 and not isinstance(v, str) and all(isinstance(a, Integral) and a is not True for a in t)
    if not ints or min(int(a) for a in t) < 1:
        raise ValueError(f"{what} must be a positive int or a pair of positive ints; got {v!r}")
    return (int(t[0]), int(t[1]))


def _axis_starts(size: int, win: int, stride: int) -> list[int]:
    starts = list(range(0, size - win + 1, stride))
    if starts[-1] != size - win:  # one more window flush with the border, so every pixel is covered
        starts.append(size - win)
    return starts


def window_positions(size: Sequence[int], window: IntPair, stride: IntPair) -> tuple[list[int], list[int]]:
    """Top-left corners ``(ys, xs)`` of the windows on an ``(H, W)`` image.

    Windows start every ``stride`` pixels; a last window flush with the bottom/right border is added
    when the stride does not land there, so every pixel is covered at least once.
    """
    (h, w), (wh, ww), (sh, sw) = tuple(size), _pair(window, "window"), _pair(stride, "stride")
    if wh > h or ww > w:
        raise ValueError(f"occlusion window {wh}x{ww} is larger than the {h}x{w} image; use a window <= the image size")
    return _axis_starts(h, wh, sh), _axis_starts(w, ww, sw)


def fill_values(
    x: Tensor,
    fill: Fill | float,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    window: IntPair = 8,
) -> Tensor:
    """What the occluded pixels are set to, broadcastable to ``x[B, C, H, W]`` (inputs are normalized).

    * ``"gray"``: mid-gray 0.5 in pixel space, i.e. ``(0.5 - mean) / std`` per channel when the
      normalization is known, else 0 (in normalized space, the dataset mean color);
    * ``"mean"``: each image's own per-channel mean;
    * ``"zero"``: 0 in normalized space;
    * ``"blur"``: the image blurred with a Gaussian of sigma = window / 4 (kernel ~ the window), so
      only the fine detail under the window is removed;
    * a float: that constant (normalized space).
    """
    if isinstance(fill, (int, float)) and not isinstance(fill, bool):
        return torch.full((1, 1, 1, 1), float(fill), dtype=x.dtype, device=x.device)
    if fill == "zero":
        return torch.zeros((1, 1, 1, 1), dtype=x.dtype, device=x.device)
    if fill == "gray":
        if mean is None or std is None:
            return torch.zeros((1, 1, 1, 1), dtype=x.dtype, device=x.device)
        m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        if {m.shape[1], s.shape[1]} - {1, x.shape[1]}:
            raise ValueError(
                f"occlusion fill 'gray': mean and std need one value per channel ({x.shape[1]}) or one for all; got "
                f"{m.shape[1]} and {s.shape[1]}"
            )
        return (0.5 - m) / s
    if fill == "mean":
        return x.mean(dim=(2, 3), keepdim=True)
    if fill == "blur":
        from torchvision.transforms.functional import gaussian_blur

        wh, ww = _pair(window, "window")
        ks = [2 * (ww // 2) + 1, 2 * (wh // 2) + 1]  # odd, about the window (reflect padding stays < image size)
        return gaussian_blur(x, kernel_size=ks, sigma=[max(ww / 4, 0.1), max(wh / 4, 0.1)])
    raise ValueError(f"unknown occlusion fill {fill!r}; allowed: {', '.join(map(repr, FILLS))} or a float")


def positions_per_forward(model: nn.Module, x: Tensor, memory_mb: float | None = None) -> int:
    """How many occluded images fit one forward pass within ``memory_mb`` of activations (at least 1;
    ``None``: :func:`~lightning_viz.methods.batching.throughput_images`, the default budget, on the CPU capped at a
    cache-sized batch: the demo's 392 occluded images in one forward cost ~1.5x per image what batches of 144 do)."""
    return throughput_images(model, x) if memory_mb is None else images_per_forward(model, x, memory_mb)


def default_window(size: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The default ``(window, stride)`` for an ``(H, W)`` image: window ``ceil(side / 8)`` and stride
    ``ceil(window / 2)`` per axis (8 and 4 on 64 px, 28 and 14 on 224 px), so the number of window positions
    stays at most 16 x 16 whatever the resolution."""
    win = tuple(max(1, math.ceil(int(s) / 8)) for s in size)
    return win, tuple(max(1, math.ceil(w / 2)) for w in win)  # type: ignore[return-value]


def occlusion(
    model: nn.Module,
    x: Tensor,
    target: TargetSpec | Target = "predicted",
    labels: Tensor | None = None,
    window: Optional[IntPair] = None,
    stride: Optional[IntPair] = None,
    fill: Fill | float = "gray",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    chunk_size: int | None = None,
    probabilities: Probabilities = "softmax",
) -> dict[str, Tensor]:
    """Occlusion sensitivity of ``model`` on ``x[B, C, H, W]``.

    Returns ``{"score": [B, nY, nX], "prob": [B, nY, nX]}``: ``score`` is the drop of the target
    score ``s(x) - s(x_occluded)`` per window position (Zeiler & Fergus 2014, Sec. 4.2); ``prob`` the
    drop of the probability of the target class (only when the target names a class, i.e.
    not a custom callable): its softmax, or with ``probabilities="sigmoid"`` (multi-label heads) ``sigmoid(z_c)``.
    The target class is decided once on the unoccluded image.
    ``window`` / ``stride``: pixels (an int or ``(h, w)``); ``None``: :func:`default_window` of the image size
    (window ~ side / 8, stride ~ window / 2: at most 16 x 16 positions at any resolution).
    ``chunk_size``: occluded images per forward (``None``: :func:`positions_per_forward` of the default memory
    budget); any value gives the same result
    (each occluded image's score is computed independently; only the float rounding of batched kernels,
    ~1e-7 relative, may differ with the batch size).
    Runs without autograd; the caller keeps the model in eval mode (see ``capture.isolated``; a model whose
    BatchNorm or dropout is in training mode is refused).
    """
    check_images("occlusion", x)
    check_eval("occlusion", model)
    labels = check_labels_per_image("occlusion", labels, x.shape[0])
    tgt = resolve_target(target)
    check_probabilities(probabilities)
    chunk_size = check_chunk_size(chunk_size)
    window, stride = _window_stride(x.shape[-2:], window, stride)
    ys, xs = window_positions(x.shape[-2:], window, stride)
    wh, ww = _pair(window, "window")
    b, n_pos = x.shape[0], len(ys) * len(xs)
    with torch.no_grad(), input_matches_model("occlusion", model, x):
        x = x.detach()
        fillv = fill_values(x, fill, mean, std, window).expand_as(x)
        logits = check_logits("occlusion", model(x), x.shape[0])
        classes = tgt.classes(logits, labels)
        base_score = tgt.score(logits, labels)
        base_prob = None if classes is None else class_probability(logits, classes, probabilities)
        # Window corner of each position (row-major over the grid); masks are built per chunk, so memory
        # stays bounded by the chunk size rather than positions x pixels.
        pos_y = torch.tensor(ys, device=x.device).repeat_interleave(len(xs)).view(-1, 1, 1, 1)
        pos_x = torch.tensor(xs, device=x.device).repeat(len(ys)).view(-1, 1, 1, 1)
        rows = torch.arange(x.shape[-2], device=x.device).view(1, 1, -1, 1)
        cols = torch.arange(x.shape[-1], device=x.device).view(1, 1, 1, -1)
        # Pairs (image, position), image-major; chunks of them go through one forward each.
        pairs_img = torch.arange(b, device=x.device).repeat_interleave(n_pos)
        pairs_pos = torch.arange(n_pos, device=x.device).repeat(b)
        total = b * n_pos
        chunk = chunk_size or positions_per_forward(model, x)
        scores, probs = [], []
        for s in range(0, total, chunk):
            progress(s, total, "occluded images")  # a line every few seconds inside a callback run (rank 0)
            bi, pi = pairs_img[s : s + chunk], pairs_pos[s : s + chunk]
            y0, x0 = pos_y[pi], pos_x[pi]
            mask = (rows >= y0) & (rows < y0 + wh) & (cols >= x0) & (cols < x0 + ww)  # [n, 1, H, W]
            xo = torch.where(mask, fillv[bi], x[bi])
            out = model(xo)
            lab = None if labels is None else labels.to(x.device)[bi]
            if classes is None:
                scores.append(tgt.score(out, lab))
            else:
                c = classes[bi].view(-1, 1)
                scores.append(out.gather(1, c).squeeze(1))
                probs.append(class_probability(out, c, probabilities))
        # an empty batch has no chunk: its drops are empty like its base scores
        occ_score = torch.cat(scores).view(b, n_pos) if scores else base_score.new_zeros(b, n_pos)
        result = {"score": (base_score.view(b, 1) - occ_score).view(b, len(ys), len(xs))}
        if base_prob is not None:
            occ_prob = torch.cat(probs).view(b, n_pos) if probs else base_prob.new_zeros(b, n_pos)
            result["prob"] = (base_prob.view(b, 1) - occ_prob).view(b, len(ys), len(xs))
    return result


def _window_stride(size: Sequence[int], window: Optional[IntPair], stride: Optional[IntPair]):
    """``window`` / ``stride`` with ``None`` replaced by :func:`default_window` (a given window alone: stride
    ``ceil(window / 2)``)."""
    if window is None:
        win, st = default_window(size)
        return win, (st if stride is None else stride)
    if stride is None:
        stride = tuple(max(1, math.ceil(w / 2)) for w in _pair(window, "window"))
    return window, stride


def spread_to_pixels(
    drops: Tensor, size: Sequence[int], window: Optional[IntPair] = None, stride: Optional[IntPair] = None
) -> Tensor:
    """``[B, nY, nX]`` drops per window -> ``[B, H, W]``: each pixel averages the windows that cover it
    (``window`` / ``stride`` as given to :func:`occlusion`, ``None`` meaning the same defaults)."""
    window, stride = _window_stride(size, window, stride)
    ys, xs = window_positions(size, window, stride)
    wh, ww = _pair(window, "window")
    if tuple(drops.shape[-2:]) != (len(ys), len(xs)):
        raise ValueError(f"drops have grid {tuple(drops.shape[-2:])} but window/stride give {(len(ys), len(xs))}")
    h, w = int(size[0]), int(size[1])
    # Indicator of which rows/cols each window covers; the sum over windows is then two matmuls.
    ry = torch.zeros(len(ys), h, dtype=drops.dtype, device=drops.device)
    rx = torch.zeros(len(xs), w, dtype=drops.dtype, device=drops.device)
    for i, y0 in enumerate(ys):
        ry[i, y0 : y0 + wh] = 1
    for j, x0 in enumerate(xs):
        rx[j, x0 : x0 + ww] = 1
    total = torch.einsum("bij,ih,jw->bhw", drops, ry, rx)
    count = torch.einsum("ih,jw->hw", ry, rx)
    return total / count.clamp_min(1)
