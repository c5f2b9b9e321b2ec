"""Occlusion sensitivity: hand-computed maps, chunking invariance, fills, and the callback end to end."""

from __future__ import annotations

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
from torch import nn

from lightning_viz.callbacks.occlusion import OcclusionCallback
from lightning_viz.capture import isolated
from lightning_viz.methods.batching import activation_bytes_per_image, images_per_forward
from lightning_viz.methods.occlusion import (
    default_window,
    fill_values,
    occlusion,
    positions_per_forward,
    spread_to_pixels,
    window_positions,
)
from lightning_viz.probe import ProbeSet


class RegionSum(nn.Module):
    """logit 0 = sum of channel 0 over rows 2..5, cols 3..6; logit 1 = 0. The answer is known by hand."""

    def forward(self, x):
        s = x[:, 0, 2:6, 3:7].sum(dim=(1, 2))
        return torch.stack([s, torch.zeros_like(s)], dim=1)


def test_window_positions_cover_the_border():
    assert window_positions((8, 8), 2, 2) == ([0, 2, 4, 6], [0, 2, 4, 6])
    # stride 4 with window 3 on 8 px would stop at 4 (pixels 7 uncovered): a window flush at 5 is added
    assert window_positions((8, 10), 3, 4) == ([0, 4, 5], [0, 4, 7])
    with pytest.raises(ValueError, match="larger than the 8x8 image"):
        window_positions((8, 8), 9, 1)


def test_occlusion_of_region_sum_is_the_hand_computed_overlap():
    x = torch.ones(1, 1, 8, 8)
    out = occlusion(RegionSum(), x, target=0, window=2, stride=2, fill="zero")
    # drop at window (y0, x0) = overlap area of [y0, y0+2) x [x0, x0+2) with rows [2, 6) x cols [3, 7)
    rows = torch.tensor([0.0, 2, 2, 0])
    cols = torch.tensor([0.0, 1, 2, 1])
    expected = torch.outer(rows, cols)
    assert torch.equal(out["score"][0], expected)
    # the probability of class 0 is sigmoid(score) (the other logit is 0); unoccluded score = 16
    exp_prob = torch.sigmoid(torch.tensor(16.0)) - torch.sigmoid(16.0 - expected)
    torch.testing.assert_close(out["prob"][0], exp_prob)


def test_occlusion_fill_value_enters_the_drop():
    # filling with 0.25 instead of 0 removes (1 - 0.25) per occluded region pixel
    x = torch.ones(2, 1, 8, 8)
    out = occlusion(RegionSum(), x, target=0, window=4, stride=4, fill=0.25)
    expected = 0.75 * torch.tensor([[2.0, 6.0], [2.0, 6.0]])  # overlaps: rows 2/2, cols 1/3
    assert torch.equal(out["score"][0], expected) and torch.equal(out["score"][1], expected)


def test_fill_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    gray = fill_values(x, "gray", mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 0.5])
    torch.testing.assert_close(gray.flatten(), torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(fill_values(x, "gray").flatten(), torch.zeros(1))  # normalization unknown -> 0
    torch.testing.assert_close(fill_values(x, "mean")[:, :, 0, 0], x.mean(dim=(2, 3)))
    const = torch.full((1, 3, 8, 8), 0.7)
    torch.testing.assert_close(fill_values(const, "blur", window=5), const)  # blurring a constant keeps it
    assert not torch.allclose(fill_values(x, "blur", window=5), x)
    with pytest.raises(ValueError, match="unknown occlusion fill 'noise'"):
        fill_values(x, "noise")


def test_spread_to_pixels_averages_covering_windows():
    drops = torch.tensor([[[1.0, 3.0]]])  # one row of windows, width 2 stride 1 on a 1x3 image
    out = spread_to_pixels(drops, (1, 3), window=(1, 2), stride=1)
    assert torch.equal(out, torch.tensor([[[1.0, 2.0, 3.0]]]))


@pytest.mark.parametrize("fill", ["gray", "blur"])
def test_chunked_equals_unchunked(fill):
    torch.manual_seed(1)
    net = TinyCNN(width=4).eval()
    x = torch.randn(3, 3, 12, 12)
    labels = torch.tensor([0, 1, 2])
    full = occlusion(net, x, "label", labels, window=4, stride=3, fill=fill, chunk_size=10**6)
    for chunk in (1, 7, 16, None):  # None: the memory budget's choice
        part = occlusion(net, x, "label", labels, window=4, stride=3, fill=fill, chunk_size=chunk)
        for key in ("score", "prob"):
            torch.testing.assert_close(part[key], full[key], rtol=0, atol=1e-6)
    assert full["score"].shape == (3, 4, 4)  # starts 0, 3, 6 and 8 (flush with the border)


def test_chunks_bound_the_memory_of_the_window_masks():
    # 64x64 image, 1-px windows: 4096 positions. A [positions, H, W] mask would be one 16 MiB allocation;
    # with 64 occluded images per forward no single allocation may exceed a few chunk-sized [64, 1, 64, 64] tensors.
    x = torch.ones(1, 1, 64, 64)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = occlusion(RegionSum(), x, target=0, window=1, stride=1, fill="zero", chunk_size=64)
    assert max(e.cpu_memory_usage for e in prof.events()) <= 64 * 64 * 64 * 4
    expected = torch.zeros(64, 64)
    expected[2:6, 3:7] = 1.0  # occluding one pixel of the region removes its 1
    assert torch.equal(out["score"][0], expected)


def test_resnet18_chunked_and_memory_budget():
    net = torchvision.models.resnet18(weights=None, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert positions_per_forward(net, x, memory_mb=1e-6) == 1
    chunk = positions_per_forward(net, x, memory_mb=4)
    assert 1 < chunk < 1000
    full = occlusion(net, x, "predicted", window=16, stride=8, chunk_size=10**6)
    part = occlusion(net, x, "predicted", window=16, stride=8, chunk_size=chunk)
    torch.testing.assert_close(part["score"], full["score"], rtol=0, atol=1e-5)
    # the default on the CPU: a cache-sized batch, CPU_THROUGHPUT_MB (48 MiB) of activations, ~0.6 MiB per 32-px image:
    # ~80 images per forward (the 512 MiB budget would hold ~860)
    per_image = activation_bytes_per_image(net, x[:1])
    assert images_per_forward(net, x) == 512 * 2**20 // per_image
    assert positions_per_forward(net, x) == images_per_forward(net, x, 48) == 48 * 2**20 // per_image
    default = occlusion(net, x, "predicted", window=16, stride=8)
    torch.testing.assert_close(default["score"], full["score"], rtol=0, atol=1e-5)


class Counting(nn.Module):
    """TinyCNN that counts the images it forwards."""

    def __init__(self):
        super().__init__()
        self.net, self.images = TinyCNN(width=2).eval(), 0

    def forward(self, x):
        self.images += x.shape[0]
        return self.net(x)


def test_default_window_scales_with_the_image_so_positions_do_not_grow():
    assert default_window((64, 64)) == ((8, 8), (4, 4)) and default_window((224, 224)) == ((28, 28), (14, 14))
    counts = {}
    for side in (32, 64, 224):
        net = Counting()
        x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
        drops = occlusion(net, x, 0)["score"]
        counts[side] = net.images - 2  # minus the clean forward and the memory measurement
        assert drops.shape == (1, 15, 15)
        assert spread_to_pixels(drops, (side, side)).shape == (1, side, side)
    assert counts[224] <= counts[64] == 225 and counts[32] == 225
    # the callback's defaults are the method's: 15 x 15 positions on 224-px probes too
    net = LitTiny(TinyCNN(width=2))
    probe = ProbeSet(images=torch.randn(1, 3, 224, 224), labels=torch.tensor([0]))
    with isolated(net):  # as the callback's compute runs (eval mode)
        maps = OcclusionCallback(outputs=["score"]).compute_maps(net, probe)
        expected = spread_to_pixels(occlusion(net, probe.images, "label", probe.labels)["score"], (224, 224))
    torch.testing.assert_close(maps["occlusion/score"], expected)


def test_callback_logs_overlays_per_epoch_and_leaves_training_untouched(tmp_path):
    cb = OcclusionCallback(window=4, stride=2, fill="mean", num_probes=3, every_n_epochs=2, memory_mb=0.05)
    train, val = tiny_loaders()
    model = LitTiny()
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=3)
    trainer.fit(model, train, val)
    acc = read_events(str(tmp_path))
    for pid in ("p000", "p001", "p002"):
        assert image_steps(acc, f"viz-occlusion/panel/{pid}") == [1, 2]
    assert scalar_steps(acc, "viz-occlusion/occlusion/score/stats/max_abs") == [1, 2]
    assert scalar_steps(acc, "viz-occlusion/occlusion/prob/stats/max_abs") == [1, 2]
    img = acc.Images("viz-occlusion/panel/p000")[0]
    assert img.width == 3 * 128 + 4 * 2  # image | score | prob, 8 px tiles shown at 128 px, padding 2
    # after fit: train mode, real .grad; a run (also under inference mode) must change nothing
    model.train()
    cb.every_n_epochs = 1  # trainer.current_epoch is 3 after fit
    results = check_untouched(model, lambda: cb.run(trainer, model))
    assert results["map:occlusion/score"].shape == (3, 8, 8)
    with torch.inference_mode():
        check_untouched(model, lambda: cb.run(trainer, model))


def test_callback_maps_match_the_method_and_gray_uses_probe_normalization():
    net = RegionSum()
    module = LitTiny(net)
    x = torch.ones(2, 1, 8, 8)
    probe = ProbeSet(images=x, labels=torch.tensor([0, 0]), mean=[0.5], std=[0.5])  # gray 0.5 -> 0 normalized
    cb = OcclusionCallback(window=2, stride=2, fill="gray", target=0, outputs=["score"])
    maps = cb.compute_maps(module, probe)
    assert list(maps) == ["occlusion/score"]
    expected = spread_to_pixels(occlusion(net, x, 0, window=2, stride=2, fill="zero")["score"], (8, 8), 2, 2)
    assert torch.equal(maps["occlusion/score"], expected)
    assert maps["occlusion/score"][0, 2, 4] == 4.0  # the window rows 2-3 x cols 4-5 lies inside the region: 4 ones


def test_callback_runs_a_model_in_another_dtype_than_the_probes():
    # Trainer(precision="64-true") turns the module to float64 while the probes stay float32
    module = LitTiny(TinyCNN(width=4)).double()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    probe = ProbeSet(images=x, labels=torch.tensor([0, 1]))
    cb = OcclusionCallback(window=4, stride=2, outputs=["score"])
    with torch.no_grad():
        maps = cb.compute_maps(module.eval(), probe)
    drops = occlusion(module, x.double(), "label", torch.tensor([0, 1]), window=4, stride=2, fill="gray")["score"]
    assert torch.equal(maps["occlusion/score"], spread_to_pixels(drops, (8, 8), 4, 2))


def test_invalid_options_have_clear_errors():
    with pytest.raises(ValueError, match="fill must be one of"):
        OcclusionCallback(fill="black")
    with pytest.raises(ValueError, match="outputs must be"):
        OcclusionCallback(outputs=["logit"])
    with pytest.raises(ValueError, match="unknown target"):
        OcclusionCallback(target="best")
    probe = ProbeSet(images=torch.zeros(1, 3, 8, 8), labels=torch.tensor([0]))
    with pytest.raises(ValueError, match="window=16 is larger than the 8x8"):
        OcclusionCallback(window=16).compute_maps(LitTiny(), probe)


def test_callback_takes_a_rectangular_window_and_stride_from_python_and_the_cli():
    """``window`` / ``stride`` take ``(h, w)`` as the pure method does (a list from YAML or the command line).
    Was: only an int (a pair failed with TypeError: '<' not supported between 'tuple' and 'int')."""
    from lightning_viz.cli import cli_main

    net = RegionSum()
    x = torch.ones(1, 1, 8, 8)
    probe = ProbeSet(images=x, labels=torch.tensor([0]))
    cb = OcclusionCallback(window=[2, 4], stride=(2, 4), fill="zero", target=0, outputs=["score"])
    assert (cb.window, cb.stride) == ((2, 4), (2, 4))
    maps = cb.compute_maps(LitTiny(net), probe)
    drops = occlusion(net, x, 0, window=(2, 4), stride=(2, 4), fill="zero")["score"]
    assert drops.shape == (1, 4, 2)
    assert torch.equal(maps["occlusion/score"], spread_to_pixels(drops, (8, 8), (2, 4), (2, 4)))
    # rows 2-3 x cols 4-7 overlap the region (rows 2..5, cols 3..6) in 2 x 3 pixels of ones
    assert maps["occlusion/score"][0, 2, 5] == 6.0
    too_large = r"window=\(16, 4\) is larger than the 8x8 probe images; use window <= \(8, 8\)"
    with pytest.raises(ValueError, match=too_large):
        OcclusionCallback(window=(16, 4)).compute_maps(LitTiny(net), probe)
    for bad in ((0, 2), (2, 2, 2), 2.5, True, "8"):
        with pytest.raises(ValueError, match=r"^OcclusionCallback: window must be an int >= 1 .* or a pair \(h, w\)"):
            OcclusionCallback(window=bad)
    with pytest.raises(ValueError, match="window must be a positive int or a pair of positive ints; got 2.5"):
        occlusion(net, x, 0, window=2.5)  # the pure method: was TypeError: 'float' object is not iterable

    def parsed(*args):
        cli = cli_main([*args, "--trainer.logger=false"], run=False)
        return [(cb.window, cb.stride) for cb in cli.trainer.callbacks if isinstance(cb, OcclusionCallback)]

    occ = "--trainer.callbacks+=OcclusionCallback"
    assert parsed(occ, "--trainer.callbacks.window=[4,8]", "--trainer.callbacks.stride=2") == [((4, 8), 2)]
    yaml = "trainer: {callbacks: [{class_path: lightning_viz.OcclusionCallback, init_args: {window: [4, 8]}}]}"
    assert parsed("--config", yaml) == [((4, 8), None)]
