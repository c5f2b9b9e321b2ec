"""Batch sizes from the memory budget: measured once, bounded forwards, and results identical to one batch."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyCNN
from torch import nn

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


def test_occlusion_on_the_cpu_forwards_at_most_the_throughput_budget(monkeypatch):
    """Occlusion's default batches on the CPU stop at CPU_THROUGHPUT_MB of activations too (the demo's 392 occluded
    images in one forward cost ~1.5x per image what batches of 144 do), with the same drops as one forward."""
    model = TinyCNN(width=2).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    per_image = batching.activation_bytes_per_image(model, x[:1])
    monkeypatch.setattr(batching, "CPU_THROUGHPUT_MB", 9 * per_image / 2**20)
    with isolated(model):
        whole = occlusion(model, x, "predicted", window=4, stride=2, chunk_size=10**6)
        sizes, handle = _batches(model)
        try:
            capped = occlusion(model, x, "predicted", window=4, stride=2)
        finally:
            handle.remove()
    assert sizes[0] == 4 and max(sizes[1:]) == 9 and sum(sizes[1:]) == 4 * 9  # the images, then 3 x 3 windows each
    for key in whole:
        torch.testing.assert_close(capped[key], whole[key], rtol=1e-5, atol=1e-6)


def test_scorecam_on_the_cpu_forwards_at_most_its_own_budget(monkeypatch):
    """Score-CAM's masked images go in batches of at most CPU_SCORECAM_MB of activations and CPU_SCORECAM_MAX_IMAGES
    on the CPU (resnet18 at 64 px, 2 threads: 215 masked images a forward, the memory budget, cost ~1.2x per image
    what 20 do; 20, the curves' CPU_THROUGHPUT_MB, ~1.1x what 32-33 do), with the same weights as one forward."""
    from lightning_viz.methods.cam import class_activation_map

    model = TinyCNN(width=2).eval()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    per_image = batching.activation_bytes_per_image(model, x[:1])
    monkeypatch.setattr(batching, "CPU_THROUGHPUT_MB", 3 * per_image / 2**20)  # not Score-CAM's
    monkeypatch.setattr(batching, "CPU_SCORECAM_MB", 10 * per_image / 2**20)  # above CPU_MIN_IMAGES (8)
    assert batching.images_per_forward(model, x) > 8 * 2
    with isolated(model):
        whole = class_activation_map(model, x, "conv2", "scorecam", "predicted", chunk_size=10**6)
        sizes, handle = _batches(model)
        try:
            capped = class_activation_map(model, x, "conv2", "scorecam", "predicted")
            monkeypatch.setattr(batching, "CPU_SCORECAM_MAX_IMAGES", 9)
            class_activation_map(model, x, "conv2", "scorecam", "predicted")
        finally:
            handle.remove()
    assert model.conv2.out_channels == 2
    # the probes, then 8 x 2 masked images ten at a time; with the cap, nine
    assert sizes == [8, 10, 6, 8, 9, 7]
    torch.testing.assert_close(capped, whole, rtol=1e-5, atol=1e-6)


def test_integrated_gradients_and_smoothgrad_on_the_cpu_go_at_most_64_images_at_a_time():
    """The path points of integrated gradients and SmoothGrad's noisy images go forward + backward at most
    CPU_GRAD_MAX_IMAGES (64) at a time on the CPU, though the memory budget holds them all (the demo's 128 points in
    one batch cost ~1.35x what batches of 64 do), with the result of one batch."""
    model = TinyCNN(width=2).eval()
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8) % 2
    assert batching.CPU_GRAD_MAX_IMAGES == 64 and batching.images_per_forward(model, x, grad=True) > 8 * 16
    with isolated(model):
        whole_ig = G.integrated_gradients(model, x, "label", y, steps=16, chunk_size=10**6)
        whole_sg = G.smoothgrad("saliency", model, x, "label", y, chunk_size=10**6, n_samples=16)
        sizes, handle = _batches(model)
        try:
            ig = G.integrated_gradients(model, x, "label", y, steps=16)
            ig_sizes, sizes[:] = list(sizes), []
            sg = G.smoothgrad("saliency", model, x, "label", y, n_samples=16)
        finally:
            handle.remove()
    assert max(ig_sizes) == 64 and sum(s for s in ig_sizes if s != 8) == 8 * 16  # after the target's forward
    assert max(sizes) == 64 and sum(s for s in sizes if s != 8) == 8 * 16
    torch.testing.assert_close(ig, whole_ig, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sg, whole_sg, rtol=1e-5, atol=1e-6)


def test_deletion_curves_on_the_cpu_forward_a_few_large_images_at_once(monkeypatch):
    """Images whose activations exceed CPU_THROUGHPUT_MB (resnet18 at 224 px: ~29 MiB each, the cap 48 MiB) still go
    CPU_MIN_IMAGES at a time (was: one image per forward, ~1.4x the time per image), never more than the memory budget
    holds; same curves."""
    model = TinyCNN(width=2).eval()
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    maps = {"a": torch.rand(4, 8, 8), "b": torch.rand(4, 4, 4)}
    labels = torch.tensor([0, 1, 2, 0])
    per_image = batching.activation_bytes_per_image(model, x[:1])
    monkeypatch.setattr(batching, "CPU_THROUGHPUT_MB", 0.5 * per_image / 2**20)  # not one image
    with isolated(model):
        whole = perturbation_curves(model, x, maps, labels, steps=6, chunk_size=10**6)
        for budget_images, expected in ((100, batching.CPU_MIN_IMAGES), (3, 3)):
            monkeypatch.setattr(batching, "CPU_MEMORY_MB", budget_images * per_image / 2**20)
            sizes, handle = _batches(model)
            try:
                capped = perturbation_curves(model, x, maps, labels, steps=6)
            finally:
                handle.remove()
            assert max(sizes) == expected and sum(sizes) == (3 + 2 * 2 * 5) * 4, (budget_images, sizes)
            for mode in whole:
                for key in maps:
                    torch.testing.assert_close(capped[mode][key], whole[mode][key], rtol=1e-5, atol=1e-6)


class OutOfMemoryAbove(TinyCNN):
    """A TinyCNN whose eval-mode forwards with autograd on (the callbacks' gradient passes, not training or
    validation) of more than ``limit`` images raise ``torch.OutOfMemoryError`` (what CUDA's caching allocator
    raises; no GPU here), to exercise the callbacks' retry at a smaller budget."""

    limit = 10**9

    def forward(self, x):
        if not self.training and torch.is_grad_enabled() and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} images")
        return super().forward(x)


@pytest.mark.parametrize("limit", [40, 1])
def test_a_callback_out_of_device_memory_computes_again_at_half_the_budget(tmp_path, monkeypatch, limit):
    """The default budget holds 64 images with a backward here; integrated gradients (8 probes x 16 points) forward
    64 > 40 images at a time (out of memory), then 32 <= 40 at half the budget: the maps of a run that never ran
    out, logged at every epoch, one warning, training untouched. At ``limit=1`` even 1/8 of the budget is too much:
    three warnings, then the failure names what to change."""
    import warnings as _warnings

    from helpers import LitTiny, read_events, tiny_loaders, tiny_trainer

    from lightning_viz.callbacks.base import OOM_RETRIES, VisualizationError, VisualizationWarning
    from lightning_viz.callbacks.gradients import GradientCallback

    per_image = 4 * (3 * 64 + 4 * 64 * 4 + 4 + 3)  # TinyCNN(width=4) at 8 px, as measured above for width 2
    monkeypatch.setattr(batching, "CPU_MEMORY_MB", 64 * batching.GRAD_FACTOR * per_image / 2**20)

    def fit(limit, logdir, on_error="raise"):
        torch.manual_seed(0)
        net = OutOfMemoryAbove(width=4)
        net.limit = limit
        module = LitTiny(net)
        cb = GradientCallback(
            methods=["integrated_gradients"], ig_steps=16, num_probes=8, target="label", on_error=on_error
        )
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            tiny_trainer(str(logdir), [cb], max_epochs=2).fit(module, *tiny_loaders())
        messages = [str(w.message) for w in caught if issubclass(w.category, VisualizationWarning)]
        fit.failed = [m for m in messages if "still out of memory" in m and "training goes on" in m]
        return module, cb, [m for m in messages if "ran out of device memory" in m]

    if limit == 1:
        with pytest.raises(VisualizationError, match=r"still out of memory at 1/8 of the default memory budget"):
            fit(limit, tmp_path / "fails")
        _, cb, warned = fit(limit, tmp_path / "warns", on_error="warn")
        # epoch 0 halves the budget OOM_RETRIES times and gives up; epoch 1 starts at the smallest budget and gives up
        assert len(warned) == OOM_RETRIES and cb._budget_scale == 0.5**OOM_RETRIES and len(fit.failed) == 2
        return
    module, cb, warned = fit(limit, tmp_path / "oom")
    reference, ref_cb, none = fit(10**9, tmp_path / "ref")
    assert none == [] and ref_cb._budget_scale == 1.0
    assert len(warned) == 1 and cb._budget_scale == 0.5  # epoch 1 kept the half budget
    assert (
        "GradientCallback (gradients) ran out of device memory (CUDA out of memory. Tried to allocate 64 images)"
        in warned[0]
    )
    assert "computing again with half the memory budget per forward" in warned[0]
    for (name, p), q in zip(module.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name  # training untouched by the failed attempt
    got, ref = read_events(str(tmp_path / "oom")), read_events(str(tmp_path / "ref"))
    tags = [t for t in ref.Tags()["images"] if "/panel/" in t]
    assert tags and sorted(got.Tags()["images"]) == sorted(ref.Tags()["images"])
    for tag in tags:
        assert [e.step for e in got.Images(tag)] == [0, 1]
        assert [e.encoded_image_string for e in got.Images(tag)] == [e.encoded_image_string for e in ref.Images(tag)]


def test_activation_bytes_of_a_model_with_a_scripted_leaf_leave_no_hooks():
    """A scripted leaf (it takes no forward hooks) is left uncounted: the others' outputs and the image are summed
    and no hook stays behind (was: RuntimeError 'not supported on ScriptModules', with a hook left on the conv
    registered before it)."""
    import warnings

    from lightning_viz.methods.batching import activation_bytes_per_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        scripted = torch.jit.script(nn.ReLU())
    model = nn.Sequential(nn.Conv2d(3, 4, 3), scripted, nn.Conv2d(4, 4, 3))
    got = activation_bytes_per_image(model, torch.randn(1, 3, 8, 8))
    assert got == 4 * (3 * 8 * 8 + 4 * 6 * 6 + 4 * 4 * 4)  # the image, conv1's and conv2's outputs (float32)
    assert [len(model[i]._forward_hooks) for i in (0, 2)] == [0, 0]
