"""First-layer filters and linear templates: methods, the grid rendering, and FilterCallback end to end."""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import LitTiny, TinyCNN, read_events, scalar_steps, tiny_loaders, tiny_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_viz.callbacks.filters import MIN_TILE_PX, MIN_WIDTH_PX, FilterCallback, filter_grid, filter_tiles
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.methods.filters import conv_filters, linear_templates
from lightning_viz.render import compose, labeled_grid


def linear_net(c=3, h=8, w=8, k=3):
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, k))


# ----------------------------------------------------------------------------- methods
def test_conv_filters_default_first_conv_and_copy():
    model = TinyCNN()
    w = conv_filters(model)
    assert torch.equal(w, model.conv1.weight) and w.shape == (4, 3, 3, 3)
    w.zero_()  # a copy: the model is not changed through it
    assert model.conv1.weight.abs().sum() > 0
    assert torch.equal(conv_filters(model, "conv2"), model.conv2.weight)


def test_conv_filters_errors():
    with pytest.raises(
        LayerNotFoundError, match=r"conv_filters needs a convolution layer, but 'fc' is a Linear.*'conv1'"
    ):
        conv_filters(TinyCNN(), "fc")
    with pytest.raises(LayerNotFoundError, match=r"Unknown layer 'conv9'"):
        conv_filters(TinyCNN(), "conv9")
    with pytest.raises(LayerNotFoundError, match=r"nn.Conv2d"):
        conv_filters(nn.Sequential(nn.Conv1d(1, 2, 3)))


def test_linear_templates_reshape_rows():
    net = linear_net(c=2, h=3, w=4, k=5)
    t = linear_templates(net, None, (2, 3, 4))
    assert t.shape == (5, 2, 3, 4)
    x = torch.randn(6, 2, 3, 4)
    # the template's dot product with the image is the logit (minus bias): the defining property
    logits = net(x) - net[1].bias
    assert torch.allclose(torch.einsum("bchw,kchw->bk", x, t), logits, atol=1e-5)


def test_linear_templates_errors():
    net = linear_net(c=3, h=8, w=8)
    with pytest.raises(ValueError, match=r"in_features=192.*\(1, 8, 8\) flattens to 64"):
        linear_templates(net, "1", (1, 8, 8))
    with pytest.raises(LayerNotFoundError, match=r"needs an nn.Linear layer, but '0' is a Flatten.*'1'"):
        linear_templates(net, "0", (3, 8, 8))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        linear_templates(net, "1", (192,))


# ----------------------------------------------------------------------------- rendering
def test_filter_grid_rgb_per_filter_and_global():
    w = torch.zeros(2, 3, 3, 3)
    w[0, 0, 0, 0] = 1.0  # filter 0 ranges 0..1
    w[1] = 0.25  # filter 1 ranges -0.5..0.25
    w[1, 2, 2, 2] = -0.5
    scale = -(-MIN_TILE_PX // 3)
    tile = 3 * scale
    grid = filter_grid(w, "per_filter")
    assert grid.shape == (3, tile + 2, 2 * (tile + 1) + 1)  # 2 RGB tiles in one row, 1 px padding
    t0 = grid[:, 1 : 1 + tile, 1 : 1 + tile]
    t1 = grid[:, 1 : 1 + tile, tile + 2 : 2 * tile + 2]
    assert torch.equal(t0, F.interpolate(w[:1], scale_factor=scale, mode="nearest")[0])
    assert t1.min() == 0 and t1.max() == 1  # each filter on its own range
    assert torch.allclose(t1[:, 0, 0], torch.full((3,), 0.75 / 0.75))
    g = filter_grid(w, "global")  # one range -0.5..1 for both
    g1 = g[:, 1 : 1 + tile, tile + 2 : 2 * tile + 2]
    assert torch.allclose(g1[0, 0, 0], torch.tensor(0.75 / 1.5)) and g1.min() == 0 and g1.max() < 1


def test_filter_grid_grayscale_rows_and_max_filters():
    w = torch.randn(5, 2, 3, 3)
    tile = 3 * -(-MIN_TILE_PX // 3)
    grid = filter_grid(w, max_filters=4)  # 4 filters x 2 input channels: one row per filter
    assert grid.shape == (3, 4 * (tile + 1) + 1, 2 * (tile + 1) + 1)
    # row 2, column 1 is filter 2's input channel 1, min-max scaled over the whole filter 2
    cell = grid[0, 2 * (tile + 1) + 1 : 3 * (tile + 1), tile + 2 : 2 * tile + 2]
    f = w[2]
    expected = (f[1] - f.min()) / (f.max() - f.min())
    assert torch.allclose(cell[:: tile // 3, :: tile // 3], expected, atol=1e-6)
    assert torch.allclose(grid[0], grid[1]) and torch.allclose(grid[1], grid[2])  # grayscale


# ----------------------------------------------------------------------------- callback
class WeightRecorder(Callback):
    def __init__(self):
        self.weights = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights.append(pl_module.net.conv1.weight.detach().clone())


def test_filter_callback_logs_grid_norm_and_change(tmp_path):
    cb = FilterCallback(max_filters=3)
    rec = WeightRecorder()
    trainer = tiny_trainer(str(tmp_path), [cb, rec], max_epochs=2)
    trainer.fit(LitTiny(), *tiny_loaders(n=16))
    assert cb.probes is None  # kind='conv' needs no probe images: none were picked
    acc = read_events(str(tmp_path))
    img = acc.Images("viz-filters/net.conv1/grid")
    assert [e.step for e in img] == [0, 1]
    # 3 RGB tiles (2 x 2 grid of 51 px) under a 2-line caption (32 px), MIN_WIDTH_PX wide
    assert (img[0].width, img[0].height) == (MIN_WIDTH_PX, 2 * 16 + 2 * (3 * -(-MIN_TILE_PX // 3) + 1) + 1)
    w0, w1 = rec.weights
    norms = [e.value for e in acc.Scalars("viz-filters/net.conv1/mean_norm")]
    assert norms == pytest.approx([float(w.flatten(1).norm(dim=1).mean()) for w in (w0, w1)], rel=1e-5)
    assert scalar_steps(acc, "viz-filters/net.conv1/rel_change") == [1]
    change = acc.Scalars("viz-filters/net.conv1/rel_change")[0].value
    assert change == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-5) and change > 0
    assert scalar_steps(acc, "viz-filters/time_s") == [0, 1]

    # The previous weights survive a checkpoint round trip (rel_change continues after resume).
    fresh = FilterCallback(max_filters=3)
    fresh.load_state_dict(cb.state_dict())
    assert torch.equal(fresh.previous, w1) and fresh.probes is None
    assert fresh.state_key == cb.state_key != FilterCallback(layers="net.conv2").state_key


def test_filter_callback_linear_templates(tmp_path):
    model = LitTiny(linear_net())
    picked = FilterCallback(kind="linear")  # input shape from the probes
    given = FilterCallback(kind="linear", layers="net.1", input_shape=[3, 8, 8], scale="global")
    trainer = tiny_trainer(str(tmp_path), [picked, given], max_epochs=1)
    trainer.fit(model, *tiny_loaders(n=12))
    assert picked.probes is not None and given.probes is None
    acc = read_events(str(tmp_path))
    img = acc.Images("viz-filters/net.1/grid")
    assert len(img) == 2  # both instances log the same tag at step 0
    # 3 RGB templates of 24 px in a 2 x 2 grid, each with its label, under a 2-line caption
    assert {(e.width, e.height) for e in img} == {(MIN_WIDTH_PX, 2 * 16 + 2 * (2 + 24 + 1 + 12) + 2)}
    assert torch.equal(picked.previous, model.net[1].weight.detach().view(3, 3, 8, 8))


def test_linear_templates_are_labeled_with_class_names_and_grids_captioned():
    """The head's templates carry the class names (else the output index); a grid says what it shows."""
    w = torch.randn(3, 1, 8, 8)
    cb = FilterCallback(kind="linear", class_names=["cat", "dog", "horse"])
    tiles, _ = filter_tiles(w)
    caption = "net.1: templates of outputs 0-2 of 3 (1x8x8), each on its own range"
    expected = labeled_grid(tiles, ["cat", "dog", "horse"], caption=caption, label_px=12, min_width=MIN_WIDTH_PX)
    assert torch.equal(cb.render("net.1", w, None), expected)
    hidden = FilterCallback(kind="linear", class_names=["cat", "dog"])  # 3 outputs, 2 classes: a hidden layer
    assert torch.equal(
        hidden.render("net.1", w, None),
        labeled_grid(tiles, ["0", "1", "2"], caption=caption, label_px=12, min_width=MIN_WIDTH_PX),
    )
    conv = FilterCallback(max_filters=2, scale="global")
    w4 = torch.randn(5, 4, 3, 3)  # RGB + depth: a row per filter, a column per input channel
    caption = "net.0: filters 0-1 of 5 (4x3x3), one range for all; a row per filter, a column per input channel"
    expected = compose([[filter_grid(w4, "global", 2)]], None, caption, pad=0, min_width=MIN_WIDTH_PX)
    assert torch.equal(conv.render("net.0", w4, None), expected)


def test_filter_callback_setup_errors(tmp_path):
    with pytest.raises(ValueError, match=r"in_features=192.*flattens to 48"):
        trainer = tiny_trainer(str(tmp_path), [FilterCallback(kind="linear", input_shape=[3, 4, 4])])
        trainer.fit(LitTiny(linear_net()), *tiny_loaders(n=12))
    # Input shape from the data (no input_shape): read from one dataset item at setup, before any step.
    trainer = tiny_trainer(str(tmp_path), [FilterCallback(kind="linear")])
    ds = tiny_loaders(n=12)[0].dataset
    with pytest.raises(ValueError, match=r"'net.fc' has in_features=4.*\(3, 8, 8\) flattens to 192"):
        trainer.fit(LitTiny(), datamodule=L.LightningDataModule.from_datasets(ds, ds, batch_size=4))
    assert trainer.global_step == 0
    with pytest.raises(ValueError, match=r"'net.conv1' is a Conv2d, not nn.Linear.*'net.fc'"):
        tiny_trainer(str(tmp_path), [FilterCallback(kind="linear", layers="net.conv1")]).fit(
            LitTiny(), *tiny_loaders(n=12)
        )
    with pytest.raises(ValueError, match=r"kind must be 'conv' or 'linear'; got 'dense'"):
        FilterCallback(kind="dense")
    with pytest.raises(ValueError, match=r"scale must be 'per_filter' or 'global'"):
        FilterCallback(scale="per_image")
    with pytest.raises(ValueError, match=r"max_filters must be >= 1"):
        FilterCallback(max_filters=0)


def test_filter_callback_two_named_instances_on_one_layer(tmp_path):
    """``name`` tells two instances apart (tags and checkpoint state key), also for FilterCallback."""
    per, glob = FilterCallback(), FilterCallback(scale="global", name="global")
    assert per.state_key != glob.state_key
    tiny_trainer(str(tmp_path), [per, glob], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    acc = read_events(str(tmp_path))
    assert [e.step for e in acc.Images("viz-filters/net.conv1/grid")] == [0]
    assert [e.step for e in acc.Images("viz-filters/global/net.conv1/grid")] == [0]


def lazy_net():
    return nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(3))


@pytest.mark.parametrize("sanity", [0, 2])
def test_a_model_with_lazy_layers_trains_as_without_callbacks(tmp_path, sanity):
    """LazyConv2d/LazyLinear have no weights before the first forward: the callbacks neither fail at setup nor create
    them there (or in a run_at_start baseline without sanity check), so training is bit for bit as without them."""
    from lightning_viz.callbacks.activations import ActivationCallback

    def fit(callbacks):
        torch.manual_seed(0)
        model = LitTiny(lazy_net())
        trainer = tiny_trainer(str(tmp_path), callbacks, max_epochs=2, num_sanity_val_steps=sanity)
        trainer.fit(model, *tiny_loaders(n=12))
        return model

    plain = fit([])
    cbs = [FilterCallback(), FilterCallback(kind="linear", layers="net.4", name="head", input_shape=[4, 1, 1])]
    cbs += [ActivationCallback(layers="net.0", run_at_start=True)]
    with pytest.warns(UserWarning, match="lazy layers.*no baseline") if sanity == 0 else contextlib.nullcontext():
        viz = fit(cbs)
    for (n, p), q in zip(plain.named_parameters(), viz.parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(cbs[0].previous, viz.net[0].weight.detach())
    with pytest.raises(ValueError, match=r"'0' is a LazyConv2d whose weights do not exist yet"):
        conv_filters(lazy_net())


def test_a_grouped_first_conv_is_not_shown_as_rgb():
    """Conv2d(6, 4, groups=2) on 6-channel images: each filter's 3 input channels are its group's (channels 0-2 or
    3-5), not the colors of an image; they were shown as RGB tiles, now a grayscale row per filter as for 4 channels."""
    net = nn.Sequential(nn.Conv2d(6, 4, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    cb = FilterCallback()
    out = cb.compute(LitTiny(net), None)
    assert out["rgb"] is False and out["weights"].shape == (4, 3, 3, 3)
    image = cb.render(out["layer"], out["weights"], None, out["rgb"])
    grid = filter_grid(out["weights"], rgb=False)
    tile = 3 * -(-MIN_TILE_PX // 3)
    assert grid.shape == (3, 4 * (tile + 1) + 1, 3 * (tile + 1) + 1)  # a row per filter, a column per channel
    assert torch.equal(grid[0], grid[1]) and torch.equal(grid[1], grid[2])  # grayscale
    assert torch.equal(image[:, -grid.shape[1] :, : grid.shape[2]], (grid * 255).round().to(torch.uint8))
    assert FilterCallback().compute(LitTiny(), None)["rgb"] is None  # an ordinary RGB first conv: RGB tiles


def test_weight_standardized_convs_show_the_kernels_they_convolve_with(tmp_path):
    """timm's StdConv2d (BiT ResNets) and ScaledStdConv2d (NFNets) standardize each filter in their forward (and
    scale it by a learned gain): the filters shown, their norms and changes are those kernels (were: the raw
    ``weight``, whose mean and scale the forward removes), and the fit trains as without the callback."""
    from timm.layers import ScaledStdConv2d, StdConv2d

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for conv in (StdConv2d(3, 4, 3), ScaledStdConv2d(3, 4, 3, gain_init=0.5)):
        with torch.no_grad():
            conv.weight.mul_(5).add_(1)  # a scale and an offset the forward standardizes away
        w = conv_filters(nn.Sequential(conv))
        torch.testing.assert_close(F.conv2d(x, w, conv.bias, padding=1), conv(x))
        assert w.flatten(1).mean(1).abs().max() < 1e-5 and not torch.allclose(w, conv.weight)

    def fit(callbacks, logdir):
        torch.manual_seed(0)
        net = nn.Sequential(ScaledStdConv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
        model = LitTiny(net)
        tiny_trainer(logdir, callbacks, max_epochs=1, limit_val_batches=0).fit(model, tiny_loaders(n=16)[0])
        return model

    plain = fit([], str(tmp_path / "plain"))
    model = fit([FilterCallback(scale="global")], str(tmp_path / "viz"))
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))
    (norm,) = [e.value for e in read_events(str(tmp_path / "viz")).Scalars("viz-filters/net.0/mean_norm")]
    conv = model.net[0]
    applied = F.batch_norm(
        conv.weight.reshape(1, 4, -1), None, None, (conv.gain * conv.scale).view(-1), training=True, eps=conv.eps
    )
    assert norm == pytest.approx(float(applied.reshape(4, -1).norm(dim=1).mean()), rel=1e-5)
    assert norm != pytest.approx(float(conv.weight.flatten(1).norm(dim=1).mean()), rel=1e-2)
