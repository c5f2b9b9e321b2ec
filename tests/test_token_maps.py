"""Swin's channels-last [B, h, w, C] stages and a ViT's [B, tokens, C] blocks read as [B, C, h, w] maps (what
pytorch-grad-cam's reshape_transform does): parity with pytorch-grad-cam, the callbacks end to end, training kept."""

import warnings

import pytest
import torch
import torch.nn.functional as F
import torchvision
from helpers import LitTiny, read_events, snapshot, tiny_loaders, tiny_trainer
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from lightning_viz.callbacks.activations import ActivationCallback
from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.patches import TopPatchesCallback
from lightning_viz.callbacks.synthesis import UnitCallback
from lightning_viz.capture import capture, isolated, read_as_map
from lightning_viz.layers import MapLayout, map_layouts
from lightning_viz.methods import cam as C


def tiny_swin():
    torch.manual_seed(0)
    return SwinTransformer([4, 4], embed_dim=6, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=3)


def tiny_vit(size: int = 32):
    torch.manual_seed(0)
    net = VisionTransformer(size, patch_size=8, num_layers=2, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3)
    torch.nn.init.normal_(net.heads.head.weight)  # torchvision initializes it to zeros: no gradient at all
    return net


def swin_reshape(t):  # pytorch-grad-cam's reshape_transform for torchvision's channels-last Swin stages
    return t.permute(0, 3, 1, 2)


def vit_reshape(grid):  # pytorch-grad-cam's documented ViT reshape_transform (class token dropped)
    def reshape(t):
        return t[:, 1:, :].reshape(t.size(0), grid, grid, t.size(2)).transpose(2, 3).transpose(1, 2)

    return reshape


def minmax(m):
    m = m - m.flatten(1).amin(1)[:, None, None]
    return m / m.flatten(1).amax(1).clamp_min(1e-7)[:, None, None]


def pgc_cam(pgc, cls, model, layer, reshape, x, classes):
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    with cls(model=model, target_layers=[layer], reshape_transform=reshape) as cam:
        return torch.as_tensor(cam(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in classes]))


PGC = {"gradcam": "GradCAM", "gradcampp": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM"}
PGC |= {"hirescam": "HiResCAM"}


@pytest.mark.parametrize(
    "arch,layer,size,layout",
    [
        ("swin_t", "features.5.5.norm2", 64, MapLayout("channels_last")),
        ("swin_t", "norm", 64, MapLayout("channels_last")),
        ("vit_b_16", "encoder.layers.encoder_layer_11.ln_1", 64, MapLayout("tokens", 1, (4, 4))),
    ],
)
def test_cam_family_matches_pytorch_grad_cam_with_its_reshape_transform(arch, layer, size, layout):
    """torchvision's swin_t and vit_b_16 (random init, 64 px): our Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM and
    HiResCAM of a Swin stage / ViT block equal pytorch-grad-cam's with the reshape_transform its docs give (was:
    refused at setup, or 'needs a layer with [B, K, h, w] output')."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    kw = {"image_size": size} if arch.startswith("vit") else {}
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=5, **kw).eval()
    if arch.startswith("vit"):
        torch.nn.init.normal_(model.heads.head.weight)  # torchvision initializes it to zeros: no gradient at all
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    classes = [3, 1]
    reshape = swin_reshape if arch.startswith("swin") else vit_reshape(size // 16)
    with isolated(model):
        found = map_layouts(model, x[:1], [layer])
        assert found == {layer: layout}
        read_as_map(model, found)
        ours = {
            m: C.class_activation_map(model, x, layer, m, "label", torch.tensor(classes))
            for m in ("gradcam", "gradcampp", "xgradcam", "layercam", "hirescam")
        }
    module = model.get_submodule(layer)
    for m, got in ours.items():
        assert float(got.amax()) > 0, m
        if m == "gradcampp":  # pytorch-grad-cam adds 1e-6 to alpha's denominator, ~2 g^2 ~ 1e-8 here: its A and G
            from pytorch_grad_cam.activations_and_gradients import ActivationsAndGradients

            grabbed = ActivationsAndGradients(model, [module], reshape, detach=True)
            grabbed(x).gather(1, torch.tensor(classes)[:, None]).sum().backward()
            a, g = grabbed.activations[0], grabbed.gradients[0]
            grabbed.release()
            ref = minmax(C.cam_map(a, C.gradcampp_weights(a, g), (size, size)))
        else:
            ref = pgc_cam(pgc, getattr(pgc, PGC[m]), model, module, reshape, x, classes)
        torch.testing.assert_close(minmax(got), ref, atol=2e-4, rtol=1e-3, msg=m)


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_gradient_free_variants_on_token_and_channels_last_maps(kind):
    """Score-CAM masks the image with each upsampled channel of the map, Ablation-CAM zeroes one channel of the map
    (of the patch tokens: the class token is kept), by hand; Eigen-CAM is pytorch-grad-cam's 2-D projection of the
    reshaped activations (pytorch-grad-cam's own Score-CAM weighs otherwise: align_corners=True masks, a softmax
    over the channels' logits)."""
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection

    model = (tiny_swin() if kind == "swin" else tiny_vit()).eval()
    layer = "features.3.0.norm2" if kind == "swin" else "encoder.layers.encoder_layer_1.ln_1"
    reshape = swin_reshape if kind == "swin" else vit_reshape(4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    labels = torch.tensor([2, 0])
    module = model.get_submodule(layer)
    with isolated(model):
        read_as_map(model, map_layouts(model, x[:1], [layer]))
        score = C.class_activation_map(model, x, layer, "scorecam", "label", labels)
        eigen = C.class_activation_map(model, x, layer, "eigencam", "label", labels)
        ablation = C.class_activation_map(model, x, layer, "ablationcam", "label", labels)
        with capture(model, [layer]) as cap:
            logits = model(x)
        a = cap[layer]
        assert a.shape == (2, 12 if kind == "swin" else 8, 4, 4)
        y = logits.gather(1, labels[:, None])[:, 0]
        drops = []
        for k in range(a.shape[1]):
            keep = torch.ones(a.shape[1])
            keep[k] = 0

            def zero(_m, _i, out, keep=keep):
                t = reshape(out)
                t = t * keep[None, :, None, None]
                if kind == "swin":
                    return t.permute(0, 2, 3, 1)
                return torch.cat([out[:, :1], t.flatten(2).transpose(1, 2)], 1)

            h = module.register_forward_hook(zero)
            drops.append((y - model(x).gather(1, labels[:, None])[:, 0]) / y)
            h.remove()
        up = F.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False)  # Score-CAM's masks, Eq. 5-7
        lo, hi = up.amin((2, 3), keepdim=True), up.amax((2, 3), keepdim=True)
        masked = x[:, None] * ((up - lo) / (hi - lo))[:, :, None]
        probs = model(masked.flatten(0, 1)).softmax(1).view(2, a.shape[1], -1)
        score_w = probs.gather(2, labels[:, None, None].expand(-1, a.shape[1], 1))[..., 0]

    def by_hand(w):
        cam = (w[:, :, None, None] * a).sum(1, keepdim=True).relu()
        return F.interpolate(cam, size=(32, 32), mode="bilinear")[:, 0]

    torch.testing.assert_close(score, by_hand(score_w), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ablation, by_hand(torch.stack(drops, 1)), atol=1e-5, rtol=1e-4)
    proj = torch.as_tensor(get_2d_projection(a.numpy().copy()))
    small = C.eigencam_map(a)
    for i in range(2):  # the SVD's sign is open: pytorch-grad-cam keeps numpy's
        sign = 1.0 if (small[i] * proj[i]).sum() >= 0 else -1.0
        torch.testing.assert_close(sign * small[i], proj[i].to(small.dtype), atol=1e-4, rtol=1e-4)
    assert float(eigen.amax()) > 0


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_callbacks_on_swin_stages_and_vit_blocks_keep_training_bit_identical(tmp_path, kind):
    """Trainer.fit with CAM (Swin: the default layer 'norm'; ViT: a block's ln_1, pytorch-grad-cam's choice),
    activation maps, top patches and unit synthesis of a Swin stage / ViT block: each reads the layer's map as
    [B, C, h, w] (12 channels of 4x4 for Swin's 'features.3', the 8-wide tokens on the 4x4 patch grid for the ViT;
    was: refused at setup), and training is bit for bit the run without callbacks."""

    def run(callbacks, logdir):
        net = tiny_swin() if kind == "swin" else tiny_vit()
        trainer = tiny_trainer(logdir, callbacks, max_epochs=1, limit_train_batches=2, limit_val_batches=1)
        trainer.fit(LitTiny(net), *tiny_loaders(n=8, size=32, batch_size=4))
        return snapshot(net)

    layer = "net.features.3" if kind == "swin" else "net.encoder.layers.encoder_layer_1"
    cam = CAMCallback(num_probes=2, layers=None if kind == "swin" else [layer + ".ln_1"], methods=["gradcam"])
    acts = ActivationCallback(num_probes=2, layers=[layer], channels=[0, 7])
    patches = TopPatchesCallback(num_probes=4, layers=[layer], k=1, units=[0])
    units = UnitCallback(layers=layer, channels=[7], steps=2)
    with_cbs = run([cam, acts, patches, units], str(tmp_path / "viz"))
    assert cam.layers == (["net.norm"] if kind == "swin" else [layer + ".ln_1"])
    without = run([], str(tmp_path / "plain"))
    for part in ("params", "buffers"):
        for key in without[part]:
            assert torch.equal(with_cbs[part][key], without[part][key]), key
    assert torch.equal(with_cbs["rng"], without["rng"])
    acc = read_events(str(tmp_path / "viz"))
    tags = acc.Tags()["images"]
    assert f"viz-cam/gradcam/{cam.layers[0]}/p000" in tags or "viz-cam/panel/p000" in tags
    assert {f"viz-activations/{layer}/p000", f"viz-top_patches/{layer}/unit000", f"viz-units/{layer}/grid"} <= set(tags)
    assert acc.Scalars(f"viz-cam/gradcam/{cam.layers[0]}/stats/max_abs")[-1].value > 0
    height = acc.Images(f"viz-activations/{layer}/p000")[-1].height
    assert height > 0


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_embeddings_of_a_swin_stage_or_vit_block_average_the_map_over_space(tmp_path, kind):
    """EmbeddingCallback(layers=...) on Swin's 'norm' ([B, 4, 4, 12], channels-last) and on a ViT block ([B, 17, 8],
    a class token then 4x4 patch tokens): the features are the map's channels averaged over space, 12 and 8 of them
    (was: Swin's averaged over w and C, 4 'features', one per row; the ViT's all 136 token values flattened -- and
    either read otherwise as soon as another callback named the layer)."""
    import os

    from lightning_viz.callbacks.embeddings import EmbeddingCallback

    net = tiny_swin() if kind == "swin" else tiny_vit()
    layer = "norm" if kind == "swin" else "encoder.layers.encoder_layer_1"
    cb = EmbeddingCallback(layers=f"net.{layer}", num_probes=6, projection=["pca"])
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(LitTiny(net), *tiny_loaders(n=6, size=32, batch_size=3))
    folder = next(os.path.join(r, "tensors.tsv") for r, _, files in os.walk(tmp_path) if "tensors.tsv" in files)
    with open(folder) as fh:
        logged = torch.tensor([[float(v) for v in row.split("\t")] for row in fh.read().splitlines()])
    net.eval()
    with torch.no_grad():
        out = {}
        h = net.get_submodule(layer).register_forward_hook(lambda m, i, o: out.setdefault("o", o))
        net(cb.probes.images)
        h.remove()
    o = out["o"]
    expected = o.mean((1, 2)) if kind == "swin" else o[:, 1:].mean(1)
    assert logged.shape == (6, 12 if kind == "swin" else 8)
    torch.testing.assert_close(logged, expected, atol=1e-4, rtol=1e-4)


def test_a_cube_shaped_map_is_warned_about_and_an_explicit_layout_is_kept(tmp_path):
    """Swin at 24 px: stage 1 gives [B, 6, 6, 6], h == C, so channels-last cannot be told from the shapes: read as
    it is with a warning at setup that says how to choose (was: silently read with its rows as channels); with
    read_as_map(...) before fit the callbacks keep that layout, without the warning."""
    lit = LitTiny(tiny_swin())
    cb = ActivationCallback(num_probes=2, layers=["net.features.1"])
    trainer = tiny_trainer(str(tmp_path / "a"), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    with pytest.warns(UserWarning, match=r"ActivationCallback: layer 'net.features.1' gives shape \[1, 6, 6, 6\], and"):
        trainer.fit(lit, *tiny_loaders(n=4, size=24, batch_size=2))
    read_as_map(lit, {"net.features.1": MapLayout("channels_last")})
    cb = ActivationCallback(num_probes=2, layers=["net.features.1"])
    trainer = tiny_trainer(str(tmp_path / "b"), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(lit, *tiny_loaders(n=4, size=24, batch_size=2))
    assert not [w for w in caught if "cannot be told" in str(w.message)]
    x = torch.randn(2, 3, 24, 24)
    with isolated(lit), capture(lit, ["net.features.1"]) as cap, torch.no_grad():
        lit(x)
        raw = lit.net.features[1](lit.net.features[0](x))
    torch.testing.assert_close(cap["net.features.1"], raw.permute(0, 3, 1, 2))


@pytest.mark.parametrize("kind", ["swin", "vit"])
def test_the_functions_read_swin_stages_and_vit_blocks_as_maps_by_themselves(kind):
    """class_activation_map and feature_maps on a model no callback has seen: the layer's channels-last map /
    patch tokens are read as [B, C, h, w] (was: Swin's [B, h, w, C] taken as is, its rows as channels -- a
    [B, w, C]-shaped 'CAM' upsampled; the ViT's tokens refused)."""
    from lightning_viz.methods.activations import feature_maps

    model = (tiny_swin() if kind == "swin" else tiny_vit()).eval()
    layer = "norm" if kind == "swin" else "encoder.layers.encoder_layer_1.ln_1"
    reshape = swin_reshape if kind == "swin" else vit_reshape(4)
    x, labels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4)), torch.tensor([0, 1, 2])
    with isolated(model):
        got = C.class_activation_map(model, x, layer, "gradcam", "label", labels)
        maps = feature_maps(model, x, [layer])[layer]
    out = {}
    h = model.get_submodule(layer).register_forward_hook(lambda m, i, o: out.setdefault("o", o))
    score = model(x).gather(1, labels[:, None]).sum()
    h.remove()
    (g,) = torch.autograd.grad(score, out["o"])
    a, g = reshape(out["o"].detach()), reshape(g)
    ref = F.interpolate((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True).relu(), size=(32, 32), mode="bilinear")
    torch.testing.assert_close(got, ref[:, 0], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(maps, a)


def test_a_vit_block_after_the_last_attention_is_warned_about_at_setup(tmp_path):
    """torchvision's ViT reads only the class token after its last block: Grad-CAM of that block's output is zero
    everywhere (was: blank panels, 'map all zero', without a word); a warning at setup names the layer and what to
    pick instead. The block's first LayerNorm is fine: no warning."""
    for layer, warned in (
        ("net.encoder.layers.encoder_layer_1", True),
        ("net.encoder.layers.encoder_layer_1.ln_1", False),
    ):
        cb = CAMCallback(num_probes=2, layers=[layer])
        trainer = tiny_trainer(
            str(tmp_path / str(warned)), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(LitTiny(tiny_vit()), *tiny_loaders(n=4, size=32, batch_size=2))
        said = [str(w.message) for w in caught if "does not reach the patch tokens" in str(w.message)]
        assert said == (
            [
                f"CAMCallback: the score's gradient does not reach the patch tokens of layer {layer!r} "
                "(after the last attention only the class token reaches the head), so its "
                "gradient-weighted maps are all zero. Name a layer before the last block's attention, e.g. "
                "its first LayerNorm ('blocks.11.norm1' of a timm ViT, "
                "'encoder.layers.encoder_layer_11.ln_1' of torchvision's)."
            ]
            if warned
            else []
        )


def test_the_layout_setup_line_goes_through_the_lightning_viz_logger(tmp_path, caplog):
    """The setup line saying a Swin stage is read as a map goes through the ``lightning_viz`` logger, as the start-up
    line does, so the README's ``setLevel(WARNING)`` silences it (was: Lightning's rank_zero_info logger)."""
    import logging

    from lightning_viz.callbacks.cam import CAMCallback

    def fit(logdir):
        cb = CAMCallback(layers="net.norm", num_probes=2)
        trainer = tiny_trainer(logdir, [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
        trainer.fit(LitTiny(tiny_swin()), *tiny_loaders(n=4, size=32, batch_size=2))

    def layout_lines():
        return [r for r in caplog.records if "read as [B, C, h, w]" in r.getMessage()]

    with caplog.at_level(logging.INFO):
        fit(str(tmp_path / "a"))
    assert [r.name for r in layout_lines()] == ["lightning_viz"]
    assert "CAMCallback: 'net.norm'" in layout_lines()[0].getMessage()
    caplog.clear()
    logging.getLogger("lightning_viz").setLevel(logging.WARNING)
    try:
        with caplog.at_level(logging.INFO, logger="lightning"):
            fit(str(tmp_path / "b"))
    finally:
        logging.getLogger("lightning_viz").setLevel(logging.NOTSET)
    assert layout_lines() == []
