"""Batch sizes from the memory budget: measured once, bounded forwards, and results identical to one batch."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN

from lightning_viz.capture import isolated
from lightning_viz.methods import batching
from lightning_viz.methods import cam as C
from lightning_viz.methods import gradients as G
from lightning_viz.methods.metrics import perturbation_curve, perturbation_curves
from lightning_viz.methods.occlusion import occlusion


def test_activation_bytes_are_the_leaf_outputs_and_measured_once():
    model = TinyCNN(width=2).eval()  # conv1, bn1, relu (in place), conv2, pool, fc on a 3x8x8 image
    calls = []
    model.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    x = torch.randn(5, 3, 8, 8)
    expected = 4 * (3 * 64 + 2 * 64 * 4 + 2 + 3)  # image, conv1/bn1/relu/conv2 maps, pooled, logits (float32)
    assert batching.activation_bytes_per_image(model, x[:1]) == expected
    assert batching.activation_bytes_per_image(model, x[2:3]) == expected and calls == [1]  # cached
    assert batching.images_per_forward(model, x, memory_mb=expected * 10 / 2**20) == 10
    ten = expected * 10 / 2**20
    assert batching.images_per_forward(model, x, memory_mb=ten, grad=True) == 10 // batching.GRAD_FACTOR
    assert batching.images_per_forward(model, x, memory_mb=1e-9) == 1
    assert batching.images_per_forward(model, x) == int(batching.CPU_MEMORY_MB * 2**20 // expected)
    with pytest.raises(ValueError, match="memory_mb must be > 0"):
        batching.images_per_forward(model, x, memory_mb=0)


@pytest.fixture
def small_budget(monkeypatch):
    """A default budget of 7 images (3 with a backward) of the TinyCNN at 8 px, so defaults really chunk."""
    per_image = 4 * (3 * 64 + 2 * 64 * 4 + 2 + 3)
    monkeypatch.setattr(batching, "CPU_MEMORY_MB", 7 * per_image / 2**20)


def _batches(model):
    sizes = []
    handle = model.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    return sizes, handle


def test_default_chunks_follow_the_budget_and_change_nothing(small_budget):
    model = TinyCNN(width=2).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0])
    maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1))
    runs = {
        "integrated_gradients": lambda c: G.integrated_gradients(model, x, "label", labels, c, steps=5),
        "smoothgrad": lambda c: G.smoothgrad(G.saliency, model, x, "label", labels, c, n_samples=5, seed=3),
        "smoothgrad_ig": lambda c: G.smoothgrad(
            G.integrated_gradients, model, x, "label", labels, c, n_samples=2, seed=3, steps=3
        ),
        "scorecam": lambda c: C.class_activation_map(model, x, "conv1", "scorecam", "label", labels, c),
        "saliency": lambda c: G.saliency(model, x, "label", labels, c),  # the shared forward + backward
        "gradcam": lambda c: C.class_activation_map(model, x, "conv1", "gradcam", "label", labels, c),
        "deletion": lambda c: perturbation_curve(model, x, maps, "label", labels, steps=6, chunk_size=c),
        "occlusion": lambda c: occlusion(model, x, "label", labels, window=4, stride=2, chunk_size=c)["score"],
    }
    with isolated(model):
        for name, run in runs.items():
            one_batch = run(10**6)
            sizes, handle = _batches(model)
            try:
                default = run(None)
            finally:
                handle.remove()
            grad = name.startswith(("integrated", "smoothgrad", "saliency", "gradcam"))
            cap = 7 // batching.GRAD_FACTOR if grad else 7
            if name in ("saliency", "gradcam"):  # 4 probes, 3 a pass (the budget was measured by an earlier run)
                assert sizes == [3, 1], (name, sizes)
            else:
                assert max(sizes[1:]) <= max(cap, len(x)) and len(sizes) >= 3, (name, sizes)  # several forwards
            torch.testing.assert_close(default, one_batch, rtol=1e-5, atol=1e-6, msg=name)


def test_deletion_curves_on_the_cpu_forward_at_most_the_throughput_budget(monkeypatch):
    """On the CPU the curves' batches also stop at CPU_THROUGHPUT_MB of activations (cache-sized), same result."""
    model = TinyCNN(width=2).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = {"a": torch.rand(4, 8, 8), "b": torch.rand(4, 4, 4)}
    labels = torch.tensor([0, 1, 2, 0])
    per_image = batching.activation_bytes_per_image(model, x[:1])
    with isolated(model):
        whole = perturbation_curves(model, x, maps, labels, steps=6, chunk_size=10**6)
        monkeypatch.setattr(batching, "CPU_THROUGHPUT_MB", 9 * per_image / 2**20)
        sizes, handle = _batches(model)
        try:
            capped = perturbation_curves(model, x, maps, labels, steps=6)
        finally:
            handle.remove()
    assert max(sizes) == 9 and sum(sizes) == (3 + 2 * 2 * 5) * 4
    for mode in whole:
        for key in maps:
            torch.testing.assert_close(capped[mode][key], whole[mode][key], rtol=1e-5, atol=1e-6)
