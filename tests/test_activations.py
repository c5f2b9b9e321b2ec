"""Feature maps: the method (hand-computed values, chunking, in-place ReLU) and ActivationCallback end to end."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import LitTiny, TinyCNN, check_untouched, image_steps, read_events, tiny_loaders, tiny_trainer
from torch import nn

from lightning_viz.callbacks.activations import MIN_PANEL_PX, ActivationCallback
from lightning_viz.capture import isolated
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.methods.activations import feature_maps
from lightning_viz.probe import ProbeSet


def test_feature_maps_hand_computed_and_chunked():
    model = TinyCNN()
    x = torch.randn(5, 3, 6, 6)

    def run():
        with isolated(model) as m:
            return feature_maps(m, x, ["conv1", "relu", "conv2"]), feature_maps(
                m, x, ["conv1", "relu", "conv2"], chunk_size=2
            )

    full, chunked = check_untouched(model, run)  # no hooks left, modes / RNG / params untouched
    conv1 = F.conv2d(x, model.conv1.weight, model.conv1.bias, padding=1)
    assert torch.allclose(full["conv1"], conv1, atol=1e-6)
    bn = model.bn1
    relu = F.relu(
        (conv1 - bn.running_mean.view(1, -1, 1, 1))
        / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        * bn.weight.view(1, -1, 1, 1)
        + bn.bias.view(1, -1, 1, 1)
    )
    assert torch.allclose(full["relu"], relu, atol=1e-6)
    assert torch.allclose(full["conv2"], F.conv2d(relu, model.conv2.weight, model.conv2.bias, padding=1), atol=1e-6)
    assert (full["conv1"] < 0).any()  # conv1's own output, before bn and the in-place ReLU
    for k in full:
        assert full[k].shape[0] == 5 and torch.allclose(full[k], chunked[k], atol=1e-6)
    empty = feature_maps(model.eval(), x[:0], ["conv1", "conv2"], chunk_size=2)  # an empty shard: empty maps
    assert empty["conv1"].shape == (0, 4, 6, 6) and empty["conv2"].shape == (0, 4, 6, 6)


def test_feature_maps_errors():
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"layer 'fc' outputs shape \(2, 3\), not a \[B, C, h, w\]"):
        feature_maps(model, x, ["fc"])
    with pytest.raises(LayerNotFoundError, match="'conv1'"):
        feature_maps(model, x, ["nope"])
    with pytest.raises(ValueError, match="chunk_size"):
        feature_maps(model, x, ["conv1"], chunk_size=0)
    assert all(not m._forward_hooks for m in model.modules())


def test_compute_channel_selection_and_dead_stats():
    lit = LitTiny(TinyCNN(width=6))
    model = lit.net
    probe = ProbeSet(torch.randn(3, 3, 5, 5))
    first = ActivationCallback(layers=["net.conv2"], max_channels=4)
    top = ActivationCallback(layers=["net.conv2"], max_channels=4, channels="top")
    chosen = ActivationCallback(layers=["net.conv2"], max_channels=4, channels=[5, 0])
    with isolated(lit):
        r_first = first.compute(lit, probe)
        r_top = top.compute(lit, probe)
        r_chosen = chosen.compute(lit, probe)
        a = model.conv2(model.relu(model.bn1(model.conv1(probe.images))))
    assert torch.equal(r_first["channels:net.conv2"], torch.arange(4).expand(3, 4))
    assert torch.allclose(r_first["maps:net.conv2"], a[:, :4], atol=1e-6)
    order = a.mean(dim=(2, 3)).argsort(dim=1, descending=True)[:, :4]
    assert torch.equal(r_top["channels:net.conv2"], order)
    assert torch.allclose(r_top["maps:net.conv2"], a.gather(1, order.view(3, 4, 1, 1).expand(-1, -1, 5, 5)), atol=1e-6)
    assert torch.equal(r_chosen["channels:net.conv2"], torch.tensor([5, 0]).expand(3, 2))
    assert torch.allclose(r_chosen["maps:net.conv2"], a[:, [5, 0]], atol=1e-6)
    assert torch.equal(r_first["nonpos:net.conv2"], (a <= 0).flatten(1).sum(1))
    assert torch.equal(r_first["chmax:net.conv2"], a.amax(dim=(2, 3)))


def test_activation_callback_logs_grids_and_dead_fraction(tmp_path):
    cb = ActivationCallback(max_channels=3)  # default layers: first and last conv
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=2)
    model = LitTiny()
    trainer.fit(model, *tiny_loaders(n=16))
    assert len(cb.probes) == 4  # default num_probes
    acc = read_events(str(tmp_path))
    for layer in ("net.conv1", "net.conv2"):
        for pid in ("p000", "p001", "p002", "p003"):
            imgs = acc.Images(f"viz-activations/{layer}/{pid}")
            assert [e.step for e in imgs] == [0, 1]
            # 3 tiles of 8 px shown at 48 (display_px), 2 per row, each with its channel under it; a caption on top,
            # a colorbar (24) of the probe's range under them; the panel MIN_PANEL_PX wide: the caption on 2 lines
            assert (imgs[0].width, imgs[0].height) == (MIN_PANEL_PX, 2 * 16 + 2 * (2 + 48 + 1 + 12) + 2 + 24 + 2)
    assert "viz-activations/net.fc/p000" not in acc.Tags()["images"]
    # dead statistics at the last epoch, recomputed by hand from the final weights (eval mode)
    with torch.no_grad():
        net = model.net.eval()
        x = cb.probes.images
        pre = net.conv2(net.relu(net.bn1(net.conv1(x))))  # conv2's own output (before the functional relu)
    dead = acc.Scalars("viz-activations/net.conv2/dead_fraction")[-1].value
    assert dead == pytest.approx(float((pre <= 0).float().mean()), abs=1e-6)
    dead_ch = acc.Scalars("viz-activations/net.conv2/dead_channels")[-1].value
    assert dead_ch == pytest.approx(float((pre.amax(dim=(0, 2, 3)) <= 0).float().mean()), abs=1e-6)


def test_activation_callback_dead_channel_counted(tmp_path):
    """A channel forced negative everywhere is a dead unit after the in-place ReLU."""

    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            self.act = nn.ReLU(inplace=True)
            self.fc = nn.Linear(2, 3)
            with torch.no_grad():
                self.conv.weight.zero_()
                self.conv.bias.copy_(torch.tensor([-1.0, 1.0]))

        def forward(self, x):
            return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))

    lit = LitTiny(Dead())
    cb = ActivationCallback(layers=["net.act"])
    probe = ProbeSet(torch.randn(2, 3, 4, 4))
    with isolated(lit):
        r = cb.compute(lit, probe)
    assert torch.equal(r["nonpos:net.act"], torch.tensor([16, 16]))  # channel 0 zero at all 16 positions
    assert torch.equal(r["chmax:net.act"].amax(dim=0) <= 0, torch.tensor([True, False]))


def test_compute_on_a_float64_model():
    """Probes are float32 on CPU; a model trained in another dtype (precision="64-true") still gets its maps."""
    lit = LitTiny(TinyCNN()).double()
    probe = ProbeSet(torch.randn(2, 3, 5, 5))
    with isolated(lit):
        r = ActivationCallback(layers=["net.conv1"], max_channels=4).compute(lit, probe)
    expected = F.conv2d(probe.images.double(), lit.net.conv1.weight, lit.net.conv1.bias, padding=1)
    assert torch.allclose(r["maps:net.conv1"].double(), expected, atol=1e-6)


def test_activation_callback_options_validated(tmp_path):
    with pytest.raises(ValueError, match="max_channels must be >= 1"):
        ActivationCallback(max_channels=0)
    with pytest.raises(ValueError, match=r"channels must be 'first', 'top' or a list of channel indices; got 'best'"):
        ActivationCallback(channels="best")
    with pytest.raises(ValueError, match=r"channel indices >= 0 \(at least one\); got \[1, -1\]"):
        ActivationCallback(channels=[1, -1])
    with pytest.raises(ValueError, match=r"layer 'net.conv2' has 6 channels \(0..5\); got channels \[2, 6\]"):
        cb = ActivationCallback(layers="net.conv2", channels=[2, 6])
        tiny_trainer(str(tmp_path), [cb]).fit(LitTiny(TinyCNN(width=6)), *tiny_loaders(n=12))
    with pytest.raises(ValueError, match="unknown colormap 'nope'"):
        tiny_trainer(str(tmp_path), [ActivationCallback(cmap="nope")]).fit(LitTiny(), *tiny_loaders(n=12))
    with pytest.raises(ValueError, match="at least one layer"):
        ActivationCallback(layers=[])
    cb = ActivationCallback(layers="net.conv2")
    assert cb.layers == ["net.conv2"]
    assert ActivationCallback(layers=["net.conv2", "_orig_mod.net.conv2"]).layer_names(LitTiny()) == ["net.conv2"]
    assert cb.state_key != ActivationCallback(layers=["net.conv1"]).state_key


def test_activation_callback_every_n_epochs(tmp_path):
    cb = ActivationCallback(layers=["net.relu"], num_probes=1, every_n_epochs=2, channels="top")
    tiny_trainer(str(tmp_path), [cb], max_epochs=3).fit(LitTiny(), *tiny_loaders(n=12))
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-activations/net.relu/p000") == [1, 2]  # (epoch + 1) % 2 == 0, and the last epoch
    assert "viz-activations/net.relu/p001" not in acc.Tags()["images"]


@pytest.mark.parametrize(
    "arch,first,last",
    [
        ("vgg11", "net.features.0", "net.features.20"),  # the last block feeding global pooling, not the last conv
        ("mobilenet_v3_small", "net.features.0.0", "net.features.12"),
        ("densenet121", "net.features.conv0", "net.features.norm5"),
    ],
)
def test_torchvision_architectures(arch, first, last):
    """Default layers resolve on real architectures; filters and feature maps come out untouched-model."""
    torchvision = pytest.importorskip("torchvision")
    from lightning_viz.callbacks.filters import FilterCallback

    lit = LitTiny(getattr(torchvision.models, arch)(weights=None, num_classes=3))
    g = torch.Generator().manual_seed(0)
    probe = ProbeSet(torch.randn(2, 3, 64, 64, generator=g), labels=torch.tensor([0, 1]))
    filters, acts = FilterCallback(), ActivationCallback(max_channels=4)
    filters.check(lit)
    acts.check(lit)
    with isolated(lit):
        acts.check_input(acts.adapted(lit), probe.images[:1])  # setup: the default's last block by one forward
    assert acts.layer_names(lit) == [first, last]

    def run():
        with isolated(lit):
            return filters.compute(lit, None), acts.compute(lit, probe)

    f, a = check_untouched(lit, run)
    assert f["layer"] == first and torch.equal(f["weights"], dict(lit.named_modules())[first].weight)
    assert a[f"maps:{first}"].shape[:2] == (2, 4) and a[f"maps:{last}"].shape[:2] == (2, 4)
    assert (a[f"maps:{first}"] < 0).any()  # the conv's own output, before its (in-place) activation


def test_grid_tiles_of_large_probes_are_averaged_down_to_display_px(tmp_path):
    """layout="grid" at 224 px drew every tile at the probe size (16 channels + the image: 3.8k px wide rows);
    tiles now come down by an integer factor to the smallest size >= display_px, so 32 px probes at
    display_px=8 give the same image as 8 px probes."""
    from lightning_viz.callbacks.activations import grid_tile_size

    assert grid_tile_size((224, 224), 48) == (56, 56)
    assert grid_tile_size((32, 32), 48) == (32, 32)  # smaller: kept here, upscaled later
    assert grid_tile_size((100, 60), 16) == (33, 20)  # factor 3: the shorter side 20 >= 16
    assert grid_tile_size((224, 224), 0) == (224, 224)
    widths = []
    for size in (8, 32):
        logdir = str(tmp_path / str(size))
        cb = ActivationCallback(layers=["net.conv1"], num_probes=2, layout="grid", display_px=8)
        tiny_trainer(logdir, [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12, size=size))
        img = read_events(logdir).Images("viz-activations/net.conv1/grid")[-1]
        widths.append((img.width, img.height))
    assert widths[0] == widths[1]


def test_a_layer_with_1x1_maps_for_the_data_is_warned_about_at_setup(tmp_path):
    """resnet18's layer4 on 8 px images gives 1x1 maps: every channel tile was one flat color, without a word (as
    CAMCallback warns for its constant maps); the setup forward says so, naming the layer and the image size."""
    import torchvision

    from lightning_viz.callbacks.base import VisualizationWarning

    torch.manual_seed(0)
    model = LitTiny(torchvision.models.resnet18(weights=None, num_classes=3))
    cb = ActivationCallback(layers=["net.layer1", "net.layer3", "net.layer4"], num_probes=2)
    with pytest.warns(VisualizationWarning, match=r"layers 'net.layer3', 'net.layer4' give 1x1 feature maps for 8x8"):
        tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(model, *tiny_loaders(n=12))
    assert cb.last_logged_tags


def test_a_panel_of_one_channel_has_room_for_its_caption_and_colorbar(tmp_path):
    """One channel (channels=[1], or a layer with one): the panel was one 48 px tile wide, its caption cut and the
    colorbar's two value labels printed over each other; now MIN_PANEL_PX wide, the bar as wide as the panel."""
    import io

    import numpy as np
    from PIL import Image

    cb = ActivationCallback(layers="net.conv1", channels=[1], num_probes=1)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    (img,) = read_events(str(tmp_path)).Images("viz-activations/net.conv1/p000")
    rgb = np.asarray(Image.open(io.BytesIO(img.encoded_image_string)).convert("RGB")).astype(int)
    assert rgb.shape[1] == MIN_PANEL_PX
    bar = rgb[-24]  # the colorbar's top row: colored from edge to edge (padding 2)
    assert (np.abs(bar - 255).sum(axis=1) > 0).sum() == MIN_PANEL_PX - 4


def test_grid_rows_say_the_range_their_colors_stand_for():
    """layout="grid" scales each row on its own range but showed no numbers (a signed pre-ReLU map and a weak one
    looked alike): the probe's min and max are written under its label, on two more lines."""
    cb = ActivationCallback(layers="net.conv1", layout="grid", max_channels=2)
    probe = ProbeSet(images=torch.rand(2, 3, 16, 16), labels=torch.tensor([0, 1]))
    maps = torch.stack([torch.linspace(-2, 1, 512).view(2, 16, 16), torch.zeros(2, 16, 16)])
    grid = cb.layer_grid("net.conv1", maps, torch.tensor([[0, 1], [0, 1]]), probe, None).numpy()
    under = grid[:, -2 - 36 : -2, 2 : 2 + 48]  # the last row's strips under its probe image: 3 lines of 12 px
    lines = [under[:, 12 * i : 12 * (i + 1)] for i in range(3)]
    assert [bool((t < 100).any()) and float((t.min(axis=0) >= 250).mean()) > 0.6 for t in lines] == [True] * 3  # text
    assert grid.shape[2] >= MIN_PANEL_PX
