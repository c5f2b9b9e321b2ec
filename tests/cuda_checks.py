"""Checks that need a CUDA GPU: ``python -m pytest tests/cuda_checks.py`` on a machine with one.

The default test run (CI: 2 CPU cores, no GPU) does not collect this file (its name does not match
``test_*.py``); on a machine without CUDA it fails at collection instead of skipping. What it checks on the GPU:

* every pure method gives the CPU's values (TF32 off, so both compute in full float32);
* chunked == unchunked where the chunk size comes from the GPU memory budget;
* a real ``Trainer.fit`` on the GPU with one callback of every family leaves parameters, ``.grad``, buffers,
  modes, hooks and the CPU *and CUDA* RNG states bit for bit as they were, and logs images;
* training with every callback attached gives bitwise the weights of training without them
  (``deterministic=True``: the callbacks must also run under ``torch.use_deterministic_algorithms``);
* every pure method of tests/test_device_propagation.py (checked there on a fake device, without CUDA's own calls)
  runs on the GPU and gives the CPU run's structure, shapes and dtypes, on the GPU or (host results) the CPU;
* under ``precision="16-mixed"`` the callbacks log the float32 maps, and a float16 autocast around a direct call
  changes nothing (``isolated`` turns it off).
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

import contextlib

import lightning as L
import pytest
import torch
from helpers import (
    LitTiny,
    TinyCNN,
    assert_untouched,
    image_steps,
    read_events,
    snapshot,
    tiny_dataset,
    tiny_loaders,
    tiny_trainer,
    trained_tiny_cnn,
)
from test_device_propagation import METHODS, _structure
from test_foundation_training import CALLBACK_FACTORIES, all_callbacks
from torch import nn
from torch.utils.data import DataLoader

from lightning_viz.capture import isolated
from lightning_viz.methods import cam as C
from lightning_viz.methods import gradients as G
from lightning_viz.methods.occlusion import occlusion

# LVIZ_CHECK_DEVICE=cpu runs the same checks on the CPU: a dry run of this file, no GPU check.
CUDA = torch.device(os.environ.get("LVIZ_CHECK_DEVICE", "cuda"))
ACCELERATOR = "gpu" if CUDA.type == "cuda" else "cpu"
if CUDA.type == "cuda" and not torch.cuda.is_available():
    pytest.fail("tests/cuda_checks.py needs a CUDA GPU (run it on one; CI runs tests/test_*.py)", pytrace=False)


@contextlib.contextmanager
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def method_table(layer: str = "conv2"):
    """name -> f(model, x, labels) for every pure method (SmoothGrad's noise comes from CPU generators)."""
    table = {
        "saliency": lambda m, x, y: G.saliency(m, x, "label", y),
        "guided_backprop": lambda m, x, y: G.guided_backprop(m, x, "label", y),
        "deconvnet": lambda m, x, y: G.deconvnet(m, x, "label", y),
        "input_x_gradient": lambda m, x, y: G.input_x_gradient(m, x, "label", y),
        "integrated_gradients": lambda m, x, y: G.integrated_gradients(m, x, "label", y, steps=8),
        "smoothgrad": lambda m, x, y: G.smoothgrad(G.saliency, m, x, "label", y, n_samples=4),
        "guided_gradcam": lambda m, x, y: C.guided_class_activation_map(m, x, layer, "guided_gradcam", "label", y),
        "occlusion": lambda m, x, y: occlusion(m, x, "label", y, window=4, stride=2)["score"],
    }
    for method in ("cam", "gradcam", "gradcampp", "xgradcam", "layercam", "scorecam"):
        table[method] = lambda m, x, y, method=method: C.class_activation_map(m, x, layer, method, "label", y)
    return table


@pytest.mark.parametrize("name", sorted(method_table()))
def test_method_on_gpu_matches_cpu(name):
    model, x, y = trained_tiny_cnn()
    x, y = x[:12], y[:12]
    fn = method_table()[name]
    with isolated(model):
        on_cpu = fn(model, x, y)
    model_gpu = model.to(CUDA)
    with no_tf32(), isolated(model_gpu):
        on_gpu = fn(model_gpu, x.to(CUDA), y.to(CUDA))
    assert on_gpu.device.type == CUDA.type
    scale = on_cpu.abs().max().clamp_min(1e-12)
    err = float((on_gpu.cpu() - on_cpu).abs().max() / scale)
    assert err < 1e-4, f"{name}: GPU differs from CPU by {err:.2e} of the map's range"
    assert float(on_cpu.abs().max()) > 0, f"{name}: an all-zero map cannot tell CPU and GPU apart"


@pytest.mark.parametrize("name", ["integrated_gradients", "smoothgrad", "occlusion", "scorecam"])
def test_chunked_equals_budgeted_on_gpu(name):
    """``chunk_size=None`` takes its batch from the GPU memory budget (a quarter of the free memory)."""
    model, x, y = trained_tiny_cnn()
    model, x, y = model.to(CUDA), x[:12].to(CUDA), y[:12].to(CUDA)
    kw = {"chunk_size": 5}
    calls = {
        "integrated_gradients": lambda **k: G.integrated_gradients(model, x, "label", y, steps=8, **k),
        "smoothgrad": lambda **k: G.smoothgrad(G.saliency, model, x, "label", y, n_samples=4, **k),
        "occlusion": lambda **k: occlusion(model, x, "label", y, window=4, stride=2, **k)["score"],
        "scorecam": lambda **k: C.class_activation_map(model, x, "conv2", "scorecam", "label", y, **k),
    }
    with no_tf32(), isolated(model):
        budgeted, chunked = calls[name](), calls[name](**kw)
    torch.testing.assert_close(chunked, budgeted, rtol=1e-5, atol=1e-6 * float(budgeted.abs().max()))


def cuda_snapshot(module: nn.Module) -> dict:
    snap = snapshot(module)
    snap["cuda_rng"] = torch.cuda.get_rng_state().clone() if CUDA.type == "cuda" else snap["rng"]
    return snap


class Planter(L.Callback):
    """Before the visualization callbacks: plant ``.grad``, freeze a parameter, put bn1 in eval, snapshot."""

    def __init__(self):
        self.before = None

    def on_train_epoch_end(self, trainer, pl_module):
        g = torch.Generator(device=pl_module.device).manual_seed(1)
        for p in pl_module.parameters():
            p.grad = torch.randn(p.shape, generator=g, device=pl_module.device)
        pl_module.net.conv1.bias.requires_grad_(False)
        pl_module.net.bn1.eval()
        if CUDA.type == "cuda":
            torch.cuda.manual_seed(123)  # a CUDA RNG state the callbacks must leave as it is
        self.before = cuda_snapshot(pl_module)


class Checker(L.Callback):
    def __init__(self, planter: Planter):
        self.planter, self.checks = planter, 0

    def on_train_epoch_end(self, trainer, pl_module):
        after = cuda_snapshot(pl_module)
        assert_untouched(self.planter.before, after)
        assert torch.equal(self.planter.before["cuda_rng"], after["cuda_rng"]), "CUDA RNG state consumed"
        self.checks += 1
        pl_module.net.conv1.bias.requires_grad_(True)
        pl_module.net.bn1.train()
        for p in pl_module.parameters():
            p.grad = None


def test_fit_on_gpu_leaves_model_and_cuda_rng_untouched(tmp_path):
    planter = Planter()
    checker = Checker(planter)
    callbacks = [make() for _, make in CALLBACK_FACTORIES]
    trainer = tiny_trainer(str(tmp_path), [planter, *callbacks, checker], max_epochs=1, accelerator=ACCELERATOR)
    model = LitTiny()
    trainer.fit(model, *tiny_loaders(n=16))
    assert model.device.type == CUDA.type and checker.checks == 1
    for (name, _), cb in zip(CALLBACK_FACTORIES, callbacks):
        assert cb.last_logged_tags, f"{name} logged nothing on the GPU"
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-filters/net.conv1/grid") == [0]


class MeanPool(nn.Module):
    """Global average pooling whose backward has a deterministic CUDA kernel (AdaptiveAvgPool2d's has not)."""

    def forward(self, x):
        return x.mean((2, 3), keepdim=True)


def fit_weights_gpu(logdir, callbacks):
    L.seed_everything(0, verbose=False)
    net = TinyCNN()
    net.pool = MeanPool()
    model = LitTiny(net)
    train, val = DataLoader(tiny_dataset(24), batch_size=8, shuffle=True), tiny_loaders(n=12)[1]
    trainer = tiny_trainer(str(logdir), callbacks, max_epochs=2, deterministic=True, accelerator=ACCELERATOR)
    trainer.fit(model, train, val)
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def test_training_on_gpu_bitwise_identical_with_all_callbacks(tmp_path):
    plain = fit_weights_gpu(tmp_path / "plain", [])
    again = fit_weights_gpu(tmp_path / "again", [])
    for k in plain:  # otherwise the comparison below could not tell anything
        assert torch.equal(plain[k], again[k]), f"{k}: deterministic GPU training is not reproducible here"
    viz = fit_weights_gpu(tmp_path / "viz", all_callbacks())
    for k in plain:
        assert torch.equal(plain[k], viz[k]), f"{k} differs on the GPU when visualization callbacks are attached"
    assert image_steps(read_events(str(tmp_path / "viz")), "viz-filters/net.conv1/grid") == [0, 1]


def test_public_metrics_take_gpu_tensors():
    """The public scores take GPU tensors (and a second map on another device) and give the CPU's values."""
    from lightning_viz.methods.embeddings import knn_accuracy, silhouette
    from lightning_viz.methods.metrics import rank_correlation, topk_iou

    g = torch.Generator().manual_seed(0)
    feats, labels = torch.randn(40, 6, generator=g), torch.arange(40) % 3
    a, b = torch.rand(4, 8, 8, generator=g), torch.rand(4, 16, 16, generator=g)
    assert knn_accuracy(feats.to(CUDA), labels.to(CUDA)) == knn_accuracy(feats, labels)
    assert silhouette(feats.to(CUDA), labels.to(CUDA)) == pytest.approx(silhouette(feats, labels))
    for fn in (rank_correlation, topk_iou):
        torch.testing.assert_close(fn(a.to(CUDA), b).cpu(), fn(a, b))
        torch.testing.assert_close(fn(a.to(CUDA), b.to(CUDA)).cpu(), fn(a, b))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_runs_on_gpu_as_on_cpu(name):
    """What the fake device cannot see (torch.cuda calls, CUDA kernels and RNG): each method for real on the GPU."""
    fn, where = METHODS[name]
    torch.manual_seed(0)
    net = TinyCNN().eval()
    x, y = tiny_dataset(5).tensors
    on_cpu = _structure(fn(net, x, y), "cpu")
    gpu_net = TinyCNN().eval().to(CUDA)
    gpu_net.load_state_dict(net.state_dict())
    with no_tf32():
        out = fn(gpu_net, x.to(CUDA), y.to(CUDA))
    assert _structure(out, CUDA if where == "model" else "cpu") == on_cpu


HALF = torch.float16 if CUDA.type == "cuda" else torch.bfloat16


def test_enclosing_float16_autocast_changes_nothing_on_gpu():
    model, x, y = trained_tiny_cnn()
    model, x, y = model.to(CUDA), x[:8].to(CUDA), y[:8].to(CUDA)

    def maps():
        return {
            "saliency": G.saliency(model, x, "label", y),
            "scorecam": C.class_activation_map(model, x, "conv2", "scorecam", "label", y),
            "guided_gradcam": C.guided_class_activation_map(model, x, "conv2", "guided_gradcam", "label", y),
        }

    with no_tf32(), isolated(model):
        full = maps()
    with no_tf32(), torch.autocast(CUDA.type, dtype=HALF), isolated(model):
        half = maps()
    for key, m in full.items():
        assert m.dtype == half[key].dtype == torch.float32, key
        torch.testing.assert_close(half[key], m, rtol=1e-5, atol=1e-6 * float(m.abs().max()))


class KeepResults(L.Callback):
    """After the visualization callback at the last epoch end: the probes' maps it computed."""

    def __init__(self, cb):
        self.cb, self.results, self.autocast = cb, None, None

    def on_train_epoch_end(self, trainer, pl_module):
        self.autocast = torch.is_autocast_enabled(CUDA.type)  # Lightning autocasts its steps, not the hooks
        with no_tf32(), isolated(pl_module):  # cuDNN's default TF32 convolutions would differ by ~1e-3
            self.results = self.cb.compute(pl_module, self.cb.probes)


def test_16_mixed_fit_on_gpu_logs_float32_maps(tmp_path):
    from lightning_viz.callbacks.gradients import GradientCallback

    L.seed_everything(0, verbose=False)
    cb = GradientCallback(methods=["saliency", "integrated_gradients"], ig_steps=4, num_probes=4)
    keep = KeepResults(cb)
    precision = "16-mixed" if CUDA.type == "cuda" else "bf16-mixed"
    trainer = tiny_trainer(str(tmp_path), [cb, keep], max_epochs=1, accelerator=ACCELERATOR, precision=precision)
    model = LitTiny()
    trainer.fit(model, *tiny_loaders(n=16))
    assert cb.last_logged_tags and keep.autocast is False
    x, y = cb.probes.images.to(CUDA), cb.probes.labels.to(CUDA)
    with no_tf32(), isolated(model):
        expected = G.saliency(model, x, "label", y).cpu()
    got = keep.results["map:saliency/input"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
