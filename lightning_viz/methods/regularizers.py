"""Image priors for input optimization (Yosinski et al. 2015, sec. 3; Simonyan et al. 2014; Mahendran & Vedaldi 2015).

A :class:`Regularizer` acts at up to three points of each optimization step, in the image's model
input space (normalized; 0 is the dataset mean):

* ``transform(image, step)`` -- differentiable, before the forward pass (jitter);
* ``penalty(image) -> Tensor[B]`` -- subtracted from the objective (L2 norm, total variation);
* ``project(image, grad, step)`` -- after the update, without grad (L2 decay, blur, clipping).

All randomness is drawn in ``reset(steps, generator)`` from the caller's seeded generator, once per
run, so the same seed gives the same images and a chunked run equals an unchunked one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .blur import gaussian_blur

__all__ = [
    "Regularizer",
    "L2Penalty",
    "TotalVariation",
    "L2Decay",
    "GaussianBlur",
    "ClipPixelNorm",
    "ClipContribution",
    "Jitter",
    "gaussian_blur",
    "build_regularizers",
    "total_penalty",
    "penalty_grads",
]


class Regularizer:
    """Base: every hook is the identity / no penalty. ``needs_grad``: ``project`` reads d objective / d image."""

    needs_grad: bool = False

    def reset(self, steps: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> None:
        """Draw this run's randomness (called once per optimization, before any chunk)."""

    def transform(self, image: Tensor, step: int) -> Tensor:
        return image

    def penalty(self, image: Tensor) -> Tensor | None:
        return None

    def penalty_grad(self, image: Tensor) -> Tensor | None:
        """``d sum_b penalty_b / d image`` in closed form (no autograd graph), or ``None``: the optimization then
        differentiates :meth:`penalty` with autograd. A subclass that overrides one should override both."""
        return None

    def project(self, image: Tensor, grad: Tensor | None, step: int) -> Tensor:
        return image

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _below_percentile(values: Tensor, percentile: float) -> Tensor:
    """Mask of the entries of ``values[B, H, W]`` below each image's ``percentile`` (0-100)."""
    q = torch.quantile(values.flatten(1).float(), percentile / 100.0, dim=1).view(-1, 1, 1)
    return values < q.to(values.dtype)


class L2Penalty(Regularizer):
    """``weight * ||I||_2^2`` per image, the lambda term of Simonyan et al. 2014."""

    def __init__(self, weight: float):
        self.weight = float(weight)

    def penalty(self, image: Tensor) -> Tensor:
        return self.weight * image.flatten(1).pow(2).sum(1)

    def penalty_grad(self, image: Tensor) -> Tensor:
        return image.detach() * (2 * self.weight)


class TotalVariation(Regularizer):
    """``weight * sum ((dI/dx)^2 + (dI/dy)^2)^(beta/2)`` per image: the V^beta (total variation)
    regularizer of Mahendran & Vedaldi 2015."""

    def __init__(self, weight: float, beta: float = 2.0):
        self.weight = float(weight)
        self.beta = float(beta)

    def penalty(self, image: Tensor) -> Tensor:
        dx = image[..., :-1, 1:] - image[..., :-1, :-1]
        dy = image[..., 1:, :-1] - image[..., :-1, :-1]
        sq = dx.pow(2) + dy.pow(2)
        tv = sq if self.beta == 2.0 else (sq + 1e-8).pow(self.beta / 2)
        return self.weight * tv.flatten(1).sum(1)

    def penalty_grad(self, image: Tensor) -> Tensor | None:
        """For ``beta = 2``: each difference ``d`` adds ``2 * weight * d`` to its far pixel and subtracts it from
        its near one (a handful of kernels instead of autograd's graph of slices); other ``beta``: ``None``."""
        if self.beta != 2.0:
            return None
        x = image.detach()
        dx = (x[..., :-1, 1:] - x[..., :-1, :-1]).mul_(2 * self.weight)
        dy = (x[..., 1:, :-1] - x[..., :-1, :-1]).mul_(2 * self.weight)
        g = torch.zeros_like(x)
        g[..., :-1, 1:].add_(dx)  # in place on the views (``g[...] += d`` would also copy each view onto itself)
        g[..., 1:, :-1].add_(dy)
        g[..., :-1, :-1].sub_(dx + dy)
        return g


class L2Decay(Regularizer):
    """``I <- (1 - theta) I`` after every step (Yosinski et al. 2015, r_theta with L2 decay)."""

    def __init__(self, theta: float):
        if not 0.0 <= theta < 1.0:
            raise ValueError(f"L2 decay theta must be in [0, 1); got {theta}")
        self.theta = float(theta)

    def project(self, image: Tensor, grad: Tensor | None, step: int) -> Tensor:
        return image * (1.0 - self.theta)


class GaussianBlur(Regularizer):
    """Blur the image with width ``sigma`` every ``every`` steps (Yosinski et al. 2015, r_theta Gaussian blur):
    removes the high frequencies that gradient ascent produces."""

    def __init__(self, sigma: float, every: int = 4):
        if sigma <= 0 or every < 1:
            raise ValueError(
                f"blur needs blur_sigma > 0 and blur_every >= 1; got blur_sigma={sigma}, blur_every={every}"
            )
        self.sigma = float(sigma)
        self.every = int(every)

    def project(self, image: Tensor, grad: Tensor | None, step: int) -> Tensor:
        return gaussian_blur(image, self.sigma) if (step + 1) % self.every == 0 else image


class ClipPixelNorm(Regularizer):
    """Zero the pixels whose norm over channels is below each image's ``percentile`` (Yosinski et al. 2015)."""

    def __init__(self, percentile: float):
        if not 0.0 < percentile < 100.0:
            raise ValueError(f"clip_percentile must be in (0, 100) (0 = off); got {percentile}")
        self.percentile = float(percentile)

    def project(self, image: Tensor, grad: Tensor | None, step: int) -> Tensor:
        small = _below_percentile(image.norm(dim=1), self.percentile)
        return image.masked_fill(small.unsqueeze(1), 0.0)


class ClipContribution(Regularizer):
    """Zero the pixels whose contribution ``|sum_c I * dS/dI|`` (a linear estimate of how much the pixel
    raises the objective) is below each image's ``percentile`` (Yosinski et al. 2015, clipping small contributions)."""

    needs_grad = True

    def __init__(self, percentile: float):
        if not 0.0 < percentile < 100.0:
            raise ValueError(f"clip_contribution_percentile must be in (0, 100) (0 = off); got {percentile}")
        self.percentile = float(percentile)

    def project(self, image: Tensor, grad: Tensor | None, step: int) -> Tensor:
        if grad is None:
            raise ValueError("ClipContribution needs the gradient of the objective w.r.t. the image")
        small = _below_percentile((image * grad).sum(1).abs(), self.percentile)
        return image.masked_fill(small.unsqueeze(1), 0.0)


class Jitter(Regularizer):
    """Shift the image by a random ``(dy, dx)`` in ``[-pixels, pixels]`` (circular roll, as DeepDream, Mordvintsev
    et al. 2015) before each forward; offsets come from the seeded generator, one per step. lucid crops and
    torch-lucent translates with zero fill by ``[0, d)`` instead: equal away from the wrapped border."""

    def __init__(self, pixels: int):
        if pixels < 0:
            raise ValueError(f"jitter must be >= 0 pixels; got {pixels}")
        self.pixels = int(pixels)
        self._offsets: list[tuple[int, int]] = []

    def reset(self, steps: int, generator: torch.Generator | None, device: torch.device | str = "cpu") -> None:
        gen_device = generator.device if generator is not None else "cpu"
        off = torch.randint(-self.pixels, self.pixels + 1, (steps, 2), generator=generator, device=gen_device)
        self._offsets = [tuple(o) for o in off.tolist()]

    def transform(self, image: Tensor, step: int) -> Tensor:
        if self.pixels == 0:
            return image
        if step >= len(self._offsets):
            raise RuntimeError("Jitter.reset(steps, generator) must be called before the optimization")
        dy, dx = self._offsets[step]
        return torch.roll(image, shifts=(dy, dx), dims=(-2, -1))


def build_regularizers(
    l2: float = 0.0,
    tv: float = 0.0,
    l2_decay: float = 0.0,
    blur_every: int = 0,
    blur_sigma: float = 0.5,
    clip_percentile: float = 0.0,
    clip_contribution_percentile: float = 0.0,
    jitter: int = 0,
) -> list[Regularizer]:
    """The regularizers switched on by these simple options (0 = off), in the order they apply."""
    regs: list[Regularizer] = []
    if jitter:
        regs.append(Jitter(jitter))
    if l2:
        regs.append(L2Penalty(l2))
    if tv:
        regs.append(TotalVariation(tv))
    if l2_decay:
        regs.append(L2Decay(l2_decay))
    if blur_every:
        regs.append(GaussianBlur(blur_sigma, blur_every))
    if clip_percentile:
        regs.append(ClipPixelNorm(clip_percentile))
    if clip_contribution_percentile:
        regs.append(ClipContribution(clip_contribution_percentile))
    return regs


def penalty_grads(regularizers: Sequence[Regularizer], image: Tensor) -> tuple[Tensor | None, list[Regularizer]]:
    """The sum of the closed-form penalty gradients (:meth:`Regularizer.penalty_grad`; ``None`` when none has
    one) and the regularizers whose penalty must go through autograd instead."""
    total: Tensor | None = None
    rest: list[Regularizer] = []
    for r in regularizers:
        if type(r).penalty is Regularizer.penalty:
            continue
        g = r.penalty_grad(image)
        if g is None:
            rest.append(r)
        else:
            total = g if total is None else total + g
    return total, rest


def total_penalty(regularizers: Sequence[Regularizer], image: Tensor) -> Tensor:
    """Sum of the regularizers' penalties per image (zeros when none has one)."""
    total: Tensor | None = None
    for r in regularizers:
        p = r.penalty(image)
        if p is not None:
            total = p if total is None else total + p
    return torch.zeros(image.shape[0], device=image.device, dtype=image.dtype) if total is None else total
