"""Which layer a callback picks by default: the CAM/activation default on architectures without a final conv map
(vision transformers), the classifier head (the last nn.Linear called, not the last defined) for CAM and
embeddings, and the setup messages when no choice is possible."""

from __future__ import annotations

import lightning as L
import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import LitTiny, TinyCNN, read_events, tiny_loaders, tiny_trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_viz.callbacks import (
    ActivationCallback,
    CAMCallback,
    EmbeddingCallback,
    InversionCallback,
    TopPatchesCallback,
    UnitCallback,
)
from lightning_viz.capture import isolated
from lightning_viz.layers import LayerNotFoundError, default_cam_layer
from lightning_viz.methods import cam as C
from lightning_viz.methods.embeddings import extract_features, penultimate_layer
from lightning_viz.probe import ProbeSet


class CountSteps(Callback):
    """Counts training batches: a setup error must come before the first one."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps += 1


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, img_size=32, patch_size=8)


def test_vit_has_no_default_cam_layer():
    """The only conv-produced map of a ViT is its patch embedding, which the blocks then process as tokens: no
    final feature map (was: 'blocks.11.attn.k_norm', an Identity with a [B, heads, tokens, head_dim] output)."""
    with isolated(tiny_vit()) as net, pytest.raises(LayerNotFoundError) as err:
        default_cam_layer(net, torch.randn(1, 3, 32, 32), "CAMCallback")
    msg = str(err.value)
    assert msg.startswith("CAMCallback: found no final [B, C, h, w] feature map before global pooling")
    assert "'patch_embed.proj'" in msg and "'blocks.0.norm1' on shape [1, 17, 192]" in msg
    assert msg.endswith(
        "layers=[...]: a convolution or a block containing convolutions with a [B, C, h, w] output "
        "(e.g. 'layer4' of a ResNet); or a layer of tokens, read on the patch grid, before the last block's "
        "attention (after it only the class token reaches the head): 'blocks.11.norm1' of a timm ViT, "
        "'encoder.layers.encoder_layer_11.ln_1' of torchvision's."
    )


@pytest.mark.parametrize("make", [lambda: CAMCallback(num_probes=2), lambda: ActivationCallback(num_probes=2)])
def test_vit_default_layer_fails_at_setup(tmp_path, make):
    cb, steps = make(), CountSteps()
    trainer = tiny_trainer(str(tmp_path), [steps, cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(LayerNotFoundError, match=rf"^{type(cb).__name__}: found no final \[B, C, h, w\] feature map"):
        trainer.fit(LitTiny(tiny_vit()), *tiny_loaders(n=8, size=32))
    assert steps.steps == 0


@pytest.mark.parametrize(
    "arch,expected",
    [
        ("resnet18", "layer4.1"),
        ("efficientnet_b0", "bn2.act"),  # conv_head -> BatchNormAct2d: its activation is the final map
        ("convnext_atto", "stages.3"),
        ("mobilenetv3_small_100", "blocks.5"),  # global pooling, then conv_head on the 1x1 map
        ("regnetx_002", "s4.b7"),
    ],
)
def test_default_cam_layer_of_timm_cnns_unchanged(arch, expected):
    torch.manual_seed(0)
    with isolated(timm.create_model(arch, pretrained=False, num_classes=3)) as net:
        assert default_cam_layer(net, torch.randn(1, 3, 64, 64)) == expected


class WithAuxHead(LitTiny):
    """TinyCNN classifier plus a projection head ``aux`` defined after it and used only in training_step: the last
    nn.Linear defined is not the classifier. ``aux`` reads 4 features, as many as ``net.conv2`` has channels."""

    def __init__(self):
        super().__init__(TinyCNN(width=4))
        self.aux = nn.Linear(4, 8)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) + 0.0 * self.aux(torch.ones(2, 4)).sum()


class Generator(nn.Module):
    def __init__(self, z: int = 8):
        super().__init__()
        self.fc = nn.Linear(z, 3 * 8 * 8)

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, 3, 8, 8)


class DiscriminatorFirstGAN(L.LightningModule):
    """A GAN whose discriminator (a 3-class TinyCNN, the model's forward) is defined before the generator: the last
    nn.Linear defined is the generator's ``gen.fc``."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.disc = TinyCNN(num_classes=3)
        self.gen = Generator()

    def forward(self, x):
        return self.disc(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_d = self.optimizers()
        fake = self.gen(torch.randn(x.shape[0], 8))
        d_loss = F.cross_entropy(self.disc(x), y) + F.cross_entropy(self.disc(fake.detach()), torch.full_like(y, 2))
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = -F.log_softmax(self.disc(fake), 1)[:, 0].mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return [torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)]


@pytest.mark.parametrize(
    "make,net,cam_layers",
    [(WithAuxHead, "net", ["net.conv2"]), (DiscriminatorFirstGAN, "disc", None)],  # explicit and default layer
    ids=["aux_head_after_classifier", "gan_discriminator_first"],
)
def test_cam_head_and_penultimate_features_are_the_last_linear_called(tmp_path, make, net, cam_layers):
    """CAM's classifier and the embeddings' penultimate features come from the classifier the forward ends with
    (``<net>.fc``), not from the last nn.Linear defined ('aux' / 'gen.fc'): the fit runs and logs, and the values
    are those computed by hand from ``<net>.fc``."""
    torch.manual_seed(0)
    lit = make()
    cam = CAMCallback(methods=["cam", "gradcam"], layers=cam_layers, num_probes=3)
    emb = EmbeddingCallback(num_probes=6, projection=["pca"], projector=False)
    steps = CountSteps()
    tiny_trainer(str(tmp_path), [steps, cam, emb], max_epochs=1, limit_train_batches=2).fit(lit, *tiny_loaders(n=12))
    assert steps.steps == 2 and cam.layers == [f"{net}.conv2"]
    tags = read_events(str(tmp_path)).Tags()
    assert {"viz-cam/panel/p000", "viz-embeddings/penultimate/pca"} <= set(tags["images"])
    assert "viz-embeddings/penultimate/silhouette" in tags["scalars"]

    cnn = getattr(lit, net)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 1, 2])
    with isolated(lit):
        maps = cam.compute_maps(lit, ProbeSet(images=x, labels=labels))
        feats, _ = extract_features(lit, x)
        assert penultimate_layer(lit, x[:1]) == f"{net}.fc"
        pooled = F.relu(cnn.conv2(cnn.relu(cnn.bn1(cnn.conv1(x)))))  # TinyCNN: conv2 -> F.relu -> GAP -> fc
    expected = F.relu(torch.einsum("bk,bkhw->bhw", cnn.fc.weight[labels], pooled))  # Zhou et al. 2016
    torch.testing.assert_close(maps[f"cam/{net}.conv2"], expected)
    torch.testing.assert_close(feats, pooled.mean(dim=(2, 3)))


def test_embedding_default_without_a_called_linear_fails_at_setup(tmp_path):
    """A model whose forward calls no nn.Linear (logits from a conv + GAP) but defines one: the default (penultimate
    features) is refused at setup, before the first step, with the option to use (was: after a training epoch,
    naming the deprecated ``layer=``)."""

    class ConvLogits(LitTiny):
        def __init__(self):
            super().__init__(nn.Sequential(nn.Conv2d(3, 3, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
            self.aux = nn.Linear(3, 8)

    steps = CountSteps()
    trainer = tiny_trainer(str(tmp_path), [steps, EmbeddingCallback(num_probes=6, projector=False)], max_epochs=1)
    with pytest.raises(LayerNotFoundError) as err:
        trainer.fit(ConvLogits(), *tiny_loaders(n=12))
    assert steps.steps == 0
    assert str(err.value) == (
        "EmbeddingCallback: no nn.Linear of ConvLogits is called in its forward, so the penultimate features (the "
        "input of the last one called) cannot be found; pass layers=<name> of the layer whose output to use (any "
        "layer from model.named_modules(), conv maps are averaged over space)."
    )
    cb = EmbeddingCallback(layers="net.1", num_probes=6, projector=False)  # as the message says: runs
    tiny_trainer(str(tmp_path / "ok"), [cb], max_epochs=1).fit(ConvLogits(), *tiny_loaders(n=12))
    assert cb.last_logged_tags


@pytest.mark.parametrize(
    "arch,reason",
    [
        ("convnext_atto", "CAM needs layer 'net.stages.3' to feed global average pooling"),  # LayerNorm after pooling
        ("mobilenetv3_small_100", "'net.classifier') to read"),  # conv_head after pooling: 1024 != 576 channels
    ],
)
def test_cam_on_a_model_without_gap_linear_head_says_what_is_allowed(tmp_path, arch, reason):
    """The default layer is the last map before the pooling, so the head is what is missing: the message says so
    and lists the methods that work (was, for ConvNeXt: 'Choose the last block before the pooling (...; the default
    layer)', the failing layer itself)."""
    torch.manual_seed(0)
    steps = CountSteps()
    trainer = tiny_trainer(str(tmp_path), [steps, CAMCallback(methods=["cam"], num_probes=2)], max_epochs=1)
    with pytest.raises(LayerNotFoundError) as err:
        trainer.fit(LitTiny(timm.create_model(arch, pretrained=False, num_classes=3)), *tiny_loaders(n=6, size=64))
    msg = str(err.value)
    assert steps.steps == 0 and msg.startswith("CAMCallback: ") and reason in msg
    assert "Choose" not in msg
    assert msg.endswith(
        "is the model's last feature map before the global pooling, the model has no GAP + nn.Linear head (e.g. a "
        "norm or a conv lies between the pooling and the classifier) and 'cam' cannot explain it: use the methods "
        "that need no such head ('gradcam', 'gradcampp', 'xgradcam', 'layercam', 'counterfactual_gradcam', "
        "'hirescam', 'eigencam', 'scorecam', 'ablationcam', 'guided_gradcam', 'guided_gradcampp')."
    )
    cb = CAMCallback(methods=["gradcam"], num_probes=2)  # as the message says: runs
    torch.manual_seed(0)
    model = LitTiny(timm.create_model(arch, pretrained=False, num_classes=3))
    tiny_trainer(str(tmp_path / "ok"), [cb], max_epochs=1, limit_train_batches=1).fit(
        model, *tiny_loaders(n=6, size=64)
    )
    assert "viz-cam/panel/p000" in cb.last_logged_tags


@pytest.mark.parametrize(
    "every_n,max_epochs,fixes",
    [
        (
            1,
            2,
            "Use max_epochs=3 (a multiple of check_val_every_n_epoch), a check_val_every_n_epoch that divides "
            "max_epochs=2 (e.g. 1), or run_on='train_epoch_end'.",
        ),  # every_n_epochs=1 already: not suggested
        (
            2,
            4,
            "Use max_epochs=6 (a multiple of check_val_every_n_epoch), a check_val_every_n_epoch that divides "
            "max_epochs=4 (e.g. 1), every_n_epochs=1, or run_on='train_epoch_end'.",
        ),  # epoch 2 validates: helps
    ],
)
def test_never_running_validation_schedule_suggests_what_helps(tmp_path, every_n, max_epochs, fixes):
    """check_val_every_n_epoch=3 validates at epoch 2 only (in these fits), which the schedule never reaches."""
    cb = CAMCallback(num_probes=2, run_on="validation_epoch_end", every_n_epochs=every_n)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=max_epochs, check_val_every_n_epoch=3)
    with pytest.raises(ValueError) as err:
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert trainer.global_step == 0 and str(err.value).endswith(fixes)
    for suggestion in [{"max_epochs": -(-max_epochs // 3) * 3}, {"check_val_every_n_epoch": 1}] + (
        [{"every_n_epochs": 1}] if every_n != 1 else []
    ):  # every suggestion runs
        every = suggestion.pop("every_n_epochs", every_n)
        kw = {"max_epochs": max_epochs, "check_val_every_n_epoch": 3, **suggestion}
        cb = CAMCallback(num_probes=2, run_on="validation_epoch_end", every_n_epochs=every)
        tiny_trainer(str(tmp_path / "ok"), [cb], limit_train_batches=1, limit_val_batches=1, **kw).fit(
            LitTiny(), *tiny_loaders(n=12)
        )
        assert cb.last_logged_tags


class LinearTokens(nn.Module):
    """A transformer without a conv patch embedding: 4x4 pixel patches cut by reshapes, embedded by an nn.Linear,
    then a token-wise block; its [B, tokens, D] have no conv-produced grid to be laid out on."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(48, 8)
        self.block = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        b, c = x.shape[:2]
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(b, -1, c * 16)
        return self.head(self.block(self.embed(patches)).mean(1))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: ActivationCallback(layers=["net.block"], num_probes=2), r"ActivationCallback: layers names"),
        (lambda: TopPatchesCallback(layers=["net.block"], num_probes=4, k=2), r"TopPatchesCallback: layers names"),
        (lambda: UnitCallback(layers="net.block", channels=[0, 1], steps=2), r"UnitCallback: layers names"),
    ],
)
def test_token_outputs_named_as_feature_maps_fail_at_setup(tmp_path, make, match):
    """A transformer block gives [B, tokens, D]: its dimension 1 is tokens, not channels; without a conv patch
    embedding to tell their grid, refused before training (was: activations and top patches failed after the
    first epoch; units silently optimized tokens 0 and 1). After one (a ViT's), read on its grid: test_token_maps."""
    cb, steps = make(), CountSteps()
    trainer = tiny_trainer(str(tmp_path), [steps, cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(ValueError, match=match + r" 'net.block', whose output has shape \(1, 4, 8\)"):
        trainer.fit(LitTiny(LinearTokens()), *tiny_loaders(n=8, size=8))
    assert steps.steps == 0


def test_unit_options_checked_against_the_layer_output_at_setup(tmp_path):
    """UnitCallback on a block (no out_channels to read): channels beyond its outputs and unit='neuron' on [B, C]
    features fail at setup; unit='channel' on a linear layer's [B, C] features runs."""
    for cb, match in (
        (UnitCallback(layers="net.conv2", channels=[4], steps=2), r"layer 'net.conv2' has 4 channels \(0..3\)"),
        (UnitCallback(layers="net.pool", channels=[9], steps=2), r"layer 'net.pool' has 4 channels"),
        (UnitCallback(layers="net.fc", channels=[0], unit="neuron", steps=2), r"unit='neuron' needs a \[B, C, h, w\]"),
    ):
        trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
        with pytest.raises(ValueError, match=match):
            trainer.fit(LitTiny(), *tiny_loaders(n=8))
    cb = UnitCallback(layers="net.fc", channels=[0, 2], steps=2)
    tiny_trainer(str(tmp_path / "ok"), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(
        LitTiny(), *tiny_loaders(n=8)
    )
    assert "viz-units/net.fc/unit002/activation" in cb.last_logged_tags


@pytest.mark.parametrize("arch,layer", [("densenet121", "features.norm5"), ("vgg11", "features.20")])
def test_cam_explains_the_layers_pytorch_grad_cam_names(tmp_path, arch, layer):
    """pytorch-grad-cam's docs name ``model.features[-1]``: DenseNet's final BatchNorm, VGG's last MaxPool2d.
    Neither contains a convolution, but both keep the convolutions' feature map: named, they run (was: refused
    with 'CAM needs a convolution layer'), and the map is Grad-CAM of that layer's output (by hand)."""
    from test_gradients import torchvision_model  # vgg11 with a narrowed classifier

    from lightning_viz.capture import capture

    net = torchvision_model(arch).eval()
    cb = CAMCallback(layers=[f"net.{layer}"], num_probes=2)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(LitTiny(net), *tiny_loaders(n=4, size=64, batch_size=2))
    assert f"viz-cam/gradcam/net.{layer}/stats/mean_abs" in cb.last_logged_tags
    net.eval()
    x, labels = torch.randn(6, 3, 64, 64, generator=torch.Generator().manual_seed(1)), torch.arange(6) % 3
    with isolated(net):
        ours = C.class_activation_map(net, x, layer, "gradcam", "label", labels)
        with capture(net, [layer], grad=True) as cap:
            score = net(x).gather(1, labels[:, None]).sum()
            (g,) = torch.autograd.grad(score, cap[layer])
    # DenseNet's forward rectifies norm5's output in place (F.relu(..., inplace=True)): A is what it reads, ReLU(norm5)
    assert cap.rectified_later(layer) == (arch == "densenet121")
    a = cap[layer].detach().clamp_min(0) if arch == "densenet121" else cap[layer].detach()
    ref = F.relu((g.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    ref = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert float(ref.abs().max()) > 0


def test_cam_refuses_a_named_layer_that_is_no_conv_feature_map(tmp_path):
    """A LayerNorm on tokens without a conv patch embedding (no grid), a linear layer's [B, C]: refused at setup,
    listing the conv layers (a ViT block's LayerNorm is read on its patch grid: test_token_maps)."""
    for layer, match in (
        ("net.block.0", "layers names 'net.block.0', a LayerNorm whose output is no feature map"),
        ("net.head", "CAM needs a convolution layer, but LitTiny has none"),
    ):
        cb, steps = CAMCallback(layers=[layer], num_probes=2), CountSteps()
        trainer = tiny_trainer(str(tmp_path), [steps, cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
        with pytest.raises(LayerNotFoundError, match=rf"^CAMCallback: {match}"):
            trainer.fit(LitTiny(LinearTokens()), *tiny_loaders(n=8, size=8))
        assert steps.steps == 0


class ConcatBranches(nn.Module):
    """Two conv branches concatenated (2 + 3 = 5 channels), as GoogLeNet's and Inception's last blocks: no module
    of the block has the block's width."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = ConcatBranches()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(5, 3)

    def forward(self, x):
        return self.fc(self.pool(self.block(x)).flatten(1))


def test_cam_default_layer_of_concatenated_branches(tmp_path):
    """'cam' on a GAP + linear head over a block that concatenates branches (GoogLeNet, Inception v3) runs on the
    default layer (was refused at setup: no module of the block has the 5 channels the classifier reads), and its
    map is Zhou et al.'s CAM by hand: ReLU(sum_k W[c, k] A_k)."""
    torch.manual_seed(0)
    lit = LitTiny(ConcatNet())
    cb = CAMCallback(methods=["cam"], num_probes=2)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(
        lit, *tiny_loaders(n=6)
    )
    assert cb.layers == ["net.block"] and "viz-cam/cam/net.block/stats/mean_abs" in cb.last_logged_tags
    probe = ProbeSet(torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), labels=torch.tensor([0, 2]))
    with isolated(lit):
        got = cb.compute_maps(lit, probe)["cam/net.block"]
        a = lit.net.block(probe.images)
    w = lit.net.fc.weight.detach()[probe.labels]  # [B, 5]
    ref = F.relu((w[:, :, None, None] * a).sum(1))
    torch.testing.assert_close(got, ref)
    assert float(ref.abs().max()) > 0


class TrainOnlyAux(TinyCNN):
    """TinyCNN with an auxiliary conv ``aux`` that its forward calls only in training mode (as GoogLeNet's and
    Inception's auxiliary heads): visualizations run the model in eval mode, where ``aux`` gives no output."""

    def __init__(self):
        super().__init__()
        self.aux = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        if self.training:
            self.aux(x)
        x = F.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


@pytest.mark.parametrize(
    "make",
    [
        lambda: EmbeddingCallback(layers="net.aux", num_probes=6, projector=False),
        lambda: InversionCallback(layers="net.aux", steps=2, num_probes=2),
        lambda: ActivationCallback(layers=["net.aux"], num_probes=2),
    ],
)
def test_a_layer_the_eval_forward_does_not_call_fails_at_setup_naming_the_callback(tmp_path, make):
    """Embeddings and inversion of a train-only layer failed after the first epoch (a KeyError inside a
    VisualizationError); the others at setup with a bare KeyError asking 'is it used by forward()?' (it is, in
    training). Now every one at setup, naming the callback and eval mode."""
    cb, steps = make(), CountSteps()
    trainer = tiny_trainer(str(tmp_path), [steps, cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(LayerNotFoundError) as err:
        trainer.fit(LitTiny(TrainOnlyAux()), *tiny_loaders(n=8))
    assert steps.steps == 0 and isinstance(err.value, KeyError)
    assert str(err.value).startswith(
        f"{type(cb).__name__}: Layer 'net.aux' produced no output in the forward pass: the model's forward did not "
        "call it in eval mode"
    )


def tiny_swin():
    """torchvision's Swin transformer, tiny: a conv patch embedding, then Permute: every later map is channels-last
    [B, h, w, C], which its LayerNorms and Linears read along the last axis."""
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer([4, 4], embed_dim=6, depths=[1, 1], num_heads=[1, 1], window_size=[2, 2], num_classes=3)


def test_swin_channels_last_maps_are_read_as_maps(tmp_path):
    """torchvision's Swin ends with norm -> Permute -> AdaptiveAvgPool2d: the last map before the pooling is 'norm',
    [B, h, w, C]; it is the default CAM layer, read as [B, C, h, w] (was: refused at setup; before that its rows
    were read as channels, giving [B, w, C] 'maps'); the units of a stage are its C channels."""
    with isolated(tiny_swin()) as net:
        assert default_cam_layer(net, torch.randn(1, 3, 32, 32), "CAMCallback") == "norm"
    for cb, match in (
        (UnitCallback(layers="net.features.3", channels=[12], steps=1), r"layer 'net.features.3' has 12 channels"),
        (TopPatchesCallback(layers=["net.features.1"], units=[6], num_probes=4), r"'net.features.1' with 6 channels"),
    ):
        steps = CountSteps()
        with pytest.raises(ValueError, match=match):
            tiny_trainer(str(tmp_path), [steps, cb], max_epochs=1).fit(
                LitTiny(tiny_swin()), *tiny_loaders(n=4, size=32)
            )
        assert steps.steps == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: ActivationCallback(layers="net.block", num_probes=2),
        lambda: EmbeddingCallback(layers="net.block", num_probes=4, projection="pca", projector=False),
        lambda: TopPatchesCallback(layers="net.block", num_probes=4, num_units=2, k=2),
        lambda: CAMCallback(layers="net.block.0", num_probes=2),
    ],
    ids=["activations", "embeddings", "top_patches", "cam"],
)
def test_a_torchscript_layer_is_refused_at_setup_with_what_to_name_instead(tmp_path, make):
    """A TorchScript module (and each module inside it) takes no hooks. Naming one failed with torch's bare
    "register_forward_hook is not supported on ScriptModules" at the first run (CAM: "no feature map produced by
    convolutions", of a scripted block holding a conv); now at setup, naming the callback, the layer and what to do."""
    from test_relu_rules import _ScriptedBlockNet

    cb = make()
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    with pytest.raises(LayerNotFoundError) as info:
        trainer.fit(LitTiny(_ScriptedBlockNet("script")), *tiny_loaders(n=6))
    message = str(info.value)
    assert message.startswith(f"{type(cb).__name__}: layer 'net.block"), message
    assert "is inside a TorchScript module ('net.block'" in message or "is a TorchScript module" in message, message
    assert "takes no hooks" in message and "Conv layers: 'net.conv'" in message, message


def test_pure_methods_refuse_a_torchscript_layer_clearly():
    from test_relu_rules import _ScriptedBlockNet

    from lightning_viz.methods import feature_maps

    model = _ScriptedBlockNet("script").eval()
    x = torch.randn(2, 3, 8, 8)
    with isolated(model):
        with pytest.raises(LayerNotFoundError, match=r"^layer 'block' is a TorchScript module \(RecursiveScriptModule"):
            feature_maps(model, x, "block")
        with pytest.raises(LayerNotFoundError, match=r"^layer 'block.1' is inside a TorchScript module \('block'"):
            C.class_activation_map(model, x, "block.1", target=0)
        assert list(feature_maps(model, x, "conv")) == ["conv"]
