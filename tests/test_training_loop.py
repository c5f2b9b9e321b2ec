"""Callbacks under Lightning training-loop set-ups met in real use (several fits, checkpoints, loops)."""

from __future__ import annotations

import os
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from helpers import LitTiny, TinyCNN, image_steps, read_events, scalar_steps, tiny_dataset, tiny_loaders, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_viz.callbacks.base import VisualizationWarning
from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.filters import FilterCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.tracking import MapTracker


def test_callbacks_reused_by_a_new_trainer_start_over(tmp_path):
    """One list of callbacks given to a second Trainer (a sweep, a notebook cell run again) for a fresh fit on
    other data: probes are picked from that data (were the first fit's: a label out of the 2 classes, a crash),
    class names found again, and filmstrips, drift, fixed scales and filter changes start over (were continued
    from the other model: epochs 0, 0 in one filmstrip, drift at step 0)."""
    cam = CAMCallback(num_probes=3, normalize="both", tracker=MapTracker(max_frames=4))
    cbs = [GradientCallback(num_probes=3), cam, FilterCallback()]
    tiny_trainer(str(tmp_path / "a"), cbs, max_epochs=1).fit(LitTiny(), *tiny_loaders(n=12, num_classes=3))
    assert sorted(cam.probes.labels.tolist()) == [0, 1, 2]
    vmax_a = cam.scales["gradcam/net.conv2"].vmax

    train, val = tiny_loaders(n=12, num_classes=2, seed=1)
    tiny_trainer(str(tmp_path / "b"), cbs, max_epochs=1).fit(LitTiny(TinyCNN(num_classes=2)), train, val)
    assert cam.probes.labels.max() == 1 and cbs[0].probes is cam.probes
    assert cam.tracker.epochs == {"gradcam/net.conv2": [0]}
    assert cam.scales["gradcam/net.conv2"].vmax != vmax_a  # set from the second model's maps
    acc = read_events(str(tmp_path / "b"))
    assert image_steps(acc, "viz-cam/filmstrip/p000") == [0]
    assert "viz-cam/gradcam/net.conv2/drift/rank_corr" not in acc.Tags()["scalars"]
    assert "viz-filters/net.conv1/rel_change" not in acc.Tags()["scalars"]
    assert scalar_steps(acc, "viz-cam/time_s") == [0]


def test_resume_from_a_checkpoint_saved_at_the_epoch_end_validation(tmp_path):
    """With several validations per epoch (or check_val_every_n_epoch > 1) ModelCheckpoint saves at the validation
    after the epoch's last batch, before on_train_epoch_end: the callbacks run there first, so the checkpoint holds
    that epoch's frames, and the resumed fit (where Lightning calls on_train_epoch_end of that epoch again) does
    not run it twice. Was: the checkpoint lacked the epoch, the resume wrote its step a second time."""
    train, val = tiny_loaders(n=12)
    cam = CAMCallback(num_probes=2, tracker=MapTracker())
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    kw = {"val_check_interval": 0.5, "enable_checkpointing": True}
    first = tiny_trainer(str(tmp_path), [cam, ckpt], max_epochs=2, **kw)
    first.fit(LitTiny(), train, val)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][cam.state_key]
    assert saved["extra"]["tracker"]["epochs"] == {"gradcam/net.conv2": [0, 1]}
    first.save_checkpoint(tmp_path / "after_fit.ckpt")  # after the fit: nothing is due, nothing runs
    assert cam.tracker.epochs == {"gradcam/net.conv2": [0, 1]}

    again = CAMCallback(num_probes=2, tracker=MapTracker())
    trainer = tiny_trainer(str(tmp_path), [again], max_epochs=3, **kw)
    trainer.fit(LitTiny(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert again.tracker.epochs == {"gradcam/net.conv2": [0, 1, 2]}
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-cam/filmstrip/p000") == [0, 1, 2]
    assert scalar_steps(acc, "viz-cam/gradcam/net.conv2/drift/rank_corr") == [1, 2]


def test_resume_from_a_checkpoint_saved_at_the_epochs_last_step(tmp_path):
    """ModelCheckpoint(every_n_train_steps=...) saving at an epoch's last step (on_train_batch_end, before the
    epoch-end hooks): the checkpoint holds that epoch's run, and the fit resumed from it (which goes straight to
    the next epoch) has it in its filmstrips and drift. Was: the epoch was missing after the resume."""
    train, val = tiny_loaders(n=12)  # 2 steps per epoch
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    kw = {"enable_checkpointing": True}
    cam = CAMCallback(num_probes=2, tracker=MapTracker())
    tiny_trainer(str(tmp_path / "a"), [cam, ckpt], max_epochs=2, **kw).fit(LitTiny(), train, val)

    _resume_from_epoch_0_checkpoint(tmp_path, train, val, kw)


def _resume_from_epoch_0_checkpoint(tmp_path, train, val, kw, **cam_options):
    """Resume a 2-epoch fit from the checkpoint saved at epoch 0's last step: epoch 1 is logged after epoch 0
    (from the checkpoint) in the history, filmstrip and drift."""
    again = CAMCallback(num_probes=2, tracker=MapTracker(), **cam_options)
    trainer = tiny_trainer(str(tmp_path / "b"), [again], max_epochs=2, **kw)
    trainer.fit(LitTiny(), train, val, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt"))
    assert again.tracker.epochs == {"gradcam/net.conv2": [0, 1]}
    acc = read_events(str(tmp_path / "b"))
    assert image_steps(acc, "viz-cam/filmstrip/p000") == [1]
    assert scalar_steps(acc, "viz-cam/gradcam/net.conv2/drift/rank_corr") == [1]


@pytest.mark.parametrize("val_check_interval", [1.0, 0.5])
def test_resume_before_the_validation_a_validation_epoch_end_callback_runs_at(tmp_path, val_check_interval):
    """run_on="validation_epoch_end" and ModelCheckpoint(every_n_train_steps=...) saving at the batch whose
    validation is the epoch's chosen one (on_train_batch_end, before that validation): the fit resumed from it skips
    that validation (Lightning fast-forwards past it), so the callback runs when the checkpoint is saved (the same
    weights the validation sees) and the checkpoint holds that epoch. Was: the epoch was missing after the resume
    (filmstrip and drift without it), and its run was lost from the resumed run's history."""
    train, val = tiny_loaders(n=12)  # 2 steps per epoch
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    kw = {"enable_checkpointing": True, "val_check_interval": val_check_interval}
    cam = CAMCallback(num_probes=2, run_on="validation_epoch_end", tracker=MapTracker())
    tiny_trainer(str(tmp_path / "a"), [cam, ckpt], max_epochs=2, **kw).fit(LitTiny(), train, val)
    assert image_steps(read_events(str(tmp_path / "a")), "viz-cam/filmstrip/p000") == [0, 1]  # once per epoch
    saved = torch.load(tmp_path / "ckpt" / "epoch=0-step=2.ckpt", weights_only=False)["callbacks"][cam.state_key]
    assert saved["extra"]["tracker"]["epochs"] == {"gradcam/net.conv2": [0]}

    _resume_from_epoch_0_checkpoint(tmp_path, train, val, kw, run_on="validation_epoch_end")


class _NamedItems(Dataset):
    """Items ``(image, file name)``: a second element that is no number (an unlabeled set, a path)."""

    def __init__(self, n: int = 8):
        self.x = tiny_dataset(n).tensors[0]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], f"img_{i:03d}.png"


class _SelfSupervised(LitTiny):
    def training_step(self, batch, batch_idx):
        return self(batch[0]).square().mean()

    def validation_step(self, batch, batch_idx):
        pass


def test_items_whose_second_element_is_not_a_label(tmp_path):
    """(image, "img_000.png") items: the probes have no labels (was: a TypeError picking them, whatever the target);
    target='predicted' runs, target='label' fails at setup saying the items give no label."""
    loader = DataLoader(_NamedItems(), batch_size=4)
    cb = GradientCallback(num_probes=2, target="predicted")
    tiny_trainer(str(tmp_path / "a"), [cb], max_epochs=1).fit(_SelfSupervised(), loader, loader)
    assert cb.probes.labels is None and len(cb.probes) == 2
    assert image_steps(read_events(str(tmp_path / "a")), "viz-gradients/panel/p000") == [0]
    counter = []
    trainer = tiny_trainer(str(tmp_path / "b"), [GradientCallback(num_probes=2)], max_epochs=1)
    model = _SelfSupervised()
    model.on_train_batch_start = lambda *a: counter.append(1)
    with pytest.raises(ValueError, match=r"GradientCallback: target='label' needs a class label.*give no label"):
        trainer.fit(model, loader, loader)
    assert not counter


class _Augmented(Dataset):
    """Every read draws a random flip and noise from the global RNGs (torch, numpy), as an augmentation does."""

    def __init__(self, n: int = 12):
        self.x, self.y = tiny_dataset(n).tensors

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i].flip(-1) if torch.rand(()) < 0.5 else self.x[i]
        return x + float(np.random.normal()) + 0.1 * torch.randn_like(x), self.y[i]


def test_probes_from_an_augmenting_dataset_do_not_depend_on_the_global_rng():
    """Probes read through a random augmentation are the same whatever state the global RNGs are in (each DDP
    rank, unseeded, picks the same images; a rerun picks the same), and the global RNGs are left as they were.
    Was: each pick drew its own augmentation, so under DDP every rank had other probe images."""
    from lightning_viz.probe import ProbeSet

    picks = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        np.random.seed(seed)
        before = torch.get_rng_state(), np.random.get_state()[1].copy()
        picks.append(ProbeSet.from_dataset(_Augmented(), num=4, seed=0))
        assert torch.equal(torch.get_rng_state(), before[0]) and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(picks[0].images, picks[1].images) and torch.equal(picks[0].labels, picks[1].labels)
    assert not torch.equal(ProbeSet.from_dataset(_Augmented(), num=4, seed=5).images, picks[0].images)


class _FailingValidation(LitTiny):
    def validation_step(self, batch, batch_idx):
        if not self.trainer.sanity_checking:
            raise RuntimeError("validation broke")


def test_a_checkpoint_saved_on_an_exception_runs_nothing(tmp_path):
    """OnExceptionCheckpoint saving after an error in the epoch's last validation: the callbacks do not run there."""
    from lightning.pytorch.callbacks import OnExceptionCheckpoint

    train, val = tiny_loaders(n=12)
    cam = CAMCallback(num_probes=2, tracker=MapTracker())
    on_error = OnExceptionCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer = tiny_trainer(str(tmp_path), [cam, on_error], max_epochs=1, enable_checkpointing=True)
    with pytest.raises(RuntimeError, match="validation broke"):
        trainer.fit(_FailingValidation(), train, val)
    assert (tmp_path / "ckpt" / "on_exception.ckpt").exists()
    assert cam.tracker.epochs == {} and cam._last_run_epoch is None


def test_reused_callbacks_find_the_new_models_layers(tmp_path):
    """What a callback derives from the model (ActivationCallback's and CAMCallback's default layers,
    TopPatchesCallback's receptive fields) is found again for the model of the next fit. Was: the first model's,
    so another architecture failed at setup (an unknown layer) or had its patches cut with the first model's
    receptive field."""
    from lightning_viz.callbacks.activations import ActivationCallback
    from lightning_viz.callbacks.patches import TopPatchesCallback
    from lightning_viz.methods.receptive_field import receptive_field

    acts, cam = ActivationCallback(num_probes=2), CAMCallback(num_probes=2)
    patches = TopPatchesCallback(layers="net.conv2", num_units=2, k=2, num_probes=4, patch_px=8)
    train, val = tiny_loaders(n=8)
    tiny_trainer(str(tmp_path / "a"), [acts, cam, patches], max_epochs=1).fit(LitTiny(), train, val)
    assert acts.layer_names(LitTiny()) == ["net.conv1", "net.conv2"]

    wide = TinyCNN()
    wide.conv1 = torch.nn.Conv2d(3, 4, 5, padding=2)  # same names, a larger receptive field for net.conv2
    seq = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1))
    other = torch.nn.Sequential(seq, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3))
    tiny_trainer(str(tmp_path / "b"), [acts, cam], max_epochs=1).fit(LitTiny(other), train, val)
    assert acts.layer_names(LitTiny(other)) == ["net.0.0", "net.0.2"] and cam.layers == ["net.0.2"]
    model = LitTiny(wide)
    tiny_trainer(str(tmp_path / "c"), [patches], max_epochs=1).fit(model, train, val)
    ((layer, shape, how), boxes), *_ = patches._boxes.items()
    assert torch.equal(boxes, receptive_field(model, layer, shape, how).cpu())
    assert not torch.equal(boxes, receptive_field(LitTiny(), layer, shape, how).cpu())


def test_resumed_fit_keeps_the_earlier_epochs_in_the_projector(tmp_path):
    """A fit resumed into the same log directory adds its embeddings to the Projector's config (was: a new
    SummaryWriter rewrote projector_config.pbtxt with its own epochs only, the earlier ones vanished from the tab)."""
    from lightning_viz.callbacks.embeddings import EmbeddingCallback

    train, val = tiny_loaders(n=12)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    emb = EmbeddingCallback(num_probes=6, projection=["pca"])
    tiny_trainer(str(tmp_path), [emb, ckpt], max_epochs=1, enable_checkpointing=True).fit(LitTiny(), train, val)
    again = EmbeddingCallback(num_probes=6, projection=["pca"])
    trainer = tiny_trainer(str(tmp_path), [again], max_epochs=2)
    trainer.fit(LitTiny(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    config = (tmp_path / "version_0" / "projector_config.pbtxt").read_text()
    paths = [line.split('"')[1] for line in config.splitlines() if "tensor_path" in line]
    assert paths == ["00000/viz-embeddings%2fpenultimate/tensors.tsv", "00001/viz-embeddings%2fpenultimate/tensors.tsv"]


class _Evaluated(LitTiny):
    def test_step(self, batch, batch_idx):
        self.log("test_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch, batch_idx):
        return self(batch[0])


def test_test_and_predict_run_no_callback_and_check_nothing(tmp_path, caplog):
    """trainer.test and trainer.predict run no visualization, and so check nothing at setup; trainer.validate runs
    the run_on="validation_epoch_end" callbacks only. One info line per entry point says which run. Was: a callback
    whose loggers=['csv'] named a logger of the training run, not of this evaluation Trainer, failed test/validate
    at setup, and the start-up line said every callback writes to TensorBoard where none ran."""
    grads = GradientCallback(num_probes=2, loggers=["csv"])
    cam = CAMCallback(num_probes=2, run_on="validation_epoch_end")
    trainer = tiny_trainer(str(tmp_path), [grads, cam], max_epochs=1)
    model, val = _Evaluated(), tiny_loaders(n=12)[1]
    with caplog.at_level("INFO"):
        trainer.test(model, val)
        assert len(trainer.predict(model, val)) == 2
        assert cam.probes is None and grads.probes is None  # nothing picked either
        trainer.validate(model, val)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-viz:")]
    assert lines[:2] == [
        f"lightning-viz: the 2 visualization callback(s) do not run under trainer.{fn} (they run in fit, and under "
        "trainer.validate when run_on='validation_epoch_end')."
        for fn in ("test", "predict")
    ]
    assert lines[2].startswith("lightning-viz: 1 visualization callback(s) under trainer.validate: cam; writing to")
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-cam/panel/p000") == [0]
    tags = acc.Tags()["images"] + acc.Tags()["scalars"]
    assert [t for t in tags if t.startswith("viz-") and not t.startswith("viz-cam/")] == []


def test_barebones_computes_and_writes_nothing_and_says_so_once(tmp_path, monkeypatch):
    """Trainer(barebones=True) switches logging off to time the loop: the callbacks compute, pick and write nothing,
    check nothing (loggers=['tensorboard'] is no error where Lightning removed the logger), and one
    NothingWrittenWarning says why. Was: every callback computed and wrote an image folder into the working
    directory, and loggers=['tensorboard'] failed at setup."""
    from lightning_viz.logging import NothingWrittenWarning

    monkeypatch.chdir(tmp_path)
    cbs = [GradientCallback(num_probes=2), CAMCallback(num_probes=2, loggers=["tensorboard"]), FilterCallback()]
    trainer = L.Trainer(max_epochs=1, barebones=True, callbacks=cbs, accelerator="cpu", default_root_dir=str(tmp_path))
    with pytest.warns(NothingWrittenWarning) as record:
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    ours = [str(w.message) for w in record if w.category is NothingWrittenWarning]
    assert len(ours) == 1 and ours[0].startswith("lightning-viz: Trainer(barebones=True) switches logging off")
    assert "the 3 visualization callback(s) compute and write nothing" in ours[0]
    assert trainer.global_step == 2
    assert all(cb.probes is None and cb.last_logged_tags == [] for cb in cbs)
    assert [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs] == []


class _FreshEachEpoch(L.LightningDataModule):
    """New datasets at every dataloader call (``reload_dataloaders_every_n_epochs=1``) and two validation sets:
    the first new at every call, the second made of images of 1000 (told apart at a glance)."""

    def __init__(self):
        super().__init__()
        self.val_sets: list = []

    def train_dataloader(self):
        return DataLoader(tiny_dataset(12, seed=len(self.val_sets)), batch_size=8)

    def val_dataloader(self):
        self.val_sets.append(tiny_dataset(12, seed=100 + len(self.val_sets)))
        x, y = tiny_dataset(6).tensors
        return [DataLoader(self.val_sets[-1], batch_size=8), DataLoader(TensorDataset(x * 0 + 1000, y), batch_size=8)]


class _TwoValSets(LitTiny):
    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val_loss", torch.nn.functional.cross_entropy(self(batch[0]), batch[1]))


def test_several_val_sets_reloaded_every_epoch_keep_the_first_sets_probes(tmp_path):
    """A list of validation dataloaders: the probes come from the first one (val_dataloaders[0]), and a
    run_on="validation_epoch_end" callback runs once per epoch (not once per dataloader_idx). Dataloaders
    reloaded every epoch (reload_dataloaders_every_n_epochs=1, new data each time) do not change the probes:
    they stay the ones picked before training, so the frames of every epoch show the same images."""
    from lightning_viz.probe import ProbeSet

    seen = []

    class Recorder(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            seen.append(cam.probes.images.clone())

    cam = CAMCallback(num_probes=3, run_on="validation_epoch_end", tracker=MapTracker())
    dm = _FreshEachEpoch()
    kw = {"reload_dataloaders_every_n_epochs": 1, "num_sanity_val_steps": 0}
    tiny_trainer(str(tmp_path), [cam, Recorder()], max_epochs=2, **kw).fit(_TwoValSets(), datamodule=dm)
    assert len(dm.val_sets) >= 2 and not torch.equal(dm.val_sets[0].tensors[0], dm.val_sets[-1].tensors[0])
    picks = [ProbeSet.from_dataset(v, num=3, seed=0).images for v in dm.val_sets]  # the first set, as made then
    assert any(torch.equal(seen[0], p) for p in picks) and (seen[0].abs() < 100).all()
    assert len(seen) == 2 and torch.equal(seen[1], seen[0])
    assert cam.tracker.epochs == {"gradcam/net.conv2": [0, 1]}
    assert image_steps(read_events(str(tmp_path)), "viz-cam/filmstrip/p000") == [0, 1]


def test_callbacks_reused_by_a_fresh_trainer_for_validate_start_over(tmp_path):
    """Callbacks that ran in a fit, given to a fresh Trainer for trainer.validate (a notebook: fit, then validate
    with a new Trainer), start over as a fresh fit does: that validation (step 0 of the new Trainer) is the first
    frame of its filmstrip. Was: the fit's history went on, a filmstrip of epochs 0, 1, 0 and a drift against it."""
    cam = CAMCallback(num_probes=2, run_on="validation_epoch_end", tracker=MapTracker())
    model, (train, val) = LitTiny(), tiny_loaders(n=12)
    tiny_trainer(str(tmp_path / "a"), [cam], max_epochs=2).fit(model, train, val)
    assert cam.tracker.epochs == {"gradcam/net.conv2": [0, 1]}
    tiny_trainer(str(tmp_path / "b"), [cam], max_epochs=2).validate(model, val)
    assert cam.tracker.epochs == {"gradcam/net.conv2": [0]}
    acc = read_events(str(tmp_path / "b"))
    assert image_steps(acc, "viz-cam/filmstrip/p000") == [0]
    assert "viz-cam/gradcam/net.conv2/drift/rank_corr" not in acc.Tags()["scalars"]


def test_a_second_fit_on_the_same_trainer_goes_on(tmp_path):
    """fit, raise max_epochs, fit again on the same Trainer (a notebook training on): the second fit goes on from
    epoch 1 with the same probes and history, so the filmstrip has epochs 0 and 1 and drift is measured at 1."""
    cam = CAMCallback(num_probes=2, tracker=MapTracker())
    model, (train, val) = LitTiny(), tiny_loaders(n=12)
    trainer = tiny_trainer(str(tmp_path), [cam], max_epochs=1)
    trainer.fit(model, train, val)
    probes = cam.probes
    trainer.fit_loop.max_epochs = 2
    trainer.fit(model, train, val)
    assert trainer.current_epoch == 2 and cam.probes is probes
    assert cam.tracker.epochs == {"gradcam/net.conv2": [0, 1]}
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-cam/filmstrip/p000") == [0, 1]
    assert scalar_steps(acc, "viz-cam/gradcam/net.conv2/drift/rank_corr") == [1]


@pytest.mark.parametrize("run_on", ["train_epoch_end", "validation_epoch_end"])
def test_max_steps_ending_mid_epoch_visualizes_the_cut_epoch(tmp_path, run_on):
    """Trainer(max_steps=3, max_epochs=-1) with 2 steps per epoch ends in epoch 1 after its first step: that last,
    cut epoch is visualized once, at its step, on the final weights (with run_on="validation_epoch_end" at
    on_train_end, as no validation runs in the cut epoch)."""
    cam = CAMCallback(num_probes=2, run_on=run_on, tracker=MapTracker())
    trainer = tiny_trainer(str(tmp_path), [cam], max_epochs=-1, max_steps=3)
    trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert trainer.global_step == 3 and cam.tracker.epochs == {"gradcam/net.conv2": [0, 1]}
    assert image_steps(read_events(str(tmp_path)), "viz-cam/filmstrip/p000") == [0, 1]


def test_steps_remembered_per_log_directory_stay_bounded_over_a_long_fit(tmp_path, caplog):
    """A callback remembers which steps it wrote to a log directory (for trainer.validate before/after a fit); it
    kept one entry per epoch forever. It keeps the steps a validate wrote and the latest one: still enough for a
    validate to go on past the fit, and for a fit over a validate's step to say so."""
    train, val = tiny_loaders(n=16)
    cb = FilterCallback(run_on="validation_epoch_end")
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=8, num_sanity_val_steps=0)
    model = LitTiny()
    trainer.validate(model, val, verbose=False)  # step 0
    with caplog.at_level("INFO"):
        trainer.fit(model, train, val)
        trainer.validate(model, val, verbose=False)
    assert "writes step 0, which a trainer.validate before this fit already wrote" in caplog.text
    [written] = cb._written.values()
    assert written == {0: True, 8: True}  # was one entry per epoch
    assert image_steps(read_events(str(tmp_path)), "viz-filters/net.conv1/grid") == [0, *range(9)]


def test_steps_remembered_per_log_directory_go_with_the_last_trainer_writing_there(tmp_path):
    """The steps written per log directory and state key were kept in a module-level dict for the whole process (a
    sweep of many fits: one entry per run and callback, never freed). Now a directory's entries go once no Trainer
    that wrote there is left; while one is, a validate after its fit goes on past the fit's steps, and the same
    callback on a fresh Trainer over a directory it wrote to goes on after its own steps."""
    import gc

    from lightning_viz.callbacks import base

    def entries(path):
        return [dict(steps) for key, steps in base._steps_by_key.items() if key[0][0].startswith(str(path))]

    train, val = tiny_loaders(n=16)
    cb = FilterCallback(run_on="validation_epoch_end")
    model_a = LitTiny()
    trainer_a = tiny_trainer(str(tmp_path / "a"), [cb], max_epochs=2, num_sanity_val_steps=0)
    trainer_a.fit(model_a, train, val)
    trainer_a.validate(model_a, val, verbose=False)  # after the fit's steps 0 and 1
    trainer_b = tiny_trainer(str(tmp_path / "b"), [cb], max_epochs=1, num_sanity_val_steps=0)
    trainer_b.fit(LitTiny(), train, val)
    gc.collect()
    assert entries(tmp_path / "a") == [{2: True}] and entries(tmp_path / "b") == [{0: False}]
    del trainer_a, model_a  # (a model keeps its last Trainer)
    gc.collect()
    assert entries(tmp_path / "a") == [] and entries(tmp_path / "b") == [{0: False}]
    tiny_trainer(str(tmp_path / "a"), [cb]).validate(LitTiny(), val, verbose=False)  # a fresh Trainer: step 3
    assert image_steps(read_events(str(tmp_path / "a")), "viz-filters/net.conv1/grid") == [0, 1, 2, 3]
    del trainer_b, cb  # (a callback keeps its last model)
    gc.collect()
    assert entries(tmp_path) == []


class _SeenWeights(FilterCallback):
    """Records the head weights each run sees (the README's weight-averaging paragraph states which)."""

    def compute(self, pl_module, probe):
        self.seen = [*getattr(self, "seen", []), pl_module.net.fc.weight.detach().clone()]
        return super().compute(pl_module, probe)


def test_weight_averaging_which_weights_are_shown(tmp_path):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    def fit(run_on=None, before=True):
        L.seed_everything(0, verbose=False)
        model, ema = LitTiny(), EMAWeightAveraging(decay=0.5)
        viz = [] if run_on is None else [_SeenWeights(layers="net.conv1", run_on=run_on)]
        live = []
        probe = L.Callback()
        probe.on_train_epoch_end = lambda trainer, m: live.append(m.net.fc.weight.detach().clone())
        callbacks = (viz + [ema] if before else [ema] + viz) + [probe]
        tiny_trainer(str(tmp_path / f"{run_on}{before}"), callbacks, max_epochs=2).fit(model, *tiny_loaders(n=16))
        return model, (viz[0].seen if viz else None), live

    bare, _, live = fit()
    for run_on, before, shows_live in [
        ("train_epoch_end", True, True),
        ("validation_epoch_end", True, False),
        ("validation_epoch_end", False, True),
    ]:
        model, seen, _ = fit(run_on, before)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), bare.state_dict().values()))
        assert [torch.equal(s, w) for s, w in zip(seen, live)] == [shows_live] * 2, (run_on, before)
    assert not torch.equal(seen[-1], bare.net.fc.weight)  # the average, copied in at the end of the fit


class _UserEMA(L.Callback):
    """A user's EMA (decay 0.5, updated every step), swapped into the model through ``p.data`` at the train epoch end
    (for the checkpoint saved there) and swapped back at the next epoch start."""

    def __init__(self):
        self.ema, self.live = None, None

    def on_train_batch_end(self, trainer, pl_module, *args):
        ps = [p.detach() for p in pl_module.parameters()]
        self.ema = [p.clone() for p in ps] if self.ema is None else [0.5 * e + 0.5 * p for e, p in zip(self.ema, ps)]

    def on_train_epoch_end(self, trainer, pl_module):
        self.live = [p.detach().clone() for p in pl_module.parameters()]
        for p, e in zip(pl_module.parameters(), self.ema):
            p.data.copy_(e)

    def on_train_epoch_start(self, trainer, pl_module):
        for p, w in zip(pl_module.parameters(), self.live or []):
            p.data.copy_(w)


def test_a_users_weight_swap_at_the_epoch_end_which_weights_are_shown(tmp_path):
    """A user's callback swapping averaged weights in at ``on_train_epoch_end``: the callbacks show the weights the
    model holds when their hook runs (the README's weight-averaging paragraph): listed after it the averaged ones,
    before it the live ones. Training stays bit-identical either way."""

    def fit(order):
        L.seed_everything(0, verbose=False)
        model, ema = LitTiny(), _UserEMA()
        seen = _SeenWeights(layers="net.conv1")
        viz = {"before": [seen, GradientCallback(num_probes=2)], "after": [CAMCallback(num_probes=2), seen]}
        cbs = [] if order is None else viz[order]
        callbacks = [ema, *cbs] if order == "after" else [*cbs, ema]
        tiny_trainer(str(tmp_path / str(order)), callbacks, max_epochs=2).fit(model, *tiny_loaders(n=16))
        return model, getattr(seen, "seen", None), ema

    bare, _, _ = fit(None)
    for order in ("before", "after"):
        model, seen, ema = fit(order)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), bare.state_dict().values()))
        shown = ema.ema[-2] if order == "after" else ema.live[-2]  # the fc weight of the last epoch
        assert torch.equal(seen[-1], shown) and not torch.equal(ema.ema[-2], ema.live[-2])


class _EvalOnAverage(LitTiny):
    """Keeps an EMA copy of its network (torch's AveragedModel, ``self.ema.module``) and evaluates with it."""

    def __init__(self):
        super().__init__()
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        self.ema = AveragedModel(self.net, multi_avg_fn=get_ema_multi_avg_fn(0.5))

    def forward(self, x):
        return self.net(x) if self.training else self.ema(x)

    def on_train_batch_end(self, *args):
        self.ema.update_parameters(self.net)


def test_a_layer_an_averaged_copy_replaces_in_eval_mode_is_named_at_setup(tmp_path):
    """A module evaluating with its AveragedModel copy: 'net.conv2' is not called by the eval-mode forward the
    callbacks run, so the setup error names the copy's layer to use instead ('ema.module.conv2'), which then works.
    Was: only "choose a layer the eval-mode forward calls"."""
    cam = CAMCallback(layers="net.conv2", num_probes=2)
    with pytest.raises(ValueError, match=r"'net.conv2' produced no output.*'ema.module.conv2'"):
        tiny_trainer(str(tmp_path), [cam], max_epochs=1).fit(_EvalOnAverage(), *tiny_loaders(n=8))
    cam = CAMCallback(layers="ema.module.conv2", num_probes=2)
    tiny_trainer(str(tmp_path / "ema"), [cam], max_epochs=1).fit(_EvalOnAverage(), *tiny_loaders(n=8))
    assert "viz-cam/panel/p000" in cam.last_logged_tags


def test_a_pass_shared_across_a_weight_averaging_swap_is_not_reused(tmp_path):
    """A CAMCallback at the validation end listed before EMAWeightAveraging computes its gradient pass on the
    averaged weights, which the averaging callback then swaps out through ``p.data`` (no autograd version bump): a
    GradientCallback at the train epoch end must compute its own pass on the live weights. Was: it reused the CAM's
    pass and logged the averaged model's saliency."""
    from lightning.pytorch.callbacks import EMAWeightAveraging

    def saliency(with_cam):
        L.seed_everything(0, verbose=False)
        grads = GradientCallback(num_probes=2)
        cam = [CAMCallback(num_probes=2, run_on="validation_epoch_end")] if with_cam else []
        logdir = str(tmp_path / f"cam{with_cam}")
        tiny_trainer(logdir, [*cam, EMAWeightAveraging(decay=0.5), grads]).fit(LitTiny(), *tiny_loaders(n=16))
        acc = read_events(logdir)
        return [e.value for e in acc.Scalars("viz-gradients/saliency/input/stats/mean_abs")]

    alone = saliency(False)
    assert len(alone) == 2 and saliency(True) == alone


def test_time_spent_visualizing_does_not_bring_a_time_based_validation_forward(tmp_path, monkeypatch):
    """With validation by time (val_check_interval as a timedelta) the seconds a callback spends at a train epoch end
    (or before training) are not training time: Lightning's clock is paused for them, so attaching it does not add
    validations (nor move ModelCheckpoint/EarlyStopping decisions). Was: a run longer than the interval brought a
    validation at the next batch after every run. A fake clock (real time plus jumps) keeps the test free of timing."""
    import time
    from datetime import timedelta

    real, jump = time.monotonic, [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: real() + jump[0])

    class Slow(CAMCallback):
        def compute(self, pl_module, probe):
            jump[0] += 100.0  # a run taking 100 s, twice the interval
            return super().compute(pl_module, probe)

    class Count(L.Callback):
        def __init__(self):
            self.steps: list[int] = []

        def on_validation_epoch_end(self, trainer, pl_module):
            self.steps.append(trainer.global_step)

    count = Count()
    cbs = [Slow(num_probes=2, run_at_start=True), count]
    kw = {"val_check_interval": timedelta(seconds=50), "num_sanity_val_steps": 0}
    tiny_trainer(str(tmp_path), cbs, max_epochs=3, **kw).fit(LitTiny(), *tiny_loaders(n=16))
    assert count.steps == []  # no validation falls due within the (real) seconds of training
    assert scalar_steps(read_events(str(tmp_path)), "viz-cam/time_s") == [-1, 0, 1, 2]


def test_an_endless_stream_without_epochs_is_said_to_be_visualized_once(tmp_path):
    """An IterableDataset that never ends (no length, max_epochs=-1 by max_steps) has one epoch that never ends: the
    callbacks run once, at the end of training, however often it validates. One warning says so and how to get
    epochs (limit_train_batches=N), which then give one run per N batches. Was: a silent single visualization."""
    from torch.utils.data import IterableDataset

    from lightning_viz.callbacks.base import VisualizationWarning
    from lightning_viz.probe import ProbeSet

    class Stream(IterableDataset):
        def __iter__(self):
            ds = tiny_dataset(8)
            while True:
                yield from ds

    x, y = tiny_dataset(8).tensors
    kw = {"max_epochs": -1, "max_steps": 4, "limit_val_batches": 0}

    def fit(logdir, **more):
        cam = CAMCallback(num_probes=2, probes=ProbeSet(images=x[:2], labels=y[:2]))
        tiny_trainer(logdir, [cam], **kw, **more).fit(LitTiny(), DataLoader(Stream(), batch_size=4))
        return scalar_steps(read_events(logdir), "viz-cam/time_s")

    with pytest.warns(VisualizationWarning, match=r"no length.*visualized once.*limit_train_batches=N") as caught:
        assert fit(str(tmp_path / "endless")) == [0]
    assert sum("no length" in str(w.message) for w in caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", VisualizationWarning)
        assert fit(str(tmp_path / "epochs"), limit_train_batches=2) == [0, 1]


def test_two_callbacks_of_one_family_writing_the_same_panels_need_names(tmp_path):
    """Two CAM callbacks with other methods (distinct checkpoint keys) but no name= both wrote viz-cam/panel/<probe>,
    the tracker's filmstrips, probe accuracy and prediction flips at every step, one over the other (two images per
    step in TensorBoard, one PNG overwriting the other in the image folder). Refused at setup, naming the fix;
    layouts whose tags differ (a grid per method/layer) go on."""
    train, val = tiny_loaders(n=8)
    cbs = [CAMCallback(num_probes=2, methods=["gradcam"]), CAMCallback(num_probes=2, methods=["layercam"])]
    with pytest.raises(ValueError, match=r"both write viz-cam/\{panel/\.\.\.\}.*distinct name="):
        tiny_trainer(str(tmp_path / "a"), cbs).fit(LitTiny(), train, val)
    cbs = [CAMCallback(num_probes=2, tracker=MapTracker(filmstrip=False)), CAMCallback(num_probes=2, target=1)]
    with pytest.raises(ValueError, match=r"both write viz-cam/\{panel/\.\.\.\}"):
        tiny_trainer(str(tmp_path / "b"), cbs).fit(LitTiny(), train, val)
    cbs = [CAMCallback(num_probes=2, methods=[m], layout="grid") for m in ("gradcam", "layercam")]
    tiny_trainer(str(tmp_path / "c"), cbs, max_epochs=1).fit(LitTiny(), train, val)
    tags = read_events(str(tmp_path / "c")).Tags()["images"]
    assert {"viz-cam/gradcam/net.conv2/grid", "viz-cam/layercam/net.conv2/grid"} <= set(tags)


def test_probes_are_picked_before_training_from_a_combined_loader(tmp_path):
    """fit(model, CombinedLoader({...})): the probes are picked at setup from the first loader it combines, as from
    a plain DataLoader (data problems stop the run before the first step; under DDP the ranks' picks are compared
    there). Was: not found at setup, picked at the first epoch end, where no rank compares them."""
    from lightning.pytorch.utilities import CombinedLoader

    class Lit(LitTiny):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch["a"], batch_idx)

    class Spy(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.picked = cam.probes

    cam, spy = CAMCallback(num_probes=3), Spy()
    train, _ = tiny_loaders(n=6, batch_size=6)
    tiny_trainer(str(tmp_path), [cam, spy], max_epochs=1, limit_val_batches=0).fit(Lit(), CombinedLoader({"a": train}))
    assert spy.picked is not None and sorted(spy.picked.labels.tolist()) == [0, 1, 2]


def test_a_datamodules_val_dataloader_is_not_called_at_every_epoch(tmp_path):
    """Data without ``classes`` and no validation in the fit (``limit_val_batches=0``): the class names were looked
    up at every run, calling the datamodule's ``val_dataloader()`` (which may build a dataset) once per epoch and
    keeping every loader it returned for the whole fit."""
    from lightning_viz.callbacks import base

    calls = []

    class DM(L.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(tiny_dataset(16), batch_size=8)

        def val_dataloader(self):
            calls.append(1)
            return DataLoader(tiny_dataset(16), batch_size=8)

    cb = GradientCallback(num_probes=2)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=5, limit_val_batches=0)
    trainer.fit(LitTiny(), datamodule=DM())
    assert image_steps(read_events(str(tmp_path)), "viz-gradients/panel/p000") == [0, 1, 2, 3, 4]
    assert len(calls) <= 2  # at setup (picking the probes) and at the first run (class names): 6 before
    assert len(base._hook_loaders[trainer]) <= 1


def test_an_error_at_an_epoch_end_frees_the_shared_passes(tmp_path):
    """A fit stopped by an exception (here a later callback's, at the same epoch end) gets no teardown: the shared
    passes of the CAM callback (activations, gradients, logits of every probe) were kept as long as the model lived."""
    from lightning.pytorch.callbacks import Callback

    from lightning_viz.methods.shared_pass import pass_cache

    class Fails(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            raise RuntimeError("later callback failed")

    model = LitTiny()
    cam = CAMCallback(methods=["gradcam"], num_probes=2)
    adapter = cam.adapted(model)  # held here: the one the callback uses in the fit (it lets go of it at the end)
    with pytest.raises(RuntimeError, match="later callback failed"):
        tiny_trainer(str(tmp_path), [cam, Fails()], max_epochs=2).fit(model, *tiny_loaders(n=16))
    assert cam.last_logged_tags  # it ran (one pass), then the fit stopped
    assert pass_cache(adapter).entries == {} and cam._adapter is None


def test_validating_a_checkpoint_on_a_fresh_trainer_goes_on_after_its_epochs(tmp_path):
    """An evaluation script: a fresh Trainer and callbacks validate a fit's ``last.ckpt`` (``ckpt_path=``). The
    checkpoint restores the callbacks' filmstrips and drift history, so the validation logs after its epochs (step 2
    after a 2-epoch fit, as trainer.validate after that fit does). Was: at step 0, a filmstrip of epochs 0, 1, 0,
    and on the fit's log directory a second step 0."""
    train, val = tiny_loaders(n=12)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)

    def cam():
        return CAMCallback(num_probes=2, run_on="validation_epoch_end", tracker=MapTracker())

    tiny_trainer(str(tmp_path), [cam(), ckpt], max_epochs=2, enable_checkpointing=True).fit(LitTiny(), train, val)
    for logdir in (str(tmp_path), str(tmp_path / "eval")):  # the fit's log directory, a new one
        fresh = cam()
        tiny_trainer(logdir, [fresh]).validate(LitTiny(), val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
        assert fresh.tracker.epochs == {"gradcam/net.conv2": [0, 1, 2]}
    assert image_steps(read_events(str(tmp_path / "version_0")), "viz-cam/filmstrip/p000") == [0, 1, 2]
    acc = read_events(str(tmp_path / "eval"))
    assert image_steps(acc, "viz-cam/filmstrip/p000") == [2]
    assert scalar_steps(acc, "viz-cam/gradcam/net.conv2/drift/rank_corr") == [2]


@pytest.mark.parametrize("entry", ["test", "validate"])
def test_a_checkpoint_evaluated_where_a_callback_does_not_run_leaves_it_fresh(tmp_path, entry):
    """Callbacks that do not run under an entry point (trainer.test; trainer.validate for run_on='train_epoch_end')
    take nothing from its ``ckpt_path``: a later fresh fit with them starts its own history. Was: the checkpoint's
    filmstrip frames, previous maps and filters stayed, so the new fit's filmstrip read epochs 0, 1, 0 and it logged
    drift and rel_change at epoch 0 against another run's model."""
    train, val = tiny_loaders(n=12)

    def callbacks():
        return [CAMCallback(num_probes=2, tracker=MapTracker()), FilterCallback()]

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    trainer = tiny_trainer(str(tmp_path / "fit"), [*callbacks(), ckpt], enable_checkpointing=True)
    trainer.fit(_Evaluated(), train, val)
    cam, filters = reused = callbacks()
    evaluation = tiny_trainer(str(tmp_path / "eval"), reused)
    getattr(evaluation, entry)(_Evaluated(), val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert cam.probes is None and cam.tracker.epochs == {} and filters.previous is None
    tiny_trainer(str(tmp_path / "new"), reused, max_epochs=1).fit(_Evaluated(), train, val)
    assert cam.tracker.epochs == {"gradcam/net.conv2": [0]}
    acc = read_events(str(tmp_path / "new"))
    assert image_steps(acc, "viz-cam/filmstrip/p000") == [0]
    tags = acc.Tags()["scalars"]
    assert "viz-filters/net.conv1/mean_norm" in tags
    assert not [t for t in tags if "drift" in t or "rel_change" in t]


class _OwnCallbacks(LitTiny):
    """A module that brings its callbacks: Lightning calls configure_callbacks at every entry point (new instances)."""

    def configure_callbacks(self):
        return [CAMCallback(num_probes=2, run_on="validation_epoch_end")]


def test_callbacks_made_anew_for_each_validate_still_get_their_own_step(tmp_path):
    """LightningModule.configure_callbacks gives fresh callbacks to each trainer.validate after the fit: each
    validation still logs at its own step (1, then 2), as the fit's own callbacks do. Was: both at step 1."""
    model, (train, val) = _OwnCallbacks(), tiny_loaders(n=12)
    trainer = tiny_trainer(str(tmp_path), max_epochs=1)
    trainer.fit(model, train, val)
    trainer.validate(model, val, verbose=False)
    trainer.validate(model, val, verbose=False)
    assert image_steps(read_events(str(tmp_path)), "viz-cam/panel/p000") == [0, 1, 2]


def test_resuming_with_other_options_says_the_history_starts_afresh(tmp_path):
    """A resumed fit whose callback has other options than the checkpointed one (num_probes 2 -> 3: another
    checkpoint key) cannot take its state: one warning names the callback and what changed. Was: only Lightning's
    generic "callbacks used to create the checkpoint need to be provided", and filmstrips silently restarted."""
    train, val = tiny_loaders(n=12)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    first = [CAMCallback(num_probes=2, tracker=MapTracker()), GradientCallback(num_probes=2, name="g"), ckpt]
    tiny_trainer(str(tmp_path), first, max_epochs=1, enable_checkpointing=True).fit(LitTiny(), train, val)
    cam, same = CAMCallback(num_probes=3, tracker=MapTracker()), GradientCallback(num_probes=2, name="g")
    with pytest.warns(VisualizationWarning) as record:
        tiny_trainer(str(tmp_path), [cam, same], max_epochs=2).fit(
            LitTiny(), train, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
        )
    said = [str(w.message) for w in record if "saved with other options" in str(w.message)]
    assert len(said) == 1 and said[0].startswith("CAMCallback (cam): the checkpoint holds the state of a CAMCallback")
    assert "(2 -> 3;" in said[0]
    assert cam.tracker.epochs == {"gradcam/net.conv2": [1]} and same.probes is not None


class _BrokenStep(LitTiny):
    def training_step(self, batch, batch_idx):
        raise RuntimeError("a bug in training_step")


def test_callbacks_of_a_fit_that_failed_before_visualizing_start_over_on_new_data(tmp_path):
    """A fit that fails in its first epoch (before any visualization), then a new Trainer on other data with the same
    callbacks (a notebook: fix the bug, change the data, run again): the probes come from the new data. Was: the
    probes picked at the failed fit's start, 8 px images of the old data shown for a model trained on 16 px ones."""
    cam = CAMCallback(num_probes=2, tracker=MapTracker())
    with pytest.raises(RuntimeError, match="a bug in training_step"):
        tiny_trainer(str(tmp_path / "a"), [cam], max_epochs=1).fit(_BrokenStep(), *tiny_loaders(n=12, size=8))
    assert cam.probes is not None and cam.probes.images.shape[-1] == 8
    train, val = tiny_loaders(n=12, size=16, seed=1)
    tiny_trainer(str(tmp_path / "b"), [cam], max_epochs=1).fit(LitTiny(), train, val)
    assert cam.probes.images.shape[-2:] == (16, 16)
    assert torch.equal(cam.probes.images, val.dataset.tensors[0][cam.probes.indices])
    assert image_steps(read_events(str(tmp_path / "b")), "viz-cam/filmstrip/p000") == [0]


class _UnlabeledLater(LitTiny):
    """Builds its data (images only, no labels) in ``on_fit_start``, after the callbacks' setup: probes are picked at
    the first run."""

    data = None

    def on_fit_start(self):
        self.data = TensorDataset(tiny_dataset(16).tensors[0])

    def train_dataloader(self):
        if self.data is None:
            raise RuntimeError("the data is built in on_fit_start")
        return DataLoader(self.data, batch_size=4)

    def training_step(self, batch, batch_idx):
        return super().training_step((batch[0], torch.zeros(len(batch[0]), dtype=torch.long)), batch_idx)


def test_probes_failing_their_check_at_a_run_are_checked_again_at_the_next(tmp_path):
    """Probes picked at a run that fail their check (no labels for target='label'): with on_error='warn' the next run
    picks and checks them again, giving the same clear message. Was: the failed pick was kept and the next run
    computed on it unchecked ("target='label' needs labels; the probe set has none")."""
    from lightning_viz.callbacks.base import VisualizationWarning

    cb = GradientCallback(num_probes=2, target="label", on_error="warn", loggers=["folder"])
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        default_root_dir=str(tmp_path),
        callbacks=[cb],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", VisualizationWarning)
        trainer.fit(_UnlabeledLater(TinyCNN(width=4)))
    warned = [str(w.message) for w in caught if issubclass(w.category, VisualizationWarning)]
    assert len(warned) == 2, warned
    assert all(w.startswith("GradientCallback: target='label' needs a class label per image") for w in warned)
    assert cb.probes is None


@pytest.mark.parametrize("interval,val_end_steps", [(5, [0, 1]), (10, [1]), (20, [1])])
def test_validation_by_global_step_visualizes_each_epoch_once(tmp_path, interval, val_end_steps):
    """``check_val_every_n_epoch=None`` with an int ``val_check_interval`` validates every ``interval`` steps across
    epoch ends (8 steps an epoch): 5 validates at steps 5 (epoch 0), 10 and 15 (epoch 1); 10 only in epoch 1; 20
    never. A ``validation_epoch_end`` callback runs once in each epoch that validates (not in one that does not),
    a fit that never validates gets its catch-up at the end; ``train_epoch_end`` runs every epoch."""
    cbs = [
        CAMCallback(num_probes=2, tracker=MapTracker(), name="t"),
        CAMCallback(num_probes=2, tracker=MapTracker(), run_on="validation_epoch_end", name="v"),
    ]
    trainer = tiny_trainer(str(tmp_path), cbs, val_check_interval=interval, check_val_every_n_epoch=None)
    trainer.fit(LitTiny(), *tiny_loaders(n=32, batch_size=4))
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-cam/t/filmstrip/p000") == [0, 1]
    assert image_steps(acc, "viz-cam/v/filmstrip/p000") == val_end_steps
    assert cbs[1].tracker.epochs == {"gradcam/net.conv2": val_end_steps}
