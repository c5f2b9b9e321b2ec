"""Real-run scenarios of the training loop (bug hunt): options that a setup forward can check fail before the
first training step, not after a whole epoch. Real ``Trainer.fit`` runs on tiny models."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import LitTiny, TinyCNN, tiny_loaders, tiny_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_viz.callbacks.activations import ActivationCallback
from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.embeddings import EmbeddingCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.callbacks.occlusion import OcclusionCallback
from lightning_viz.callbacks.synthesis import ClassModelCallback
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.tracking import MapTracker


class StepCounter(Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: CAMCallback(target=7, num_probes=2), r"CAMCallback: target: class 7 is out of range.*3 classes"),
        (
            lambda: OcclusionCallback(window=20, num_probes=2),
            r"OcclusionCallback: occlusion window=20 is larger than the 8x8",
        ),
    ],
)
@pytest.mark.parametrize("on_error", ["raise", "warn"])
def test_options_a_setup_forward_can_check_fail_before_the_first_step(tmp_path, make, match, on_error):
    cb = make()
    cb.on_error = on_error  # a setup error is a configuration error: raised whatever on_error says
    counter = StepCounter()
    trainer = tiny_trainer(str(tmp_path), [counter, cb], max_epochs=1)
    with pytest.raises(ValueError, match=match):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert counter.steps == 0


def test_class_indices_within_the_model_pass_the_setup_check(tmp_path):
    cbs = [
        CAMCallback(target=2, num_probes=2, tracker=MapTracker(target=1)),
        ClassModelCallback(classes=[0, 2], steps=1),
        OcclusionCallback(window=8, target=2, num_probes=2),
    ]
    trainer = tiny_trainer(str(tmp_path), cbs, max_epochs=1)
    trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert all(cb.last_logged_tags for cb in cbs)


class BuiltInSetup(LitTiny):
    """Builds its network in ``LightningModule.setup`` (Lightning's pattern for a model that depends on the data),
    which Lightning calls after the callbacks' ``setup``."""

    def __init__(self):
        super().__init__(net=nn.Identity())
        self.net = None

    def setup(self, stage):
        if self.net is None:
            self.net = TinyCNN()


def test_models_built_in_setup_are_checked_once_built_and_visualized(tmp_path):
    cbs = [CAMCallback(num_probes=2), ActivationCallback(layers=["net.conv1"], num_probes=2)]
    trainer = tiny_trainer(str(tmp_path / "fit"), cbs, max_epochs=1)
    trainer.fit(BuiltInSetup(), *tiny_loaders(n=12))
    assert all(cb.last_logged_tags for cb in cbs)
    cb = CAMCallback(num_probes=2, run_on="validation_epoch_end")
    tiny_trainer(str(tmp_path / "validate"), [cb]).validate(BuiltInSetup(), tiny_loaders(n=12)[1])
    assert cb.last_logged_tags
    counter = StepCounter()  # a wrong layer still fails before the first step, listing the built layers
    trainer = tiny_trainer(str(tmp_path / "bad"), [CAMCallback(layers=["net.nope"], num_probes=2), counter])
    with pytest.raises(LayerNotFoundError, match=r"net\.nope.*net\.conv2"):
        trainer.fit(BuiltInSetup(), *tiny_loaders(n=12))
    assert counter.steps == 0


def test_max_epochs_zero_trains_nothing_and_refuses_no_schedule(tmp_path):
    """``max_epochs=0`` (a fit that only sets up) runs no callback whatever ``run_on`` says; the schedule check refused
    ``run_on="validation_epoch_end"`` there with the nonsense fix "Use max_epochs=0"."""
    cbs = [CAMCallback(num_probes=2, run_on="validation_epoch_end"), CAMCallback(num_probes=2, name="train")]
    trainer = tiny_trainer(str(tmp_path), cbs, max_epochs=0)
    trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert trainer.global_step == 0 and all(cb.last_logged_tags == [] for cb in cbs)


class FeatureHookLoss(LitTiny):
    """A feature regularizer fed by a forward hook (feature matching, deep supervision): the hook appends conv2's
    output to ``self.feats`` and counts its calls in ``self.calls``; the training step sums and clears them."""

    def __init__(self):
        super().__init__()
        self.feats: list = []
        self.calls = {"n": 0}
        self.net.conv2.register_forward_hook(self._collect)

    def _collect(self, module, inputs, output):
        self.feats.append(output)
        self.calls["n"] += 1

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx) + 0.01 * sum(f.pow(2).mean() for f in self.feats)
        self.feats.clear()
        return loss

    def validation_step(self, batch, batch_idx):
        super().validation_step(batch, batch_idx)
        self.feats.clear()


def test_a_forward_hook_collecting_features_for_the_loss_trains_the_same(tmp_path):
    """The visualizations' forwards run the user's hook too: their tensors (with the visualization's freed graph)
    must not reach the next training step's loss, nor the call counter change."""

    def fit(logdir, callbacks):
        L.seed_everything(0, verbose=False)
        model = FeatureHookLoss()
        tiny_trainer(str(logdir), callbacks, max_epochs=2).fit(model, *tiny_loaders(n=16))
        return model

    plain = fit(tmp_path / "plain", [])
    cbs = [CAMCallback(num_probes=2), GradientCallback(num_probes=2), EmbeddingCallback(num_probes=4, projector=False)]
    viz = fit(tmp_path / "viz", cbs)
    assert all(cb.last_logged_tags for cb in cbs)
    for (name, a), b in zip(plain.state_dict().items(), viz.state_dict().values()):
        assert torch.equal(a, b), name
    assert viz.calls == plain.calls and viz.feats == plain.feats == []
