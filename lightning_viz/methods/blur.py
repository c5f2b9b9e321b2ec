"""Separable Gaussian blur of image batches, shared by the synthesis regularizers and the
insertion-metric baseline."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_blur"]


@functools.lru_cache(maxsize=64)
def _taps(radius: int, sigma: float, dtype: torch.dtype) -> tuple[float, ...]:
    """The ``2 * radius + 1`` weights of the normalized 1-D Gaussian, computed in ``dtype`` (as numbers, so each
    weight enters the sum as exactly that ``dtype`` value)."""
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return tuple((k / k.sum()).tolist())


def _blur_axis(x: Tensor, taps: tuple[float, ...], dim: int) -> Tensor:
    """``sum_k taps[k] * x_pad[i + k]`` along ``dim`` (-1 or -2) of ``x`` padded by reflection: the weights
    accumulated in order, ``out = w_0 x_0``, then ``out += w_k x_k`` -- what the depthwise convolution computes, in a
    handful of elementwise kernels instead of a convolution, whose set-up dominates on small images."""
    r = len(taps) // 2
    n = x.shape[dim]
    padded = F.pad(x, (r, r, 0, 0) if dim == -1 else (0, 0, r, r), mode="reflect")
    out = padded.narrow(dim, 0, n) * taps[0]
    for k in range(1, len(taps)):
        out.add_(padded.narrow(dim, k, n), alpha=taps[k])
    return out


def gaussian_blur(x: Tensor, sigma: float, truncate: float = 3.0) -> Tensor:
    """Blur ``[B, C, H, W]`` with a Gaussian of width ``sigma`` (pixels), one 1-D pass per axis.

    The kernel radius is ``ceil(truncate * sigma)`` (at least 1), cut to ``size - 1`` on each axis so
    reflect padding stays valid, and renormalized after cutting. ``sigma <= 0`` returns ``x``.
    """
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(truncate * sigma))
    out = x
    for dim in (-1, -2):
        r = min(radius, x.shape[dim] - 1)
        if r > 0:
            out = _blur_axis(out, _taps(r, float(sigma), x.dtype), dim)
    return out
