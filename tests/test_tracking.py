"""MapTracker: filmstrips, drift, faithfulness, pointing game on shapes, sanity check, resume."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch
from helpers import (
    InputGradMap,
    LitTiny,
    RecordingWriter,
    TinyCNN,
    check_untouched,
    image_steps,
    read_events,
    scalar_steps,
    tiny_loaders,
    tiny_trainer,
)
from scipy.stats import spearmanr
from torch.utils.data import DataLoader

from lightning_viz.callbacks.maps import MapCallback
from lightning_viz.capture import isolated
from lightning_viz.logging import VizLogger
from lightning_viz.methods.metrics import deletion_auc, energy_in_mask, pointing_game, rank_correlation
from lightning_viz.probe import ProbeSet
from lightning_viz.tracking import TRACKING_LAYOUT, MapTracker, randomized_copy

#: filmstrip geometry: caption strip (16 px) + padding 2 above the frames; padding 2 + a 96 px label column
#: + padding 2 left of them; every frame (64 px at the tracker's default display_px) is followed by 2 px of padding
FILM_Y0, FILM_X0, FRAME = 18, 100, 64


def test_tracking_over_real_training(tmp_path):
    tracker = MapTracker(max_frames=3, frame_size=8, faithfulness=True, deletion_steps=4, sanity_check=True)
    cb = InputGradMap(num_probes=3, tracker=tracker)
    train, _ = tiny_loaders(n=24, batch_size=8)
    module = LitTiny(TinyCNN(width=4))
    tiny_trainer(str(tmp_path), [cb], max_epochs=4).fit(module, train)
    acc = read_events(str(tmp_path))
    key = "viz-inputgrad/inputgrad/input"
    # filmstrip per probe: a label column, then one 8x8 frame per epoch shown at 64 px (padding 2), at most 3
    for pid in ("p000", "p001", "p002"):
        events = acc.Images(f"viz-inputgrad/filmstrip/{pid}")
        assert [e.step for e in events] == [0, 1, 2, 3]
        assert [e.width for e in events] == [FILM_X0 + n * (FRAME + 2) for n in (1, 2, 3, 3)]
        assert {e.height for e in events} == {FILM_Y0 + FRAME + 1 + 13 + 2}  # frames, epoch strip, padding
    for stat in ("drift/rank_corr", "drift/topk_iou"):
        assert scalar_steps(acc, f"{key}/{stat}") == [1, 2, 3]
    assert scalar_steps(acc, "viz-inputgrad/drift/prediction_flips") == [1, 2, 3]
    assert scalar_steps(acc, "viz-inputgrad/probe_accuracy") == [0, 1, 2, 3]
    for stat in ("faithfulness/deletion_auc", "faithfulness/insertion_auc"):
        values = [e.value for e in acc.Scalars(f"{key}/{stat}")]
        assert len(values) == 4 and all(0 <= v <= 1 for v in values)
    sanity = [e.value for e in acc.Scalars(f"{key}/sanity/rank_corr")]
    assert len(sanity) == 4 and all(-1 <= v <= 1 for v in sanity)
    assert not any("localization" in t for t in acc.Tags()["scalars"])  # no masks, no pointing game
    assert "custom_scalars__config__" in acc.Tags()["tensors"]
    # the history stays on the tracker (and goes into checkpoints), frames downsampled
    assert [len(tracker.frames["inputgrad/input"][p]) for p in ("p000", "p001", "p002")] == [4, 4, 4]
    assert tracker.frames["inputgrad/input"]["p000"][0].dtype == torch.uint8


def test_the_custom_scalars_layout_holds_only_charts_with_data_from_every_tracker(tmp_path):
    """TensorBoard's Custom Scalars tab shows the last layout of a run. Its charts are those of the statistics some
    tracker logs, from every tracker of the run (each adds its charts as their first value is logged). Was: every
    tracker wrote the whole layout: with the default tracker (filmstrip and drift), 6 of the 10 charts (faithfulness,
    pointing game, energy in mask, sanity check) stayed empty for good, and no masks meant 2 empty charts always."""
    drift = InputGradMap(num_probes=3, name="a", tracker=MapTracker(filmstrip=False))
    faithful = InputGradMap(
        num_probes=3,
        name="b",
        tracker=MapTracker(filmstrip=False, drift=False, faithfulness=True, deletion_steps=4),
    )
    train, _ = tiny_loaders(n=24, batch_size=8)
    tiny_trainer(str(tmp_path), [drift, faithful], max_epochs=2).fit(LitTiny(TinyCNN(width=4)), train)
    # the layout as TensorBoard's Custom Scalars tab gets it (its plugin over the run's event files)
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins.base_plugin import TBContext
    from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(tmp_path))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(tmp_path))
    plugin = CustomScalarsPlugin(TBContext(logdir=str(tmp_path), multiplexer=multiplexer, data_provider=provider))
    layout = json.loads(plugin.layout_impl(context.RequestContext(), ""))
    charts = {
        (c["title"], chart["title"]): chart["multiline"]["tag"] for c in layout["category"] for chart in c["chart"]
    }
    tags = read_events(str(tmp_path)).Tags()["scalars"]
    assert {k: [t for t in tags if any(re.match(r, t) for r in regs)] for k, regs in charts.items()} == {
        ("lightning-viz drift", "map rank correlation with the previous run"): [
            "viz-inputgrad/a/inputgrad/input/drift/rank_corr"
        ],
        ("lightning-viz drift", "map top-k IoU with the previous run"): [
            "viz-inputgrad/a/inputgrad/input/drift/topk_iou"
        ],
        ("lightning-viz drift", "prediction flips on probes"): ["viz-inputgrad/a/drift/prediction_flips"],
        ("lightning-viz drift", "probe accuracy"): ["viz-inputgrad/a/probe_accuracy"],
        ("lightning-viz faithfulness", "deletion AUC (lower is better)"): [
            "viz-inputgrad/b/inputgrad/input/faithfulness/deletion_auc"
        ],
        ("lightning-viz faithfulness", "insertion AUC (higher is better)"): [
            "viz-inputgrad/b/inputgrad/input/faithfulness/insertion_auc"
        ],
    }


def _probe(n=4, size=8):
    g = torch.Generator().manual_seed(0)
    return ProbeSet(images=torch.rand(n, 3, size, size, generator=g), labels=torch.tensor([0, 1, 2, 0][:n]))


def test_drift_skips_a_diverged_probe_map():
    """One probe's map turning NaN (a diverged image) leaves the drift scalars as the mean over the other probes,
    not NaN for the whole epoch."""
    probe = _probe()
    a = torch.arange(64.0).view(1, 8, 8).repeat(4, 1, 1)
    b = a.clone()
    b[0] = float("nan")
    w = RecordingWriter()
    tr = MapTracker(max_frames=3, frame_size=8, topk=0.25, filmstrip=False)
    tr.log(VizLogger(w, 0), {"m/l": a}, {}, probe)
    tr.log(VizLogger(w, 1), {"m/l": b}, {}, probe)
    assert w.scalars["viz-m/m/l/drift/topk_iou"] == [(1, pytest.approx(1.0))]
    assert w.scalars["viz-m/m/l/drift/rank_corr"] == [(1, pytest.approx(1.0))]
    tr.log(VizLogger(w, 2), {"m/l": torch.full_like(a, float("nan"))}, {}, probe)
    assert [s for s, _ in w.scalars["viz-m/m/l/drift/topk_iou"]] == [1]  # no map to compare: no scalar, not NaN


def test_drift_ranks_each_runs_maps_once(monkeypatch):
    """Spearman drift compares this run's maps with the last run's: the last run's ranks are kept with its maps, so each
    run sorts only its own (the same scalars as ranking both again); after a resume they are ranked once more."""
    from lightning_viz.methods import metrics

    calls = []
    ranks = metrics._average_ranks
    monkeypatch.setattr(metrics, "_average_ranks", lambda v: calls.append(v.shape) or ranks(v))
    probe = _probe()
    g = torch.Generator().manual_seed(0)
    runs = [torch.rand(4, 8, 8, generator=g) for _ in range(4)]
    w = RecordingWriter()
    tr = MapTracker(frame_size=8, filmstrip=False)
    for step, m in enumerate(runs[:3]):
        tr.log(VizLogger(w, step), {"m/l": m}, {}, probe)
    assert len(calls) == 2 + 1  # run 0: nothing to compare; run 1: both ranked; run 2: its own maps only
    want = [float(metrics.rank_correlation(b, a).mean()) for a, b in itertools.pairwise(runs[:3])]
    assert [v for _, v in w.scalars["viz-m/m/l/drift/rank_corr"]] == want  # the same bits
    resumed = MapTracker(frame_size=8, filmstrip=False)
    resumed.load_state_dict(tr.state_dict())
    calls.clear()
    resumed.log(VizLogger(w, 3), {"m/l": runs[3]}, {}, probe)
    assert len(calls) == 2
    assert w.scalars["viz-m/m/l/drift/rank_corr"][-1][1] == pytest.approx(
        float(metrics.rank_correlation(runs[3], runs[2]).mean())
    )


def test_drift_flips_filmstrip_bound_and_resume_by_hand():
    probe = _probe()
    a = torch.arange(64.0).view(1, 8, 8).repeat(4, 1, 1)
    w = RecordingWriter()
    tr = MapTracker(max_frames=3, frame_size=8, topk=0.25)
    tr.log(VizLogger(w, 0), {"m/l": a}, {"track:pred": torch.tensor([0, 1, 2, 0])}, probe)
    tr.log(VizLogger(w, 1), {"m/l": -a}, {"track:pred": torch.tensor([0, 2, 2, 1])}, probe)
    # without a callback the family is the first part of the map key
    assert w.scalars["viz-m/m/l/drift/rank_corr"] == [(1, pytest.approx(-1.0))]
    assert w.scalars["viz-m/m/l/drift/topk_iou"] == [(1, pytest.approx(0.0))]
    assert w.scalars["viz-m/drift/prediction_flips"] == [(1, pytest.approx(0.5))]
    assert w.scalars["viz-m/probe_accuracy"] == [(0, pytest.approx(1.0)), (1, pytest.approx(0.5))]
    # the Custom Scalars charts of what was logged: probe accuracy, then the drift charts from the second run on
    drift = TRACKING_LAYOUT["lightning-viz drift"]
    assert w.layouts == [
        {"lightning-viz drift": {"probe accuracy": drift["probe accuracy"]}},
        {"lightning-viz drift": drift},
    ]
    first = w.images["viz-m/filmstrip/p001"][0][1]  # frame 0 alone, 8 px shown at 64 px
    second = w.images["viz-m/filmstrip/p001"][1][1]
    height = FILM_Y0 + FRAME + 16
    assert first.shape == (height, FILM_X0 + FRAME + 2, 3) and second.shape == (height, FILM_X0 + 2 * FRAME + 4, 3)
    frame0 = (slice(FILM_Y0, FILM_Y0 + FRAME), slice(FILM_X0, FILM_X0 + FRAME))
    frame1 = (slice(FILM_Y0, FILM_Y0 + FRAME), slice(FILM_X0 + FRAME + 2, FILM_X0 + 2 * FRAME + 2))
    assert (second[frame0] == first[frame0]).all()  # epoch 0's frame stays in place
    assert not (second[frame1] == first[frame0]).all()  # the reversed map looks different
    under = second[FILM_Y0 + FRAME + 1 : FILM_Y0 + FRAME + 14, FILM_X0 + FRAME + 2 : FILM_X0 + 2 * FRAME + 2]
    assert (under < 128).any() and (under > 250).mean() > 0.5  # "epoch 1" written in black on white
    assert tr.epochs == {"m/l": [0, 1]}

    # resume: a fresh tracker continues the history from the state dict
    state = tr.state_dict()
    tr2 = MapTracker(max_frames=3, frame_size=8, topk=0.25)
    tr2.load_state_dict(state)
    w2 = RecordingWriter()
    for step in (2, 3):
        tr2.log(VizLogger(w2, step), {"m/l": -a}, {"track:pred": torch.tensor([0, 2, 2, 1])}, probe)
    assert w2.scalars["viz-m/m/l/drift/rank_corr"] == [(2, pytest.approx(1.0)), (3, pytest.approx(1.0))]
    assert w2.scalars["viz-m/drift/prediction_flips"] == [(2, 0.0), (3, 0.0)]
    strips = w2.images["viz-m/filmstrip/p001"]
    assert [img.shape[1] for _, img in strips] == [FILM_X0 + 3 * (FRAME + 2)] * 2  # 3 then 4 frames: bounded at 3
    last = strips[-1][1]
    assert (last[frame0] == first[frame0]).all()  # the first epoch is always shown
    assert tr2.epochs == {"m/l": [0, 1, 2, 3]}
    assert len(tr2.frames["m/l"]["p001"]) == 4

    # display_px=None shows the frames at the callback's display_px (128 without a callback); 0 as stored (8 px)
    for display_px, frame in ((None, 128), (0, 8)):
        w3 = RecordingWriter()
        MapTracker(frame_size=8, display_px=display_px).log(VizLogger(w3, 0), {"m/l": a}, {}, probe)
        img = w3.images["viz-m/filmstrip/p001"][0][1]
        label_column, row = max(frame, 96), max(frame, 14)  # the row is as high as its 14 px label at least
        assert img.shape == (FILM_Y0 + row + 16, 2 + label_column + 2 + frame + 2, 3), display_px


class CenterBlobCallback(MapCallback):
    """A fixed map per probe, independent of the model: a Gaussian blob peaking at pixel (4, 4)."""

    method = "blob"

    def compute_maps(self, pl_module, probe):
        h, w = probe.images.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h) - 4.0, torch.arange(w) - 4.0, indexing="ij")
        blob = torch.exp(-(xx**2 + yy**2) / (2 * 3.0**2))
        return {"blob/center": blob.expand(len(probe), h, w).clone()}


def test_pointing_game_on_shapes_uses_the_true_masks(tmp_path):
    from lightning_viz.data.shapes import ShapesDataset

    ds = ShapesDataset(num=24, image_size=16, seed=3)
    cb = CenterBlobCallback(num_probes=12, tracker=MapTracker(filmstrip=False, drift=False))
    module = LitTiny(TinyCNN(num_classes=4, width=4))
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(module, DataLoader(ds, batch_size=8))
    idx = cb.probes.indices.tolist()
    masks = torch.stack([ds[i][2] for i in idx])  # straight from the dataset
    maps = CenterBlobCallback().compute_maps(None, cb.probes)["blob/center"]
    hits = pointing_game(maps, masks)
    torch.testing.assert_close(hits, masks[:, 4, 4])
    assert 0 < hits.mean() < 1  # some shapes cover pixel (4, 4), some do not
    energy = (maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1)
    torch.testing.assert_close(energy_in_mask(maps, masks), energy)
    acc = read_events(str(tmp_path))
    [pg] = acc.Scalars("viz-blob/blob/center/localization/pointing_game")
    [em] = acc.Scalars("viz-blob/blob/center/localization/energy_in_mask")
    assert pg.step == 0 and pg.value == pytest.approx(float(hits.mean()))
    assert em.value == pytest.approx(float(energy.mean()), rel=1e-5)


def test_pointing_game_requested_without_masks_is_a_clear_error():
    tr = MapTracker(pointing_game=True, drift=False)
    with pytest.raises(ValueError, match="needs ground-truth masks"):
        tr.compute(TinyCNN(), _probe(), {"m/l": torch.rand(4, 8, 8)})
    with pytest.raises(ValueError, match="max_frames"):
        MapTracker(max_frames=1)
    with pytest.raises(ValueError, match="unknown target"):
        MapTracker(target="biggest")


def test_tracker_compute_keys_and_sanity_copy_leave_the_model_untouched():
    module = LitTiny(TinyCNN(width=4))
    module.train()
    module.net.fc.weight.grad = torch.ones_like(module.net.fc.weight)
    probe = _probe()
    cb = InputGradMap(tracker=MapTracker(faithfulness=True, deletion_steps=3, sanity_check=True, seed=5))

    def run():
        with isolated(module):
            return cb.compute(module, probe)

    out = check_untouched(module, run)
    assert sorted(out) == sorted(
        [
            "map:inputgrad/input",
            "track:pred",
            "track:deletion/inputgrad/input",
            "track:insertion/inputgrad/input",
            "track:sanity/inputgrad/input",
            "pred:class",
            "pred:prob",
        ]
    )  # prediction and probability for the panel caption
    logits = module.eval()(probe.images)
    module.train()
    assert torch.equal(out["pred:class"], logits.argmax(1))
    torch.testing.assert_close(out["pred:prob"], logits.softmax(1).amax(1))
    assert all(v.shape == (4,) for k, v in out.items() if k.startswith("track:"))
    # the randomized copy: seeded (same on every rank), different weights, global RNG and original untouched
    c1 = check_untouched(module, lambda: randomized_copy(module, seed=5))
    c2 = randomized_copy(module, seed=5)
    assert c1._trainer is None  # the trainer is not deep-copied
    for (n, p), p1, p2 in zip(module.named_parameters(), c1.parameters(), c2.parameters()):
        assert torch.equal(p1, p2), n
        if p.numel() > 1 and "bn" not in n:
            assert not torch.equal(p1, p), n
    with isolated(c1):  # eval mode, as inside the callback's run
        rand_maps = cb.compute_maps(c1, probe)["inputgrad/input"]
    trained = out["map:inputgrad/input"]
    expected = torch.tensor(
        [spearmanr(trained[i].flatten().numpy(), rand_maps[i].flatten().numpy())[0] for i in range(4)]
    )
    torch.testing.assert_close(out["track:sanity/inputgrad/input"], expected.float(), atol=1e-5, rtol=1e-5)


class CountsCopies(InputGradMap):
    """Counts the maps it computes of models other than ``trained`` (the sanity check's randomized copies)."""

    def __init__(self, trained, **kw):
        super().__init__(**kw)
        self.trained, self.copies = trained, 0

    def compute_maps(self, pl_module, probe):
        self.copies += next(pl_module.parameters()) is not next(self.trained.parameters())
        return super().compute_maps(pl_module, probe)


def test_sanity_check_computes_the_randomized_models_maps_again_only_when_that_model_changed():
    """Every layer of TinyCNN has reset_parameters: its randomized copy is the same whatever training did, so later runs
    take the maps of the last one (the same bits) instead of computing them again; a parameter no reset writes (noise
    with the trained parameter's std), other probes or another seed compute them again."""

    module = LitTiny(TinyCNN(width=4))
    probe = _probe()
    cb = CountsCopies(module, tracker=MapTracker(filmstrip=False, drift=False, sanity_check=True, seed=5))

    def sanity(p=probe):
        with isolated(module):
            return cb.compute(module, p)["track:sanity/inputgrad/input"]

    def fresh(p=probe):
        with isolated(module):
            trained = InputGradMap().compute_maps(module, p)["inputgrad/input"]
        copy = randomized_copy(module, seed=5)
        with isolated(copy):
            return rank_correlation(trained, InputGradMap().compute_maps(copy, p)["inputgrad/input"])

    first = sanity()
    assert cb.copies == 1 and torch.equal(first, fresh())
    with torch.no_grad():  # a training step's worth of change: the randomized copy stays the same
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    second = sanity()
    assert cb.copies == 1 and torch.equal(second, fresh()) and not torch.equal(second, first)
    other = ProbeSet(images=torch.rand(4, 3, 8, 8), labels=torch.tensor([2, 1, 0, 0]))
    assert torch.equal(sanity(other), fresh(other)) and cb.copies == 2
    cb.tracker.seed = 6
    sanity()
    assert cb.copies == 3
    module.net.scale = torch.nn.Parameter(torch.ones(1, 4))  # no reset_parameters: noise with its own std (1.0)
    cb.tracker.seed = 5
    sanity()
    assert cb.copies == 4
    with torch.no_grad():
        module.net.scale.mul_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))  # another std: another randomized copy
    sanity()
    sanity()
    assert cb.copies == 5


def test_sanity_check_with_a_predicted_target_explains_the_trained_models_class():
    """Model randomization compares maps of one class (Adebayo et al. 2018; Quantus' MPRT keeps ``y``): with
    ``target="predicted"`` the randomized copy's maps explain the class the trained model predicts, not the copy's."""
    from lightning_viz.callbacks.gradients import GradientCallback
    from lightning_viz.methods.gradients import gradient
    from lightning_viz.methods.metrics import rank_correlation

    module = LitTiny(TinyCNN(width=4))
    probe = ProbeSet(images=torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    tracker = MapTracker(filmstrip=False, drift=False, sanity_check=True, seed=5)
    cb = GradientCallback(methods=["gradient"], reduce="sum", target="predicted", tracker=tracker)
    with isolated(module):  # eval mode, as inside the callback's run
        out = cb.compute(module, probe)
        trained = module(probe.images).argmax(1)
        maps = gradient(module, probe.images, "label", trained).sum(1)
    copy = randomized_copy(module, seed=5)
    with isolated(copy):
        assert (copy(probe.images).argmax(1) != trained).any()  # the copy predicts other classes: the test can fail
        want = rank_correlation(maps, gradient(copy, probe.images, "label", trained).sum(1))
    torch.testing.assert_close(out["track:sanity/gradient/input"], want, atol=1e-5, rtol=1e-5)
    assert cb.target.name == "predicted"  # the callback's own target is left as it was


def test_sanity_check_of_signed_maps_also_correlates_their_absolute_values():
    """Adebayo et al. 2018 report the rank correlation with and without absolute values: a signed map (input x
    gradient summed over channels) keeps |x| in its magnitude on a randomized model while its sign turns random, so the
    raw correlation looks like a pass and only the absolute one shows what is shared. Unsigned maps log one value."""
    from lightning_viz.callbacks.gradients import GradientCallback
    from lightning_viz.methods.gradients import input_x_gradient
    from lightning_viz.methods.metrics import rank_correlation

    module = LitTiny(TinyCNN(width=4))
    probe = _probe()
    cb = GradientCallback(
        methods=["input_x_gradient"],
        reduce="sum",
        target="label",
        tracker=MapTracker(filmstrip=False, drift=False, sanity_check=True, seed=5),
    )
    with isolated(module):
        out = cb.compute(module, probe)
        maps = input_x_gradient(module, probe.images, "label", probe.labels).sum(1)
    copy = randomized_copy(module, seed=5)
    with isolated(copy):
        rand = input_x_gradient(copy, probe.images, "label", probe.labels).sum(1)
    raw, absolute = out["track:sanity/input_x_gradient/input"], out["track:sanity_abs/input_x_gradient/input"]
    torch.testing.assert_close(raw, rank_correlation(maps, rand), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(absolute, rank_correlation(maps.abs(), rand.abs()), atol=1e-5, rtol=1e-5)
    assert absolute.mean() > raw.mean() + 0.1  # |x| shared by both maps (0.23 vs 0.05)
    w = RecordingWriter()
    cb.tracker.log(VizLogger(w, 0), {"input_x_gradient/input": maps}, out, probe, callback=cb)
    tag = "viz-gradients/input_x_gradient/input/sanity/rank_corr"
    assert w.scalars[tag + "_abs"] == [(0, pytest.approx(float(absolute.mean())))]
    charts = [regs for section in TRACKING_LAYOUT.values() for _, (_, regs) in section.items()]
    assert [c for c in charts if any(re.search(r, tag) for r in c)] != [
        c for c in charts if any(re.search(r, tag + "_abs") for r in c)
    ]
    unsigned = GradientCallback(
        methods=["saliency"], tracker=MapTracker(filmstrip=False, drift=False, sanity_check=True)
    )
    with isolated(module):
        assert not [k for k in unsigned.compute(module, probe) if "sanity_abs" in k]


def test_history_survives_resume_from_a_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, _ = tiny_loaders(n=16, batch_size=8)

    def trainer(epochs, tracker):
        cb = InputGradMap(num_probes=2, tracker=tracker)
        ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
        return tiny_trainer(str(tmp_path / f"logs{epochs}"), [cb, ckpt], max_epochs=epochs, enable_checkpointing=True)

    trainer(2, MapTracker(frame_size=8)).fit(LitTiny(TinyCNN(width=4)), train)
    resumed = MapTracker(frame_size=8)
    trainer(3, resumed).fit(LitTiny(TinyCNN(width=4)), train, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    acc = read_events(str(tmp_path / "logs3"))
    [strip] = acc.Images("viz-inputgrad/filmstrip/p001")
    assert strip.step == 2 and strip.width == FILM_X0 + 3 * (FRAME + 2)  # epochs 0 and 1 came from the checkpoint
    assert resumed.epochs == {"inputgrad/input": [0, 1, 2]}
    assert scalar_steps(acc, "viz-inputgrad/inputgrad/input/drift/rank_corr") == [2]  # compared with epoch 1's maps
    assert scalar_steps(acc, "viz-inputgrad/drift/prediction_flips") == [2]


def test_tracker_under_trainer_validate(tmp_path):
    """run_on='validation_epoch_end' under trainer.validate (inference mode): faithfulness and sanity still work."""
    _, val = tiny_loaders(n=16, batch_size=8)
    tracker = MapTracker(frame_size=8, faithfulness=True, deletion_steps=3, sanity_check=True)
    cb = InputGradMap(num_probes=2, run_on="validation_epoch_end", tracker=tracker)
    tiny_trainer(str(tmp_path), [cb]).validate(LitTiny(TinyCNN(width=4)), val)
    acc = read_events(str(tmp_path))
    for tag in ("faithfulness/deletion_auc", "faithfulness/insertion_auc", "sanity/rank_corr"):
        assert scalar_steps(acc, f"viz-inputgrad/inputgrad/input/{tag}") == [0], tag
    assert image_steps(acc, "viz-inputgrad/filmstrip/p000") == [0]


def test_tracker_compute_on_a_float64_model():
    """Predictions and deletion/insertion run the probes (float32) in the model's dtype."""
    module = LitTiny(TinyCNN(width=4)).double()
    probe = _probe()
    maps = torch.rand(4, 8, 8, generator=torch.Generator().manual_seed(1))
    tr = MapTracker(faithfulness=True, deletion_steps=2)
    with isolated(module):
        out = tr.compute(module, probe, {"m/l": maps})
        logits = module(probe.images.double())
        deletion = deletion_auc(module, probe.images.double(), maps, probe.labels, steps=2, baseline="zero")
    assert torch.equal(out["track:pred"], logits.argmax(1))
    torch.testing.assert_close(out["track:deletion/m/l"], deletion)  # the probes' labels, at the model's precision
    assert out["track:insertion/m/l"].shape == (4,)


def test_sanity_check_under_a_lightning_compiled_module(tmp_path):
    """trainer.fit(torch.compile(module)): Lightning sets ``module.forward`` to a dynamo wrapper of the original's
    forward; the randomized copy must run its own (sanity scores as uncompiled, not 1.0; CAM hooks on the copy fire)."""
    from lightning_viz.callbacks import CAMCallback, GradientCallback

    train, val = tiny_loaders(n=16, batch_size=8)

    def scores(compiled):
        torch._dynamo.reset()
        torch.manual_seed(0)
        module = LitTiny(TinyCNN(width=4))
        callbacks = [
            GradientCallback(num_probes=4, tracker=MapTracker(filmstrip=False, sanity_check=True)),
            CAMCallback(num_probes=4, tracker=MapTracker(filmstrip=False, sanity_check=True)),
        ]
        logdir = str(tmp_path / f"compiled{compiled}")
        tiny_trainer(logdir, callbacks).fit(
            torch.compile(module, backend="aot_eager") if compiled else module, train, val
        )
        acc = read_events(logdir)
        tags = [t for t in acc.Tags()["scalars"] if t.startswith("viz-") and not t.endswith("time_s")]
        return {t: torch.tensor([e.value for e in acc.Scalars(t)]) for t in tags}

    plain, compiled = scores(False), scores(True)
    sanity = [t for t in plain if t.endswith("sanity/rank_corr")]
    assert sanity == [t for t in compiled if t.endswith("sanity/rank_corr")] and len(sanity) == 2
    assert sorted(plain) == sorted(compiled)
    for tag in plain:  # sanity scores, and the maps' own drift and probe accuracy (hooks on the compiled module)
        assert len(compiled[tag]) == len(plain[tag]) == (1 if "drift" in tag else 2), tag
        torch.testing.assert_close(compiled[tag], plain[tag], atol=1e-4, rtol=1e-4, msg=tag)
        assert "sanity" not in tag or (compiled[tag].abs() < 0.9).all(), (tag, compiled[tag])


def test_randomized_copy_runs_its_own_instance_level_forward():
    """An instance-level forward (a bound method, or a wrapper of one) is the copy's, not the original's."""
    import functools

    from lightning.pytorch.utilities.compile import from_compiled

    x = _probe().images
    torch.manual_seed(0)
    base = LitTiny(TinyCNN(width=4))
    ref = randomized_copy(base, seed=3)
    overrides = {
        "bound method": lambda m: m.forward,
        "functools.wraps wrapper": lambda m: functools.wraps(m.forward)(lambda *a, _f=m.forward: _f(*a)),
    }
    for name, override in overrides.items():
        torch.manual_seed(0)
        module = LitTiny(TinyCNN(width=4))
        module.forward = override(module)
        clone = randomized_copy(module, seed=3)
        torch.testing.assert_close(clone(x), ref(x), msg=name)
        assert not torch.allclose(clone(x), module(x)), name
    torch.manual_seed(0)
    lightning_compiled = from_compiled(torch.compile(LitTiny(TinyCNN(width=4)), backend="eager"))
    clone = randomized_copy(lightning_compiled, seed=3)
    assert clone._compiler_ctx is None and lightning_compiled._compiler_ctx is not None
    torch.testing.assert_close(clone(x), ref(x))


def test_randomized_copy_reinitializes_pruned_and_weight_normed_layers():
    """Pruning and legacy weight norm keep the learned weight in ``weight_orig`` / ``weight_g``/``weight_v``;
    ``reset_parameters()`` writes only the derived ``weight`` (a non-leaf tensor that defeats ``deepcopy``):
    those parameters get noise, other resets stay as they are."""
    from torch import nn
    from torch.nn.utils import prune

    torch.manual_seed(0)
    pruned, normed, bn = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)
    prune.l1_unstructured(pruned, "weight", amount=0.5)
    with pytest.warns(FutureWarning):
        nn.utils.weight_norm(normed)
    model = nn.Sequential(pruned, normed, bn)
    with torch.no_grad():
        bn.weight.fill_(3.0), bn.bias.fill_(2.0)
    clone = randomized_copy(model, seed=1)
    orig = dict(model.named_parameters())
    for name, p in clone.named_parameters():
        assert not torch.equal(p, orig[name]), f"{name} not randomized"
    assert torch.equal(clone[0].weight_mask, pruned.weight_mask)  # the mask is a buffer: kept
    assert torch.equal(clone[2].weight, torch.ones(4)) and torch.equal(clone[2].bias, torch.zeros(4))  # no noise
    model(torch.randn(2, 3, 6, 6)).sum().backward()  # pre-hooks derive both weights with autograd: copyable still
    assert not torch.equal(randomized_copy(model, seed=1)[0].weight_orig, pruned.weight_orig)


def test_a_checkpoint_of_more_than_1000_probes_resumes_under_their_padded_ids():
    """Probe ids are padded to the digits of the largest (``p0999``, ``p1000`` for 1001 probes); an earlier
    checkpoint stored them as ``p999``, ``p1000``: its filmstrip frames come back under today's ids."""
    frame = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    old = {"frames": {"m/l": {f"p{i:03d}": frame + i % 200 for i in (0, 999, 1000)}}, "epochs": {"m/l": [0, 1]}}
    tr = MapTracker()
    tr.load_state_dict(old)
    ids = ProbeSet(torch.zeros(1001, 1, 2, 2)).ids
    assert list(tr.frames["m/l"]) == ["p0000", "p0999", "p1000"] == [ids[0], ids[999], ids[1000]]
    assert int(tr.frames["m/l"]["p0999"][1].max()) == 999 % 200
    small = {"frames": {"m/l": {"p000": frame, "p015": frame}}}  # up to 1000 probes: the ids as they were
    tr.load_state_dict(small)
    assert list(tr.frames["m/l"]) == ["p000", "p015"]


def test_filmstrip_storage_stays_bounded_over_long_runs_and_spans_the_whole_run():
    """Past 8 * max_frames runs every other stored frame is dropped (first and latest kept): memory and checkpoints
    stay bounded, and the frames shown still run from the first epoch to the latest, evenly."""
    from lightning_viz.tracking import STORED_PER_SHOWN

    probe = _probe()
    a = torch.arange(64.0).view(1, 8, 8).repeat(4, 1, 1)
    tr = MapTracker(max_frames=3, frame_size=8, drift=False)
    limit = STORED_PER_SHOWN * 3
    for step in range(100):
        tr.log(VizLogger(RecordingWriter(), step), {"m/l": a.roll(step, -1)}, {}, probe)
        stored = tr.epochs["m/l"]
        assert len(stored) <= limit and stored[0] == 0 and stored[-1] == step
        assert all(len(seq) == len(stored) for seq in tr.frames["m/l"].values())
    assert stored == sorted(stored) and len(stored) > limit // 2
    gaps = {b - a for a, b in itertools.pairwise(stored[:-1])}
    assert len(gaps) == 1, stored  # evenly thinned (the latest run may sit closer to the one before it)
    # a resumed tracker continues the same thinning
    tr2 = MapTracker(max_frames=3, frame_size=8, drift=False)
    tr2.load_state_dict(tr.state_dict())
    for step in range(100, 130):
        tr.log(VizLogger(RecordingWriter(), step), {"m/l": a}, {}, probe)
        tr2.log(VizLogger(RecordingWriter(), step), {"m/l": a}, {}, probe)
    assert tr2.epochs == tr.epochs and len(tr.epochs["m/l"]) <= limit and tr.epochs["m/l"][-1] == 129
    assert sum(t.numel() for t in tr.state_dict()["frames"]["m/l"].values()) <= 4 * limit * 3 * 8 * 8


def test_resume_after_the_filmstrip_cap_continues_as_an_uninterrupted_run(tmp_path):
    """A long run resumed after its filmstrips were thinned (past 8 * max_frames runs) goes on exactly as the
    uninterrupted run: same stored runs and stride, same frames, same filmstrip images and drift values."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    train, _ = tiny_loaders(n=16, batch_size=8)

    def run(epochs, logs, ckpt_dir=None, ckpt_path=None):
        L.seed_everything(0, verbose=False)
        tr = MapTracker(max_frames=2, frame_size=8)
        cbs = [InputGradMap(num_probes=2, tracker=tr)]
        if ckpt_dir:
            cbs.append(ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True, save_top_k=0))
        t = tiny_trainer(str(tmp_path / logs), cbs, max_epochs=epochs, enable_checkpointing=bool(ckpt_dir))
        t.fit(LitTiny(TinyCNN(width=4)), train, ckpt_path=ckpt_path)
        return tr

    full = run(22, "full")
    run(18, "first", ckpt_dir=tmp_path / "ck")
    resumed = run(22, "second", ckpt_path=str(tmp_path / "ck" / "last.ckpt"))
    assert full.strides == {"inputgrad/input": 2} and len(full.epochs["inputgrad/input"]) < 18  # the cap was hit
    assert resumed.epochs == full.epochs and resumed.strides == full.strides and resumed.run_ids == full.run_ids
    for k in full.frames:
        for pid in full.frames[k]:
            assert all(torch.equal(a, b) for a, b in zip(full.frames[k][pid], resumed.frames[k][pid]))
    a, b = read_events(str(tmp_path / "full")), read_events(str(tmp_path / "second"))
    for tag in [t for t in a.Tags()["images"] if "filmstrip" in t]:
        ia = next(e for e in a.Images(tag) if e.step == 21)
        ib = next(e for e in b.Images(tag) if e.step == 21)
        assert ia.encoded_image_string == ib.encoded_image_string, tag
    for tag in [t for t in a.Tags()["scalars"] if "drift" in t]:
        va = {e.step: e.value for e in a.Scalars(tag) if e.step >= 18}
        vb = {e.step: e.value for e in b.Scalars(tag)}
        assert va == vb, (tag, va, vb)


def test_filmstrip_label_column_fits_a_long_method_name():
    """``guided_gradcam`` needs 100 px at the 14 px strip: the label column widens for it (was cut at 96 px)."""
    from lightning_viz.render import text_px

    probe = _probe()
    w = RecordingWriter()
    maps = {"guided_gradcam/l": torch.rand(4, 8, 8), "cam/l": torch.rand(4, 8, 8)}
    MapTracker(frame_size=8).log(VizLogger(w, 0), maps, {}, probe)
    img = w.images["viz-guided_gradcam/filmstrip/p000"][0][1]
    need = text_px("guided_gradcam", 14)
    assert need > 96 and img.shape[1] == 2 + need + 2 + FRAME + 2
    from lightning_viz.render import _shared_strip, text_strip

    label = img[FILM_Y0 : FILM_Y0 + 14, 2 : 2 + need]
    assert (label == _shared_strip(need, ["guided_gradcam"], 14).permute(1, 2, 0).numpy()).all()
    cut = (text_strip(96, ["guided_gradcam"], 14) * 255).round().byte().permute(1, 2, 0).numpy()
    assert not (label[:, :96] == cut).all()  # at 96 px the name was cut (an ellipsis)


def test_probes_missing_some_masks_score_the_others(tmp_path):
    """Probes of which only some items carry a mask: the others get an empty mask (NaN, left out of the mean), and
    the pointing game is the mean over the probes with masks. Before, every mask was dropped: no localization scalars
    at all, and pointing_game=True failed saying the probes had none."""
    from lightning_viz.data.shapes import ShapesDataset

    shapes = ShapesDataset(num=6, image_size=16, seed=3)

    class SomeMasks(torch.utils.data.Dataset):
        def __len__(self):
            return 6

        def __getitem__(self, i):
            x, y, mask = shapes[i]
            return (x, y, mask) if i % 2 == 0 else (x, y, i)  # odd items: no mask (an index in its place)

    probe = ProbeSet.from_indices(SomeMasks(), range(6))
    assert probe.masks is not None and probe.masks.shape == (6, 16, 16)
    assert probe.masks[1::2].sum() == 0 and torch.equal(
        probe.masks[0::2], torch.stack([shapes[i][2] for i in (0, 2, 4)])
    )
    maps = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(0))
    out = MapTracker(drift=False, pointing_game=True).compute(TinyCNN(), probe, {"m/l": maps})
    pg = out["track:pointing/m/l"]
    assert torch.isnan(pg[1::2]).all()
    torch.testing.assert_close(pg[0::2], pointing_game(maps[0::2], probe.masks[0::2]))
    w = RecordingWriter()
    MapTracker(drift=False, filmstrip=False).log(VizLogger(w, 0), {"m/l": maps}, out, probe)
    assert w.scalars["viz-m/m/l/localization/pointing_game"] == [(0, pytest.approx(float(pg[0::2].mean())))]


def test_drift_off_logs_no_prediction_flips_nor_probe_accuracy():
    """drift=False turns off every drift scalar, prediction flips and probe accuracy included, also with faithfulness
    on (which computes the predictions too). Before, those two were logged anyway."""
    probe = _probe(n=2)
    tr = MapTracker(filmstrip=False, drift=False, faithfulness=True, deletion_steps=2)
    model = TinyCNN().eval()
    w = RecordingWriter()
    for epoch in range(2):
        maps = {"g/l": torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(epoch))}
        tr.log(VizLogger(w, epoch), maps, tr.compute(model, probe, maps), probe)
    assert sorted(w.scalars) == ["viz-g/g/l/faithfulness/deletion_auc", "viz-g/g/l/faithfulness/insertion_auc"]


def test_filmstrip_labels_the_run_at_start_baseline_start():
    """run_at_start logs the untrained model at step -1: its filmstrip frame is labeled "before", not "epoch -1"."""
    from lightning_viz.render import _shared_strip

    probe = _probe(n=1)
    tr = MapTracker(frame_size=8, display_px=64)
    w = RecordingWriter()
    for step in (-1, 0):
        tr.log(VizLogger(w, step), {"m/l": torch.rand(1, 8, 8)}, {}, probe)
    seq = tr.frames["m/l"]["p000"]
    _, under, width = tr._film_row("m/l", "p000", seq, [0, 1], tr.epochs["m/l"], 64)
    assert width == 64
    for i, text in enumerate(("before", "epoch 0")):
        torch.testing.assert_close(
            under[:, :, i * (width + 2) : i * (width + 2) + width], _shared_strip(width, [text], 13)
        )


def test_filmstrip_epoch_labels_stay_readable_under_small_frames():
    """Frames shown at 32 px (display_px=0) are too narrow for "epoch 12": the label is the number alone, not a cut
    "epoc..." that hid which epoch each frame is."""
    from lightning_viz.render import _shared_strip

    w = RecordingWriter()
    tr = MapTracker(frame_size=32, display_px=0)
    probe = ProbeSet(images=torch.rand(1, 3, 32, 32), labels=torch.tensor([0]))
    for step in (0, 12):
        tr.log(VizLogger(w, step), {"m/l": torch.rand(1, 32, 32)}, {}, probe)
    _, under, width = tr._film_row("m/l", "p000", tr.frames["m/l"]["p000"], [0, 1], tr.epochs["m/l"], 0)
    assert width == 32
    torch.testing.assert_close(under[:, :, 34:66], _shared_strip(32, ["12"], 13))


def test_sanity_check_keeps_no_randomized_copy_above_its_memory_cap(monkeypatch):
    """The sanity check's memo keeps the randomized copy's tensors (to tell the next copy is the same): a model above
    SANITY_MEMO_MB of parameters and buffers keeps none (its maps are computed each run), so a large CPU model is not
    held twice between runs."""
    import lightning_viz.tracking as tracking

    module = LitTiny(TinyCNN(width=4))
    probe = _probe()
    cb = CountsCopies(module, tracker=MapTracker(filmstrip=False, drift=False, sanity_check=True, seed=5))

    def sanity():
        with isolated(module):
            return cb.compute(module, probe)["track:sanity/inputgrad/input"]

    size_mb = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()]) / 2**20
    monkeypatch.setattr(tracking, "SANITY_MEMO_MB", size_mb / 2)
    first = sanity()
    assert torch.equal(sanity(), first) and cb.copies == 2 and cb.tracker._sanity_memo is None
    monkeypatch.setattr(tracking, "SANITY_MEMO_MB", size_mb * 2)
    sanity()
    sanity()
    assert cb.copies == 3 and cb.tracker._sanity_memo is not None
