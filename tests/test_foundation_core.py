"""Unit tests of the core: ProbeSet, layers, render, targets, capture/isolation (no Trainer)."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TinyCNN, check_untouched, tiny_dataset
from torch import nn
from torch.utils.data import TensorDataset

from lightning_viz.capture import attributes_kept, capture, eval_mode, forward_until, isolated
from lightning_viz.layers import (
    LayerNotFoundError,
    canonical_name,
    first_conv_name,
    get_layer,
    last_conv_name,
    named_layers,
    require_conv,
    resolve_layers,
)
from lightning_viz.probe import ProbeSet
from lightning_viz.render import (
    FixedScale,
    colormap,
    filmstrip,
    normalize_maps,
    overlay,
    to_uint8,
    to_uint8_hwc,
    upscale,
)
from lightning_viz.targets import ClassTarget, resolve_target


# ----------------------------------------------------------------------------- ProbeSet
def unbalanced_dataset():
    """30 samples, classes 0/1/2 with 20/8/2 members: a plain random pick would often miss class 2."""
    y = torch.tensor([0] * 20 + [1] * 8 + [2] * 2)
    x = torch.arange(30, dtype=torch.float32).view(30, 1, 1, 1).expand(30, 1, 2, 2).clone()
    return TensorDataset(x, y)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_probe_stratified_every_class_present(seed):
    probes = ProbeSet.from_dataset(unbalanced_dataset(), num=6, seed=seed)
    assert len(probes) == 6
    counts = torch.bincount(probes.labels, minlength=3).tolist()
    assert counts == [2, 2, 2]
    # images really are the dataset items at the stored indices
    assert torch.equal(probes.images[:, 0, 0, 0], probes.indices.float())


def test_probe_same_seed_same_indices_other_seed_differs():
    ds = tiny_dataset(60)
    a = ProbeSet.from_dataset(ds, num=8, seed=3)
    b = ProbeSet.from_dataset(ds, num=8, seed=3)
    c = ProbeSet.from_dataset(ds, num=8, seed=4)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
    assert not torch.equal(a.indices, c.indices)


def test_probe_does_not_consume_global_rng():
    state = torch.get_rng_state()
    ProbeSet.from_dataset(tiny_dataset(30), num=5, seed=0)
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_probe_shards_concatenate_to_full_set(world):
    probes = ProbeSet.from_dataset(tiny_dataset(30), num=7, seed=0)
    shards = [probes.shard(r, world) for r in range(world)]
    sizes = [len(s) for s in shards]
    assert sum(sizes) == 7 and max(sizes) - min(sizes) <= 1
    nonempty = [s for s in shards if len(s)]
    assert torch.equal(torch.cat([s.images for s in nonempty]), probes.images)
    assert torch.equal(torch.cat([s.labels for s in nonempty]), probes.labels)
    assert [i for s in shards for i in s.ids] == probes.ids == [f"p{i:03d}" for i in range(7)]


def test_probe_state_dict_round_trip():
    masks = torch.rand(4, 1, 5, 5)
    probes = ProbeSet(
        torch.randn(4, 3, 5, 5),
        labels=torch.tensor([0, 1, 2, 1]),
        masks=masks,
        mean=[0.1, 0.2, 0.3],
        std=[1.0, 2.0, 3.0],
    )
    back = ProbeSet.from_state_dict(probes.state_dict())
    assert torch.equal(back.images, probes.images) and torch.equal(back.labels, probes.labels)
    assert torch.equal(back.masks, masks[:, 0]) and torch.equal(back.indices, probes.indices)
    assert back.mean == [0.1, 0.2, 0.3] and back.std == [1.0, 2.0, 3.0]
    assert back.fingerprint() == probes.fingerprint()
    # display undoes the normalization: x * std + mean, clipped to [0, 1]
    expected = (
        probes.images * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1) + torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)
    ).clamp(0, 1)
    assert torch.allclose(back.display_images(), expected)


def test_probe_scalar_stats_and_wrong_channel_count():
    """A datamodule may give mean/std as plain numbers (MNIST-style ``mean = 0.1307``): one value per channel."""
    x = torch.randn(2, 1, 3, 3)
    for mean, std in ((0.5, 0.25), (torch.tensor(0.5), torch.tensor(0.25)), (torch.tensor([0.5]), [0.25])):
        probes = ProbeSet(x, mean=mean, std=std)
        back = ProbeSet.from_state_dict(probes.state_dict())  # what a checkpoint saves and loads
        assert back.mean == [0.5] and back.std == [0.25]
        assert torch.allclose(back.display_images(), (x * 0.25 + 0.5).clamp(0, 1))
    with pytest.raises(ValueError, match=r"mean has 3 values but the probe images have 4 channels.*1 or 4"):
        ProbeSet(torch.randn(2, 4, 3, 3), mean=[0.5] * 3, std=[0.2] * 3)


def test_probe_picked_under_inference_mode_is_usable_by_autograd():
    with torch.inference_mode():
        probes = ProbeSet.from_dataset(tiny_dataset(12), num=3, seed=0)
    assert not probes.images.is_inference() and not probes.labels.is_inference()
    logits = torch.randn(3, 3, requires_grad=True)
    score = resolve_target("label")(logits, probes.labels).sum()
    (g,) = torch.autograd.grad(score, logits)
    assert torch.equal(g, F.one_hot(probes.labels, 3).float())


def test_probe_one_hot_labels_are_classes_and_multi_labels_are_dropped_not_a_crash():
    """One-hot targets give their class; multi-label targets are no class index: the probes keep no labels
    (images still usable)."""
    x = torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1).expand(12, 1, 2, 2).clone()
    onehot = F.one_hot(torch.arange(12) % 3, 3).float()
    probes = ProbeSet.from_dataset(TensorDataset(x, onehot), num=4, seed=0)
    assert torch.equal(probes.labels, probes.indices % 3) and len(probes) == 4
    multi = onehot + F.one_hot((torch.arange(12) + 1) % 3, 3).float()
    probes = ProbeSet.from_dataset(TensorDataset(x, multi), num=4, seed=0)
    assert probes.labels is None and len(probes) == 4
    assert torch.equal(probes.images[:, 0, 0, 0], probes.indices.float())


class _WithTargets(TensorDataset):
    """A dataset exposing its labels as ``targets`` (as torchvision's), here one-hot rows or class names."""

    def __init__(self, x, y, targets):
        super().__init__(x, y)
        self.targets = targets


def test_probe_one_hot_labels_of_any_dtype_and_non_scalar_targets_attribute():
    """int32 one-hot rows (numpy's) are classes too; a ``targets`` attribute of one-hot rows, lists or class names
    stratifies the pick instead of crashing it (``int(row)``: 'only one element tensors can be converted')."""
    x = torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1).expand(12, 1, 2, 2).clone()
    y = torch.arange(12) % 3
    onehot = F.one_hot(y, 3)
    probes = ProbeSet.from_dataset(TensorDataset(x, onehot.int()), num=4, seed=0)
    assert probes.labels is not None and torch.equal(probes.labels, probes.indices % 3)
    for targets in (onehot.float(), onehot.tolist(), [["a", "b", "c"][int(i)] for i in y]):
        probes = ProbeSet.from_dataset(_WithTargets(x, onehot.float(), targets), num=3, seed=0)
        assert torch.equal(probes.labels, probes.indices % 3)
        if not isinstance(targets[0], str):  # one of each class: stratified by the targets' classes
            assert sorted(probes.labels.tolist()) == [0, 1, 2]


# ----------------------------------------------------------------------------- layers
class CompiledLike(nn.Module):
    """What ``torch.compile`` returns (an OptimizedModule keeping the model as ``_orig_mod``), without compiling."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model


def test_layers_canonical_names_through_compile_wrapper():
    model = TinyCNN()
    compiled = CompiledLike(model)  # names gain '_orig_mod.'
    assert any(n.startswith("_orig_mod.") for n, _ in compiled.named_modules())
    assert canonical_name("_orig_mod.net._orig_mod.conv1") == "net.conv1"
    # only whole segments are wrappers' (names that merely contain them stay as they are)
    assert canonical_name("net.my_orig_mode._orig_mod") == "net.my_orig_mode"
    assert canonical_name("x_checkpoint_wrapped_modules.conv1") == "x_checkpoint_wrapped_modules.conv1"
    assert canonical_name("") == "" and canonical_name("net.conv1") == "net.conv1"
    assert get_layer(compiled, "conv1") is model.conv1
    assert get_layer(compiled, "_orig_mod.conv2") is model.conv2
    assert "conv1" in named_layers(compiled) and not any("_orig_mod" in n for n in named_layers(compiled))
    assert first_conv_name(compiled) == "conv1" and last_conv_name(compiled) == "conv2"
    assert resolve_layers(compiled, None) == ["conv2"]
    assert resolve_layers(compiled, None, default="first_conv") == ["conv1"]
    assert resolve_layers(compiled, "_orig_mod.bn1") == ["bn1"]


def test_layers_canonical_names_through_activation_checkpoint_wrappers():
    """``apply_activation_checkpointing`` (what Lightning's FSDP ``activation_checkpointing_policy`` does) wraps
    layers in a CheckpointWrapper holding them as ``_checkpoint_wrapped_module``: the layer keeps its name and kind.
    Was: 'conv1' named the wrapper (not a convolution) and the conv was '...conv1._checkpoint_wrapped_module'."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = TinyCNN()
    conv1, conv2 = model.conv1, model.conv2
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, nn.Conv2d))
    assert type(model.conv1).__name__ == "CheckpointWrapper"
    assert canonical_name("net.conv1._checkpoint_wrapped_module") == "net.conv1"
    assert get_layer(model, "conv1") is conv1 and get_layer(model, "conv2._checkpoint_wrapped_module") is conv2
    assert not any("_checkpoint_wrapped_module" in n for n in named_layers(model))
    assert first_conv_name(model) == "conv1" and last_conv_name(model) == "conv2"
    assert resolve_layers(model, None) == ["conv2"]


def test_layers_errors_list_valid_names():
    model = TinyCNN()
    with pytest.raises(LayerNotFoundError, match=r"'conv3'.*'conv1', 'conv2'.*'fc'"):
        get_layer(model, "conv3")
    with pytest.raises(LayerNotFoundError) as err:
        require_conv(model, "fc", "Grad-CAM")
    msg = str(err.value)
    assert "Grad-CAM" in msg and "'fc'" in msg and "Linear" in msg and "'conv1'" in msg and "'conv2'" in msg
    assert require_conv(model, "conv2", "Grad-CAM") is model.conv2
    with pytest.raises(LayerNotFoundError, match="has none"):
        first_conv_name(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


# ----------------------------------------------------------------------------- render
def test_normalize_maps_values():
    m = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[5.0, 5.0], [5.0, 5.0]]])
    per = normalize_maps(m, "per_image")
    assert torch.allclose(per[0], torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]]))
    assert torch.equal(per[1], torch.zeros(2, 2))  # constant map: no division by zero
    signed = normalize_maps(torch.tensor([[[-2.0, 1.0]]]), "per_image", signed=True)
    assert torch.allclose(signed, torch.tensor([[[0.0, 0.75]]]))
    fixed = normalize_maps(m, "fixed", vmin=1.0, vmax=3.0)
    assert torch.allclose(fixed[0], torch.tensor([[0.0, 0.0], [0.5, 1.0]]))
    assert torch.equal(fixed[1], torch.ones(2, 2))  # clipped
    with pytest.raises(ValueError, match="vmin and vmax"):
        normalize_maps(m, "fixed")


def test_colormap_endpoints():
    ends = torch.tensor([[[0.0, 1.0]]])
    gray = colormap(ends, "gray")
    assert gray.shape == (1, 3, 1, 2)
    assert torch.allclose(gray[0, :, 0, 0], torch.zeros(3)) and torch.allclose(gray[0, :, 0, 1], torch.ones(3))
    jet = colormap(ends, "jet")
    cmap = matplotlib.colormaps["jet"]
    assert torch.allclose(jet[0, :, 0, 0], torch.tensor(cmap(0.0)[:3], dtype=torch.float32))
    assert torch.allclose(jet[0, :, 0, 1], torch.tensor(cmap(1.0)[:3], dtype=torch.float32))
    with pytest.raises(ValueError, match="unknown colormap 'nope'"):
        colormap(ends, "nope")
    # A diverged model's NaN maps render as the colormap's low end instead of an index error.
    nan = colormap(torch.tensor([[[float("nan"), 1.0]]]), "gray")
    assert torch.equal(nan[0, :, 0, 0], torch.zeros(3)) and torch.allclose(nan[0, :, 0, 1], torch.ones(3))


def test_overlay_alpha_arithmetic():
    image = torch.full((1, 3, 4, 4), 0.2)
    maps = torch.zeros(1, 2, 2)
    maps[0, 0, 0] = 1.0  # resized (bilinear) to 4x4; the gray heat equals the resized map
    out = overlay(image, maps, alpha=0.25, cmap="gray")
    heat = F.interpolate(maps.unsqueeze(1), size=(4, 4), mode="bilinear", align_corners=False)[:, 0]
    heat = (heat * 255).round() / 255  # the colormap's 256-entry lookup table
    expected = 0.75 * 0.2 + 0.25 * heat
    assert torch.allclose(out, expected.unsqueeze(1).expand(-1, 3, -1, -1), atol=1e-6)
    assert to_uint8_hwc(out[0]).shape == (4, 4, 3)


def test_numpy_rendering_gives_the_pixels_of_the_torch_formulas():
    """colormap, overlay, upscale and to_uint8 run in numpy: exactly the values of the torch formulas they replace
    (NaN and infinite maps, images outside [0, 1], gray images, alphas that are not binary fractions)."""
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 5, 6, generator=g) * 1.4 - 0.2
    maps[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    lut = torch.tensor(matplotlib.colormaps["viridis"](torch.linspace(0, 1, 256).numpy())[:, :3], dtype=torch.float32)
    heat = lut[(maps.nan_to_num(0.0).clamp(0, 1) * 255).round().long()].permute(0, 3, 1, 2)
    assert torch.equal(colormap(maps, "viridis"), heat)
    for channels, alpha in [(3, 0.5), (3, 0.3), (1, 0.123)]:
        images = torch.rand(2, channels, 10, 12, generator=g) * 1.2 - 0.1
        big = F.interpolate(maps.unsqueeze(1), size=(10, 12), mode="bilinear", align_corners=False)[:, 0]
        idx = (big.nan_to_num(0.0).clamp(0, 1) * 255).round().long()
        want = ((1 - alpha) * images.expand(-1, 3, -1, -1) + alpha * lut[idx].permute(0, 3, 1, 2)).clamp(0, 1)
        assert torch.equal(overlay(images, maps, alpha, "viridis"), want)
        assert torch.equal(to_uint8(want), (want * 255).round().to(torch.uint8))
    for factor_px, size in [(64, (7, 13)), (100, (33, 40)), (129, (43, 5))]:
        x = torch.rand(2, 3, *size, generator=g)
        factor = min(-(-factor_px // min(size)), 4 * factor_px // max(size))  # the longer side <= 4 * factor_px
        want = F.interpolate(x, scale_factor=factor, mode="nearest")
        assert torch.equal(upscale(x, factor_px), want)
        up8 = upscale(to_uint8(x), factor_px)
        assert up8.dtype == torch.uint8 and torch.equal(up8, to_uint8(want))
        # uint8 images keep [..., H, W, C] memory (what compose pastes and PNG rows take), CHW-strided too
        assert up8.movedim(1, -1).is_contiguous() and to_uint8(x).movedim(1, -1).is_contiguous()
        assert torch.equal(upscale(to_uint8(x).contiguous(), factor_px), up8)
    assert torch.equal(
        to_uint8(torch.tensor([float("nan"), -1.0, 0.5 / 255, 1.5 / 255, 2.0])),
        torch.tensor([0, 0, 0, 2, 255], dtype=torch.uint8),
    )


def test_filmstrip_width_bounded_keeps_first_and_last():
    frames = [torch.full((3, 8, 8), i / 29) for i in range(30)]
    strip = filmstrip(frames, max_frames=5, padding=2)
    assert strip.shape == (3, 8 + 2 * 2, 5 * 8 + 6 * 2)
    assert torch.allclose(strip[:, 2:10, 2:10], frames[0])
    assert torch.allclose(strip[:, 2:10, -10:-2], frames[-1])
    assert filmstrip(frames[:3], max_frames=5).shape[-1] == 3 * 8 + 4 * 2


# ----------------------------------------------------------------------------- targets
def test_targets_scores():
    logits = torch.tensor([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]])
    labels = torch.tensor([2, 1])
    assert torch.equal(resolve_target("label")(logits, labels), torch.tensor([2.0, 0.0]))
    assert torch.equal(resolve_target("predicted")(logits, labels), torch.tensor([5.0, 7.0]))
    assert torch.equal(resolve_target("predicted").classes(logits, None), torch.tensor([1, 0]))
    assert torch.equal(resolve_target(2)(logits, None), torch.tensor([2.0, 3.0]))
    assert torch.equal(resolve_target("0")(logits, None), torch.tensor([1.0, 7.0]))
    assert torch.equal(resolve_target(np.argmax([0, 0, 1]))(logits, None), torch.tensor([2.0, 3.0]))  # numpy's int
    margin = resolve_target(lambda z: z[:, 0] - z[:, 1])
    assert torch.equal(margin(logits), torch.tensor([-4.0, 7.0]))
    assert margin.classes(logits, labels) is None


def test_target_errors():
    logits = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"target class 3 is out of range.*3 classes \(0..2\)"):
        ClassTarget(3)(logits)
    with pytest.raises(ValueError, match="needs labels"):
        resolve_target("label")(logits, None)
    with pytest.raises(ValueError, match=r"unknown target 'best'.*'label', 'predicted'.*by its index, not by its name"):
        resolve_target("best")
    with pytest.raises(ValueError, match=r"invalid target True; allowed: 'label', 'predicted'"):
        resolve_target(True)
    with pytest.raises(ValueError, match=r"one score per sample"):
        resolve_target(lambda z: z.sum())(logits)
    for neg in (-1, "-1"):  # caught when the callback is built, not at the first epoch end
        with pytest.raises(ValueError, match=r"target class index must be >= 0; got -1"):
            resolve_target(neg)


# ----------------------------------------------------------------------------- capture / isolation
def test_capture_hooks_removed_on_exception():
    model = TinyCNN()
    with pytest.raises(RuntimeError, match="inside"):
        with capture(model, ["conv1", "bn1", "fc"]):
            assert len(model.conv1._forward_hooks) == 1
            raise RuntimeError("inside")
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(LayerNotFoundError):  # a bad name half-way: the hooks already added are removed
        with capture(model, ["conv1", "nope"]):
            pass
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_records_pre_inplace_relu_values():
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 6, 6)
    for grad in (False, True):
        with isolated(model), capture(model, ["bn1"], grad=grad) as cap:
            out = model(x)
        expected = model.bn1(model.conv1(x)).detach()
        assert (expected < 0).any()
        assert torch.allclose(cap["bn1"].detach(), expected, atol=1e-6)
        assert torch.allclose(out.detach(), model(x).detach(), atol=1e-6)


def test_capture_grad_equals_hand_computation():
    """score = fc(mean_hw(relu(conv2_out)))[k]  =>  d score / d conv2_out = 1[conv2_out > 0] * W_fc[k, c] / (h w)."""
    model = TinyCNN(width=3)
    x = torch.randn(2, 3, 5, 5)
    k = 1

    def run():
        with isolated(model) as m, capture(m, ["conv2", "pool"], grad=True) as cap:
            score = m(x)[:, k].sum()
            return [t.detach() for t in torch.autograd.grad(score, [cap["conv2"], cap["pool"]])], cap["conv2"].detach()

    (g_conv, g_pool), a = check_untouched(model, run)
    w = model.fc.weight[k].detach()
    assert torch.allclose(g_pool, w.view(1, 3, 1, 1).expand(2, -1, -1, -1))
    expected = (a > 0).float() * w.view(1, 3, 1, 1) / 25
    assert torch.allclose(g_conv, expected, atol=1e-7)


def _call_counter(model: nn.Module) -> tuple[dict[str, int], list]:
    calls = {n: 0 for n, _ in model.named_children()}
    handles = [
        m.register_forward_pre_hook(lambda mod, args, n=n: calls.__setitem__(n, calls[n] + 1))
        for n, m in model.named_children()
    ]
    return calls, handles


def test_forward_until_stops_after_the_last_named_layer_with_the_same_capture_and_no_hooks_left():
    model = TinyCNN().eval()
    x = torch.randn(2, 3, 6, 6)
    with isolated(model):
        xf = x.clone().requires_grad_(True)
        with capture(model, ["bn1"], grad=True) as full:  # reference: the whole forward
            model(xf)
        ref = full["bn1"]
        g_ref = torch.autograd.grad(ref.square().sum(), xf)[0]
        calls, handles = _call_counter(model)
        with capture(model, ["bn1"], grad=True) as cap, forward_until(model, ["bn1"]) as run:
            assert isinstance(run(lambda: model(x)), torch.Tensor)  # the first pass runs through and counts
            assert calls["fc"] == 1
            cap.clear()
            xc = x.clone().requires_grad_(True)
            assert run(lambda: model(xc)) is None  # cut: nothing after bn1 ran
            assert calls == {"conv1": 2, "bn1": 2, "relu": 1, "conv2": 1, "pool": 1, "fc": 1}
            assert torch.equal(cap["bn1"], ref)
            assert torch.equal(torch.autograd.grad(cap["bn1"].square().sum(), xc)[0], g_ref)
        for h in handles:
            h.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_forward_until_never_cuts_reused_layers_wrappers_or_swallowed_stops():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1)
            self.head = nn.Linear(1, 2)

        def forward(self, x):
            return self.head(self.conv(self.conv(x)).mean((1, 2, 3)).view(-1, 1))

    x = torch.randn(2, 1, 5, 5)
    model = Reuse().eval()
    calls, handles = _call_counter(model)
    with torch.no_grad(), forward_until(model, ["conv"]) as run:
        for _ in range(3):
            assert run(lambda: model(x)) is not None  # conv runs twice per pass: never cut
    assert calls["head"] == 3
    tiny = TinyCNN().eval()
    wrapped = nn.DataParallel(tiny)  # CPU: runs the module itself
    calls, handles2 = _call_counter(tiny)
    with torch.no_grad(), forward_until(wrapped, ["module.bn1"]) as run:
        for _ in range(2):
            assert run(lambda: wrapped(x.expand(-1, 3, -1, -1))) is not None
    assert calls["fc"] == 2

    def swallowing(model, x):  # model code catching Exception cannot swallow the stop
        try:
            return model(x)
        except Exception:
            return None

    calls, handles3 = _call_counter(tiny)
    with torch.no_grad(), forward_until(tiny, ["bn1"]) as run:
        assert run(lambda: swallowing(tiny, x.expand(-1, 3, -1, -1))) is not None
        assert run(lambda: swallowing(tiny, x.expand(-1, 3, -1, -1))) is None
    assert calls["fc"] == 1 and calls["bn1"] == 2
    for h in handles + handles2 + handles3:
        h.remove()
    assert all(not m._forward_hooks for m in list(model.modules()) + list(wrapped.modules()))
    with pytest.raises(LayerNotFoundError), forward_until(tiny, ["bn1", "nope"]):
        pass
    assert all(not m._forward_hooks for m in tiny.modules())


def test_isolated_restores_everything_and_enables_grad_under_inference_mode():
    model = TinyCNN()
    model.bn1.eval()  # mixed modes must come back per submodule
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model.conv1.bias.requires_grad_(False)

    def run():
        with torch.inference_mode():
            x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
            with isolated(model) as m:
                assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
                assert not any(mod.training for mod in m.modules())
                assert not any(p.requires_grad for p in m.parameters())
                torch.randn(5)  # the global RNG is forked
                xi = x.clone().requires_grad_()
                (g,) = torch.autograd.grad(m(xi).sum(), xi)
                return g

    g = check_untouched(model, run)
    assert g.shape == (2, 3, 4, 4) and g.abs().sum() > 0
    assert model.training and not model.bn1.training


def test_attributes_kept_restores_plain_attributes_and_collections_only():
    """Plain attributes changed, added or deleted in the block are as before; a list and a dict get their items back
    in place; a tensor attribute the block rebinds stays rebound (not plain state); an untouched module is left."""
    net = TinyCNN()
    sub = net.conv1
    sub.count, sub.flag, sub.name, sub.feats, sub.cache = 3, True, "a", [1], {"k": 1}
    feats, cache, weight = sub.feats, sub.cache, torch.ones(2)
    sub.scale = weight
    with attributes_kept(net):
        sub.count += 1
        sub.flag = None
        del sub.name
        sub.added = 7
        sub.feats.append(2)
        sub.cache["j"] = 2
        sub.scale = torch.zeros(2)
    assert (sub.count, sub.flag, sub.name) == (3, True, "a") and not hasattr(sub, "added")
    assert sub.feats is feats and feats == [1] and sub.cache is cache and cache == {"k": 1}
    assert torch.equal(sub.scale, torch.zeros(2))
    before = dict(vars(net.conv2))
    with attributes_kept(net):
        pass
    assert all(vars(net.conv2)[k] is v for k, v in before.items()) and vars(net.conv2).keys() == before.keys()


def test_eval_mode_restores_on_exception():
    model = TinyCNN()
    model.relu.eval()
    with pytest.raises(KeyError):
        with eval_mode(model):
            raise KeyError("x")
    assert model.training and model.conv1.training and not model.relu.training


def test_upscale_keeps_the_longer_side_of_elongated_images_within_four_times_the_target():
    """A 16 x 256 spectrogram at display_px=128 was upscaled 8x to 128 x 2048 (a panel of three ~6000 px wide); the
    longer side now stays <= 4 * 128 (factor 2: 32 x 512); square and mildly non-square images are as before."""
    assert upscale(torch.rand(1, 1, 16, 256), 128).shape == (1, 1, 32, 512)
    assert upscale(torch.rand(1, 1, 256, 16), 128).shape == (1, 1, 512, 32)
    assert upscale(torch.rand(1, 3, 8, 8), 128).shape == (1, 3, 128, 128)
    assert upscale(torch.rand(1, 3, 48, 80), 128).shape == (1, 3, 144, 240)
    assert upscale(torch.rand(1, 1, 4, 2000), 128).shape == (1, 1, 4, 2000)  # already long: kept


def test_normalize_maps_keeps_the_full_colormap_for_maps_of_tiny_magnitude():
    # an as-built EfficientNet-B0's saliency is ~1e-14 (its BatchNorm statistics are still the initial ones): drawn
    # on the full colormap as any other map, not squeezed into its bottom by a 1e-12 floor of the range
    m = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    s = torch.tensor([[[-2.0, 1.0], [0.5, 4.0]]])
    for tiny in (1e-14, 1e-20):
        torch.testing.assert_close(normalize_maps(m * tiny), normalize_maps(m))
        torch.testing.assert_close(normalize_maps(s * tiny, signed=True), normalize_maps(s, signed=True))
        torch.testing.assert_close(
            normalize_maps(m * tiny, "fixed", vmin=tiny, vmax=3 * tiny), normalize_maps(m, "fixed", vmin=1, vmax=3)
        )
        scale = FixedScale(quantile=1.0, signed=True)
        assert scale.update(s * tiny) == pytest.approx((-4 * tiny, 4 * tiny))
    assert (normalize_maps(torch.zeros(1, 2, 2), signed=True) == 0.5).all()  # all zero: still drawn as zero
    assert FixedScale().update(torch.zeros(1, 2, 2))[1] > 0
