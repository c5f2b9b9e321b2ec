"""Monitoring that reads at a glance: tag groups, per-probe panels, class names, the epoch-end line, and the
card budget of the demo config -- all read back from real event files."""

from __future__ import annotations

import io
import logging
import os
import statistics

import numpy as np
import pytest
import torch
from helpers import (
    LitTiny,
    RecordingWriter,
    TinyCNN,
    image_steps,
    read_events,
    scalar_steps,
    tiny_loaders,
    tiny_trainer,
)
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz.callbacks.embeddings import EmbeddingCallback
from lightning_viz.callbacks.filters import FilterCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.callbacks.maps import panel_caption
from lightning_viz.logging import VizLogger, make_tag, namespaced
from lightning_viz.probe import ProbeSet
from lightning_viz.progress import logger as viz_logger
from lightning_viz.progress import progress, reporting
from lightning_viz.render import STRIP_CACHE_BYTES, colorbar, colormap, compose, to_uint8, upscale
from lightning_viz.tracking import TRACKING_LAYOUT

DEMO = os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml")
NAMES = ["circle", "square", "triangle"]


class NamedTensorDataset(TensorDataset):
    """A TensorDataset with torchvision's ``classes`` attribute (class names by index)."""

    classes = NAMES


def named_loaders(n: int = 12, batch_size: int = 8):
    train, val = tiny_loaders(n=n, batch_size=batch_size)
    named = [NamedTensorDataset(*loader.dataset.tensors) for loader in (train, val)]
    return DataLoader(named[0], batch_size=batch_size), DataLoader(named[1], batch_size=batch_size)


def _decode(event) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))


def test_tags_start_with_the_family_and_name_goes_after_it():
    assert make_tag("cam", "gradcam/net.conv3", "p000") == "viz-cam/gradcam/net.conv3/p000"
    assert make_tag("gradients", "panel", None, "", "p001") == "viz-gradients/panel/p001"
    assert namespaced("viz-cam/panel/p000", "pred") == "viz-cam/pred/panel/p000"
    assert namespaced("viz-cam/time_s", None) == "viz-cam/time_s"
    assert namespaced("train_loss", "pred") == "train_loss"  # not a lightning-viz tag: left alone
    import re

    patterns = [p for section in TRACKING_LAYOUT.values() for _, (_, regs) in section.items() for p in regs]
    for tag in (
        "viz-cam/gradcam/net.conv3/drift/rank_corr",
        "viz-cam/pred/gradcam/net.conv3/drift/topk_iou",
        "viz-cam/drift/prediction_flips",
        "viz-gradients/probe_accuracy",
        "viz-occlusion/occlusion/score/faithfulness/deletion_auc",
        "viz-cam/gradcam/net.conv3/sanity/rank_corr",
        "viz-cam/gradcam/net.conv3/localization/pointing_game",
    ):
        assert sum(bool(re.search(p, tag)) for p in patterns) == 1, tag  # one chart of the Custom Scalars tab
    assert not any(re.search(p, "viz/gradcam/net.conv3/drift/rank_corr") for p in patterns)  # old scheme gone


def test_indices_in_tags_are_zero_padded_to_the_runs_largest_index_so_they_sort_numerically():
    """TensorBoard sorts tags as strings (``class10`` before ``class2``): every index in a tag is zero-padded to
    the digits of the run's largest index, at least 3 (``p000``, ``unit000``, ``class000``); a class name other
    than the index itself follows as one tag segment."""
    from lightning_viz.logging import indexed

    assert indexed("class", 2, 9) == "class002" and indexed("unit", 7, 2047) == "unit0007"
    tags = [indexed("class", c, 1999) for c in (2, 10, 100, 1000)]
    assert tags == ["class0002", "class0010", "class0100", "class1000"] and sorted(tags) == tags
    assert indexed("class", 2, 9, "cat") == "class002_cat"
    assert indexed("class", 3, 9, "3") == "class003"  # the digits' class names are their indices: said once
    assert indexed("class", 0, 9, "T-shirt/top") == "class000_T-shirt_top"  # a '/' would start a new segment
    assert indexed("class", 0, 999, "tench, Tinca tinca") == "class000_tench_Tinca_tinca"
    assert indexed("class", 5, 9, " ") == "class005"
    # Lightning's MLFlowLogger drops what is not ASCII from metric names (warning at every write): accents go
    assert indexed("class", 1, 9, "Café crème") == "class001_Cafe_creme" and indexed("class", 2, 9, "猫") == "class002"
    from lightning_viz.logging import _MLFLOW_DROPS

    odd = ["a/b", "x, y", "ü=1", "50%", "(c)", "tab\there", "new\nline", "é" * 40, "🐱 cat", "a+b", "#3"]
    assert not any(_MLFLOW_DROPS.search(indexed("class", 0, 9, name)) for name in odd)
    assert ProbeSet(torch.zeros(16, 1, 2, 2)).ids[-1] == "p015"  # the ids of up to 1000 probes as they were
    ids = ProbeSet(torch.zeros(1001, 1, 2, 2)).ids
    assert ids[:2] == ["p0000", "p0001"] and ids[-1] == "p1000" and sorted(ids) == ids
    assert ProbeSet(torch.zeros(1001, 1, 2, 2)).shard(1, 2).ids == ids[501:]  # a rank's shard: the whole set's ids


def test_panel_tiles_size_caption_and_fixed_row_with_colorbars(tmp_path):
    cb = GradientCallback(
        methods=["saliency", "guided_backprop", "input_x_gradient"],
        num_probes=3,
        normalize="both",
        class_names=["zero", "one", "two"],
    )
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
    model = LitTiny(TinyCNN(width=3))
    trainer.fit(model, *tiny_loaders(n=12))
    acc = read_events(str(tmp_path))
    assert sorted(t for t in acc.Tags()["images"]) == [f"viz-gradients/panel/p00{i}" for i in range(3)]
    img = _decode(acc.Images("viz-gradients/panel/p001")[0])
    # 4 tiles (image + 3 methods) of 8 px shown at 128 px, padding 2; caption (16) and method names (14)
    # over two rows (per image; fixed scale), a colorbar (24) under each row
    assert img.shape == (16 + 14 + 2 + 128 + 1 + 24 + 2 + 128 + 1 + 24 + 2, 4 * 128 + 5 * 2, 3)
    caption, names = img[:16], img[16:30]
    assert (caption < 100).any() and (names < 100).any()  # text in black on the white strips
    # the first tile is the probe image itself, upscaled 16x (nearest)
    probe = cb.probes.subset(slice(1, 2))
    want = (upscale(probe.display_images(), 128)[0].permute(1, 2, 0) * 255).round().numpy()
    tile = img[32:160, 2:130].astype(float)
    assert np.abs(tile - want).max() <= 1
    # every method tile differs from the plain image (an overlay), in both rows, and is blended at the probe's
    # 8 px and zoomed as the image is: one uniform 16 x 16 block per probe pixel (not a bilinear 128 px map)
    for c in range(1, 4):
        x0 = 2 + c * 130
        for y0 in (32, 187):
            over = img[y0 : y0 + 128, x0 : x0 + 128].astype(float)
            assert np.abs(over - want).mean() > 5
            blocks = over.reshape(8, 16, 8, 16, 3)
            assert (blocks == blocks[:, :1, :, :1]).all()
            assert len(np.unique(blocks[:, 0, :, 0].reshape(-1, 3), axis=0)) > 8  # a map, not a flat tint
    # under the fixed row: a colorbar from cmap(0) to cmap(1) of jet, one per method
    lut = (colormap(torch.tensor([[[0.0, 1.0]]]), "jet")[0, :, 0].T * 255).round().numpy()
    bar = img[316:324]
    for c in range(1, 4):
        x0 = 2 + c * 130
        assert np.abs(bar[:, x0].astype(float) - lut[0]).max() <= 2
        assert np.abs(bar[:, x0 + 127].astype(float) - lut[1]).max() <= 2
    # the caption's values: true class and prediction with its probability, in the class names given
    with torch.no_grad():
        logits = model.eval()(probe.images)
    prob, pred = logits.softmax(1).max(1)
    results = cb.compute(model, cb.probes)
    torch.testing.assert_close(results["pred:prob"][1:2], prob)  # from the shared pass's logits
    # under the per-image row: each tile's own colorbar, from its map's minimum to its maximum (values written)
    for c, method in enumerate(["saliency", "guided_backprop", "input_x_gradient"], start=1):
        m = results[f"map:{method}/input"][1]
        want = to_uint8(colorbar(128, float(m.min()), float(m.max()), "jet")).permute(1, 2, 0).numpy()
        assert (img[161:185, 2 + c * 130 : 2 + c * 130 + 128] == want).all()
    text = panel_caption("p001", cb.probes, results, 1, cb.get_class_names(trainer))
    assert (
        text == f"p001  true: {['zero', 'one', 'two'][int(probe.labels)]}  pred: "
        f"{['zero', 'one', 'two'][int(pred)]} {float(prob):.0%}"
    )


def _colorbar_step_by_step(width, vmin, vmax, cmap, height=24):
    """The colorbar as it was drawn before it moved to uint8 numpy with a cached bar: in floats, with torch."""
    from lightning_viz.render import _fmt, text_strip

    bar_h = max(3, height // 3)
    bar = colormap(torch.linspace(0, 1, width).view(1, 1, -1).expand(1, bar_h, width), cmap)[0]
    ticks = torch.ones(3, 2, width)
    zero = None
    if vmin < 0 < vmax:
        zero = round(-vmin / (vmax - vmin) * (width - 1))
        bar[:, :, zero] = 0.0
        ticks[:, :, zero] = 0.0
    label_h = height - bar_h - 2
    labels = text_strip(width, [_fmt(vmin)], label_h, align="left")
    right = text_strip(width // 2, [_fmt(vmax)], label_h, align="left")
    ink = (right.min(dim=0).values < 0.5).any(dim=0).nonzero()
    if len(ink):
        right = right[:, :, : int(ink.max()) + 3]
    rw = int(right.shape[-1])
    labels[:, :, width - rw :] = torch.minimum(labels[:, :, width - rw :], right)
    if zero is not None and 0.2 * width < zero < 0.8 * width:
        z = text_strip(16, ["0"], label_h)
        x0 = max(0, min(width - 16, zero - 8))
        labels[:, :, x0 : x0 + 16] = torch.minimum(labels[:, :, x0 : x0 + 16], z)
    return to_uint8(torch.cat([bar, ticks, labels], dim=1))


@pytest.mark.parametrize("cmap", ["jet", "RdBu_r", "viridis"])
def test_the_uint8_colorbar_has_the_pixels_of_the_float_one_drawn_step_by_step(cmap):
    """Panels take their colorbars as uint8 from a cached bar and numpy (``_shared_colorbar``): the same pixels as
    the colormap, ticks and value labels drawn in floats and converted, for any width and range (zero marked or
    not, its label in the middle or left out near an end, long and short labels, narrow bars)."""
    from lightning_viz.render import _shared_colorbar

    for width in (16, 40, 101, 128, 300):
        for vmin, vmax in [
            (0.0, 1.0),
            (-1.0, 3.0),
            (-4e-14, 4e-14),
            (-0.5, 1e5),
            (0.0123, 0.0456),
            (-3.0, -1.0),
            (-1.0, 0.001),
            (float("nan"), 1.0),
            (-7.25e-3, 9.99e-3),
        ]:
            want = _colorbar_step_by_step(width, vmin, vmax, cmap)
            got = _shared_colorbar(width, vmin, vmax, cmap)
            assert got.dtype == torch.uint8 and torch.equal(got, want), (width, vmin, vmax)
            assert torch.equal(colorbar(width, vmin, vmax, cmap), want.float() / 255)
    bar = _shared_colorbar(128, -1.0, 3.0, cmap)
    bar[:, 0, 0] = 7  # a caller that writes into its colorbar changes no later one (the cached bar is copied)
    assert torch.equal(_shared_colorbar(128, -1.0, 3.0, cmap), _colorbar_step_by_step(128, -1.0, 3.0, cmap))


def test_text_widths_are_pillows_measured_once_per_text_and_font():
    """Captions are measured to fit them (``fit_names``, ``wrap_caption``) and again when drawn: the width is
    Pillow's ``textlength``, measured once per text and font (the longest captions cost ~0.1 ms to measure)."""
    from PIL import Image, ImageDraw

    from lightning_viz.render import _font, _text_length, text_px

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    for size in (9, 11, 12):
        for text in ["0.0123", "p001  true: triangle  pred: triangle 75%", "W.", "", "-4.0e-14"]:
            assert _text_length(text, _font(size)) == draw.textlength(text, font=_font(size))
    assert (
        text_px("p001  true: triangle", 14) == int(np.ceil(draw.textlength("p001  true: triangle", font=_font(11)))) + 4
    )

    class Counting:
        def __init__(self):
            self.calls = 0

        def getlength(self, text):
            self.calls += 1
            return 5.0 * len(text)

    font = Counting()
    assert _text_length("p001  true: circle", font) == _text_length("p001  true: circle", font) == 90.0
    assert font.calls == 1


def test_a_signed_panel_of_tiles_narrower_than_the_zero_label_is_logged():
    """With ``display_px=0`` an 8 px probe's tile is 8 px wide: the colorbar under it marks zero with its "0" label
    in the bar's width (it was pasted 16 px wide: a shape error, and the callback failed at every epoch)."""
    bar = colorbar(12, -1.0, 1.0, "RdBu_r")
    assert bar.shape == (3, 24, 12)
    zero = round(0.5 * 11)
    assert (bar[:, :10, zero] == 0).all()  # the zero line and tick
    assert (bar[:, 10:, 3:9] < 0.5).any()  # the "0" under it
    assert torch.equal(colorbar(40, -1.0, 1.0, "RdBu_r"), _colorbar_step_by_step(40, -1.0, 1.0, "RdBu_r").float() / 255)
    cb = GradientCallback(methods=["gradient"], reduce="sum", display_px=0)
    writer = RecordingWriter()
    probe = ProbeSet(
        images=torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), labels=torch.tensor([0, 1])
    )
    maps = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    cb.log_results(VizLogger(writer, 0), {"map:gradient/input": maps}, probe, None)
    panel = writer.last_images()["viz-gradients/panel/p000"]
    assert panel.shape[1] >= 2 * 8 + 3 * 2
    assert (panel[-26:-2, 12:20][:10].min(axis=2) == 0).any()  # the colorbar's zero line under the map tile


def test_signed_maps_use_a_diverging_colormap_with_zero_marked():
    cb = GradientCallback(methods=["gradient"], reduce="sum")
    assert cb.signed and cb.heat_cmap == "RdBu_r"
    assert GradientCallback(methods=["gradient"], reduce="sum", cmap="bwr").heat_cmap == "bwr"
    bar = colorbar(101, -1.0, 3.0, "RdBu_r")
    zero = round(1 / 4 * 100)  # 0 sits at a quarter of the range
    assert (bar[:, :8, zero] == 0).all() and (bar[:, :8, zero + 3] > 0).any()  # a black tick at zero
    assert not (bar[:, :8, 0] == 0).all()
    # in a panel of signed maps each per-image tile gets its own symmetric range, zero marked in the middle
    writer = RecordingWriter()

    probe = ProbeSet(
        images=torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), labels=torch.tensor([0, 1])
    )
    maps = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    cb.log_results(VizLogger(writer, 0), {"map:gradient/input": maps}, probe, None)
    images = writer.last_images()
    panel = images["viz-gradients/panel/p000"]
    assert panel.shape == (16 + 14 + 2 + 128 + 1 + 24 + 2, 2 * 128 + 3 * 2, 3)
    bar = panel[16 + 14 + 2 + 128 + 1 :][:8, 132:260]  # under the map tile
    assert (bar[:, 64] == 0).all() or (bar[:, 63] == 0).all()  # the zero line at the middle of -m..m
    lut = (colormap(torch.tensor([[[0.0, 1.0]]]), "RdBu_r")[0, :, 0].T * 255).round().numpy()
    assert np.abs(bar[:, 0].astype(float) - lut[0]).max() <= 2


def test_class_names_from_the_dataset_reach_the_projector_metadata(tmp_path):
    cb = EmbeddingCallback(num_probes=12, projection=["pca"])
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
    trainer.fit(LitTiny(), *named_loaders())
    assert cb.get_class_names(trainer) == NAMES
    logdir = trainer.logger.log_dir
    folders = [os.path.join(logdir, "00000", d) for d in os.listdir(os.path.join(logdir, "00000"))]
    assert len(folders) == 1 and "viz-embeddings" in folders[0]
    with open(os.path.join(folders[0], "metadata.tsv")) as fh:
        rows = fh.read().splitlines()
    assert rows[0].split("\t") == ["label", "prediction"]
    assert [r.split("\t")[0] for r in rows[1:]] == [NAMES[int(v)] for v in cb.probes.labels]
    assert all(r.split("\t")[1] in NAMES for r in rows[1:])
    # the option wins over the dataset's names
    assert EmbeddingCallback(class_names=["a", "b", "c"]).get_class_names(trainer) == ["a", "b", "c"]


def test_built_in_datamodules_name_their_classes():
    from lightning_viz.data import DigitsDataModule, ShapesDataModule

    assert ShapesDataModule(num_train=8, num_val=8).classes == ["circle", "square", "triangle", "cross"]
    assert DigitsDataModule.classes == [str(d) for d in range(10)]


def test_one_log_line_per_epoch_end(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(viz_logger, "propagate", True)  # caplog listens on the root logger
    caplog.set_level(logging.INFO, logger="lightning_viz")
    cbs = [
        FilterCallback(),
        GradientCallback(num_probes=2, every_n_epochs=2),
        GradientCallback(num_probes=2, name="quiet", epoch_summary=False),
    ]
    tiny_trainer(str(tmp_path), cbs, max_epochs=3).fit(LitTiny(), *tiny_loaders(n=12))
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_viz" and " epoch " in r.getMessage()]
    assert [line.split(":")[0] for line in lines] == [f"lightning-viz epoch {e}" for e in range(3)]
    # every_n_epochs=2: epochs 1, 3, ... and the last (2)
    assert "filters " in lines[0] and "gradients" not in lines[0]
    assert "gradients " in lines[1] and "filters " in lines[1] and "gradients " in lines[2]
    assert "quiet" not in "".join(lines)  # epoch_summary=False leaves it out
    total = float(lines[1].split(": ")[1].split(" s")[0])
    parts = [float(p.rsplit(" ", 2)[1]) for p in lines[1].split("(")[1].rstrip(")").split(", ")]
    assert total == pytest.approx(sum(parts), abs=0.1)


def test_runs_before_training_get_their_own_line(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(viz_logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning_viz")
    cbs = [FilterCallback(run_at_start=True), GradientCallback(num_probes=2, run_at_start=True)]
    tiny_trainer(str(tmp_path), cbs, max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    lines = [m for m in msgs if m.startswith("lightning-viz ") and " s (" in m]
    assert [line.split(":")[0] for line in lines] == ["lightning-viz before training", "lightning-viz epoch 0"]
    assert all("filters " in line and "gradients " in line for line in lines)


def test_progress_lines_only_inside_a_run(caplog, monkeypatch):
    monkeypatch.setattr(viz_logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning_viz")
    progress(1, 10)  # outside a run (the methods used on their own): silent
    with reporting("occlusion", every_s=0.0):
        progress(3, 10, "occluded images")
    with reporting(None, every_s=0.0):  # ranks other than 0
        progress(4, 10)
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    assert len(msgs) == 1 and msgs[0].startswith("lightning-viz occlusion: 3/10 occluded images")


def test_progress_lines_say_the_time_left(caplog, monkeypatch):
    """From a loop's second report on, a line gives the time left at the loop's rate since its first report; a new
    loop of the same run starts its rate anew."""
    import lightning_viz.progress as progress_module

    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(viz_logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning_viz")
    with reporting("occlusion", every_s=0.0):  # run start: 0 s
        progress(10, 100, "occluded images")  # 10 s: the loop's first report, no rate yet
        progress(30, 100, "occluded images")  # 20 s: 20 images in 10 s, 70 left
        progress(50, 100, "occluded images")  # 30 s: 40 images in 20 s, 50 left
        progress(5, 20, "masked images")  # 40 s: another loop
        progress(15, 20, "masked images")  # 50 s: 10 in 10 s, 5 left
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    assert msgs == [
        "lightning-viz occlusion: 10/100 occluded images (10 s)",
        "lightning-viz occlusion: 30/100 occluded images (20 s, ~35 s left)",
        "lightning-viz occlusion: 50/100 occluded images (30 s, ~25 s left)",
        "lightning-viz occlusion: 5/20 masked images (40 s)",
        "lightning-viz occlusion: 15/20 masked images (50 s, ~5 s left)",
    ]


def test_a_long_callback_shows_progress(tmp_path, caplog, monkeypatch):
    import lightning_viz.progress as progress_module
    from lightning_viz.callbacks.occlusion import OcclusionCallback

    monkeypatch.setattr(viz_logger, "propagate", True)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # every chunk of occluded images: a line
    caplog.set_level(logging.INFO, logger="lightning_viz")
    cb = OcclusionCallback(window=4, stride=2, num_probes=2, memory_mb=0.01)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    lines = [m for m in msgs if m.startswith("lightning-viz occlusion: ")]
    assert len(lines) >= 2 and all("occluded images" in m for m in lines)
    total = int(lines[0].split("/")[1].split(" ")[0])
    assert total == 2 * 9  # 2 probes x 9 window positions (8 px, window 4, stride 2)


def test_faithfulness_curves_show_progress(tmp_path, caplog, monkeypatch):
    """The deletion/insertion curves (2 * (steps - 1) images per probe and key, plus 3 per probe; minutes on a
    224 px ResNet-50) log progress lines like the other long loops, counting every perturbed image of the run."""
    import lightning_viz.progress as progress_module
    from lightning_viz.callbacks.cam import CAMCallback
    from lightning_viz.tracking import MapTracker

    monkeypatch.setattr(viz_logger, "propagate", True)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # every chunk: a line
    caplog.set_level(logging.INFO, logger="lightning_viz")
    tracker = MapTracker(faithfulness=True, deletion_steps=4, chunk_size=4, filmstrip=False, drift=False)
    cb = CAMCallback(num_probes=2, tracker=tracker)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    lines = [m for m in msgs if m.startswith("lightning-viz cam: ")]
    assert len(lines) >= 2 and all("perturbed images" in m for m in lines)
    # 2 probes x (image + zero and blur baselines + 2 modes x 3 inner points of one map key)
    assert {int(m.split("/")[1].split(" ")[0]) for m in lines} == {2 * (3 + 2 * 3)}


@pytest.mark.parametrize(
    "methods, what, total",
    [
        (["integrated_gradients"], "path points", 2 * 4),
        (["smoothgrad_saliency", "smoothgrad_integrated_gradients"], "noisy images", 2 * 16),
    ],
)
def test_path_and_noise_averages_show_progress(tmp_path, caplog, monkeypatch, methods, what, total):
    """Integrated gradients (``ig_steps`` path points per probe) and SmoothGrad (16 noisy copies; around IG, 16 x 4)
    run minutes at 224 px on a CPU: progress lines count the points / noisy images of the run, one count per run
    (SmoothGrad's inner IG stays silent)."""
    import lightning_viz.progress as progress_module
    from lightning_viz.callbacks.gradients import GradientCallback

    monkeypatch.setattr(viz_logger, "propagate", True)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # every chunk: a line
    caplog.set_level(logging.INFO, logger="lightning_viz")
    cb = GradientCallback(methods=methods, num_probes=2, chunk_size=4, ig_steps=4)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    lines = [m for m in msgs if m.startswith("lightning-viz gradients: ")]
    assert len(lines) >= 2 and all(what in m for m in lines)
    assert {int(m.split("/")[1].split(" ")[0]) for m in lines} == {total}


@pytest.mark.parametrize("method, what", [("scorecam", "masked images"), ("ablationcam", "ablated images")])
def test_forward_cams_show_progress(tmp_path, caplog, monkeypatch, method, what):
    """Score-CAM and Ablation-CAM push one image per channel of the layer (2048 per probe at a ResNet-50's
    layer4, hours on a CPU): progress lines count them."""
    import lightning_viz.progress as progress_module
    from lightning_viz.callbacks.cam import CAMCallback

    monkeypatch.setattr(viz_logger, "propagate", True)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # every chunk: a line
    caplog.set_level(logging.INFO, logger="lightning_viz")
    cb = CAMCallback(methods=[method], layers=["net.conv2"], num_probes=2, chunk_size=4)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    lines = [m for m in msgs if m.startswith("lightning-viz cam: ")]
    assert len(lines) >= 2 and all(what in m for m in lines)
    channels = dict(LitTiny().net.named_modules())["conv2"].out_channels
    assert {int(m.split("/")[1].split(" ")[0]) for m in lines} == {2 * channels}


def test_gradient_receptive_field_shows_progress(tmp_path, caplog, monkeypatch):
    """The gradient receptive field of TopPatchesCallback (a backward per position of the middle row and column and
    per trial; computed once, when the first patches are cropped) logs progress lines."""
    import lightning_viz.progress as progress_module
    from lightning_viz.callbacks.patches import TopPatchesCallback

    monkeypatch.setattr(viz_logger, "propagate", True)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # every chunk: a line
    caplog.set_level(logging.INFO, logger="lightning_viz")
    cb = TopPatchesCallback(layers=["net.conv2"], num_probes=4, receptive_field="gradient")
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    lines = [m for m in msgs if m.startswith("lightning-viz top_patches: ") and "receptive-field positions" in m]
    assert [m.split(" receptive")[0] for m in lines] == [
        "lightning-viz top_patches: 0/62",  # 2 trials x 31 of the 8 x 8 positions of conv2 on 8 px images (the middle
        "lightning-viz top_patches: 31/62",  # row and column, the corner and quarter checks; the others derived)
    ]


def test_panel_says_when_a_map_is_all_zero(tmp_path):
    """An all-zero map (Grad-CAM of a class with no positive evidence: 15 of 16 probes of a barely trained
    1000-class ResNet-50) drew a uniform colormap tile like any other; the panel now writes "map all zero" under
    it. Here the head's weights are zero, so every saliency map is zero; a 12-class head trained as usual is not."""
    heights = {}
    for zero in (False, True):
        net = TinyCNN(width=3)
        if zero:
            with torch.no_grad():
                net.fc.weight.zero_()  # logits independent of the input: every gradient is zero
        cb = GradientCallback(num_probes=2)
        logdir = str(tmp_path / str(zero))
        tiny_trainer(logdir, [cb], max_epochs=1).fit(LitTiny(net, lr=0.0), *tiny_loaders(n=12))
        img = _decode(read_events(logdir).Images("viz-gradients/panel/p000")[-1])
        heights[zero] = img.shape[0]
        if zero:
            note = img[16 + 14 + 2 + 128 + 1 :, 130 + 2 : 130 + 2 + 128]  # under the saliency tile
            assert note.shape[0] == 14 + 2 and (note < 100).any()  # black text on a white strip
            assert (img[16 + 14 + 2 + 128 + 1 :, 2:130] > 250).all()  # nothing under the image tile
    assert heights[True] == 16 + 14 + 2 + 128 + 1 + 14 + 2  # the note (14) instead of the map's colorbar (24)
    assert heights[False] == heights[True] + 10


def test_adversarial_attack_and_min_flip_search_show_progress(tmp_path, caplog, monkeypatch):
    """AdversarialCallback (PGD, then the min-flip search: 5 minutes for 16 probes of a 224 px ResNet-50 on a
    CPU) logs progress lines for both loops."""
    import lightning_viz.progress as progress_module
    from lightning_viz.callbacks.synthesis import AdversarialCallback

    monkeypatch.setattr(viz_logger, "propagate", True)
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # every step: a line
    caplog.set_level(logging.INFO, logger="lightning_viz")
    cb = AdversarialCallback(num_probes=2, steps=3, min_flip_iterations=2)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    lines = [m.split(" (")[0] for m in msgs if m.startswith("lightning-viz adversarial: ")]
    assert lines == [
        "lightning-viz adversarial: 0/3 PGD steps",
        "lightning-viz adversarial: 1/3 PGD steps",
        "lightning-viz adversarial: 2/3 PGD steps",
        "lightning-viz adversarial: 0/4 min-flip search attacks",  # 2 iterations: the scan of 4 budgets
        "lightning-viz adversarial: 1/4 min-flip search attacks",
        "lightning-viz adversarial: 2/4 min-flip search attacks",
        "lightning-viz adversarial: 3/4 min-flip search attacks",
    ]


def test_demo_config_fits_the_card_budget(tmp_path, monkeypatch, caplog):
    """The demo config (every callback, 5 CAM and 5 gradient methods), one short epoch: at most 60 image
    cards in at least 6 TensorBoard groups, median image shorter side >= 128 px, one line at the epoch end."""
    from lightning_viz.cli import cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(viz_logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning_viz")
    logdir = str(tmp_path / "logs")
    cli_main(
        [
            "fit",
            "--config",
            DEMO,
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=1",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.logger.init_args.save_dir={logdir}",
            "--data.init_args.num_train=64",
            "--data.init_args.num_val=256",
        ]
    )
    acc = read_events(logdir)
    images = acc.Tags()["images"]
    groups = {t.split("/")[0] for t in images + acc.Tags()["scalars"] if t.startswith("viz-")}
    assert groups == {
        f"viz-{f}"
        for f in (
            "filters",
            "activations",
            "gradients",
            "cam",
            "occlusion",
            "top_patches",
            "embeddings",
            "class_model",
            "units",
            "inversion",
            "adversarial",
        )
    }
    assert len(images) <= 60
    sides = [min(e.width, e.height) for t in images for e in acc.Images(t)]
    assert statistics.median(sides) >= 128
    # the content is all there: 5 CAM and 5 gradient methods, a panel and a filmstrip per probe
    cam = {t.split("/")[1] for t in acc.Tags()["scalars"] if t.startswith("viz-cam/") and "/stats/" in t}
    grad = {t.split("/")[1] for t in acc.Tags()["scalars"] if t.startswith("viz-gradients/") and "/stats/" in t}
    assert len(cam) >= 5 and len(grad) >= 5
    assert image_steps(acc, "viz-cam/panel/p007") == [0] and image_steps(acc, "viz-cam/filmstrip/p007") == [0]
    assert scalar_steps(acc, "viz-cam/time_s") == [0]
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_viz" and " epoch " in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("lightning-viz epoch 0: ")
    assert len(lines[0].split("(")[1].split(", ")) == 11  # every callback's seconds


def test_a_line_under_a_progress_bar_gets_its_own_line():
    """With tqdm progress bars on screen (Lightning's default progress bar), the lightning_viz stream handler clears
    the bars, writes the line on its own and draws the bars again. Was: the line was glued to the end of the bar
    (``Epoch 0: 100%|...| 2/2 [...]lightning-viz epoch 0: 1.2 s (...)``)."""
    import io

    from tqdm import tqdm

    from lightning_viz.progress import _BarAwareHandler

    stream = io.StringIO()
    handler = _BarAwareHandler(stream)
    line = "lightning-viz epoch 0: 1.2 s (cam 1.2 s)"
    handler.emit(logging.LogRecord("lightning_viz", logging.INFO, __file__, 1, line, None, None))
    assert stream.getvalue() == line + "\n"  # no bar: a plain line
    bar = tqdm(total=2, desc="Epoch 0", file=stream, mininterval=0)
    try:
        bar.update(2)
        handler.emit(logging.LogRecord("lightning_viz", logging.INFO, __file__, 1, line, None, None))
    finally:
        bar.close()
    out = stream.getvalue()
    at = out.rindex(line)
    assert "2/2" in out[:at]  # the bar was drawn before
    assert out[max(out.rfind("\r", 0, at), out.rfind("\n", 0, at)) + 1 : at].strip() == ""  # the line on its own
    assert out[at + len(line)] == "\n" and "Epoch 0" in out[at:]  # then the bar again


def test_caption_strips_kept_for_reuse_stay_bounded_in_bytes_over_a_long_run():
    """Captions carry per-epoch values (probabilities, activations), so every epoch renders new text strips; the
    cache of strips kept for reuse held 4096 of them whatever their size (~200 MB of 1000 px captions after a long
    run: 4096 * 1000 * 16 * 3 bytes). It is bounded in bytes; a strip seen again still comes from the cache."""
    import gc

    width = 1000
    for i in range(600):  # 600 epochs' worth of a caption that changes every epoch, over a 1000 px panel
        compose([[torch.zeros(3, 8, width)]], None, caption=f"p001  true: circle  pred: square (p={i / 600:.4f})")
    gc.collect()
    live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dtype == torch.uint8 and o.ndim == 3]
    held = sum(t.numel() for t in live if t.shape[-1] >= width)  # the wide strips kept (any test's: all bounded)
    assert 0 < held <= STRIP_CACHE_BYTES, held / 2**20
    a = compose([[torch.zeros(3, 8, width)]], None, caption="fixed scale")
    b = compose([[torch.zeros(3, 8, width)]], None, caption="fixed scale")
    assert torch.equal(a, b)


def test_the_baseline_before_training_is_labeled_so_not_epoch_minus_one(tmp_path, monkeypatch):
    """The ``run_at_start`` baseline (step -1) reads "before training" in the embedding scatter's title and "before"
    under its filmstrip frame, as its folder (``before_training/``) and the epoch-end line say. Was: "epoch -1"."""
    from helpers import InputGradMap

    from lightning_viz.callbacks import embeddings as emb_module
    from lightning_viz.render import _shared_strip
    from lightning_viz.tracking import MapTracker

    titles = []
    scatter = emb_module.scatter_image
    monkeypatch.setattr(
        emb_module,
        "scatter_image",
        lambda pts, lab, title, **kw: titles.append(title) or scatter(pts, lab, title, **kw),
    )
    cbs = [
        InputGradMap(num_probes=1, run_at_start=True, tracker=MapTracker(frame_size=8, drift=False)),
        EmbeddingCallback(layers=["net.pool"], num_probes=6, run_at_start=True, projector=False),
    ]
    tiny_trainer(str(tmp_path), cbs, max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    assert [t.split(" (PC1")[0] for t in titles] == ["net.pool PCA, before training", "net.pool PCA, epoch 0"]
    acc = read_events(str(tmp_path))
    (before, epoch0) = acc.Images("viz-inputgrad/filmstrip/p000")
    film = np.asarray(Image.open(io.BytesIO(epoch0.encoded_image_string)))
    y0, x0, frame = 18 + 64 + 1, 100, 64  # the strip under the frames (caption 16 + 2, frames 64 + 1)
    for i, label in enumerate(["before", "epoch 0"]):
        x = x0 + i * (frame + 2)
        expected = _shared_strip(frame, [label], 13).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(film[y0 : y0 + 13, x : x + frame], expected)
    assert before.step == -1


def test_a_caption_wider_than_its_image_wraps_instead_of_being_cut(tmp_path):
    """One probe's grid (a 48 px tile) cut its caption to 'saliency/input: each map on its ...'; it wraps at spaces
    onto up to three lines, and a caption that fits stays one line."""
    from lightning_viz.render import text_px, wrap_caption

    caption = "saliency/input: each map on its own range"
    lines = wrap_caption(caption, 200, 16)
    assert " ".join(lines) == caption and len(lines) == 2 and all(text_px(t, 16) <= 200 for t in lines)
    assert wrap_caption("short", 200, 16) == ["short"] and wrap_caption("", 200, 16) == []
    assert len(wrap_caption(" ".join(["word"] * 40), 60, 16)) == 3
    tile = torch.rand(3, 48, 48)
    one, two = compose([[tile]], caption="p000"), compose([[tile]], caption=caption)
    assert two.shape[-1] == one.shape[-1] and two.shape[-2] > one.shape[-2] + 16  # same width, more lines
