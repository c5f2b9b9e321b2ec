"""lightning_viz.methods.metrics: hand-computed values on constructed models and maps."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import check_untouched
from torch import nn

from lightning_viz.methods.metrics import (
    curve_auc,
    deletion_auc,
    energy_in_mask,
    gaussian_blur,
    insertion_auc,
    perturbation_curve,
    perturbation_curves,
    pointing_game,
    rank_correlation,
    topk_iou,
)


class RegionModel(nn.Module):
    """logit_0 = sum of the pixels inside ``region`` (1 channel, 8x8), logit_1 = 0."""

    def __init__(self, region: torch.Tensor):
        super().__init__()
        self.register_buffer("w", region.float())

    def forward(self, x):
        s = (x[:, 0] * self.w).flatten(1).sum(1)
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def _region_setup():
    region = torch.zeros(8, 8)
    region[2:6, 2:6] = 1  # 16 of 64 pixels
    model = RegionModel(region).eval()
    x = torch.full((2, 1, 8, 8), 0.25)  # logit_0 = 16 * 0.25 = 4 with the region intact
    return region, model, x


def test_deletion_of_a_perfect_map_is_hand_computed_and_beats_a_random_map():
    region, model, x = _region_setup()
    perfect = region.expand(2, 8, 8) + 0.01 * torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(1))
    curve = perturbation_curve(
        model, x, perfect, target=torch.tensor([0, 0]), mode="deletion", steps=4, baseline="zero"
    )
    # step k deletes 16k pixels, all of the region first: logit_0 = 4, 0, 0, 0, 0
    p4 = 1 / (1 + math.exp(-4))
    expected = torch.tensor([p4, 0.5, 0.5, 0.5, 0.5])
    torch.testing.assert_close(curve, expected.expand(2, -1), atol=1e-6, rtol=0)
    auc = deletion_auc(model, x, perfect, target=torch.tensor([0, 0]), steps=4, baseline="zero")
    torch.testing.assert_close(auc, torch.full((2,), (p4 + 0.5) / 8 + 0.5 * 3 / 4))
    # a random map deletes region pixels only gradually: larger area under the curve
    rand = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    assert (
        deletion_auc(model, x, rand, target=torch.tensor([0, 0]), steps=16)
        > deletion_auc(model, x, perfect, target=torch.tensor([0, 0]), steps=16)
    ).all()
    # insertion: the perfect map restores the evidence first
    ins_p = insertion_auc(model, x, perfect, target=torch.tensor([0, 0]), steps=16, baseline="zero")
    ins_r = insertion_auc(model, x, rand, target=torch.tensor([0, 0]), steps=16, baseline="zero")
    assert (ins_p > ins_r).all()


def test_curve_endpoints_and_target_specs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
    ).eval()
    x = torch.randn(3, 3, 8, 8)
    maps = torch.rand(3, 4, 4)  # lower resolution than the image: resized
    labels = torch.tensor([0, 1, 2])
    with torch.no_grad():
        probs = model(x).softmax(1)
        base_probs = model(torch.zeros_like(x)).softmax(1)
        blur_probs = model(gaussian_blur(x, 1.0, truncate=2.0)).softmax(1)  # the insertion baseline
    cur = perturbation_curve(model, x, maps, "label", labels, mode="deletion", steps=5, baseline="zero")
    torch.testing.assert_close(cur[:, 0], probs[torch.arange(3), labels])
    torch.testing.assert_close(cur[:, -1], base_probs[torch.arange(3), labels])
    ins = perturbation_curve(model, x, maps, "predicted", mode="insertion", steps=5, baseline="blur", blur_sigma=1.0)
    pred = probs.argmax(1)
    torch.testing.assert_close(ins[:, 0], blur_probs[torch.arange(3), pred])
    torch.testing.assert_close(ins[:, -1], probs[torch.arange(3), pred])
    torch.testing.assert_close(curve_auc(torch.tensor([[0.0, 1.0, 1.0]])), torch.tensor([0.75]))
    with pytest.raises(ValueError, match="baseline"):
        deletion_auc(model, x, maps, baseline="noise")
    with pytest.raises(ValueError, match="'deletion' or 'insertion'"):
        perturbation_curve(model, x, maps, mode="both")


def conv_bn_gap_head() -> nn.Module:
    """conv -> BatchNorm -> ReLU -> global average pooling -> linear, 3 classes, in eval mode."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).eval()


def test_chunked_equals_unchunked_and_model_untouched():
    torch.manual_seed(0)
    model = conv_bn_gap_head()
    x = torch.randn(3, 3, 8, 8)
    maps = torch.rand(3, 8, 8)
    maps[:, :2] = 0.5  # ties: broken by pixel index, whatever the chunking
    full = perturbation_curve(model, x, maps, "predicted", steps=6)
    for chunk in (1, 4, 7):
        torch.testing.assert_close(
            perturbation_curve(model, x, maps, "predicted", steps=6, chunk_size=chunk), full, atol=1e-6, rtol=1e-5
        )
    check_untouched(model, lambda: insertion_auc(model, x, maps, steps=4, chunk_size=5))


def test_curves_of_several_maps_and_both_modes_equal_single_curves_and_share_images():
    """All keys' deletion and insertion curves in one batched pass: each equals its own perturbation_curve; the
    image and each baseline (shared by every curve) are forwarded once, the rest in chunk_size batches."""
    torch.manual_seed(0)
    model = conv_bn_gap_head()
    x, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    ties = torch.rand(3, 8, 8)
    ties[:, :3] = 0.5
    maps = {"a": torch.rand(3, 4, 4), "b": ties, "c": -ties}
    perturbation_curves(model, x, maps, labels, steps=2)  # measures the memory budget once (a 1-image forward)
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        for modes in (None, {"deletion": "zero", "insertion": "zero"}, {"insertion": "blur"}):
            for chunk in (None, 1, 5):
                sizes.clear()
                curves = perturbation_curves(model, x, maps, labels.clone(), modes=modes, steps=6, chunk_size=chunk)
                pairs = (modes or {"deletion": "zero", "insertion": "blur"}).items()
                shared = 1 + len(set(dict(pairs).values()))  # the image and each distinct baseline
                assert sum(sizes) == (shared + len(pairs) * len(maps) * 5) * 3, (modes, chunk)
                assert max(sizes) <= (chunk or 10**9) and (chunk is not None or len(sizes) == 1)
                assert list(curves) == [m for m, _ in pairs]
                for mode, baseline in pairs:
                    for key, m in maps.items():
                        single = perturbation_curve(model, x, m, labels, mode=mode, steps=6, baseline=baseline)
                        torch.testing.assert_close(curves[mode][key], single, atol=1e-6, rtol=1e-5)
        sizes.clear()
        assert perturbation_curves(model, x, {}, labels) == {"deletion": {}, "insertion": {}} and not sizes
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="baseline"):
        perturbation_curves(model, x, maps, labels, modes={"deletion": "noise"})
    with pytest.raises(ValueError, match="'deletion' or 'insertion'"):
        perturbation_curves(model, x, maps, labels, modes={"both": "zero"})


def test_keys_whose_maps_rank_the_pixels_alike_share_their_perturbed_images_per_probe():
    """A curve depends on a map only through its pixel ranking: keys ranking a probe's pixels exactly alike (a positive
    multiple; a map already at image size vs. the same map upsampled differs) forward that probe's images once, and
    each key's curves equal its own perturbation_curve bit for bit (one image per forward: no batching rounding)."""
    torch.manual_seed(0)
    model = conv_bn_gap_head()
    x, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    a = torch.rand(3, 8, 8)
    a[:, :3] = 0.5  # ties, broken by pixel index in both
    part = a.clone()
    part[1] = torch.rand(8, 8)  # ranks probes 0 and 2 as a does, probe 1 not
    maps = {"a": a, "scaled": a * 64, "b": torch.rand(3, 8, 8), "part": part, "again": a.clone()}
    perturbation_curves(model, x, maps, labels, steps=2, chunk_size=1)
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        for modes in (None, {"insertion": "zero"}):
            sizes.clear()
            curves = perturbation_curves(model, x, maps, labels, modes=modes, steps=6, chunk_size=1)
            pairs = (modes or {"deletion": "zero", "insertion": "blur"}).items()
            shared = 1 + len(set(dict(pairs).values()))
            # per probe and curve: a and b (and part's probe 1) have their own 5 inner images, the others share a's
            assert sum(sizes) == shared * 3 + len(pairs) * 5 * (2 * 3 + 1), modes
            for mode, baseline in pairs:
                for key, m in maps.items():
                    single = perturbation_curve(
                        model, x, m, labels, mode=mode, steps=6, baseline=baseline, chunk_size=1
                    )
                    assert torch.equal(curves[mode][key], single), (mode, key)
            assert torch.equal(curves[next(iter(dict(pairs)))]["scaled"], curves[next(iter(dict(pairs)))]["a"])
    finally:
        handle.remove()


def test_keys_moving_the_same_pixels_at_a_step_share_that_steps_image():
    """A point of a curve depends on its map only through the set of pixels moved at that step: keys whose maps rank
    the pixels differently but agree on a step's top pixels (the same peak, other orders below it) forward that
    step's image once per probe, and each key's curves equal its own perturbation_curve bit for bit."""
    torch.manual_seed(0)
    model = conv_bn_gap_head()
    x, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    a = torch.rand(3, 8, 8)
    b = a.clone()
    top = a.flatten(1).argsort(dim=1, descending=True)
    # b keeps a's 16 top pixels (steps 1 and 2 of 6 move 11 and 21 pixels: step 1 alike), the others in another order
    rest = torch.rand(3, 48) * a.flatten(1).gather(1, top[:, 15:16])  # below a's 16th value
    b.view(3, -1).scatter_(1, top[:, 16:], rest)
    maps = {"a": a, "b": b, "c": torch.rand(3, 8, 8)}
    perturbation_curves(model, x, maps, labels, steps=2, chunk_size=1)
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        curves = perturbation_curves(model, x, maps, labels, steps=6, chunk_size=1)
    finally:
        handle.remove()
    # per probe and mode: a and c have 5 inner images each, b 4 (its step 1 is a's); plus the image and 2 baselines
    assert sum(sizes) == 3 * 3 + 2 * 3 * (5 + 4 + 5)
    for mode, baseline in (("deletion", "zero"), ("insertion", "blur")):
        for key, m in maps.items():
            single = perturbation_curve(model, x, m, labels, mode=mode, steps=6, baseline=baseline, chunk_size=1)
            assert torch.equal(curves[mode][key], single), (mode, key)
        assert torch.equal(curves[mode]["b"][:, 1], curves[mode]["a"][:, 1])
        assert not torch.equal(curves[mode]["b"][:, 3], curves[mode]["a"][:, 3])


def test_curves_hand_a_channels_last_adapter_its_layout_with_the_same_images():
    """A ModelAdapter that calls its model in channels_last gets the perturbed images made in that layout (no copy
    of every chunk into it), with the same values as the plain NCHW images of an adapter without it."""
    from lightning_viz.targets import ModelAdapter

    torch.manual_seed(0)
    net = conv_bn_gap_head()
    x, labels = torch.randn(3, 3, 8, 8), torch.tensor([0, 2, 1])
    maps = {"a": torch.rand(3, 4, 4), "b": torch.rand(3, 8, 8)}
    seen: dict[str, list[torch.Tensor]] = {"plain": [], "nhwc": []}
    for name in seen:
        adapter = ModelAdapter(net)
        adapter.memory_format = torch.channels_last if name == "nhwc" else None
        handle = adapter.register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0]))
        try:
            perturbation_curves(adapter, x, maps, labels, steps=4, chunk_size=7)
        finally:
            handle.remove()
    assert len(seen["nhwc"]) == len(seen["plain"]) > 3
    for plain, nhwc in zip(seen["plain"], seen["nhwc"]):
        assert plain.is_contiguous() and nhwc.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(plain, nhwc)


def test_gaussian_blur_keeps_constants_and_smooths():
    c = torch.full((1, 3, 6, 6), 2.5)
    torch.testing.assert_close(gaussian_blur(c, 1.5), c)
    spike = torch.zeros(1, 1, 9, 9)
    spike[0, 0, 4, 4] = 1
    out = gaussian_blur(spike, 1.0)
    assert out[0, 0, 4, 4] < 1 and out[0, 0, 4, 5] > 0
    torch.testing.assert_close(out.sum(), torch.tensor(1.0))  # reflect padding far from the border


def test_pointing_game_hand_cases():
    masks = torch.zeros(3, 4, 4)
    masks[:, 0, 0] = 1  # object in the top-left pixel
    maps = torch.zeros(3, 4, 4)
    maps[0, 0, 0] = 1  # hit
    maps[1, 0, 2] = 1  # two pixels away: miss, hit with tolerance 2
    maps[2, 3, 3] = 1  # miss
    torch.testing.assert_close(pointing_game(maps, masks), torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(pointing_game(maps, masks, tolerance=2), torch.tensor([1.0, 1.0, 0.0]))
    # low-resolution map (2x2) resized to the mask: its top-left cell covers the object
    low = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert pointing_game(low, masks[:1]).item() == 1.0
    empty = pointing_game(maps[:1], torch.zeros(1, 4, 4))
    assert torch.isnan(empty).all()


def test_energy_in_mask_hand_values():
    masks = torch.zeros(2, 2, 2)
    masks[:, 0] = 1  # top row
    maps = torch.tensor([[[3.0, 1.0], [1.0, -5.0]], [[0.0, 0.0], [0.0, 0.0]]])
    e = energy_in_mask(maps, masks)
    assert e[0].item() == pytest.approx(4 / 5)  # negative values carry no energy
    assert torch.isnan(e[1])


def test_energy_in_mask_is_undefined_without_an_object():
    """An empty mask has no object to put energy in: NaN (as the pointing game), not 0, so a tracker's mean over
    probes skips it instead of counting a miss."""
    maps = torch.tensor([[[3.0, 1.0], [1.0, -5.0]], [[3.0, 1.0], [1.0, -5.0]]])
    masks = torch.zeros(2, 2, 2)
    masks[0, 0, 0] = 1
    e = energy_in_mask(maps, masks)
    assert e[0].item() == pytest.approx(3 / 5)
    assert torch.isnan(e[1])
    assert torch.isnan(pointing_game(maps, masks)[1])


def test_rank_correlation_matches_scipy_with_ties():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, 6, generator=g)
    a[:, :3] = 0.0  # many ties (like ReLU'd maps)
    b = torch.randn(4, 6, 6, generator=g).round()
    ours = rank_correlation(a, b)
    ref = torch.tensor(
        [spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy())[0] for i in range(4)], dtype=torch.float32
    )
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rank_correlation(a, a * 3 + 1), torch.ones(4))
    torch.testing.assert_close(rank_correlation(a, -a), -torch.ones(4))
    assert torch.isnan(rank_correlation(torch.ones(1, 3, 3), a[:1, :3, :3])).all()


def test_average_ranks_match_scipy_with_ties_infinities_and_nans_last():
    """Average ranks (0-based) equal scipy's rankdata(method="average") - 1, on 224-px sized rows too; NaNs rank
    after +inf, tied among themselves."""
    import numpy as np
    from scipy.stats import rankdata

    from lightning_viz.methods.metrics import _average_ranks

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 50176, generator=g).clamp_min(0).round(decimals=2)  # ReLU'd, many ties
    rows[1, :100] = float("inf")
    rows[2, 5:9] = -float("inf")
    for r, want in zip(_average_ranks(rows), rows.numpy()):
        np.testing.assert_array_equal(r.numpy(), rankdata(want, method="average") - 1)
    v = torch.tensor([[0.5, float("nan"), 0.1, float("nan"), 0.1, float("inf")]])
    assert _average_ranks(v).tolist() == [[2.0, 4.5, 0.5, 4.5, 0.5, 3.0]]
    assert _average_ranks(torch.empty(2, 0)).shape == (2, 0)


def test_average_ranks_on_the_cpu_equal_those_of_torchs_sort_bit_for_bit():
    """The CPU's numpy sort orders ties otherwise than torch's: the average ranks are the same bits (signed zeros,
    infinities, NaNs, float64, a non-contiguous view, a row of one value)."""
    from lightning_viz.methods.metrics import _average_ranks

    def reference(v):  # the formula on torch's own sort
        s, order = v.sort(dim=1)
        n, nan = s.shape[1], s.isnan()
        same = (s[:, 1:] == s[:, :-1]) | (nan[:, 1:] & nan[:, :-1])
        pos = torch.arange(n).expand_as(s)
        starts, ends = torch.ones_like(nan), torch.ones_like(nan)
        starts[:, 1:], ends[:, :-1] = ~same, ~same
        first = torch.where(starts, pos, 0).cummax(dim=1).values
        last = torch.where(ends, pos, n).flip(1).cummin(dim=1).values.flip(1)
        return torch.empty(s.shape, dtype=torch.float64).scatter_(1, order, (first + last).double() / 2)

    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 1024, generator=g).round(decimals=1).clamp_min(0)
    v[0, ::3] = -0.0
    v[1, :7], v[1, 9:20], v[1, 30:33] = float("nan"), float("inf"), -float("inf")
    v[2] = 0.25
    for rows in (v, v.double(), v.t().contiguous().t(), v[:, ::2]):
        assert torch.equal(_average_ranks(rows), reference(rows))


def test_top_k_pixels_are_a_stable_descending_sorts_first_k():
    """topk_iou's selection without a sort: the pixels of a stable descending sort's first k, ties by pixel index
    (signed zeros equal, infinities, constant rows, k = 1 and k = N)."""
    from lightning_viz.methods.metrics import _top_k

    g = torch.Generator().manual_seed(0)
    v = torch.randn(6, 1024, generator=g).round(decimals=1).clamp_min(0)
    v[0, ::3] = -0.0
    v[1, 9:20], v[1, 30:33] = float("inf"), -float("inf")
    v[2] = 0.25
    for k in (1, 7, 103, 512, 1024):
        want = torch.zeros_like(v, dtype=torch.bool).scatter_(
            1, v.argsort(dim=1, descending=True, stable=True)[:, :k], True
        )
        assert torch.equal(_top_k(v, k), want), k


def test_topk_iou_hand_values():
    a = torch.arange(16.0).view(1, 4, 4)  # top 25% (4 pixels): 12..15
    b = a.clone()
    b[0, 3, 3] = -1  # one of a's top pixels leaves b's top 4 -> 3 shared of 5 in the union
    torch.testing.assert_close(topk_iou(a, a, 0.25), torch.ones(1))
    torch.testing.assert_close(topk_iou(a, b, 0.25), torch.tensor([3 / 5]))
    torch.testing.assert_close(topk_iou(a, -a, 0.25), torch.zeros(1))
    with pytest.raises(ValueError, match="fraction"):
        topk_iou(a, b, 0.0)


def test_pointing_game_tolerance_is_a_euclidean_radius():
    """Zhang et al. 2016 count a hit within ``tolerance`` pixels of the object: a closed disc (distance <= it)."""
    masks = torch.zeros(2, 5, 5)
    masks[:, 0, 0] = 1
    maps = torch.zeros(2, 5, 5)
    maps[0, 2, 2] = 1  # diagonal, sqrt(8) = 2.83 pixels from the object
    maps[1, 0, 2] = 1  # straight, 2 pixels away
    torch.testing.assert_close(pointing_game(maps, masks, tolerance=2), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(pointing_game(maps, masks, tolerance=3), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(pointing_game(maps, masks, tolerance=1), torch.tensor([0.0, 0.0]))
    # a closed disc: distance 2 hits with tolerance 2; TorchRay's open disc of 2 is ours of sqrt(2**2 - 1)
    torch.testing.assert_close(pointing_game(maps, masks, tolerance=3**0.5), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(pointing_game(maps, masks, tolerance=8**0.5), torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="tolerance must be >= 0 pixels; got -2"):
        pointing_game(maps, masks, tolerance=-2)


def test_a_map_with_a_nan_pixel_has_no_deletion_curve_nor_rank_correlation():
    """A map with a NaN pixel has no order of importance: its image's deletion/insertion curve and its rank
    correlation are NaN (as its pointing game and top-k IoU), the other images' values unchanged. Before, NaN sorted
    as the most important pixel and the curves and correlations came out finite."""
    region, model, x = _region_setup()
    good = region.expand(2, 8, 8).clone() + 0.01 * torch.arange(64.0).view(8, 8)
    bad = good.clone()
    bad[0, 7, 7] = float("nan")
    t = torch.tensor([0, 0])
    curves = perturbation_curves(model, x, {"good": good, "bad": bad}, t, steps=4)
    for mode in ("deletion", "insertion"):
        assert torch.isnan(curves[mode]["bad"][0]).all()
        torch.testing.assert_close(curves[mode]["bad"][1], curves[mode]["good"][1])
        assert curves[mode]["good"].isfinite().all()
    assert torch.isnan(deletion_auc(model, x, bad, target=t, steps=4)[0])
    other = torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(0))
    for a, b in ((bad, other), (other, bad)):
        rc = rank_correlation(a, b)
        assert torch.isnan(rc[0]) and rc[1] == rank_correlation(good, other)[1]
    assert torch.isnan(topk_iou(bad, other)[0]) and torch.isnan(pointing_game(bad, region.expand(2, 8, 8))[0])


def test_topk_iou_of_a_constant_map_is_nan_and_drift_logs_none():
    """A constant map (a dead, all-zero CAM) has no top pixels: its top-k IoU is NaN, as its rank correlation, so
    the tracker logs no drift for two epochs of dead maps. Before, ties by pixel index picked the same first pixels
    in both maps: IoU 1 ("the maps did not move")."""
    from helpers import RecordingWriter

    from lightning_viz.logging import VizLogger
    from lightning_viz.probe import ProbeSet
    from lightning_viz.tracking import MapTracker

    zero, ramp = torch.zeros(2, 8, 8), torch.arange(64.0).view(1, 8, 8).repeat(2, 1, 1)
    for a, b in ((zero, zero), (zero, ramp), (ramp, zero)):
        assert torch.isnan(topk_iou(a, b)).all() and torch.isnan(rank_correlation(a, b)).all()
    torch.testing.assert_close(topk_iou(ramp, ramp), torch.ones(2))
    probe = ProbeSet(images=torch.rand(2, 3, 8, 8), labels=torch.tensor([0, 1]))
    w = RecordingWriter()
    tr = MapTracker(filmstrip=False)
    tr.log(VizLogger(w, 0), {"cam/l": zero}, {}, probe)
    tr.log(VizLogger(w, 1), {"cam/l": zero}, {}, probe)
    assert not [t for t in w.scalars if "drift" in t]
