"""The model adapter's input layout: channels_last on the CPU when the model gives the same output, else as given."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from helpers import LitTiny, TinyCNN, read_events, tiny_loaders, tiny_trainer
from torch import nn

from lightning_viz.callbacks import CAMCallback, GradientCallback, UnitCallback
from lightning_viz.methods.cam import cam_map, gradcam_weights
from lightning_viz.methods.gradients import gradient
from lightning_viz.methods.shared_pass import gradient_pass
from lightning_viz.targets import ModelAdapter, choose_memory_format


class ViewsItsFeatures(nn.Module):
    """conv -> ReLU -> ``x.view(B, -1)`` of the whole feature map -> linear: a view that needs NCHW strides."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        return self.fc(x.view(x.shape[0], -1))


class ReadsMemoryOrder(nn.Module):
    """Logits read off the feature map's memory in storage order: another layout gives other values."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        a = self.conv1(x)  # its strides follow the input's
        return torch.as_strided(a, (a.shape[0], 3), (a.stride(0), 1))


def layouts_seen(model: nn.Module, layer: nn.Module):
    """A recorder of ``channels_last`` for every input ``layer`` gets (and the handle to remove it)."""
    seen: list[bool] = []
    handle = layer.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last) and args[0].shape[1] > 1)
    )
    return seen, handle


class ForgetSetup(L.Callback):
    """Empties a list when training starts (after the callbacks' setup checks, which try channels_last once)."""

    def __init__(self, seen: list):
        self.seen = seen

    def on_train_start(self, trainer, pl_module):
        self.seen.clear()


class KeepAdapter(L.Callback):
    """Keeps a callback's model adapter as it was at the end of training (the callback drops it at teardown)."""

    def __init__(self, cb):
        self.cb, self.adapter = cb, None

    def on_train_end(self, trainer, pl_module):
        self.adapter = self.cb.adapted(pl_module)


def test_callbacks_call_the_model_in_channels_last_on_the_cpu(tmp_path):
    """A model that takes either layout gets its inputs in channels_last in every callback run (after the setup
    check), training keeps NCHW, and the maps equal the NCHW ones up to rounding."""
    torch.manual_seed(0)
    model = LitTiny()
    cbs = [GradientCallback(methods=["saliency"], num_probes=2), CAMCallback(methods=["gradcam"], num_probes=2)]
    seen, handle = layouts_seen(model, model.net.conv1)
    tl, vl = tiny_loaders(n=12, batch_size=6)
    kept = KeepAdapter(cbs[0])  # the callbacks let go of their adapter when the fit ends
    tiny_trainer(str(tmp_path), [*cbs, kept], max_epochs=1).fit(model, tl, vl)
    handle.remove()
    adapter = kept.adapter
    assert adapter is not None and adapter.memory_format is torch.channels_last
    assert False in seen and True in seen  # training batches NCHW, visualization passes channels_last
    assert any(t.startswith("viz-cam/panel/") for t in read_events(str(tmp_path)).Tags()["images"])
    x = torch.randn(4, 3, 8, 8)
    nchw = ModelAdapter(model)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapter(x), nchw(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gradient(adapter, x, target=0), gradient(nchw, x, target=0), rtol=1e-4, atol=1e-6)
    maps = []
    for m in (adapter, nchw):
        a, g = gradient_pass(m, x, 0, None, ["net.conv2"], input_grad=False).layer("net.conv2")
        maps.append(cam_map(a, gradcam_weights(a, g)))
    torch.testing.assert_close(maps[0], maps[1], rtol=1e-4, atol=1e-6)


def test_a_model_that_views_its_feature_map_keeps_nchw(tmp_path):
    """``x.view(B, -1)`` of a feature map fails on channels_last strides: the setup check keeps NCHW and every run
    works."""
    torch.manual_seed(0)
    model = LitTiny(net=ViewsItsFeatures())
    cbs = [
        GradientCallback(methods=["saliency"], num_probes=2),
        UnitCallback(layers="net.conv1", channels=[0], steps=2),
    ]
    seen, handle = layouts_seen(model, model.net.conv1)
    tl, vl = tiny_loaders(n=12, batch_size=6)
    kept = KeepAdapter(cbs[0])  # the callbacks let go of their adapter when the fit ends
    tiny_trainer(str(tmp_path), [*cbs, ForgetSetup(seen), kept], max_epochs=1).fit(model, tl, vl)
    handle.remove()
    assert kept.adapter is not None and kept.adapter.layout_checked and kept.adapter.memory_format is None
    assert seen and not any(seen)
    assert all(cb.last_logged_tags for cb in cbs)


def test_a_model_whose_output_depends_on_the_layout_keeps_nchw():
    """Outputs that differ beyond rounding (here: read in memory order) keep NCHW; TinyCNN switches."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    for net, expected in [(ReadsMemoryOrder(), None), (TinyCNN(), torch.channels_last)]:
        adapter = ModelAdapter(net.eval())
        with torch.no_grad():
            ref = adapter.call(x)
        choose_memory_format(adapter, x, ref)
        assert adapter.layout_checked and adapter.memory_format is expected, type(net).__name__
    # not 4-D: nothing to choose
    lin = ModelAdapter(nn.Linear(5, 2))
    choose_memory_format(lin, torch.randn(1, 5), lin(torch.randn(1, 5)))
    assert lin.memory_format is None


def test_the_layout_check_of_a_reference_that_requires_grad_warns_nothing():
    """The setup forward of a gradient callback runs with grad: comparing its output warns nothing (torch warned
    'Converting a tensor with requires_grad=True to a scalar' in every fit with a GradientCallback)."""
    import warnings

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    adapter = ModelAdapter(TinyCNN().eval())
    ref = adapter.call(x.clone().requires_grad_())
    assert ref.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choose_memory_format(adapter, x, ref)
    assert adapter.memory_format is torch.channels_last
