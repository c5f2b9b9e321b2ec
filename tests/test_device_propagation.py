"""Device propagation without a GPU: every pure method and every callback's ``compute`` run with the model on a
fake accelerator (tests/fake_device.py: PyTorch's ``FakeTensorMode``, whose device checks are the ones real kernels
make), so a tensor built on the CPU and mixed with device tensors, a CPU generator drawing device noise or a
``.numpy()`` without ``.cpu()`` fails here as on a GPU. The fake run must give what the CPU run gives, up to the
values: the same structure, shapes and dtypes, on the model's device or (results meant for the host) the CPU.
Numerics, ``torch.cuda`` calls and CUDA RNG are left to tests/cuda_checks.py (on a GPU).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from fake_device import DEVICE, fake_device
from helpers import LitTiny, TinyCNN, tiny_dataset
from test_foundation_training import CALLBACK_FACTORIES

from lightning_viz.capture import isolated
from lightning_viz.methods import activations as ACT
from lightning_viz.methods import adversarial as A
from lightning_viz.methods import cam as C
from lightning_viz.methods import embeddings as E
from lightning_viz.methods import gradients as G
from lightning_viz.methods import metrics as M
from lightning_viz.methods import objectives as OB
from lightning_viz.methods import patches as P
from lightning_viz.methods import regularizers as RG
from lightning_viz.methods import synthesis as S
from lightning_viz.probe import ProbeSet

# the package re-exports functions named like these modules
OCC = importlib.import_module("lightning_viz.methods.occlusion")
R = importlib.import_module("lightning_viz.methods.receptive_field")

NORM = {"mean": [0.5] * 3, "std": [0.25] * 3}


def _gen():
    return torch.Generator().manual_seed(0)


def _cam(method):
    return lambda m, x, y: C.class_activation_map(m, x, "conv2", method, "label", y, chunk_size=3)


def _joint(f):
    return E.joint_probabilities(E.squared_distances(f), 2.0)


#: name -> (fn(model, x, labels), where the result is: "model" (its device) or "cpu" (a host result by design))
METHODS = {
    "saliency_label": (lambda m, x, y: G.saliency(m, x, "label", y), "model"),
    "saliency_predicted": (lambda m, x, y: G.saliency(m, x, "predicted"), "model"),
    "guided_backprop": (lambda m, x, y: G.guided_backprop(m, x, 1), "model"),
    "deconvnet": (lambda m, x, y: G.deconvnet(m, x, 1), "model"),
    "input_x_gradient": (lambda m, x, y: G.input_x_gradient(m, x, "label", y), "model"),
    "integrated_gradients": (lambda m, x, y: G.integrated_gradients(m, x, "predicted", steps=4, chunk_size=3), "model"),
    "smoothgrad": (lambda m, x, y: G.smoothgrad(G.saliency, m, x, "label", y, n_samples=3, chunk_size=5), "model"),
    **{f"cam_{v}": (_cam(v), "model") for v in C.CAM_METHODS},
    "guided_gradcam": (
        lambda m, x, y: C.guided_class_activation_map(m, x, "conv2", "guided_gradcam", "label", y),
        "model",
    ),
    "occlusion": (lambda m, x, y: OCC.occlusion(m, x, "label", y, window=4, stride=2, chunk_size=5), "model"),
    "occlusion_blur_fill": (lambda m, x, y: OCC.occlusion(m, x, 1, window=4, stride=2, fill="blur", **NORM), "model"),
    "occlusion_gray_fill": (lambda m, x, y: OCC.occlusion(m, x, 1, window=4, stride=2, fill="gray", **NORM), "model"),
    "spread_to_pixels": (lambda m, x, y: OCC.spread_to_pixels(x[:, 0, :3, :3], (8, 8), 4, 2), "model"),
    "perturbation_curves": (
        lambda m, x, y: M.perturbation_curves(
            m, x, {"a": x[:, 0], "b": x[:, 1, :4, :4]}, "predicted", steps=4, chunk_size=7
        ),
        "model",
    ),
    "perturbation_curve_classes": (
        lambda m, x, y: M.perturbation_curve(m, x, x[:, 0], y, mode="insertion", steps=4),
        "model",
    ),
    "pointing_game": (lambda m, x, y: M.pointing_game(x[:, 0], (x[:, 1] > 0).float().cpu(), tolerance=1), "model"),
    "energy_in_mask": (lambda m, x, y: M.energy_in_mask(x[:, 0], (x[:, 1] > 0).float()), "model"),
    "rank_correlation": (lambda m, x, y: M.rank_correlation(x[:, 0], x[:, 1].cpu()), "model"),
    "topk_iou": (lambda m, x, y: M.topk_iou(x[:, 0], x[:, 1, :4, :4]), "model"),
    "feature_maps": (lambda m, x, y: ACT.feature_maps(m, x, ["conv1", "conv2"], chunk_size=3), "model"),
    "extract_features": (lambda m, x, y: E.extract_features(m, x, None, 3), "model"),
    "extract_features_layer": (lambda m, x, y: E.extract_features(m, x, "conv2", 3), "model"),
    "pca_2d": (lambda m, x, y: E.pca_2d(x.flatten(1)), "model"),
    "tsne_2d": (lambda m, x, y: E.tsne_2d(x.flatten(1), iterations=250), "cpu"),
    "joint_probabilities": (lambda m, x, y: _joint(x.flatten(1)), "model"),
    "tsne_exact": (lambda m, x, y: E.tsne_exact(_joint(x.flatten(1)), x.flatten(1)[:, :2].double(), 3)[0], "model"),
    "silhouette": (lambda m, x, y: E.silhouette(x.flatten(1), y), "cpu"),
    "knn_accuracy": (lambda m, x, y: E.knn_accuracy(x.flatten(1), y), "cpu"),
    "scan_topk": (lambda m, x, y: P.scan_topk(m, x, "conv2", [0, 1], 2, batch_size=3), "cpu"),
    "fgsm": (lambda m, x, y: A.fgsm(m, x, y, 0.1, bounds=S.valid_range(**NORM)), "model"),
    "pgd": (lambda m, x, y: A.pgd(m, x, y, 0.1, steps=2, generator=_gen()), "model"),
    "minimal_flip_budget": (
        lambda m, x, y: A.minimal_flip_budget(m, x, y, 0.5, iterations=2, attack="pgd", steps=2),
        "model",
    ),
    "class_model_images": (lambda m, x, y: S.class_model_images(m, [0, 1], (3, 8, 8), steps=2), "model"),
    "class_model_fft_regularized": (
        lambda m, x, y: S.class_model_images(
            m,
            [0, 1],
            (3, 8, 8),
            steps=2,
            param="fft",
            init="noise",
            generator=_gen(),
            regularizers=RG.build_regularizers(tv=0.1, l2_decay=0.1, jitter=1, blur_every=1, clip_percentile=10),
        ),
        "model",
    ),
    "unit_images": (lambda m, x, y: S.unit_images(m, "conv2", [0, 1], (3, 8, 8), unit="neuron", steps=2), "model"),
    "invert_features": (
        lambda m, x, y: S.invert_features(
            m,
            x,
            "conv2",
            steps=2,
            generator=_gen(),
            regularizers=RG.build_regularizers(clip_contribution_percentile=10),
        ),
        "model",
    ),
    "optimize_input_bounds": (
        lambda m, x, y: S.optimize_input(
            m, OB.class_logit([0, 1]), (2, 3, 8, 8), steps=2, bounds=S.valid_range(**NORM)
        ),
        "model",
    ),
    "gradient_receptive_field": (
        lambda m, x, y: R.gradient_receptive_field(m, "conv2", (3, 8, 8), 1, chunk_size=16),
        "cpu",
    ),
    "receptive_field": (lambda m, x, y: R.receptive_field(m, "conv2", (3, 8, 8)), "cpu"),
}
#: device scalars these read on the host must not all be 0 (a division by a sum)
READ_AS_ONE = {"tsne_exact"}


def _structure(obj, device):
    """``obj`` with every tensor as (shape, dtype), checking it lies on ``device``."""
    if isinstance(obj, torch.Tensor):
        assert obj.device == torch.device(device), f"a result on {obj.device}, expected {device}"
        return tuple(obj.shape), obj.dtype
    if isinstance(obj, dict):
        return {k: _structure(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj).__name__, [_structure(v, device) for v in obj]
    return type(obj).__name__


def _inputs():
    x, y = tiny_dataset(5).tensors  # 5 images of 8 x 8 px, labels 0..2
    return x, y


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_on_a_fake_device_gives_the_cpu_structure(name):
    fn, where = METHODS[name]
    torch.manual_seed(0)
    net = TinyCNN().eval()
    x, y = _inputs()
    fake_net = copy.deepcopy(net)
    on_cpu = _structure(fn(net, x, y), "cpu")
    with fake_device(read_as=1.0 if name in READ_AS_ONE else 0.0):
        model = fake_net.to(DEVICE)
        out = fn(model, x.to(DEVICE), y.to(DEVICE))
        on_device = _structure(out, DEVICE if where == "model" else "cpu")
    assert on_device == on_cpu


def _callback(name, make):
    cb = make()
    if name == "cam":  # the fake device cannot deep-copy a module (Parameter.data of a fake parameter)
        cb.tracker.sanity_check = False
    return cb


def _compute(cb, lit, probe):
    if hasattr(cb, "check"):
        cb.check(lit)
    with isolated(lit):
        return cb.compute(lit, probe)


@pytest.mark.parametrize("name", [n for n, _ in CALLBACK_FACTORIES])
def test_callback_compute_on_a_fake_device_gives_the_cpu_structure(name):
    make = dict(CALLBACK_FACTORIES)[name]
    torch.manual_seed(0)
    lit = LitTiny()
    x, y = tiny_dataset(6).tensors
    masks = (x[:, 0] > 0).float()  # the tracker's pointing game and energy run too
    probe = None if name == "filters" else ProbeSet(images=x, labels=y, masks=masks, **NORM)
    fake_lit = copy.deepcopy(lit)
    on_cpu = _structure(_compute(_callback(name, make), lit, probe), "cpu")
    with fake_device():
        model = fake_lit.to(DEVICE)
        on_device = _structure(_compute(_callback(name, make), model, probe), "cpu")  # results go to the CPU
    assert on_device == on_cpu


def test_the_fake_device_refuses_what_cuda_refuses():
    """The harness can fail: the mixes a GPU refuses raise, the ones it allows run."""
    with fake_device():
        x = torch.randn(4, 3, device=DEVICE, requires_grad=True)
        cpu = torch.zeros(4, 3)
        for bad in (
            lambda: x + cpu,  # arithmetic with a CPU tensor
            lambda: torch.where(cpu > 0, x, 0.0),  # a CPU mask
            lambda: x.gather(1, torch.zeros(4, 1, dtype=torch.long)),  # a CPU index for gather
            lambda: torch.cat([x, cpu]),
            lambda: torch.zeros(4, 3).index_add_(0, torch.arange(4), x),
            lambda: torch.randn(4, 3, generator=torch.Generator(), device=DEVICE),  # CPU generator, device noise
            lambda: x.detach().numpy(),  # .numpy() without .cpu()
        ):
            with pytest.raises((RuntimeError, TypeError)):
                bad()
        assert (x * torch.tensor(2.0)).device == DEVICE  # a CPU zero-dim tensor is a scalar
        assert x[torch.tensor([0, 2])].shape == (2, 3)  # a CPU index tensor may index
        (g,) = torch.autograd.grad((x * x).sum(), x)  # autograd runs
        assert g.device == DEVICE and g.cpu().device.type == "cpu" and float(g.sum()) == 0.0
        assert torch.arange(3).tolist() == [0, 1, 2]  # the CPU side is real
