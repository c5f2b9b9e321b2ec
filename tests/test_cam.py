"""CAM family: hand-computed weights on a 2-layer conv net, chunking, errors, torchvision models, CAMCallback."""

import logging
import os
import signal

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import (
    LitTiny,
    TinyCNN,
    assert_untouched,
    check_untouched,
    image_steps,
    read_events,
    scalar_steps,
    snapshot,
    tiny_loaders,
    tiny_trainer,
)
from lightning.pytorch import Callback
from test_gradients import torchvision_model
from torch import nn

from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.capture import isolated
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.methods import cam as C
from lightning_viz.methods import gradients as G
from lightning_viz.methods.shared_pass import gradient_pass


class TwoConv(nn.Module):
    """conv1 (1x1, 1->2) -> ReLU -> conv2 (1x1, 2->2) -> GAP -> fc: every gradient is computable by hand."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 2, 1)
        self.conv2 = nn.Conv2d(2, 2, 1, bias=False)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([1.0, -1.0]).view(2, 1, 1, 1))
            self.conv1.bias.copy_(torch.tensor([0.0, 0.5]))
            self.conv2.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 1.0]]).view(2, 2, 1, 1))
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 1.0]]))

    def forward(self, x):
        return self.fc(self.conv2(F.relu(self.conv1(x))).mean(dim=(2, 3)))


X = torch.tensor([[1.0, -1.0], [2.0, 0.5]]).view(1, 1, 2, 2)
# Hand computation, class 0 (S = mean(A2_0) - mean(A2_1)):
#   A1 = [x, 0.5 - x];  R = relu(A1): R0 = [[1, 0], [2, .5]], R1 = [[0, 1.5], [0, 0]]
#   A2_0 = R0 + 2 R1 = [[1, 3], [2, .5]] (sum 6.5);  A2_1 = R1 - R0 = [[-1, 1.5], [-2, -.5]] (sum -2)
#   dS/dA2 = [1/4, -1/4] everywhere;  dS/dR = [1/4 + 1/4, 2/4 - 1/4] = [.5, .25]
#   dS/dA1_0 = .5 * [[1, 0], [1, 1]],  dS/dA1_1 = .25 * [[0, 1], [0, 0]]   (sum A1_0 = 2.5, sum A1_1 = -0.5)
A2_0 = torch.tensor([[1.0, 3.0], [2.0, 0.5]])
A2_1 = torch.tensor([[-1.0, 1.5], [-2.0, -0.5]])
A1_0 = X[0, 0]
A1_1 = 0.5 - X[0, 0]

EXPECTED = {
    # conv2: constant gradients g = (1/4, -1/4)
    ("gradcam", "conv2"): F.relu(0.25 * A2_0 - 0.25 * A2_1),  # [[.5, .375], [1, .25]]
    # Grad-CAM++: alpha = g^2 / (2 g^2 + sumA g^3) = 1 / (2 + sumA g); w = sum_ij alpha relu(g)
    ("gradcampp", "conv2"): F.relu(4 * 0.25 / (2 + 6.5 * 0.25) * A2_0),  # channel 1 has relu(g) = 0
    ("xgradcam", "conv2"): F.relu(0.25 * A2_0 - 0.25 * A2_1),  # constant g: sum(A g) / sum(A) = g
    ("layercam", "conv2"): F.relu(0.25 * A2_0),
    ("counterfactual_gradcam", "conv2"): F.relu(-0.25 * A2_0 + 0.25 * A2_1),  # all zero here
    ("cam", "conv2"): F.relu(A2_0 - A2_1),  # fc.weight[0] = (1, -1)
    # conv1: gradients vary over space
    ("gradcam", "conv1"): F.relu((0.5 * 3 / 4) * A1_0 + (0.25 / 4) * A1_1),
    ("gradcampp", "conv1"): F.relu(3 * 0.5 / (2 + 2.5 * 0.5) * A1_0 + 0.25 / (2 - 0.5 * 0.25) * A1_1),
    ("layercam", "conv1"): F.relu(
        0.5 * torch.tensor([[1.0, 0], [1, 1]]) * A1_0 + 0.25 * torch.tensor([[0.0, 1], [0, 0]]) * A1_1
    ),
    # XGrad-CAM: w_k = sum(A_k G_k) / sum(A_k): (0.5 * (1 + 2 + 0.5)) / 2.5 = 0.7 and (0.25 * 1.5) / -0.5 = -0.75
    ("xgradcam", "conv1"): F.relu(0.7 * A1_0 - 0.75 * A1_1),
    ("counterfactual_gradcam", "conv1"): F.relu(-(0.5 * 3 / 4) * A1_0 - (0.25 / 4) * A1_1),
    # HiResCAM: relu(sum_k G_k * A_k) element-wise: .5 [[1, 0], [1, 1]] * A1_0 + .25 [[0, 1], [0, 0]] * A1_1
    ("hirescam", "conv1"): torch.tensor([[0.5, 0.375], [1.0, 0.25]]),
    ("hirescam", "conv2"): F.relu(0.25 * A2_0 - 0.25 * A2_1),
    # Ablation-CAM: S = mean A2_0 - mean A2_1 = 2.125; channel 0 zeroed: S = 0.5, channel 1 zeroed: S = 1.625
    ("ablationcam", "conv2"): F.relu((2.125 - 0.5) / 2.125 * A2_0 + (2.125 - 1.625) / 2.125 * A2_1),
}


@pytest.mark.parametrize("method,layer", list(EXPECTED))
def test_hand_computed_cams(method, layer):
    model = TwoConv()
    with isolated(model):
        got = C.class_activation_map(model, X, layer, method, target=0)
    torch.testing.assert_close(got[0], EXPECTED[(method, layer)])


def test_hand_computed_ablation_on_conv1_and_weights():
    """Zeroing channel k of conv1 zeroes R_k = relu(A1_k); S is linear in R (hand computation below)."""
    model = TwoConv()
    # S = (1/4) sum (R0 + 2 R1) - (1/4) sum (R1 - R0) = (1/4) (2 sum R0 + sum R1) = (2 * 3.5 + 1.5) / 4 = 2.125
    # zero A1_0 -> R0 = 0: S = 1.5 / 4 = 0.375;  zero A1_1 -> R1 = relu(0) = 0: S = 7 / 4 = 1.75
    with isolated(model):
        res = gradient_pass(model, X, 0, None, ["conv1"])
        w = C.ablationcam_weights(model, X, "conv1", res.activations["conv1"], res.scores, 0, res.classes)
        got = C.class_activation_map(model, X, "conv1", "ablationcam", target=0)
    torch.testing.assert_close(res.scores, torch.tensor([2.125]))
    torch.testing.assert_close(w, torch.tensor([[(2.125 - 0.375) / 2.125, (2.125 - 1.75) / 2.125]]))
    torch.testing.assert_close(got[0], F.relu(w[0, 0] * A1_0 + w[0, 1] * A1_1))
    # a callable target ablates its own score; a zero score gives zero weights, not NaN
    with isolated(model):
        margin = C.class_activation_map(model, X, "conv2", "ablationcam", target=lambda z: z[:, 0] - z[:, 1])
        zero = C.class_activation_map(model, X, "conv2", "ablationcam", target=lambda z: 0 * z[:, 0])
    assert margin.shape == (1, 2, 2) and torch.isfinite(margin).all() and torch.equal(zero, torch.zeros(1, 2, 2))


class _CatAfter(nn.Module):
    """conv1 -> conv2, then conv2's output concatenated with conv1's (an earlier tensor) -> pool -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1), nn.Linear(10, 3)

    def forward(self, x):
        a = self.conv1(x).relu()
        return self.fc(torch.cat([self.conv2(a).relu(), a], 1).mean((2, 3)))


class _ScriptedHead(nn.Module):
    """conv1 -> conv2 -> a scripted ReLU (no forward hooks on it) -> pool -> linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.conv2, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, padding=1), nn.Linear(6, 3)
        self.act = torch.jit.script(nn.ReLU())

    def forward(self, x):
        return self.fc(self.act(self.conv2(self.conv1(x).relu())).mean((2, 3)))


def _ablation_reference(model: nn.Module, x: torch.Tensor, layer: str, classes: torch.Tensor) -> torch.Tensor:
    """Ablation-CAM weights from one whole forward per image and channel."""
    module = dict(model.named_modules())[layer]
    with torch.no_grad():
        y = model(x).gather(1, classes[:, None])[:, 0].double()
        acts: list[torch.Tensor] = []
        h = module.register_forward_hook(lambda m, i, o: acts.append(o))
        model(x[:1])
        h.remove()
        k = acts[0].shape[1]
        w = torch.zeros(x.shape[0], k, dtype=torch.float64)
        for c in range(k):
            h = module.register_forward_hook(lambda m, i, o, c=c: o * (torch.arange(o.shape[1]) != c).view(1, -1, 1, 1))
            yc = model(x).gather(1, classes[:, None])[:, 0].double()
            h.remove()
            w[:, c] = (y - yc) / y
    return w


@pytest.mark.parametrize(
    "arch,layer,shared", [("resnet18", "layer2.1", True), ("cat", "conv2", False), ("scripted", "conv2", False)]
)
def test_ablation_cam_runs_what_precedes_the_layer_once_per_image(arch, layer, shared):
    """Every ablated copy of an image is the same up to ``layer``: that part runs once per image and chunk, its
    output copied (was: a whole forward per channel, 2048 per probe at a ResNet-50's ``layer4``, ~all of the
    forward's cost); a model whose copies do not broadcast (a concatenation with an earlier tensor) takes whole
    forwards as before. The weights equal those of one whole forward per image and channel."""
    torch.manual_seed(0)
    nets = {"resnet18": lambda: torchvision.models.resnet18(weights=None), "cat": _CatAfter, "scripted": _ScriptedHead}
    model = nets[arch]().eval()
    x = torch.rand(2, 3, 32, 32)
    first = model.conv1
    seen: list[int] = []
    with isolated(model):
        res = gradient_pass(model, x, "predicted", None, [layer], None, 64)
        handle = first.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
        w = C.ablationcam_weights(model, x, layer, res.activations[layer], res.scores, "predicted", res.classes, 64)
        handle.remove()
    k = res.activations[layer].shape[1]
    ref = _ablation_reference(model, x, layer, res.classes)
    torch.testing.assert_close(w.double(), ref.to(w.dtype).double(), rtol=1e-4, atol=1e-4)
    # the check: two ablations whole and shared; then per image and 64-channel chunk one image (shared)
    assert sum(seen) == (2 + 1 + 2 * -(-k // 64) if shared else 2 + (arch == "cat") + 2 * k)
    assert not any(m._forward_hooks for m in model.modules() if not isinstance(m, torch.jit.ScriptModule))
    if shared:  # by default as many copies as the memory budget holds: here all of an image's channels at once
        seen.clear()
        with isolated(model):
            handle = first.register_forward_hook(lambda m, i, o: seen.append(o.shape[0]))
            again = C.ablationcam_weights(model, x, layer, res.activations[layer], res.scores, "predicted", res.classes)
            handle.remove()
        assert sum(seen) == 1 + 2 + 1 + 2  # the memory budget's one-image measurement, the check, one per image
        torch.testing.assert_close(again, w, rtol=1e-4, atol=1e-5)


def test_hand_computed_eigencam():
    """Centred positions x channels = u [1, 2] (rank 1): first component [1, 2] / sqrt 5, projection sqrt 5 u."""
    v = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    a = torch.stack([v, 2 * v + 5])[None]  # [1, 2, 2, 2]
    u = v - 1.5
    torch.testing.assert_close(C.eigencam_map(a)[0], 5**0.5 * u)
    torch.testing.assert_close(C.eigencam_map(-a)[0], -(5**0.5) * u)  # sign follows sum_k A_k
    res = gradient_pass(nn.Sequential(nn.Identity(), nn.Flatten(), nn.Linear(8, 2)), a, 0, None, ["0"])
    torch.testing.assert_close(C.cam_from_pass(res, "0", "eigencam")[0], F.relu(5**0.5 * u))
    torch.testing.assert_close(C.eigencam_map(torch.ones(1, 3, 2, 2)), torch.zeros(1, 2, 2))  # constant: no component


def test_registry_one_entry_makes_a_new_variant():
    from lightning_viz.methods.cam import CAMVariant, register_cam_variant

    assert set(C.CAM_VARIANTS) >= {"hirescam", "eigencam", "ablationcam", "scorecam", "guided_gradcampp"}
    assert C.cam_variant("gradcam++").name == "gradcampp" and C.cam_variant("guided_gradcam").guided_of == "gradcam"
    assert C.cam_variant("scorecam").needs_input and not C.cam_variant("eigencam").needs_input
    try:
        register_cam_variant(CAMVariant("doubled", "test", weights=lambda a, g: 2 * C.gradcam_weights(a, g)))
        register_cam_variant(CAMVariant("guided_doubled", "test", guided_of="doubled"))
        model = TwoConv()
        with isolated(model):
            got = C.class_activation_map(model, X, "conv2", "doubled", target=0)
        torch.testing.assert_close(got[0], 2 * EXPECTED[("gradcam", "conv2")])
        cb = CAMCallback(methods=["doubled", "guided_doubled"], layers=["net.conv2"], num_probes=2)
        assert cb.pass_needs(None) == {None: [], "guided": []}
        with pytest.raises(ValueError, match="exactly one of"):
            CAMVariant("bad", "test", weights=C.gradcam_weights, head=True)
        with pytest.raises(ValueError, match="already used by 'gradcampp'"):
            register_cam_variant(CAMVariant("other", "test", weights=C.gradcam_weights, aliases=("gradcam++",)))
    finally:
        for name in ("doubled", "guided_doubled"):
            C.CAM_VARIANTS.pop(name, None)
            C._ALIASES.pop(name, None)
        C._refresh_names()
    with pytest.raises(ValueError, match="unknown CAM method 'doubled'.*hirescam"):
        C.canonical_cam_method("doubled")


def test_parity_with_pytorch_grad_cam():
    """HiResCAM, Ablation-CAM and Eigen-CAM against pytorch-grad-cam (min-max normalized maps; no resizing:
    the layer keeps the input's resolution)."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    torch.manual_seed(0)
    model = TinyCNN(width=5).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    classes = [0, 2, 1]

    def minmax(m):
        m = m - m.flatten(1).amin(1)[:, None, None]
        return m / m.flatten(1).amax(1).clamp_min(1e-7)[:, None, None]

    for ours, theirs in (("hirescam", pgc.HiResCAM), ("ablationcam", pgc.AblationCAM)):
        with isolated(model):
            got = C.class_activation_map(model, x, "relu", ours, target="label", labels=torch.tensor(classes))
        with theirs(model=model, target_layers=[model.relu]) as cam:
            ref = cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes])
        torch.testing.assert_close(minmax(got), torch.as_tensor(ref), atol=1e-5, rtol=1e-4, msg=ours)
    with torch.no_grad():
        acts = model.relu(model.bn1(model.conv1(x)))
    proj = torch.as_tensor(get_2d_projection(acts.numpy().copy()))
    ours = C.eigencam_map(acts)
    for i in range(len(x)):  # the SVD sign is open: pytorch-grad-cam keeps numpy's, we fix ours
        sign = 1.0 if (ours[i] * proj[i]).sum() >= 0 else -1.0
        torch.testing.assert_close(sign * ours[i], proj[i].to(ours.dtype), atol=1e-4, rtol=1e-4)


class ConvThenReLU(nn.Module):
    """A conv whose output the forward then changes in place: ``ReLU(inplace=True)`` (VGG's conv + ReLU), or with
    ``op="add"`` an in-place add (no rectification), or ``op="copy"`` an out-of-place ReLU; ``"relu6"``, ``"silu"``:
    those in place, ``"add_relu"``: an in-place add, then an in-place ReLU."""

    def __init__(self, op: str = "relu"):
        super().__init__()
        self.op = op
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 5, 3, padding=1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        a = self.conv(x)
        if self.op in ("relu6", "silu", "add_relu"):
            inplace = {"relu6": lambda t: F.relu6(t, inplace=True), "silu": lambda t: F.silu(t, inplace=True)}
            a = inplace.get(self.op, lambda t: t.add_(0.5).relu_())(a)
        else:
            a = a.relu_() if self.op == "relu" else a.add_(0.5) if self.op == "add" else a.relu()
        return self.fc(self.head(a).amax((2, 3)))


def test_cam_maps_read_a_layer_output_rectified_in_place_as_pytorch_grad_cam():
    """A layer whose output the forward rectifies in place (a conv followed by ReLU(inplace=True); DenseNet's norm5
    and F.relu(inplace=True)): A is ReLU(output), the map the network reads, and every gradient CAM equals
    pytorch-grad-cam's, which keeps the hooked tensor the ReLU overwrites (was: XGrad-CAM correlated -0.11 on
    DenseNet-121). An in-place op that is no ReLU, or an out-of-place ReLU, leaves A the raw output."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from lightning_viz.capture import capture

    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 2, 1])
    for op, rectified in (("relu", True), ("add", False), ("copy", False)):
        model = ConvThenReLU(op).eval()
        with capture(model, ["conv"], grad=True) as cap:
            model(x)
        assert cap.rectified_later("conv") is rectified, op
        with isolated(model):
            plain = gradient_pass(model, x, "label", labels, ["conv"])
        with torch.no_grad():
            raw = model.conv(x)
        torch.testing.assert_close(plain.activations["conv"], raw.clamp_min(0) if rectified else raw)
    torch.manual_seed(0)
    dense = torchvision.models.densenet121(weights=None, num_classes=4).eval()
    cases = (
        (ConvThenReLU("relu").eval(), "conv", x[:2], labels[:2]),
        (dense, "features.norm5", torch.randn(2, 3, 96, 96), torch.tensor([1, 2])),
    )
    for model, layer, xs, ys in cases:
        for ours, theirs in (
            ("gradcam", pgc.GradCAM),
            ("gradcam++", pgc.GradCAMPlusPlus),
            ("xgradcam", pgc.XGradCAM),
            ("layercam", pgc.LayerCAM),
        ):
            with isolated(model):
                got = C.class_activation_map(model, xs, layer, ours, target="label", labels=ys)
            with theirs(model=model, target_layers=[model.get_submodule(layer)]) as cam:
                ref = torch.as_tensor(cam(input_tensor=xs, targets=[ClassifierOutputTarget(int(c)) for c in ys]))
            got = got - got.flatten(1).amin(1)[:, None, None]
            got = got / got.flatten(1).amax(1).clamp_min(1e-7)[:, None, None]
            assert got.std() > 0 and ref.std() > 0, (layer, ours)
            # (pytorch-grad-cam resizes with OpenCV: 0.998-1.000 here; the raw A gave -0.11 for XGrad-CAM)
            assert torch.corrcoef(torch.stack([got.flatten(), ref.flatten()]))[0, 1] > 0.995, (layer, ours)


def test_cam_reads_an_in_place_relu6_by_the_operation_not_the_values():
    """A conv followed by ReLU6(inplace=True) (MobileNetV2's blocks) is read as ReLU6(output), the map the network
    reads, whatever its values (was: ReLU(output) while no value exceeded 6, but the raw output once one did, so the
    maps of one layer changed meaning with the magnitudes), and every gradient CAM equals pytorch-grad-cam's there.
    An in-place SiLU, or an in-place add before the ReLU, leaves A the raw output."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 2, 1])
    reads = {"relu6": lambda r: r.clamp(0, 6), "relu": lambda r: r.clamp_min(0), "silu": None, "add_relu": None}
    for scale in (0.1, 30.0):
        for op, read in reads.items():
            torch.manual_seed(0)
            model = ConvThenReLU(op).eval()
            with isolated(model):
                plain = gradient_pass(model, scale * x, "label", labels, ["conv"], input_grad=False)
            with torch.no_grad():
                raw = model.conv(scale * x)
            assert bool((raw > 6).any()) == (scale > 1)
            torch.testing.assert_close(plain.activations["conv"], raw if read is None else read(raw), msg=op)
    torch.manual_seed(0)
    model = ConvThenReLU("relu6").eval()
    ys = torch.tensor([2, 1, 0])  # classes whose maps are not all zero here
    for ours, theirs in (("gradcam", pgc.GradCAM), ("xgradcam", pgc.XGradCAM), ("layercam", pgc.LayerCAM)):
        with isolated(model):
            got = C.class_activation_map(model, 30 * x, "conv", ours, target="label", labels=ys)
        with theirs(model=model, target_layers=[model.conv]) as cam:
            ref = torch.as_tensor(cam(input_tensor=30 * x, targets=[ClassifierOutputTarget(int(c)) for c in ys]))
        got = got - got.flatten(1).amin(1)[:, None, None]
        got = got / got.flatten(1).amax(1)[:, None, None]
        assert bool((ref.flatten(1).std(1) > 0.1).all()), ours
        torch.testing.assert_close(got, ref.to(got.dtype), atol=1e-4, rtol=1e-4, msg=ours)


def test_hand_computed_literals_and_weights():
    torch.testing.assert_close(EXPECTED[("gradcam", "conv2")], torch.tensor([[0.5, 0.375], [1.0, 0.25]]))
    a = torch.stack([A2_0, A2_1])[None]
    g = torch.tensor([0.25, -0.25]).view(1, 2, 1, 1).expand(1, 2, 2, 2)
    torch.testing.assert_close(C.gradcampp_weights(a, g), torch.tensor([[1 / 3.625, 0.0]]))
    torch.testing.assert_close(C.gradcam_weights(a, g), torch.tensor([[0.25, -0.25]]))
    # Grad-CAM++ where the gradient is 0: alpha is 0, not NaN
    assert torch.isfinite(C.gradcampp_weights(a, torch.zeros_like(g))).all()


def test_gradcam_is_cam_over_the_pooled_size_exactly_on_a_gap_linear_head():
    """On a global-average-pooling + linear head Grad-CAM's weights are the head's weights over h * w (Selvaraju et
    al. 2017, Sec. 3.1): pooled in float64 (the float32 mean of h * w equal gradients rounds), a power-of-two h * w
    makes the Grad-CAM map exactly the CAM map scaled, so both rank the pixels alike (the tracker's curves share their
    images); the weights stay the plain mean of the gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)
    ).eval()
    x, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 1, 4])
    with isolated(model):
        cam = C.class_activation_map(model, x, "1", "cam", labels=labels)
        gradcam = C.class_activation_map(model, x, "1", "gradcam", labels=labels)
    assert cam.abs().sum() > 0 and torch.equal(gradcam * 256, cam)
    g = torch.randn(2, 3, 5, 7)
    torch.testing.assert_close(C.gradcam_weights(g, g), g.mean(dim=(2, 3)), rtol=1e-6, atol=0)


def test_guided_gradcam_is_guided_backprop_times_cam():
    model = TinyCNN(width=3).eval()
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with isolated(model):
        ggc = C.guided_class_activation_map(model, x, "conv1", "guided_gradcam++", target="predicted")
        gb = G.guided_backprop(model, x, "predicted")
        cam = C.class_activation_map(model, x, "conv1", "gradcam++", target="predicted")
    torch.testing.assert_close(ggc, gb * cam[:, None])
    assert ggc.abs().sum() > 0


def test_chunked_equals_unchunked_all_methods():
    model = TinyCNN(width=3).eval()
    x, labels = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0, 1])
    with isolated(model):
        full = gradient_pass(model, x, "label", labels, ["conv1", "conv2"])
        part = gradient_pass(model, x, "label", labels, ["conv1", "conv2"], chunk_size=2)
        for m in C.CAM_METHODS:
            for layer in ("conv1", "conv2"):
                if m == "cam" and layer == "conv1":
                    continue
                kw = dict(model=model, x=x, target="label", labels=labels)
                torch.testing.assert_close(
                    C.variant_from_pass(part, layer, m, (8, 8), chunk_size=2, **kw),
                    C.variant_from_pass(full, layer, m, (8, 8), **kw),
                )


def test_scorecam_against_per_channel_loop():
    model = TwoConv()
    with isolated(model):
        got = C.class_activation_map(model, X, "conv2", "scorecam", target=0)
        weights = []
        for a in (A2_0, A2_1):  # the masks: each channel min-max normalized (same 2x2 size: no upsampling)
            mask = (a - a.min()) / (a.max() - a.min())
            weights.append(model(X * mask).softmax(1)[0, 0])
        expected = F.relu(weights[0] * A2_0 + weights[1] * A2_1)
        torch.testing.assert_close(got[0], expected)
        # chunked == unchunked; a callable target uses its own score
        tiny = TinyCNN(width=3).eval()
        x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
        full = C.class_activation_map(tiny, x, "conv2", "scorecam", "predicted")
        torch.testing.assert_close(
            C.class_activation_map(tiny, x, "conv2", "scorecam", "predicted", chunk_size=2), full
        )
        margin = C.class_activation_map(tiny, x, "conv2", "scorecam", lambda z: z[:, 0] - z[:, 1])
        assert margin.shape == (3, 8, 8) and not torch.allclose(margin, full)


def test_scorecam_masks_of_tiny_activations_span_zero_to_one():
    """An as-built EfficientNet-B0's last block has activations of ~1e-13 (its BatchNorm statistics still the initial
    ones): every channel's range was under the 1e-12 floor of the mask normalization, so the masks peaked at ~0.1
    instead of 1. Score-CAM's weights do not depend on the activations' scale (Wang et al. Eq. 8: min-max masks)."""
    model = TwoConv()
    acts = torch.stack([A2_0, A2_1])[None]
    with isolated(model):
        want = C.scorecam_weights(model, X, acts, target=0)
        for scale in (1e-13, 1e-20):
            torch.testing.assert_close(C.scorecam_weights(model, X, acts * scale, target=0), want)


def test_errors_are_clear():
    model = TinyCNN(width=3)
    x = torch.randn(2, 3, 8, 8)
    with isolated(model):
        with pytest.raises(ValueError, match="unknown CAM method 'gradcam\\+'; allowed: cam, gradcam, gradcampp"):
            C.class_activation_map(model, x, "conv2", "gradcam+", target=0)
        with pytest.raises(ValueError, match="callable target has none"):
            C.class_activation_map(model, x, "conv2", "cam", target=lambda z: z[:, 0])
        C.class_activation_map(model, x, "conv2", "gradcam", target=lambda z: z[:, 0])  # fine for Grad-CAM
        seq = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.ReLU(),
            nn.Conv2d(4, 6, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(6, 3),
        )
        with pytest.raises(
            LayerNotFoundError,
            match="classifier \\(the last nn.Linear called in the forward, '6'\\) to read the globally average-pooled "
            "channels of layer '0' \\(4 channels\\), but it has in_features=6: the model has no GAP\\+linear head",
        ):
            C.class_activation_map(seq, x, "0", "cam", target=0)
        C.class_activation_map(seq, x, "2", "cam", target=0)  # the layer that feeds GAP + linear is fine
    with pytest.raises(ValueError, match="callable target has none"):
        CAMCallback(methods=["cam"], target=lambda z: z[:, 0])
    with pytest.raises(ValueError, match="layers must name at least one layer"):
        CAMCallback(layers=[])
    with pytest.raises(ValueError, match="unknown CAM method 'score_cam'"):
        CAMCallback(methods=["score_cam"])
    lit = LitTiny(TinyCNN(width=3))
    with pytest.raises(LayerNotFoundError, match="Unknown layer 'net.conv9'.*'net.conv1', 'net.conv2'"):
        CAMCallback(layers=["net.conv9"]).check(lit)
    with isolated(lit), pytest.raises(LayerNotFoundError, match="CAM needs a convolution layer, but 'net.fc' is a"):
        cb = CAMCallback(layers=["net.fc"])
        cb.check(lit)  # a linear layer inside a ViT block gives tokens, read as maps: the setup forward tells
        cb.check_input(lit, torch.randn(1, 3, 8, 8))
    vgg = torchvision_model("vgg11")
    cb = CAMCallback(methods=["cam"])
    cb.check(vgg)  # the default layer's width is known from the setup forward (a concatenation has no module of it)
    with isolated(vgg), pytest.raises(LayerNotFoundError, match="no GAP\\+linear head"):
        cb.check_input(vgg, torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "arch,layer", [("resnet18", "layer4"), ("vgg11", None), ("densenet121", "features"), ("mobilenet_v3_small", None)]
)
def test_torchvision_gradients_and_cams_untouched(arch, layer):
    """Gradient and CAM methods on real architectures (in-place / functional / reused relu), model untouched."""
    model = torchvision_model(arch)
    model.train()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    model(x).sum().backward()  # live .grad and BN statistics must survive untouched
    cb = CAMCallback(
        methods=["gradcam", "gradcampp", "layercam", "guided_gradcam"] + (["cam"] if layer else []),
        layers=layer and [layer],
    )
    cb.check(model)
    with isolated(model):
        cb.check_input(cb.adapted(model), x[:1])  # setup: the default layer by one forward, the CAM head verified

    def run():
        with isolated(model):
            plain = gradient_pass(model, x, "label", torch.tensor([0, 2]), cb.layers)
            guided = gradient_pass(model, x, "label", torch.tensor([0, 2]), (), "guided")
            cams = {
                m: (
                    C.guided_cam_from_passes(plain, guided, cb.layers[0], m)
                    if m.startswith("guided")
                    else C.cam_from_pass(plain, cb.layers[0], m, (32, 32), model)
                )
                for m in cb.methods
            }
            return plain, guided, cams

    plain, guided, cams = check_untouched(model, run)
    assert G.gradient_from_pass("saliency", x, plain.input_grad).shape == (2, 32, 32)
    g1, g2 = (t / t.abs().max() for t in (plain.input_grad, guided.input_grad))
    assert not torch.allclose(g1, g2, atol=1e-3)  # guided backprop differs from the plain gradient
    for m, v in cams.items():
        assert torch.isfinite(v).all() and v.shape[-2:] == (32, 32), m
    assert cams["gradcam"].amin() >= 0


def test_cam_callback_logs_layers_and_methods(tmp_path):
    cb = CAMCallback(
        methods=["gradcam", "gradcam++", "guided_gradcam", "scorecam", "hirescam", "eigencam", "ablationcam"],
        layers=["net.conv1", "net.conv2"],
        num_probes=2,
        chunk_size=1,
        normalize="fixed",
    )
    tl, vl = tiny_loaders(n=12)
    tiny_trainer(str(tmp_path), [cb], max_epochs=2).fit(LitTiny(TinyCNN(width=3)), tl, vl)
    acc = read_events(str(tmp_path))
    for m in ("gradcam", "gradcampp", "guided_gradcam", "scorecam", "hirescam", "eigencam", "ablationcam"):
        for layer in ("net.conv1", "net.conv2"):
            assert scalar_steps(acc, f"viz-cam/{m}/{layer}/stats/mean_abs") == [0, 1]
    # one panel per probe: the image and the 7 methods x 2 layers, each tile 8 px upscaled to 128 px, padding 2
    for pid in ("p000", "p001"):
        assert image_steps(acc, f"viz-cam/panel/{pid}") == [0, 1]
        assert acc.Images(f"viz-cam/panel/{pid}")[0].width == 15 * 128 + 16 * 2
    assert not [t for t in acc.Tags()["images"] if not t.startswith("viz-cam/panel/")]
    # fixed scale across epochs: set at the first run, kept afterwards
    assert set(cb.scales) == {f"{m}/{layer}" for m in cb.methods for layer in ("net.conv1", "net.conv2")}
    assert len(cb.methods) == 7


def test_full_size_vgg11_one_pass():
    """The unmodified vgg11 (120M-parameter classifier, in-place ReLU + Dropout): one pass, saliency + Grad-CAM."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.vgg11(weights=None, num_classes=3)
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with isolated(model):
        res = gradient_pass(model, x, "predicted", layers=["features.18"])
        sal = G.gradient_from_pass("saliency", x, res.input_grad)
        cam = C.cam_from_pass(res, "features.18", "gradcam", (32, 32))
    assert sal.shape == cam.shape == (1, 32, 32) and sal.abs().sum() > 0 and torch.isfinite(cam).all()
    assert all(m.training for m in model.modules()) and all(p.grad is None for p in model.parameters())


def test_callback_on_a_float64_model():
    """The probes (float32) follow the model's dtype, not only its device."""
    from lightning_viz.probe import ProbeSet

    lit = LitTiny(TinyCNN(width=3)).double()
    probe = ProbeSet(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), labels=torch.tensor([0, 2]))
    methods = ["gradcam", "scorecam", "hirescam", "eigencam", "ablationcam"]
    cb = CAMCallback(methods=methods + ["guided_gradcam"], layers=["net.conv2"])
    cb.check(lit)
    with isolated(lit):
        maps = cb.compute_maps(lit, probe)
        for m in methods:  # the callback follows the registry entry of every variant
            expected = C.class_activation_map(lit, probe.images.double(), "net.conv2", m, "label", probe.labels)
            assert maps[f"{m}/net.conv2"].dtype == torch.float64, m
            torch.testing.assert_close(maps[f"{m}/net.conv2"], expected, msg=m)


def test_guided_method_in_the_plain_map_function_is_a_clear_error():
    model = TinyCNN(width=3).eval()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with isolated(model):
        with pytest.raises(ValueError, match="'guided_gradcampp' .*use guided_class_activation_map"):
            C.class_activation_map(model, x, "conv2", "guided_gradcam++", target=0)
        res = gradient_pass(model, x, 0, None, ["conv2"])
        with pytest.raises(ValueError, match="'guided_gradcam' .*guided_cam_from_passes"):
            C.cam_from_pass(res, "conv2", "guided_gradcam", (8, 8))


def test_gradcampp_alpha_is_zero_where_its_denominator_vanishes():
    # 2 g^2 + sum(A) g^3 = 2 - 2 = 0 with g = 1, sum(A) = -2: alpha is 0 (as documented), so is the weight
    a = torch.tensor([[-1.0, -1.0]]).view(1, 1, 1, 2)
    g = torch.ones_like(a)
    torch.testing.assert_close(C.gradcampp_weights(a, g), torch.zeros(1, 1))
    # next to a regular channel: sum(A) = 2, alpha = 1 / (2 + 2) per pixel, weight 2 * 1/4
    a2 = torch.cat([a, -a], dim=1)
    torch.testing.assert_close(C.gradcampp_weights(a2, torch.ones_like(a2)), torch.tensor([[0.0, 0.5]]))


class _SigtermAt(Callback):
    """Before the next callback's epoch-end run: counts the model's forwards and sends this process a SIGTERM at the
    ``at``-th (as a cluster does at preemption); keeps a snapshot of the model as the run found it."""

    def __init__(self, at: int):
        self.at, self.calls, self.before = at, 0, None

    def on_train_epoch_end(self, trainer, pl_module):
        self.before = snapshot(pl_module)

        def hook(_m, _inputs):
            self.calls += 1
            if self.calls == self.at:
                os.kill(os.getpid(), signal.SIGTERM)

        self.handle = pl_module.net.register_forward_pre_hook(hook)


def test_scorecam_loop_stops_at_its_next_chunk_on_sigterm(tmp_path, caplog, monkeypatch):
    """A SIGTERM (Lightning sets trainer.received_sigterm) stops a long Score-CAM loop at its next chunk of masked
    images (was: every one of them, e.g. 512 channels x 64 probes, ~25 min on a CPU, before the fit could stop):
    Lightning's SIGTERMException, the model as it was, nothing logged at that step, and a line saying so."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from lightning_viz.progress import logger as viz_logger

    monkeypatch.setattr(viz_logger, "propagate", True)  # caplog listens on the root logger
    sig = _SigtermAt(at=5)  # 4 forwards before the loop (the CAM pass, the probes' classes, ...), then its 1st chunk
    cam = CAMCallback(methods="scorecam", layers="net.conv2", num_probes=4, chunk_size=1)  # 4 x 6 = 24 chunks
    tl, vl = tiny_loaders(n=12)
    lit = LitTiny(TinyCNN(width=6))
    with caplog.at_level(logging.WARNING, logger="lightning_viz"), pytest.raises(SIGTERMException):
        tiny_trainer(str(tmp_path), [sig, cam], max_epochs=2).fit(lit, tl, vl)
    sig.handle.remove()
    assert sig.calls == 5  # no chunk after the one the signal came in (was 4 + 24)
    assert_untouched(sig.before, snapshot(lit))
    acc = read_events(str(tmp_path))
    assert not [t for t in acc.Tags()["images"] + acc.Tags()["scalars"] if t.startswith("viz-")]
    (msg,) = [r.getMessage() for r in caplog.records if "SIGTERM" in r.getMessage()]
    assert "CAMCallback" in msg and "stopped at 1/24 masked images, nothing more logged at step 0" in msg


def test_a_checkpoint_saved_after_a_sigterm_is_not_held_up_by_the_epochs_run(tmp_path):
    """A checkpoint saved at the epoch's last batch (ModelCheckpoint every_n_train_steps) normally runs the epoch's
    visualization first (so the checkpoint holds it); after a SIGTERM it is saved at once and the run left out (a
    stopping loop would abort the save, a full one would hold it up for the whole loop)."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    class SigtermAtLastBatch(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                os.kill(os.getpid(), signal.SIGTERM)

    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=2, save_top_k=-1)
    cam = CAMCallback(methods="scorecam", layers="net.conv2", num_probes=4, chunk_size=1)
    tl, vl = tiny_loaders(n=16)  # 2 batches of 8
    with pytest.raises(SIGTERMException):
        trainer = tiny_trainer(str(tmp_path), [SigtermAtLastBatch(), ckpt, cam], enable_checkpointing=True)
        trainer.fit(LitTiny(), tl, vl)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["epoch=0-step=2.ckpt"]
    assert cam._last_run_epoch != 0  # the run was left out


def test_cam_callback_runs_on_a_model_with_a_scripted_block(tmp_path):
    """A TorchScript submodule takes no hooks: the setup forward that reads the layers' maps registered them on every
    module and failed with torch's "register_forward_pre_hook is not supported on ScriptModules". Now the scripted
    module is left out of that trace (as of the memory measurement), and Grad-CAM of a layer before it is logged."""
    from test_relu_rules import _ScriptedBlockNet

    cam = CAMCallback(layers="net.conv", methods=["gradcam"], num_probes=2)
    trainer = tiny_trainer(str(tmp_path), [cam], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(LitTiny(_ScriptedBlockNet("script")), *tiny_loaders(n=6))
    tags = read_events(str(tmp_path)).Tags()["images"]
    assert tags == ["viz-cam/panel/p000", "viz-cam/panel/p001"], tags
