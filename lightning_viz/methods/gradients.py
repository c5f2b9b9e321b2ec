"""Gradient attributions: pure torch, batched, chunked, raw signed values out.

Every function takes ``(model, x[B, C, H, W], target, labels, ...)`` and returns ``[B, C, H, W]``
(``saliency``: ``[B, H, W]``). Gradients are taken with ``torch.autograd.grad`` w.r.t. the input only,
so parameter ``.grad`` is never written. ``target`` is ``"label"`` (needs ``labels``), ``"predicted"``,
a class index, or a callable ``logits -> score[B]`` (see :mod:`lightning_viz.targets`).

* :func:`gradient` -- ``dS_c/dx`` (signed).
* :func:`saliency` -- Simonyan et al., "Deep Inside Convolutional Networks", ICLR-W 2014, Sec. 3.1:
  ``M_ij = max_c |dS_c/dx_{c,i,j}|``.
* :func:`guided_backprop` / :func:`deconvnet` -- the gradient with the guided / Zeiler-Fergus ReLU
  backward rule (:mod:`lightning_viz.methods.relu_rules`: ``nn.ReLU``, ``F.relu``, ``torch.relu``,
  ``Tensor.relu`` and their in-place forms are all covered).
* :func:`input_x_gradient` -- Shrikumar et al., 2016 ("Not Just a Black Box"): ``x * dS/dx``.
* :func:`integrated_gradients` -- Sundararajan et al., "Axiomatic Attribution for Deep Networks",
  ICML 2017, with the midpoint rule: ``(x - x') * 1/m sum_k dS/dx(x' + (k - 1/2)/m (x - x'))`` (the paper's
  right sum, as zennit, samples ``k/m``; the midpoint's error falls as ``1/m^2``, as Captum's ``riemann_middle``).
* :func:`smoothgrad` -- Smilkov et al., "SmoothGrad", 2017: ``1/n sum_i M(x + N(0, sigma^2))``
  around any of the above, ``sigma`` a fraction of each image's value range, noise from a seeded
  ``torch.Generator`` (the global RNG is never used).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Optional, Union

import torch
from torch import Tensor, nn

from ..progress import progress, reporting
from ..targets import LabelTarget, PredictedTarget, TargetSpec, resolve_target
from .batching import grad_throughput_images
from .checks import (
    check_chunk_size,
    check_eval,
    check_images,
    check_labels_per_image,
    check_logits,
    input_matches_model,
)
from .shared_pass import chunks, gradient_pass

__all__ = [
    "GRADIENT_METHODS",
    "gradient",
    "saliency",
    "guided_backprop",
    "deconvnet",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "reduce_channels",
    "PASS_RULES",
    "gradient_from_pass",
]


def gradient(
    model: nn.Module,
    x: Tensor,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    rule: Optional[str] = None,
) -> Tensor:
    """``dS/dx`` ``[B, C, H, W]`` (with ReLU backward ``rule``: ``None``, ``"guided"``, ``"deconv"``)."""
    grad = gradient_pass(model, x, target, labels, (), rule, chunk_size).input_grad
    assert grad is not None  # input_grad=True (the default) always fills it
    return grad


def saliency(
    model: nn.Module,
    x: Tensor,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Saliency ``max_c |dS/dx|`` -> ``[B, H, W]`` (Simonyan et al. 2014, Sec. 3.1)."""
    return gradient(model, x, target, labels, chunk_size).abs().amax(dim=1)


def guided_backprop(
    model: nn.Module,
    x: Tensor,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Guided backpropagation ``[B, C, H, W]`` (Springenberg et al. 2015)."""
    return gradient(model, x, target, labels, chunk_size, rule="guided")


def deconvnet(
    model: nn.Module,
    x: Tensor,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Deconvnet ``[B, C, H, W]`` (Zeiler & Fergus 2014)."""
    return gradient(model, x, target, labels, chunk_size, rule="deconv")


def input_x_gradient(
    model: nn.Module,
    x: Tensor,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Input x gradient ``x * dS/dx`` ``[B, C, H, W]`` (Shrikumar et al. 2016)."""
    return x.detach() * gradient(model, x, target, labels, chunk_size)


def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    baseline: Union[float, Tensor] = 0.0,
    steps: int = 32,
) -> Tensor:
    """Integrated gradients (Sundararajan et al. 2017) ``[B, C, H, W]`` along the straight path from ``baseline``
    (a value or a tensor broadcastable to ``x``) with ``steps`` midpoint samples; ``chunk_size`` bounds the number of
    path points (images) per forward + backward (``None``: as many as the default memory budget holds, on the CPU at
    most 64, :func:`lightning_viz.methods.batching.grad_throughput_images`); the result does not depend on it.
    ``sum`` of the result ~= ``S(x) - S(baseline)`` (completeness)."""
    if steps < 1:
        raise ValueError(f"integrated_gradients needs steps >= 1; got {steps}")
    chunk_size = check_chunk_size(chunk_size)
    tgt, labels = _fixed_target(model, x, target, labels)
    x = x.detach()
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    try:
        base = base.expand_as(x)
    except RuntimeError:
        raise ValueError(
            f"integrated_gradients: baseline of shape {tuple(base.shape)} does not broadcast to the images "
            f"{tuple(x.shape)}; allowed: a number, or a tensor broadcastable to [B, C, H, W] "
            "(e.g. [C, 1, 1] or [C, H, W])"
        ) from None
    alphas = (torch.arange(steps, dtype=x.dtype, device=x.device) + 0.5) / steps
    with input_matches_model("integrated_gradients", model, x):
        chunk_size = chunk_size or grad_throughput_images(model, x)
    return _path_average(model, x, base, alphas, tgt, labels, chunk_size) * (x - base)


def _path_average(model, x, base, alphas, target, labels, chunk_size) -> Tensor:
    """Mean over ``alphas`` of ``dS/dx`` at ``base + a (x - base)``, evaluated ``chunk_size`` images at a time."""
    b, steps = x.shape[0], alphas.shape[0]
    total = torch.zeros_like(x)
    # flat index j = step * B + image: points of consecutive steps share one forward
    flat = torch.arange(steps * b, device=x.device)
    for sl in chunks(steps * b, chunk_size):
        idx = flat[sl]
        img, step = idx % b, idx // b
        pts = base[img] + alphas[step].view(-1, 1, 1, 1) * (x[img] - base[img])
        lab = None if labels is None else labels.to(x.device)[img]
        g = gradient(model, pts, target, lab)
        total.index_add_(0, img, g)
        progress(sl.stop, steps * b, "path points")  # a line every few seconds inside a callback run (rank 0)
    return total / steps


def smoothgrad(
    method: Union[str, Callable[..., Tensor]],
    model: nn.Module,
    x: Tensor,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    n_samples: int = 16,
    sigma: float = 0.15,
    seed: int = 0,
    ids: Optional[Sequence[int]] = None,
    **kwargs,
) -> Tensor:
    """SmoothGrad (Smilkov et al. 2017) around ``method`` (any function above, or its name): the mean of ``method`` over
    ``n_samples`` noisy copies ``x + N(0, (sigma * (max(x_i) - min(x_i)))^2)``. The noise of image ``i`` comes from
    its own ``torch.Generator`` seeded by ``(seed, ids[i])`` (``ids`` default ``0..B-1``; pass global probe
    indices so a DDP split or a different batching draws the same noise per image); the global RNG is
    never used. ``chunk_size`` bounds the noisy images per forward (``None``: as many as the default memory
    budget holds, on the CPU at most 64, :func:`lightning_viz.methods.batching.grad_throughput_images`; for
    integrated gradients, whose every noisy image is ``steps`` path points, that many fewer); the result does not
    depend on it.
    A ``"predicted"`` target is fixed from the clean input."""
    if isinstance(method, str):
        if method not in GRADIENT_METHODS:
            raise ValueError(f"smoothgrad: unknown method {method!r}; allowed: {', '.join(GRADIENT_METHODS)}")
        method = GRADIENT_METHODS[method]
    if n_samples < 1:
        raise ValueError(f"smoothgrad needs n_samples >= 1; got {n_samples}")
    if sigma < 0:
        raise ValueError(f"smoothgrad needs sigma >= 0 (a fraction of the input range); got {sigma}")
    chunk_size = check_chunk_size(chunk_size)
    tgt, labels = _fixed_target(model, x, target, labels)
    x = x.detach()
    b = x.shape[0]
    ids = list(range(b)) if ids is None else [int(i) for i in ids]
    if len(ids) != b:
        raise ValueError(f"smoothgrad got {len(ids)} ids for {b} images")
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, *([1] * (x.ndim - 1)))
    noise = (
        torch.stack(
            [
                torch.randn(
                    (n_samples,) + tuple(x.shape[1:]), generator=torch.Generator().manual_seed(_noise_seed(seed, i))
                )
                for i in ids
            ],
            dim=1,
        ).to(device=x.device, dtype=x.dtype)
        if ids
        else x.new_zeros((n_samples,) + tuple(x.shape))
    )  # [n, B, ...]
    noisy = (x.unsqueeze(0) + sigma * span.unsqueeze(0) * noise).flatten(0, 1)  # [n*B, ...], sample-major
    lab = None if labels is None else labels.to(x.device).repeat(n_samples)
    total = None
    per_forward = chunk_size
    if per_forward is None:
        with input_matches_model("smoothgrad", model, x):
            per_forward = grad_throughput_images(model, x)
        if method is integrated_gradients:  # each noisy image becomes `steps` path points (IG budgets its own chunks)
            per_forward = max(1, per_forward // int(kwargs.get("steps", 32)))
    for sl in chunks(n_samples * b, per_forward):
        with reporting(None):  # the inner method's own progress lines (IG's path points) stay silent
            out = method(model, noisy[sl], tgt, None if lab is None else lab[sl], chunk_size=chunk_size, **kwargs)
        progress(sl.stop, n_samples * b, "noisy images")  # a line every few seconds inside a callback run (rank 0)
        img = torch.arange(sl.start, sl.stop, device=x.device) % b
        if total is None:
            total = torch.zeros((b,) + tuple(out.shape[1:]), dtype=out.dtype, device=out.device)
        total.index_add_(0, img, out)
    assert total is not None  # chunks() always yields at least one slice
    return total / n_samples


def _noise_seed(seed: int, image_id: int) -> int:
    """A distinct generator seed per (seed, image id)."""
    return (int(seed) * 1_000_003 + int(image_id) * 7_919 + 12_345) % (2**63 - 1)


def _fixed_target(model: nn.Module, x: Tensor, target: TargetSpec, labels: Optional[Tensor]):
    """For methods that evaluate perturbed inputs: pin ``"predicted"`` to the clean input's class.
    Returns ``(target, labels)``."""
    check_images("gradient methods", x)
    check_eval("gradient methods", model)
    labels = check_labels_per_image("gradient methods", labels, x.shape[0])
    tgt = resolve_target(target)
    if isinstance(tgt, PredictedTarget):
        with torch.no_grad(), input_matches_model("gradient methods", model, x):
            return LabelTarget(), check_logits("gradient methods", model(x.detach()), x.shape[0]).argmax(dim=1)
    return tgt, labels


def reduce_channels(attr: Tensor, how: str = "abs_max") -> Tensor:
    """``[B, C, H, W]`` -> ``[B, H, W]``: ``"abs_max"`` (Simonyan), ``"sum"`` (signed), ``"abs_sum"``."""
    if attr.ndim == 3:
        return attr
    if how == "abs_max":
        return attr.abs().amax(dim=1)
    if how == "sum":
        return attr.sum(dim=1)
    if how == "abs_sum":
        return attr.abs().sum(dim=1)
    raise ValueError(f"unknown channel reduction {how!r}; allowed: 'abs_max', 'sum', 'abs_sum'")


#: methods read off one shared pass, and the ReLU backward rule that pass needs
PASS_RULES: dict[str, Optional[str]] = {
    "saliency": None,
    "gradient": None,
    "input_x_gradient": None,
    "guided_backprop": "guided",
    "deconvnet": "deconv",
}


def gradient_from_pass(method: str, x: Tensor, input_grad: Tensor) -> Tensor:
    """A :data:`PASS_RULES` method from a pass's input gradient (taken with ``PASS_RULES[method]``)."""
    if method not in PASS_RULES:
        raise ValueError(f"{method!r} cannot be read off one gradient pass; allowed: {', '.join(PASS_RULES)}")
    if method == "saliency":
        return input_grad.abs().amax(dim=1)
    if method == "input_x_gradient":
        return x.detach().to(input_grad.device) * input_grad
    return input_grad


GRADIENT_METHODS: dict[str, Callable[..., Tensor]] = {
    "saliency": saliency,
    "gradient": gradient,
    "guided_backprop": guided_backprop,
    "deconvnet": deconvnet,
    "input_x_gradient": input_x_gradient,
    "integrated_gradients": integrated_gradients,
}
