"""Class-model images, unit images and feature inversion: the objective really rises, seeds reproduce,
chunking changes nothing, the model is untouched, real architectures work, and the callbacks log."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    LitTiny,
    TinyCNN,
    check_untouched,
    image_steps,
    read_events,
    scalar_steps,
    tiny_dataset,
    tiny_loaders,
    tiny_trainer,
    trained_tiny_cnn,
)

from lightning_viz.callbacks.synthesis import ClassModelCallback, InversionCallback, UnitCallback
from lightning_viz.capture import capture, isolated
from lightning_viz.layers import LayerNotFoundError
from lightning_viz.methods.objectives import Objective, channel, class_logit, feature_match, neuron
from lightning_viz.methods.regularizers import build_regularizers
from lightning_viz.methods.synthesis import (
    class_model_images,
    invert_features,
    optimize_input,
    unit_images,
    valid_range,
)
from lightning_viz.targets import model_adapter


@pytest.fixture(scope="module")
def trained():
    model, x, _ = trained_tiny_cnn()
    return model, x


@pytest.mark.parametrize("param", ["pixel", "fft"])
def test_class_model_raises_target_score_and_leaves_model_untouched(trained, param):
    model, x = trained
    model.train()
    F.cross_entropy(model(x[:4]), torch.zeros(4, dtype=torch.long)).backward()  # a .grad that must survive

    def run():
        with isolated(model):
            return class_model_images(model, [0, 1, 2], (3, 8, 8), l2=1e-3, steps=20, lr=0.1, param=param, init="zero")

    res = check_untouched(model, run)
    model.zero_grad(set_to_none=True)
    assert (res.scores - res.start_scores > 8.0).all(), (res.start_scores, res.scores)
    with isolated(model), torch.no_grad():  # the reported score is the class logit of the returned image
        torch.testing.assert_close(model(res.images).gather(1, torch.tensor([[0], [1], [2]])).squeeze(1), res.scores)


def test_same_seed_same_images_and_chunked_equals_unchunked(trained):
    model, _ = trained
    regs = dict(jitter=1, blur_every=3, clip_contribution_percentile=5, tv=1e-3, l2_decay=0.01)

    def run(seed, chunk=None, param="pixel"):
        with isolated(model):
            return optimize_input(
                model,
                class_logit([0, 1, 2, 0]),
                (4, 3, 8, 8),
                steps=8,
                lr=0.1,
                param=param,
                regularizers=build_regularizers(**regs),
                init="noise",
                generator=torch.Generator().manual_seed(seed),
                chunk_size=chunk,
            ).images

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.testing.assert_close(run(0, chunk=3), a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(run(0, chunk=1, param="fft"), run(0, param="fft"), atol=1e-5, rtol=1e-4)


def test_unit_images_raise_activation_and_inversion_lowers_feature_error(trained):
    model, x = trained
    bounds = valid_range([0.5] * 3, [0.5] * 3)  # inputs in [-1, 1]
    with isolated(model):
        for unit in ("channel", "neuron"):
            res = unit_images(model, "conv2", [0, 1, 2, 3], (3, 8, 8), unit=unit, steps=15, lr=0.1, bounds=bounds)
            assert (res.scores - res.start_scores > 0.5).all(), (unit, res.start_scores, res.scores)
            assert res.images.min() >= -1 and res.images.max() <= 1
        inv = invert_features(
            model,
            x[:3],
            "conv1",
            steps=30,
            lr=0.1,
            generator=torch.Generator().manual_seed(0),
            regularizers=build_regularizers(tv=1e-3),
        )
    start, end = (-inv.start_scores).sqrt(), (-inv.scores).sqrt()
    assert (end < 0.5 * start).all() and (end < 0.3).all(), (start, end)


def test_activation_objectives_stop_the_forward_after_their_layers_with_the_same_images(trained):
    """channel / neuron / feature_match read no logits: their passes end at their layer (the head never runs
    after the first step), with the images and scores of whole passes, bit for bit."""
    model, x = trained

    def whole(obj):  # the same objective, said to read logits: whole passes
        return Objective(obj.fn, obj.layers, obj.name, uses_logits=True)

    with isolated(model):
        with torch.no_grad(), capture(model, ["conv1"]) as cap:
            model(x[:2])
        objectives = [channel("conv1", [0, 1]), neuron("bn1", [2, 3]), feature_match("conv1", cap["conv1"])]
    assert not any(o.uses_logits for o in objectives) and (objectives[0] + class_logit([0, 1])).uses_logits
    assert not (2.0 * objectives[0] - objectives[1]).uses_logits
    heads = []
    hook = model.fc.register_forward_pre_hook(lambda m, args: heads.append(1))
    try:
        for obj in objectives:
            for regs in (dict(tv=1e-3, jitter=1, blur_every=2), dict(clip_contribution_percentile=10, l2=1e-3)):

                def run(o, regs=regs):
                    with isolated(model):
                        return optimize_input(
                            model,
                            o,
                            (2, 3, 8, 8),
                            steps=6,
                            lr=0.1,
                            regularizers=build_regularizers(**regs),
                            init="noise",
                            generator=torch.Generator().manual_seed(0),
                        )

                heads.clear()
                cut = check_untouched(model, lambda obj=obj: run(obj))  # no hook left behind, nothing changed
                assert len(heads) == 3  # the score passes before and after, and the first (counting) step
                ref = run(whole(obj))
                for field in ("images", "scores", "start_scores"):
                    assert torch.equal(getattr(cut, field), getattr(ref, field)), (obj, regs, field)
    finally:
        hook.remove()


def test_resnet18_in_place_relu_and_reused_modules():
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=5)

    def run():
        with isolated(model):
            # from noise: an all-zero input is a saddle point of a bias-free ReLU network (zero gradient)
            gen = torch.Generator().manual_seed(0)
            units = unit_images(
                model, "layer1.0.conv2", [0, 7], (3, 32, 32), steps=3, lr=0.1, init="noise", generator=gen
            )
            classes = class_model_images(
                model, [1, 4], (3, 32, 32), steps=3, lr=0.1, param="fft", init="noise", generator=gen
            )
        return units, classes

    units, classes = check_untouched(model, run)
    assert (units.scores > units.start_scores).all() and (classes.scores > classes.start_scores).all()


def test_callbacks_log_grids_pairs_and_scalars_every_epoch(tmp_path):
    torch.manual_seed(0)
    model = LitTiny(TinyCNN(width=4))
    train, val = tiny_loaders(24)
    cbs = [
        ClassModelCallback(steps=4, input_shape=[3, 8, 8], blur_every=2, jitter=1),
        UnitCallback(layers="net.conv2", channels=[0, 3], steps=4, parameterization="fft"),
        InversionCallback(layers="net.conv1", steps=4, num_probes=2),
    ]
    assert not cbs[0].needs_probes and cbs[1].needs_probes
    tiny_trainer(str(tmp_path), cbs, max_epochs=2).fit(model, train, val)
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-class_model/grid") == [0, 1]
    assert [scalar_steps(acc, f"viz-class_model/class{c:03d}/score") for c in range(3)] == [[0, 1]] * 3
    assert image_steps(acc, "viz-units/net.conv2/grid") == [0, 1]
    assert scalar_steps(acc, "viz-units/net.conv2/unit003/activation") == [0, 1]
    for pid in ("p000", "p001"):
        assert image_steps(acc, f"viz-inversion/net.conv1/{pid}") == [0, 1]
    assert scalar_steps(acc, "viz-inversion/net.conv1/feature_error") == [0, 1]
    pair = acc.Images("viz-inversion/net.conv1/p000")[0]
    # a title line (the probe, its class, the layer), the headers, original | reconstruction
    assert (pair.width, pair.height) == (2 * 96 + 3 * 2, 16 + 14 + 96 + 2 * 2)
    assert len({cb.state_key for cb in cbs}) == 3


def test_class_model_score_tags_sort_by_class_and_carry_the_class_names(tmp_path):
    """12 classes: ``class10`` sorted before ``class2`` in TensorBoard; now ``class000_<name>`` .. ``class011_<name>``
    (the class names as one tag segment), in the class order of a string sort."""
    names = ["T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal"] + [f"kind {c}" for c in range(6, 12)]
    cb = ClassModelCallback(steps=1, input_shape=[3, 8, 8], max_classes=12, class_names=names)
    train, val = tiny_loaders(16)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(TinyCNN(width=4, num_classes=12)), train, val)
    tags = sorted(t for t in read_events(str(tmp_path)).Tags()["scalars"] if t.startswith("viz-class_model/class"))
    assert tags[:3] == [
        "viz-class_model/class000_T-shirt_top/score",
        "viz-class_model/class001_trouser/score",
        "viz-class_model/class002_pullover/score",
    ]
    assert tags[10:] == ["viz-class_model/class010_kind_10/score", "viz-class_model/class011_kind_11/score"]


def test_a_unit_is_named_unit_padded_to_its_layers_channels_by_both_unit_callbacks(tmp_path):
    """One concept, one name: UnitCallback wrote ``ch3`` where TopPatchesCallback wrote ``unit003``, and the top
    patches' three digits sorted ``unit1000`` before ``unit200``; now both write ``unit<c>`` padded to the layer's
    channels (1001 here: ``unit0000`` .. ``unit1000``; up to 1000 channels ``unit000`` as before)."""
    from torch import nn

    from lightning_viz.callbacks.patches import TopPatchesCallback

    net = nn.Sequential(
        nn.Conv2d(3, 1001, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1001, 3)
    )
    cbs = [
        UnitCallback(layers="net.0", channels=[3, 200, 1000], steps=1),
        TopPatchesCallback(layers="net.0", units=[3, 1000], k=2, num_probes=4),
        UnitCallback(layers="net.conv2", channels=[0, 3], steps=1, name="tiny"),
    ]
    train, val = tiny_loaders(8)
    tiny_trainer(str(tmp_path), cbs[:2], max_epochs=1).fit(LitTiny(net), train, val)
    tags = read_events(str(tmp_path)).Tags()
    assert sorted(t for t in tags["scalars"] if t.startswith("viz-units/")) == [
        "viz-units/net.0/unit0003/activation",
        "viz-units/net.0/unit0200/activation",
        "viz-units/net.0/unit1000/activation",
        "viz-units/time_s",
    ]
    assert sorted(t for t in tags["images"] if t.startswith("viz-top_patches/")) == [
        "viz-top_patches/net.0/unit0003",
        "viz-top_patches/net.0/unit1000",
    ]
    tiny_trainer(str(tmp_path / "tiny"), cbs[2:], max_epochs=1).fit(LitTiny(), train, val)
    assert "viz-units/tiny/net.conv2/unit003/activation" in cbs[2].last_logged_tags


def test_callbacks_and_methods_run_a_model_in_another_dtype_than_the_probes():
    # Trainer(precision="64-true") turns the module to float64 while the probes (and valid range) stay float32
    from lightning_viz.probe import ProbeSet

    x, y = tiny_dataset(2).tensors
    probe = ProbeSet(images=x, labels=y, mean=[0.5] * 3, std=[0.5] * 3)
    model = LitTiny(TinyCNN(width=4)).double()
    opts = dict(steps=2, blur_every=1, clip_contribution_percentile=5, jitter=1)
    with isolated(model):
        res = class_model_images(
            model.net, [0, 1], (3, 8, 8), steps=2, init=x[:2], bounds=valid_range([0.5] * 3, [0.5] * 3)
        )
        outs = [
            cb.compute(model, probe)
            for cb in (
                ClassModelCallback(**opts),
                UnitCallback(layers="net.conv2", channels=[1], **opts),
                InversionCallback(layers="net.conv1", **opts),
            )
        ]
        with torch.no_grad():
            logits = model(res.images)
    assert res.images.dtype == torch.float64 and res.images.min() >= -1 and res.images.max() <= 1
    torch.testing.assert_close(logits[:, :2].diagonal(), res.scores)
    assert [tuple(o["images"].shape) for o in outs] == [(3, 3, 8, 8), (1, 3, 8, 8), (2, 3, 8, 8)]


def test_inversion_under_validate_inference_mode(tmp_path):
    cb = InversionCallback(layers="net.conv2", steps=3, num_probes=2, run_on="validation_epoch_end")
    _, val = tiny_loaders(8)
    tiny_trainer(str(tmp_path), [cb]).validate(LitTiny(TinyCNN(width=4)), val)
    assert scalar_steps(read_events(str(tmp_path)), "viz-inversion/net.conv2/feature_error") == [0]


def test_clear_errors_and_cli_parsing():
    model = LitTiny(TinyCNN(width=4))
    with pytest.raises(LayerNotFoundError, match="net.conv2"):
        UnitCallback(layers="conv9", channels=[0]).check(model)
    with pytest.raises(ValueError, match=r"4 channels \(0..3\)"):
        UnitCallback(layers="net.conv2", channels=[4]).check(model)
    with pytest.raises(ValueError, match="parameterization must be 'pixel' or 'fft'"):
        ClassModelCallback(parameterization="dct")
    with pytest.raises(ValueError, match="input_shape must be"):
        ClassModelCallback(input_shape=[8, 8])
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(UnitCallback, "cb")
    cfg = parser.parse_object(
        {"cb": {"layer": "net.conv2", "channels": [1, 2], "parameterization": "fft", "every_n_epochs": 2}}
    )
    cb = parser.instantiate_classes(cfg).cb
    assert (cb.layer, cb.channels, cb.parameterization, cb.every_n_epochs) == ("net.conv2", [1, 2], "fft", 2)


def test_per_probe_callbacks_give_the_same_result_on_any_rank_split():
    from lightning_viz.methods.synthesis import per_image_noise
    from lightning_viz.probe import ProbeSet

    full = per_image_noise((5, 3, 4, 4), seed=3)
    torch.testing.assert_close(per_image_noise((2, 3, 4, 4), seed=3, first_index=3), full[3:])
    x, y = tiny_dataset(5).tensors
    probe = ProbeSet(images=x, labels=y)
    model = LitTiny(TinyCNN(width=4))
    cb = InversionCallback(layers="net.conv2", steps=4, jitter=1)
    with isolated(model):
        whole = cb.compute(model, probe)
        parts = [cb.compute(model, probe.shard(r, 2)) for r in range(2)]
    torch.testing.assert_close(torch.cat([p["images"] for p in parts]), whole["images"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([p["error"] for p in parts]), whole["error"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_optimize_in_float32_and_give_finite_images(trained, dtype):
    """precision="16-true" / "bf16-true": the FFT parameterization (no half FFT or color inverse), Adam (eps 1e-8
    is 0 in float16) and the inversion loss (sums of squares overflow float16) work in float32; each forward
    gets the image in the model's dtype."""
    model32, x = trained
    model = copy.deepcopy(model32).to(dtype)
    regs = build_regularizers(l2=1e-3, blur_every=4, jitter=1)
    with isolated(model):
        cm = class_model_images(model, [0, 1, 2], (3, 8, 8), steps=20, lr=0.1, param="fft", regularizers=regs)
        units = unit_images(model, "conv2", [0, 1], (3, 8, 8), steps=15, lr=0.1, param="fft")
        inv = invert_features(model, x[:2], "conv1", steps=30, lr=0.1, param="fft")
    for res in (cm, units, inv):
        assert res.images.dtype == torch.float32 and torch.isfinite(res.images).all()
        assert torch.isfinite(res.scores).all() and (res.scores > res.start_scores).all(), (dtype, res)
    with isolated(model), torch.no_grad():  # the reported score is the class logit of the returned image, as run
        logits = model(cm.images.to(dtype)).float()
    torch.testing.assert_close(logits.gather(1, torch.tensor([[0], [1], [2]])).squeeze(1), cm.scores)
    # a large feature map: ||phi||^2 = 512 * 7 * 7 * 4 > 65504 would be inf in float16, its loss then 0
    big = feature_match("f", torch.full((1, 512, 7, 7), 2.0, dtype=dtype))
    a = torch.full((1, 512, 7, 7), 1.0, dtype=dtype)
    assert float(big(torch.empty(1, 0), {"f": a}, torch.arange(1))) == pytest.approx(-0.25)


def test_prior_weights_are_per_32px_image_area():
    """l2 and tv weigh summed penalties while the objectives do not grow with the image: at 224 px the plain
    weights buried the objective (inversion of a ResNet-50's layer2 at 0.91 relative feature error and a flat
    gray image, 0.27 with the scaled prior). They are now per 32 x 32 px: at 16 px the penalties count 4x."""
    from lightning_viz.callbacks.synthesis import PRIOR_REFERENCE_PIXELS, prior_scale
    from lightning_viz.methods.synthesis import invert_features
    from lightning_viz.probe import ProbeSet

    assert PRIOR_REFERENCE_PIXELS == 1024 and prior_scale([3, 32, 32]) == 1.0  # the demo's images: unchanged
    assert prior_scale([3, 224, 224]) == 1024 / 50176 and prior_scale([1, 16, 64]) == 1.0
    x, y = tiny_dataset(4, size=16).tensors
    probe = ProbeSet(images=x, labels=y)
    model = LitTiny(TinyCNN(width=4))
    cb = InversionCallback(layers="net.conv2", steps=4, tv=1e-2, l2=1e-3, init="gray")
    with isolated(model):
        got = cb.compute(model, probe)["images"]
        kw = cb.optimize_kwargs(model, probe)
        kw["regularizers"] = build_regularizers(l2=4e-3, tv=4e-2)  # 1024 / (16 * 16) = 4
        want = invert_features(model, x, "net.conv2", **kw).images
        kw["regularizers"] = build_regularizers(l2=1e-3, tv=1e-2)  # the plain weights: another image
        plain = invert_features(model, x, "net.conv2", **kw).images
    torch.testing.assert_close(got, want)
    assert (got - plain).abs().max() > 1e-3
    shape = ClassModelCallback(input_shape=[3, 64, 64], l2=1e-3).optimize_kwargs(model, None)["regularizers"]
    assert [r.weight for r in shape] == [1e-3 / 4]


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
def test_input_gradient_methods_under_a_callers_no_grad_or_inference_mode(context):
    """Attacks, synthesis and the gradient receptive field take their input gradients under the caller's
    torch.no_grad() / inference_mode() too, with the same results (was: RuntimeError 'does not require grad' or
    'Inference tensors cannot be saved for backward')."""
    from lightning_viz.methods.adversarial import fgsm, pgd
    from lightning_viz.methods.receptive_field import gradient_receptive_field

    model = TinyCNN(width=3).eval()
    x, classes = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])

    def run(x, classes):
        return (
            fgsm(model, x, classes, 0.1),
            pgd(model, x, classes, 0.1, steps=2),
            class_model_images(model, classes, (3, 8, 8), steps=2).images,
            unit_images(model, "conv2", [1], (3, 8, 8), steps=2).images,
            invert_features(model, x, "conv2", steps=2).images,
            gradient_receptive_field(model, "conv2", (3, 8, 8))[1],
        )

    expected = run(x, classes)
    ctx = torch.no_grad if context == "no_grad" else torch.inference_mode
    with ctx():
        got = run(x.clone(), classes.clone())
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("cls", [ClassModelCallback, UnitCallback])
def test_an_input_shape_the_model_cannot_take_fails_at_setup(tmp_path, cls):
    """input_shape is checked by a forward at setup, before any training step (it failed after the first epoch)."""
    model = LitTiny()
    steps = []
    model.on_train_batch_start = lambda *a: steps.append(1)
    kw = dict(layers="net.conv2", channels=[0]) if cls is UnitCallback else {}
    tl, vl = tiny_loaders(n=12, batch_size=6)
    with pytest.raises(
        ValueError,
        match=rf"{cls.__name__}: input_shape=\[1, 8, 8\]: the model fails on an image .*"
        r"expected input\[1, 1, 8, 8\] to have 3 channels.*the data's images are \[3, 8, 8\]",
    ):
        tiny_trainer(str(tmp_path), [cls(input_shape=[1, 8, 8], steps=1, **kw)], max_epochs=1).fit(model, tl, vl)
    assert not steps
    # a shape the model takes (another size than the data's) runs, at that size
    cb = cls(input_shape=[3, 12, 10], steps=1, **kw)
    tiny_trainer(str(tmp_path / "ok"), [cb], max_epochs=1).fit(LitTiny(), tl, vl)
    assert cb.last_logged_tags


class _Pixels255(TinyCNN):
    """A TinyCNN taking uint8-range pixels ``0..255`` (its own ``x / 255``)."""

    def forward(self, x):
        return super().forward(x / 255)


@pytest.mark.parametrize("cls", [InversionCallback, ClassModelCallback, UnitCallback])
def test_uint8_pixel_probes_optimize_in_pixel_units(cls):
    """uint8 probes (``mean=[0], std=[1/255]``: the model takes 0..255) give the images of the same model taking
    ``[0, 1]`` pixels, times 255. Was: ``lr``, the init noise and the priors in input units, so every step moved a
    pixel by 0.05 of 255 levels: flat gray reconstructions, class-model and unit images (pixel std 4e-4)."""
    from lightning_viz.probe import ProbeSet

    torch.manual_seed(0)
    net = TinyCNN(width=4)
    px = torch.rand(3, 3, 8, 8)
    u8 = LitTiny(_Pixels255()).eval()
    u8.net.load_state_dict(net.state_dict())
    kw = dict(steps=20, lr=0.05)
    if cls is UnitCallback:
        kw.update(layers="net.conv2", channels=[0, 1])
    if cls is InversionCallback:
        kw.update(layers="net.conv2")
    if cls is ClassModelCallback:
        kw.update(l2=1e-4)
    cb = cls(**kw)
    with isolated(u8):
        got = cb.compute(u8, ProbeSet(images=px * 255, mean=[0.0], std=[1 / 255]))["images"]
    ref_model = LitTiny(net).eval()
    with isolated(ref_model):
        want = cb.compute(ref_model, ProbeSet(images=px, mean=[0.0], std=[1.0]))["images"]
    assert want.std() > 0.05  # the reference moved away from gray
    torch.testing.assert_close(got / 255, want, atol=1e-4, rtol=1e-3)


def test_class_and_channel_lists_take_any_integer_indices_and_refuse_the_rest():
    """``channels`` / ``classes`` as the methods take them (one int, a range, an integer tensor or array) and a clear
    error naming the option for anything else. Was: ``channels=[0.5, 2]`` silently became ``[0, 2]``, ``channels=3``
    and ``classes=5`` "'int' object is not iterable", a tensor "Boolean value of Tensor ... is ambiguous"."""
    import numpy as np

    for given in (torch.arange(3), np.arange(3), range(3), (0, 1, 2), [0, 1, 2]):
        assert UnitCallback(layers="net.conv2", channels=given).channels == [0, 1, 2]
        assert ClassModelCallback(classes=given).classes == [0, 1, 2]
    assert UnitCallback(layers="net.conv2", channels=3).channels == [3]
    assert ClassModelCallback(classes=np.int64(5)).classes == [5]
    for bad in ([0.5, 2], [], [-1], ["1"], [True], torch.tensor([0.5])):
        with pytest.raises(ValueError, match=r"UnitCallback: channels must be one channel index or a non-empty list"):
            UnitCallback(layers="net.conv2", channels=bad)
        with pytest.raises(ValueError, match=r"ClassModelCallback: classes must be one class index or a non-empty"):
            ClassModelCallback(classes=bad)


def test_progress_of_a_chunked_optimization_counts_the_steps_of_all_chunks(trained, caplog, monkeypatch):
    """With ``chunk_size`` the progress lines count on over the chunks (3 chunks of 4 steps: 0..11 of 12), so the
    time left is for the whole run. Was: "3/4 optimization steps (~0 s left)" at the end of each chunk, then again."""
    import logging

    from lightning_viz.progress import logger as viz_logger
    from lightning_viz.progress import reporting

    model, _ = trained
    monkeypatch.setattr(viz_logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning_viz")
    with isolated(model), reporting("class_model", every_s=0.0):
        class_model_images(model, [0, 1, 2], (3, 8, 8), steps=4, chunk_size=1)
    counts = [
        r.getMessage().split(": ")[1].split(" optimization")[0] for r in caplog.records if r.name == "lightning_viz"
    ]
    assert counts == [f"{i}/12" for i in range(12)]


def test_optimize_input_takes_an_empty_batch_and_refuses_a_bad_chunk_size(trained):
    """Was: no classes -> ZeroDivisionError, chunk_size=-1 -> "torch.cat(): expected a non-empty list", 2.5 ->
    "'float' object cannot be interpreted as an integer"; now an empty result (as the gradient methods give) and
    the chunk_size message of every other method (``chunk_size=0`` too, which was one chunk here alone)."""
    model, _ = trained
    with isolated(model):
        empty = class_model_images(model, [], (3, 8, 8), steps=2)
        assert empty.images.shape == (0, 3, 8, 8) and empty.scores.shape == empty.start_scores.shape == (0,)
        with pytest.raises(ValueError, match=r"chunk_size must be >= 1 or None; got -1"):
            class_model_images(model, [0, 1], (3, 8, 8), steps=2, chunk_size=-1)
        with pytest.raises(TypeError, match=r"chunk_size must be a whole number of images >= 1, or None; got 2\.5"):
            class_model_images(model, [0, 1], (3, 8, 8), steps=2, chunk_size=2.5)
        with pytest.raises(ValueError, match=r"chunk_size must be >= 1 or None; got 0"):
            class_model_images(model, [0, 1], (3, 8, 8), steps=2, chunk_size=0)


class _ChannelsLastInside(torch.nn.Module):
    """The model given its input in channels_last by its own forward (no adapter the optimization could see)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x.contiguous(memory_format=torch.channels_last))


def test_pixel_images_kept_in_the_adapters_layout_give_the_same_images(trained):
    # behind a channels_last adapter the pixels, their gradients and Adam's state live in channels_last (no copy per
    # forward); the model sees the same values in the same layout as when it converts them itself: the same images,
    # scores and inversions bit for bit, returned in the usual contiguous layout
    model, x = trained
    adapter = model_adapter(model)
    adapter.memory_format = torch.channels_last
    inside = _ChannelsLastInside(model)
    bounds = (x.amin(dim=(0, 2, 3), keepdim=True), x.amax(dim=(0, 2, 3), keepdim=True))
    opts = dict(steps=6, regularizers=build_regularizers(tv=1e-2, l2=1e-3, blur_every=2, jitter=1), bounds=bounds)
    with isolated(model):
        for m in (adapter, inside):
            m.eval()
        got = [
            (
                unit_images(m, "conv1" if m is adapter else "net.conv1", [0, 1, 2], (3, 8, 8), init="noise", **opts),
                invert_features(m, x[:3], "conv2" if m is adapter else "net.conv2", **opts),
            )
            for m in (adapter, inside)
        ]
    for a, b in zip(*got):
        assert a.images.is_contiguous() and torch.equal(a.images, b.images) and torch.equal(a.scores, b.scores)


def test_objective_seeds_equal_autograd_and_the_loop_skips_the_objective_with_the_same_images(trained):
    """class_logit, channel and neuron are linear (their gradient taken once per chunk), feature_match has a closed
    form: the backward starts at the tensors they read, with the gradients autograd gives them bit for bit, and the
    optimization runs the objective only for its start and final scores, with the same images and scores."""
    model, x = trained
    torch.manual_seed(0)
    a, logits, rows, seed = torch.randn(3, 4, 5, 5), torch.randn(3, 6), torch.tensor([1, 2, 3]), torch.tensor(-1.0)
    a = a.contiguous(memory_format=torch.channels_last)
    target = torch.randn(4, 4, 5, 5)
    objectives = [class_logit([5, 0, 2, 1]), channel("c", [3, 0, 1, 2]), neuron("c", 2), feature_match("c", target)]
    objectives.append(0.5 * objectives[0] - objectives[1])  # linear too: no closed form of its own needed
    for obj in objectives:
        leaves = [logits.clone().requires_grad_(True), a.clone().requires_grad_(True)]
        expected = torch.autograd.grad(obj(leaves[0], {"c": leaves[1]}, rows).sum(), leaves, seed, allow_unused=True)
        for _ in range(2):  # the second time from the chunk's memo
            got = {id(t): g for t, g in obj.backward_seeds(leaves[0], {"c": leaves[1]}, rows, seed)}
            for leaf, e in zip(leaves, expected):
                if e is not None:
                    assert torch.equal(got[id(leaf)], e), obj
    assert (2 * objectives[3]).backward_seeds(logits, {"c": a}, rows, seed) is None  # composed, not linear
    # a layer it lists but does not read gets no seed (autograd would send it none); reading nothing: no seeds at all
    first = Objective(lambda lg, acts, r: lg[:, 0], ("c",), linear=True)
    assert [t for t, _ in first.backward_seeds(logits, {"c": a}, rows, seed)] == [logits]
    assert Objective(lambda lg, acts, r: lg[:, 0].detach(), linear=True).backward_seeds(logits, {}, rows, seed) is None

    calls = []

    def counted(obj):
        def fn(lg, acts, r):
            calls.append(1)
            return obj.fn(lg, acts, r)

        return fn

    with isolated(model), torch.no_grad(), capture(model, ["conv2"]) as cap:
        model(x[:2])
    for obj in (
        class_logit([0, 2]),
        channel("conv1", [0, 3]),
        neuron("conv2", [1, 2]),
        feature_match("conv2", cap["conv2"]),
    ):
        plain = Objective(obj.fn, obj.layers, obj.name, obj.uses_logits)  # no seeds: the score differentiated
        regs = dict(tv=1e-3, l2=1e-3, jitter=1, blur_every=2)
        results = []
        for o in (plain, Objective(counted(obj), obj.layers, obj.name, obj.uses_logits, obj.linear, obj.seeds)):
            calls.clear()
            with isolated(model):
                results.append(
                    optimize_input(
                        model,
                        o,
                        (2, 3, 8, 8),
                        steps=5,
                        lr=0.1,
                        param="fft",
                        regularizers=build_regularizers(**regs),
                        init="noise",
                        bounds=valid_range([0.5] * 3, [0.5] * 3),
                    )
                )
        assert len(calls) == (3 if obj.linear else 2), obj  # the scores before and after (a linear one: + its gradient)
        for field in ("images", "scores", "start_scores"):
            assert torch.equal(getattr(results[0], field), getattr(results[1], field)), (obj, field)
