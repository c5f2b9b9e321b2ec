"""Embeddings: penultimate features, PCA, separation scores, projector files per scheduled epoch."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import (
    LitTiny,
    TinyCNN,
    check_untouched,
    image_steps,
    read_events,
    scalar_steps,
    tiny_loaders,
    tiny_trainer,
)
from PIL import Image
from torch import nn

from lightning_viz.callbacks.embeddings import EmbeddingCallback
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.logging import TensorBoardBackend
from lightning_viz.methods.embeddings import (
    conditional_probabilities,
    extract_features,
    joint_probabilities,
    knn_accuracy,
    pca_2d,
    pca_variance_ratio,
    penultimate_layer,
    scatter_image,
    silhouette,
    squared_distances,
    tsne_2d,
    tsne_exact,
)


def test_penultimate_layer_of_real_architectures():
    assert penultimate_layer(torchvision.models.resnet18(weights=None)) == "fc"
    assert penultimate_layer(torchvision.models.mobilenet_v3_small(weights=None)) == "classifier.3"
    assert penultimate_layer(TinyCNN()) == "fc"
    with pytest.raises(LayerNotFoundError, match="has no nn.Linear"):
        penultimate_layer(nn.Sequential(nn.Conv2d(3, 2, 3)))


def test_penultimate_features_are_the_input_of_the_last_linear_called():
    class WithUnusedHead(nn.Module):  # e.g. a projection head used only in training_step, defined last
        def __init__(self):
            super().__init__()
            self.net = TinyCNN()
            self.head = nn.Linear(4, 8)

        def forward(self, x):
            return self.net(x)

    model, x = WithUnusedHead().eval(), torch.randn(2, 3, 8, 8)
    assert penultimate_layer(model) == "head"  # no forward at hand: the last one defined
    assert penultimate_layer(model, x) == "net.fc"  # the last one called
    feats, _ = extract_features(model, x)
    pooled, _ = extract_features(model, x, layer="net.pool")
    torch.testing.assert_close(feats, pooled)  # the input of net.fc: the pooled features
    no_call = WithUnusedHead()
    no_call.net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # logits without a Linear
    with pytest.raises(
        LayerNotFoundError, match=r"no nn.Linear of WithUnusedHead is called in its forward.*layers=<name>"
    ):
        penultimate_layer(no_call, x)
    with pytest.raises(ValueError, match=r"no nn.Linear is called in the model's forward.*pass layers=<name>"):
        extract_features(no_call, x)


def test_extract_features_penultimate_and_conv_layer():
    torch.manual_seed(0)
    net = TinyCNN(width=4).eval()
    x = torch.randn(5, 3, 8, 8)
    feats, logits = extract_features(net, x, batch_size=2)
    with torch.no_grad():
        h = net.relu(net.bn1(net.conv1(x)))
        conv2 = net.conv2(h)
        expected = net.pool(F.relu(conv2)).flatten(1)
        torch.testing.assert_close(feats, expected)
        torch.testing.assert_close(logits, net(x))
    feats, _ = extract_features(net, x, layer="conv2")
    torch.testing.assert_close(feats, conv2.mean(dim=(2, 3)))  # conv maps averaged over space


def test_pca_of_points_on_a_line():
    t = torch.tensor([-2.0, -1.0, 0.5, 1.0, 1.5])
    direction = torch.tensor([3.0, 4.0]) / 5
    feats = t.view(-1, 1) * direction + torch.tensor([10.0, -3.0])
    proj = pca_2d(feats)
    # one axis carries everything: the centered positions along the line (sign: largest loading positive)
    torch.testing.assert_close(proj[:, 0], t - t.mean())
    torch.testing.assert_close(proj[:, 1], torch.zeros(5), atol=1e-5, rtol=0)
    assert pca_2d(torch.randn(1, 4)).shape == (1, 2)


def _svd_pca(f: torch.Tensor, dims: int = 2) -> torch.Tensor:
    """The reference: the leading right singular vectors of the centered features, signed as pca_2d signs them."""
    f = f.double() - f.double().mean(0)
    vh = torch.linalg.svd(f, full_matrices=False)[2][:dims]
    vh = vh * (torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True))).clamp_min(0) * 2 - 1)
    return (f @ vh.t()).float()


def test_pca_of_wide_features_takes_no_full_svd_and_equals_it(monkeypatch):
    """A ResNet-50's 2048-d pooled features: the two leading axes come from the eigenvectors of the smaller Gram
    matrix (was: a full SVD, 5x the CPU time for 1024 probes, more on busy threads); the scores equal the SVD's,
    for fewer probes than features, more, and rank-deficient features (a zero second axis)."""
    torch.manual_seed(0)
    cases = [
        torch.randn(96, 2048).relu() * torch.linspace(2, 0.1, 2048),
        torch.randn(300, 40) * torch.linspace(3, 0.1, 40),
        torch.arange(10.0).view(10, 1) * torch.tensor([[1.0, 2.0, 3.0]]),
    ]
    expected = [_svd_pca(f) for f in cases]
    calls: list[int] = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or svd(*a, **k))
    for f, want in zip(cases, expected):
        torch.testing.assert_close(pca_2d(f), want, atol=1e-5 * float(want.abs().max()), rtol=0)
    assert calls == []
    assert pca_2d(cases[2])[:, 1].abs().max() < 1e-5 and pca_variance_ratio(cases[2])[1] < 1e-12


def test_separation_scores_hand_computed():
    feats = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    labels = torch.tensor([0, 0, 1, 1])
    # a = 1 for every point; b = 10.5, 9.5, 9.5, 10.5 -> s = (b - a) / b
    expected = (2 * (9.5 / 10.5) + 2 * (8.5 / 9.5)) / 4
    assert math.isclose(silhouette(feats, labels), expected, rel_tol=1e-9)
    assert math.isnan(silhouette(feats, torch.zeros(4, dtype=torch.long)))
    assert knn_accuracy(feats, labels, k=1) == 1.0
    # labels interleaved: every nearest neighbour has the other class
    assert knn_accuracy(feats, torch.tensor([0, 1, 0, 1]), k=1) == 0.0
    # k=3 on [0, 1, 2, 10]: point 10's neighbours 2, 1, 0 -> class 0 while it is 1
    assert knn_accuracy(torch.tensor([[0.0], [1.0], [2.0], [10.0]]), torch.tensor([0, 0, 0, 1]), k=3) == 0.75


def test_silhouette_matches_sklearn():
    """The torch silhouette is scikit-learn's silhouette_score: clusters, labels that are not 0..K-1, a class of
    one point (scores 0) and coincident points."""
    from sklearn.metrics import silhouette_score

    feats, labels = _clusters(per=10, dims=8, spread=0.8)
    cases = [
        (feats.double(), labels),
        (feats.double(), labels * 3 + 5),
        (torch.tensor([[0.0], [0.0], [1.0], [5.0], [5.5], [9.0]]), torch.tensor([3, 3, 7, 9, 9, 7])),
        (torch.tensor([[0.0], [0.0], [1.0], [5.0], [5.5], [9.0]]), torch.tensor([3, 3, 7, 9, 9, 1])),
    ]
    for f, lab in cases:
        ref = silhouette_score(f.double().numpy(), lab.numpy())
        assert math.isclose(silhouette(f, lab), ref, rel_tol=1e-12, abs_tol=1e-12)


def test_knn_vote_ties_go_to_the_class_of_the_nearest_neighbour():
    # k = 5 = all other points. By hand, neighbours nearest first (equal distances: lower index first):
    # p0: A B B C A -> tie A/B, nearest A (right)   p1: A B B C A -> A (right)
    # p2: A B A C A -> A (wrong)   p3: B C A A A -> A (wrong)   p4: B A B A A -> A (wrong)
    # p5: C B B A A -> tie A/B, nearest B (wrong). A vote bonus linear in rank would give B to p0 and p1.
    feats = torch.arange(6.0).view(-1, 1)
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    assert knn_accuracy(feats, labels, k=5) == pytest.approx(2 / 6)


def _clusters(seed: int = 0, per: int = 32, dims: int = 64, spread: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """4 Gaussian clusters of ``per`` points in ``dims`` dimensions (a local generator), and their labels."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per)
    return torch.randn(4, dims, generator=g)[labels] * spread + torch.randn(4 * per, dims, generator=g), labels


def test_perplexity_calibration_matches_sklearn():
    """Conditional P (one bisection per row, all rows at once) and the symmetrized joint P are scikit-learn's
    ``_binary_search_perplexity`` / ``_joint_probabilities`` on the same float32 squared distances; every row's
    entropy is log(perplexity) within sklearn's tolerance 1e-5."""
    utils = pytest.importorskip("sklearn.manifold._utils")
    t_sne = pytest.importorskip("sklearn.manifold._t_sne")
    from scipy.spatial.distance import squareform

    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, 5, dtype=torch.float64)
    x[:10] += 4.0  # a denser group: rows need quite different precisions
    d32 = squared_distances(x).float().numpy()
    d = torch.from_numpy(d32).double()
    for perplexity in (5.0, 10.0):
        ref = torch.from_numpy(utils._binary_search_perplexity(d32, perplexity, 0))
        cond = conditional_probabilities(d, perplexity)
        torch.testing.assert_close(cond, ref, rtol=0, atol=1e-12)
        assert torch.all(cond.diagonal() == 0)
        torch.testing.assert_close(cond.sum(1), torch.ones(40, dtype=torch.float64), rtol=0, atol=1e-12)
        entropy = -(cond * torch.log(cond.clamp_min(1e-300))).sum(1)
        assert (entropy - math.log(perplexity)).abs().max() <= 1e-5
        joint = joint_probabilities(d, perplexity)
        ref_joint = torch.from_numpy(squareform(t_sne._joint_probabilities(d32, perplexity, 0)))
        torch.testing.assert_close(joint, ref_joint, rtol=1e-12, atol=1e-15)
        assert torch.equal(joint, joint.t()) and math.isclose(float(joint.sum()), 1.0, rel_tol=1e-12)


def test_tsne_exact_steps_are_sklearns_optimizer():
    """The first gradient steps (exact gradient, momentum 0.5, gains, learning rate 50, exaggerated P) are
    scikit-learn's ``_gradient_descent`` over its exact ``_kl_divergence`` in float64, to rounding. (Later steps
    part ways: the early-exaggeration phase amplifies rounding differences, as any two t-SNE builds.)"""
    t_sne = pytest.importorskip("sklearn.manifold._t_sne")
    from scipy.spatial.distance import squareform

    feats, _ = _clusters(per=8, dims=16)
    n = feats.shape[0]
    p = joint_probabilities(squared_distances(feats), 8.0)
    init = pca_2d(feats).double() * 1e-3
    for steps in (1, 2, 5):
        y, _, it = tsne_exact(p, init, steps)
        ref, _, _ = t_sne._gradient_descent(
            t_sne._kl_divergence, init.numpy().ravel().copy(), 0, steps, n_iter_check=50,
            n_iter_without_progress=250, momentum=0.5, learning_rate=50.0,
            args=[squareform(p.numpy(), checks=False) * 12.0, 1, n, 2], kwargs={},
        )  # fmt: skip
        assert it == steps
        torch.testing.assert_close(y, torch.from_numpy(ref.reshape(n, 2)), rtol=1e-9, atol=1e-12)


def _tsne_plain(p: torch.Tensor, init: torch.Tensor, iterations: int) -> torch.Tensor:
    """The t-SNE loop written plainly (a fresh tensor per operation, torch only): eq. 5's gradient, momentum 0.5 then
    0.8, delta-bar-delta gains, as :func:`tsne_exact` (without its early stops, which these inputs do not reach)."""
    n = p.shape[0]
    ya = torch.ones(3, n, dtype=p.dtype)
    ya[:2] = init.t()
    yt = ya[:2]
    lr = max(n / 12.0 / 4.0, 50.0)
    for pmat, momentum, steps in ((p * 12.0, 0.5, 250), (p, 0.8, iterations - 250)):
        update, gains = torch.zeros_like(yt), torch.ones_like(yt)
        for _ in range(steps):
            sq = torch.addcmul(yt[0] * yt[0], yt[1], yt[1])
            w = torch.add((sq + 1.0)[:, None], sq).addmm_(yt.t(), yt, alpha=-2.0).reciprocal_().fill_diagonal_(0.0)
            m = torch.add(pmat, w, alpha=-1.0 / float(w.sum())).mul_(w)
            my = ya @ m
            g = torch.addcmul(my[:2], yt, my[2:], value=-1.0)
            gains = torch.where(update * g > 0.0, gains + 0.2, gains * 0.8).clamp_(min=0.01)
            update.mul_(momentum).addcmul_(gains, g, value=4.0 * lr)
            yt.add_(update)
    return yt.t().contiguous()


def test_tsne_exact_is_the_plain_loop_bit_for_bit():
    """The loop's preallocated buffers, out= ops, numpy gains step and inference mode change no bit: 500 steps equal
    the plain loop's on clustered features (the steps amplify any rounding difference, so a changed op would show)."""
    feats, _ = _clusters(per=16, dims=32)
    p = joint_probabilities(squared_distances(feats), 20.0)
    init = pca_2d(feats).double() * 1e-4
    y, _, it = tsne_exact(p, init, 500)
    assert it == 500 and torch.equal(y, _tsne_plain(p, init, 500))
    # the steps run in inference mode; the result is an ordinary tensor (in-place ops and autograd take it)
    assert not y.is_inference() and y.is_contiguous() and y.shape == (64, 2)
    assert torch.equal(y.add_(1.0).requires_grad_().sum().backward() or y.grad, torch.ones(64, 2, dtype=y.dtype))


@pytest.mark.parametrize("use_numpy", [True, False])
def test_tsne_gains_step_numpy_and_torch_alike(use_numpy):
    """The gains step (numpy on the CPU, torch elsewhere) is ``where(update * g > 0, gains + 0.2, gains * 0.8)``
    floored at 0.01, in place, bit for bit."""
    from lightning_viz.methods.embeddings import _gains_step

    gen = torch.Generator().manual_seed(3)
    update, g = (
        torch.randn(2, 64, generator=gen, dtype=torch.float64),
        torch.randn(2, 64, generator=gen, dtype=torch.float64),
    )
    update[0, :4] = 0.0  # a zero product shrinks
    gains = torch.rand(2, 64, generator=gen, dtype=torch.float64) * 2
    gains[1, :8] = 0.011  # shrunk below the floor
    want = torch.where(update * g > 0.0, gains + 0.2, gains * 0.8).clamp_(min=0.01)
    _gains_step(update, g, gains, torch.empty_like(gains), use_numpy=use_numpy)()
    assert torch.equal(gains, want) and float(gains.min()) == 0.01


def test_tsne_separates_clusters_like_sklearn():
    """4 clusters of 32 points in 64-d: neighbourhoods kept (trustworthiness measured 0.960-0.964 over 4 seeds,
    scikit-learn's Barnes-Hut 0.960-0.964) and classes apart (silhouette measured 0.95-0.96)."""
    from sklearn.manifold import trustworthiness

    feats, labels = _clusters()
    emb = tsne_2d(feats)
    assert emb.shape == (128, 2) and emb.dtype == torch.float32 and torch.isfinite(emb).all()
    assert not emb.is_inference()  # computed in inference mode, returned as an ordinary tensor
    assert trustworthiness(feats.numpy(), emb.numpy(), n_neighbors=5) > 0.95
    assert knn_accuracy(emb, labels, k=5) == 1.0 and silhouette(emb, labels) > 0.9


def test_tsne_is_deterministic_and_leaves_global_state_alone():
    """No randomness: the same input gives bit-identical output, whatever torch's thread count (restored after);
    the torch, numpy and Python RNGs are untouched (also for 1-D features, drawn from a local generator)."""
    import random

    import numpy as np

    feats, _ = _clusters(per=16)
    threads = torch.get_num_threads()
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    try:
        torch.set_num_threads(1)
        one = tsne_2d(feats)
        torch.set_num_threads(2)
        two = tsne_2d(feats)
        assert torch.get_num_threads() == 2
        line = tsne_2d(torch.linspace(0, 1, 12).view(-1, 1), seed=4, perplexity=3)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, tsne_2d(feats.clone()))
    assert torch.equal(line, tsne_2d(torch.linspace(0, 1, 12).view(-1, 1), seed=4, perplexity=3))
    assert torch.equal(states[0], torch.get_rng_state())
    assert np.array_equal(states[1], np.random.get_state()[1]) and states[2] == random.getstate()


def test_tsne_above_the_exact_range_is_sklearns_barnes_hut(monkeypatch):
    """Above TSNE_EXACT_MAX_POINTS scikit-learn's Barnes-Hut takes over (seeded): clusters still apart."""
    import lightning_viz.methods.embeddings as emb_mod

    feats, labels = _clusters(per=16)
    exact = tsne_2d(feats)
    monkeypatch.setattr(emb_mod, "TSNE_EXACT_MAX_POINTS", 32)
    bh = tsne_2d(feats, seed=2)
    assert torch.equal(bh, tsne_2d(feats, seed=2)) and not torch.equal(bh, exact)
    assert knn_accuracy(bh, labels) == 1.0


def test_barnes_hut_tsne_shows_progress_and_stops_as_the_exact_one(caplog, monkeypatch):
    """Above TSNE_EXACT_MAX_POINTS, scikit-learn's Barnes-Hut ran without a word (and could not be stopped by a
    SIGTERM) while the exact t-SNE logs its iterations: it now logs the same lines, every 50 iterations, and stops at
    the check of an interruptible run; the embedding is the same, and scikit-learn is left as it was."""
    import logging

    from sklearn.manifold import _t_sne

    import lightning_viz.methods.embeddings as emb_mod
    import lightning_viz.progress as progress_module

    objective = _t_sne._kl_divergence_bh
    monkeypatch.setattr(emb_mod, "TSNE_EXACT_MAX_POINTS", 32)
    monkeypatch.setattr(progress_module.logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning_viz")
    feats, _ = _clusters(per=16)
    quiet = tsne_2d(feats, seed=2, iterations=300)
    with progress_module.reporting("embeddings", every_s=0.0):
        shown = tsne_2d(feats, seed=2, iterations=300)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-viz embeddings: ")]
    done = [int(m.split(": ")[1].split("/")[0]) for m in lines if "/300 t-SNE iterations" in m]
    assert done[:5] == [50, 100, 150, 200, 250] and done == sorted(done) and len(done) == len(lines), lines
    assert torch.equal(shown, quiet) and _t_sne._kl_divergence_bh is objective

    class Stop(Exception):
        pass

    def check(done: int, total: int, what: str) -> None:
        if what == "t-SNE iterations" and done >= 100:
            raise Stop(done)

    with progress_module.interruptible(check), pytest.raises(Stop, match="100"):
        tsne_2d(feats, seed=2, iterations=300)
    assert _t_sne._kl_divergence_bh is objective
    assert torch.equal(tsne_2d(feats, seed=2, iterations=300), quiet)


def test_barnes_hut_progress_counts_only_its_own_threads_steps(caplog, monkeypatch):
    """The objective is wrapped module-wide while a Barnes-Hut t-SNE runs: a scikit-learn t-SNE of another thread
    meanwhile calls the wrapper too, and its steps were counted as this run's (lines past the real progress)."""
    import logging
    import threading

    from sklearn.manifold import _t_sne

    import lightning_viz.methods.embeddings as emb_mod
    import lightning_viz.progress as progress_module

    monkeypatch.setattr(_t_sne, "_kl_divergence_bh", lambda *a, **k: (0.0, None))
    monkeypatch.setattr(progress_module.logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning_viz")
    with progress_module.reporting("embeddings", every_s=0.0), emb_mod._reporting_bh_steps(300):
        other = threading.Thread(target=lambda: [_t_sne._kl_divergence_bh() for _ in range(100)])
        other.start()
        other.join()
        for _ in range(100):
            _t_sne._kl_divergence_bh()
    lines = [r.getMessage().split(" (")[0] for r in caplog.records if "t-SNE iterations" in r.getMessage()]
    assert lines == [f"lightning-viz embeddings: {k}/300 t-SNE iterations" for k in (50, 100)], lines


def test_tsne_default_iterations_are_as_faithful_as_sklearns_1000():
    """The cheaper default (500 steps) keeps the neighbourhoods of sklearn's default 1000: 4 clusters of 16
    points stay apart, trustworthiness (Venna & Kaski) is within 0.01, output shape and determinism unchanged."""
    from sklearn.manifold import trustworthiness

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 4
    feats = (centers.repeat_interleave(16, 0) + torch.randn(64, 16, generator=g)).double()
    fast, full = tsne_2d(feats, seed=1), tsne_2d(feats, seed=1, iterations=1000)
    assert fast.shape == (64, 2) and torch.equal(fast, tsne_2d(feats, seed=1))
    assert not torch.equal(fast, full)
    labels = torch.arange(4).repeat_interleave(16)
    assert knn_accuracy(fast, labels, k=5) == 1.0 and silhouette(fast, labels) > 0.8
    t_fast, t_full = (trustworthiness(feats.numpy(), e.numpy(), n_neighbors=5) for e in (fast, full))
    assert t_fast > 0.9 and abs(t_fast - t_full) < 0.01
    with pytest.raises(ValueError, match="iterations >= 250"):
        tsne_2d(feats, iterations=100)
    with pytest.raises(ValueError, match="tsne_iterations must be >= 250"):
        EmbeddingCallback(tsne_iterations=10)


def test_tsne_of_one_dimensional_features():
    # e.g. a chosen layer with a single channel: PCA init cannot give 2 components; two clusters stay apart
    feats = torch.cat([torch.linspace(0, 1, 6), torch.linspace(20, 21, 6)]).view(-1, 1)
    emb = tsne_2d(feats, seed=0, perplexity=3)
    assert emb.shape == (12, 2) and torch.equal(emb, tsne_2d(feats, seed=0, perplexity=3))
    d = torch.cdist(emb, emb)
    assert d[:6, 6:].min() > d[:6, :6].max() and d[:6, 6:].min() > d[6:, 6:].max()


def test_scatter_image_draws_each_class_where_it_is_with_a_legend_beside():
    """Dots in tab10 class colors at their places (class 1 right of class 0, class 2 above it), a legend with every
    class color right of the plot frame, a title above it; no labels: blue dots only, no legend; the same input
    gives the same pixels; non-finite points are left out."""
    from lightning_viz.methods.embeddings import _TAB10, scatter_image

    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    labels = torch.arange(3).repeat_interleave(10)
    pts = centers[labels] + torch.randn(30, 2, generator=g) * 0.5
    names = ["zero", "one", "two"]
    img = scatter_image(pts, labels, "penultimate t-SNE, epoch 3", class_names=names)
    assert img.shape[:2] == (3, 384) and img.shape[2] > 384 and img.min() >= 0 and img.max() <= 1
    assert torch.equal(img, scatter_image(pts, labels, "penultimate t-SNE, epoch 3", class_names=names))
    arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0)
    frame = ((arr == 0).all(-1).sum(0) > 300).nonzero().flatten()  # the plot frame's two vertical sides
    x_left, x_right = int(frame.min()), int(frame.max())
    assert x_right - x_left > 300
    rows = ((arr == 0).all(-1).sum(1) > 300).nonzero().flatten()
    assert bool((arr[: int(rows.min())] < 128).any())  # the title, above the frame
    where = []
    for k in range(3):
        mask = (arr == torch.tensor(_TAB10[k], dtype=torch.uint8)).all(-1)
        inside, legend = mask[:, x_left:x_right], mask[:, x_right:]
        assert int(inside.sum()) >= 10 * 4 and int(legend.sum()) >= 4, k  # 10 dots, 1 legend dot
        yx = inside.nonzero().double().mean(0)
        where.append(yx)
    assert where[1][1] - where[0][1] > 150 and abs(where[1][0] - where[0][0]) < 30  # class 1: right of class 0
    assert where[0][0] - where[2][0] > 150 and abs(where[2][1] - where[0][1]) < 30  # class 2: above class 0

    pts[3] = float("nan")
    plain = scatter_image(pts, None, "no labels")
    arr = (plain * 255).round().to(torch.uint8).permute(1, 2, 0)
    colored = (arr.max(-1).values.int() - arr.min(-1).values.int()) > 40
    blue = (arr == torch.tensor(_TAB10[0], dtype=torch.uint8)).all(-1)
    assert plain.shape[2] < img.shape[2] and int(blue.sum()) >= 29 * 4
    assert not bool((colored & ~blue & (arr[..., 2] < arr[..., 0])).any())  # nothing orange, red or green


def test_projector_files_and_scalars_per_scheduled_epoch(tmp_path):
    cb = EmbeddingCallback(projection=["pca", "tsne"], num_probes=12, every_n_epochs=2, sprite_size=8)
    train, val = tiny_loaders()
    model = LitTiny()
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=3)
    trainer.fit(model, train, val)
    logdir = trainer.logger.log_dir
    acc = read_events(str(tmp_path))
    for proj in ("pca", "tsne"):
        assert image_steps(acc, f"viz-embeddings/penultimate/{proj}") == [1, 2]
    for stat in ("silhouette", "knn_accuracy"):
        assert scalar_steps(acc, f"viz-embeddings/penultimate/{stat}") == [1, 2]
    knn = [e.value for e in acc.Scalars("viz-embeddings/penultimate/knn_accuracy")]
    assert all(0.0 <= v <= 1.0 for v in knn)

    labels = cb.probes.labels.tolist()
    sub = "viz-embeddings%2Fpenultimate"
    found = {d for d in os.listdir(logdir) if d.isdigit()}
    assert found == {"00001", "00002"}  # scheduled epochs only
    for step in ("00001", "00002"):
        folder = os.path.join(logdir, step, sub)
        if not os.path.isdir(folder):  # the encoding of '/' may be lowercase
            folder = os.path.join(logdir, step, sub.lower())
        for f in ("tensors.tsv", "metadata.tsv") + (("sprite.png",) if step == "00001" else ()):  # sprite: once
            assert os.path.isfile(os.path.join(folder, f)), (step, f)
        with open(os.path.join(folder, "metadata.tsv")) as fh:
            rows = fh.read().splitlines()
        assert rows[0].split("\t") == ["label", "prediction"]
        assert [int(r.split("\t")[0]) for r in rows[1:]] == labels
        assert all(0 <= int(r.split("\t")[1]) < 3 for r in rows[1:])
        with open(os.path.join(folder, "tensors.tsv")) as fh:
            tensors = fh.read().splitlines()
        assert len(tensors) == 12 and len(tensors[0].split("\t")) == 4  # TinyCNN width 4
    with open(os.path.join(logdir, "projector_config.pbtxt")) as fh:
        config = fh.read()
    assert "viz-embeddings/penultimate:00001" in config and "viz-embeddings/penultimate:00002" in config

    cb.every_n_epochs, cb.projection = 1, ["pca"]
    model.train()
    results = check_untouched(model, lambda: cb.run(trainer, model))
    torch.testing.assert_close(results["features"], extract_features(model.eval(), cb.probes.images)[0])


def test_callback_runs_a_model_in_another_dtype_than_the_probes():
    from lightning_viz.capture import isolated
    from lightning_viz.probe import ProbeSet

    model = LitTiny().double()  # e.g. Trainer(precision="64-true"); the probes stay float32
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with isolated(model):
        out = EmbeddingCallback().compute(model, ProbeSet(images=x, labels=torch.tensor([0, 1, 2, 0])))
        feats, logits = extract_features(model, x.double())
    assert torch.equal(out["features"], feats) and torch.equal(out["prediction"], logits.argmax(1))


def test_chosen_layer_and_errors(tmp_path):
    model = LitTiny()
    cb = EmbeddingCallback(layers="net.conv2", projector=False, num_probes=6, run_on="validation_epoch_end")
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
    train, val = tiny_loaders()
    trainer.fit(model, train, val)
    trainer.validate(model, val)  # inside inference mode, at current_epoch 1
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-embeddings/net.conv2/pca") == [0, 1]
    assert scalar_steps(acc, "viz-embeddings/net.conv2/silhouette") == [0, 1]
    assert not any(d.isdigit() for d in os.listdir(trainer.logger.log_dir))  # no projector files
    with pytest.raises(LayerNotFoundError, match="Unknown layer 'net.fc9'"):
        EmbeddingCallback(layers="net.fc9").check(model)
    with pytest.raises(ValueError, match="projection must be a list of 'pca' and/or 'tsne'"):
        EmbeddingCallback(projection=["umap"])


def test_rgba_probes_embed_and_one_probe_is_warned(tmp_path):
    """4-channel (RGBA) images reach the projector as RGB sprites (was: TensorBoard's 'Input should be a 4D numpy
    array with 3 channels' at the first epoch end); one probe (num_probes=1, a one-item dataset) is warned about
    (was: nothing logged, silently)."""
    from helpers import read_events, tiny_trainer
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_viz.callbacks.base import VisualizationWarning
    from lightning_viz.callbacks.embeddings import EmbeddingCallback

    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(12, 4, 8, 8, generator=g), torch.arange(12) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    cb = EmbeddingCallback(num_probes=9, projection=["pca"], projector=True)
    tiny_trainer(str(tmp_path / "rgba"), [cb], max_epochs=1).fit(LitTiny(TinyCNN(in_channels=4)), loader, loader)
    assert "viz-embeddings/penultimate/pca" in read_events(str(tmp_path / "rgba")).Tags()["images"]
    sprite = list((tmp_path / "rgba").rglob("sprite.png"))
    assert sprite and np.asarray(Image.open(sprite[0])).shape[-1] == 3
    one = DataLoader(TensorDataset(x[:1, :3], y[:1]), batch_size=1)
    cb = EmbeddingCallback(num_probes=4, projection=["pca"])
    with pytest.warns(VisualizationWarning, match="1 probe to embed"):
        tiny_trainer(str(tmp_path / "one"), [cb], max_epochs=1).fit(LitTiny(), one, one)


def test_scatter_legend_gives_each_class_its_own_color_and_names_the_first_of_many():
    """128 probes of a 1000-class head: the legend listed 128 names in 10 repeating colors, 6 columns wide; then only
    their number, over dots in 10 repeating colors (a cluster's color stood for 13 classes, as classes 0 and 10 of
    a 20-class head shared one). Up to LEGEND_MAX_CLASSES classes each has a color of its own (tab10, then tab20's
    light variants), all named; beyond, the first 18 classes are colored and named, the others gray under them."""
    from lightning_viz.methods.embeddings import _OTHERS, _TAB10, _TAB20_LIGHT, LEGEND_MAX_CLASSES, scatter_image

    def colors(img: torch.Tensor) -> list[tuple[int, ...]]:
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0).reshape(-1, 3)
        return [tuple(c) for c in torch.unique(arr, dim=0).tolist()]

    def legend(img: torch.Tensor) -> torch.Tensor:
        arr = (img * 255).round().to(torch.uint8).permute(1, 2, 0)
        frame = ((arr == 0).all(-1).sum(0) > 300).nonzero().flatten()
        return arr[:, int(frame.max()) + 1 :]

    def has(arr: torch.Tensor, color: tuple[int, ...]) -> bool:
        return bool((arr == torch.tensor(color, dtype=torch.uint8)).all(-1).any())

    g = torch.Generator().manual_seed(0)
    pts = torch.randn(128, 2, generator=g)
    assert LEGEND_MAX_CLASSES == 20
    few = scatter_image(pts[:40], torch.arange(40) % LEGEND_MAX_CLASSES, "few")  # 20 classes: every one named
    assert all(has(legend(few), c) for c in _TAB10 + _TAB20_LIGHT)  # 20 colors, one a class
    assert set(colors(few)) >= set(_TAB20_LIGHT)  # classes 10-19 drawn in tab20's light colors, not 0-9's again
    many = scatter_image(pts, torch.arange(128), "many")
    assert many.shape[2] <= 384 + 160  # one column (names up to 130 px), not 6
    side = legend(many)
    named = [c for c in _TAB10 + _TAB20_LIGHT if len(set(c)) > 1]
    assert len(named) == 18 and all(has(side, c) for c in named) and has(side, _OTHERS)  # 18 dots, a gray one
    assert not has(side, _TAB10[7]) and not has(side, _TAB20_LIGHT[7])  # tab's grays: not for a class
    assert bool((side < 100).all(-1).any())  # the names and "+110 more classes"


def test_projector_sprite_written_once_for_the_same_probes(tmp_path):
    """A long run wrote the same sprite.png (the probe thumbnails) again at every epoch; it is written once and every
    later embedding of the projector config points to it (a different sprite is written anew)."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    cb = EmbeddingCallback(projection=["pca"], num_probes=6, sprite_size=8)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=3)
    trainer.fit(LitTiny(), *tiny_loaders())
    logdir = trainer.logger.log_dir
    sprites = sorted(os.path.relpath(str(p), logdir) for p in Path(logdir).rglob("sprite.png"))
    assert len(sprites) == 1 and sprites[0].startswith("00000"), sprites
    config = ProjectorConfig()
    with open(os.path.join(logdir, "projector_config.pbtxt")) as fh:
        text_format.Parse(fh.read(), config)
    assert [e.tensor_name.rsplit(":", 1)[1] for e in config.embeddings] == ["00000", "00001", "00002"]
    for e in config.embeddings:
        assert e.sprite.image_path == sprites[0] and list(e.sprite.single_image_dim) == [8, 8]
        assert os.path.isfile(os.path.join(logdir, e.tensor_path))

    # other images: a sprite of their own
    writer = trainer.logger.experiment
    backend = TensorBoardBackend(writer)
    feats, imgs = torch.randn(6, 4), torch.rand(6, 3, 8, 8)
    backend.embedding("viz-embeddings/penultimate", feats, None, imgs, None, 5)
    backend.embedding("viz-embeddings/penultimate", feats, None, imgs, None, 6)
    assert len(list(Path(logdir).rglob("sprite.png"))) == 2
    config = ProjectorConfig()
    text_format.Parse(Path(logdir, "projector_config.pbtxt").read_text(), config)
    assert config.embeddings[-1].sprite.image_path == config.embeddings[-2].sprite.image_path
    assert config.embeddings[-2].sprite.image_path.startswith("00005")


def test_projector_files_are_add_embeddings_byte_for_byte(tmp_path):
    """The backend writes tensors.tsv in one piece (SummaryWriter.add_embedding: value by value, a file open per
    line): every file and the projector config are add_embedding's, byte for byte, for float32 features with tiny,
    huge, negative and integral values, metadata with a header, a sprite, and a second step."""
    from torch.utils.tensorboard import SummaryWriter

    from lightning_viz.logging import _add_embedding

    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(9, 5, generator=gen) * torch.tensor([1e-9, 1.0, 1e7, -3.0, 0.0])
    feats[0] = torch.tensor([1.0, -0.0, 1e-45, 3.4e38, 0.1])
    meta = [[f"c{i % 3}", f"p {i % 2}"] for i in range(9)]
    imgs = torch.rand(9, 3, 4, 4, generator=gen)
    files = []
    for k, write in enumerate((SummaryWriter.add_embedding, None)):
        writer = SummaryWriter(str(tmp_path / str(k)))
        for step, img in ((3, imgs), (4, None)):
            args = (feats * step, meta, img, step, "viz-embeddings/pen ultimate", ["label", "prediction"])
            if write is None:
                _add_embedding(writer, *args)
            else:
                writer.add_embedding(args[0], metadata=meta, label_img=img, global_step=step, tag=args[4],
                                     metadata_header=args[5])  # fmt: skip
        writer.close()
        root = tmp_path / str(k)
        files.append({str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and
                      "tfevents" not in p.name})  # fmt: skip
    assert len(files[0]) == 6 and files[0] == files[1]  # 2 x (tensors, metadata), a sprite, the config
    assert files[1]["00003/viz-embeddings%2fpen ultimate/tensors.tsv"].startswith(b"3.0\t-0.0\t4.203895392974451e-45\t")


def test_projector_sprites_of_non_square_probes_keep_their_aspect_ratio(tmp_path):
    """48x80 probes were squashed into square sprite cells; they keep their shape (the longer side = sprite_size),
    centered on white."""
    from helpers import tiny_trainer
    from torch.utils.data import DataLoader, TensorDataset

    x, y = torch.zeros(6, 3, 48, 80), torch.arange(6) % 3
    x[:, 0] = 1.0  # red images: the white rows above and below them show the letterbox
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    cb = EmbeddingCallback(num_probes=6, projection=["pca"], sprite_size=20)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), loader, loader)
    (sprite,) = list(tmp_path.rglob("sprite.png"))
    cell = np.asarray(Image.open(sprite))[:20, :20]  # the first probe's 20 x 20 cell
    red = (cell[..., 0] > 200) & (cell[..., 1] < 50)
    rows, cols = np.nonzero(red.any(1))[0], np.nonzero(red.any(0))[0]
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (4, 16, 0, 20)  # 12 x 20: 48 x 80 scaled
    assert (cell[:4] == 255).all() and (cell[16:] == 255).all()


def test_two_embedding_callbacks_of_one_layer_need_names(tmp_path):
    """Two EmbeddingCallbacks of the penultimate features (one PCA, one t-SNE: distinct checkpoint keys) both wrote
    viz-embeddings/penultimate/{silhouette,knn_accuracy} and the projector entry 'viz-embeddings/penultimate:<epoch>' at
    every epoch: two projector_config.pbtxt entries of one name (TensorBoard shows the first) over one folder of files.
    Refused at setup naming the fix; with name= each gets its own entries."""
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    train, val = tiny_loaders(n=12)
    cbs = [EmbeddingCallback(num_probes=6, projection=p) for p in ("pca", "tsne")]
    clash = r"both write viz-embeddings/\{penultimate \(projector\), penultimate/knn_accuracy"
    with pytest.raises(ValueError, match=clash):
        tiny_trainer(str(tmp_path / "a"), cbs, max_epochs=1).fit(LitTiny(), train, val)
    cbs = [EmbeddingCallback(num_probes=6, projection=p, name=p) for p in ("pca", "tsne")]
    trainer = tiny_trainer(str(tmp_path / "b"), cbs, max_epochs=1)
    trainer.fit(LitTiny(), train, val)
    config = ProjectorConfig()
    text_format.Parse(Path(trainer.logger.log_dir, "projector_config.pbtxt").read_text(), config)
    names = [e.tensor_name for e in config.embeddings]
    assert names == ["viz-embeddings/pca/penultimate:00000", "viz-embeddings/tsne/penultimate:00000"]
    tags = read_events(str(tmp_path / "b")).Tags()["scalars"]
    want = {f"viz-embeddings/{p}/penultimate/{s}" for p in ("pca", "tsne") for s in ("silhouette", "knn_accuracy")}
    assert want <= set(tags)
    # other layers: no clash
    cbs = [EmbeddingCallback(num_probes=6, projector=False), EmbeddingCallback(layers="net.conv2", num_probes=6)]
    tiny_trainer(str(tmp_path / "c"), cbs, max_epochs=1).fit(LitTiny(), train, val)


def test_sprite_over_tensorboards_limit_fails_at_setup():
    """2048 probes at sprite_size=224 made a 10304 px sprite, which TensorBoard's Projector refuses ('Sprite image of
    dimensions 10304px x 10304px exceeds maximum dimensions 8192px x 8192px': the embedding does not load) after a
    whole epoch; refused at construction naming the largest sprite_size that fits."""
    from lightning_viz.callbacks.embeddings import SPRITE_MAX_PX, sprite_cell_limit
    from lightning_viz.probe import ProbeSet

    assert SPRITE_MAX_PX == 8192 and sprite_cell_limit(2048) == 178 and sprite_cell_limit(4096) == 128
    with pytest.raises(
        ValueError,
        match=r"EmbeddingCallback: sprite_size=224 with 2048 probes makes a 10304 px .*"
        r"8192 px a side: use sprite_size <= 178, fewer probes, or projector=False",
    ):
        EmbeddingCallback(num_probes=2048, sprite_size=224)
    EmbeddingCallback(num_probes=2048, sprite_size=178)  # 46 x 178 = 8188 px
    EmbeddingCallback(num_probes=2048, sprite_size=224, projector=False)
    probes = ProbeSet(images=torch.zeros(100, 3, 4, 4))  # an explicit probe set: its size counts
    with pytest.raises(ValueError, match=r"with 100 probes .* sprite_size <= 819,"):
        EmbeddingCallback(probes=probes, sprite_size=1000)


def test_separation_scores_of_probes_without_two_classes_to_compare_are_not_logged(tmp_path):
    """One class among the probes logged a NaN silhouette and a knn_accuracy of 1.0 at every epoch; 6 probes of 6
    classes (a stratified pick from many classes, as 128 probes of ImageNet) a NaN silhouette and a knn_accuracy of
    0.0 (no neighbour can share a class), read as a model that separates nothing. Neither is logged now, with a
    warning why."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_viz.callbacks.base import VisualizationWarning

    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for name, y, classes, msg in (
        ("one", torch.zeros(16, dtype=torch.long), 3, r"the 6 probes hold one class: nothing to separate; silhouette"),
        ("each", torch.arange(16) % 8, 8, r"the 6 probes hold 6 classes, one probe each; .*\(raise num_probes"),
    ):
        loader = DataLoader(TensorDataset(x, y), batch_size=8)
        cb = EmbeddingCallback(num_probes=6, projection="pca", projector=False)
        with pytest.warns(VisualizationWarning, match=msg):
            tiny_trainer(str(tmp_path / name), [cb], max_epochs=1).fit(LitTiny(TinyCNN(num_classes=classes)), loader)
        assert len(torch.unique(cb.probes.labels)) == (1 if name == "one" else 6)
        tags = read_events(str(tmp_path / name)).Tags()
        assert "viz-embeddings/penultimate/pca" in tags["images"]
        assert not [t for t in tags["scalars"] if t.endswith(("silhouette", "knn_accuracy"))], tags["scalars"]


def test_pca_scatter_says_how_much_variance_it_shows(tmp_path, monkeypatch):
    """The PCA scatter did not say how much of the features' variance its plane holds (a plane of 10% looks as
    clustered as one of 90%); its title gives each axis's share, as scikit-learn's explained_variance_ratio_. The
    t-SNE title said 'TSNE'."""
    from sklearn.decomposition import PCA

    import lightning_viz.callbacks.embeddings as emb
    from lightning_viz.methods.embeddings import pca_variance_ratio

    g = torch.Generator().manual_seed(0)
    f = torch.randn(40, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 1.0, 0.5, 0.1])
    ratio = PCA(2).fit(f.double().numpy()).explained_variance_ratio_
    np.testing.assert_allclose(pca_variance_ratio(f), ratio, rtol=1e-9)
    np.testing.assert_allclose(pca_variance_ratio(f, pca_2d(f)), ratio, rtol=1e-6)  # from the scores: no second SVD
    assert pca_variance_ratio(torch.ones(5, 3)) == [0.0, 0.0] and pca_variance_ratio(f[:, :1])[1] == 0.0

    titles = []
    draw = emb.scatter_image
    monkeypatch.setattr(
        emb, "scatter_image", lambda pts, lab, title, **kw: titles.append(title) or draw(pts, lab, title, **kw)
    )
    cb = EmbeddingCallback(num_probes=12, projection=["pca", "tsne"], projector=False)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
    trainer.fit(LitTiny(), *tiny_loaders())
    r1, r2 = pca_variance_ratio(extract_features(trainer.lightning_module.eval(), cb.probes.images)[0])
    assert titles == [
        f"penultimate PCA, epoch 0 (PC1 {r1:.0%}, PC2 {r2:.0%} of variance)",
        "penultimate t-SNE, epoch 0",
    ]


def test_probes_without_class_labels_are_warned_once(tmp_path):
    """Labels with -1 marking unlabeled items (not class indices: the probes get no labels) silently gave uncolored
    scatters and no separation scores; now one warning says why, once per run, not at every epoch (likewise for
    probes of one class)."""
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_viz.callbacks.base import VisualizationWarning

    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.where(torch.arange(16) % 4 == 0, -1, torch.arange(16) % 3)

    class IgnoreUnlabeled(LitTiny):
        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self(batch[0]), batch[1], ignore_index=-1)

    for name, labels, msg in (
        ("unlabeled", y, r"no class labels \(.* -1 marking unlabeled items"),
        ("one", y.clamp(0, 0), "hold one class"),
    ):
        loader = DataLoader(TensorDataset(x, labels), batch_size=8)
        cb = EmbeddingCallback(num_probes=6, projection="pca", projector=False)
        with pytest.warns(VisualizationWarning) as caught:
            tiny_trainer(str(tmp_path / name), [cb], max_epochs=2).fit(IgnoreUnlabeled(), loader)
        said = [str(w.message) for w in caught if re.search(msg, str(w.message))]
        assert len(said) == 1 and said[0].startswith("EmbeddingCallback: the "), [str(w.message) for w in caught]
        assert cb.probes.labels is None if name == "unlabeled" else cb.probes.labels.tolist() == [0] * 6
        assert image_steps(read_events(str(tmp_path / name)), "viz-embeddings/penultimate/pca") == [0, 1]


def test_knn_accuracy_of_any_integer_labels_matches_sklearn():
    """knn_accuracy (public) raised 'index -1 is out of bounds' for labels with -1, and allocated a vote column per
    integer up to the largest label (ids such as 10**9); labels are any integers, as scikit-learn's."""
    from sklearn.model_selection import LeaveOneOut, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    feats, labels = _clusters(seed=1, per=12, dims=8, spread=0.4)
    labels = labels % 2  # two classes, k odd: no tied votes (sklearn gives ties to the lowest label, this function
    # to the nearest neighbour's class)
    want = cross_val_score(KNeighborsClassifier(5), feats.numpy(), labels.numpy(), cv=LeaveOneOut()).mean()
    assert 0.3 < want < 1.0  # overlapping clusters: some mistakes
    for relabeled in (labels, labels - 1, labels * 10**9 - 7):
        assert knn_accuracy(feats, relabeled, k=5) == pytest.approx(want)


def test_class_names_with_tabs_or_line_breaks_keep_the_projector_metadata_one_row_per_probe(tmp_path):
    """A class name with a tab or a line break (names read from a file) split its metadata.tsv row: more lines than
    probes, which TensorBoard's Projector refuses ('Number of tensors (6) do not match the number of lines in
    metadata'), and a line break crashed the scatter's legend ('can't measure length of multiline text'). Those
    characters are written as spaces; TensorBoard's projector plugin serves one row per probe."""
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug.test import EnvironBuilder

    from lightning_viz.methods.embeddings import scatter_image

    names = ["tabby\tcat", "golden\nretriever", "red\r\nfox"]
    cb = EmbeddingCallback(num_probes=6, projection="pca", sprite_size=8, class_names=names)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))

    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    provider = data_provider.MultiplexerDataProvider(mux, str(tmp_path))
    plugin = ProjectorPlugin(base_plugin.TBContext(logdir=str(tmp_path), data_provider=provider, multiplexer=mux))
    route = plugin.get_plugin_apps()["/metadata"]
    env = EnvironBuilder(query_string={"run": "version_0", "name": "viz-embeddings/penultimate:00000"}).get_environ()
    rows = b"".join(route(env, lambda *a: None)).decode().splitlines()
    clean = ["tabby cat", "golden retriever", "red  fox"]
    assert rows[0] == "label\tprediction" and len(rows) == 7
    assert [r.split("\t")[0] for r in rows[1:]] == [clean[i] for i in cb.probes.labels.tolist()]
    assert all(r.split("\t")[1] in clean for r in rows[1:])
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-embeddings/penultimate/pca") == [0]  # the legend (was: "can't measure length")
    scatter_image(torch.randn(3, 2), torch.arange(3), "direct", class_names=names)


def test_embeddings_show_progress_of_the_forward_and_the_tsne(tmp_path, caplog, monkeypatch):
    """1500 probes took 33 s at an epoch end (the forward, then t-SNE) without a word; the forward's chunks and the
    exact t-SNE's iterations log progress lines like the other long loops."""
    import logging

    import lightning_viz.progress as progress_module

    monkeypatch.setattr(progress_module.logger, "propagate", True)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # every check: a line
    caplog.set_level(logging.INFO, logger="lightning_viz")
    cb = EmbeddingCallback(num_probes=12, projection="tsne", projector=False, chunk_size=4, tsne_iterations=300)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-viz embeddings: ")]
    assert [m.split(" (")[0] for m in lines if "probe images" in m] == [
        f"lightning-viz embeddings: {k}/12 probe images" for k in (4, 8, 12)
    ]
    tsne = [int(m.split(": ")[1].split("/")[0]) for m in lines if "/300 t-SNE iterations" in m]
    assert tsne[:5] == [50, 100, 150, 200, 250] and tsne == sorted(tsne), lines


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_knn_accuracy_refuses_a_k_that_is_not_a_count(k):
    """Was: k=0 -> torch's "argmax(): Expected reduction dim 1 to have non-zero size", 2.5 -> a slicing TypeError."""
    feats, labels = torch.randn(6, 3), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match=rf"knn_accuracy: k must be a whole number >= 1; got {k!r}"):
        knn_accuracy(feats, labels, k=k)
    assert knn_accuracy(feats, labels, k=np.int64(9)) == knn_accuracy(feats, labels, k=5)  # capped at N - 1 = 5


@pytest.mark.parametrize("perplexity", [0.0, -5.0, float("nan"), float("inf")])
def test_tsne_refuses_a_perplexity_that_is_not_positive_and_finite(perplexity):
    """Was: 0, a negative or a NaN perplexity silently ran with perplexity 1 (and inf with N / 3)."""
    with pytest.raises(ValueError, match=rf"tsne_2d: perplexity must be a finite number > 0; got {perplexity}"):
        tsne_2d(torch.randn(20, 3), perplexity=perplexity)


def test_embedding_scores_and_scatter_refuse_labels_that_are_not_one_per_point():
    """Was: silhouette -> torch's "index_add_(): Number of indices (3) should be equal to source.size(dim)",
    knn_accuracy -> an IndexError, scatter_image -> silently left points 3 and 4 out (more labels than points: an
    IndexError); and a [N, 3] scatter silently dropped the third coordinate."""
    feats, three = torch.randn(5, 2), torch.tensor([0, 1, 0])
    for fn in (silhouette, knn_accuracy, scatter_image):
        with pytest.raises(ValueError, match=rf"{fn.__name__}: labels must hold one label per point: got 3 for 5"):
            fn(feats, three)
    with pytest.raises(ValueError, match=r"scatter_image: points must be \[N, 2\]; got \(5, 3\)"):
        scatter_image(torch.randn(5, 3), None)
    assert scatter_image(feats, torch.tensor([[0], [1], [0], [1], [1]])).shape[0] == 3  # [N, 1] labels are fine
