"""Hardening for real models (issue 9, items 5, 6, 7, 9, 13): models that return dicts / tuples or take extra
arguments (``logits_fn``), float64 networks, NaN weights, CAM's head check and the default CAM layer."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import LitTiny, TinyCNN, read_events, tiny_dataset, tiny_loaders, tiny_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz.callbacks import (
    ActivationCallback,
    AdversarialCallback,
    CAMCallback,
    ClassModelCallback,
    EmbeddingCallback,
    FilterCallback,
    GradientCallback,
    InversionCallback,
    OcclusionCallback,
    TopPatchesCallback,
    UnitCallback,
)
from lightning_viz.callbacks.base import VisualizationWarning
from lightning_viz.capture import isolated
from lightning_viz.layers import LayerNotFoundError, default_cam_layer
from lightning_viz.render import FixedScale
from lightning_viz.targets import ModelOutputError
from lightning_viz.tracking import MapTracker


class HeadNet(TinyCNN):
    """TinyCNN whose forward returns ``kind``: ``"dict"`` ({logits, features}), ``"tuple"`` (logits, features),
    ``"extra"`` (logits; forward needs a second argument ``temperature``)."""

    def __init__(self, kind: str):
        super().__init__(width=4)
        self.kind = kind

    def forward(self, x, temperature=None):
        if self.kind == "extra" and temperature is None:
            raise TypeError("forward() missing 1 required argument: 'temperature'")
        x = self.relu(self.bn1(self.conv1(x)))
        f = self.pool(F.relu(self.conv2(x))).flatten(1)
        z = self.fc(f)
        if self.kind == "dict":
            return {"features": f, "logits": z}
        if self.kind == "tuple":
            return z, f
        return z / temperature


def tuple_logits(model, x):
    """A logits_fn given by its dotted path (as from YAML)."""
    return model(x)[0]


class LitHead(LitTiny):
    """Trains on whatever ``logits_of`` reads from the network's output; counts training steps."""

    def __init__(self, kind: str):
        super().__init__(HeadNet(kind))
        self.steps = 0

    def forward(self, x, *args):
        return self.net(x, *args)

    def logits(self, x):
        out = self.net(x, 1.0) if getattr(self.net, "kind", None) == "extra" else self.net(x)
        return out["logits"] if isinstance(out, dict) else out[0] if isinstance(out, tuple) else out

    def training_step(self, batch, batch_idx):
        self.steps += 1
        return F.cross_entropy(self.logits(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass


def all_callbacks(**kw):
    """One callback of every family (tiny settings); ``kw`` goes to every one (e.g. ``logits_fn``)."""
    syn = dict(steps=2, **kw)
    return [
        FilterCallback(**kw),
        ActivationCallback(num_probes=2, **kw),
        GradientCallback(
            methods=["saliency", "integrated_gradients", "smoothgrad_saliency"],
            num_probes=2,
            ig_steps=2,
            smoothgrad_samples=2,
            normalize="both",
            tracker=MapTracker(faithfulness=True, deletion_steps=2),
            **kw,
        ),
        CAMCallback(methods=["cam", "gradcam", "scorecam", "guided_gradcam"], num_probes=2, **kw),
        OcclusionCallback(window=4, stride=4, num_probes=2, **kw),
        TopPatchesCallback(layers=["net.conv2"], num_units=2, k=2, num_probes=4, **kw),
        EmbeddingCallback(num_probes=6, **kw),
        ClassModelCallback(**syn),
        UnitCallback(layers="net.conv2", channels=[0, 1], **syn),
        InversionCallback(layers="net.conv2", num_probes=2, **syn),
        AdversarialCallback(steps=2, num_probes=2, min_flip_iterations=1, **kw),
    ]


def fit(tmp_path, model, callbacks, data=None, **kw):
    tl, vl = data if data is not None else tiny_loaders(n=12, batch_size=6)
    kw.setdefault("max_epochs", 1)
    tiny_trainer(str(tmp_path), callbacks, **kw).fit(model, tl, vl)


@pytest.mark.parametrize(
    "kind,logits_fn",
    [
        ("dict", None),
        ("tuple", lambda model, x: model(x)[0]),
        ("tuple", "test_model_outputs.tuple_logits"),
        ("extra", lambda model, x: model(x, 1.0)),
    ],
)
def test_every_callback_adapts_the_model_call(tmp_path, kind, logits_fn):
    """Dict outputs are read by default; tuples and extra forward arguments through logits_fn (callable or dotted
    path): every callback family runs through Trainer.fit and logs, with layer names unchanged."""
    torch.manual_seed(0)
    model = LitHead(kind)
    cbs = all_callbacks(logits_fn=logits_fn)
    fit(tmp_path, model, cbs)
    for cb in cbs:
        assert cb.last_logged_tags, type(cb).__name__
    acc = read_events(str(tmp_path))
    tags = acc.Tags()["images"]
    assert any(t.startswith("viz-cam/") and "/net.conv2/" in t for t in acc.Tags()["scalars"])  # the default CAM layer
    assert any(t.startswith("viz-cam/panel/") for t in tags)
    assert any(t.startswith("viz-gradients/") for t in acc.Tags()["scalars"])
    # callbacks with one adapter share it, so gradient and CAM callbacks share their passes too
    grad, cam = cbs[2], cbs[3]
    assert grad.adapted(model) is cam.adapted(model)


def test_model_output_checked_at_setup(tmp_path):
    """What the model returns (or how it must be called) is checked by one forward at setup, before training, with
    an error naming the callback, what the model returned and how to set logits_fn."""
    model = LitHead("tuple")
    with pytest.raises(
        ModelOutputError,
        match=r"GradientCallback: the model returned a tuple of length 2 "
        r"\(a Tensor of shape \(1, 3\), a Tensor of shape \(1, 4\)\)"
        r".*logits_fn",
    ):
        fit(tmp_path / "a", model, [GradientCallback(num_probes=2)])
    assert model.steps == 0
    model = LitHead("extra")
    with pytest.raises(
        ModelOutputError,
        match=r"ActivationCallback: calling the model as model\(x\) on one data item "
        r"of shape \(1, 3, 8, 8\) failed \(TypeError.*temperature.*logits_fn",
    ):
        fit(tmp_path / "b", model, [ActivationCallback(num_probes=2)])
    assert model.steps == 0
    with pytest.raises(
        ModelOutputError,
        match=r"EmbeddingCallback needs logits \[B, K\] from the model, but "
        r"logits_fn=<function"
        r".*gave a Tensor of shape \(1, 3, 1\) for one input of shape",
    ):
        fit(tmp_path / "c", model, [EmbeddingCallback(num_probes=4, logits_fn=lambda m, x: m(x, 1.0)[:, :, None])])
    with pytest.raises(ValueError, match="logits_fn='no_such_module.fn' cannot be imported"):
        GradientCallback(logits_fn="no_such_module.fn")
    with pytest.raises(ValueError, match="logits_fn must be a callable"):
        CAMCallback(logits_fn=3)
    # a model with one output the callbacks that only hook layers still accept; FilterCallback never calls it
    fit(tmp_path / "d", LitHead("tuple"), [ActivationCallback(num_probes=2), FilterCallback()])


class SegNet(nn.Module):
    """A segmentation head as torchvision's (fcn, deeplabv3, lraspp): ``{"out": [B, K, H, W]}``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.classifier = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return {"out": self.classifier(F.relu(self.conv1(x)))}


def seg_logits(model, x):
    return model(x)["out"].mean(dim=(2, 3))


class LitSeg(LitTiny):
    def __init__(self):
        super().__init__(SegNet())

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(seg_logits(self.net, batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        pass


def test_segmentation_output_gets_a_logits_fn_suggestion_at_setup(tmp_path):
    """A dense {"out": [B, K, H, W]} output is refused at setup with the logits_fn that reads it (averaged over the
    pixels); a logits_fn giving the dense map itself is told to average it; the suggested one runs."""
    model = LitTiny(SegNet())
    with pytest.raises(ModelOutputError, match=r"model\(x\)\['out'\]\.mean\(dim=\(2, 3\)\) explains each class's"):
        fit(tmp_path / "a", model, [GradientCallback(num_probes=2)])
    with pytest.raises(ModelOutputError, match=r"gave a Tensor of shape \(1, 3, 8, 8\).*average it over the pixels"):
        fit(tmp_path / "b", model, [GradientCallback(num_probes=2, logits_fn=lambda m, x: m(x)["out"])])
    cb = GradientCallback(methods=["saliency"], num_probes=2, logits_fn=seg_logits)
    fit(tmp_path / "c", LitSeg(), [cb])
    assert cb.last_logged_tags


def test_float64_network_every_callback(tmp_path):
    """A network made float64 with .double() (no precision flag: the LightningModule's own dtype stays float32):
    every callback puts its inputs on the parameters' dtype and device."""
    torch.manual_seed(0)
    model = LitTiny(TinyCNN(width=4).double())
    assert model.dtype == torch.float32  # what callbacks used to read
    ds = tiny_dataset(12)
    ds = TensorDataset(ds.tensors[0].double(), ds.tensors[1])
    cbs = all_callbacks()
    fit(tmp_path, model, cbs, data=(DataLoader(ds, batch_size=6), DataLoader(ds, batch_size=6)))
    for cb in cbs:
        assert cb.last_logged_tags, type(cb).__name__


def test_nan_model_warns_and_never_poisons_fixed_scales(tmp_path):
    """NaN weights: the embedding projection and the maps warn (naming the callback) instead of crashing, and a
    fixed scale is never set from non-finite values (nor checkpointed as NaN)."""
    torch.manual_seed(0)
    model = LitTiny(TinyCNN(width=4), lr=0.0)
    with torch.no_grad():
        model.net.fc.weight.fill_(float("nan"))
    emb = EmbeddingCallback(layers="net.fc", num_probes=6)
    grad = GradientCallback(num_probes=2, normalize="fixed")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(tmp_path, model, [emb, grad], max_epochs=2)
    msgs = [str(w.message) for w in rec if issubclass(w.category, VisualizationWarning)]
    assert any(m.startswith("EmbeddingCallback: the net.fc features contain non-finite values") for m in msgs), msgs
    assert any(m.startswith("GradientCallback: the saliency/input maps contain non-finite values") for m in msgs), msgs
    assert grad.scales["saliency/input"].vmax is None
    assert grad.state_dict()["extra"]["scales"]["saliency/input"]["vmax"] is None


def test_every_callback_survives_a_nan_model_with_a_warning(tmp_path):
    """All weights NaN: no callback crashes; each one whose results turn non-finite warns, naming itself."""
    torch.manual_seed(0)
    model = LitTiny(TinyCNN(width=4), lr=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    cbs = all_callbacks()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(tmp_path, model, cbs)
    warned = {str(w.message).split(":")[0] for w in rec if issubclass(w.category, VisualizationWarning)}
    for cb in cbs:
        assert cb.last_logged_tags, type(cb).__name__
    assert warned == {type(cb).__name__ for cb in cbs} - {"AdversarialCallback"}  # its images stay finite


def test_fixed_scale_ignores_non_finite_values():
    scale = FixedScale(quantile=1.0)
    assert scale.update(torch.full((2, 3, 3), float("nan"))) == (0.0, 1.0) and scale.vmax is None  # waits
    maps = torch.tensor([[[1.0, float("nan")], [float("inf"), 3.0]]])
    assert scale.update(maps) == (0.0, 3.0)
    restored = FixedScale()
    restored.load_state_dict({"vmax": float("nan"), "quantile": 0.99, "signed": False})
    assert restored.vmax is None


@pytest.mark.parametrize(
    "layer,match",
    [
        ("net.layer4.0", "does not: the spatial mean of its class maps plus the bias differs from the logits"),
        ("net.layer4.0.conv2", "does not: the spatial mean"),
        ("net.layer3", r"'net.fc'\) to read .* of layer 'net.layer3' \(256 channels\), but it has in_features=512"),
    ],
)
def test_cam_refuses_a_layer_without_the_gap_linear_head_at_setup(tmp_path, layer, match):
    """torchvision resnet18: layers whose channel count matches the head but do not feed it are refused at
    setup (numerically), like a block with the wrong width, before any training step."""
    import torchvision

    torch.manual_seed(0)
    model = LitHead("dict")
    model.net = torchvision.models.resnet18(weights=None, num_classes=3)
    with pytest.raises(LayerNotFoundError, match=match):
        fit(
            tmp_path,
            model,
            [CAMCallback(methods=["cam"], layers=[layer], num_probes=2)],
            data=tiny_loaders(n=6, batch_size=6, size=32),
        )
    assert model.steps == 0  # refused before training


def test_cam_head_accepts_the_layers_that_feed_it():
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=3)
    x = torch.randn(2, 3, 64, 64)
    for layers in (["layer4"], ["layer4.1"], None):
        cb = CAMCallback(methods=["cam", "gradcam"], layers=layers)
        cb.check(net)
        with isolated(net):
            cb.check_input(cb.adapted(net), x[:1])
            from lightning_viz.probe import ProbeSet

            maps = cb.compute_maps(net, ProbeSet(images=x, labels=torch.tensor([0, 1])))
        layer = cb.layers[0]
        assert layer == (layers[0] if layers else "layer4.1")
        assert maps[f"cam/{layer}"].shape == (2, 64, 64) and maps[f"cam/{layer}"].amax() > 0


class ScaledOutput(nn.Module):
    """``net``'s logits through ``log_softmax`` (an NLLLoss model) or divided by a temperature."""

    def __init__(self, net, how):
        super().__init__()
        self.net, self.how = net, how

    def forward(self, x):
        z = self.net(x)
        return F.log_softmax(z, dim=1) if self.how == "log_softmax" else z / 2.0


def test_cam_of_a_log_softmax_model_and_a_temperature_refused_by_name():
    """A log_softmax after the classifier shifts every logit of an image alike: CAM (the classifier's class map)
    is the plain model's, not refused as 'a layer that does not feed the head'; logits / T are refused naming
    the temperature."""
    from lightning_viz.methods.cam import class_activation_map

    torch.manual_seed(0)
    net = TinyCNN(width=4).eval()
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2])
    want = class_activation_map(net, x, "conv2", "cam", "label", y)
    got = class_activation_map(ScaledOutput(net, "log_softmax"), x, "net.conv2", "cam", "label", y)
    torch.testing.assert_close(got, want)
    with pytest.raises(LayerNotFoundError, match=r"those scores times 0.5 \(a temperature"):
        class_activation_map(ScaledOutput(net, "temperature"), x, "net.conv2", "cam", "label", y)


def test_cam_head_check_sees_a_layer_that_does_not_feed_the_head_at_any_scale():
    """An as-built EfficientNet-B0 has activations and logits of ~1e-13: the head check's tolerance of 1e-3 (times
    1 + max |logit|) let any layer of the head's width pass, e.g. the BatchNorm before the SiLU (SiLU(a) ~ a / 2 for
    tiny a), and the callback checks once, at setup. The tolerance now scales with the class maps' terms."""
    from lightning_viz.methods.cam import class_activation_map

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    net.append(nn.Linear(4, 3)).eval()
    nn.init.zeros_(net[4].bias)
    x, y = torch.randn(2, 3, 6, 6), torch.tensor([0, 2])
    for scale in (1.0, 1e-13):
        a = F.silu(net[0](x * scale))
        want = F.relu(torch.einsum("bk,bkhw->bhw", net[4].weight[y], a))
        want = F.interpolate(want[:, None], size=(6, 6), mode="bilinear")[:, 0]
        torch.testing.assert_close(class_activation_map(net, x * scale, "1", "cam", "label", y), want)
        # at 1e-13 SiLU(a) = a / 2 up to 1e-14: the pre-SiLU layer reads as the scores times 0.5
        with pytest.raises(LayerNotFoundError, match="does not: the spatial mean|times 0.5 .* a SiLU on activations"):
            class_activation_map(net, x * scale, "0", "cam", "label", y)


def test_cam_uses_the_rectified_map_when_a_functional_relu_feeds_the_head():
    """TinyCNN: conv2 -> F.relu -> GAP -> fc. The head reads ReLU(A), so CAM is relu(sum_k W_ck ReLU(A_k))."""
    from lightning_viz.capture import capture
    from lightning_viz.probe import ProbeSet

    torch.manual_seed(0)
    net = TinyCNN(width=4)
    x = torch.randn(2, 3, 8, 8)
    cb = CAMCallback(methods=["cam"], layers=["conv2"])
    cb.check(net)
    with isolated(net):
        cb.check_input(cb.adapted(net), x[:1])
        maps = cb.compute_maps(net, ProbeSet(images=x, labels=torch.tensor([2, 0])))
        with capture(net, ["conv2"]) as cap:
            net(x)
    w = net.fc.weight[[2, 0]]
    expected = F.relu(torch.einsum("bk,bkhw->bhw", w, cap["conv2"].relu()))
    torch.testing.assert_close(maps["cam/conv2"], expected)


def _gradcam_at_default_layer(net, size=64):
    cb = CAMCallback(methods=["gradcam"], target="predicted")
    from lightning_viz.probe import ProbeSet

    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    cb.check(net)
    with isolated(net):
        cb.check_input(cb.adapted(net), x[:1])
        maps = cb.compute_maps(net, ProbeSet(images=x))
    return cb.layers[0], maps[f"gradcam/{cb.layers[0]}"]


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("resnet18", "layer4.1"),
        ("vgg11", "features.20"),
        ("densenet121", "features.norm5"),
        ("mobilenet_v3_small", "features.12"),
        ("efficientnet_b0", "features.8"),
        ("convnext_tiny", "features.7"),
    ],
)
def test_default_cam_layer_torchvision(arch, expected):
    """The default CAM layer is the last block feeding global pooling (model.layer4[-1], model.features[-1]),
    and its Grad-CAM maps are not all zero."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.get_model(arch, weights=None, num_classes=3)
    layer, maps = _gradcam_at_default_layer(net)
    assert layer == expected
    assert maps.shape == (2, 64, 64) and (maps.flatten(1).amax(1) > 0).all()


@pytest.mark.parametrize("arch,expected", [("resnet18d", "layer4.1"), ("regnetx_002", "s4.b7")])
def test_default_cam_layer_timm(arch, expected):
    """timm residual nets, where Grad-CAM at the last conv (inside the last block) is all zero."""
    timm = pytest.importorskip("timm")
    from lightning_viz.layers import last_conv_name
    from lightning_viz.methods.cam import class_activation_map

    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=3)
    layer, maps = _gradcam_at_default_layer(net)
    assert layer == expected
    assert (maps.flatten(1).amax(1) > 0).all()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with isolated(net):
        old = class_activation_map(net, x, last_conv_name(net), "gradcam", target="predicted")
    assert old.abs().max() == 0  # the old default (last conv) is degenerate here


def test_default_cam_layer_plain_models():
    """Hand-written nets: the last module output before global pooling, in-place ReLU included."""
    seq = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 2),
    )
    with isolated(seq):
        assert default_cam_layer(seq, torch.randn(1, 3, 8, 8)) == "2"  # not the BN whose output ReLU rewrote
        assert default_cam_layer(TinyCNN(), torch.randn(1, 3, 8, 8)) == "conv2"  # F.relu follows: conv2 is last
    lit = LitTiny(TinyCNN())
    with isolated(lit):
        assert default_cam_layer(lit, torch.randn(1, 3, 8, 8)) == "net.conv2"
    with pytest.raises(LayerNotFoundError, match="no layer with a \\[B, C, h, w\\] output before global pooling"):
        default_cam_layer(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))


class OddSides(nn.Module):
    """A residual block whose main path (an unpadded strided conv) and shortcut (a strided 1x1 conv) differ in size."""

    def __init__(self):
        super().__init__()
        self.main, self.short = nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(3, 4, 1, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc((self.main(x) + self.short(x)).mean((2, 3)))


def test_images_too_small_or_of_another_size_than_a_flatten_head_are_named_at_setup(tmp_path):
    """A model that cannot take the data's image size fails at setup with a message saying so (not the hint about
    logits_fn, which is for forwards taking other arguments): a pooling left with nothing of an 8x8 image, a
    flatten + linear head sized for 16x16 images, and a residual add of maps of different sizes (timm's resnetaa34d
    and dla34 on 48x80 images)."""
    deep = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(4), nn.Flatten())
    flat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16 * 16, 3))
    for net, expected in [
        (nn.Sequential(deep, nn.Linear(4, 3)), r"8x8 px\) are too small for the model: its downsampling"),
        (flat, r"a flatten \+ linear head sized for images other than 8x8 px"),
        (OddSides(), r"maps of different sizes on 8x8 px images: its downsampling needs sides divisible"),
    ]:
        with pytest.raises(ModelOutputError, match=r"GradientCallback: calling the model .* failed .*" + expected) as e:
            fit(tmp_path, LitTiny(net), [GradientCallback(num_probes=2)])
        assert "logits_fn" not in str(e.value)
