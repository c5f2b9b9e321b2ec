"""Gradient methods (hand-computed on linear / tiny models, chunking, SmoothGrad seeding, torchvision) and
GradientCallback."""

import io

import numpy as np
import pytest
import torch
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

from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.capture import isolated
from lightning_viz.methods import gradients as G


def _linear_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 4))
    return model, model[1].weight.detach().view(4, 2, 3, 3)


def _x(b=3, c=2, s=3, seed=0):
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(seed))


def test_linear_model_hand_computed():
    model, W = _linear_model()
    x, labels = _x(), torch.tensor([0, 3, 1])
    with isolated(model):
        g = G.gradient(model, x, "label", labels)
        assert torch.equal(g, W[labels])
        assert torch.equal(G.saliency(model, x, "label", labels), W[labels].abs().amax(dim=1))
        torch.testing.assert_close(G.input_x_gradient(model, x, 2), x * W[2])
        # no ReLU: guided/deconv rules change nothing
        assert torch.equal(G.guided_backprop(model, x, 2), W[[2, 2, 2]])
        # linear: IG is exact, (x - baseline) * W_c, for any number of steps
        torch.testing.assert_close(
            G.integrated_gradients(model, x, "label", labels, steps=3, baseline=0.5), (x - 0.5) * W[labels]
        )
        # linear: SmoothGrad of the gradient is the gradient
        torch.testing.assert_close(
            G.smoothgrad(G.gradient, model, x, "label", labels, n_samples=4, sigma=0.3), W[labels]
        )
        # callable target: d(logit0 - logit1)/dx
        torch.testing.assert_close(
            G.gradient(model, x, lambda z: z[:, 0] - z[:, 1]), (W[0] - W[1]).expand(3, -1, -1, -1)
        )


def test_predicted_target_and_saliency_on_relu_net():
    model = TinyCNN(width=3).eval()
    x = _x(4, 3, 8)
    with isolated(model):
        pred = model(x).argmax(1)
        torch.testing.assert_close(G.gradient(model, x, "predicted"), G.gradient(model, x, "label", pred))
        # guided backprop on a model using F.relu differs from the plain gradient
        assert not torch.allclose(G.guided_backprop(model, x, "predicted"), G.gradient(model, x, "predicted"))
        assert not torch.allclose(G.deconvnet(model, x, "predicted"), G.guided_backprop(model, x, "predicted"))


def test_integrated_gradients_completeness():
    torch.manual_seed(0)
    model = TinyCNN(width=3).eval()
    x = _x(2, 3, 8)
    with isolated(model):
        ig = G.integrated_gradients(model, x, 1, chunk_size=256, steps=128)
        logits = model(x)[:, 1] - model(torch.zeros_like(x))[:, 1]
    torch.testing.assert_close(ig.sum(dim=(1, 2, 3)), logits.detach(), rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("name", list(G.GRADIENT_METHODS))
def test_chunked_equals_unchunked(name):
    model = TinyCNN(width=3).eval()
    x, labels = _x(5, 3, 8), torch.tensor([0, 1, 2, 0, 1])
    kw = {"steps": 5} if name == "integrated_gradients" else {}
    fn = G.GRADIENT_METHODS[name]
    with isolated(model):
        full = fn(model, x, "label", labels, None, **kw)
        for chunk in (1, 2, 3):
            torch.testing.assert_close(fn(model, x, "label", labels, chunk, **kw), full, rtol=1e-5, atol=1e-6)
        sg = G.smoothgrad(fn, model, x, "predicted", None, None, n_samples=3, sigma=0.2, seed=5, **kw)
        torch.testing.assert_close(
            G.smoothgrad(fn, model, x, "predicted", None, 4, n_samples=3, sigma=0.2, seed=5, **kw),
            sg,
            rtol=1e-5,
            atol=1e-6,
        )


def test_smoothgrad_seeded_and_rng_untouched():
    model = TinyCNN(width=3)
    model.train()
    x = _x(2, 3, 8)

    def run(seed):
        with isolated(model):
            return G.smoothgrad(G.saliency, model, x, 0, n_samples=4, sigma=0.2, seed=seed)

    a = check_untouched(model, lambda: run(3))
    b = check_untouched(model, lambda: run(3))
    c = run(4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    with isolated(model):
        assert not torch.allclose(a, G.saliency(model, x, 0))
        assert torch.allclose(G.smoothgrad(G.saliency, model, x, 0, n_samples=2, sigma=0.0), G.saliency(model, x, 0))
    with pytest.raises(ValueError, match="n_samples >= 1"):
        G.smoothgrad(G.saliency, model, x, 0, n_samples=0)


def test_smoothgrad_noise_is_per_image_so_a_ddp_split_changes_nothing():
    model = TinyCNN(width=3).eval()
    x = _x(5, 3, 8)
    with isolated(model):
        whole = G.smoothgrad(G.gradient, model, x, "predicted", n_samples=3, sigma=0.3, seed=7)
        # rank 0 gets probes 0..2, rank 1 probes 3..4 (global ids passed, as GradientCallback does)
        split = torch.cat(
            [
                G.smoothgrad(G.gradient, model, x[:3], "predicted", n_samples=3, sigma=0.3, seed=7, ids=[0, 1, 2]),
                G.smoothgrad(G.gradient, model, x[3:], "predicted", n_samples=3, sigma=0.3, seed=7, ids=[3, 4]),
            ]
        )
        torch.testing.assert_close(split, whole)
        shifted = G.smoothgrad(G.gradient, model, x[3:], "predicted", n_samples=3, sigma=0.3, seed=7)  # ids 0, 1
        assert not torch.allclose(shifted, whole[3:])


def torchvision_model(arch: str) -> nn.Module:
    """A torchvision architecture with weights=None; vgg11's 120M-parameter classifier is narrowed
    (same Linear-ReLU(inplace)-Dropout structure) to keep CPU tests fast."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=3)
    if arch == "vgg11":
        model.classifier[0] = nn.Linear(512 * 7 * 7, 32)
        model.classifier[3] = nn.Linear(32, 32)
        model.classifier[6] = nn.Linear(32, 3)
    return model


def test_callback_options_are_validated():
    with pytest.raises(ValueError, match="unknown gradient method 'gradcam'; allowed: saliency, gradient"):
        GradientCallback(methods=["gradcam"])
    with pytest.raises(ValueError, match="unknown target 'best'"):
        GradientCallback(target="best")
    with pytest.raises(ValueError, match="reduce must be"):
        GradientCallback(reduce="max")
    assert GradientCallback(reduce="sum").signed
    a, b = GradientCallback(methods=["saliency"]), GradientCallback(methods=["gradient"])
    assert a.state_key != b.state_key


def test_callback_logs_every_method_at_scheduled_epochs(tmp_path):
    methods = [
        "saliency",
        "gradient",
        "guided_backprop",
        "deconvnet",
        "input_x_gradient",
        "integrated_gradients",
        "smoothgrad_saliency",
    ]
    cb = GradientCallback(
        methods=methods,
        num_probes=3,
        every_n_epochs=2,
        ig_steps=4,
        smoothgrad_samples=2,
        chunk_size=2,
        normalize="both",
        layout="per_probe",
    )
    tl, vl = tiny_loaders(n=24)
    tiny_trainer(str(tmp_path), [cb], max_epochs=3).fit(LitTiny(TinyCNN(width=3)), tl, vl)
    acc = read_events(str(tmp_path))
    for m in methods:
        for pid in ("p000", "p001", "p002"):
            assert image_steps(acc, f"viz-gradients/{m}/input/{pid}") == [1, 2]
            assert image_steps(acc, f"viz-gradients/{m}/input/{pid}/fixed") == [1, 2]
        assert scalar_steps(acc, f"viz-gradients/{m}/input/stats/max_abs") == [1, 2]
    assert scalar_steps(acc, "viz-gradients/time_s") == [1, 2]
    assert "viz-gradients/saliency/input/p003" not in acc.Tags()["images"]
    img = acc.Images("viz-gradients/saliency/input/p000")[0]
    # 8 px probes upscaled 16x to the default display_px, the colorbar (24) of the map's own range under them
    assert (img.width, img.height) == (128, 128 + 24)
    # blended at the probe's 8 px and zoomed with it: one uniform 16 x 16 block per probe pixel
    pixels = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB"))
    blocks = pixels[:128].reshape(8, 16, 8, 16, 3)
    assert (blocks == blocks[:, :1, :, :1]).all() and len(np.unique(blocks[:, 0, :, 0].reshape(-1, 3), axis=0)) > 8


def test_callback_under_validate_inference_mode(tmp_path):
    cb = GradientCallback(
        methods=["saliency", "guided_backprop"], num_probes=2, run_on="validation_epoch_end", target="predicted"
    )
    _tl, vl = tiny_loaders(n=12)
    model = LitTiny(TinyCNN(width=3))
    tiny_trainer(str(tmp_path), [cb]).validate(model, vl)
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-gradients/panel/p001") == [0]
    assert scalar_steps(acc, "viz-gradients/guided_backprop/input/stats/std") == [0]
    assert all(p.grad is None for p in model.parameters())


def test_callback_on_a_float64_model():
    """The probes (float32) follow the model's dtype, not only its device."""
    from lightning_viz.probe import ProbeSet

    lit = LitTiny(TinyCNN(width=3)).double()
    probe = ProbeSet(_x(2, 3, 8).float(), labels=torch.tensor([0, 2]))
    cb = GradientCallback(
        methods=["saliency", "integrated_gradients", "smoothgrad_gradient"], ig_steps=2, smoothgrad_samples=2
    )
    cb.check(lit)
    with isolated(lit):
        maps = cb.compute_maps(lit, probe)
        expected = G.saliency(lit, probe.images.double(), "label", probe.labels)
    assert maps["saliency/input"].dtype == torch.float64
    torch.testing.assert_close(maps["saliency/input"], expected)


def test_empty_batch_gives_empty_maps_like_every_other_method():
    model = TinyCNN(width=3).eval()
    x = _x(0, 3, 8)
    with isolated(model):
        assert G.smoothgrad(G.gradient, model, x, 0, n_samples=2).shape == (0, 3, 8, 8)
        assert G.smoothgrad(G.saliency, model, x, 0, n_samples=2, chunk_size=3).shape == (0, 8, 8)
        assert G.saliency(model, x, 0).shape == (0, 8, 8)


def test_ig_baseline_and_chunk_size_errors_are_clear():
    model = TinyCNN(width=3).eval()
    x = _x(2, 3, 8)
    with isolated(model):
        with pytest.raises(ValueError, match=r"baseline of shape \(3, 5, 5\) does not broadcast.*\[C, 1, 1\]"):
            G.integrated_gradients(model, x, 0, baseline=torch.zeros(3, 5, 5), steps=2)
        with pytest.raises(TypeError, match=r"chunk_size must be a whole number.*got 2\.5"):
            G.integrated_gradients(model, x, 0, chunk_size=2.5, steps=2)  # type: ignore[arg-type]
        # a per-channel baseline broadcasts; a numpy integer chunk size is a whole number
        base = torch.zeros(3, 1, 1)
        per_channel = G.integrated_gradients(model, x, 0, baseline=base, steps=2, chunk_size=np.int64(3))
        torch.testing.assert_close(per_channel, G.integrated_gradients(model, x, 0, steps=2))
