"""Models as users have them: parametrizations, pruning, their own hooks, a partly frozen backbone."""

from __future__ import annotations

import warnings

import lightning as L
import torch
import torch.nn.functional as F
from helpers import (
    LitTiny,
    assert_untouched,
    image_steps,
    read_events,
    scalar_steps,
    snapshot,
    tiny_dataset,
    tiny_trainer,
)
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.parametrizations import spectral_norm, weight_norm
from torch.utils.data import DataLoader

from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.callbacks.occlusion import OcclusionCallback
from lightning_viz.callbacks.synthesis import InversionCallback
from lightning_viz.tracking import MapTracker


class UserNet(nn.Module):
    """A frozen conv-BN stem, a spectral-normed conv (u/v buffers updated by every training forward), a
    weight-normed conv, a pruned conv (forward pre-hook, mask buffer), and the user's own hooks on them."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = spectral_norm(nn.Conv2d(4, 6, 3, padding=1)), nn.BatchNorm2d(6)
        self.conv3 = weight_norm(nn.Conv2d(6, 6, 3, padding=1))
        self.conv4 = nn.Conv2d(6, 6, 3, padding=1)
        prune.l1_unstructured(self.conv4, "weight", amount=0.3)
        self.fc = nn.Linear(6, 3)
        self.calls = {"forward": 0, "pre": 0, "backward": 0}  # the user's hooks, counted in training mode
        self.conv2.register_forward_hook(lambda m, i, o: self._count("forward", m))
        self.conv3.register_forward_pre_hook(lambda m, i: self._count("pre", m))
        self.conv4.register_full_backward_hook(lambda m, gi, go: self._count("backward", m))
        for p in [*self.conv1.parameters(), *self.bn1.parameters()]:
            p.requires_grad_(False)

    def _count(self, kind, module):
        self.calls[kind] += module.training

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = F.relu(self.conv4(F.relu(self.conv3(x))))
        return self.fc(x.mean((2, 3)))


class LitUser(LitTiny):
    def on_train_epoch_start(self):
        self.net.bn1.eval()  # the frozen stem's BN statistics too, as fine-tuning recipes do


class Losses(Callback):
    def __init__(self):
        self.losses, self.before = [], None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())

    def on_train_epoch_end(self, trainer, pl_module):
        self.before = snapshot(pl_module)


class Untouched(Callback):
    def __init__(self, losses):
        self.of, self.checks = losses, 0

    def on_train_epoch_end(self, trainer, pl_module):
        assert_untouched(self.of.before, snapshot(pl_module))
        self.checks += 1


def test_user_model_with_norms_pruning_hooks_and_frozen_stem_trains_bit_identically(tmp_path):
    """Bitwise-identical weights, spectral-norm u/v buffers, pruning masks and loss curve with several
    callbacks; modes, requires_grad, hooks and buffers exactly as the user left them after each; the user's hooks
    fire in training as often as without us; no torch warning from our passes (a user's full backward hook
    on a layer the CAM differentiates at warned). No validation: the pruned weight is left derived with autograd
    on, and the sanity check's randomized copy still deep-copies (and re-initializes ``weight_orig``)."""

    def fit(callbacks, logdir):
        L.seed_everything(0, verbose=False)
        model, losses = LitUser(UserNet()), Losses()
        cbs = [losses, *callbacks, Untouched(losses)] if callbacks else [losses]
        train = DataLoader(tiny_dataset(24, size=16), batch_size=8, shuffle=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tiny_trainer(logdir, cbs, max_epochs=2, deterministic=True).fit(model, train)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return state, losses.losses, dict(model.net.calls), [str(w.message) for w in caught], cbs[-1]

    viz = [
        GradientCallback(methods=["saliency"], num_probes=3),
        CAMCallback(
            methods=["gradcam"],
            num_probes=3,
            tracker=MapTracker(sanity_check=True, faithfulness=True, deletion_steps=3),
        ),
        OcclusionCallback(window=8, stride=8, num_probes=3),
        InversionCallback(layers="net.conv3", steps=2, num_probes=2),
    ]
    plain, plain_losses, plain_calls, _, _ = fit([], str(tmp_path / "plain"))
    state, losses, calls, caught, untouched = fit(viz, str(tmp_path / "viz"))
    assert plain.keys() == state.keys() and "net.conv2.parametrizations.weight.0._u" in state
    for k in plain:
        assert torch.equal(plain[k], state[k]), f"{k} differs with visualization callbacks attached"
    assert losses == plain_losses and len(losses) == 6
    assert calls == plain_calls and calls == {"forward": 6, "pre": 6, "backward": 6}
    assert untouched.checks == 2
    assert not [w for w in caught if "hook" in w.lower()], caught
    acc = read_events(str(tmp_path / "viz"))
    for tag in [
        "viz-gradients/panel/p000",
        "viz-cam/panel/p002",
        "viz-occlusion/panel/p000",
        "viz-inversion/net.conv3/p001",
    ]:
        assert image_steps(acc, tag) == [0, 1], tag
    assert scalar_steps(acc, "viz-cam/gradcam/net.conv4/faithfulness/deletion_auc") == [0, 1]
