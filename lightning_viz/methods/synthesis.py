"""Input optimization with the model frozen: class-model images, unit images, feature inversion.

One loop, :func:`optimize_input`, maximizes an :mod:`~lightning_viz.methods.objectives` objective over
a batch of images (one image per class / unit / probe, all in one batch) under the priors of
:mod:`~lightning_viz.methods.regularizers`, in a pixel or FFT :mod:`~lightning_viz.methods.parameterization`.

* :func:`class_model_images` -- ``argmax_I S_c(I) - lambda ||I||_2^2`` (Simonyan et al. 2014);
* :func:`unit_images` -- ``argmax_x h_ij(x)`` for channels of a layer (Erhan et al. 2009), with the
  regularizers of Yosinski et al. 2015;
* :func:`invert_features` -- ``argmin_x ||phi(x) - phi0||^2 / ||phi0||^2 + lambda R(x)``
  (Mahendran & Vedaldi 2015, with their normalized Euclidean loss).

Gradients are taken with ``torch.autograd.grad`` w.r.t. the image parameters only: the model's
parameters never get a ``.grad``. Run inside :func:`lightning_viz.capture.isolated` (the callbacks do)
so eval mode, frozen parameters and the untouched global RNG are guaranteed; every random draw here
comes from the ``generator`` argument (``None``: a fresh generator seeded 0, never the global RNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from ..capture import capture, forward_until, grad_enabled
from ..layers import module_device, module_dtype
from ..progress import progress
from ..targets import ModelAdapter
from .checks import check_chunk_size, check_eval, check_images, check_reaches_input
from .objectives import Objective, channel, class_logit, feature_match, neuron
from .parameterization import PixelParam, make_param
from .regularizers import L2Penalty, Regularizer, penalty_grads, total_penalty

__all__ = [
    "SynthesisResult",
    "valid_range",
    "initial_images",
    "per_image_noise",
    "optimize_input",
    "class_model_images",
    "unit_images",
    "invert_features",
]

InitSpec = Literal["zero", "gray", "noise"]


@dataclass
class SynthesisResult:
    """``images[B, C, H, W]`` (model input space), the objective at the final image (``scores[B]``,
    without jitter or penalties) and at the starting image (``start_scores[B]``)."""

    images: Tensor
    scores: Tensor
    start_scores: Tensor


def valid_range(mean: Sequence[float] | None, std: Sequence[float] | None, device=None) -> tuple[Tensor, Tensor] | None:
    """Per-channel ``(lo, hi)`` ``[1, C, 1, 1]`` of normalized images whose pixels are in ``[0, 1]``
    (``x = (p - mean) / std``), or ``None`` when the normalization is unknown."""
    if mean is None or std is None:
        return None
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return (0 - m) / s, (1 - m) / s


def initial_images(
    init: InitSpec | Tensor,
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
    noise_std: float = 0.1,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Starting images (``dtype``, e.g. the model's): ``"zero"`` (zeros in input space: the mean image when
    inputs are normalized, as in Simonyan et al.), ``"gray"`` (mid-range ``(lo + hi) / 2`` of ``bounds``; zeros
    when unknown), ``"noise"`` (gray plus ``noise_std`` Gaussian noise from ``generator``), or an explicit tensor."""
    if isinstance(init, Tensor):
        if tuple(init.shape) != tuple(shape):
            raise ValueError(f"init tensor has shape {tuple(init.shape)}, expected {tuple(shape)}")
        return init.detach().to(device=device, dtype=dtype).clone()
    if init not in ("zero", "gray", "noise"):
        raise ValueError(f"unknown init {init!r}; allowed: 'zero', 'gray', 'noise' or a tensor")
    x = torch.zeros(tuple(shape), device=device, dtype=dtype)
    if init in ("gray", "noise") and bounds is not None:
        x = x + ((bounds[0] + bounds[1]) / 2).to(device, dtype)
    if init == "noise":
        gen_device = generator.device if generator is not None else "cpu"
        x = x + noise_std * torch.randn(tuple(shape), generator=generator, device=gen_device).to(device, dtype)
    return x


def per_image_noise(
    shape: Sequence[int], seed: int, first_index: int = 0, uniform: bool = False, device: torch.device | str = "cpu"
) -> Tensor:
    """Standard normal (or ``uniform`` in ``[-1, 1]``) noise for images ``first_index .. first_index + B - 1`` of a
    larger set: image ``i`` draws from its own generator seeded with ``(seed, i)``, so its noise does not depend
    on how the set is split over DDP ranks or chunks."""
    out = []
    for i in range(first_index, first_index + int(shape[0])):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + i)
        out.append(
            torch.rand(tuple(shape[1:]), generator=g) * 2 - 1 if uniform else torch.randn(tuple(shape[1:]), generator=g)
        )
    return torch.stack(out).to(device) if out else torch.zeros(tuple(shape), device=device)


def work_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype images are optimized in: float32 for a half / bfloat16 model (``precision="16-true"``), whose
    Adam state would underflow (``eps = 1e-8`` is 0 in float16) and whose FFT and color inverse do not exist;
    the model's own dtype otherwise. Each forward gets the image cast to the model's dtype."""
    return torch.float32 if model_dtype in (torch.float16, torch.bfloat16) else model_dtype


def _scores(model: nn.Module, objective: Objective, images: Tensor, rows: Tensor) -> Tensor:
    """The objective at model-input ``images``, without a graph."""
    with torch.no_grad(), capture(model, objective.layers) as cap:
        logits = model(images.to(module_dtype(model)))
        return objective(logits, cap.outputs, rows).detach().to(images.dtype)


class _Ascent:
    """Minimal Adam (Kingma & Ba 2015, Algorithm 1) or plain SGD over our own image parameters, in place:
    no ``.grad`` fields and none of ``torch.optim``'s per-call overhead, which dominates on tiny images."""

    def __init__(self, params: list[Tensor], lr: float, kind: str, betas=(0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.kind, self.betas, self.eps, self.t = params, lr, kind, betas, eps, 0
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        """One descent step on the loss whose gradients are ``grads``."""
        self.t += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(self.params, grads, self.m, self.v):
            if self.kind == "sgd":
                p.sub_(self.lr * g)
                continue
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / (1 - b2**self.t)).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / (1 - b1**self.t))


@dataclass(frozen=True, eq=False)
class _Loop:
    """What every chunk of one :func:`optimize_input` call is optimized with (its arguments, resolved: ``bounds``
    and ``scale`` on the model's device in the work dtype, the regularizers reset)."""

    model: nn.Module
    objective: Objective
    steps: int
    lr: float
    regs: Sequence[Regularizer]
    param: Literal["pixel", "fft"]
    bounds: tuple[Tensor, Tensor] | None
    optimizer: Literal["adam", "sgd"]
    decorrelate: bool
    scale: Tensor | None


def _optimize_chunk(loop: _Loop, init: Tensor, rows: Tensor, chunk: tuple[int, int] = (0, 1)) -> Tensor:
    """The optimized images of one chunk: ``init`` ``[b, C, H, W]`` (in ``z`` units when there is a ``scale``) for
    the objective's ``rows``; ``chunk = (index, count)``: where the progress lines count from."""
    model, objective, regs = loop.model, loop.objective, loop.regs
    steps, bounds, scale = loop.steps, loop.bounds, loop.scale
    layout = model.memory_format if isinstance(model, ModelAdapter) and init.device.type == "cpu" else None
    if layout is not None and loop.param == "pixel":
        # pixels in the layout the model takes them in (channels_last on the CPU): no copy into it per forward, and
        # the gradient, the penalties' gradients and Adam's state share one layout (the values are the same)
        init = init.contiguous(memory_format=layout)
    p = make_param(loop.param, init, decorrelate=loop.decorrelate)
    model_dtype = module_dtype(model)
    opt = _Ascent(p.params, loop.lr, loop.optimizer)
    needs_img_grad = any(r.needs_grad for r in regs)
    project = bounds is not None or any(type(r).project is not Regularizer.project for r in regs)
    # an objective that reads only activations needs no layer after its last one: those passes stop there
    cut = () if objective.uses_logits else objective.layers
    ascent: Tensor | None = None
    minus_one = init.new_full((), -1.0)  # d loss / d obj for the loss -obj
    same_dtype = model_dtype == init.dtype  # else the objective's score is cast to the image's dtype: no seeds

    def projected(img: Tensor, step: int) -> Tensor:
        """``img`` after ``step``'s projections and clamping. Written back into the parameters (and made again from
        them) only when they change it: no parameter -> image -> parameter round trip between two blurs while the
        image stays in range."""
        with torch.no_grad():
            out = start = img.detach()
            for r in regs:
                out = r.project(out, ascent, step)
            if isinstance(p, PixelParam):  # the image is the parameter: clamped into it, nothing to compare
                if bounds is not None:
                    torch.clamp(out, bounds[0], bounds[1], out=start)
                elif out is not start:
                    p.set_image(out)
                return img
            if bounds is not None:
                out = torch.clamp(out, bounds[0], bounds[1])
            if torch.equal(out, img):
                return img
            p.set_image(out)
        return p.image()

    with capture(model, objective.layers, grad=True) as cap, forward_until(model, cut) as run:
        for step in range(steps):
            # a line every few seconds inside a callback run (rank 0), counting the steps of all chunks
            progress(chunk[0] * steps + step, chunk[1] * steps, "optimization steps")
            img = p.image()
            if project and step > 0:  # the last step's projections, on the image this step starts from
                img = projected(img, step - 1)
            x = img
            for r in regs:
                x = r.transform(x, step)
            # with needs_img_grad the model gets a node of its own, which no penalty reaches
            x_in = x.view_as(x) if needs_img_grad else x
            cap.clear()
            logits = run(partial(model, (x_in if scale is None else x_in * scale).to(model_dtype)))
            if logits is None:  # stopped after the objective's layers: no logits (the objective reads none)
                logits = x.new_empty(x.shape[0], 0)
            # penalties with a closed-form gradient enter the backward at the image (no graph of their own); the
            # others go through autograd as part of the loss
            closed, traced = penalty_grads(regs, img)
            # without traced penalties the loss is -obj: the backward starts at the tensors the objective reads, with
            # its gradient for the seed -1 when it has one in closed form (the objective itself is not run), else
            # from obj with the seed -1 (what the negation's backward would send it: the same gradients)
            pairs = None if traced or not same_dtype else objective.backward_seeds(logits, cap.outputs, rows, minus_one)
            seeds: list[Tensor | None]
            if pairs is not None:
                outputs, seeds = [t for t, _ in pairs], [g for _, g in pairs]
                reaches = all(t.requires_grad for t in outputs)
            else:
                obj = objective(logits, cap.outputs, rows).sum().to(img.dtype)
                loss, seed = (-obj + total_penalty(traced, img).sum(), None) if traced else (obj, minus_one)
                outputs, seeds, reaches = [loss], [seed], obj.requires_grad
            check_reaches_input("input optimization", reaches and not cap.without_grad)
            if closed is not None:
                outputs, seeds = [*outputs, img], [*seeds, closed]
            ascent = None
            if needs_img_grad:
                # one backward through the model for both: d loss / d x_in is exactly -(d objective / d x), which
                # pulled back through the transforms is d objective / d image (Yosinski's contribution, for the
                # projections, without the penalties' part)
                g_x, *grads = torch.autograd.grad(outputs, [x_in, *p.params], seeds, retain_graph=True)
                ascent = torch.autograd.grad(x_in, img, grad_outputs=-g_x)[0]
            else:
                grads = list(torch.autograd.grad(outputs, p.params, seeds))
            opt.step(grads)
        final = p.image()
        if project and steps > 0:
            final = projected(final, steps - 1)
    return final.detach().contiguous()


@grad_enabled()  # also under a caller's torch.no_grad() / inference_mode()
def optimize_input(
    model: nn.Module,
    objective: Objective,
    shape: Sequence[int],
    steps: int = 64,
    lr: float = 0.05,
    regularizers: Sequence[Regularizer] = (),
    param: Literal["pixel", "fft"] = "pixel",
    generator: torch.Generator | None = None,
    init: InitSpec | Tensor = "gray",
    bounds: tuple[Tensor, Tensor] | None = None,
    optimizer: Literal["adam", "sgd"] = "adam",
    chunk_size: int | None = None,
    noise_std: float = 0.1,
    decorrelate: bool = True,
    scale: Tensor | None = None,
) -> SynthesisResult:
    """Maximize ``objective`` over a batch of images of ``shape = (B, C, H, W)``.

    Each step: image from the parameterization -> regularizer transforms (jitter) -> forward ->
    ``loss = -sum_b objective_b + sum_b penalty_b`` -> ``torch.autograd.grad`` w.r.t. the image
    parameters -> optimizer step -> regularizer projections (decay, blur, clipping) and clamping to
    ``bounds`` (``(lo, hi)`` from :func:`valid_range`). Images are independent (eval mode), so
    ``chunk_size`` images at a time give the same result as one batch (``None``: one batch).

    ``scale`` (``[1, C, 1, 1]``, e.g. ``1 / std`` of a normalization that only rescales pixels, such as uint8 pixels
    ``0..255``): the model input is ``scale * z`` and everything else (``lr``, ``noise_std``, the regularizers,
    the parameterization) acts on ``z``, so the optimization runs in pixel units; ``init``, ``bounds`` and the
    returned images are in model-input units.
    """
    if steps < 0 or lr <= 0:
        raise ValueError(f"need steps >= 0 and lr > 0; got steps={steps}, lr={lr}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer {optimizer!r}; allowed: 'adam', 'sgd'")
    if len(shape) != 4:
        raise ValueError(f"shape must be (B, C, H, W); got {tuple(shape)}")
    check_eval("optimize_input", model)
    if generator is None:  # never the global RNG: the same draws (noise init, jitter) on every call
        generator = torch.Generator().manual_seed(0)
    device, dtype = module_device(model), work_dtype(module_dtype(model))
    if scale is not None:
        scale = torch.as_tensor(scale).to(device, dtype)
        if bool((scale <= 0).any()):
            raise ValueError(f"scale must be positive; got {scale.flatten().tolist()}")
    if bounds is not None:
        bounds = (bounds[0].to(device, dtype), bounds[1].to(device, dtype))
        if scale is not None:  # the range of z
            bounds = (bounds[0] / scale, bounds[1] / scale)
    if isinstance(init, Tensor) and scale is not None:
        init = init.to(device, dtype) / scale
    x0 = initial_images(init, shape, generator, bounds, noise_std, device, dtype)
    if bounds is not None:
        x0 = torch.maximum(torch.minimum(x0, bounds[1]), bounds[0])
    regs = list(regularizers)
    for r in regs:
        r.reset(steps, generator, device)
    b = x0.shape[0]
    chunk = check_chunk_size(chunk_size) or max(b, 1)
    images, scores, start = [x0[:0]], [x0.new_zeros(0)], [x0.new_zeros(0)]  # an empty batch: empty results
    n_chunks = -(-b // chunk)
    loop = _Loop(model, objective, steps, lr, regs, param, bounds, optimizer, decorrelate, scale)
    for lo in range(0, b, chunk):
        rows = torch.arange(lo, min(lo + chunk, b))
        init_c = x0[lo : lo + chunk]
        start.append(_scores(model, objective, init_c if scale is None else init_c * scale, rows))
        img = _optimize_chunk(loop, init_c, rows, (lo // chunk, n_chunks))
        img = img if scale is None else img * scale
        images.append(img)
        scores.append(_scores(model, objective, img, rows))
    return SynthesisResult(torch.cat(images), torch.cat(scores), torch.cat(start))


def _check_one_image_shape(fn: str, shape: Sequence[int]) -> None:
    if len(shape) != 3:
        raise ValueError(f"{fn}: shape is (C, H, W) of one image (the batch is one image per item); got {tuple(shape)}")


@grad_enabled()  # also under a caller's torch.no_grad() / inference_mode()
def class_model_images(
    model: nn.Module,
    classes: Sequence[int] | Tensor,
    shape: Sequence[int],
    l2: float = 1e-3,
    regularizers: Sequence[Regularizer] = (),
    **kwargs,
) -> SynthesisResult:
    """One image per class maximizing ``S_c(I) - l2 * ||I||_2^2`` (Simonyan et al. 2014), all classes
    in one batch. ``shape = (C, H, W)`` of one image; ``l2`` default ``1e-3``; ``kwargs`` go to :func:`optimize_input`
    (``steps=64``, ``lr=0.05``, ``param="pixel"``, ``init="gray"``, ...). Returns :class:`SynthesisResult` with
    ``images[len(classes), C, H, W]``."""
    _check_one_image_shape("class_model_images", shape)
    cls = torch.as_tensor(classes, dtype=torch.long).view(-1).clone()  # also a normal tensor from inference mode
    regs = ([L2Penalty(l2)] if l2 else []) + list(regularizers)
    return optimize_input(model, class_logit(cls), (cls.numel(), *shape), regularizers=regs, **kwargs)


@grad_enabled()  # also under a caller's torch.no_grad() / inference_mode()
def unit_images(
    model: nn.Module,
    layer: str,
    channels: Sequence[int] | Tensor,
    shape: Sequence[int],
    unit: Literal["channel", "neuron"] = "channel",
    **kwargs,
) -> SynthesisResult:
    """One image per channel of ``layer`` maximizing its mean activation (``unit="channel"``) or its center
    unit (``"neuron"``) (Erhan et al. 2009; regularized as Yosinski et al. 2015). ``shape = (C, H, W)`` of one image;
    ``kwargs`` go to :func:`optimize_input`. Returns :class:`SynthesisResult` with
    ``images[len(channels), C, H, W]``."""
    _check_one_image_shape("unit_images", shape)
    ch = torch.as_tensor(channels, dtype=torch.long).view(-1).clone()  # also a normal tensor from inference mode
    if unit not in ("channel", "neuron"):
        raise ValueError(f"unknown unit {unit!r}; allowed: 'channel', 'neuron'")
    obj = channel(layer, ch) if unit == "channel" else neuron(layer, ch)
    return optimize_input(model, obj, (ch.numel(), *shape), **kwargs)


@grad_enabled()  # also under a caller's torch.no_grad() / inference_mode()
def invert_features(
    model: nn.Module,
    x: Tensor,
    layer: str,
    init: InitSpec | Tensor = "noise",
    **kwargs,
) -> SynthesisResult:
    """Reconstruct each image of ``x[B, C, H, W]`` from its representation ``phi0`` at ``layer``:
    minimize ``||phi(x') - phi0||^2 / ||phi0||^2`` plus the image prior in ``regularizers`` (Mahendran &
    Vedaldi 2015; use ``TotalVariation`` and ``L2Penalty``). ``scores`` are the negated normalized
    squared feature errors, so ``(-scores).sqrt()`` is the relative feature error."""
    check_images("invert_features", x)
    check_eval("invert_features", model)
    with torch.no_grad(), capture(model, [layer]) as cap:
        model(x.detach().to(module_device(model), module_dtype(model), copy=True))
        phi0 = cap[layer]
    return optimize_input(model, feature_match(layer, phi0), tuple(x.shape), init=init, **kwargs)
