"""Mixed precision: visualizations compute in the parameters' dtype, never under an autocast.

Lightning's ``precision="16-mixed"`` / ``"bf16-mixed"`` autocasts only its ``*_step`` calls, so the callback hooks
run without it; :func:`lightning_viz.capture.isolated` also turns off an autocast a caller opened around a direct
call (float16 gradients of small values underflow; Score-CAM's maps came back in bfloat16). CUDA's float16
autocast is checked in tests/cuda_checks.py; the CPU has bfloat16 autocast, the same mechanism.
"""

from __future__ import annotations

import lightning as L
import torch
from helpers import LitTiny, tiny_loaders, tiny_trainer, trained_tiny_cnn

from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.capture import isolated
from lightning_viz.methods import cam as C
from lightning_viz.methods import gradients as G
from lightning_viz.methods import synthesis as S


def _maps(model, x, y):
    return {
        "saliency": G.saliency(model, x, "label", y),
        "scorecam": C.class_activation_map(model, x, "conv2", "scorecam", "label", y),
        "class_model": S.class_model_images(model, [0, 1], (3, 8, 8), steps=3).images,
    }


def test_an_enclosing_autocast_does_not_lower_the_precision():
    model, x, y = trained_tiny_cnn()
    x, y = x[:8], y[:8]
    with isolated(model):
        full = _maps(model, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16), isolated(model):
        under_autocast = _maps(model, x, y)
        assert torch.is_autocast_enabled("cpu") is False
    assert torch.is_autocast_enabled("cpu") is False  # the caller's autocast ended with its block
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with isolated(model):
            pass
        assert torch.is_autocast_enabled("cpu")  # restored on exit
    for key, m in full.items():
        assert m.dtype == under_autocast[key].dtype == torch.float32, key
        assert torch.equal(m, under_autocast[key]), key  # (bfloat16 autocast: ~1% of the range apart)


class KeepResults(GradientCallback):
    def compute(self, pl_module, probe):
        self.autocast_on = torch.is_autocast_enabled("cpu")
        self.results = super().compute(pl_module, probe)
        return self.results


class AutocastState(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.seen.append(torch.is_autocast_enabled("cpu"))


class AutocastInStep(LitTiny):
    def training_step(self, batch, batch_idx):
        self.step_autocast = torch.is_autocast_enabled("cpu")
        return super().training_step(batch, batch_idx)


def test_bf16_mixed_fit_gives_the_float32_maps(tmp_path):
    """A ``precision="bf16-mixed"`` fit: its steps run under autocast, the epoch-end hooks not, and the logged maps
    are the float32 ones of the final weights."""
    L.seed_everything(0, verbose=False)
    model = AutocastInStep()
    state, cb = AutocastState(), KeepResults(methods=["saliency"], num_probes=4)
    trainer = tiny_trainer(str(tmp_path), [state, cb], max_epochs=1, precision="bf16-mixed")
    trainer.fit(model, *tiny_loaders(n=16))
    assert model.step_autocast is True  # otherwise this test could not tell anything
    assert state.seen == [False] and cb.autocast_on is False
    assert model.net.conv1.weight.dtype == torch.float32
    with isolated(model):
        expected = G.saliency(model, cb.probes.images, "label", cb.probes.labels)
    got = cb.results["map:saliency/input"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
