"""Adversarial examples: FGSM by hand on a linear model, PGD budgets and seeding, minimal flip budget by
bisection, flips on a trained tiny model, the model left untouched, and the callback's TensorBoard output."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LitTiny,
    TinyCNN,
    check_untouched,
    image_steps,
    read_events,
    scalar_steps,
    tiny_dataset,
    tiny_loaders,
    tiny_trainer,
    trained_tiny_cnn,
)
from torch import nn

from lightning_viz.callbacks.synthesis import AdversarialCallback
from lightning_viz.capture import isolated
from lightning_viz.methods.adversarial import fgsm, is_flipped, minimal_flip_budget, pgd, predict
from lightning_viz.methods.synthesis import valid_range


class TwoClassLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 1.0, -0.5, 3.0]]))
            self.fc.bias.copy_(torch.tensor([0.2, -0.1]))

    def forward(self, x):
        return self.fc(x.flatten(1))


@pytest.fixture(scope="module")
def trained():
    """TinyCNN trained to fit tiny_dataset; returns (model, x, y) for 8 images it classifies correctly."""
    model, x, y = trained_tiny_cnn()
    assert (predict(model, x) == y).all()
    return model, x[:8], y[:8]


def test_fgsm_matches_hand_computed_step_on_linear_model():
    model = TwoClassLinear()
    x = torch.tensor([[0.5, 0.1, -0.3, 0.2], [-0.4, 0.3, 0.1, -0.2]]).view(2, 1, 2, 2)
    y = predict(model, x)
    w = model.fc.weight.detach()
    # d CE / dx = (1 - p_y) (W_other - W_y): its sign is sign(W_other - W_y)
    expected = x + 0.1 * torch.sign(w[1 - y] - w[y]).view(2, 1, 2, 2)
    with isolated(model):
        adv = fgsm(model, x, y, 0.1)
        targeted = fgsm(model, x, 1 - y, 0.1, targeted=True)
    torch.testing.assert_close(adv, expected)
    torch.testing.assert_close(targeted, expected)  # two classes: toward the other = away from y
    with isolated(model):  # loss="score": descend S_y (untargeted) / ascend S_other (targeted)
        away = fgsm(model, x, y, 0.1, loss="score")
        toward = fgsm(model, x, 1 - y, 0.1, targeted=True, loss="score")
    torch.testing.assert_close(away, x - 0.1 * torch.sign(w[y]).view(2, 1, 2, 2))
    torch.testing.assert_close(toward, x + 0.1 * torch.sign(w[1 - y]).view(2, 1, 2, 2))


def test_minimal_flip_budget_matches_closed_form_on_linear_model():
    model = TwoClassLinear()
    x = torch.tensor([[0.5, 0.1, -0.3, 0.2], [-0.4, 0.3, 0.1, -0.2], [6.0, -6.0, 0.0, 0.0]]).view(3, 1, 2, 2)
    y = predict(model, x)
    w, b = model.fc.weight.detach(), model.fc.bias.detach()
    margin = (x.flatten(1) @ (w[y] - w[1 - y]).T).diagonal() + b[y] - b[1 - y]
    exact = margin / (w[y] - w[1 - y]).abs().sum(1)  # FGSM lowers the margin by eps * ||w_y - w_o||_1
    with isolated(model):
        found = minimal_flip_budget(model, x, y, max_epsilon=2.0, iterations=10)
    precision = 2.0 / 2**10
    assert exact[2] > 2.0 and torch.isinf(found[2])  # beyond max_epsilon: reported as inf
    assert ((found[:2] >= exact[:2] - 1e-6) & (found[:2] <= exact[:2] + precision + 1e-6)).all()


class Bump(nn.Module):
    """One pixel ``p``; class 1's logit ``1 - 100 (p - 0.5)^2`` is positive only for ``|p - 0.5| < 0.1``."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(100.0))

    def forward(self, x):
        p = x.flatten(1)[:, :1]
        return torch.cat([torch.zeros_like(p), 1 - self.scale * (p - 0.5) ** 2], 1)


def test_minimal_flip_budget_finds_a_flip_the_full_budget_overshoots():
    """FGSM from ``p = 0.3`` steps up (d logit_1 / dp = 40 > 0): it flips for ``eps`` in (0.1, 0.3) only, so the
    full budget 0.5 (p = 0.8) fails; the smallest flipping budget on the grid 0.5 / 2^6 is 13 / 128 (p =
    0.4015625, 1 - 100 * 0.0984375^2 > 0; 12 / 128 gives p = 0.39375, 1 - 100 * 0.10625^2 < 0). Bisection
    from [0, 0.5] alone answered inf (found comparing with ART's FastGradientMethod(minimal=True))."""
    model = Bump()
    x = torch.tensor([0.3, 0.45]).view(2, 1, 1, 1)  # the second is class 1 already: budget 0
    y = torch.tensor([0, 1])
    with isolated(model):
        assert torch.equal(predict(model, x), y)
        assert predict(model, fgsm(model, x[:1], y[:1], 0.5))[0] == 0  # the full budget overshoots
        found = minimal_flip_budget(model, x[:1], y[:1], max_epsilon=0.5, iterations=6)
        other = minimal_flip_budget(model, x, torch.zeros(2, dtype=torch.long), max_epsilon=0.5, iterations=6)
        coarse = minimal_flip_budget(model, x[:1], y[:1], max_epsilon=0.5, iterations=1)  # scans 0.25, 0.5
        # p = 0.7 is outside the bump from the other side: beyond every scanned budget, inf
        none = minimal_flip_budget(model, torch.full((1, 1, 1, 1), 0.7), y[:1], max_epsilon=0.05, iterations=6)
    assert found.tolist() == [13 / 128]
    assert other.tolist() == [13 / 128, 0.0]
    assert coarse.tolist() == [0.25]
    assert torch.isinf(none).all()


def test_trained_model_flips_within_budget_and_is_untouched(trained):
    model, x, _ = trained
    model.train()
    F.cross_entropy(model(x), predict(model, x)).backward()  # a .grad to keep intact
    clean = predict(model, x)
    eps = 1.0

    def attack():
        with isolated(model):
            return pgd(model, x, clean, eps, steps=5, generator=torch.Generator().manual_seed(0)), fgsm(
                model, x, clean, 0.02
            )

    adv, small = check_untouched(model, attack)
    model.zero_grad(set_to_none=True)
    with isolated(model):
        new = predict(model, adv)
        assert (new != clean).all()  # every probe flipped ...
        assert (adv - x).abs().amax() <= eps + 1e-6  # ... within the L-inf budget
        assert (predict(model, small) == clean).all()  # while a tiny budget flips nothing


def test_pgd_seeded_projected_and_targeted(trained):
    model, x, _ = trained
    clean = predict(model, x)
    bounds = (
        x.amin(dim=(0, 2, 3), keepdim=True) - 0.2,
        x.amax(dim=(0, 2, 3), keepdim=True) + 0.2,
    )  # tighter than x +- 0.8
    eps = torch.linspace(0.1, 0.8, x.shape[0])  # one budget per image
    with isolated(model):
        a = pgd(model, x, clean, eps, steps=4, generator=torch.Generator().manual_seed(1), bounds=bounds)
        b = pgd(model, x, clean, eps, steps=4, generator=torch.Generator().manual_seed(1), bounds=bounds)
        c = pgd(model, x, clean, eps, steps=4, generator=torch.Generator().manual_seed(2), bounds=bounds)
        target = (clean + 1) % 3
        t = pgd(model, x, target, 2.0, steps=10, targeted=True, random_start=False)
        reached = predict(model, t)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a - x).abs().flatten(1).amax(1) <= eps + 1e-6).all()
    assert (a >= bounds[0]).all() and (a <= bounds[1]).all() and ((a == bounds[0]) | (a == bounds[1])).any()
    assert is_flipped(reached, target, targeted=True).float().mean() >= 0.75


def _reference_pgd(model, x, classes, eps, alpha, start, bounds, steps, targeted=False):
    """Madry et al.'s PGD written out: a signed cross-entropy gradient step, then the clamp to the eps-ball, then the
    clamp to bounds, with every check at every step."""
    lo_b, hi_b = bounds

    def project(a):
        a = torch.maximum(torch.minimum(a, x + eps), x - eps)
        return torch.maximum(torch.minimum(a, hi_b), lo_b)

    x_adv = x if start is None else project(x + start * eps)  # FGSM: no start, one step of eps
    for _ in range(steps):
        z = x_adv.detach().clone().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(z), classes, reduction="sum"), [z])
        x_adv = project(x_adv + alpha * (-g.sign() if targeted else g.sign()))
    return x_adv


def test_pgd_equals_the_step_by_step_formula_bit_for_bit(trained):
    # the attack clamps to the ball-within-bounds it computes once and checks its inputs at the first step only:
    # the same images, bit for bit, also where the bounds cut the ball and for images outside the bounds
    model, x, _ = trained
    clean = predict(model, x)
    g = torch.Generator().manual_seed(3)
    start = 2 * torch.rand(x.shape, generator=g) - 1
    eps = torch.linspace(0.05, 0.9, x.shape[0]).view(-1, 1, 1, 1)
    lo = x.amin(dim=(0, 2, 3), keepdim=True) + 0.3  # above some pixels of x: x itself out of bounds there
    bounds = (lo, x.amax(dim=(0, 2, 3), keepdim=True) - 0.1)
    with isolated(model):
        for targeted, cls in ((False, clean), (True, (clean + 1) % 3)):
            ours = pgd(model, x, cls, eps.flatten(), steps=5, start=start, bounds=bounds, targeted=targeted)
            ref = _reference_pgd(model, x, cls, eps, 2.5 * eps / 5, start, bounds, 5, targeted)
            assert torch.equal(ours, ref)
            assert not torch.equal(ours, _reference_pgd(model, x, cls, eps, 2.5 * eps / 5, start, bounds, 4))
            one = fgsm(model, x, cls, eps.flatten(), targeted=targeted, bounds=bounds)
            assert torch.equal(one, _reference_pgd(model, x, cls, eps, eps, None, bounds, 1, targeted))


def test_pgd_random_start_without_generator_is_seeded_and_leaves_the_global_rng(trained):
    """generator=None: a fresh generator seeded 0 (same start every call), the global RNG neither read nor moved."""
    model, x, _ = trained
    clean = predict(model, x)
    model.eval()
    state = torch.get_rng_state()
    a = pgd(model, x, clean, 0.3, steps=1)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # another global state: same attack
    b = pgd(model, x, clean, 0.3, steps=1)
    c = pgd(model, x, clean, 0.3, steps=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and torch.equal(a, c)


def test_minimal_flip_budget_bisection_invariant(trained):
    model, x, _ = trained
    clean = predict(model, x)
    max_eps, iters = 2.0, 5
    with isolated(model):
        eps = minimal_flip_budget(model, x, clean, max_eps, iterations=iters, attack="pgd", steps=3)
        assert torch.isfinite(eps).all()
        # flips at the returned budget, not one bisection step below it
        at = predict(model, pgd(model, x, clean, eps, steps=3, random_start=False))
        below = predict(
            model, pgd(model, x, clean, (eps - max_eps / 2**iters).clamp_min(0), steps=3, random_start=False)
        )
    assert (at != clean).all() and (below == clean).all()


def test_fgsm_flip_search_takes_the_gradient_once_and_matches_fgsm_at_each_budget(trained):
    """FGSM's direction at ``x`` does not depend on the budget: the search takes it in one forward + backward
    and checks every budget with a forward, and its answer is what ``fgsm`` itself gives at those budgets."""
    model, x, _ = trained
    clean = predict(model, x)
    max_eps, iters = 2.0, 5
    forwards: list[bool] = []  # per forward: whether its input needs a gradient

    def count(module, args):
        forwards.append(args[0].requires_grad)

    handle = model.register_forward_pre_hook(count)
    with isolated(model):
        try:
            eps = minimal_flip_budget(model, x, clean, max_eps, iterations=iters)
        finally:
            handle.remove()
        flipped = torch.isfinite(eps)
        assert flipped.any()
        step = max_eps / 2**iters
        at = predict(model, fgsm(model, x, clean, torch.where(flipped, eps, torch.zeros_like(eps))))
        below = predict(model, fgsm(model, x, clean, torch.where(flipped, eps - step, torch.zeros_like(eps))))
    assert sum(forwards) == 1
    assert len(forwards) == 1 + (iters + 2) + 1  # the gradient, one check per attack, the clean prediction
    assert (at != clean)[flipped].all() and (below == clean)[flipped].all()


def test_adversarial_callback_logs_per_probe_and_robustness_scalars(tmp_path):
    torch.manual_seed(0)
    model = LitTiny(TinyCNN(width=4))
    train, val = tiny_loaders(24)
    cb = AdversarialCallback(epsilon=0.5, steps=3, num_probes=3, min_flip_iterations=3)
    tiny_trainer(str(tmp_path), [cb], max_epochs=2).fit(model, train, val)
    acc = read_events(str(tmp_path))
    for pid in ("p000", "p001", "p002"):
        assert image_steps(acc, f"viz-adversarial/{pid}") == [0, 1]
    for s in ("linf", "l2", "flip_rate", "min_flip_eps", "min_flip_unflipped"):
        assert scalar_steps(acc, f"viz-adversarial/{s}") == [0, 1]
    assert all(0 < e.value <= 0.5 + 1e-6 for e in acc.Scalars("viz-adversarial/linf"))
    assert all(0 <= e.value <= 2.0 for e in acc.Scalars("viz-adversarial/min_flip_eps"))


def test_adversarial_callback_under_validate_and_valid_range(tmp_path):
    from lightning_viz.probe import ProbeSet

    x, y = tiny_dataset(4).tensors
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
    probes = ProbeSet(images=x.clamp(-2, 2), labels=y, mean=mean, std=std)
    cb = AdversarialCallback(
        epsilon=3.0,
        epsilon_units="input",  # past the valid range; in pixels (of [0, 1]) a budget of 3 is refused at setup
        attack="fgsm",
        mode="next_class",
        probes=probes,
        min_flip=False,
        run_on="validation_epoch_end",
    )
    model = LitTiny(TinyCNN(width=4))
    _, val = tiny_loaders(8)
    tiny_trainer(str(tmp_path), [cb]).validate(model, val)
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-adversarial/p003") == [0]
    lo, hi = valid_range(mean, std)
    assert scalar_steps(acc, "viz-adversarial/flip_rate") == [0]
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        AdversarialCallback(epsilon=0.0)
    assert lo.flatten().tolist() == [-2.0] * 3 and hi.flatten().tolist() == [2.0] * 3
    # epsilon = 3 reaches past the valid range everywhere: every adversarial pixel is clamped into [lo, hi]
    with isolated(model):
        adv = cb.compute(model, probes)["adv"]
    assert adv.min() >= -2.0 and adv.max() <= 2.0 and ((adv == -2.0) | (adv == 2.0)).float().mean() > 0.9


def test_adversarial_callback_runs_a_model_in_another_dtype_than_the_probes():
    from lightning_viz.probe import ProbeSet

    x, y = tiny_dataset(3).tensors
    x = x.clamp(-1, 1)  # inside the valid range of mean = std = 0.5
    model = LitTiny(TinyCNN(width=4)).double()  # e.g. Trainer(precision="64-true"); the probes stay float32
    cb = AdversarialCallback(epsilon=0.25, steps=2, min_flip_iterations=2)  # pixels: 0.25 / std = 0.5 input units
    with isolated(model):
        out = cb.compute(model, ProbeSet(images=x, labels=y, mean=[0.5] * 3, std=[0.5] * 3))
        clean = predict(model, x.double())
    assert torch.equal(out["clean_pred"], clean)
    assert (out["adv"] - x.double()).abs().amax() <= 0.5 + 1e-9 and out["adv"].min() >= -1 and out["adv"].max() <= 1


class _Normalized(nn.Module):
    """A model on [0, 1] pixel images: the normalization folded in, as torchattacks / ART / foolbox attack it."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, p):
        return self.net((p - self.mean) / self.std)


def test_pixel_unit_budgets_equal_attacks_on_pixels_through_the_normalization():
    """``std=``: epsilon / step size in pixel units. The same attack as on [0, 1] pixels with the normalization folded
    into the model (what the peer libraries do), per channel ``eps / std_c`` in input units."""
    torch.manual_seed(0)
    net = TinyCNN(width=4).eval()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    m, s = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    pix = torch.rand(4, 3, 8, 8)
    x = (pix - m) / s
    y = torch.tensor([0, 1, 0, 1])
    folded = _Normalized(net, mean, std)
    eps = 8 / 255
    lo, hi = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    start = torch.rand(4, 3, 8, 8) * 2 - 1
    with isolated(net), isolated(folded):
        ours = fgsm(net, x, y, eps, bounds=valid_range(mean, std), std=std)
        theirs = fgsm(folded, pix, y, eps, bounds=(lo, hi))
        ours_pgd = pgd(net, x, y, eps, steps=4, start=start, bounds=valid_range(mean, std), std=std)
        theirs_pgd = pgd(folded, pix, y, eps, steps=4, start=start, bounds=(lo, hi))
        budget = minimal_flip_budget(net, x, y, max_epsilon=0.5, iterations=5, std=std)
        budget_pix = minimal_flip_budget(folded, pix, y, max_epsilon=0.5, iterations=5, bounds=None)
    for a, b in ((ours, theirs), (ours_pgd, theirs_pgd)):
        assert torch.allclose(a * s + m, b, atol=1e-5)
        d = (a - x) * s  # in pixels: the whole budget, never more
        assert float(d.abs().amax()) == pytest.approx(eps, abs=1e-5)
        per_channel = (a - x).abs().amax(dim=(0, 2, 3))  # in input units: eps / std_c
        assert torch.allclose(per_channel, eps / torch.tensor(std), atol=1e-5)
    assert torch.allclose(budget, budget_pix)
    # input units (no std): the ball is eps in the normalized tensor, i.e. eps * std_c in pixels
    with isolated(net):
        plain = fgsm(net, x, y, eps)
    assert torch.allclose((plain - x).abs().amax(dim=(0, 2, 3)), torch.full((3,), eps), atol=1e-6)
    with pytest.raises(ValueError, match="std must be positive"):
        fgsm(net, x, y, eps, std=[0.2, 0.2])


def test_adversarial_callback_budget_in_pixels_or_input_units(tmp_path):
    """The callback's default ``epsilon_units="pixels"``: with the probes' std 0.25, epsilon 0.1 moves input values by
    up to 0.4 and the logged L-inf is 0.1 (pixels); ``"input"`` keeps the budget in the normalized tensor."""
    from lightning_viz.probe import ProbeSet

    x, y = tiny_dataset(4).tensors
    probes = ProbeSet(images=x.clamp(-1, 1), labels=y, mean=[0.5] * 3, std=[0.25] * 3)
    model = LitTiny(TinyCNN(width=4))
    outs = {}
    for units in ("pixels", "input"):
        cb = AdversarialCallback(epsilon=0.1, epsilon_units=units, attack="fgsm", min_flip=False, probes=probes)
        with isolated(model):
            outs[units] = (cb.compute(model, probes)["adv"] - probes.images).abs().amax()
    assert float(outs["pixels"]) == pytest.approx(0.4, abs=1e-5)
    assert float(outs["input"]) == pytest.approx(0.1, abs=1e-6)
    cb = AdversarialCallback(epsilon=0.1, attack="fgsm", min_flip=False, probes=probes)
    tiny_trainer(str(tmp_path), [cb]).fit(model, *tiny_loaders(8))
    linf = [e.value for e in read_events(str(tmp_path)).Scalars("viz-adversarial/linf")]
    assert linf and all(v == pytest.approx(0.1, abs=1e-5) for v in linf)
    with pytest.raises(ValueError, match="epsilon_units must be 'pixels' or 'input'"):
        AdversarialCallback(epsilon_units="levels")


def test_adversarial_callback_same_result_on_any_rank_split_or_chunking(trained):
    from lightning_viz.probe import ProbeSet

    model, x, y = trained
    probe = ProbeSet(images=x[:5], labels=y[:5])
    cb = AdversarialCallback(epsilon=0.5, steps=3, min_flip_iterations=3)
    chunked = AdversarialCallback(epsilon=0.5, steps=3, min_flip_iterations=3, chunk_size=2)
    with isolated(model):
        whole = cb.compute(model, probe)
        parts = [cb.compute(model, probe.shard(r, 2)) for r in range(2)]
        in_chunks = chunked.compute(model, probe)
    for key in ("adv", "adv_pred", "min_eps"):
        torch.testing.assert_close(torch.cat([p[key] for p in parts]), whole[key], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(in_chunks[key], whole[key], atol=1e-5, rtol=1e-4)
    assert ((whole["adv"] - probe.images).abs().amax() <= 0.5 + 1e-6) and not torch.equal(whole["adv"], probe.images)


def test_attacks_and_deletion_check_the_classes_clearly():
    """Out-of-range or miscounted classes: a ValueError naming the method and the allowed range (was: torch's
    'Target 9 is out of bounds' / 'index 5 is out of bounds' / AttributeError for an int)."""
    from lightning_viz.methods.metrics import deletion_auc

    model, x = TinyCNN(width=3).eval(), torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"adversarial attack: class indices must be 0\.\.2 .*got \[3\]"):
        fgsm(model, x, torch.tensor([0, 3]), 0.1)
    with pytest.raises(ValueError, match=r"class indices must be 0\.\.2 .*got \[-1\]"):
        pgd(model, x, torch.tensor([-1, 0]), 0.1, steps=1)
    with pytest.raises(ValueError, match="one class per image: got 3 classes for 2 images"):
        fgsm(model, x, torch.tensor([0, 1, 2]), 0.1)
    with pytest.raises(ValueError, match=r"class indices must be 0\.\.2 .*whole numbers; got \[0.5\]"):
        fgsm(model, x, torch.tensor([0.5, 1.0]), 0.1)  # was: silently class 0
    with pytest.raises(ValueError, match=r"deletion/insertion: class indices must be >= 0, whole numbers; got \[2.5\]"):
        deletion_auc(model, x, torch.rand(2, 8, 8), torch.tensor([2.5, 0.0]), steps=2)  # was: silently class 2
    with pytest.raises(ValueError, match=r"deletion/insertion: class indices must be 0\.\.2 .*got \[5\]"):
        deletion_auc(model, x, torch.rand(2, 8, 8), torch.tensor([5, 0]), steps=2)
    # one class for every image, as an int or a one-element tensor
    torch.testing.assert_close(fgsm(model, x, 1, 0.1), fgsm(model, x, torch.tensor([1, 1]), 0.1))


def test_attacks_feature_maps_and_scan_refuse_one_unbatched_image_and_attacks_a_training_model():
    """One image [C, H, W]: a clear error (was: torch's 'expected 4D input', or pgd silently broadcasting it to C
    images); a training-mode BatchNorm model: refused before a forward updates its running statistics."""
    from lightning_viz.methods.activations import feature_maps
    from lightning_viz.methods.patches import scan_topk

    model, x = TinyCNN(width=3).eval(), torch.randn(2, 3, 8, 8)
    for name, call in [
        ("adversarial attack", lambda: fgsm(model, x[0], 1, 0.1)),
        ("pgd", lambda: pgd(model, x[0], 1, 0.1, steps=1)),
        ("feature_maps", lambda: feature_maps(model, x[0], ["conv2"])),
        ("scan_topk", lambda: scan_topk(model, x[0], "conv2", None, 1)),
    ]:
        with pytest.raises(ValueError, match=rf"{name}: x must be a float image batch \[B, C, H, W\]"):
            call()
    model.train()
    running = model.bn1.running_mean.clone()
    with pytest.raises(ValueError, match="adversarial attack: the model is in training mode"):
        fgsm(model, x, 1, 0.1)
    assert torch.equal(model.bn1.running_mean, running)


def test_a_pixel_budget_of_one_or_more_fails_at_setup(tmp_path):
    """``epsilon=8`` meant as 8 levels of 255, in pixel units (pixels in [0, 1]): any image is within the budget.
    Refused at setup, with the fraction it likely meant. Was: the attack ran and logged a flip rate of 1."""
    from lightning_viz.probe import ProbeSet

    x, y = tiny_dataset(4).tensors
    probes = ProbeSet(images=x.clamp(-1, 1), labels=y, mean=[0.5] * 3, std=[0.25] * 3)
    model = LitTiny(TinyCNN(width=4))
    cb = AdversarialCallback(epsilon=8, attack="fgsm", min_flip=False, probes=probes)
    with pytest.raises(ValueError, match=r"AdversarialCallback: epsilon=8 is in pixel units .* 8/255 = 0\.0314"):
        tiny_trainer(str(tmp_path), [cb]).fit(model, *tiny_loaders(8))
    assert model.global_step == 0  # before any training step
    cb = AdversarialCallback(epsilon=8, epsilon_units="input", attack="fgsm", min_flip=False, probes=probes)
    with isolated(model):  # in input units a budget of 8 is the user's call
        assert cb.compute(model, probes)["adv"].shape == x.shape
