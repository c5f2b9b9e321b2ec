"""Real-run scenarios around models and data (found by a bug hunt): each test failed before its fix."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import LitTiny, TinyCNN, read_events, tiny_loaders, tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz.callbacks.base import VisualizationWarning
from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.callbacks.occlusion import OcclusionCallback
from lightning_viz.callbacks.patches import TopPatchesCallback
from lightning_viz.callbacks.synthesis import ClassModelCallback
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.targets import ModelOutputError
from lightning_viz.tracking import MapTracker


class ConvNormHead(nn.Module):
    """conv -> BatchNorm -> GAP -> linear: at initialization the BatchNorm (eval) is the identity, so the numbers of
    a GAP + linear head over ``conv`` agree, but not once training moved the norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


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


class Uint8Lit(LitTiny):
    """A module that trains on 8-bit images and converts them in its forward, ``always`` or only for uint8 inputs."""

    def __init__(self, always: bool, tuple_out: bool = False):
        super().__init__()
        self.always, self.tuple_out = always, tuple_out

    def forward(self, x):
        if self.always or x.dtype == torch.uint8:
            x = x.float() / 255
        z = self.net(x)
        return (z, z) if self.tuple_out else z

    def training_step(self, batch, batch_idx):
        z = self(batch[0])
        loss = F.cross_entropy(z[0] if self.tuple_out else z, batch[1])
        return loss


def uint8_loaders():
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randint(0, 256, (16, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(16) % 3)
    return DataLoader(ds, batch_size=8), DataLoader(ds, batch_size=8)


def test_uint8_data_gets_the_setup_forward(tmp_path):
    """8-bit images (a PILToTensor pipeline) are checked at setup like float ones: a forward returning a tuple fails
    before the first step, not at the first epoch end."""
    steps = _Steps()
    trainer = tiny_trainer(str(tmp_path), [GradientCallback(num_probes=2), steps])
    with pytest.raises(ModelOutputError, match=r"GradientCallback: the model returned a tuple of length 2"):
        trainer.fit(Uint8Lit(always=True, tuple_out=True), *uint8_loaders())
    assert steps.steps == 0


def test_uint8_data_and_a_forward_that_converts_only_uint8(tmp_path):
    """The callbacks pass 8-bit probes as floats: a forward that divides by 255 only for uint8 inputs would be
    explained on 255x larger inputs than it trains on. Refused at setup; one that always converts runs."""
    steps = _Steps()
    trainer = tiny_trainer(str(tmp_path), [GradientCallback(num_probes=2), steps])
    with pytest.raises(ModelOutputError, match=r"GradientCallback: the data gives uint8 images, .* other logits"):
        trainer.fit(Uint8Lit(always=False), *uint8_loaders())
    assert steps.steps == 0
    trainer = tiny_trainer(str(tmp_path / "ok"), [GradientCallback(num_probes=2)], max_epochs=1)
    trainer.fit(Uint8Lit(always=True), *uint8_loaders())
    assert trainer.current_epoch == 1


class ResBlock(nn.Module):
    def __init__(self, width: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x):
        return x + F.relu(self.conv(x))


class Diverges(LitTiny):
    """Its weights turn NaN during training (e.g. Adam under precision='16-true', whose eps underflows)."""

    def __init__(self):
        layers = [nn.Conv2d(3, 4, 3, padding=1), ResBlock(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)]
        super().__init__(nn.Sequential(*layers))

    def on_train_batch_end(self, *args):
        with torch.no_grad():
            self.net[0].weight.fill_(float("nan"))


def test_top_patches_of_a_diverged_model_warn_instead_of_crashing(tmp_path):
    """A residual layer's receptive field comes from gradients, which a NaN model has none of: the callback warns
    (as every callback does on non-finite outputs) and leaves the units out, instead of failing on empty crops."""
    cb = TopPatchesCallback(layers="net.1", num_probes=8, num_units=2, k=2, receptive_field="gradient")
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
    with pytest.warns(VisualizationWarning, match=r"TopPatchesCallback: the net.1 top activations contain non-finite"):
        trainer.fit(Diverges(), *tiny_loaders())
    acc = read_events(str(tmp_path))
    assert not [t for t in acc.Tags()["images"] if t.startswith("viz-top_patches")]


def test_cam_layer_with_a_one_by_one_map_warns_at_setup(tmp_path):
    """torchvision's resnet18 on 32 px images: the default layer, layer4.1, is 1x1, so every CAM is constant; a
    warning at setup names the layer (an earlier layer with a spatial map gets none)."""
    import torchvision

    torch.manual_seed(0)
    model = LitTiny(torchvision.models.resnet18(weights=None, num_classes=3))
    trainer = tiny_trainer(str(tmp_path), [CAMCallback(num_probes=2)], max_epochs=1, limit_train_batches=1)
    with pytest.warns(VisualizationWarning, match=r"CAMCallback: layer 'net.layer4.1' gives a 1x1 map for 32x32"):
        trainer.fit(model, *tiny_loaders(n=8, size=32))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", VisualizationWarning)
        trainer = tiny_trainer(str(tmp_path / "l3"), [CAMCallback(layers="net.layer3", num_probes=2)], max_epochs=1)
        trainer.fit(model, *tiny_loaders(n=8, size=32))


class _GrayImagenetStats(TensorDataset):
    """1-channel images whose dataset declares ImageNet's 3-channel ``mean``/``std`` (copied from an RGB pipeline)."""

    mean = [0.485, 0.456, 0.406]
    std = [0.229, 0.224, 0.225]


def test_display_normalization_of_another_channel_count_names_where_it_comes_from(tmp_path):
    """Grayscale images with a 3-value ``mean``/``std`` attribute: refused before the first step, saying which
    values came from where and what fits 1 channel. Was: "probe mean has 3 values but the probe images have 1
    channels; give 1 or 1 values (one per channel)", with no word of where the 3 values came from."""
    x, y = torch.rand(12, 1, 8, 8), torch.arange(12) % 3
    loader = DataLoader(_GrayImagenetStats(x, y), batch_size=4)
    steps = _Steps()
    trainer = tiny_trainer(str(tmp_path), [steps, GradientCallback(num_probes=2)], max_epochs=1)
    with pytest.raises(Exception) as err:
        trainer.fit(LitTiny(TinyCNN(in_channels=1)), loader, loader)
    assert steps.steps == 0
    msg = str(err.value)
    assert msg.startswith("GradientCallback: ") and "1 or 1" not in msg and "1 channels" not in msg, msg
    assert "mean=[0.485, 0.456, 0.406]" in msg and "std=[0.229, 0.224, 0.225]" in msg, msg
    assert "the _GrayImagenetStats dataset's mean/std attributes" in msg, msg
    assert "3 values but the probe images have 1 channel; give 1 value" in msg, msg
