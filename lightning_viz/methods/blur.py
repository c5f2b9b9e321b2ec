"""Separable Gaussian blur of image batches, shared by the synthesis regularizers and the
insertion-metric baseline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_blur"]


def gaussian_blur(x: Tensor, sigma: float, truncate: float = 3.0) -> Tensor:
    """Blur ``[B, C, H, W]`` with a Gaussian of width ``sigma`` (pixels), one 1-D pass per axis.

    The kernel radius is ``ceil(truncate * sigma)`` (at least 1), cut to ``size - 1`` on each axis so
    reflect padding stays valid, and renormalized after cutting. ``sigma <= 0`` returns ``x``.
    """
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(truncate * sigma))
    c = x.shape[1]
    out = x
    for axis, size in ((-1, x.shape[-1]), (-2, x.shape[-2])):
        r = min(radius, size - 1)
        if r <= 0:
            continue
        t = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        if axis == -1:
            out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        else:
            out = F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out
