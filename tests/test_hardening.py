"""Hardening for real training runs (issue 9 part A, issue 13 schedule): augmenting datasets, buffers that change
in eval mode, mid-epoch validation, schedules that can never run, Lightning's epoch convention, logging errors,
probe-picking errors, setup checks, sharding strategies and the checkpoint's probe bank. All through real
``Trainer.fit`` runs and event files read back."""

from __future__ import annotations

import errno
import io
import random
import sys
import warnings
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    InputGradMap,
    LitTiny,
    TinyCNN,
    image_steps,
    read_events,
    scalar_steps,
    tiny_dataset,
    tiny_loaders,
    tiny_trainer,
)
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from test_foundation_training import CALLBACK_FACTORIES
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lightning_viz.callbacks.activations import ActivationCallback
from lightning_viz.callbacks.base import BASELINE_STEP, VisualizationError, VisualizationWarning
from lightning_viz.callbacks.embeddings import EmbeddingCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.callbacks.occlusion import OcclusionCallback
from lightning_viz.capture import isolated
from lightning_viz.probe import PROBE_BANK_KEY, ProbeSet, probe_bank_get, probe_bank_put
from lightning_viz.tracking import MapTracker


# --------------------------------------------------------------------------- 1. global RNGs
class Augmenting(Dataset):
    """Random augmentation drawing from torch, numpy and python ``random`` at every read (no ``targets``
    attribute, so stratified probe picking reads items too)."""

    def __init__(self, n: int = 24):
        self.x, self.y = tiny_dataset(n).tensors

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i] + 0.1 * torch.randn(self.x[i].shape) + float(np.random.uniform(-0.2, 0.2))
        if random.random() < 0.5:
            x = x.flip(-1)
        return x, self.y[i]


def _fit_augmenting(tmp_path, callbacks):
    L.seed_everything(0, verbose=False)  # torch, numpy and python random
    model = LitTiny()
    train = DataLoader(Augmenting(24), batch_size=8, shuffle=True, num_workers=0)
    val = DataLoader(Augmenting(12), batch_size=6, num_workers=0)
    tiny_trainer(str(tmp_path), callbacks, max_epochs=2, deterministic=True).fit(model, train, val)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, (torch.rand(1), np.random.rand(), random.random())


@pytest.mark.parametrize("probe_source", ["val", "train"])
def test_augmenting_dataset_trains_bit_identically_with_callbacks(tmp_path, probe_source):
    plain, plain_next = _fit_augmenting(tmp_path / "plain", [])
    families = ("activations", "inputgrad", "gradients", "cam", "occlusion", "patches", "embeddings", "adversarial")
    cbs = [make(probe_source=probe_source) for name, make in CALLBACK_FACTORIES if name in families]
    cbs.append(
        GradientCallback(
            methods=["saliency"], num_probes=3, probe_source=probe_source, name="val_end", run_on="validation_epoch_end"
        )
    )
    viz, viz_next = _fit_augmenting(tmp_path / "viz", cbs)
    for k in plain:
        assert torch.equal(plain[k], viz[k]), f"{k} differs with callbacks (probe_source={probe_source!r})"
    assert plain_next == viz_next  # every global RNG ends where it would have without callbacks
    acc = read_events(str(tmp_path / "viz"))
    assert image_steps(acc, "viz-activations/net.conv1/p000") == [0, 1]  # the callbacks really ran
    assert image_steps(acc, "viz-gradients/val_end/panel/p000") == [0, 1]


def test_isolated_restores_numpy_and_python_random():
    model = TinyCNN()
    np.random.seed(3)
    random.seed(3)
    torch.manual_seed(3)
    expected = (np.random.rand(), random.random(), torch.rand(1))
    np.random.seed(3)
    random.seed(3)
    torch.manual_seed(3)
    with isolated(model):
        np.random.rand(5), random.random(), torch.rand(7)  # a method drawing from every global RNG
    assert (np.random.rand(), random.random(), torch.rand(1)) == expected


def test_isolated_asks_no_driver_while_cuda_is_not_initialized(monkeypatch):
    """Every callback run enters isolated: on a run where CUDA was never initialized it reads a flag, not the driver
    (torch.cuda.is_available, ~0.1 ms each); the CPU RNG is still restored."""
    if torch.cuda.is_initialized():
        pytest.skip("CUDA initialized in this process")
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: asked.append(1) or False)
    model = TinyCNN()
    torch.manual_seed(5)
    expected = torch.rand(1)
    torch.manual_seed(5)
    with isolated(model):
        torch.rand(3)
    assert torch.equal(torch.rand(1), expected) and not asked


class DrawingMap(InputGradMap):
    """A map method whose compute draws from numpy and python random (as a careless method would)."""

    method = "drawing"

    def compute_maps(self, pl_module, probe):
        np.random.permutation(100), random.shuffle(list(range(10)))
        return super().compute_maps(pl_module, probe)


def test_compute_drawing_numpy_and_random_leaves_training_identical(tmp_path):
    plain, plain_next = _fit_augmenting(tmp_path / "plain", [])
    viz, viz_next = _fit_augmenting(tmp_path / "viz", [DrawingMap(num_probes=2)])
    assert all(torch.equal(plain[k], viz[k]) for k in plain) and plain_next == viz_next
    assert image_steps(read_events(str(tmp_path / "viz")), "viz-drawing/panel/p000") == [0, 1]


# --------------------------------------------------------------------------- 2. buffers changed in eval mode
def _qat_net():
    import torch.ao.quantization as tq

    torch.manual_seed(0)
    net = TinyCNN()
    net.qconfig = tq.get_default_qat_qconfig("fbgemm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tq.prepare_qat(net.train())


def test_isolated_restores_buffers_that_fakequantize_updates_in_eval_mode():
    net = _qat_net()
    x = torch.randn(4, 3, 8, 8)
    net(x)
    before = {n: b.clone() for n, b in net.named_buffers()}
    with isolated(net) as m:
        m(3 * x)  # observers update min/max, scale and zero point even in eval mode
        changed = [n for n, b in m.named_buffers() if not torch.equal(before[n], b)]
    assert any("activation_post_process" in n for n in changed)  # the forward did change buffers
    for n, b in net.named_buffers():
        assert torch.equal(before[n], b), f"buffer {n} changed by a visualization"


def test_qat_model_trains_bit_identically_with_callbacks(tmp_path):
    def fit(path, cbs):
        L.seed_everything(0, verbose=False)
        model = LitTiny(_qat_net())
        tiny_trainer(str(path), cbs, max_epochs=2).fit(model, *tiny_loaders(n=16))
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain = fit(tmp_path / "plain", [])
    viz = fit(
        tmp_path / "viz",
        [ActivationCallback(num_probes=2, layers=["net.conv1"]), GradientCallback(methods=["saliency"], num_probes=2)],
    )
    assert plain.keys() == viz.keys()
    for k in plain:
        assert torch.equal(plain[k], viz[k]), f"{k} differs with callbacks on a QAT model"


# --------------------------------------------------------------------------- 3. mid-epoch validation
class WhereRan(ActivationCallback):
    """Records the training batch index at each run that logged."""

    def run(self, trainer, pl_module, **kw):
        out = super().run(trainer, pl_module, **kw)
        if out is not None:
            self.where.append((trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx))
        return out


@pytest.mark.parametrize("interval,n,expected_batch", [(0.5, 48, 5), (0.4, 40, 1), (2, 40, 1)])
def test_mid_epoch_validation_runs_once_per_epoch(tmp_path, interval, n, expected_batch):
    """6 training batches with 0.5 validate after batches 3 and 6: the one after the last batch is chosen. 5 batches
    with 0.4 or an int 2 validate after batches 2 and 4, never after the last: the first of the epoch is chosen."""
    cb = WhereRan(num_probes=2, layers=["net.conv1"], run_on="validation_epoch_end")
    cb.where = []
    train, val = DataLoader(tiny_dataset(n), batch_size=8), tiny_loaders(n=12)[1]
    tiny_trainer(str(tmp_path), [cb], max_epochs=2, val_check_interval=interval).fit(LitTiny(), train, val)
    assert [e for e, _ in cb.where] == [0, 1]
    assert {b for _, b in cb.where} == {expected_batch}
    acc = read_events(str(tmp_path))
    tags = [t for t in acc.Tags()["images"] + acc.Tags()["scalars"] if t.startswith("viz-")]
    assert tags
    for tag in tags:
        steps = image_steps(acc, tag) if tag in acc.Tags()["images"] else scalar_steps(acc, tag)
        assert steps == [0, 1], (tag, steps)  # one write per tag and step


# --------------------------------------------------------------------------- 4. schedules that can never run
class NoValidationStep(LitTiny):
    validation_step = L.LightningModule.validation_step


@pytest.mark.parametrize("case", ["no_val_loader", "limit_val_batches_0", "no_validation_step"])
def test_validation_schedule_without_validation_is_refused_at_setup(tmp_path, case):
    cb = GradientCallback(num_probes=2, run_on="validation_epoch_end")
    train, val = tiny_loaders(n=12)
    kw = {"limit_val_batches": 0} if case == "limit_val_batches_0" else {}
    trainer = tiny_trainer(str(tmp_path), [cb], **kw)
    model = NoValidationStep() if case == "no_validation_step" else LitTiny()
    expected = {
        "no_val_loader": "no val dataloader",
        "limit_val_batches_0": "limit_val_batches=0",
        "no_validation_step": "no validation_step",
    }[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(
            ValueError,
            match=rf"GradientCallback would never run: run_on='validation_epoch_end'.*"
            rf"{expected}.*run_on='train_epoch_end'",
        ):
            trainer.fit(model, train, None if case == "no_val_loader" else val)
    assert trainer.global_step == 0
    # the same data with run_on="train_epoch_end" is fine
    ok = GradientCallback(num_probes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_trainer(str(tmp_path / "ok"), [ok], max_epochs=1, **kw).fit(
            model, train, None if case == "no_val_loader" else val
        )
    assert ok.last_logged_tags


# --------------------------------------------------------------------------- 5. Lightning's schedule convention
def _steps(tmp_path, cb, max_epochs, **kw):
    trainer = tiny_trainer(str(tmp_path), [cb] + kw.pop("extra", []), max_epochs=max_epochs, **kw)
    trainer.fit(LitTiny(), *tiny_loaders(n=12))
    acc = read_events(str(tmp_path))
    return scalar_steps(acc, "viz-inputgrad/time_s") if "viz-inputgrad/time_s" in acc.Tags()["scalars"] else []


@pytest.mark.parametrize("run_on", ["train_epoch_end", "validation_epoch_end"])
def test_every_n_epochs_follows_modelcheckpoint_and_always_runs_the_last_epoch(tmp_path, run_on):
    assert _steps(tmp_path / "a", InputGradMap(num_probes=2, every_n_epochs=2, run_on=run_on), 5) == [1, 3, 4]
    assert _steps(tmp_path / "b", InputGradMap(num_probes=2, every_n_epochs=2, run_on=run_on), 2) == [1]
    assert _steps(tmp_path / "c", InputGradMap(num_probes=2, every_n_epochs=3, run_on=run_on), 2) == [1]  # last only
    assert _steps(tmp_path / "d", InputGradMap(num_probes=2, run_on=run_on), 2) == [0, 1]  # default: every epoch


def test_every_n_epochs_zero_is_off(tmp_path):
    cb = InputGradMap(num_probes=2, every_n_epochs=0)
    assert _steps(tmp_path, cb, 2) == [] and cb.probes is None  # no run, no error, no data read
    with pytest.raises(ValueError, match=r"every_n_epochs must be an int >= 0 \(0 = off"):
        InputGradMap(every_n_epochs=-1)


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("run_on", ["train_epoch_end", "validation_epoch_end"])
def test_last_epoch_when_early_stopping_stops_the_fit(tmp_path, order, run_on):
    """EarlyStopping before the callback: the stop is known at the epoch-end hook; after it (or at validation end,
    before EarlyStopping decides): the callback runs at on_train_end, at the last epoch's step."""
    # min_delta=1e9: val_loss never "improves" after epoch 0, so patience=1 stops the fit after epoch 1.
    stop = EarlyStopping(monitor="val_loss", min_delta=1e9, patience=1)
    cb = InputGradMap(num_probes=2, every_n_epochs=5, run_on=run_on)
    cbs = [stop, cb] if order == "before" else [cb, stop]
    tiny_trainer(str(tmp_path), cbs, max_epochs=10).fit(LitTiny(), *tiny_loaders(n=12))
    assert stop.stopped_epoch == 1
    acc = read_events(str(tmp_path))
    assert scalar_steps(acc, "viz-inputgrad/time_s") == [1] and image_steps(acc, "viz-inputgrad/panel/p000") == [1]


def test_run_at_start_logs_a_baseline_before_epoch_zero(tmp_path):
    cb = InputGradMap(num_probes=2, run_at_start=True, every_n_epochs=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    assert _steps(tmp_path / "a", cb, 2, extra=[ckpt], enable_checkpointing=True) == [BASELINE_STEP, 1]
    acc = read_events(str(tmp_path / "a"))
    assert image_steps(acc, "viz-inputgrad/panel/p000") == [-1, 1]
    # a resumed fit does not log the baseline again
    again = InputGradMap(num_probes=2, run_at_start=True, every_n_epochs=2)
    tiny_trainer(str(tmp_path / "b"), [again], max_epochs=3).fit(
        LitTiny(), *tiny_loaders(n=12), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert scalar_steps(read_events(str(tmp_path / "b")), "viz-inputgrad/time_s") == [2]


# --------------------------------------------------------------------------- 6. logging errors and on_error
class DiskFull:
    """Fault injection: the TensorBoard writer's ``method`` raises ENOSPC when lightning-viz calls it during epoch 1
    (Lightning's own calls, e.g. its final flush, go through: the disk is full only for a while)."""

    def __init__(self, trainer, method):
        self.trainer, self.writer = trainer, trainer.logger.experiment
        self.original = getattr(self.writer, method)
        self.calls = 0
        setattr(self.writer, method, self)

    def __call__(self, *args, **kwargs):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if self.trainer.current_epoch == 1 and caller.startswith("lightning_viz"):
            self.calls += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.original(*args, **kwargs)


@pytest.mark.parametrize("method", ["flush", "add_image"])
def test_full_disk_with_on_error_warn_trains_on_and_keeps_earlier_logs(tmp_path, method):
    cb = InputGradMap(num_probes=2, on_error="warn")
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=3)
    fault = DiskFull(trainer, method)
    with pytest.warns(VisualizationWarning, match=r"InputGradMap.*failed while logging at step 1: OSError.*No space"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert fault.calls >= 1 and trainer.current_epoch == 3  # training went on to the end
    acc = read_events(str(tmp_path))
    assert 0 in image_steps(acc, "viz-inputgrad/panel/p000") and 2 in image_steps(acc, "viz-inputgrad/panel/p000")
    assert scalar_steps(acc, "train_loss")


def test_full_disk_with_on_error_raise_names_the_callback(tmp_path):
    trainer = tiny_trainer(str(tmp_path), [InputGradMap(num_probes=2)], max_epochs=3)
    DiskFull(trainer, "flush")
    with pytest.raises(VisualizationError, match=r"InputGradMap.*failed while logging at step 1: OSError"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))


# --------------------------------------------------------------------------- 7. probe-picking errors
class MixedSizes(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        size = 8 if i % 2 else 10
        return torch.zeros(3, size, size), i % 3


class MixedSizesData(L.LightningDataModule):
    def train_dataloader(self):
        return tiny_loaders(n=12)[0]

    def val_dataloader(self):
        return DataLoader(MixedSizes(), batch_size=1)


def test_images_of_different_sizes_fail_before_training_with_a_hint(tmp_path):
    trainer = tiny_trainer(str(tmp_path), [GradientCallback(num_probes=4)], max_epochs=1, num_sanity_val_steps=0)
    with pytest.raises(
        VisualizationError,
        match=r"GradientCallback: picking 4 probe images.*MixedSizes.*different "
        r"sizes.*\[3, 10, 10\].*\[3, 8, 8\].*Resize.*probes=ProbeSet",
    ):
        trainer.fit(LitTiny(), datamodule=MixedSizesData())
    assert trainer.global_step == 0
    # explicit probes= need no picking
    x, y = tiny_dataset(4).tensors
    cb = GradientCallback(probes=ProbeSet(images=x, labels=y))
    tiny_trainer(str(tmp_path / "ok"), [cb], max_epochs=1, num_sanity_val_steps=0).fit(
        LitTiny(), datamodule=MixedSizesData()
    )
    assert cb.last_logged_tags and torch.equal(cb.probes.images, x)


def test_probes_are_picked_before_training_and_shared(tmp_path):
    a, b = GradientCallback(num_probes=3), OcclusionCallback(num_probes=3, window=4, stride=4)
    seen = []

    class Look(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append((a.probes, b.probes))

    tiny_trainer(str(tmp_path), [a, b, Look()], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12))
    assert seen[0][0] is not None and seen[0][0] is seen[0][1]  # picked before the first step, one shared set


def test_validate_picks_probes_and_logs(tmp_path):
    cb = GradientCallback(num_probes=2, run_on="validation_epoch_end", every_n_epochs=3)
    tiny_trainer(str(tmp_path), [cb]).validate(LitTiny(), tiny_loaders(n=12)[1])
    assert len(cb.probes) == 2 and image_steps(read_events(str(tmp_path)), "viz-gradients/panel/p000") == [0]


# --------------------------------------------------------------------------- 8. setup checks
class Stream(IterableDataset):
    def __iter__(self):
        return iter(tiny_dataset(12))


class StreamData(L.LightningDataModule):
    def train_dataloader(self):
        return DataLoader(Stream(), batch_size=4)

    val_dataloader = train_dataloader


def test_iterable_datamodule_fails_at_setup_unless_probes_are_given(tmp_path):
    trainer = tiny_trainer(str(tmp_path), [GradientCallback(num_probes=2)], max_epochs=1)
    with pytest.raises(
        VisualizationError,
        match=r"GradientCallback: found no map-style val or train dataset.*Stream, "
        r"an IterableDataset.*probes=ProbeSet",
    ):
        trainer.fit(LitTiny(), datamodule=StreamData())
    assert trainer.global_step == 0
    x, y = tiny_dataset(2).tensors
    cb = GradientCallback(probes=ProbeSet(images=x, labels=y))
    tiny_trainer(str(tmp_path / "ok"), [cb], max_epochs=1).fit(LitTiny(), datamodule=StreamData())
    assert cb.last_logged_tags


def test_pointing_game_without_masks_fails_before_training(tmp_path):
    cb = InputGradMap(num_probes=2, tracker=MapTracker(pointing_game=True, drift=False))
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
    with pytest.raises(ValueError, match=r"InputGradMap\(tracker=MapTracker\(pointing_game=True\)\).*mask.*none"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert trainer.global_step == 0


def test_activation_colormap_is_checked_at_construction():
    with pytest.raises(ValueError, match=r"unknown colormap 'nope'"):
        ActivationCallback(cmap="nope")


def test_two_identical_callbacks_point_to_name():
    with pytest.raises(RuntimeError, match=r"Two GradientCallback callbacks have the same checkpoint state key.*name="):
        L.Trainer(
            callbacks=[GradientCallback(normalize="fixed"), GradientCallback(normalize="per_image")],
            logger=False,
            accelerator="cpu",
        )
    L.Trainer(
        callbacks=[GradientCallback(normalize="fixed"), GradientCallback(name="b")], logger=False, accelerator="cpu"
    )


# --------------------------------------------------------------------------- 9. sharding strategies
def test_model_parallel_strategy_is_refused_at_setup():
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = L.Trainer(strategy=ModelParallelStrategy(), accelerator="cpu", devices=1, logger=False)
    with pytest.raises(
        ValueError,
        match=r"GradientCallback does not support ModelParallelStrategy.*shards.*Supported "
        r"strategies: a single device.*DDP",
    ):
        GradientCallback().setup(trainer, LitTiny(), "fit")


def test_fsdp_strategy_is_refused_at_setup():
    from lightning.pytorch.strategies import FSDPStrategy

    # FSDP needs a GPU to build a Trainer; the refusal only looks at the strategy.
    with pytest.raises(ValueError, match=r"ActivationCallback does not support FSDPStrategy.*DDP"):
        ActivationCallback().setup(SimpleNamespace(strategy=FSDPStrategy()), LitTiny(), "fit")


# --------------------------------------------------------------------------- 10. checkpoint probe bank
def _size(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def _shared_probe_callbacks():
    return [
        GradientCallback(methods=["saliency"], num_probes=4, normalize="fixed"),
        ActivationCallback(num_probes=4, layers=["net.conv1"]),
        OcclusionCallback(num_probes=4, window=4, stride=4, tracker=MapTracker(max_frames=4)),
        EmbeddingCallback(num_probes=8, projection=["pca"]),  # 8 from the same seed: the 4 plus 4 more
    ]


def test_checkpoint_stores_shared_probes_once_and_resumes_exactly(tmp_path):
    cbs = _shared_probe_callbacks()
    ckdir = tmp_path / "ckpt"
    trainer = tiny_trainer(
        str(tmp_path / "a"),
        cbs + [ModelCheckpoint(dirpath=ckdir, save_last=True)],
        max_epochs=2,
        enable_checkpointing=True,
    )
    trainer.fit(LitTiny(), *tiny_loaders(n=24))
    ckpt = torch.load(ckdir / "last.ckpt", weights_only=False)
    bank = ckpt[PROBE_BANK_KEY]
    [images] = [t for g, t in bank["groups"].items() if g.startswith("images:")]
    assert images.shape == (8, 3, 8, 8)  # 4 + 4 + 4 + 8 probes, 8 distinct images stored once
    for cb in cbs:
        assert set(ckpt["callbacks"][cb.state_key]["probes"]) == {"bank_ref"}
    inflated = sum(_size(cb.probes.state_dict()) for cb in cbs)
    assert _size(bank) < inflated / 2

    resumed = _shared_probe_callbacks()
    tiny_trainer(str(tmp_path / "b"), resumed, max_epochs=3).fit(
        LitTiny(), *tiny_loaders(n=24, seed=7), ckpt_path=str(ckdir / "last.ckpt")
    )  # other data: no re-pick
    for old, new in zip(cbs, resumed):
        for k, v in old.probes.state_dict().items():
            w = new.probes.state_dict()[k]
            assert (torch.equal(v, w) and v.dtype == w.dtype) if isinstance(v, torch.Tensor) else v == w, k
    assert resumed[0].scales.keys() == cbs[0].scales.keys()
    acc = read_events(str(tmp_path / "b"))
    assert scalar_steps(acc, "viz-gradients/time_s") == [2]  # continues at the right step
    frames = resumed[2].tracker.frames["occlusion/score"]["p000"]
    assert len(frames) == 3  # epochs 0 and 1 from the checkpoint, then 2


def test_old_format_checkpoint_still_loads(tmp_path):
    cbs = _shared_probe_callbacks()[:2]
    ckdir = tmp_path / "ckpt"
    tiny_trainer(
        str(tmp_path / "a"),
        cbs + [ModelCheckpoint(dirpath=ckdir, save_last=True)],
        max_epochs=1,
        enable_checkpointing=True,
    ).fit(LitTiny(), *tiny_loaders(n=24))
    ckpt = torch.load(ckdir / "last.ckpt", weights_only=False)
    for cb in cbs:  # the format before the bank: full probe states in each callback's entry
        ckpt["callbacks"][cb.state_key]["probes"] = cb.probes.state_dict()
    del ckpt[PROBE_BANK_KEY]
    torch.save(ckpt, tmp_path / "old.ckpt")
    resumed = _shared_probe_callbacks()[:2]
    tiny_trainer(str(tmp_path / "b"), resumed, max_epochs=2).fit(
        LitTiny(), *tiny_loaders(n=24, seed=7), ckpt_path=str(tmp_path / "old.ckpt")
    )
    assert all(torch.equal(o.probes.images, n.probes.images) for o, n in zip(cbs, resumed))


def test_probe_bank_round_trip_is_bit_exact_and_compact():
    images = torch.tensor([[0.5, -0.0], [float("nan"), 1e-30]]).view(2, 1, 1, 2)
    exact16 = torch.arange(8.0).view(2, 1, 2, 2) / 4  # exactly representable in float16
    masks = torch.tensor([[[0.0, 1.0]], [[1.0, 1.0]]])
    bank: dict = {}
    a = ProbeSet(images=images, labels=torch.tensor([0, 1])).state_dict()
    b = ProbeSet(images=exact16, masks=masks.expand(2, 2, 2)).state_dict()
    ra, rb, ra2 = probe_bank_put(bank, a), probe_bank_put(bank, b), probe_bank_put(bank, a)
    assert ra["images"]["group"] == ra2["images"]["group"] and torch.equal(ra["images"]["rows"], ra2["images"]["rows"])
    assert bank["groups"][ra["images"]["group"]].shape[0] == 2  # the second put stored nothing new
    assert bank["groups"][rb["images"]["group"]].dtype == torch.float16
    assert bank["groups"][rb["masks"]["group"]].dtype == torch.bool
    assert bank["groups"][ra["images"]["group"]].dtype == torch.float32  # NaN, -0.0 and 1e-30 need float32
    for state, ref in ((a, ra), (b, rb)):
        back = probe_bank_get(bank, ref)
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == back[k].dtype and _bits(v) == _bits(back[k]), k
            else:
                assert v == back[k], k


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


class _InputResample(torch.autograd.Function):
    """Identity whose backward, like CUDA's bilinear-upsampling backward, has no deterministic implementation:
    it raises under ``torch.use_deterministic_algorithms(True)`` and warns under ``warn_only=True``."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        if torch.are_deterministic_algorithms_enabled():
            msg = "resample_backward_cuda does not have a deterministic implementation, but you set ..."
            if not torch.is_deterministic_algorithms_warn_only_enabled():
                raise RuntimeError(msg)
            warnings.warn(msg, stacklevel=2)
        return g


class _ResampledInput(TinyCNN):
    def forward(self, x):
        return super().forward(_InputResample.apply(x))


def test_deterministic_training_runs_visualizations_through_ops_it_never_differentiates(tmp_path):
    """deterministic=True: training never differentiates w.r.t. the input, a saliency map does; an op there without
    a deterministic backward must not stop the fit. It warns once, naming the op; training stays bitwise the same;
    the strict mode is back after each run."""
    from lightning_viz.capture import NondeterministicOpWarning

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = LitTiny(_ResampledInput())
        trainer = tiny_trainer(str(tmp_path / str(len(callbacks))), callbacks, max_epochs=2, deterministic=True)
        trainer.fit(model, *tiny_loaders(n=16))
        return model

    strict = []

    class Probe(L.Callback):  # after the visualization: the strict mode is back
        def on_train_epoch_end(self, trainer, pl_module):
            strict.append(
                torch.are_deterministic_algorithms_enabled()
                and not torch.is_deterministic_algorithms_warn_only_enabled()
            )

    try:
        plain = fit([])
        cb = GradientCallback(methods=["saliency", "integrated_gradients"], ig_steps=2, num_probes=2)
        with pytest.warns(
            NondeterministicOpWarning, match=r"ran resample_backward_cuda, which has no deterministic"
        ) as rec:
            viz = fit([cb, Probe()])
    finally:
        torch.use_deterministic_algorithms(False)
    assert len([w for w in rec if w.category is NondeterministicOpWarning]) == 1
    assert not [w for w in rec if "resample_backward_cuda does not have" in str(w.message)]  # torch's own: replaced
    assert strict == [True, True] and any(t.startswith("viz-gradients/saliency") for t in cb.last_logged_tags)
    for (k, a), b in zip(plain.state_dict().items(), viz.state_dict().values()):
        assert torch.equal(a, b), k


class _Checkpointed(TinyCNN):
    """TinyCNN whose first block runs under torch.utils.checkpoint, as timm's set_grad_checkpointing() does (also in
    eval mode): the backward recomputes it."""

    def __init__(self, reentrant: bool = False):
        super().__init__()
        self.reentrant = reentrant

    def block(self, x):
        return F.relu(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        x = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.fc(self.pool(x).flatten(1))


def test_gradient_checkpointing_gives_the_same_maps_and_images(tmp_path):
    """Gradients, CAMs (the backward recomputes the forward: hooks and ReLU rules must still be there) and input
    optimization (a forward cut after its layer must not stop the recomputation) as without checkpointing; every
    family runs in a real fit (was: CheckpointError for CAMs, a bare _ForwardStopped for units and inversion)."""
    from test_foundation_training import all_callbacks

    from lightning_viz.methods import cam as C
    from lightning_viz.methods import gradients as G
    from lightning_viz.methods.synthesis import invert_features, unit_images

    torch.manual_seed(0)
    plain, ckpt = TinyCNN().eval(), _Checkpointed().eval()
    ckpt.load_state_dict(plain.state_dict())
    x, y = tiny_dataset(6).tensors

    def maps(m):
        with isolated(m):
            return [
                G.saliency(m, x, "label", y),
                G.guided_backprop(m, x, "label", y),
                C.class_activation_map(m, x, "conv2", "gradcam", "label", y),
                C.class_activation_map(m, x, "conv1", "layercam", "label", y),
                unit_images(m, "conv1", [0, 1], (3, 8, 8), steps=4).images,
                invert_features(m, x[:2], "conv1", steps=4).images,
            ]

    for a, b in zip(maps(plain), maps(ckpt)):
        torch.testing.assert_close(a, b)
    callbacks = all_callbacks()
    tiny_trainer(str(tmp_path), callbacks, max_epochs=1, limit_val_batches=1).fit(
        LitTiny(_Checkpointed()), *tiny_loaders(n=16)
    )
    assert all(cb.last_logged_tags for cb in callbacks)


class _NoGradBlock(_Checkpointed):
    def forward(self, x):
        with torch.no_grad():
            x = self.block(x)
        return self.fc(self.pool(x).flatten(1))


def test_gradient_checkpointing_limits_fail_clearly():
    """A block run with autograd off (torch.no_grad in the forward): no gradient reaches a layer inside (was: all-zero
    Grad-CAM maps, silently). The deconvnet rule cannot be recomputed by a checkpoint."""
    from lightning_viz.methods import cam as C
    from lightning_viz.methods import gradients as G

    x, y = tiny_dataset(4).tensors
    model = _NoGradBlock().eval()
    with isolated(model), pytest.raises(ValueError, match=r"\['conv2'\] ran with autograd off.*use_reentrant=False"):
        C.class_activation_map(model, x, "conv2", "gradcam", "label", y)
    model = _Checkpointed().eval()
    with (
        isolated(model),
        pytest.raises(ValueError, match="the deconv ReLU rule cannot run through torch.utils.checkpoint"),
    ):
        G.deconvnet(model, x, "label", y)


@pytest.mark.parametrize("reentrant", [False, True])
def test_layers_wrapped_for_activation_checkpointing_give_the_same_maps(tmp_path, reentrant):
    """Convolutions wrapped by ``apply_activation_checkpointing`` (Lightning's FSDP ``activation_checkpointing_policy``
    does it): filters, Grad-CAM, saliency and unit images of the layers by their own names are those of the model
    without the wrappers, and a fit trains bit-identically with the callbacks. Was: 'net.conv1' was refused (a
    CheckpointWrapper, no convolution)."""
    from functools import partial

    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    from lightning_viz.callbacks.cam import CAMCallback
    from lightning_viz.callbacks.filters import FilterCallback
    from lightning_viz.callbacks.synthesis import UnitCallback
    from lightning_viz.methods import cam as C
    from lightning_viz.methods import gradients as G
    from lightning_viz.methods.synthesis import unit_images

    impl = CheckpointImpl.REENTRANT if reentrant else CheckpointImpl.NO_REENTRANT

    def wrapped(net):
        wrapper = partial(checkpoint_wrapper, checkpoint_impl=impl)
        apply_activation_checkpointing(net, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, nn.Conv2d))
        return net

    torch.manual_seed(0)
    plain = TinyCNN().eval()
    ckpt = wrapped(TinyCNN()).eval()
    ckpt.load_state_dict(plain.state_dict())
    x, y = tiny_dataset(4).tensors

    def maps(m):
        with isolated(m):
            return [
                C.class_activation_map(m, x, "conv2", "gradcam", "label", y),
                G.saliency(m, x, "label", y),
                unit_images(m, "conv1", [0, 1], (3, 8, 8), steps=3).images,
            ]

    for a, b in zip(maps(plain), maps(ckpt)):
        torch.testing.assert_close(a, b)

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = LitTiny(wrapped(TinyCNN()))
        tiny_trainer(str(tmp_path), callbacks, max_epochs=2, limit_val_batches=1).fit(model, *tiny_loaders(n=16))
        return model.state_dict()

    cbs = [
        FilterCallback(layers="net.conv1"),
        CAMCallback(layers="net.conv2", num_probes=2),
        UnitCallback(layers="net.conv1", channels=[0], steps=2),
    ]
    viz, bare = fit(cbs), fit([])
    assert all(cb.last_logged_tags for cb in cbs)
    assert all(torch.equal(viz[k], bare[k]) for k in bare)


class _InferenceModeBlock(_Checkpointed):
    """A frozen backbone run under torch.inference_mode() (its output cloned, so the head can train on it)."""

    def forward(self, x):
        with torch.inference_mode():
            x = self.block(x)
        return self.fc(self.pool(x.clone()).flatten(1))


@pytest.mark.parametrize("cut_off", ["no_grad", "inference_mode"])
def test_gradient_free_cams_of_a_layer_run_without_autograd(cut_off):
    """CAM (the head's weights), Eigen-CAM, Score-CAM and Ablation-CAM read only the activations (and forwards): a
    layer inside a backbone the forward runs under torch.no_grad() or torch.inference_mode() gives the maps of the
    same model without it. Was: every CAM variant refused it ("ran with autograd off"), as the gradient-weighted ones
    rightly do; under inference_mode a RuntimeError ("Inference tensors do not track version counter")."""
    from lightning_viz.methods import cam as C

    torch.manual_seed(0)
    plain, cut = TinyCNN().eval(), {"no_grad": _NoGradBlock, "inference_mode": _InferenceModeBlock}[cut_off]().eval()
    cut.load_state_dict(plain.state_dict())
    x, y = tiny_dataset(4).tensors
    for method in ["cam", "eigencam", "scorecam", "ablationcam"]:
        with isolated(plain):
            want = C.class_activation_map(plain, x, "conv2", method, "label", y)
        with isolated(cut):
            got = C.class_activation_map(cut, x, "conv2", method, "label", y)
        assert want.abs().sum() > 0
        torch.testing.assert_close(got, want, msg=method)
    with isolated(cut), pytest.raises(ValueError, match=r"gradcam: layer\(s\) \['conv2'\] ran with autograd off"):
        C.class_activation_map(cut, x, "conv2", "gradcam", "label", y)


def test_reentrant_gradient_checkpointing_gives_the_same_maps(tmp_path):
    """``torch.utils.checkpoint(..., use_reentrant=True)`` refuses ``torch.autograd.grad``, so every gradient w.r.t.
    the input failed through it and CAMs of a layer inside it had no gradient (was: the GradientCallback stopped the
    fit after its first epoch). Inside ``isolated`` such a block runs as a plain call: the maps without checkpointing,
    and the model still checkpoints in training (bit-identical weights)."""
    from lightning_viz.methods import cam as C
    from lightning_viz.methods import gradients as G

    torch.manual_seed(0)
    plain, ckpt = TinyCNN().eval(), _Checkpointed(reentrant=True).eval()
    ckpt.load_state_dict(plain.state_dict())
    x, y = tiny_dataset(4).tensors

    def maps(m):
        with isolated(m):
            return [G.saliency(m, x, "label", y), C.class_activation_map(m, x, "conv2", "gradcam", "label", y)]

    for a, b in zip(maps(plain), maps(ckpt)):
        torch.testing.assert_close(a, b)

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = LitTiny(_Checkpointed(reentrant=True))
        tiny_trainer(str(tmp_path), callbacks, max_epochs=2, limit_val_batches=1).fit(model, *tiny_loaders(n=16))
        return model.state_dict()

    cb = GradientCallback(methods=["saliency"], num_probes=2)
    viz, bare = fit([cb]), fit([])
    assert cb.last_logged_tags and all(torch.equal(viz[k], bare[k]) for k in bare)


def test_a_forward_that_cuts_the_input_off_autograd_fails_clearly():
    """A frozen backbone called under torch.no_grad() in the forward: no gradient w.r.t. the input exists (was:
    all-zero saliency and integrated-gradients maps, silently; raw torch errors from the synthesis and attacks)."""
    from lightning_viz.methods import gradients as G
    from lightning_viz.methods.adversarial import fgsm
    from lightning_viz.methods.synthesis import class_model_images, unit_images

    x, y = tiny_dataset(2).tensors
    model = _NoGradBlock().eval()
    with isolated(model):
        for call in [
            lambda: G.saliency(model, x, "label", y),
            lambda: G.integrated_gradients(model, x, "label", y, steps=2),
            lambda: fgsm(model, x, y, epsilon=0.1),
            lambda: class_model_images(model, [0], (3, 8, 8), steps=1),
            lambda: unit_images(model, "conv1", [0], (3, 8, 8), steps=1),
        ]:
            with pytest.raises(ValueError, match="the model's output does not depend on its input through autograd"):
                call()


def test_a_forward_that_cuts_the_input_off_autograd_fails_at_setup(tmp_path):
    """The callbacks that differentiate the logits w.r.t. the input check it with their setup forward (was: the fit
    stopped after its first epoch)."""
    from test_foundation_training import StepCounter

    counter = StepCounter()
    trainer = tiny_trainer(str(tmp_path), [counter, GradientCallback(methods=["saliency"], num_probes=2)])
    with pytest.raises(ValueError, match="GradientCallback needs gradients w.r.t. the input, but the model's output"):
        trainer.fit(LitTiny(_NoGradBlock()), *tiny_loaders(n=8))
    assert counter.steps == 0


def test_layers_a_forward_runs_without_autograd_fail_at_setup(tmp_path):
    """Gradient-weighted CAMs, unit images and inversions of a layer inside a backbone the forward runs under
    torch.no_grad() fail at setup, naming the callback and the layer (was: after the first epoch's training); the
    gradient-free CAMs of that layer run."""
    from test_foundation_training import StepCounter

    from lightning_viz.callbacks.cam import CAMCallback
    from lightning_viz.callbacks.synthesis import InversionCallback, UnitCallback

    for cb, says in [
        (CAMCallback(methods=["cam", "gradcam"], layers="net.conv2", num_probes=2), "CAMCallback: layer"),
        (UnitCallback(layers="net.conv1", channels=[0], steps=2), "UnitCallback: layer"),
        (InversionCallback(layers="net.conv1", steps=2, num_probes=1), "InversionCallback: layer"),
    ]:
        counter = StepCounter()
        trainer = tiny_trainer(str(tmp_path), [counter, cb], max_epochs=1)
        with pytest.raises(ValueError, match=rf"{says}\(s\) \['net.conv\d'\] ran with autograd off.*requires_grad_"):
            trainer.fit(LitTiny(_NoGradBlock()), *tiny_loaders(n=8))
        assert counter.steps == 0, type(cb).__name__
    free = CAMCallback(methods=["cam", "eigencam", "scorecam", "ablationcam"], layers="net.conv2", num_probes=2)
    tiny_trainer(str(tmp_path / "free"), [free], max_epochs=1).fit(LitTiny(_NoGradBlock()), *tiny_loaders(n=8))
    assert {t.split("/")[1] for t in free.last_logged_tags} >= {"panel", "cam", "eigencam", "scorecam", "ablationcam"}


class _DetachedBlock(_Checkpointed):
    """A frozen backbone cut off with ``.detach()`` (``features = backbone(x).detach()``) instead of torch.no_grad()."""

    def forward(self, x):
        return self.fc(self.pool(self.block(x).detach()).flatten(1))


def test_gradient_weighted_cams_of_a_layer_cut_off_by_detach_fail_clearly(tmp_path):
    """A layer whose output the forward detaches before the head: no gradient of the score reaches it. Was: all-zero
    Grad-CAM and LayerCAM maps, silently, at every epoch; now a clear error (at setup in a fit), while the
    gradient-free CAM of that layer still runs."""
    from test_foundation_training import StepCounter

    from lightning_viz.callbacks.cam import CAMCallback
    from lightning_viz.methods import cam as C

    x, y = tiny_dataset(4).tensors
    model = _DetachedBlock().eval()
    for method in ["gradcam", "layercam"]:
        with (
            isolated(model),
            pytest.raises(ValueError, match=rf"{method}: the score does not depend on layer\(s\) \['conv2'\]"),
        ):
            C.class_activation_map(model, x, "conv2", method, "label", y)
    with isolated(model):
        assert C.class_activation_map(model, x, "conv2", "eigencam", "label", y).abs().sum() > 0
    counter = StepCounter()
    trainer = tiny_trainer(str(tmp_path), [counter, CAMCallback(methods=["gradcam"], layers="net.conv2", num_probes=2)])
    with pytest.raises(
        ValueError, match=r"CAMCallback: the score does not depend on layer\(s\) \['net.conv2'\].*\.detach\(\)"
    ):
        trainer.fit(LitTiny(_DetachedBlock()), *tiny_loaders(n=8))
    assert counter.steps == 0
