"""Foundation guarantees, checked through real ``Trainer.fit`` / ``Trainer.validate`` runs:
training is untouched (bitwise), tags land at the expected epochs, failures are clean, probes survive resume.

``CALLBACK_FACTORIES`` lists one small instance of every callback family; the data-driven tests
(bitwise weights, nothing touched during a run) cover every entry. Append new families there.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from helpers import (
    InputGradMap,
    LitTiny,
    TinyCNN,
    assert_untouched,
    image_steps,
    read_events,
    scalar_steps,
    snapshot,
    tiny_dataset,
    tiny_loaders,
    tiny_trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

from lightning_viz.callbacks.activations import ActivationCallback
from lightning_viz.callbacks.base import VisualizationError
from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.embeddings import EmbeddingCallback
from lightning_viz.callbacks.filters import FilterCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.callbacks.maps import MapCallback
from lightning_viz.callbacks.occlusion import OcclusionCallback
from lightning_viz.callbacks.patches import TopPatchesCallback
from lightning_viz.callbacks.synthesis import AdversarialCallback, ClassModelCallback, InversionCallback, UnitCallback
from lightning_viz.capture import capture, isolated
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.tracking import MapTracker

# One small instance per callback family; each factory takes the schedule kwargs of the base class.
CALLBACK_FACTORIES = [
    ("filters", lambda **kw: FilterCallback(**kw)),
    ("activations", lambda **kw: ActivationCallback(num_probes=3, **kw)),
    ("inputgrad", lambda **kw: InputGradMap(num_probes=3, **kw)),
    (
        "gradients",
        lambda **kw: GradientCallback(
            methods=["saliency", "guided_backprop", "integrated_gradients", "smoothgrad_saliency"],
            ig_steps=3,
            smoothgrad_samples=2,
            num_probes=3,
            **kw,
        ),
    ),
    (
        "cam",
        lambda **kw: CAMCallback(
            methods=["cam", "gradcam", "gradcam++", "scorecam", "guided_gradcam"],
            num_probes=3,
            tracker=MapTracker(faithfulness=True, deletion_steps=3, sanity_check=True),
            **kw,
        ),
    ),
    ("occlusion", lambda **kw: OcclusionCallback(window=4, stride=4, num_probes=3, **kw)),
    ("patches", lambda **kw: TopPatchesCallback(layers=["net.conv2"], num_units=2, k=2, num_probes=6, **kw)),
    ("embeddings", lambda **kw: EmbeddingCallback(num_probes=9, projection=["pca", "tsne"], **kw)),
    ("class_model", lambda **kw: ClassModelCallback(steps=3, jitter=1, **kw)),
    ("units", lambda **kw: UnitCallback(layers="net.conv2", channels=[0, 1], steps=3, jitter=1, **kw)),
    ("inversion", lambda **kw: InversionCallback(layers="net.conv1", steps=3, num_probes=2, **kw)),
    ("adversarial", lambda **kw: AdversarialCallback(steps=2, num_probes=3, **kw)),
]
FACTORY_IDS = [name for name, _ in CALLBACK_FACTORIES]


def all_callbacks(**kw):
    return [make(**kw) for _, make in CALLBACK_FACTORIES]


def fit_weights(tmp_path, callbacks, epochs=2):
    L.seed_everything(0, verbose=False)
    model = LitTiny()
    # Shuffled: the sampler draws from the global RNG each epoch, so a callback consuming it changes the weights.
    train, val = DataLoader(tiny_dataset(24), batch_size=8, shuffle=True), tiny_loaders(n=12)[1]
    trainer = tiny_trainer(str(tmp_path), callbacks, max_epochs=epochs, deterministic=True)
    trainer.fit(model, train, val)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_training_bitwise_identical_with_all_callbacks(tmp_path):
    plain = fit_weights(tmp_path / "plain", [])
    viz = fit_weights(tmp_path / "viz", all_callbacks())
    assert plain.keys() == viz.keys()
    for k in plain:
        assert torch.equal(plain[k], viz[k]), f"{k} differs when visualization callbacks are attached"
    # The callbacks really ran (otherwise this test could not fail).
    acc = read_events(str(tmp_path / "viz"))
    assert image_steps(acc, "viz-filters/net.conv1/grid") == [0, 1]


class Planter(Callback):
    """Before the viz callbacks at each hook: plant .grad values, freeze one param, put bn1 in eval; snapshot."""

    def __init__(self, hook):
        self.hook = hook
        self.before = None

    def _plant(self, pl_module):
        g = torch.Generator().manual_seed(1)
        for p in pl_module.parameters():
            p.grad = torch.randn(p.shape, generator=g)
        pl_module.net.conv1.bias.requires_grad_(False)
        pl_module.net.bn1.eval()  # a submodule deliberately in another mode than its parent
        self.before = snapshot(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        if self.hook == "train":
            self._plant(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.hook == "val" and not trainer.sanity_checking:
            self._plant(pl_module)


class Checker(Callback):
    """After the viz callbacks: everything the planter snapshot must be bit-identical; then undo the planting."""

    def __init__(self, planter):
        self.planter = planter
        self.checks = 0

    def _check(self, pl_module):
        assert_untouched(self.planter.before, snapshot(pl_module))
        self.checks += 1
        pl_module.net.conv1.bias.requires_grad_(True)
        pl_module.net.bn1.train()
        for p in pl_module.parameters():
            p.grad = None

    def on_train_epoch_end(self, trainer, pl_module):
        if self.planter.hook == "train":
            self._check(pl_module)

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.planter.hook == "val" and not trainer.sanity_checking:
            self._check(pl_module)


@pytest.mark.parametrize("name,make", CALLBACK_FACTORIES, ids=FACTORY_IDS)
def test_callback_leaves_model_untouched(tmp_path, name, make):
    """.grad bit-identical, requires_grad/modes/hooks/BN stats/params/global RNG unchanged by a real run."""
    planter = Planter("train")
    checker = Checker(planter)
    cb = make()
    trainer = tiny_trainer(str(tmp_path), [planter, cb, checker], max_epochs=1, limit_val_batches=1)
    trainer.fit(LitTiny(), *tiny_loaders(n=16))
    assert checker.checks == 1
    assert cb.last_logged_tags, f"{name} logged nothing"


def test_validate_inference_mode_path(tmp_path):
    """trainer.validate runs under inference_mode: gradient-based maps must still work, model untouched."""
    cbs = all_callbacks(run_on="validation_epoch_end")
    planter = Planter("val")
    checker = Checker(planter)
    trainer = tiny_trainer(str(tmp_path), [planter, *cbs, checker])
    trainer.validate(LitTiny(), tiny_loaders(n=12)[1], verbose=False)
    assert checker.checks == 1
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-inputgrad/panel/p000") == [0]
    grad_map = acc.Scalars("viz-inputgrad/inputgrad/input/stats/max_abs")[0].value
    assert grad_map > 0  # real gradients flowed under inference mode
    assert image_steps(acc, "viz-activations/net.conv2/p002") == [0]
    assert image_steps(acc, "viz-filters/net.conv1/grid") == [0]


def test_tags_at_expected_steps_and_not_in_sanity_check(tmp_path):
    cbs = [
        FilterCallback(every_n_epochs=2),
        InputGradMap(num_probes=2, every_n_epochs=2, run_on="validation_epoch_end"),
        ActivationCallback(num_probes=2, layers=["net.conv1"], run_on="validation_epoch_end"),
    ]
    trainer = tiny_trainer(str(tmp_path), cbs, max_epochs=3, num_sanity_val_steps=2)
    trainer.fit(LitTiny(), *tiny_loaders(n=12))
    acc = read_events(str(tmp_path))
    # every_n_epochs=2 (Lightning's convention): epochs 1, 3, ... and always the last epoch (2)
    assert image_steps(acc, "viz-filters/net.conv1/grid") == [1, 2]
    assert scalar_steps(acc, "viz-filters/time_s") == [1, 2]
    assert scalar_steps(acc, "viz-filters/net.conv1/rel_change") == [2]  # needs a previous logged epoch
    # validation_epoch_end: the sanity check (also epoch 0) must not add a second step-0 event.
    assert image_steps(acc, "viz-inputgrad/panel/p001") == [1, 2]
    assert scalar_steps(acc, "viz-inputgrad/time_s") == [1, 2]
    assert image_steps(acc, "viz-activations/net.conv1/p000") == [0, 1, 2]
    assert scalar_steps(acc, "viz-activations/net.conv1/dead_fraction") == [0, 1, 2]
    assert all(e.value >= 0 for e in acc.Scalars("viz-activations/time_s"))
    assert "viz-activations/net.conv1/p002" not in acc.Tags()["images"]  # only 2 probes


class FailingMap(MapCallback):
    """Works at epoch 0; at epoch 1 raises inside capture() with a forward hook registered."""

    method = "failing"

    def compute_maps(self, pl_module, probe):
        x = probe.to(pl_module.device)
        with capture(pl_module, ["net.conv1", "net.relu"]):
            pl_module(x)
            if pl_module.current_epoch == 1:
                raise RuntimeError("boom at epoch 1")
        return {"failing/input": x.abs().sum(dim=1)}


class ModeRecorder(Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        pl_module.net.bn1.eval()
        self.modes = {n: m.training for n, m in pl_module.named_modules()}


def test_error_is_clean_and_keeps_earlier_images(tmp_path):
    recorder = ModeRecorder()
    model = LitTiny()
    trainer = tiny_trainer(str(tmp_path), [recorder, FailingMap(num_probes=2)], max_epochs=3)
    with pytest.raises(VisualizationError, match=r"failing.*RuntimeError: boom at epoch 1"):
        trainer.fit(model, *tiny_loaders(n=12))
    assert trainer.current_epoch == 1
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name!r}"
    assert {n: m.training for n, m in model.named_modules()} == recorder.modes
    assert all(p.requires_grad for p in model.parameters())
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-failing/panel/p000") == [0]  # logged before the failure, not lost
    assert image_steps(acc, "viz-failing/panel/p001") == [0]


def test_bad_layer_fails_at_setup_listing_valid_names(tmp_path):
    model = LitTiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = tiny_trainer(str(tmp_path), [ActivationCallback(layers=["net.conv1", "net.nope"])])
    with pytest.raises(LayerNotFoundError) as err:
        trainer.fit(model, *tiny_loaders(n=12))
    msg = str(err.value)
    assert "'net.nope'" in msg and "'net.conv1'" in msg and "'net.conv2'" in msg and "'net.fc'" in msg
    assert trainer.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    trainer = tiny_trainer(str(tmp_path), [FilterCallback(layers="net.fc")])
    with pytest.raises(LayerNotFoundError, match=r"'net.fc' is a Linear.*'net.conv1'"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert trainer.global_step == 0


def test_resume_keeps_probe_set(tmp_path, monkeypatch):
    ckpt_dir = tmp_path / "ckpt"
    cb = ActivationCallback(num_probes=4, probe_seed=5, layers=["net.conv1"])
    trainer = tiny_trainer(
        str(tmp_path / "a"),
        [cb, ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
        max_epochs=1,
        enable_checkpointing=True,
    )
    trainer.fit(LitTiny(), *tiny_loaders(n=24))
    first = cb.probes
    assert first is not None and len(first) == 4

    # Resume on *different* data: re-picking would give other images; the checkpoint's probes must win.
    resumed = ActivationCallback(num_probes=4, probe_seed=5, layers=["net.conv1"])
    picks = []
    original = ActivationCallback._pick_probes
    monkeypatch.setattr(ActivationCallback, "_pick_probes", lambda self, t: picks.append(1) or original(self, t))
    trainer2 = tiny_trainer(str(tmp_path / "b"), [resumed], max_epochs=2)
    trainer2.fit(LitTiny(), *tiny_loaders(n=24, seed=7), ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert picks == []
    assert torch.equal(resumed.probes.images, first.images)
    assert torch.equal(resumed.probes.indices, first.indices)
    assert torch.equal(resumed.probes.labels, first.labels)
    acc = read_events(str(tmp_path / "b"))
    assert image_steps(acc, "viz-activations/net.conv1/p000") == [1]


def test_torchvision_resnet18(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet18(weights=None, num_classes=3)
    cbs = [FilterCallback(), ActivationCallback(num_probes=2), InputGradMap(num_probes=2)]
    trainer = tiny_trainer(str(tmp_path), cbs, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(LitTiny(net), *tiny_loaders(n=6, batch_size=3, size=32))
    acc = read_events(str(tmp_path))
    images = acc.Tags()["images"]
    assert "viz-filters/net.conv1/grid" in images
    assert "viz-activations/net.conv1/p001" in images
    assert "viz-activations/net.layer4.1/p001" in images  # the default: the last block feeding global pooling
    assert "viz-inputgrad/panel/p001" in images
    # RGB filter grid: 64 filters of 7x7 upscaled to 28 px -> 8x8 tiles with 1 px padding, under a 2-line caption.
    img = acc.Images("viz-filters/net.conv1/grid")[0]
    assert (img.width, img.height) == (8 * 29 + 1, 2 * 16 + 8 * 29 + 1)


class InplaceNet(nn.Module):
    """conv followed directly by ReLU(inplace=True), as in VGG's ``features``."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True)
        )
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


def test_inplace_relu_model_trains_and_logs_pre_relu(tmp_path):
    model = LitTiny(InplaceNet())
    cb = ActivationCallback(num_probes=3, layers=["net.features.0"], max_channels=4)
    grad = InputGradMap(num_probes=3)
    trainer = tiny_trainer(str(tmp_path), [cb, grad], max_epochs=1)
    trainer.fit(model, *tiny_loaders(n=12))
    x = cb.probes.images
    with torch.no_grad():
        pre = model.net.features[0](x)
    # The conv's own (pre-ReLU) output is recorded, not the values the in-place ReLU overwrote.
    with isolated(model):
        recorded = cb.compute(model, cb.probes)["maps:net.features.0"]
    assert (pre < 0).any() and torch.allclose(recorded, pre, atol=1e-6)
    expected_dead = float((pre <= 0).float().mean())
    acc = read_events(str(tmp_path))
    logged = acc.Scalars("viz-activations/net.features.0/dead_fraction")[0].value
    assert 0 < expected_dead < 1
    assert logged == pytest.approx(expected_dead, abs=1e-6)
    # Gradients flow through the in-place ReLUs (capture hands a copy downstream).
    assert acc.Scalars("viz-inputgrad/inputgrad/input/stats/max_abs")[0].value > 0


class LazyLit(LitTiny):
    """Builds its network in Lightning's ``configure_model`` hook (called after every setup hook), as large or
    sharded models do: at setup the layers do not exist yet."""

    def __init__(self):
        super().__init__(net=nn.Identity())
        self.net = None

    def configure_model(self):
        if self.net is None:
            self.net = TinyCNN()


class StepCounter(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def test_models_built_in_configure_model_are_checked_once_built_and_visualized(tmp_path):
    callbacks = all_callbacks()
    trainer = tiny_trainer(str(tmp_path / "fit"), callbacks, max_epochs=1, limit_val_batches=1)
    trainer.fit(LazyLit(), *tiny_loaders(n=16))
    for (name, _), cb in zip(CALLBACK_FACTORIES, callbacks):
        assert cb.last_logged_tags, f"{name} logged nothing on a configure_model network"
    cb = CAMCallback(methods=["gradcam"], num_probes=2, run_on="validation_epoch_end")
    tiny_trainer(str(tmp_path / "validate"), [cb]).validate(LazyLit(), tiny_loaders(n=16)[1])
    assert cb.last_logged_tags
    # a wrong layer still fails before the first training step, naming the layers that exist once built
    counter = StepCounter()
    trainer = tiny_trainer(str(tmp_path / "bad"), [CAMCallback(layers=["net.nope"], num_probes=2), counter])
    with pytest.raises(LayerNotFoundError, match=r"net\.nope.*net\.conv2"):
        trainer.fit(LazyLit(), *tiny_loaders(n=16))
    assert counter.steps == 0


def test_each_validate_after_fit_gets_its_own_step(tmp_path, caplog):
    """run_on='validation_epoch_end': validating the last and then the best checkpoint after fit writes at
    steps 1 and 2 (not twice at 1); a fresh Trainer on another log directory validating the fit's last checkpoint logs
    after its epoch (step 1), on the same one goes on."""
    train, val = tiny_loaders(n=16)
    cbs = [
        CAMCallback(num_probes=2, run_on="validation_epoch_end"),
        EmbeddingCallback(num_probes=6, projection=["pca"], run_on="validation_epoch_end"),
    ]
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), monitor="val_loss", save_last=True)
    trainer = tiny_trainer(str(tmp_path), [*cbs, ckpt], max_epochs=1, enable_checkpointing=True)
    model = LitTiny()
    trainer.fit(model, train, val)
    trainer.validate(model, val, verbose=False)
    with caplog.at_level("INFO"):
        trainer.validate(model, val, ckpt_path="best", verbose=False)
    assert "CAMCallback (cam) under trainer.validate logs at step 2 (this log directory already has its step 1)" in (
        caplog.text
    )
    acc = read_events(str(tmp_path))
    tags = [t for t in acc.Tags()["images"] + acc.Tags()["scalars"] if t.startswith("viz-")]
    assert "viz-cam/panel/p000" in tags and "viz-embeddings/penultimate/pca" in tags
    for tag in tags:
        steps = image_steps(acc, tag) if tag in acc.Tags()["images"] else scalar_steps(acc, tag)
        assert steps == [0, 1, 2], tag
    assert sorted(d for d in os.listdir(trainer.logger.log_dir) if d.isdigit()) == ["00000", "00001", "00002"]

    tiny_trainer(str(tmp_path / "other"), cbs).validate(model, val, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert image_steps(read_events(str(tmp_path / "other")), "viz-cam/panel/p000") == [1]
    tiny_trainer(str(tmp_path), cbs).validate(model, val, verbose=False)  # a fresh Trainer, same log directory
    assert image_steps(read_events(str(tmp_path / "version_0")), "viz-cam/panel/p000") == [0, 1, 2, 3]


def test_validate_before_fit_then_fit_then_validate(tmp_path, caplog):
    """A validate before fit logs at step 0 (the fit's epoch 0 writes there too, and says so); validates after
    the fit each take a new step."""
    train, val = tiny_loaders(n=16)
    cb = CAMCallback(num_probes=2, run_on="validation_epoch_end")
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=2)
    model = LitTiny()
    with caplog.at_level("INFO"):
        trainer.validate(model, val, verbose=False)
        trainer.validate(model, val, verbose=False)
        assert image_steps(read_events(str(tmp_path)), "viz-cam/panel/p000") == [0, 1]
        trainer.fit(model, train, val)
        trainer.validate(model, val, verbose=False)
        trainer.validate(model, val, verbose=False)
    assert image_steps(read_events(str(tmp_path)), "viz-cam/panel/p000") == [0, 1, 0, 1, 2, 3]  # five event files
    assert caplog.text.count("which a trainer.validate before this fit already wrote to this log directory") == 2


def test_validate_before_fit_without_a_logger_says_the_folders_files_are_replaced(tmp_path, caplog):
    """With ``logger=False`` the fit's epoch 0 replaces the validate's step-0 files in the image folder (same
    names): the info line says so. Was: "TensorBoard shows both", with no TensorBoard and one file left."""
    train, val = tiny_loaders(n=16)
    cam = CAMCallback(num_probes=2, run_on="validation_epoch_end")
    trainer = tiny_trainer(str(tmp_path), [cam], max_epochs=1, logger=False, default_root_dir=str(tmp_path))
    model = LitTiny()
    with caplog.at_level("INFO"):
        trainer.validate(model, val, verbose=False)
        trainer.fit(model, train, val)
    assert "directory (the image folder's files of that step are replaced by the fit's)" in caplog.text
    assert "TensorBoard" not in caplog.text


class _CountingNet(TinyCNN):
    """A forward with Python-side state: a call counter and a warm-up flag that changes the output (as a
    schedule driven by forward calls would)."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.warm = False

    def forward(self, x):
        self.calls += 1
        self.last_batch = int(x.shape[0])  # an attribute the forward adds
        if self.calls > 20:
            self.warm = True
        out = super().forward(x)
        return out * 0.5 if self.warm else out


def test_python_attributes_a_forward_changes_are_restored(tmp_path):
    """Training is untouched also where a forward keeps Python state: the callbacks' many forwards leave the counter,
    the flag (which changes the training outputs) and the added attribute as training left them."""

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = LitTiny(_CountingNet())
        train = DataLoader(tiny_dataset(24), batch_size=8, shuffle=True)
        tiny_trainer(str(tmp_path / str(len(callbacks))), callbacks, max_epochs=3, deterministic=True).fit(
            model, train, tiny_loaders(n=12)[1]
        )
        return model

    plain, viz = fit([]), fit(all_callbacks())
    assert viz.net.calls == plain.net.calls and viz.net.warm == plain.net.warm
    assert viz.net.last_batch == plain.net.last_batch
    for k, v in plain.state_dict().items():
        assert torch.equal(v, viz.state_dict()[k]), k


class _DrawingDataModule(L.LightningDataModule):
    """Dataloader hooks that draw from every global RNG (a random subset, a numpy pick, a python shuffle: user
    code does such things) and count their calls."""

    def __init__(self):
        super().__init__()
        self.calls = {"train": 0, "val": 0}

    def _draw(self, which: str) -> None:
        import random

        import numpy as np

        self.calls[which] += 1
        torch.rand(1), np.random.rand(), random.random()

    def train_dataloader(self):
        self._draw("train")
        return DataLoader(tiny_dataset(24), batch_size=8, shuffle=True)

    def val_dataloader(self):
        self._draw("val")
        return tiny_loaders(n=12)[1]


def test_dataloader_hooks_that_draw_random_numbers_leave_training_unchanged(tmp_path):
    """The callbacks read the datamodule's dataloaders at setup to pick probes (before Lightning loads them): each
    such call runs with every global RNG forked, and the hook is called once per setup, not once per callback."""

    def fit(callbacks, name):
        L.seed_everything(0, verbose=False)
        model, dm = LitTiny(), _DrawingDataModule()
        tiny_trainer(str(tmp_path / name), callbacks, max_epochs=2, deterministic=True).fit(model, datamodule=dm)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, dm.calls

    (plain, plain_calls), (viz, viz_calls) = fit([], "plain"), fit(all_callbacks(), "viz")
    for k in plain:
        assert torch.equal(plain[k], viz[k]), f"{k} differs when visualization callbacks are attached"
    assert viz_calls["train"] == plain_calls["train"]
    assert viz_calls["val"] <= plain_calls["val"] + 1, (plain_calls, viz_calls)
    assert image_steps(read_events(str(tmp_path / "viz")), "viz-filters/net.conv1/grid") == [0, 1]


def test_fewer_items_than_num_probes_warns_once_at_setup_naming_the_callback(tmp_path):
    """A val dataset of 5 items and num_probes=16: every item is a probe, and each callback that asked for more says so
    once, at setup (before the first step), with the numbers asked and found. Was: silent (a panel grid of 5 where
    16 were asked, with no word why)."""
    import warnings

    seen_at_first_step = []

    class FirstStep(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 0:
                seen_at_first_step.append(sum("num_probes=" in str(w.message) for w in caught))

    cbs = [GradientCallback(num_probes=16), CAMCallback(num_probes=16, name="cam16"), CAMCallback(num_probes=5)]
    train, val = DataLoader(tiny_dataset(8), batch_size=4), DataLoader(tiny_dataset(5), batch_size=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny_trainer(str(tmp_path), [*cbs, FirstStep()], max_epochs=2).fit(LitTiny(), train, val)
    messages = [str(w.message) for w in caught if "num_probes=" in str(w.message)]
    assert messages == [
        "GradientCallback: num_probes=16 but the TensorDataset dataset it picks from (probe_source='val') has only 5 "
        "items: all 5 are the probes. Lower num_probes to silence this.",
        "CAMCallback 'cam16': num_probes=16 but the TensorDataset dataset it picks from (probe_source='val') has only "
        "5 items: all 5 are the probes. Lower num_probes to silence this.",
    ]
    assert seen_at_first_step == [2]  # both before the first step
    assert [len(cb.probes) for cb in cbs] == [5, 5, 5]


def _option(cb, path):
    """``cb``'s option at a dotted ``path`` of :meth:`dev_run_options` (``"tracker.deletion_steps"``)."""
    import functools

    return functools.reduce(getattr, path.split("."), cb)


def test_fast_dev_run_trains_the_same_and_runs_each_callback_once_at_a_reduced_size(tmp_path):
    """``Trainer(fast_dev_run=2)`` (Lightning: 2 batches, logging and checkpointing off) with every family attached,
    ``run_at_start=True`` too: the weights are bit for bit those of the plain fast dev run; each callback computes
    once (the epoch end; was: the baseline and the epoch end), on at most 2 probes (the embeddings: 2 per class and
    one, 7), and holds its own options again afterwards (the reduced ones were set for the run only)."""

    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        model = LitTiny()
        train, val = DataLoader(tiny_dataset(24), batch_size=8, shuffle=True), tiny_loaders(n=12)[1]
        tiny_trainer(str(tmp_path), callbacks, fast_dev_run=2, deterministic=True).fit(model, train, val)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    cbs = all_callbacks(run_at_start=True)
    computed: dict[str, list] = {name: [] for name in FACTORY_IDS}
    for name, cb in zip(FACTORY_IDS, cbs):

        def counted(pl_module, probe, _compute=cb.compute, _name=name):
            computed[_name].append(None if probe is None else len(probe))
            return _compute(pl_module, probe)

        cb.compute = counted
    options = [{path: _option(cb, path) for path in cb.dev_run_options()} for cb in cbs]
    plain, viz = fit([]), fit(cbs)
    assert all(torch.equal(plain[k], viz[k]) for k in plain)
    assert computed == {
        **{name: [2] for name in FACTORY_IDS},
        "filters": [None],
        "embeddings": [7],
        "class_model": [1],  # the input's shape
        "units": [1],
    }
    assert [{path: _option(cb, path) for path in opts} for cb, opts in zip(cbs, options)] == options
    assert options[FACTORY_IDS.index("class_model")]["steps"] == 3 and all(cb.last_logged_tags for cb in cbs)


def _one_image_at_a_time(model, x):
    """A ``logits_fn`` of a model that cannot take batches: the setup's one-item forward passes, a run fails."""
    if x.shape[0] > 1:
        raise RuntimeError("this head takes one image at a time")
    return model(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GradientCallback(methods=["saliency", "integrated_gradients"], logits_fn=_one_image_at_a_time),
        lambda: UnitCallback(layers="net.conv2", channels=[0, 1, 7], steps=3),  # a width-4 layer: at setup
    ],
    ids=["in_the_run", "at_setup"],
)
def test_a_callback_that_fails_fails_alike_under_fast_dev_run(tmp_path, make):
    """``on_error="raise"``: a failure in the run (or at setup, on an option the reduced run would not use) stops a
    fast dev run with the error a real fit stops with, word for word."""

    def failure(**kw):
        trainer = tiny_trainer(str(tmp_path), [make()], max_epochs=1, **kw)
        with pytest.raises(Exception) as info:
            trainer.fit(LitTiny(), *tiny_loaders(n=12))
        return type(info.value), str(info.value)

    real, dev = failure(), failure(fast_dev_run=True)
    assert dev == real
    assert "one image at a time" in real[1] or "channels [0, 1, 7]" in real[1], real


def test_callbacks_let_go_of_the_model_and_trainer_after_the_fit(tmp_path):
    """A callback object kept after ``trainer.fit`` (a notebook's list of callbacks, reused for the next model) held
    the fitted LightningModule through its model adapter, and through it the Trainer, until its next fit: a model per
    experiment stayed in memory. Now nothing of ours refers to them once the fit is over."""
    import gc
    import weakref

    train, val = tiny_loaders(n=16)
    cbs = [
        GradientCallback(methods=["saliency"], num_probes=2),
        CAMCallback(methods=["gradcam"], layers=["net.conv2"], num_probes=2, tracker=MapTracker(sanity_check=True)),
        ActivationCallback(layers=["net.conv1"], num_probes=2),
        ClassModelCallback(steps=2),
        UnitCallback(layers="net.conv2", channels=[0], steps=2),
        InversionCallback(layers="net.conv1", steps=2, num_probes=2),
        AdversarialCallback(steps=2, num_probes=2),
        OcclusionCallback(num_probes=2),
        TopPatchesCallback(layers=["net.conv2"], num_units=2, k=2, num_probes=8),
        EmbeddingCallback(projection="pca", num_probes=8, projector=False),
        FilterCallback(layers="net.conv1"),
    ]
    model = LitTiny()
    trainer = tiny_trainer(str(tmp_path), cbs, max_epochs=1)
    trainer.fit(model, train, val)
    assert all(cb._last_run_epoch == 0 for cb in cbs)  # every callback ran
    model_ref, trainer_ref = weakref.ref(model), weakref.ref(trainer)
    del model, trainer
    gc.collect()
    assert model_ref() is None and trainer_ref() is None
