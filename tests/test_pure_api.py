"""The pure methods called directly, as README's "Using the methods without Lightning" shows: clear early errors
for wrong inputs, the model and the global RNG left as they were, and edge numerics (NaN probes, NaN maps)."""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torchvision
from helpers import LitTiny, TinyCNN

import lightning_viz
from lightning_viz.callbacks import CAMCallback
from lightning_viz.capture import isolated
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.methods import (
    class_activation_map,
    class_model_images,
    deletion_auc,
    extract_features,
    feature_maps,
    fgsm,
    guided_class_activation_map,
    integrated_gradients,
    invert_features,
    occlusion,
    pca_2d,
    pointing_game,
    rank_correlation,
    receptive_field,
    saliency,
    scan_topk,
    smoothgrad,
    topk_iou,
    tsne_2d,
    unit_images,
)
from lightning_viz.methods.adversarial import minimal_flip_budget
from lightning_viz.methods.cam import scorecam_weights
from lightning_viz.methods.metrics import perturbation_curve
from lightning_viz.methods.receptive_field import gradient_receptive_field
from lightning_viz.methods.shared_pass import gradient_pass
from lightning_viz.probe import ProbeSet
from lightning_viz.targets import ModelAdapter, model_adapter


def _resnet(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes)


def _images(b: int = 2, side: int = 16) -> torch.Tensor:
    return torch.randn(b, 3, side, side, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: saliency(m, x, 0),
        lambda m, x: integrated_gradients(m, x, 0, steps=2),
        lambda m, x: smoothgrad(saliency, m, x, 0, n_samples=2),
        lambda m, x: class_activation_map(m, x, "layer4", method="scorecam", target=0),
        lambda m, x: occlusion(m, x, 0),
        lambda m, x: deletion_auc(m, x, torch.rand(2, 16, 16), 0),
        lambda m, x: class_model_images(m, [0], [3, 16, 16], steps=1),
        lambda m, x: invert_features(m, x, "layer2", steps=1),
        lambda m, x: receptive_field(m, "layer2", [3, 16, 16], method="gradient"),
    ],
    ids=["saliency", "ig", "smoothgrad", "scorecam", "occlusion", "deletion", "class_model", "inversion", "rf"],
)
def test_a_model_in_training_mode_is_refused_before_any_forward(call):
    # a fresh torchvision model is in training mode: before, BatchNorm updated its running statistics on every
    # forward (or the memory probe's batch of one failed with "Expected more than 1 value per channel")
    model, x = _resnet(), _images()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"training mode \('bn1'.*isolated\(model\)") as info:
        call(model, x)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # the advice as typed after `import lightning_viz` (was lightning_viz.capture.isolated: the function capture)
    advice = re.search(r"inside (lightning_viz[\w.]*)\(model\)", str(info.value)).group(1)
    isolate = functools.reduce(getattr, advice.split(".")[1:], lightning_viz)
    with isolate(model) as m:  # as documented: eval mode inside, restored on exit
        call(m, x)
    assert model.training and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_labels_must_be_one_per_image():
    model, x = _resnet().eval(), _images()
    with pytest.raises(ValueError, match="one label per image: got 1 labels for 2 images"):
        saliency(model, x, "label", torch.tensor([1]))  # before: broadcast to every image
    with pytest.raises(ValueError, match="one label per image"):
        occlusion(model, x, "label", torch.tensor([1]))


def test_an_image_without_batch_dimension_fails_clearly():
    model, x = _resnet().eval(), _images()
    with pytest.raises(ValueError, match=r"x must be a float image batch \[B, C, H, W\].*x\[None\].*\(3, 16, 16\)"):
        class_activation_map(model, x[0], "layer4", target=0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        occlusion(model, x[0], 0)


def test_deletion_maps_of_another_batch_fail_clearly():
    model, x = _resnet().eval(), _images()
    with pytest.raises(ValueError, match=r"maps must be \[B, h, w\] with B=2; got \(3, 16, 16\)"):
        deletion_auc(model, x, torch.rand(3, 16, 16), 0)


def test_one_logit_head_error_points_to_model_adapter():
    model = _resnet(num_classes=1).eval()
    with pytest.raises(ValueError, match="model_adapter"):
        saliency(model, _images(), "label", torch.tensor([0, 1]))
    assert saliency(model_adapter(model), _images(), "label", torch.tensor([0, 1])).shape == (2, 16, 16)


class _DictOut(TinyCNN):
    def forward(self, x):
        return {"logits": super().forward(x)}


class _Squeezed(TinyCNN):
    def __init__(self):
        super().__init__(num_classes=1)

    def forward(self, x):
        return super().forward(x).squeeze(1)


@pytest.mark.parametrize(
    "call,fn",
    [
        (lambda m, x: saliency(m, x, "predicted"), "gradient and CAM methods"),
        (lambda m, x: occlusion(m, x, 0, window=4), "occlusion"),
        (lambda m, x: deletion_auc(m, x, torch.rand(2, 8, 8), "predicted", steps=2), "deletion/insertion"),
        (lambda m, x: fgsm(m, x, torch.tensor([0, 1]), 0.1), "adversarial attack"),
        (lambda m, x: class_model_images(m, [0], [3, 8, 8], steps=1), "objective 'class_logit"),
    ],
    ids=["saliency", "occlusion", "deletion", "fgsm", "class_model"],
)
def test_a_model_returning_no_logits_tensor_is_told_to_use_model_adapter(call, fn):
    """A dict output or a one-logit head squeezed to [B], given to the pure methods unwrapped: one clear error naming
    the method, what the model returned and model_adapter (was: AttributeError / IndexError / a cross-entropy
    RuntimeError deep inside); wrapped, they run."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    for model, got in ((_DictOut(), r"a dict with keys \['logits'\]"), (_Squeezed(), r"a Tensor of shape \(\d,\)")):
        model.eval()
        with pytest.raises(ValueError, match=rf"{fn}.*must return logits \[B, K\].*{got}.*model_adapter"):
            call(model, x)
        call(model_adapter(model), x)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: perturbation_curve(m, x, torch.rand(2, 8, 8), "predicted", steps=3),
        lambda m, x: occlusion(m, x, 1 if isinstance(m, ModelAdapter) else 0, window=4)["prob"],
        lambda m, x: class_activation_map(m, x, "conv2", "scorecam", target=0),
        lambda m, x: fgsm(m, x, torch.tensor([0, 0]), 0.5) - x,
        lambda m, x: minimal_flip_budget(m, x, _clean(m, x), 4.0),
    ],
    ids=["deletion_curve", "occlusion_prob", "scorecam", "fgsm", "min_flip"],
)
def test_a_raw_one_logit_head_is_refused_where_its_softmax_is_degenerate(call):
    """A [B, 1] model given unwrapped to the methods that take a softmax or arg-max over the classes: curves flat at 1,
    occlusion's prob drop 0, Score-CAM all zero, FGSM no step at all, no budget flipping anything (a softmax / arg-max
    over one column), silently. Now a clear error pointing at model_adapter; wrapped, the values move."""
    torch.manual_seed(0)
    net, x = TinyCNN(num_classes=1).eval(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # a logit that the input moves across 0
        net.fc.bias.zero_()
        net.fc.weight.mul_(10)
    with pytest.raises(ValueError, match=r"one logit \[B, 1\].*model_adapter\(model\)"):
        call(net, x)
    out = call(model_adapter(net), x)
    finite = out[torch.isfinite(out)]
    assert finite.numel() and float(finite.std() if finite.numel() > 1 else finite.abs().sum()) > 0


def _clean(m, x):
    """The model's predicted classes (through the adapter; class 0 for a raw one-logit model, refused later)."""
    with torch.no_grad():
        return m(x).argmax(1)


def test_synthesis_without_generator_never_draws_from_the_global_rng():
    model, x = _resnet().eval(), _images()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = invert_features(model, x, "layer2", steps=2).images  # init="noise", no generator given
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)  # another global state: the same images
    assert torch.equal(invert_features(model, x, "layer2", steps=2).images, a)


def test_eigencam_of_a_nan_probe_is_nan_and_leaves_the_others_alone():
    model, x = _resnet().eval(), _images(3)
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    clean = class_activation_map(model, x, "layer4", method="eigencam", target=0)
    maps = class_activation_map(model, bad, "layer4", method="eigencam", target=0)  # before: LinAlgError
    assert maps[1].isnan().all()
    torch.testing.assert_close(maps[[0, 2]], clean[[0, 2]])


def test_pointing_game_and_topk_iou_of_a_nan_map_are_nan():
    maps = torch.zeros(2, 4, 4)
    maps[:, 3, 3] = 1.0
    maps[1, 0, 0] = float("nan")  # argmax would take the NaN as the peak: a "hit" on this mask
    masks = torch.zeros(2, 4, 4, dtype=torch.bool)
    masks[:, 0, 0] = True
    masks[0, 3, 3] = True
    assert pointing_game(maps, masks)[0] == 1 and pointing_game(maps, masks)[1].isnan()
    iou = topk_iou(maps, maps.flip(-1), fraction=1 / 16)  # the top pixel: (3, 3) vs (3, 0)
    assert iou[0] == 0 and iou[1].isnan()


def test_projections_name_the_non_finite_rows():
    f = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    f[2, 0] = float("nan")
    for project in (pca_2d, tsne_2d):
        with pytest.raises(ValueError, match=r"rows \[2\] are not finite"):
            project(f)


def test_cam_callback_with_eigencam_leaves_a_nan_probe_out_instead_of_failing():
    net = LitTiny(TinyCNN())
    images = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    images[1, 0, 2, 2] = float("nan")  # one probe image with a NaN pixel (before: SVD failed for the whole set)
    probe = ProbeSet(images=images, labels=torch.tensor([0, 1, 2]))
    with isolated(net):
        maps = CAMCallback(methods=["eigencam"], layers=["net.conv2"]).compute_maps(net, probe)
    (key,) = maps
    assert maps[key][1].isnan().all() and maps[key][[0, 2]].isfinite().all()


def test_scorecam_masks_of_a_constant_channel_are_zero_not_interpolation_noise():
    # resnet18 at 32 px: layer4 is 1 x 1, so every upsampled activation map is constant up to the rounding of the
    # bilinear interpolation; before, min-max normalization stretched that noise to random [0, 1] masks and the
    # weights differed per channel (and between float32 and float64 by ~1e-3)
    model, x = _resnet(10).eval(), _images(2, 32)
    acts = gradient_pass(model, x, 0, None, ["layer4"], input_grad=False).activations["layer4"]
    assert acts.shape[-2:] == (1, 1)
    w = scorecam_weights(model, x, acts, 0)
    zero = torch.softmax(model(torch.zeros_like(x)), dim=1)[:, 0]  # every mask zero: the blank image's probability
    torch.testing.assert_close(w, zero[:, None].expand_as(w))
    m64 = model.double()
    maps64 = class_activation_map(m64, x.double(), "layer4", method="scorecam", target=0)
    maps32 = class_activation_map(model.float(), x, "layer4", method="scorecam", target=0)
    torch.testing.assert_close(maps32.double(), maps64, rtol=1e-5, atol=1e-6)


def test_similarity_of_maps_of_different_batches_fails_instead_of_broadcasting():
    a, b = torch.rand(2, 4, 4), torch.rand(1, 4, 4)
    for similarity in (rank_correlation, topk_iou):
        with pytest.raises(ValueError, match=r"image by image; got \(2, 4, 4\) and \(1, 4, 4\)"):
            similarity(a, b)


def test_synthesis_shape_is_one_images_shape():
    model = _resnet().eval()
    with pytest.raises(ValueError, match=r"class_model_images: shape is \(C, H, W\) of one image.*\(16, 16\)"):
        class_model_images(model, [0], [16, 16], steps=1)  # before: "shape must be (B, C, H, W); got (1, 16, 16)"
    with pytest.raises(ValueError, match=r"unit_images: shape is \(C, H, W\)"):
        unit_images(model, "layer2", [0], [1, 3, 16, 16], steps=1)


def test_cam_checks_the_head_as_the_callback_does():
    model, x = _resnet().eval(), _images()
    # layer4.1.conv2 has the head's 512 channels but BatchNorm, the residual add and a ReLU follow it: before, the
    # pure function returned a map from the classifier's weights that is not that layer's CAM
    with pytest.raises(LayerNotFoundError, match="differs from the logits"):
        class_activation_map(model, x, "layer4.1.conv2", method="cam", target=0)
    # a functional ReLU between the layer and the pooling: CAM of ReLU(A), whose spatial mean gives the logits
    net = TinyCNN().eval()  # conv2 -> F.relu -> GAP -> fc
    xs = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cam = class_activation_map(net, xs, "conv2", method="cam", target=1)
    a = torch.relu(net.conv2(net.relu(net.bn1(net.conv1(xs)))))
    expected = torch.relu(torch.einsum("k,bkhw->bhw", net.fc.weight[1], a))
    torch.testing.assert_close(cam, expected.detach())


def test_an_empty_batch_gives_empty_maps_in_occlusion_cam_and_deletion():
    model = TinyCNN(width=3).eval()
    x = _images(0, 8)
    with isolated(model):
        occ = occlusion(model, x, 0, window=4)
        assert occ["score"].shape == occ["prob"].shape == (0, 3, 3)
        for method in ("cam", "gradcam", "scorecam", "ablationcam"):
            assert class_activation_map(model, x, "conv2", method, target=1).shape == (0, 8, 8)
        assert deletion_auc(model, x, torch.zeros(0, 8, 8), 0).shape == (0,)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, y: saliency(m, x, "label", y, chunk_size=1),
        lambda m, x, y: integrated_gradients(m, x, "label", y, steps=2),
        lambda m, x, y: smoothgrad(saliency, m, x, "label", y, n_samples=2),
        lambda m, x, y: class_activation_map(m, x, "conv2", "gradcam", "label", y),
        lambda m, x, y: occlusion(m, x, "label", y, window=4)["score"],
        lambda m, x, y: deletion_auc(m, x, x[:, 0], "label", y),
    ],
    ids=["saliency", "ig", "smoothgrad", "gradcam", "occlusion", "deletion"],
)
def test_labels_are_one_per_image_as_a_tensor_or_a_list(call):
    """More labels than images was silently cut to the first ones per chunk (maps of the wrong classes); a list or
    array of labels failed with AttributeError. Now: a clear error, and a list gives the tensor's maps."""
    model = TinyCNN(width=3).eval()
    x = _images(2, 8)
    with isolated(model):
        with pytest.raises(ValueError, match="one label per image: got 3 labels for 2 images"):
            call(model, x, torch.tensor([0, 2, 1]))
        torch.testing.assert_close(call(model, x, [2, 1]), call(model, x, torch.tensor([2, 1])))


def test_a_numpy_or_0d_tensor_class_index_is_a_target_and_per_image_classes_point_to_labels():
    import numpy as np

    model = TinyCNN(width=3).eval()
    x = _images(2, 8)
    with isolated(model):
        expected = saliency(model, x, 1)
        torch.testing.assert_close(saliency(model, x, np.int64(1)), expected)
        torch.testing.assert_close(saliency(model, x, torch.tensor(1)), expected)
        with pytest.raises(ValueError, match="one class per image: pass them as labels with target='label'"):
            saliency(model, x, torch.tensor([1, 0]))


def test_one_layer_name_is_a_layer_not_its_characters():
    """``feature_maps(model, x, "conv2")`` failed with "Unknown layer 'c'" (the name was iterated)."""
    model = TinyCNN(width=3).eval()
    x = _images(2, 8)
    with isolated(model):
        assert list(feature_maps(model, x, "conv2")) == ["conv2"]
        assert list(gradient_pass(model, x, 0, None, "conv2").activations) == ["conv2"]


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: saliency(m, x, 0),
        lambda m, x: integrated_gradients(m, x, 0, steps=2),
        lambda m, x: class_activation_map(m, x, "conv2", "gradcam", 0),
        lambda m, x: occlusion(m, x, 0, window=4),
        lambda m, x: deletion_auc(m, x, x[:, 0], 0),
    ],
    ids=["saliency", "ig", "gradcam", "occlusion", "deletion"],
)
def test_an_input_of_another_dtype_than_the_model_fails_clearly(call):
    """(the same check covers a device mismatch: torch's bare 'Input type (float) and bias type (double)' error now
    names the method and what to pass)"""
    model = TinyCNN(width=3).double().eval()
    x = _images(2, 8)
    with isolated(model):
        with pytest.raises(ValueError, match=r"x is torch.float32 on cpu but the model's parameters are torch.float64"):
            call(model, x)
        call(model, x.double())


def test_smoothgrad_takes_a_method_by_name():
    model = TinyCNN(width=3).eval()
    x = _images(2, 8)
    with isolated(model):
        torch.testing.assert_close(
            smoothgrad("saliency", model, x, 0, n_samples=2), smoothgrad(saliency, model, x, 0, n_samples=2)
        )
        with pytest.raises(ValueError, match="unknown method 'salency'; allowed: saliency, gradient"):
            smoothgrad("salency", model, x, 0, n_samples=2)


def test_gray_occlusion_with_a_normalization_of_another_channel_count_fails_clearly():
    model = TinyCNN(width=3).eval()
    x = _images(1, 8)
    with isolated(model):
        with pytest.raises(ValueError, match=r"one value per channel \(3\) or one for all; got 2 and 2"):
            occlusion(model, x, 0, window=4, mean=[0.5, 0.5], std=[0.2, 0.2])
        gray = occlusion(model, x, 0, window=4, mean=[0.5], std=[0.25])["score"]
        torch.testing.assert_close(gray, occlusion(model, x, 0, window=4, fill=0.0)["score"])


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, c: saliency(m, x, 0, chunk_size=c),
        lambda m, x, c: gradient_pass(m, x, 0, None, "conv2", chunk_size=c),
        lambda m, x, c: integrated_gradients(m, x, 0, steps=2, chunk_size=c),
        lambda m, x, c: smoothgrad(saliency, m, x, 0, n_samples=2, chunk_size=c),
        lambda m, x, c: smoothgrad(integrated_gradients, m, x, 0, n_samples=2, steps=2, chunk_size=c),
        lambda m, x, c: class_activation_map(m, x, "conv2", "gradcam", 0, chunk_size=c),
        lambda m, x, c: class_activation_map(m, x, "conv2", "scorecam", 0, chunk_size=c),
        lambda m, x, c: class_activation_map(m, x, "conv2", "ablationcam", 0, chunk_size=c),
        lambda m, x, c: guided_class_activation_map(m, x, "conv2", target=0, chunk_size=c),
        lambda m, x, c: occlusion(m, x, 0, window=4, chunk_size=c),
        lambda m, x, c: feature_maps(m, x, "conv2", chunk_size=c),
        lambda m, x, c: deletion_auc(m, x, x[:, 0], 0, chunk_size=c),
        lambda m, x, c: class_model_images(m, [0, 1], (3, 8, 8), steps=1, chunk_size=c),
        lambda m, x, c: gradient_receptive_field(m, "conv2", (3, 8, 8), trials=1, chunk_size=c),
    ],
    ids=[
        "saliency",
        "gradient_pass",
        "ig",
        "smoothgrad",
        "smoothgrad_ig",
        "gradcam",
        "scorecam",
        "ablationcam",
        "guided_gradcam",
        "occlusion",
        "feature_maps",
        "deletion",
        "class_model",
        "rf_gradient",
    ],
)
@pytest.mark.parametrize("value", [0, -1])
def test_chunk_size_below_one_is_refused_by_every_pure_method(call, value):
    """One rule for ``chunk_size`` (:func:`lightning_viz.methods.checks.check_chunk_size`): ``None`` or a whole number
    >= 1. Was: 0 meant the memory budget in integrated gradients, SmoothGrad and Score-CAM, one chunk in
    gradient_pass, Grad-CAM and class_model_images, one image per forward in occlusion, a bare ``range()`` error in
    the gradient receptive field, and was refused by feature_maps and deletion_auc; -1 meant one chunk here, one
    image there, and was refused elsewhere."""
    model = TinyCNN(width=3).eval()
    x = _images(2, 8)
    with isolated(model):
        with pytest.raises(ValueError, match=rf"^chunk_size must be >= 1 or None; got {value}$"):
            call(model, x, value)
        call(model, x, 1)
        call(model, x, None)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, c: extract_features(m, x, "conv2", batch_size=c),
        lambda m, x, c: scan_topk(m, x, "conv2", [0, 1], k=2, batch_size=c),
    ],
    ids=["extract_features", "scan_topk"],
)
def test_batch_size_of_the_feature_scans_follows_the_chunk_size_rule(call):
    """``batch_size`` of extract_features and scan_topk is their chunk size (images per forward): the same rule.
    Was: 0 -> "range() arg 3 must not be zero", -1 -> "torch.cat(): expected a non-empty list of Tensors" or
    "scan_topk got no images", 2.5 -> "'float' object cannot be interpreted as an integer"."""
    model = TinyCNN(width=3).eval()
    x = _images(3, 8)
    with isolated(model):
        for value in (0, -1):
            with pytest.raises(ValueError, match=rf"^batch_size must be >= 1 or None; got {value}$"):
                call(model, x, value)
        with pytest.raises(TypeError, match=r"^batch_size must be a whole number of images >= 1, or None; got 2\.5$"):
            call(model, x, 2.5)

        def parts(result):
            return list(result) if isinstance(result, tuple) else [result.values, result.image, result.y, result.x]

        for a, b in zip(parts(call(model, x, None)), parts(call(model, x, 2))):  # None: all at once
            torch.testing.assert_close(a, b)
