"""How the optimized image is parameterized: plain pixels, or a scaled Fourier spectrum with decorrelated colors.

The FFT parameterization (Olah et al. 2017, "Feature Visualization", lucid's ``fft_image`` and
``to_valid_rgb(decorrelate=True)``) optimizes ``s`` with ``image = M * irfft2(s / f^decay)``: the
``1/f`` scaling makes the optimizer take equal steps in every frequency (natural images have a
``1/f`` spectrum), and ``M`` maps decorrelated color channels to RGB, so high-frequency noise is
no longer the easiest way up.

The same image as torch-lucent's ``fft_image`` + ``to_valid_rgb(decorrelate=True)`` before its last two steps
(it divides by a "magic" 4 and squashes into ``[0, 1]`` with a sigmoid): here the image is the model input itself
(clamped to the valid range when the normalization is known), so a step of ``lr`` moves it 4x more than in torch-lucent.

Both are linear and invertible, so an image can be written back (``set_image``) after a projection
(blur, clipping, clamping to the valid range) whatever the parameterization.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["Parameterization", "PixelParam", "FFTParam", "make_param", "COLOR_CORRELATION_SVD_SQRT"]

#: Square root of the ImageNet color correlation matrix, as in lucid (raw values; :class:`FFTParam` divides it by
#: its largest column norm, lucid's ``color_correlation_normalized``).
COLOR_CORRELATION_SVD_SQRT = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])


class Parameterization:
    """The tensors an optimizer updates (``params``) and the ``[B, C, H, W]`` image they define."""

    params: list[Tensor]

    def image(self) -> Tensor:
        raise NotImplementedError

    def set_image(self, image: Tensor) -> None:
        """Write ``image`` back into the parameters (exact inverse of :meth:`image`)."""
        raise NotImplementedError


class PixelParam(Parameterization):
    """The pixels themselves."""

    def __init__(self, init: Tensor):
        self.pixels = init.detach().clone().requires_grad_(True)
        self.params = [self.pixels]

    def image(self) -> Tensor:
        return self.pixels

    @torch.no_grad()
    def set_image(self, image: Tensor) -> None:
        self.pixels.copy_(image)


class FFTParam(Parameterization):
    """Real and imaginary parts of ``rfft2`` coefficients, scaled by ``1 / max(f, 1/max(H, W))^decay_power``;
    with ``decorrelate`` (3 channels only) the channels are color-decorrelated first."""

    def __init__(self, init: Tensor, decay_power: float = 1.0, decorrelate: bool = True):
        b, c, h, w = init.shape
        self.size = (h, w)
        fy = torch.fft.fftfreq(h, device=init.device).view(-1, 1)
        fx = torch.fft.rfftfreq(w, device=init.device).view(1, -1)
        freqs = (fy.pow(2) + fx.pow(2)).sqrt()
        self.scale = (1.0 / freqs.clamp_min(1.0 / max(h, w)).pow(decay_power)).to(init.dtype)
        # the complex scale ``s + 0i`` the products with the coefficients promote ``scale`` to, made once
        self._complex_scale = torch.complex(self.scale, torch.zeros_like(self.scale))
        self.color = self.color_inv = None
        if decorrelate and c == 3:
            m = COLOR_CORRELATION_SVD_SQRT.to(init.device, init.dtype)
            self.color = m / m.norm(dim=0).max()
            self.color_inv = torch.linalg.inv(self.color)
        self.spectrum = torch.zeros(b, c, h, w // 2 + 1, 2, device=init.device, dtype=init.dtype, requires_grad=True)
        self.params = [self.spectrum]
        self.set_image(init)

    def image(self) -> Tensor:
        coeffs = torch.view_as_complex(self.spectrum) * self._complex_scale
        img = torch.fft.irfft2(coeffs, s=self.size, norm="ortho")
        if self.color is not None:
            img = _mix_channels(self.color, img)
        return img

    @torch.no_grad()
    def set_image(self, image: Tensor) -> None:
        img = image.to(self.spectrum.dtype)
        if self.color_inv is not None:
            img = _mix_channels(self.color_inv, img)
        coeffs = torch.fft.rfft2(img, norm="ortho") / self._complex_scale
        self.spectrum.copy_(torch.view_as_real(coeffs))


def _mix_channels(matrix: Tensor, img: Tensor) -> Tensor:
    """``einsum("ij,bjhw->bihw", matrix, img)`` as the one batched product einsum makes of it (the same sums, bit for
    bit), without its per-call parsing and a dozen view operations forward and backward."""
    b, c, h, w = img.shape
    out = torch.bmm(matrix[None], img.transpose(0, 1).reshape(1, c, b * h * w))
    return out.view(c, b, h, w).transpose(0, 1)


def make_param(kind: Literal["pixel", "fft"], init: Tensor, decorrelate: bool = True) -> Parameterization:
    """``"pixel"`` or ``"fft"`` parameterization starting from ``init[B, C, H, W]``."""
    if kind == "pixel":
        return PixelParam(init)
    if kind == "fft":
        return FFTParam(init, decorrelate=decorrelate)
    raise ValueError(f"unknown parameterization {kind!r}; allowed: 'pixel', 'fft'")
