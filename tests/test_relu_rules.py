"""Guided-backprop / deconvnet ReLU rules: every ReLU spelling, in-place semantics, reused modules, torchvision."""

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import check_untouched
from torch import nn

from lightning_viz.capture import isolated
from lightning_viz.methods.relu_rules import GuidedReLU, relu_rule

SPELLINGS = {
    "F.relu": lambda x: F.relu(x),
    "F.relu_inplace": lambda x: F.relu(x, inplace=True),
    "F.relu_": lambda x: F.relu_(x),
    "torch.relu": lambda x: torch.relu(x),
    "torch.relu_": lambda x: torch.relu_(x),
    "Tensor.relu": lambda x: x.relu(),
    "Tensor.relu_": lambda x: x.relu_(),
    "nn.ReLU": lambda x: nn.ReLU()(x),
    "nn.ReLU_inplace": lambda x: nn.ReLU(inplace=True)(x),
}

X = torch.tensor([1.0, -2.0, 3.0, -0.5, 0.7])
C = torch.tensor([2.0, 1.0, -1.0, -3.0, 0.5])  # upstream gradient: mixed signs


def _grad(spelling, rule):
    x = X.clone().requires_grad_(True)
    with relu_rule(rule) as mode:
        h = x * 1.0  # non-leaf, so in-place spellings are legal
        y = SPELLINGS[spelling](h)
        (g,) = torch.autograd.grad((C * y).sum(), x)
    return g, y.detach(), mode


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_rules_match_hand_computed_for_every_spelling(spelling):
    pos = (X > 0).float()
    plain, y, _ = _grad(spelling, None)
    assert torch.equal(plain, C * pos)
    guided, y_g, mode = _grad(spelling, "guided")
    assert torch.equal(guided, C.clamp_min(0) * pos)  # [2, 0, 0, 0, 0.5]
    assert torch.equal(guided, torch.tensor([2.0, 0.0, 0.0, 0.0, 0.5]))
    assert mode.calls == 1
    deconv, y_d, _ = _grad(spelling, "deconv")
    assert torch.equal(deconv, C.clamp_min(0))  # ignores the forward mask: -2 and -0.5 get gradient 1 and 0
    assert torch.equal(y, X.clamp_min(0)) and torch.equal(y_g, y) and torch.equal(y_d, y)  # forward unchanged


def test_inplace_spellings_keep_inplace_semantics():
    for spelling in ("F.relu_inplace", "F.relu_", "torch.relu_", "Tensor.relu_", "nn.ReLU_inplace"):
        x = X.clone().requires_grad_(True)
        with relu_rule("guided"):
            h = x * 1.0
            out = SPELLINGS[spelling](h)
        assert out is h, spelling
        assert torch.equal(h.detach(), X.clamp_min(0)), spelling


def test_reused_module_and_unknown_rule():
    relu = nn.ReLU(inplace=True)  # one module called twice, as in torchvision's BasicBlock
    x = torch.tensor([1.0, -1.0, 2.0], requires_grad=True)
    w = torch.tensor([-1.0, 1.0, 1.0])
    with relu_rule("guided") as mode:
        h = relu(x * 1.0)  # [1, 0, 2]
        z = relu(h * w + 0.5)  # [-0.5, 0.5, 2.5] -> [0, 0.5, 2.5]
        (g,) = torch.autograd.grad((torch.tensor([1.0, -1.0, 2.0]) * z).sum(), x)
    assert mode.calls == 2
    # upstream at z: [1, -1, 2] -> guided through z: [0 (z=0), 0 (neg grad), 2]; times w: [0, 0, 2];
    # guided through h: [0, 0, 2]
    assert torch.equal(g, torch.tensor([0.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="unknown ReLU rule 'guidd'.*'guided', 'deconv'"):
        with relu_rule("guidd"):
            pass


class _GuidedModule(nn.Module):
    def forward(self, x):
        return GuidedReLU.apply(x)


def _swap_relu_modules(model):
    for name, child in model.named_children():
        if isinstance(child, nn.ReLU):
            setattr(model, name, _GuidedModule())
        else:
            _swap_relu_modules(child)
    return model


def test_resnet18_inplace_reused_relu_matches_out_of_place_reference():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    ref = _swap_relu_modules(copy.deepcopy(model)).eval()
    x = torch.randn(2, 3, 32, 32)

    def guided():
        with isolated(model):
            xi = x.clone().requires_grad_(True)
            with relu_rule("guided") as mode:
                (g,) = torch.autograd.grad(model(xi)[:, 1].sum(), xi)
            return g, mode.calls

    g, calls = check_untouched(model, guided)
    assert calls == 17  # stem + 2 per BasicBlock x 8 (the block's relu module is reused)
    xr = x.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref(xr)[:, 1].sum(), xr)
    torch.testing.assert_close(g, g_ref)
    with isolated(model):
        xi = x.clone().requires_grad_(True)
        (plain,) = torch.autograd.grad(model(xi)[:, 1].sum(), xi)
    assert not torch.allclose(plain, g)


def test_densenet121_functional_and_inplace_relu():
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=3)
    x = torch.randn(2, 3, 32, 32)

    def run(rule):
        with isolated(model):
            xi = x.clone().requires_grad_(True)
            with relu_rule(rule) as mode:
                (g,) = torch.autograd.grad(model(xi)[:, 0].sum(), xi)
            return g, (mode.calls if mode else 0)

    g, calls = check_untouched(model, lambda: run("guided"))
    assert (
        calls == 1 + 58 * 2 + 3 + 1
    )  # stem, 2 per dense layer, transitions, functional F.relu(inplace=True) at the end
    plain, _ = run(None)
    assert torch.isfinite(g).all() and not torch.allclose(plain, g)


class NoReLUNet(nn.Module):
    """conv -> SiLU -> conv -> GELU -> GAP -> linear: EfficientNet's and ConvNeXt's activations, no ReLU."""

    def __init__(self):
        super().__init__()
        self.conv1, self.act1 = nn.Conv2d(3, 4, 3, padding=1), nn.SiLU()
        self.conv2, self.act2 = nn.Conv2d(4, 4, 3, padding=1), nn.GELU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.act2(self.conv2(self.act1(self.conv1(x)))).mean(dim=(2, 3)))


def test_guided_methods_on_a_forward_without_relu_warn_at_setup(tmp_path):
    """Guided backprop and the deconvnet change only the backward of ReLUs: on a model without any, their maps are
    the plain gradient's under another name. Said at setup, naming the callback and the methods (was: silent),
    and what to use instead in that callback (was: 'saliency' offered to a CAMCallback, and "'guided_gradcam' give");
    a model with ReLUs gets no such warning."""
    import warnings

    from helpers import LitTiny, TinyCNN, tiny_loaders, tiny_trainer

    from lightning_viz.callbacks import CAMCallback, GradientCallback
    from lightning_viz.callbacks.base import VisualizationWarning
    from lightning_viz.probe import ProbeSet

    def fit(net, path):
        grads = GradientCallback(
            methods=["saliency", "guided_backprop", "smoothgrad_deconvnet"], num_probes=2, smoothgrad_samples=2
        )
        cams = CAMCallback(methods=["gradcam", "guided_gradcam"], num_probes=2)
        trainer = tiny_trainer(str(path), [grads, cams], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(LitTiny(net), *tiny_loaders(n=6))
        return grads, [str(w.message) for w in caught if issubclass(w.category, VisualizationWarning)]

    torch.manual_seed(0)
    grads, messages = fit(NoReLUNet(), tmp_path / "silu")
    no_relu = [m for m in messages if "calls no ReLU" in m]
    assert len(no_relu) == 2
    assert no_relu[0].startswith("GradientCallback: LitTiny calls no ReLU in its forward")
    assert "so 'guided_backprop', 'smoothgrad_deconvnet' give the plain gradient's maps here" in no_relu[0]
    assert no_relu[0].endswith("Use 'saliency' or 'gradient' instead.")
    assert no_relu[1].startswith("CAMCallback: LitTiny calls no ReLU") and "so 'guided_gradcam' gives" in no_relu[1]
    assert no_relu[1].endswith("Use 'gradcam' instead.")  # the plain CAM it multiplies, not 'saliency'
    lit = LitTiny(NoReLUNet())
    probe = ProbeSet(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), labels=torch.tensor([0, 2]))
    with isolated(lit):
        maps = grads.compute_maps(lit, probe)
    torch.testing.assert_close(maps["guided_backprop/input"], maps["saliency/input"], rtol=0, atol=0)  # as it says
    _, messages = fit(TinyCNN(), tmp_path / "relu")
    assert not [m for m in messages if "calls no ReLU" in m]


class _ScriptedBlockNet(nn.Module):
    """conv -> block (conv, nn.ReLU, F.relu in place) -> GAP -> linear; ``how`` turns the block into TorchScript."""

    def __init__(self, how: str = "eager"):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), _InplaceReLU())
        self.fc = nn.Linear(4, 3)
        if how == "script":
            self.block = torch.jit.script(self.block)
        elif how == "script_relu":  # only the ReLU module scripted
            self.block[1] = torch.jit.script(self.block[1])
        elif how == "trace":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace is deprecated
                self.block = torch.jit.trace(self.block, torch.randn(1, 4, 8, 8))
        elif how == "script_conv":  # a scripted module without ReLUs: the rules still reach every ReLU
            self.block[0] = torch.jit.script(self.block[0])

    def forward(self, x):
        return self.fc(self.block(self.conv(x) - 0.1).mean((2, 3)))


class _InplaceReLU(nn.Module):
    def forward(self, x):
        return F.relu(x - 0.05, inplace=True)


@pytest.mark.parametrize("how, where", [("script", "'block'"), ("script_relu", "'block.1'"), ("trace", "'block'")])
def test_a_relu_inside_torchscript_is_refused_by_the_relu_rule_methods(how, where):
    """A TorchScript module runs its ReLUs in the TorchScript interpreter, where the rule's TorchFunctionMode never sees
    them: guided backprop, the deconvnet and guided Grad-CAM silently became the plain gradient there (was: maps that
    differ from the eager model's, no word). Now a clear error naming the scripted module; the methods without a rule
    are unaffected, and a scripted module without ReLUs is fine."""
    from lightning_viz.methods import deconvnet, guided_backprop, guided_class_activation_map, saliency
    from lightning_viz.methods.cam import class_activation_map

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    eager, scripted = _ScriptedBlockNet().eval(), _ScriptedBlockNet(how).eval()
    scripted.load_state_dict(eager.state_dict())
    with isolated(scripted):
        for call in (
            lambda m: guided_backprop(m, x, 0),
            lambda m: deconvnet(m, x, 0),
            lambda m: guided_class_activation_map(m, x, "conv", target=0),
        ):
            with pytest.raises(ValueError, match=rf"TorchScript module {re.escape(where)} runs its ReLUs") as info:
                call(scripted)
            assert "the eager (unscripted) module" in str(info.value)
        torch.testing.assert_close(saliency(scripted, x, 0), saliency(eager, x, 0))
        torch.testing.assert_close(
            class_activation_map(scripted, x, "conv", target=0), class_activation_map(eager, x, "conv", target=0)
        )
    conv_only = _ScriptedBlockNet("script_conv").eval()
    conv_only.load_state_dict(eager.state_dict())
    with isolated(conv_only), isolated(eager):
        torch.testing.assert_close(guided_backprop(conv_only, x, 0), guided_backprop(eager, x, 0))
        torch.testing.assert_close(deconvnet(conv_only, x, 0), deconvnet(eager, x, 0))


def test_callbacks_refuse_relu_rule_methods_on_a_scripted_relu_at_setup(tmp_path):
    """The callbacks say so at setup, naming themselves, the methods and the scripted module (was: silent maps of
    another method); their other methods run on the same model."""
    from helpers import LitTiny, tiny_loaders, tiny_trainer

    from lightning_viz.callbacks import CAMCallback, GradientCallback

    def fit(cb, path):
        trainer = tiny_trainer(str(path), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
        trainer.fit(LitTiny(_ScriptedBlockNet("script")), *tiny_loaders(n=6))

    grads = GradientCallback(methods=["saliency", "guided_backprop", "smoothgrad_deconvnet"], num_probes=2)
    with pytest.raises(ValueError) as info:
        fit(grads, tmp_path / "g")
    message = str(info.value)
    assert message.startswith("GradientCallback: methods 'guided_backprop', 'smoothgrad_deconvnet' change the backward")
    assert "TorchScript module 'net.block' runs its ReLUs" in message, message
    with pytest.raises(ValueError, match=r"^CAMCallback: methods 'guided_gradcam' change the backward"):
        fit(CAMCallback(layers="net.conv", methods=["gradcam", "guided_gradcam"], num_probes=2), tmp_path / "c")
    fit(GradientCallback(methods=["saliency"], num_probes=2), tmp_path / "s")
