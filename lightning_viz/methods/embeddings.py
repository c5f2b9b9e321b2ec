"""Embeddings: a layer's features for the probe set, 2-D projections and class-separation scores.

* features: the output of a chosen layer (conv maps are averaged over space), or by default the
  *penultimate* features = the input of the last ``nn.Linear`` called in the forward (whatever order the layers
  were defined in; recorded with forward pre-hooks);
* :func:`pca_2d`: principal components by SVD of the centered features (Pearson 1901; exact and
  deterministic, signs fixed so the plot does not flip between epochs);
* :func:`tsne_2d`: t-SNE (van der Maaten & Hinton, JMLR 2008), exact and deterministic in torch for probe-set
  sizes (:func:`joint_probabilities`, :func:`tsne_exact`), scikit-learn's Barnes-Hut beyond;
* :func:`silhouette` (Rousseeuw 1987, ``s = (b - a) / max(a, b)`` averaged) and :func:`knn_accuracy`
  (leave-one-out k-nearest-neighbour accuracy) measure how well classes separate;
* :func:`scatter_image`: the 2-D points colored by class with a legend, drawn with PIL.
"""

from __future__ import annotations

import inspect
import math
import numbers
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import lru_cache, partial
from typing import Any

import torch
from torch import Tensor, nn

from ..capture import capture, one_thread
from ..layers import LayerNotFoundError, get_layer, last_called_linear, linear_layer_names, unwrap_model
from ..progress import progress
from .checks import check_chunk_size, check_eval

__all__ = [
    "penultimate_layer",
    "extract_features",
    "pca_2d",
    "pca_variance_ratio",
    "tsne_2d",
    "silhouette",
    "knn_accuracy",
    "scatter_image",
]


def penultimate_layer(model: nn.Module, x: Tensor | None = None) -> str:
    """Name of the last ``nn.Linear`` called in one no-grad forward of ``x`` (its *input* is the penultimate feature
    vector), whatever order the layers were defined in; without ``x`` the last one defined."""
    if not linear_layer_names(model):
        raise LayerNotFoundError(
            f"{type(unwrap_model(model)).__name__} has no nn.Linear layer, "
            "so the penultimate features cannot be found; "
            "pass layers=<name> (any layer from model.named_modules(), conv maps are averaged over space)."
        )
    name = last_called_linear(model, x)
    if name is None:
        raise LayerNotFoundError(
            f"no nn.Linear of {type(unwrap_model(model)).__name__} is called in its forward, so the penultimate "
            "features (the input of the last one called) cannot be found; pass layers=<name> of the layer whose "
            "output to use (any layer from model.named_modules(), conv maps are averaged over space)."
        )
    return name


def _keep_input(seen: list[Tensor], module: nn.Module, inputs: tuple) -> None:
    seen[:] = [inputs[0].detach().clone()]


def extract_features(
    model: nn.Module, x: Tensor, layer: str | None = None, batch_size: int | None = 256
) -> tuple[Tensor, Tensor]:
    """``(features[B, D], logits[B, K])`` of ``x``; no autograd.

    ``layer=None``: the input of the last linear layer called in the forward (penultimate features). Otherwise the
    output of ``layer``; ``[B, C, h, w]`` maps are averaged over ``h, w``, other shapes flattened. The model must be
    in eval mode (:func:`~lightning_viz.methods.checks.check_eval`). ``batch_size`` images per forward (``None``: all
    at once; as :func:`~lightning_viz.methods.checks.check_chunk_size` allows).
    """
    check_eval("extract_features", model)
    batch_size = check_chunk_size(batch_size, option="batch_size") or max(1, x.shape[0])
    feats, logits = [], []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            if layer is None:
                seen: list[Tensor] = []  # the input of the latest nn.Linear called
                handles = [
                    get_layer(model, n).register_forward_pre_hook(partial(_keep_input, seen))
                    for n in linear_layer_names(model)
                ]
                try:
                    out = model(xb)
                finally:
                    for h in handles:
                        h.remove()
                if not seen:
                    raise ValueError(
                        "no nn.Linear is called in the model's forward, so the penultimate features (the input of the "
                        "last one called) cannot be found; pass layers=<name> of the layer whose output to use."
                    )
                f = seen[-1]
            else:
                with capture(model, [layer]) as cap:
                    out = model(xb)
                    f = cap[layer]
            f = f.float().mean(dim=(2, 3)) if f.ndim == 4 else f.float().flatten(1)
            feats.append(f)
            logits.append(out.float())
            progress(s + xb.shape[0], x.shape[0], "probe images")  # a line every few seconds inside a callback run
    return torch.cat(feats), torch.cat(logits)


def pca_2d(features: Tensor, dims: int = 2) -> Tensor:
    """``[N, D]`` -> ``[N, dims]`` scores on the leading principal axes (PCA, Pearson 1901; the SVD's right singular
    vectors of the centered data, from the eigenvectors of its smaller Gram matrix).

    Each axis's sign is fixed so that its largest-magnitude loading is positive (stable across epochs).
    Missing dimensions (``N`` or ``D`` < dims) are zero. Probe-set sizes (up to 2^20 values) on one torch
    thread: MKL's threaded SVD of 128 x 64 was measured ~100x slower than one thread on a loaded 2-core machine
    (the separation scores likewise).
    """
    _check_finite("pca_2d", features)
    with _one_thread_if_small(features.numel()):
        return _pca_scores(features, dims).float()


def _check_labels(fn: str, n: int, labels: Tensor) -> None:
    """One label per point (any shape holding ``n`` values, e.g. ``[N]`` or ``[N, 1]``), or a clear error."""
    if labels.numel() != n:
        raise ValueError(f"{fn}: labels must hold one label per point: got {labels.numel()} for {n} points")


def _check_finite(fn: str, features: Tensor) -> None:
    """A projection of non-finite features has no meaning (and the SVD fails for all rows): name the rows."""
    bad = (~features.detach().isfinite()).reshape(features.shape[0], -1).any(dim=1).nonzero().flatten()
    if bad.numel():
        raise ValueError(
            f"{fn}: the features of rows {bad[:8].tolist()} are not finite (NaN/inf inputs or weights); "
            "leave those rows out (the embedding callback does)"
        )


def pca_variance_ratio(features: Tensor, scores: Tensor | None = None, dims: int = 2) -> list[float]:
    """The fraction of the features' variance on each of the ``dims`` leading principal axes (scikit-learn's
    ``PCA.explained_variance_ratio_``; 0 for missing axes and for features without variance): how much of the
    point cloud a :func:`pca_2d` scatter shows. ``scores``: the features' :func:`pca_2d` when at hand (no second
    decomposition: an axis's variance is its scores' squared norm)."""
    _check_finite("pca_variance_ratio", features)
    f = features.detach().double()
    f = f - f.mean(0, keepdim=True)
    total = float(f.square().sum())
    if scores is None:
        with _one_thread_if_small(features.numel()):
            scores = _pca_scores(f, dims)
    ratio = (scores[:, :dims].double().square().sum(0) / total).tolist() if total > 0 else []
    return (ratio + [0.0] * dims)[:dims]


def _pca_scores(features: Tensor, dims: int = 2) -> Tensor:
    """:func:`pca_2d` in float64. The leading axes come from the eigenvectors of the smaller of ``f f^T`` and
    ``f^T f`` (the right singular vectors of the SVD, equal to rounding): a full SVD of 1024 probes x 2048 features
    (a ResNet-50's pooled features) took 5x the CPU time on one thread and 10x more on two busy cores."""
    f = features.double()
    f = f - f.mean(0, keepdim=True)
    n, d = f.shape
    k = min(dims, n, d)
    if n <= d:  # u: the left singular vectors, vh = u^T f / s
        evals, evecs = torch.linalg.eigh(f @ f.t())
        u, s = evecs[:, -k:].flip(1), evals[-k:].flip(0).clamp_min(0).sqrt()
        vh = (u.t() @ f) / torch.where(s > 0, s, 1).unsqueeze(1)
    else:
        vh = torch.linalg.eigh(f.t() @ f)[1][:, -k:].flip(1).t()
    # an axis without variance (rank below ``dims``): zero scores, as the SVD's arbitrary axis gives
    vh = vh * (torch.linalg.vector_norm(f @ vh.t(), dim=0) > 1e-12 * max(1.0, float(f.abs().max()))).unsqueeze(1)
    signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True))).clamp_min(0) * 2 - 1
    proj = f @ (vh * signs).t()
    if proj.shape[1] < dims:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], dims - proj.shape[1])], 1)
    return proj


#: t-SNE gradient-descent iterations by default: 250 early-exaggeration + 250 more (sklearn's default is 1000)
TSNE_ITERATIONS = 500
#: Largest probe set embedded with the exact O(N^2) t-SNE in torch; larger ones go to scikit-learn's Barnes-Hut.
#: Measured (500 iterations, one thread) on CNN, digit and clustered features: up to 512 points the exact one is
#: as trustworthy, separates classes as well (silhouette) and has a lower KL, in 0.3-0.7x the CPU time; at 1000 it
#: was still faster (0.6x) but its 2-D silhouette 0.03 lower on 2 of 3 sets, and float64 N x N matrices leave
#: the CPU caches (break-even in time near 1500 points even in float32).
TSNE_EXACT_MAX_POINTS = 512

_EXAGGERATION = 12.0  # early exaggeration (van der Maaten & Hinton 2008, sec. 3.4; sklearn's default)
_EXPLORATION_ITERS = 250  # iterations with exaggerated P and momentum 0.5 (sklearn's _EXPLORATION_MAX_ITER)
_CHECK_EVERY = 50  # convergence checks as sklearn's _gradient_descent: every 50 iterations
_MIN_GRAD_NORM = 1e-7
_MACHINE_EPSILON = float(torch.finfo(torch.float64).eps)


def conditional_probabilities(sq_distances: Tensor, perplexity: float, steps: int = 100) -> Tensor:
    """``p_{j|i}`` (van der Maaten & Hinton 2008, eq. 1) with each row's Gaussian precision ``beta_i = 1 / 2 sigma_i^2``
    found by bisection so that the row's entropy is ``log(perplexity)`` (sec. 2), all rows at once.

    ``sq_distances``: ``[N, N]`` squared distances. The same search as scikit-learn's
    ``_binary_search_perplexity`` (start ``beta = 1``, double/halve until bracketed, then bisect; a row stops
    when ``|H - log(perplexity)| <= 1e-5``, at most ``steps`` steps); the diagonal is 0. float64.
    """
    d = sq_distances.double()
    n = d.shape[0]
    target = math.log(perplexity)
    tol = 9.99999974737875e-06  # sklearn's PERPLEXITY_TOLERANCE, a C float 1e-5
    beta = d.new_ones(n)
    lo = d.new_full((n,), -math.inf)
    hi = d.new_full((n,), math.inf)
    active = torch.ones(n, dtype=torch.bool, device=d.device)
    neg_d, p, dp = -d, d.new_zeros(n, n), d.new_empty(n, n)  # each step writes into p and dp
    for _ in range(steps):
        torch.mul(neg_d, beta[:, None], out=p).exp_().fill_diagonal_(0.0)
        s = p.sum(1)
        s = torch.where(s == 0, s.new_tensor(1e-8), s)
        p /= s[:, None]
        entropy = torch.log(s) + beta * torch.mul(d, p, out=dp).sum(1)
        diff = entropy - target
        active &= diff.abs() > tol  # converged rows keep their beta (and so their p) from now on
        if not bool(active.any()):
            break
        up = active & (diff > 0)  # entropy too high: sharper Gaussian (larger beta)
        down = active & (diff <= 0)
        lo = torch.where(up, beta, lo)
        hi = torch.where(down, beta, hi)
        beta = torch.where(
            up,
            torch.where(torch.isinf(hi), beta * 2, (beta + hi) / 2),
            torch.where(down, torch.where(torch.isinf(lo), beta / 2, (beta + lo) / 2), beta),
        )
    return p


def squared_distances(features: Tensor) -> Tensor:
    """``[N, N]`` squared Euclidean distances (``|a|^2 + |b|^2 - 2 a.b``, clamped at 0, zero diagonal), in the
    features' dtype (float32 or float64; others as float64)."""
    f = features if features.dtype in (torch.float32, torch.float64) else features.double()
    sq = (f * f).sum(1)
    d = torch.addmm(sq, f, f.t(), alpha=-2.0).add_(sq[:, None]).clamp_min_(0.0)
    return d.fill_diagonal_(0.0)


def joint_probabilities(sq_distances: Tensor, perplexity: float) -> Tensor:
    """Symmetric ``P``: ``p_ij = (p_{j|i} + p_{i|j}) / sum`` (van der Maaten & Hinton 2008, sec. 3.1) from
    ``[N, N]`` squared distances, floored at machine epsilon off the diagonal like scikit-learn's
    ``_joint_probabilities``; ``[N, N]`` float64 with a zero diagonal."""
    cond = conditional_probabilities(sq_distances, perplexity)
    p = cond + cond.t()
    p /= p.sum().clamp_min(_MACHINE_EPSILON)
    return p.clamp_min_(_MACHINE_EPSILON).fill_diagonal_(0.0)


def _kl_divergence(p: Tensor, y: Tensor) -> float:
    """``KL(P || Q) = sum_ij p_ij log(p_ij / q_ij)`` with Student-t ``q`` (eq. 4), ``q`` floored at machine eps."""
    w = squared_distances(y).add_(1.0).reciprocal_().fill_diagonal_(0.0)
    q = (w / w.sum()).clamp_min_(_MACHINE_EPSILON).fill_diagonal_(1.0)  # diagonal: p_ii = 0 adds nothing
    return float((p * torch.log(p.clamp_min(_MACHINE_EPSILON) / q)).sum())


def tsne_exact(
    p: Tensor, init: Tensor, iterations: int = TSNE_ITERATIONS, learning_rate: float | None = None
) -> tuple[Tensor, float, int]:
    """Exact t-SNE (van der Maaten & Hinton, JMLR 2008) by gradient descent on ``KL(P || Q)`` with the exact
    gradient of eq. 5, ``dC/dy_i = 4 sum_j (p_ij - q_ij)(y_i - y_j)(1 + |y_i - y_j|^2)^-1``, on ``[N, N]`` matrices.

    The optimizer is scikit-learn's ``TSNE`` (``_tsne`` / ``_gradient_descent``): ``P`` exaggerated 12x for the
    first 250 iterations with momentum 0.5, then momentum 0.8 (update and gains restart); delta-bar-delta gains
    (+0.2 / x0.8, at least 0.01; Jacobs 1988); learning rate ``max(N / 12 / 4, 50)`` ("auto"); stop early when
    the gain-scaled gradient norm is <= 1e-7 or the KL has not improved for 250 (exploration) / 300 iterations,
    checked every 50. ``p``: :func:`joint_probabilities`; ``init``: ``[N, 2]``. No randomness: a given input
    gives bit-identical output (for a given number of torch threads). Runs in ``p``'s dtype. Returns
    ``(Y [N, 2], KL divergence, iterations run)``.
    """
    y, kl, it = _tsne_steps(p, init, iterations, learning_rate)
    return y.clone(memory_format=torch.contiguous_format), kl, it  # an ordinary tensor, out of inference mode


@torch.inference_mode()  # no autograd bookkeeping on the ~17 small ops of a step: ~7% of the time
def _tsne_steps(p: Tensor, init: Tensor, iterations: int, learning_rate: float | None) -> tuple[Tensor, float, int]:
    """:func:`tsne_exact`'s gradient descent, in inference mode: ``(Y^T [2, N] view, KL, iterations run)``."""
    n = p.shape[0]
    # Coordinates as rows of a [3, N] array whose last row is ones: one (3 x N) @ (N x N) product gives
    # (M Y)^T and M's row sums (M is symmetric), and runs ~3x faster than (N x N) @ (N x 3) with MKL.
    ya = torch.ones(3, n, dtype=p.dtype, device=p.device)
    ya[:2] = init.t()
    yt, y0, y1 = ya[:2], ya[0], ya[1]
    # Every step writes into these (no allocation; each op at probe-set sizes is a few us, mostly overhead).
    sq, sq1 = p.new_empty(n), p.new_empty(n)
    w, m = p.new_empty(n, n), p.new_empty(n, n)
    my, g, ug = p.new_empty(3, n), p.new_empty(2, n), p.new_empty(2, n)
    sq1_col, my_xy, my_sum, y_col = sq1[:, None], my[:2], my[2:], yt.t()
    lr = max(n / _EXAGGERATION / 4.0, 50.0) if learning_rate is None else float(learning_rate)
    it = 0
    kl = math.inf
    for phase, (pmat, momentum, stop_at, patience) in enumerate(
        (
            (p * _EXAGGERATION, 0.5, min(_EXPLORATION_ITERS, iterations), _EXPLORATION_ITERS),
            (p, 0.8, iterations, 300),
        )
    ):
        if phase == 1 and it >= stop_at:
            break
        update = torch.zeros_like(yt)
        gains = torch.ones_like(yt)
        step_gains = _gains_step(update, g, gains, ug)
        best, best_it = math.inf, it
        i = it
        for i in range(it, stop_at):
            # W = (1 + |y_i - y_j|^2)^-1 (zero diagonal), q_ij = w_ij / Z, M = (P - Q) * W (eq. 5);
            # g = (M Y)_i - y_i sum_j M_ij = -grad_i / 4.
            torch.mul(y0, y0, out=sq).addcmul_(y1, y1)
            torch.add(sq, 1.0, out=sq1)
            torch.add(sq1_col, sq, out=w).addmm_(y_col, yt, alpha=-2.0).reciprocal_()
            w.fill_diagonal_(0.0)
            torch.add(pmat, w, alpha=-1.0 / float(w.sum()), out=m).mul_(w)
            torch.matmul(ya, m, out=my)
            torch.addcmul(my_xy, yt, my_sum, value=-1.0, out=g)
            step_gains()
            update.mul_(momentum).addcmul_(gains, g, value=4.0 * lr)  # update = momentum update - lr gains grad
            yt.add_(update)
            if (i + 1) % _CHECK_EVERY == 0 or i == stop_at - 1:
                progress(i + 1, iterations, "t-SNE iterations")  # a line every few seconds inside a callback run
                kl = _kl_divergence(pmat, yt.t())
                if (i + 1) % _CHECK_EVERY == 0:
                    if kl < best:
                        best, best_it = kl, i
                    elif i - best_it > patience:
                        break
                    if 4.0 * float(torch.linalg.vector_norm(gains * g)) <= _MIN_GRAD_NORM:
                        break
        it = i + 1
    return yt.t(), kl, it


def _gains_step(
    update: Tensor, g: Tensor, gains: Tensor, scratch: Tensor, use_numpy: bool | None = None
) -> Callable[[], None]:
    """A step of delta-bar-delta gains (Jacobs 1988) in place: ``gains + 0.2`` where ``update * g > 0`` (the
    gradient's sign differs from the last update's), else ``gains * 0.8``, at least 0.01. On the CPU
    (``use_numpy=None``) in numpy on views of the tensors: the same bits in ~3 us against ~7 us of torch ops on
    ``[2, N]`` at probe-set sizes."""
    if not (gains.device.type == "cpu" if use_numpy is None else use_numpy):
        grow = torch.empty(gains.shape, dtype=torch.bool, device=gains.device)

        def torch_step() -> None:
            torch.gt(torch.mul(update, g, out=scratch), 0.0, out=grow)
            torch.where(grow, gains + 0.2, gains * 0.8, out=gains).clamp_(min=0.01)

        return torch_step
    import numpy as np

    u, gr, ga, s = update.numpy(), g.numpy(), gains.numpy(), scratch.numpy()
    up, down = np.empty(ga.shape, dtype=bool), np.empty(ga.shape, dtype=bool)

    def numpy_step() -> None:
        np.greater(np.multiply(u, gr, out=s), 0.0, out=up)
        np.logical_not(up, out=down)
        np.multiply(ga, 0.8, out=ga, where=down)
        np.add(ga, 0.2, out=ga, where=up)
        np.maximum(ga, 0.01, out=ga)

    return numpy_step


def tsne_2d(features: Tensor, seed: int = 0, perplexity: float = 30.0, iterations: int = TSNE_ITERATIONS) -> Tensor:
    """t-SNE to 2-D (van der Maaten & Hinton, JMLR 2008): ``iterations`` >= 250 gradient steps, the first 250
    with early exaggeration; perplexity capped below ``N / 3`` for small probe sets. ``[N, D]`` -> ``[N, 2]``.

    Up to :data:`TSNE_EXACT_MAX_POINTS` points: :func:`tsne_exact` in torch -- the exact gradient (eq. 5) with
    scikit-learn's optimizer and its ``init="pca"`` (PCA scores scaled to a first-axis std of 1e-4), float64, on
    one torch thread. No randomness: the same features give bit-identical output and no global RNG is touched;
    only features of rank < 2 (a line would stay a tangled line) start from sklearn's ``init="random"``,
    ``1e-4 * N(0, 1)`` from a local generator seeded with ``seed``. Measured against scikit-learn's Barnes-Hut
    ``TSNE`` (500 iterations) on 128-512 CNN, digit and clustered features: trustworthiness within 0.003 (or
    better), silhouette as good, KL divergence as low or lower, ~3x less CPU at N = 128. Larger sets:
    scikit-learn's Barnes-Hut ``TSNE`` (seeded with ``seed``, one OpenMP thread) as before.
    """
    _check_finite("tsne_2d", features)
    if not (math.isfinite(perplexity) and perplexity > 0):  # was: 0, < 0 and NaN ran with perplexity 1
        raise ValueError(f"tsne_2d: perplexity must be a finite number > 0; got {perplexity}")
    if iterations < 250:
        raise ValueError(f"t-SNE needs iterations >= 250 (the early-exaggeration phase); got {iterations}")
    n = features.shape[0]
    if n < 3:
        return torch.zeros(n, 2)
    perp = float(max(1.0, min(perplexity, (n - 1) / 3)))
    if n > TSNE_EXACT_MAX_POINTS:
        return _tsne_sklearn(features, seed, perp, iterations)
    f = features.detach().cpu().double()
    with one_thread(), torch.inference_mode():  # no autograd dispatch; the float32 copy returned is made outside
        init = _pca_scores(f, 2)
        std = init.std(0, correction=0)
        if float(std[1]) <= 1e-12 * float(std[0]):  # rank < 2 (1-D, equal points): a line stays a tangled line
            init = torch.randn(n, 2, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
        init = init / init[:, 0].std(correction=0) * 1e-4
        p = joint_probabilities(squared_distances(f), perp)
        y, _, _ = tsne_exact(p, init, iterations)
    return y.float()


def _one_thread_if_small(numel: int) -> AbstractContextManager[None]:
    """:func:`~lightning_viz.capture.one_thread` for work on up to 2^20 values (probe-set sizes), else nothing."""
    return one_thread() if numel <= 2**20 else nullcontext()


def _tsne_sklearn(features: Tensor, seed: int, perplexity: float, iterations: int) -> Tensor:
    """scikit-learn's Barnes-Hut ``TSNE`` (seeded; PCA init, random init for 1-D features) on one OpenMP thread:
    its default thread pool competing with the training process's threads was measured 15x slower."""
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    init = "pca" if features.shape[1] >= 2 else "random"
    with threadpool_limits(limits=1), _reporting_bh_steps(iterations):
        key = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"  # n_iter: sklearn < 1.5
        tsne = TSNE(n_components=2, perplexity=perplexity, init=init, random_state=seed, **{key: int(iterations)})
        emb = tsne.fit_transform(features.detach().cpu().double().numpy())
    return torch.as_tensor(emb, dtype=torch.float32)


_BH_PATCH = threading.Lock()


@contextmanager
def _reporting_bh_steps(iterations: int) -> Iterator[None]:
    """Inside the block, each gradient step of scikit-learn's Barnes-Hut ``TSNE`` (one call of its objective,
    ``sklearn.manifold._t_sne._kl_divergence_bh``) counts, and every :data:`_CHECK_EVERY` steps and the last go to
    :func:`progress` as :func:`tsne_exact`'s do (a line inside a callback run; its stop check). scikit-learn has no
    callback: the module's objective is wrapped for the block (one block at a time), then put back; a scikit-learn
    that names it otherwise runs as it is, without lines."""
    from sklearn.manifold import _t_sne

    with _BH_PATCH:  # read and put back under the lock: a concurrent block never wraps this one's wrapper
        objective = getattr(_t_sne, "_kl_divergence_bh", None)
        if objective is None:
            yield
            return
        steps, owner = 0, threading.get_ident()

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal steps
            if threading.get_ident() == owner:  # another thread's scikit-learn t-SNE meanwhile: not counted
                steps += 1
                if steps % _CHECK_EVERY == 0 or steps == iterations:
                    progress(steps, iterations, "t-SNE iterations")  # a line every few seconds inside a callback run
            return objective(*args, **kwargs)

        _t_sne._kl_divergence_bh = counted
        try:
            yield
        finally:
            _t_sne._kl_divergence_bh = objective


def silhouette(features: Tensor, labels: Tensor) -> float:
    """Mean silhouette coefficient in ``[-1, 1]`` of ``features[N, D]`` grouped by ``labels[N]`` (Rousseeuw 1987) with
    Euclidean distance, as scikit-learn's
    ``silhouette_score``: ``s_i = (b_i - a_i) / max(a_i, b_i)`` with ``a_i`` the mean distance to the other
    points of its class and ``b_i`` the smallest mean distance to another class; 0 for a class of one point.
    NaN unless 2 <= #classes <= N - 1. float64 torch (no scikit-learn import)."""
    n = features.shape[0]
    _check_labels("silhouette", n, labels)
    classes, inv, counts = torch.unique(labels.cpu().reshape(-1), return_inverse=True, return_counts=True)
    if not 2 <= classes.numel() <= n - 1:
        return float("nan")
    f = features.detach().cpu().double().reshape(n, -1)
    with _one_thread_if_small(n * max(n, f.shape[1])):
        d = squared_distances(f).sqrt_()
        sums = d.new_zeros(n, classes.numel()).index_add_(1, inv, d)  # [N, K]: distance sums to each class
        size = counts[inv].double()
        a = sums.gather(1, inv[:, None]).squeeze(1) / (size - 1).clamp_min(1)
        b = (sums / counts.double()).scatter_(1, inv[:, None], math.inf).amin(1)
        s = torch.where(size > 1, (b - a) / torch.maximum(a, b), torch.zeros_like(a))
        return float(torch.nan_to_num(s, nan=0.0).mean())  # a = b = 0 (coincident points): 0 as sklearn


def knn_accuracy(features: Tensor, labels: Tensor, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy of ``features[N, D]`` in ``[0, 1]`` (Euclidean; majority vote of the ``k``=5
    nearest, ties to the nearer neighbour's class); ``labels[N]`` may be any integers (as scikit-learn's, e.g. -1 or
    sparse ids)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"knn_accuracy: k must be a whole number >= 1; got {k!r}")
    n = features.shape[0]
    _check_labels("knn_accuracy", n, labels)
    if n < 2:
        return float("nan")
    k = min(int(k), n - 1)
    features, labels = features.detach().cpu(), labels.cpu()  # [N, N] work, small: on the CPU like silhouette
    with _one_thread_if_small(n * max(n, features[0].numel())):
        d = torch.cdist(features.double(), features.double())
        d.fill_diagonal_(float("inf"))
        nn_idx = torch.sort(d, dim=1, stable=True).indices[:, :k]  # [N, k], nearest first
    _, labels = torch.unique(labels.reshape(-1), return_inverse=True)  # any label values (-1, 1000): 0..K-1
    nn_lab = labels[nn_idx]
    votes = torch.zeros(n, int(labels.max()) + 1, dtype=torch.long).scatter_add_(1, nn_lab, torch.ones_like(nn_lab))
    # Among the most-voted classes, the one of the nearest neighbour: the first neighbour whose class has max votes.
    top = votes.gather(1, nn_lab) == votes.amax(1, keepdim=True)
    pred = nn_lab.gather(1, top.int().argmax(1, keepdim=True)).squeeze(1)
    return float((pred == labels).double().mean())


#: matplotlib's "tab10" colors, class by class (cycled past 10 classes).
_TAB10 = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
)
_DOT_STEPS = 4  # dot positions to a quarter pixel: one antialiased mask per sub-pixel offset


@lru_cache(maxsize=4)
def _dot_masks(radius: float) -> tuple[tuple[Any, ...], ...]:
    """PIL ``"L"`` masks of a disc of ``radius`` px, antialiased (coverage of 8 x 8 samples per pixel), centred at
    ``(c + i / 4, c + j / 4)`` for ``c = ceil(radius)``: ``masks[i][j]``, pasted with the top-left at
    ``(floor(x) - c, floor(y) - c)``."""
    import numpy as np
    from PIL import Image

    c = math.ceil(radius)
    size = 2 * c + 2
    sub = (np.arange(size * 8) + 0.5) / 8  # sample positions, in pixels
    out = []
    for i in range(_DOT_STEPS):
        row = []
        for j in range(_DOT_STEPS):
            dx = sub[None, :] - (c + i / _DOT_STEPS)
            dy = sub[:, None] - (c + j / _DOT_STEPS)
            inside = (dx * dx + dy * dy <= radius * radius).astype(np.float64)
            cover = inside.reshape(size, 8, size, 8).mean(axis=(1, 3))
            row.append(Image.fromarray(np.round(cover * 255).astype(np.uint8), "L"))
        out.append(tuple(row))
    return tuple(out)


def _paste_dot(img: Any, x: float, y: float, radius: float, color: tuple[int, int, int]) -> None:
    """An antialiased disc of ``color`` centred at pixel coordinates ``(x, y)`` (pixel ``i`` spans ``[i, i+1)``)."""
    ix, iy = math.floor(x), math.floor(y)
    qx = min(_DOT_STEPS - 1, round((x - ix) * _DOT_STEPS))
    qy = min(_DOT_STEPS - 1, round((y - iy) * _DOT_STEPS))
    c = math.ceil(radius)
    img.paste(color, (ix - c, iy - c), _dot_masks(radius)[qx][qy])


def _nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> tuple[list[float], int]:
    """Tick values at a 1-2-2.5-5 x 10^k step inside ``[lo, hi]`` (at most ``max_ticks``) and their decimals."""
    raw = (hi - lo) / max_ticks
    exp = math.floor(math.log10(raw))
    step = next(m * 10.0**exp for m in (1.0, 2.0, 2.5, 5.0, 10.0) if m * 10.0**exp >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = [(first + i) * step for i in range(int((hi - lo) / step + 1e-9) + 2)]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) + (1 if round(step / 10.0**exp, 6) == 2.5 else 0)
    return [t for t in ticks if lo - 1e-9 * step <= t <= hi + 1e-9 * step], decimals


def _tick_label(v: float, decimals: int) -> str:
    if v != 0 and not 1e-3 <= abs(v) < 1e5:
        return f"{v:.2g}"
    text = f"{v:.{min(decimals, 6)}f}"
    return "0" if float(text) == 0 else text


def _text(draw: Any, xy: tuple[float, float], text: str, font: Any, anchor: str, fill=(0, 0, 0)) -> None:
    try:
        draw.text(xy, text, fill=fill, font=font, anchor=anchor)
    except ValueError:  # a bitmap font (old Pillow without FreeType) has no anchors: top-left, shifted by hand
        w, h = draw.textlength(text, font=font), 11
        dx = {"l": 0, "m": -w / 2, "r": -w}[anchor[0]]
        dy = {"a": 0, "t": 0, "m": -h / 2, "s": -h, "b": -h, "d": -h}[anchor[1]]
        draw.text((xy[0] + dx, xy[1] + dy), text, fill=fill, font=font)


#: Most classes :func:`scatter_image` names in its legend, each in a color of its own (tab10, then tab20's light
#: variants); with more, the first 18 classes are colored and named (the grays left out) and the others drawn in
#: gray under them, "+N more classes" in the legend (all of them are named in TensorBoard's Projector tab).
LEGEND_MAX_CLASSES = 20
#: tab20's light variants of the tab10 colors, in order: the colors of classes 11 to 20.
_TAB20_LIGHT = (
    (174, 199, 232),
    (255, 187, 120),
    (152, 223, 138),
    (255, 152, 150),
    (197, 176, 213),
    (196, 156, 148),
    (247, 182, 210),
    (199, 199, 199),
    (219, 219, 141),
    (158, 218, 229),
)
#: The color of the classes past the named ones.
_OTHERS = (190, 190, 190)


def scatter_image(
    points: Tensor, labels: Tensor | None, title: str = "", class_names: Sequence[str] | None = None, size_px: int = 384
) -> Tensor:
    """A 2-D scatter colored by class -> ``[3, H, W]`` in ``[0, 1]``, drawn with PIL (no matplotlib figure).

    ``size_px`` high: the title on top, a square plot (data limits padded 5% as matplotlib, a frame with
    1-2-2.5-5 ticks and their values), dots of 5 px in matplotlib's tab10 colors (one per class present, in
    label order, later classes on top; tab20's light variants past 10 classes, so no color stands for two;
    antialiased: cached coverage masks at quarter-pixel offsets, :func:`_dot_masks`), and a legend to the right
    of the plot (a dot and the class name, more columns when the classes do not fit in one; beyond
    :data:`LEGEND_MAX_CLASSES` classes the first 18 colored and named, the others gray: "+N more classes"), so
    it never hides points. Non-finite points are left out.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    from ..render import _fit, _font, one_line

    if points.ndim != 2 or points.shape[1] != 2:  # was: [N, 3] drew the first two coordinates
        raise ValueError(f"scatter_image: points must be [N, 2]; got {tuple(points.shape)}")
    if labels is not None:
        _check_labels("scatter_image", points.shape[0], labels)
    p = points.detach().cpu().double()
    finite = torch.isfinite(p).all(1)
    lab = None if labels is None else labels.detach().cpu().reshape(-1).long()
    classes = [] if lab is None else [int(c) for c in torch.unique(lab)]
    names = [str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else str(c) for c in classes]
    names = [one_line(n) for n in names]  # PIL measures no multi-line text
    palette: tuple[tuple[int, int, int], ...] = _TAB10 if len(classes) <= 10 else _TAB10 + _TAB20_LIGHT  # none repeated
    if len(classes) > LEGEND_MAX_CLASSES:  # a 1000-class head: the first classes in colors, the others gray
        palette = tuple(c for c in palette if len(set(c)) > 1)  # tab10 and tab20's grays left out
        n = len(palette)
        class_colors = list(palette) + [_OTHERS] * (len(classes) - n)
        names, colors = names[:n] + [f"+{len(classes) - n} more classes"], [*palette, _OTHERS]
    else:
        class_colors = list(palette[: len(classes)])
        colors = class_colors

    h = int(size_px)
    title_font, tick_font, legend_font = _font(13), _font(10), _font(11)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    # data limits (5% margins), ticks, then the layout around them
    lims = []
    for axis in range(2):
        v = p[finite, axis]
        lo, hi = (float(v.min()), float(v.max())) if v.numel() else (0.0, 1.0)
        if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
            lo, hi = lo - max(0.5, abs(lo) * 0.05), hi + max(0.5, abs(hi) * 0.05)
        pad = (hi - lo) * 0.05
        lims.append((lo - pad, hi + pad))
    ticks = [_nice_ticks(*lim) for lim in lims]
    tick_text = [[_tick_label(t, dec) for t in ts] for ts, dec in ticks]
    top, bottom = 24, 20
    left = 8 + 6 + max([probe.textlength(t, font=tick_font) for t in tick_text[1]] or [0.0])
    left = math.ceil(left)
    side = max(16, h - top - bottom)
    legend_x, row_h, dot_r = left + side + 14, 15, 4
    rows = max(1, (h - top) // row_h)
    cols = -(-len(names) // rows) if names else 0
    name_w = min(130.0, max([probe.textlength(n, font=legend_font) for n in names] or [0.0]))
    col_w = math.ceil(2 * dot_r + 6 + name_w + 10)
    width = legend_x + cols * col_w if cols else left + side + 12

    img = Image.new("RGB", (width, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)

    # the dots, class by class (antialiased masks pasted over what is there)
    (x0, x1), (y0, y1) = lims
    px = (left + (p[:, 0] - x0) / (x1 - x0) * side).tolist()
    py = (top + (1.0 - (p[:, 1] - y0) / (y1 - y0)) * side).tolist()
    ok = finite.tolist()
    if lab is None:
        groups = [(list(range(p.shape[0])), _TAB10[0])]
    else:
        groups = [(torch.nonzero(lab == c).flatten().tolist(), class_colors[i]) for i, c in enumerate(classes)]
        groups.sort(key=lambda g: g[1] != _OTHERS)  # the gray classes first, under the colored ones
    for idx, color in groups:
        for j in idx:
            if ok[j]:
                _paste_dot(img, px[j], py[j], 2.5, color)

    # frame, ticks and their values
    draw.rectangle((left - 1, top - 1, left + side, top + side), outline=(0, 0, 0))
    for t, text in zip(ticks[0][0], tick_text[0]):
        x = left + (t - x0) / (x1 - x0) * side
        draw.line((x, top + side, x, top + side + 4), fill=(0, 0, 0))
        _text(draw, (x, top + side + 6), text, tick_font, "mt")
    for t, text in zip(ticks[1][0], tick_text[1]):
        y = top + (1.0 - (t - y0) / (y1 - y0)) * side
        draw.line((left - 5, y, left - 1, y), fill=(0, 0, 0))
        _text(draw, (left - 7, y), text, tick_font, "rm")
    if title:  # centred over the plot, shifted (or cut) to stay inside the image
        text = _fit(draw, title, title_font, width - 4)
        half = draw.textlength(text, font=title_font) / 2
        _text(draw, (min(max(left + side / 2, half + 2), width - half - 2), top / 2), text, title_font, "mm")

    # legend: a dot and the class name per class, column by column
    for i, (name, dot) in enumerate(zip(names, colors)):
        cx = legend_x + (i // rows) * col_w + dot_r
        cy = top + (i % rows) * row_h + row_h / 2
        _paste_dot(img, cx, cy, dot_r, dot)
        _text(draw, (cx + dot_r + 6, cy), _fit(draw, name, legend_font, name_w), legend_font, "lm")
    # float in numpy (one thread: torch's threads only wait on each other at this size), then a [3, H, W] view
    # of the HWC pixels, so that to_uint8_hwc gets its HWC layout back without a copy
    pixels = np.asarray(img, dtype=np.float32)
    pixels /= 255.0
    return torch.from_numpy(pixels).permute(2, 0, 1)
