"""Embeddings: a layer's features for the probe set, 2-D projections and class-separation scores.

* features: the output of a chosen layer (conv maps are averaged over space), or by default the
  *penultimate* features = the input of the model's last ``nn.Linear`` (found with
  ``layers.linear_layer_names``, last in definition order; recorded with a forward pre-hook);
* :func:`pca_2d`: principal components by SVD of the centered features (Pearson 1901; exact and
  deterministic, signs fixed so the plot does not flip between epochs);
* :func:`tsne_2d`: t-SNE (van der Maaten & Hinton, JMLR 2008) from scikit-learn, seeded;
* :func:`silhouette` (Rousseeuw 1987, ``s = (b - a) / max(a, b)`` averaged) and :func:`knn_accuracy`
  (leave-one-out k-nearest-neighbour accuracy) measure how well classes separate.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..capture import capture
from ..layers import LayerNotFoundError, get_layer, linear_layer_names, unwrap_model

__all__ = ["penultimate_layer", "extract_features", "pca_2d", "tsne_2d", "silhouette", "knn_accuracy", "scatter_image"]


def penultimate_layer(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` (definition order): its *input* is the penultimate feature vector."""
    linears = linear_layer_names(model)
    if not linears:
        raise LayerNotFoundError(
            f"{type(unwrap_model(model)).__name__} has no nn.Linear layer, "
            "so the penultimate features cannot be found; "
            "pass layer=<name> (any layer from model.named_modules(), conv maps are averaged over space)."
        )
    return linears[-1]


def extract_features(
    model: nn.Module, x: Tensor, layer: str | None = None, batch_size: int = 256
) -> tuple[Tensor, Tensor]:
    """``(features[B, D], logits[B, K])`` of ``x``; no autograd.

    ``layer=None``: the input of the last linear layer (penultimate features). Otherwise the output of
    ``layer``; ``[B, C, h, w]`` maps are averaged over ``h, w``, other shapes flattened.
    """
    feats, logits = [], []
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            xb = x[s : s + batch_size]
            if layer is None:
                seen: list[Tensor] = []
                head = penultimate_layer(model)
                handle = get_layer(model, head).register_forward_pre_hook(
                    lambda _m, inputs, seen=seen: seen.append(inputs[0].detach().clone())
                )
                try:
                    out = model(xb)
                finally:
                    handle.remove()
                if not seen:
                    raise ValueError(
                        f"the last nn.Linear {head!r} (whose input would be the penultimate features) was not called "
                        "in the forward pass; pass layer=<name> of the layer whose output to use."
                    )
                f = seen[-1]
            else:
                with capture(model, [layer]) as cap:
                    out = model(xb)
                    f = cap[layer]
            f = f.float().mean(dim=(2, 3)) if f.ndim == 4 else f.float().flatten(1)
            feats.append(f)
            logits.append(out.float())
    return torch.cat(feats), torch.cat(logits)


def pca_2d(features: Tensor, dims: int = 2) -> Tensor:
    """``[N, D]`` -> ``[N, dims]`` scores on the leading principal axes (SVD of the centered data).

    Each axis's sign is fixed so that its largest-magnitude loading is positive (stable across epochs).
    Missing dimensions (``N`` or ``D`` < dims) are zero.
    """
    f = features.double()
    f = f - f.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(f, full_matrices=False)
    vh = vh[:dims]
    signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True))).clamp_min(0) * 2 - 1
    proj = f @ (vh * signs).t()
    if proj.shape[1] < dims:
        proj = torch.cat([proj, proj.new_zeros(proj.shape[0], dims - proj.shape[1])], 1)
    return proj.float()


#: t-SNE gradient-descent iterations by default: 250 early-exaggeration + 250 more (sklearn's default is 1000)
TSNE_ITERATIONS = 500


def tsne_2d(features: Tensor, seed: int = 0, perplexity: float = 30.0, iterations: int = TSNE_ITERATIONS) -> Tensor:
    """t-SNE to 2-D with scikit-learn (seeded; PCA init, random init for 1-D features; perplexity capped below
    ``N / 3`` for small probe sets; ``iterations`` >= 250 gradient steps, the first 250 early exaggeration).

    Runs on one OpenMP thread: for probe-set sizes that is well under 1 s, while sklearn's default thread pool
    competing with the training process's threads was measured 15x slower. 500 iterations (the default) cost
    half of sklearn's 1000 with the same trustworthiness (measured on 128 clustered 64-d points: 0.958 both,
    0.25 s vs 0.52 s CPU); openTSNE (0.48 s) and the exact method (1.2 s) were slower at these sizes.
    """
    if iterations < 250:
        raise ValueError(f"t-SNE needs iterations >= 250 (the early-exaggeration phase); got {iterations}")
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    n = features.shape[0]
    if n < 3:
        return torch.zeros(n, 2)
    perp = float(max(1.0, min(perplexity, (n - 1) / 3)))
    init = "pca" if features.shape[1] >= 2 else "random"  # PCA init needs 2 feature dimensions (seeded either way)
    with threadpool_limits(limits=1):
        key = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"  # n_iter: sklearn < 1.5
        tsne = TSNE(n_components=2, perplexity=perp, init=init, random_state=seed, **{key: int(iterations)})
        emb = tsne.fit_transform(features.double().numpy())
    return torch.as_tensor(emb, dtype=torch.float32)


def silhouette(features: Tensor, labels: Tensor) -> float:
    """Mean silhouette coefficient with Euclidean distance; NaN unless 2 <= #classes <= N - 1."""
    from sklearn.metrics import silhouette_score

    n_cls = int(labels.unique().numel())
    if not 2 <= n_cls <= features.shape[0] - 1:
        return float("nan")
    return float(silhouette_score(features.double().numpy(), labels.numpy(), metric="euclidean"))


def knn_accuracy(features: Tensor, labels: Tensor, k: int = 5) -> float:
    """Leave-one-out k-NN accuracy (Euclidean; majority vote, ties to the nearer neighbour's class)."""
    n = features.shape[0]
    if n < 2:
        return float("nan")
    k = min(k, n - 1)
    d = torch.cdist(features.double(), features.double())
    d.fill_diagonal_(float("inf"))
    nn_idx = torch.sort(d, dim=1, stable=True).indices[:, :k]  # [N, k], nearest first
    nn_lab = labels.long()[nn_idx]
    num_classes = int(labels.max()) + 1
    votes = torch.zeros(n, num_classes, dtype=torch.long).scatter_add_(1, nn_lab, torch.ones_like(nn_lab))
    # Among the most-voted classes, the one of the nearest neighbour: the first neighbour whose class has max votes.
    top = votes.gather(1, nn_lab) == votes.amax(1, keepdim=True)
    pred = nn_lab.gather(1, top.int().argmax(1, keepdim=True)).squeeze(1)
    return float((pred == labels).double().mean())


def scatter_image(
    points: Tensor, labels: Tensor | None, title: str = "", class_names: Sequence[str] | None = None, size_px: int = 384
) -> Tensor:
    """A 2-D scatter colored by class, rendered with matplotlib's Agg canvas -> ``[3, H, W]`` in ``[0, 1]``."""
    import matplotlib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(size_px / dpi, size_px / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    p = points.detach().float().cpu().numpy()
    if labels is None:
        ax.scatter(p[:, 0], p[:, 1], s=12, c="tab:blue")
    else:
        lab = labels.cpu().numpy()
        for i, c in enumerate(np.unique(lab)):
            sel = lab == c
            name = class_names[int(c)] if class_names is not None and 0 <= int(c) < len(class_names) else str(int(c))
            ax.scatter(p[sel, 0], p[sel, 1], s=12, color=matplotlib.colormaps["tab10"](i % 10), label=name)
        ax.legend(fontsize=7, loc="best", markerscale=1.5)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    fig.tight_layout()
    canvas.draw()
    arr = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0
