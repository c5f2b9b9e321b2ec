"""Adversarial examples under an L-inf budget, batched: FGSM, PGD and the smallest budget that flips a prediction.

* :func:`fgsm` -- ``x' = x + eps * sign(grad_x J(x, y))`` (Goodfellow et al. 2015, sec. 4);
* :func:`pgd` -- ``x^{t+1} = Proj_{||x' - x||_inf <= eps}(x^t + alpha * sign(grad_x J(x^t, y)))`` from a
  seeded random start (Madry et al. 2018, Sec. 2.1: PGD on the inner maximization of their eq. 2.1);
* :func:`minimal_flip_budget` -- per image, the smallest ``eps`` for which the attack flips the
  prediction, by bisection over ``eps`` (all images bisected together, one attack per halving).

``J`` is the cross-entropy (``loss="ce"``) or the negated class score ``-S_c`` (``loss="score"``, plain gradient
ascent on the target's logit as in the fooling images of Szegedy et al. 2014 / Nguyen et al. 2015).
Untargeted attacks ascend ``J`` for the reference class (move away from it); targeted attacks descend it
for the target class (move toward it). ``epsilon`` may be one float
or one value per image (``Tensor[B]``), in the model's input space; with ``std`` (the per-channel std of the input
normalization ``x = (p - mean) / std``) it is in pixel units instead, as torchattacks, ART and foolbox take it on
``[0, 1]`` images: the ball ``||p' - p||_inf <= eps`` in pixel space is ``|x'_c - x_c| <= eps / std_c`` per channel in
input space, and a pixel-space step ``alpha sign(grad_p J)`` is ``alpha / std_c sign(grad_x J)``.
``bounds=(lo, hi)`` (see :func:`lightning_viz.methods.synthesis.valid_range`) keeps the images valid. Gradients are
taken with ``torch.autograd.grad`` w.r.t. the input only; run inside ``isolated(model)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import grad_enabled
from ..progress import progress
from .checks import check_classes, check_eval, check_images, check_logits, check_reaches_input, input_matches_model

__all__ = ["predict", "fgsm", "pgd", "is_flipped", "minimal_flip_budget"]


def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Arg-max class ``[B]`` (long) of each image of ``x[B, C, H, W]`` (no graph)."""
    with torch.no_grad():
        return _two_or_more(check_logits("adversarial attack", model(x), x.shape[0])).argmax(dim=1)


def _two_or_more(logits: Tensor) -> Tensor:
    """``logits``, unless they have one column: its arg-max is always 0 and its cross-entropy 0 (no attack could move
    or flip anything): a clear error pointing at the adapter that reads a one-logit head as two classes."""
    if logits.shape[1] == 1:
        raise ValueError(
            "adversarial attack: the model returns one logit [B, 1], whose arg-max is always class 0 and whose "
            "cross-entropy is 0 (nothing to attack, nothing can flip); a one-logit binary head is read as classes "
            "0 and 1 through lightning_viz.targets.model_adapter(model)"
        )
    return logits


def _per_image(value: float | Tensor, x: Tensor, std: Sequence[float] | Tensor | None = None) -> Tensor:
    """``[B, 1, 1, 1]`` budgets in input units, or ``[B, C, 1, 1]`` (``value / std_c``) for pixel-unit ``value``."""
    t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"need one epsilon per image ({x.shape[0]}); got shape {tuple(t.shape)}")
    if bool((t < 0).any()):
        raise ValueError(f"epsilon must be >= 0; got {t.tolist()}")
    t = t.view(-1, 1, 1, 1)
    if std is None:
        return t
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)
    if s.shape[1] not in (1, x.shape[1]) or bool((s <= 0).any()):
        raise ValueError(
            f"std must be positive, one value or one per channel ({x.shape[1]}); got {s.flatten().tolist()}"
        )
    return t / s


def _clamp(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    return torch.maximum(torch.minimum(x, hi), lo)


def _ball(x: Tensor, eps: Tensor, bounds: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Per-pixel ``(lo, hi)`` of the ``eps``-ball around ``x`` within ``bounds``: clamping to them is clamping to the
    ball, then to ``bounds`` (two clamps compose to the clamp between the second's images of the first's ends: the
    same selections, so the same bits), in two kernels per step instead of six."""
    lo, hi = x - eps, x + eps
    if bounds is not None:
        b_lo, b_hi = bounds[0].to(x), bounds[1].to(x)
        lo, hi = _clamp(lo, b_lo, b_hi), _clamp(hi, b_lo, b_hi)
    return lo, hi


def _project(x_adv: Tensor, x: Tensor, eps: Tensor, bounds: tuple[Tensor, Tensor] | None) -> Tensor:
    return _clamp(x_adv, *_ball(x, eps, bounds))


LossSpec = Literal["ce", "score"]


@grad_enabled()  # a normal tensor (the autograd steps read it) also from a caller's inference mode
def _attack_classes(classes: Tensor, x: Tensor, num_classes: int | None = None) -> Tensor:
    """``classes`` as ``long [B]`` on ``x``'s device, checked (indices below ``num_classes`` when given)."""
    return check_classes("adversarial attack", torch.as_tensor(classes, device=x.device), x.shape[0], num_classes)


@grad_enabled()  # also under a caller's torch.no_grad() / inference_mode()
def _loss_sign_grad(
    model: nn.Module, x: Tensor, classes: Tensor, targeted: bool, loss: LossSpec = "ce", checked: bool = False
) -> Tensor:
    """``sign`` of the direction that raises the attack's objective (ascent on ``J``, or descent when targeted).
    ``checked``: an earlier call checked this model, batch and ``classes`` (then ``long [B]`` on ``x``'s device), so
    the later steps of an attack skip the checks."""
    if not checked:
        check_images("adversarial attack", x)
        check_eval("adversarial attack", model)  # training-mode BatchNorm: mixed images, running statistics updated
    x = x.detach().clone().requires_grad_(True)
    with input_matches_model("adversarial attack", model, x):
        logits = _two_or_more(check_logits("adversarial attack", model(x), x.shape[0]))
    cls = classes if checked else _attack_classes(classes, x, logits.shape[-1])
    if loss == "ce":
        j = F.cross_entropy(logits, cls, reduction="sum")
    elif loss == "score":
        j = -logits.gather(1, cls.view(-1, 1)).sum()
    else:
        raise ValueError(f"unknown attack loss {loss!r}; allowed: 'ce', 'score'")
    check_reaches_input("adversarial attack", j.requires_grad)
    (g,) = torch.autograd.grad(j, [x])
    return -g.sign() if targeted else g.sign()


def fgsm(
    model: nn.Module,
    x: Tensor,
    classes: Tensor,
    epsilon: float | Tensor,
    targeted: bool = False,
    bounds: tuple[Tensor, Tensor] | None = None,
    loss: LossSpec = "ce",
    std: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015, Sec. 4): ``x[B, C, H, W]`` plus one signed-gradient step
    of size ``epsilon`` (a float or one per image ``[B]``; pixel units with ``std``, see the module docstring),
    clamped to ``bounds`` -> adversarial images ``[B, C, H, W]``, detached. ``classes`` ``[B]``: the class to move
    away from (untargeted, default) or toward (``targeted``); ``loss``: ``"ce"`` (default) or ``"score"``."""
    x = x.detach()
    return _fgsm_step(x, _loss_sign_grad(model, x, classes, targeted, loss), epsilon, bounds, std)


def _fgsm_step(
    x: Tensor,
    direction: Tensor,
    epsilon: float | Tensor,
    bounds: tuple[Tensor, Tensor] | None,
    std: Sequence[float] | Tensor | None,
) -> Tensor:
    """FGSM's image for the signed gradient ``direction`` at ``x``: one step of ``epsilon``, projected."""
    eps = _per_image(epsilon, x, std)
    return _project(x + eps * direction, x, eps, bounds).detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    classes: Tensor,
    epsilon: float | Tensor,
    steps: int = 10,
    step_size: float | Tensor | None = None,
    targeted: bool = False,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
    start: Tensor | None = None,
    loss: LossSpec = "ce",
    std: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Projected gradient descent in the L-inf ball (Madry et al. 2018): ``steps`` signed steps of
    ``step_size`` (default ``2.5 * epsilon / steps``), each projected back into the ball and ``bounds``,
    starting from ``x`` plus uniform noise in the ball drawn from ``generator`` (``random_start``; ``None``: a
    fresh CPU generator seeded 0, never the global RNG), or
    from ``x + start * epsilon`` for given noise ``start`` in ``[-1, 1]`` shaped like ``x``. With ``std``,
    ``epsilon`` and ``step_size`` are in pixel units (module docstring)."""
    if steps < 1:
        raise ValueError(f"pgd needs steps >= 1; got {steps}")
    check_images("pgd", x)  # before the random start, which would broadcast one image [C, H, W] to C images
    x = x.detach()
    eps = _per_image(epsilon, x, std)
    alpha = 2.5 * eps / steps if step_size is None else _per_image(step_size, x, std)
    lo, hi = _ball(x, eps, bounds)  # once: each step clamps to them
    x_adv = x.clone()
    if random_start or start is not None:
        if start is None:
            if generator is None:  # never the global RNG: the same start on every call
                generator = torch.Generator().manual_seed(0)
            start = 2 * torch.rand(x.shape, generator=generator, device=generator.device, dtype=x.dtype) - 1
        x_adv = _clamp(x + start.to(x) * eps, lo, hi)
    for step in range(steps):
        progress(step, steps, "PGD steps")  # a line every few seconds inside a callback run (rank 0)
        # the first step checks the model, images and classes; the others reuse them
        direction = _loss_sign_grad(model, x_adv, classes, targeted, loss, checked=step > 0)
        if step == 0:
            classes = _attack_classes(classes, x)  # as the first step took them (their range checked there)
        x_adv = _clamp(x_adv + alpha * direction, lo, hi)
    return x_adv.detach()


def is_flipped(pred: Tensor, classes: Tensor, targeted: bool) -> Tensor:
    """Attack success per image, bool ``[B]``: the prediction ``pred[B]`` left ``classes[B]`` (untargeted) or reached
    it (targeted)."""
    classes = classes.to(pred.device)
    return pred == classes if targeted else pred != classes


def minimal_flip_budget(
    model: nn.Module,
    x: Tensor,
    classes: Tensor,
    max_epsilon: float,
    iterations: int = 8,
    attack: Literal["fgsm", "pgd"] = "fgsm",
    steps: int = 5,
    targeted: bool = False,
    bounds: tuple[Tensor, Tensor] | None = None,
    loss: LossSpec = "ce",
    std: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """Smallest L-inf budget (to a precision of ``max_epsilon / 2^iterations``) with which ``attack`` flips
    each image, on all images at once: a scan of the budgets ``k max_epsilon / 4`` (k = 1..4) picks the first
    quarter that flips, bisection narrows it down. ``inf`` where none of the scanned budgets flips. Flipping
    need not be monotone in ``epsilon`` (FGSM's direction is fixed: a large step can overshoot the other
    class's region and clamping changes it), so ``max_epsilon`` alone may fail where a smaller budget flips;
    the scan finds those (ART's ``FastGradientMethod(minimal=True)`` scans every step). Where flipping is
    monotone this is plain bisection over ``[0, max_epsilon]``. PGD runs without random start here, so the
    search is deterministic. Costs ``iterations + 2`` attacks (``iterations + 1`` for ``iterations < 2``) and a
    forward each to check them: FGSM's signed gradient at ``x`` is the same for every budget, so it is taken once
    (one forward + backward in all); PGD's attacks take ``steps`` forward/backward passes each. With ``std``,
    budgets are in pixel units (module docstring)."""
    if max_epsilon <= 0 or iterations < 0:
        raise ValueError(f"need max_epsilon > 0 and iterations >= 0; got {max_epsilon}, {iterations}")
    if attack not in ("fgsm", "pgd"):
        raise ValueError(f"unknown attack {attack!r}; allowed: 'fgsm', 'pgd'")

    x = x.detach()
    direction = _loss_sign_grad(model, x, classes, targeted, loss) if attack == "fgsm" else None

    def flips(eps: Tensor) -> Tensor:
        if direction is not None:  # fgsm(model, x, ..., eps) without taking the same gradient again
            adv = _fgsm_step(x, direction, eps, bounds, std)
        else:
            adv = pgd(
                model,
                x,
                classes,
                eps,
                steps=steps,
                targeted=targeted,
                random_start=False,
                bounds=bounds,
                loss=loss,
                std=std,
            )
        return is_flipped(predict(model, adv), classes, targeted)

    b = x.shape[0]
    scan = min(2, iterations)  # halvings the scan of 2^scan budgets replaces
    hi = torch.full((b,), float("inf"), device=x.device, dtype=x.dtype)
    total = 2**scan + iterations - scan  # attacks: a progress line every few seconds inside a callback run
    for k in range(2**scan, 0, -1):  # largest first: the smallest flipping budget is written last
        progress(2**scan - k, total, "min-flip search attacks")
        eps = torch.full_like(hi, float(max_epsilon) * k / 2**scan)
        hi = torch.where(flips(eps), eps, hi)
    ok = torch.isfinite(hi)
    lo = torch.where(ok, hi - float(max_epsilon) / 2**scan, torch.zeros_like(hi))
    already = is_flipped(predict(model, x), classes, targeted)
    ok = ok | already
    hi = torch.where(already, torch.zeros_like(hi), torch.where(ok, hi, torch.full_like(hi, float(max_epsilon))))
    lo = torch.where(already, hi, lo)
    for it in range(iterations - scan):
        progress(2**scan + it, total, "min-flip search attacks")
        mid = (lo + hi) / 2
        f = flips(mid)
        hi = torch.where(f, mid, hi)
        lo = torch.where(f, lo, mid)
    return torch.where(ok, hi, torch.full_like(hi, float("inf")))
