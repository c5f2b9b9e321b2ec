"""Which layer a callback picks by default: the CAM/activation default on architectures without a final conv map
(vision transformers), the classifier head (the last nn.Linear called, not the last defined) for CAM and
embeddings, and the setup messages when no choice is possible."""

from __future__ import annotations

import pytest
import torch
from helpers import LitTiny, tiny_loaders, tiny_trainer
from lightning.pytorch.callbacks import Callback

from lightning_viz.callbacks import ActivationCallback, CAMCallback
from lightning_viz.capture import isolated
from lightning_viz.layers import LayerNotFoundError, default_cam_layer

timm = pytest.importorskip("timm")


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
        "(e.g. 'layer4' of a ResNet)."
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
