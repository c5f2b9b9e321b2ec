"""What the default (per-probe / per-unit) images say about themselves, read back from a real event file: every
panel of several images is named (a header over it or a label under it), as in the grid layouts."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from helpers import LitTiny, RecordingWriter, TinyCNN, read_events, tiny_loaders, tiny_trainer

from lightning_viz.callbacks.activations import ActivationCallback
from lightning_viz.callbacks.patches import TopPatchesCallback
from lightning_viz.callbacks.synthesis import AdversarialCallback, ClassModelCallback, InversionCallback, UnitCallback

#: ImageNet-like class names, alike up to their last characters (so that cut, they read the same whatever the class)
LONG = [f"n01440764 a long class name, with synonyms, and its latin name number {i}" for i in range(3)]


@pytest.fixture(scope="module")
def acc(tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("legible"))
    cbs = [
        AdversarialCallback(epsilon=0.1, attack="fgsm", num_probes=2, min_flip=False, class_names=LONG),
        InversionCallback(layers="net.conv1", steps=2, num_probes=2),
        TopPatchesCallback(layers="net.conv1", num_units=2, k=3, num_probes=8),
        ActivationCallback(layers="net.conv1", max_channels=4, num_probes=2),
        ClassModelCallback(steps=1),
        UnitCallback(layers="net.conv2", channels=[0, 1, 2], steps=1),
    ]
    train, val = tiny_loaders(16)
    tiny_trainer(logdir, cbs, max_epochs=1).fit(LitTiny(TinyCNN(width=4)), train, val)
    return read_events(logdir)


def pixels(acc, tag: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(acc.Images(tag)[0].encoded_image_string)).convert("RGB"))


def tiles(n: int, px: int = 96, pad: int = 2) -> list[tuple[int, int]]:
    """The x-ranges of ``n`` tiles of ``px`` pixels side by side with ``pad`` pixels around each."""
    return [(pad + i * (px + pad), (i + 1) * (px + pad)) for i in range(n)]


def has_text(img: np.ndarray, cols: list[tuple[int, int]], where: str) -> list[bool]:
    """Per column ``x0:x1``: dark (text) pixels above (``where="above"``) or below the tiles' rows (the rows
    where the first column is mostly not white: an image there)."""
    rows = np.flatnonzero((img[:, cols[0][0] : cols[0][1]] != 255).any(-1).mean(1) > 0.9)
    band = img[: rows.min()] if where == "above" else img[rows.max() + 1 :]
    return [bool((band[:, a:b].max(-1) < 100).any()) for a, b in cols]


def test_adversarial_per_probe_image_names_its_three_panels(acc):
    img = pixels(acc, "viz-adversarial/p000")
    assert img.shape[1] == 3 * 98 + 2  # original | delta | adversarial, 8 px shown at 96
    assert has_text(img, tiles(3), "above") == [True] * 3  # "original", "delta +-0.1", "adversarial"


def test_inversion_per_probe_image_names_original_and_reconstruction(acc):
    img = pixels(acc, "viz-inversion/net.conv1/p000")
    assert img.shape[1] == 2 * 98 + 2  # original | reconstruction, 8 px shown at 96
    assert has_text(img, tiles(2), "above") == [True] * 2
    # and, as the grid and the other per-probe images, a title line naming the probe, its class and the layer
    rows = np.flatnonzero((img[:, 2:40] != 255).all(-1).all(1))  # the image rows
    assert rows.min() >= 14 + 2 + 16 and (img[:16].max(-1) < 100).any()  # "p000 1: inversion of net.conv1"


def test_panel_caption_cuts_long_class_names_not_the_prediction():
    import torch

    from lightning_viz.callbacks.maps import panel_caption
    from lightning_viz.probe import ProbeSet
    from lightning_viz.render import text_px

    names = ["n01440764 tench, Tinca tinca", "n01484850 great white shark, white shark, man-eater, Carcharodon"]
    probe = ProbeSet(images=torch.zeros(1, 3, 8, 8), labels=torch.tensor([1]))
    results = {"pred:class": torch.tensor([0]), "pred:prob": torch.tensor([0.4321])}
    whole = panel_caption("p000", probe, results, 0, names)
    assert whole == f"p000  true: {names[1]}  pred: {names[0]} 43%"  # no width: as before
    width = 2 * 192 + 3 * 2  # an image and one map at 96 px shown at 192
    text = panel_caption("p000", probe, results, 0, names, width)
    assert text_px(text, 16) <= width < text_px(whole, 16)  # fits the strip, as the whole would not
    assert text.startswith("p000  true: n01484850 great") and "  pred: n01440764 tench" in text
    assert text.endswith(" 43%") and text.count("...") == 2  # both names cut, the probability kept
    # no room for more: names keep 12 characters, the strip cuts the end (here the note on the rows)
    text = panel_caption("p000", probe, results, 0, names, width, "   top: per image, bottom: fixed scale")
    assert text.startswith("p000  true: n01484850...  pred: n01440764... 43%   top:")


def test_adversarial_caption_cuts_long_class_names_to_show_both_predictions(acc):
    from lightning_viz.render import _shared_strip, cut_name, fit_names

    img = pixels(acc, "viz-adversarial/p000")
    width = img.shape[1]
    text = fit_names(lambda n: f"p000: pred {cut_name(LONG[0], n)} -> {cut_name(LONG[0], n)}", width, 16)
    assert text.count("...") == 2 and len(text) > 40  # both names, cut to the same length
    want = _shared_strip(width, [text], 16, align="left").permute(1, 2, 0).numpy()
    assert (img[:16] == want).all()  # the caption strip on top is that text


def test_a_map_constant_up_to_rounding_is_drawn_and_noted_as_constant():
    import torch
    import torch.nn.functional as F

    from lightning_viz.callbacks.maps import _empty_map_notes
    from lightning_viz.render import _shared_strip, normalize_maps

    # a 1 x 1 CAM (resnet18's layer4 at 28 px) upsampled as the CAM methods do: equal up to float rounding
    maps = F.interpolate(torch.tensor([[[[0.058368]]], [[[0.065185]]]]), size=(28, 28), mode="bilinear")[:, 0]
    maps = maps * torch.linspace(1, 1 + 3e-7, 28)  # the few ulps of spread that bilinear weights leave
    assert (maps.flatten(1).amax(1) > maps.flatten(1).amin(1)).all()
    assert (normalize_maps(maps) == 0).all()  # not stretched into stripes over the whole colormap
    structured = torch.linspace(0, 1, 28 * 28).view(1, 28, 28)
    assert normalize_maps(structured).max() == 1 and normalize_maps(torch.zeros(1, 4, 4)).max() == 0
    notes = _empty_map_notes(torch.cat([maps, structured]), None, 64)
    assert notes[0] is _shared_strip(64, ["map constant"], 14) and notes[2] is None


def test_top_patches_per_unit_image_names_the_unit_and_each_patch_class(acc):
    img = pixels(acc, "viz-top_patches/net.conv1/unit000")
    assert img.shape[1] == 3 * 66 + 2  # k=3 patches shown at 64 px
    assert has_text(img, tiles(3, 64), "below") == [True] * 3  # the class of the probe each patch is from
    assert has_text(img, tiles(3, 64), "above")[0]  # "net.conv1 unit 0: top-3 patches, strongest first"


@pytest.mark.parametrize("tag", ["viz-class_model/grid", "viz-units/net.conv2/grid"])
def test_class_model_and_unit_grids_say_what_they_show_in_a_title_line_as_the_other_grids(acc, tag):
    """The filters', activations', top patches', inversion and adversarial grids open with a title line; the
    class-model and unit grids began with their first images."""
    img = pixels(acc, tag)
    rows = np.flatnonzero((img[:, 2:40] != 255).all(-1).all(1))  # the rows of the first column's images
    assert rows.min() > 14 and (img[: rows.min()].max(-1) < 100).any()  # a line of text above them


def test_activation_per_probe_image_names_its_channels_at_a_readable_size(acc):
    img = pixels(acc, "viz-activations/net.conv1/p000")
    assert img.shape[1] == 160  # 4 channels in 2 x 2 tiles, 8 px maps at 48 (display_px): 102 px, widened to 160
    assert has_text(img, tiles(2, 48), "below") == [True] * 2  # "ch 2", "ch 3" under the last row
    assert has_text(img, tiles(2, 48), "above")[0]  # "p000 1: net.conv1, first channels"


def test_activation_per_probe_image_explains_its_colors_with_a_colorbar_of_the_probe_range():
    """The channels of a probe share one range (its activations' min..max), but nothing said which: viridis tiles
    with no scale. A colorbar of that range now runs under them, the numbers written."""
    import torch

    from lightning_viz.logging import VizLogger
    from lightning_viz.probe import ProbeSet
    from lightning_viz.render import colorbar, to_uint8

    writer = RecordingWriter()

    g = torch.Generator().manual_seed(0)
    probe = ProbeSet(images=torch.rand(2, 3, 8, 8, generator=g), labels=torch.tensor([0, 1]))
    maps = torch.randn(2, 4, 4, 4, generator=g) * torch.tensor([1.0, 5.0]).view(2, 1, 1, 1)
    results = {
        "maps:net.conv1": maps,
        "channels:net.conv1": torch.arange(4).expand(2, 4),
        "nonpos:net.conv1": (maps <= 0).flatten(1).sum(1),
        "numel:net.conv1": torch.full((2,), 64),
        "chmax:net.conv1": maps.amax(dim=(2, 3)),
    }
    cb = ActivationCallback(layers="net.conv1", max_channels=4, num_probes=2)
    cb.log_results(VizLogger(writer, 0), results, probe, None)
    images = writer.last_images()
    for i in range(2):
        img = images[f"viz-activations/net.conv1/p00{i}"]
        want = to_uint8(colorbar(img.shape[1] - 4, float(maps[i].min()), float(maps[i].max()), "viridis"))
        assert (img[-26:-2, 2:-2] == want.permute(1, 2, 0).numpy()).all()  # the last strip, 2 px margins


def test_map_grid_names_each_probe_tile_and_puts_the_fixed_range_under_it():
    """layout="grid" pasted the probes' overlays with nothing to say which probe (or class) a tile was, nor on
    which scale: 64 probes of 224 px made an anonymous 1810 px square. Each tile now has its probe id and true
    class under it, a caption says the scale, and the fixed grid's colorbar keeps the margins of the tiles."""
    import torch

    from lightning_viz.callbacks.gradients import GradientCallback
    from lightning_viz.logging import VizLogger
    from lightning_viz.probe import ProbeSet
    from lightning_viz.render import _shared_strip, colorbar, to_uint8, wrap_caption

    writer = RecordingWriter()

    g = torch.Generator().manual_seed(0)
    probe = ProbeSet(images=torch.rand(3, 3, 8, 8, generator=g), labels=torch.tensor([2, 0, 1]))
    maps = torch.rand(3, 8, 8, generator=g)
    cb = GradientCallback(layout="grid", normalize="both", display_px=32, class_names=["cat", "dog", "eel"])
    cb.log_map(VizLogger(writer, 0), "saliency/input", maps, probe.images, probe, cb.class_names)
    images = writer.last_images()
    grid = images["viz-gradients/saliency/input/grid"]
    # 3 tiles of 32 px in rows of 2: caption (3 lines of 16), then per row 2 + 32 + 1 + label (13), then 2
    assert grid.shape == (3 * 16 + 2 * (2 + 32 + 1 + 13) + 2, 2 * 34 + 2, 3)  # the caption wraps onto 3 lines
    lines = wrap_caption("saliency/input: each map on its own range", grid.shape[1], 16)
    assert len(lines) == 3
    for i, line in enumerate(lines):
        caption = _shared_strip(grid.shape[1], [line], 16, align="left")
        assert (grid[16 * i : 16 * (i + 1)] == caption.permute(1, 2, 0).numpy()).all()
    for (y, x), text in zip([(48 + 35, 2), (48 + 35, 36), (48 + 48 + 35, 2)], ["p000 eel", "p001 cat", "p002 dog"]):
        assert (grid[y : y + 13, x : x + 32] == _shared_strip(32, [text], 13).permute(1, 2, 0).numpy()).all()
    fixed = images["viz-gradients/saliency/input/fixed/grid"]
    vmin, vmax = cb.scales["saliency/input"].update(maps)
    want = to_uint8(colorbar(fixed.shape[1] - 4, vmin, vmax, "jet")).permute(1, 2, 0).numpy()
    assert fixed.shape[0] == grid.shape[0] + 24 + 2 and (fixed[-26:-2, 2:-2] == want).all()


def test_signed_map_colorbar_gives_the_range_of_a_tiny_map_and_notes_an_all_zero_one():
    """A signed map of an as-built EfficientNet (~1e-14) was drawn on a +-1e-12 floor: a pale tile under a colorbar
    that did not give its range. It now spans its own +-max|m|; an all-zero map gets the note unsigned maps get."""
    import torch

    from lightning_viz.callbacks.gradients import GradientCallback
    from lightning_viz.callbacks.maps import _empty_map_notes
    from lightning_viz.render import colorbar, to_uint8

    cb = GradientCallback(methods=["gradient"], reduce="sum", signed=True)
    maps = torch.stack([torch.tensor([[-2.0, 1.0], [0.5, 4.0]]) * 1e-14, torch.zeros(2, 2)])
    bars = cb.bars(maps, None, None, 40)
    assert torch.equal(bars[0], to_uint8(colorbar(40, -4e-14, 4e-14, cb.heat_cmap)))
    assert bars[1] is _empty_map_notes(maps, None, 40)[1] and bars[1] is not None


def test_class_names_with_line_breaks_are_drawn_on_one_line(tmp_path):
    """A class name with a line break or a tab (read from a labels file, say) crashed every caption strip (Pillow:
    "can't measure length of multiline text") at the first epoch end; the strips draw it on one line, as spaces."""
    from lightning_viz.callbacks.gradients import GradientCallback
    from lightning_viz.render import text_strip

    assert torch.equal(text_strip(120, ["tabby\ncat\tx"]), text_strip(120, ["tabby cat x"]))
    names = ["tabby\ncat", "tiger\r\nshark", "a\tb"]
    cbs = [
        GradientCallback(class_names=names, num_probes=2, on_error="raise"),
        AdversarialCallback(class_names=names, num_probes=2, layout="grid", on_error="raise"),
    ]
    train, val = tiny_loaders()
    tiny_trainer(str(tmp_path), cbs, max_epochs=1).fit(LitTiny(), train, val)
    acc = read_events(str(tmp_path))
    tags = acc.Tags()["images"]
    assert any(t.startswith("viz-gradients/") for t in tags) and "viz-adversarial/grid" in tags
