"""Real-run scenarios around models and data (found by a bug hunt): each test failed before its fix."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import LitTiny, tiny_loaders, tiny_trainer
from torch import nn

from lightning_viz.callbacks.base import VisualizationError
from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.callbacks.occlusion import OcclusionCallback
from lightning_viz.callbacks.synthesis import ClassModelCallback
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.tracking import MapTracker


class ConvNormHead(nn.Module):
    """conv -> [relu] -> BatchNorm -> GAP -> linear: at initialization the BatchNorm (eval) is the identity, so the
    numbers of a GAP + linear head over ``conv`` agree, but not once training moved the norm."""

    def __init__(self, functional_relu: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)
        self.functional_relu = functional_relu

    def forward(self, x):
        a = self.conv(x)
        a = self.bn(F.relu(a) if self.functional_relu else a)
        return self.fc(a.mean(dim=(2, 3)))


class _Steps(L.Callback):
    def __init__(self):
        self.steps = 0

    def on_train_batch_start(self, *args):
        self.steps += 1


def test_cam_on_a_conv_before_its_batchnorm_fails_at_setup(tmp_path):
    """'cam' on a conv whose output a BatchNorm reads: refused before the first step (the numeric head check alone
    passes at initialization, where the norm is the identity, and the maps were silently wrong after training)."""
    steps = _Steps()
    trainer = tiny_trainer(str(tmp_path), [CAMCallback(methods=["cam"], layers="net.conv", num_probes=2), steps])
    with pytest.raises(LayerNotFoundError, match=r"CAMCallback: .*'net\.conv'.*'net\.bn' \(BatchNorm2d\)"):
        trainer.fit(LitTiny(ConvNormHead()), *tiny_loaders())
    assert steps.steps == 0


def test_cam_head_is_verified_at_every_run(tmp_path):
    """A norm behind a functional relu is not seen by the setup checks; once training moved it, the run refuses
    'cam' with the head message instead of logging maps whose weights belong to another layer."""
    torch.manual_seed(0)
    trainer = tiny_trainer(str(tmp_path), [CAMCallback(methods=["cam"], layers="net.conv", num_probes=2)])
    with pytest.raises(VisualizationError, match="feed global average pooling and the last nn.Linear directly"):
        trainer.fit(LitTiny(ConvNormHead(functional_relu=True)), *tiny_loaders())
    assert trainer.current_epoch == 0  # at the first run, after epoch 0


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: GradientCallback(target=7, num_probes=2), r"GradientCallback: target: class 7 is out of range"),
        (lambda: OcclusionCallback(target="5", num_probes=2), r"OcclusionCallback: target: class 5 is out of range"),
        (
            lambda: CAMCallback(num_probes=2, tracker=MapTracker(target=3, faithfulness=True)),
            r"CAMCallback: tracker.target: class 3 is out of range",
        ),
        (lambda: ClassModelCallback(classes=[0, 9], steps=2), r"ClassModelCallback: classes: class 9 is out of range"),
    ],
)
def test_class_index_beyond_the_model_fails_at_setup(tmp_path, make, match):
    """The setup forward knows the number of classes (3 here): a class index beyond them fails before the first
    step, not at the first epoch end."""
    steps = _Steps()
    trainer = tiny_trainer(str(tmp_path), [make(), steps])
    with pytest.raises(ValueError, match=match + r": the model has 3 classes \(0\.\.2"):
        trainer.fit(LitTiny(), *tiny_loaders())
    assert steps.steps == 0
