"""Regularizers, parameterizations and objectives of the input-optimization family do what they claim."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import TinyCNN

from lightning_viz.capture import isolated
from lightning_viz.methods.objectives import channel, class_logit, feature_match, neuron
from lightning_viz.methods.parameterization import FFTParam, PixelParam, make_param
from lightning_viz.methods.regularizers import (
    ClipContribution,
    ClipPixelNorm,
    GaussianBlur,
    Jitter,
    L2Decay,
    L2Penalty,
    TotalVariation,
    build_regularizers,
    gaussian_blur,
)
from lightning_viz.methods.synthesis import class_model_images


def high_freq_energy(x: torch.Tensor) -> torch.Tensor:
    """Energy of the spectrum above half the Nyquist frequency, per image."""
    f = torch.fft.rfft2(x, norm="ortho").abs().pow(2)
    fy = torch.fft.fftfreq(x.shape[-2]).abs().view(-1, 1)
    fx = torch.fft.rfftfreq(x.shape[-1]).view(1, -1)
    high = (fy.pow(2) + fx.pow(2)).sqrt() > 0.25
    return (f * high).flatten(1).sum(1)


def test_gaussian_blur_lowers_high_frequencies_and_keeps_constants():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 16, generator=g)
    blurred = gaussian_blur(x, 1.0)
    assert (high_freq_energy(blurred) < 0.2 * high_freq_energy(x)).all()
    const = torch.full((1, 3, 8, 8), 0.7)
    torch.testing.assert_close(gaussian_blur(const, 1.0), const)
    # every=3: only steps 2, 5, ... blur
    reg = GaussianBlur(1.0, every=3)
    assert torch.equal(reg.project(x, None, 0), x)
    torch.testing.assert_close(reg.project(x, None, 2), blurred)


def _conv_blur(x: torch.Tensor, sigma: float, truncate: float = 3.0) -> torch.Tensor:
    """The straightforward separable blur: a depthwise convolution per axis on the reflect-padded image."""
    c, out = x.shape[1], x
    for axis in (-1, -2):
        r = min(max(1, math.ceil(truncate * sigma)), x.shape[axis] - 1)
        if r <= 0:
            continue
        t = torch.arange(-r, r + 1, dtype=x.dtype)
        k = torch.exp(-0.5 * (t / sigma) ** 2)
        k = k / k.sum()
        if axis == -1:
            out = F.conv2d(F.pad(out, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
        else:
            out = F.conv2d(F.pad(out, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_blur_equals_the_depthwise_convolution(dtype):
    # the blur adds the weighted shifted images (few small kernels) instead of convolving: the same sums, in the
    # same order (bit for bit on the CPUs measured; 1 ulp of slack for another accumulation order)
    g = torch.Generator().manual_seed(0)
    for shape, sigma, truncate in [((4, 3, 32, 32), 0.5, 3.0), ((2, 1, 9, 7), 1.5, 2.0), ((1, 3, 2, 5), 1.0, 3.0)]:
        x = torch.randn(shape, generator=g, dtype=dtype)
        for inp in (x, x.contiguous(memory_format=torch.channels_last), x.transpose(-1, -2).contiguous().mT):
            torch.testing.assert_close(
                gaussian_blur(inp, sigma, truncate), _conv_blur(x, sigma, truncate), rtol=0, atol=1e-6
            )
    x = torch.randn(2, 3, 8, 8, generator=g, dtype=dtype, requires_grad=True)  # differentiable as before
    (gx,) = torch.autograd.grad(gaussian_blur(x, 0.7).pow(2).sum(), x)
    (gc,) = torch.autograd.grad(_conv_blur(x, 0.7).pow(2).sum(), x)
    torch.testing.assert_close(gx, gc, rtol=0, atol=1e-5)


def test_l2_penalty_decay_and_tv_values_by_hand():
    img = torch.ones(1, 1, 2, 2)
    assert L2Penalty(0.5).penalty(img).tolist() == [2.0]
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(L2Decay(0.1).project(x, None, 0).flatten(1).norm(dim=1), 0.9 * x.flatten(1).norm(dim=1))
    ramp = torch.arange(3.0).view(1, 1, 1, 3).expand(1, 1, 3, 3)  # dx = 1, dy = 0 on the 2x2 interior
    assert TotalVariation(1.0).penalty(ramp).tolist() == [4.0]
    assert TotalVariation(2.0, beta=1.0).penalty(ramp).item() == pytest.approx(8.0, rel=1e-3)


def test_clipping_zeroes_only_small_pixels_and_small_contributions():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4)
    out = ClipPixelNorm(50).project(x, None, 0)
    assert (out.flatten() == 0).sum() == 8 and torch.equal(out.flatten()[8:], x.flatten()[8:])
    grad = torch.ones_like(x)
    grad.view(-1)[8:] = 0.0  # large pixels contribute nothing, small ones do
    out = ClipContribution(50).project(x, grad, 0)
    assert torch.equal(out.flatten()[8:], torch.zeros(8)) and torch.equal(out.flatten()[:8], x.flatten()[:8])
    with pytest.raises(ValueError, match="percentile"):
        ClipPixelNorm(100)


class PixelWeights(torch.nn.Module):
    """logit 0 = sum_p w_p x_p with w = 0, 1, ..., 15 over a 1x4x4 image; logit 1 = 0."""

    def forward(self, x):
        s = (x[:, 0] * torch.arange(16.0).view(4, 4)).sum(dim=(1, 2))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_contribution_clipping_in_the_loop_reads_the_objective_gradient_not_the_penalties():
    from lightning_viz.methods.synthesis import optimize_input

    # At I = 1 the contribution |I * dS/dI| is w_p: the 8 pixels with w < 7.5 are zeroed, the others stay ~1.
    # With the L2 penalty's gradient mixed in (|w - 2 * 4 * 1|) the pixels around w = 8 would be zeroed instead.
    res = optimize_input(
        PixelWeights(),
        class_logit(0),
        (1, 1, 4, 4),
        steps=1,
        lr=1e-3,
        optimizer="sgd",
        init=torch.ones(1, 1, 4, 4),
        regularizers=[L2Penalty(4.0), ClipContribution(50)],
    )
    flat = res.images.flatten()
    assert torch.equal(flat[:8], torch.zeros(8))
    torch.testing.assert_close(flat[8:], 1 + 1e-3 * (torch.arange(8.0, 16.0) - 8.0))  # one SGD step on S - 4 ||I||^2


class CountedBackward(torch.autograd.Function):
    """Identity whose backward counts its calls (how many backward passes reach the model's input)."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        CountedBackward.calls += 1
        return g


def test_contribution_clipping_takes_one_backward_per_step_with_the_two_backward_result():
    """The objective's image gradient (for the projections) and the loss gradient come from one backward
    through the model, what two separate backwards (the textbook loop below) give."""
    from lightning_viz.capture import capture
    from lightning_viz.methods.regularizers import total_penalty
    from lightning_viz.methods.synthesis import optimize_input

    torch.manual_seed(0)
    net = TinyCNN(width=4)
    model = torch.nn.Sequential()
    model.add_module("net", net)
    model.forward = lambda x: net(CountedBackward.apply(x))  # type: ignore[method-assign]
    x0 = torch.randn(2, 3, 8, 8)
    options = dict(jitter=1, clip_contribution_percentile=30, tv=1e-2, l2=1e-2, blur_every=2)
    for obj in (class_logit([0, 2]), channel("net.conv2", [1, 3])):
        with isolated(model):
            CountedBackward.calls = 0
            regs = build_regularizers(**options)
            gen = torch.Generator().manual_seed(0)
            res = optimize_input(
                model, obj, (2, 3, 8, 8), steps=4, lr=0.1, optimizer="sgd", init=x0, regularizers=regs, generator=gen
            )
            assert CountedBackward.calls == 4
            regs = build_regularizers(**options)
            for r in regs:
                r.reset(4, torch.Generator().manual_seed(0))
            img = x0.clone().requires_grad_(True)
            for step in range(4):
                x = img
                for r in regs:
                    x = r.transform(x, step)
                with capture(model, obj.layers, grad=True) as cap:
                    o = obj(model(x), cap.outputs).sum()
                loss = -o + total_penalty(regs, img).sum()
                ascent = torch.autograd.grad(o, img, retain_graph=True)[0]
                g = torch.autograd.grad(loss, img)[0]
                with torch.no_grad():
                    img.sub_(0.1 * g)
                    new = img
                    for r in regs:
                        new = r.project(new, ascent, step)
                    img.copy_(new)
        # the closed-form penalty gradients (here) and autograd's (the loop) differ at float rounding only
        torch.testing.assert_close(res.images, img.detach(), rtol=1e-5, atol=1e-6, msg=str(obj))


def test_jitter_is_seeded_bounded_and_leaves_global_rng():
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    a, b, c = Jitter(2), Jitter(2), Jitter(2)
    state = torch.get_rng_state()
    a.reset(20, torch.Generator().manual_seed(5))
    b.reset(20, torch.Generator().manual_seed(5))
    c.reset(20, torch.Generator().manual_seed(6))
    assert torch.equal(torch.get_rng_state(), state)
    assert a._offsets == b._offsets != c._offsets
    assert all(abs(d) <= 2 for o in a._offsets for d in o)
    dy, dx = a._offsets[3]
    assert torch.equal(a.transform(x, 3), torch.roll(x, (dy, dx), (-2, -1)))


def test_build_regularizers_switches_and_validates():
    regs = build_regularizers(
        l2=1.0, tv=1.0, l2_decay=0.1, blur_every=2, clip_percentile=10, clip_contribution_percentile=5, jitter=1
    )
    assert [type(r) for r in regs] == [
        Jitter,
        L2Penalty,
        TotalVariation,
        L2Decay,
        GaussianBlur,
        ClipPixelNorm,
        ClipContribution,
    ]
    assert build_regularizers() == []
    with pytest.raises(ValueError, match="theta"):
        build_regularizers(l2_decay=1.5)


@pytest.mark.parametrize("decorrelate", [True, False])
def test_fft_parameterization_roundtrip(decorrelate):
    x = torch.randn(2, 3, 7, 8, generator=torch.Generator().manual_seed(3))
    p = FFTParam(x, decorrelate=decorrelate)
    torch.testing.assert_close(p.image(), x, atol=1e-5, rtol=1e-5)
    y = x.flip(-1)
    p.set_image(y)
    torch.testing.assert_close(p.image(), y, atol=1e-5, rtol=1e-5)
    assert torch.equal(make_param("pixel", x).image(), x) and isinstance(make_param("pixel", x), PixelParam)
    with pytest.raises(ValueError, match="allowed: 'pixel', 'fft'"):
        make_param("dct", x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fft_parameterization_equals_the_einsum_formula_bit_for_bit(dtype):
    # image(): the color mix as one batched product and the complex scale made once, not einsum and a promotion of the
    # real scale per call: the same image, gradient and written-back spectrum, bit for bit
    g = torch.Generator().manual_seed(4)
    for shape in ((4, 3, 32, 32), (1, 3, 7, 8), (2, 3, 16, 9)):
        x = torch.randn(shape, generator=g, dtype=dtype)
        p = FFTParam(x)
        img = p.image()
        ref = torch.einsum(
            "ij,bjhw->bihw",
            p.color,
            torch.fft.irfft2(torch.view_as_complex(p.spectrum) * p.scale, s=p.size, norm="ortho"),
        )
        assert torch.equal(img, ref)
        seed = torch.randn(shape, generator=g, dtype=dtype)
        assert torch.equal(*(torch.autograd.grad(t, p.spectrum, seed)[0] for t in (img, ref)))
        y = x.flip(-1)
        p.set_image(y)
        coeffs = torch.fft.rfft2(torch.einsum("ij,bjhw->bihw", p.color_inv, y), norm="ortho") / p.scale
        assert torch.equal(p.spectrum.detach(), torch.view_as_real(coeffs))


def test_objectives_compose_and_pick_per_image_targets():
    logits = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    obj = 2 * class_logit([2, 0]) - class_logit(1)
    assert obj(logits).tolist() == [2 * 3.0 - 2.0, 2 * 4.0 - 5.0]
    assert sum([class_logit(0), class_logit(1)])(logits).tolist() == [3.0, 9.0]
    assert obj(logits[1:], rows=torch.tensor([1])).tolist() == [2 * 4.0 - 5.0]  # a chunk keeps its targets
    with pytest.raises(ValueError, match="3 classes"):
        class_logit(5)(logits)
    acts = {"c": torch.arange(2 * 3 * 3 * 3, dtype=torch.float32).view(2, 3, 3, 3)}
    ch = channel("c", [1, 2])
    assert ch.layers == ("c",)
    assert ch(logits, acts).tolist() == [acts["c"][0, 1].mean().item(), acts["c"][1, 2].mean().item()]
    assert neuron("c", [0, 1])(logits, acts).tolist() == [acts["c"][0, 0, 1, 1].item(), acts["c"][1, 1, 1, 1].item()]
    fm = feature_match("c", acts["c"] * 2)
    assert fm(logits, acts).tolist() == [-0.25, -0.25]  # ||a - 2a||^2 / ||2a||^2
    with pytest.raises(ValueError, match="3 channels"):
        channel("c", 3)(logits, acts)


def test_objectives_pick_targets_once_per_rows_and_recheck_for_other_rows_or_shapes():
    """An optimization passes the same ``rows`` every step: targets are picked once, but other rows, another
    batch or another layer width pick (and check) again."""
    rows, a = torch.tensor([0, 1]), torch.randn(2, 3, 4, 4)
    ch, fm, cls = channel("c", [1, 2, 0]), feature_match("c", torch.randn(3, 3, 4, 4)), class_logit([2, 0, 1])
    logits = torch.randn(3, 3)
    for _ in range(2):  # the second call reads the picked targets
        assert torch.equal(ch(logits[:2], {"c": a}, rows), a[[0, 1], [1, 2]].flatten(1).mean(1))
        assert torch.equal(cls(logits[:2], {}, rows), logits[[0, 1], [2, 0]])
    b = torch.randn(2, 3, 4, 4)
    assert torch.equal(ch(logits[:2], {"c": b}, rows), b[[0, 1], [1, 2]].flatten(1).mean(1))  # same rows, new values
    last = torch.tensor([2])
    assert torch.equal(ch(logits[2:], {"c": a[:1]}, last), a[:1, 0].flatten(1).mean(1))
    assert torch.equal(cls(logits[2:], {}, last), logits[2:, 1])
    t = fm.fn(logits, {"c": a}, rows)
    assert torch.equal(fm(logits[:2], {"c": a}, rows), t)
    assert not torch.equal(fm(logits[:2], {"c": b}, rows), t)
    with pytest.raises(ValueError, match="2 channels"):  # a narrower layer with the same rows: checked again
        ch(logits[:2], {"c": a[:, :2]}, rows)
    with pytest.raises(ValueError, match="2 classes"):
        cls(logits[:2, :2], {}, rows)
    with pytest.raises(ValueError, match="target has shape"):
        fm(logits[:2], {"c": a[..., :3]}, rows)


def test_l2_and_blur_in_the_loop_lower_norm_and_high_frequencies():
    torch.manual_seed(0)
    model = TinyCNN(width=4)
    kw = dict(steps=15, lr=0.1, init="noise", generator=None)
    with isolated(model):
        runs = {}
        for name, regs in {"plain": [], "l2": [L2Penalty(0.5)], "blur": [GaussianBlur(1.0, every=1)]}.items():
            kw["generator"] = torch.Generator().manual_seed(0)
            runs[name] = class_model_images(model, [0, 1], (3, 12, 12), l2=0.0, regularizers=regs, **kw).images
    norm = {k: v.flatten(1).norm(dim=1) for k, v in runs.items()}
    assert (norm["l2"] < 0.7 * norm["plain"]).all()
    assert (high_freq_energy(runs["blur"]) < 0.3 * high_freq_energy(runs["plain"])).all()


@pytest.mark.parametrize("beta", [2.0, 1.0])
def test_closed_form_penalty_gradients_equal_autograd(beta):
    img = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for reg in (L2Penalty(0.3), TotalVariation(0.7, beta=beta)):
        x = img.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(reg.penalty(x).sum(), x)
        got = reg.penalty_grad(img)
        if isinstance(reg, TotalVariation) and beta != 2.0:
            assert got is None  # left to autograd
            continue
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # TV by hand on a 2x2 image [[a, b], [c, d]]: penalty w*((b-a)^2 + (c-a)^2), only the top-left difference pair
    a, b, c, d = 1.0, 3.0, 4.0, 9.0
    g = TotalVariation(0.5).penalty_grad(torch.tensor([[[[a, b], [c, d]]]]))
    assert g.flatten().tolist() == [-(b - a) - (c - a), b - a, c - a, 0.0]


def test_a_penalty_without_closed_form_gradient_goes_through_autograd():
    """A user's regularizer that only defines ``penalty`` (and ours with beta != 2) still shapes the images."""
    from lightning_viz.methods.synthesis import optimize_input

    class AutogradL2(L2Penalty):
        def penalty_grad(self, image):
            return None

    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("net", TinyCNN(width=4))
    x0 = torch.randn(2, 3, 8, 8)
    runs = {}
    for name, reg in (("closed", L2Penalty(0.5)), ("autograd", AutogradL2(0.5)), ("none", None)):
        with isolated(model):
            runs[name] = optimize_input(
                model, class_logit([0, 1]), (2, 3, 8, 8), steps=3, lr=0.1, init=x0, regularizers=[reg] if reg else []
            ).images
    torch.testing.assert_close(runs["closed"], runs["autograd"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(runs["closed"], runs["none"], atol=1e-3)  # the penalty did act
