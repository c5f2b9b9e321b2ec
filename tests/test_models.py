"""SmallCNN and ImageClassifier: layer names, CAM-ready head, torchvision archs, training on shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import read_events, scalar_steps, tiny_trainer
from torch import nn

from lightning_viz.capture import capture
from lightning_viz.data.shapes import ShapesDataModule
from lightning_viz.layers import conv_layer_names, first_conv_name, last_conv_name
from lightning_viz.models import ImageClassifier, SmallCNN, available_archs, build_model


def test_small_cnn_layers_and_cam_head():
    net = SmallCNN(in_channels=3, num_classes=4, width=4).eval()
    assert conv_layer_names(net) == ["conv1", "conv2", "conv3"] and last_conv_name(net) == "conv3"
    assert net.relu1.inplace and net.relu3.inplace
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with capture(net, ["relu3", "conv2", "bn2"]) as acts:
        logits = net(x)
    feats = acts["relu3"]
    assert feats.shape == (2, 16, 4, 4) and (feats >= 0).all()  # two 2x poolings, 4*width channels
    # Global average pooling + linear: logits are the class-weighted mean of the last maps (CAM).
    cam_logits = torch.einsum("kc,bchw->bk", net.fc.weight, feats) / 16 + net.fc.bias
    torch.testing.assert_close(logits, cam_logits, atol=1e-5, rtol=1e-5)
    # Block 2 is rectified by the functional relu: no module for it, and bn2's output still has negatives.
    assert not any(isinstance(m, nn.ReLU) for n, m in net.named_modules() if n.startswith("bn2"))
    assert (acts["bn2"] < 0).any()


def test_image_classifier_layer_names_under_net():
    model = ImageClassifier(arch="small_cnn", num_classes=4, width=4)
    assert first_conv_name(model) == "net.conv1" and last_conv_name(model) == "net.conv3"
    assert model.hparams.arch == "small_cnn" and model.hparams.width == 4


@pytest.mark.parametrize("arch", ["resnet18", "vgg11", "densenet121", "mobilenet_v3_small"])
def test_torchvision_archs_build_for_1_and_3_channels(arch):
    for in_channels in (1, 3):
        model = ImageClassifier(arch=arch, num_classes=5, in_channels=in_channels).eval()
        first = dict(model.named_modules())[first_conv_name(model)]
        assert first.in_channels == in_channels
        with torch.no_grad():
            out = model(torch.randn(2, in_channels, 32, 32))
        assert out.shape == (2, 5)


def test_unknown_arch_lists_allowed_names():
    with pytest.raises(ValueError, match="Unknown arch 'resnet19'") as e:
        build_model("resnet19")
    for name in ("small_cnn", "resnet18", "vgg11", "densenet121", "mobilenet_v3_small"):
        assert name in str(e.value) and name in available_archs()


def test_steps_accept_masks_and_dicts():
    model = ImageClassifier(num_classes=4, width=4)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    loss = model.training_step((x, y, torch.zeros(4, 16, 16)), 0)
    torch.testing.assert_close(loss, F.cross_entropy(model(x), y))
    torch.testing.assert_close(model.training_step({"image": x, "label": y}, 0), loss)
    with pytest.raises(ValueError, match="labelled batches"):
        model.training_step(x, 0)


def test_steps_train_on_soft_labels_not_their_arg_max():
    """Mixup / cutmix / label-smoothed batches ([B, K] class probabilities, e.g. torchvision's v2.MixUp): the loss
    is the cross-entropy against them (was: against their arg-max, silently training on hard labels)."""
    torch.manual_seed(0)
    model = ImageClassifier(num_classes=3, width=4)
    x = torch.randn(2, 3, 16, 16)
    soft = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.3, 0.7]])
    torch.testing.assert_close(model.training_step((x, soft), 0), F.cross_entropy(model(x), soft))
    hard = torch.tensor([0, 2])
    one_hot = F.one_hot(hard, 3)  # integer one-hot rows: the same loss as the class indices
    torch.testing.assert_close(
        model.training_step({"image": x, "labels": one_hot}, 0), model.training_step((x, hard), 0)
    )


def test_multi_hot_labels_and_one_class_are_refused():
    """Multi-hot labels (a multi-label task) used to be taken as class probabilities summing to 2 (a cross-entropy
    that fits no distribution, val_acc by arg-max); num_classes=1 trained on a loss of 0. Both now fail clearly."""
    model = ImageClassifier(num_classes=4, width=4)
    x = torch.randn(3, 3, 16, 16)
    multi_hot = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError, match=r"row 1 of this batch is \[1.0, 1.0, 0.0, 0.0\] \(sum 2\): multi-hot"):
        model.training_step((x, multi_hot), 0)
    with pytest.raises(ValueError, match=r"row 0 .* \(sum 0\)"):
        model.validation_step((x[:1], multi_hot[2:]), 0)
    smoothed = torch.full((3, 4), 0.1 / 4) + 0.9 * F.one_hot(torch.tensor([0, 1, 3]), 4)  # label smoothing: fine
    torch.testing.assert_close(model.training_step((x, smoothed), 0), F.cross_entropy(model(x), smoothed))
    with pytest.raises(ValueError, match=r"ImageClassifier\(num_classes=1\): .* is 0 for a single class"):
        ImageClassifier(num_classes=1)


@pytest.mark.parametrize(
    "opts,bad",
    [
        ({"num_classes": 4, "in_channels": 1}, "num_classes=10"),
        ({"num_classes": 10, "in_channels": 3}, "in_channels=1"),
    ],
)
def test_model_data_mismatch_fails_at_setup_naming_the_option(tmp_path, opts, bad):
    """Digits (1 channel, 10 classes) with the demo's model options: an error naming the option, before any step."""
    from lightning_viz.data.digits import DigitsDataModule

    trainer = tiny_trainer(str(tmp_path), max_epochs=1)
    with pytest.raises(ValueError, match=rf"DigitsDataModule has {bad}.*--model.{bad}"):
        trainer.fit(ImageClassifier(width=4, **opts), datamodule=DigitsDataModule(image_size=8))
    assert trainer.global_step == 0


def test_small_cnn_learns_shapes_in_two_epochs(tmp_path):
    dm = ShapesDataModule(num_train=768, num_val=128, image_size=24, batch_size=32, seed=0)
    model = ImageClassifier(num_classes=4, width=8, lr=3e-3)
    trainer = tiny_trainer(str(tmp_path), max_epochs=2)
    trainer.fit(model, datamodule=dm)
    assert float(trainer.callback_metrics["val_acc"]) > 0.6  # chance is 0.25
    acc = read_events(str(tmp_path))
    assert scalar_steps(acc, "val_acc") and scalar_steps(acc, "val_loss") and scalar_steps(acc, "train_loss")


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty local torch hub cache (TORCH_HOME) for this test only."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert torch.hub.get_dir() == str(tmp_path / "torch" / "hub")
    return tmp_path / "torch" / "hub"


def _place_weights(arch: str, name: str, seed: int = 0) -> dict:
    """A real torchvision state dict (random, seeded) saved where torchvision's cache keeps ``name``."""
    import torchvision

    from lightning_viz.models import pretrained_weights_file

    weights = torchvision.models.get_weight(name)
    torch.manual_seed(seed)
    state = torchvision.models.get_model(arch, weights=None, num_classes=len(weights.meta["categories"])).state_dict()
    path = pretrained_weights_file(weights)
    import os

    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(state, path)
    return state


def test_pretrained_weights_load_bit_identically_from_the_hub_cache(hub_dir):
    state = _place_weights("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    assert (hub_dir / "checkpoints" / "resnet18-f37072fd.pth").is_file()
    for name in ("ResNet18_Weights.IMAGENET1K_V1", "IMAGENET1K_V1", "DEFAULT"):
        model = ImageClassifier(arch="resnet18", num_classes=1000, weights=name)
        loaded = model.net.state_dict()
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state), name
    assert model.hparams.weights == "DEFAULT"


def test_pretrained_weights_with_other_classes_and_channels(hub_dir):
    state = _place_weights("resnet18", "ResNet18_Weights.IMAGENET1K_V1", seed=1)
    model = ImageClassifier(arch="resnet18", num_classes=3, in_channels=1, weights="DEFAULT")
    net = model.net
    assert net.fc.out_features == 3 and net.fc.in_features == 512  # a fresh head
    assert torch.equal(net.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])  # the body is pretrained
    # the gray first conv: RGB kernels summed (mean * 3), so a gray image responds as its RGB copy
    torch.testing.assert_close(net.conv1.weight, state["conv1.weight"].sum(dim=1, keepdim=True))
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    rgb = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    with torch.no_grad():
        rgb.weight.copy_(state["conv1.weight"])
        torch.testing.assert_close(net.conv1(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)
    assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 3)


def test_missing_pretrained_weights_name_the_file_and_url_and_never_download(hub_dir):
    with pytest.raises(FileNotFoundError) as info:
        ImageClassifier(arch="resnet18", num_classes=4, weights="DEFAULT")
    msg = str(info.value)
    assert str(hub_dir / "checkpoints" / "resnet18-f37072fd.pth") in msg
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in msg
    assert not (hub_dir / "checkpoints").exists()  # nothing was downloaded
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET9'.*ResNet18_Weights.IMAGENET1K_V1"):
        ImageClassifier(arch="resnet18", weights="IMAGENET9")
    with pytest.raises(ValueError, match="small_cnn has no pretrained weights"):
        ImageClassifier(weights="DEFAULT")


def test_a_layer_name_of_the_inner_network_suggests_the_full_name(tmp_path):
    """'layer4' (the torchvision name) on ImageClassifier, whose network is ``net``: the error suggests 'net.layer4'
    (was: only the list of every conv and linear layer, 'net.layer4' not among them as it is a block)."""
    from lightning_viz.callbacks import CAMCallback
    from lightning_viz.layers import LayerNotFoundError, get_layer

    model = ImageClassifier(arch="resnet18", num_classes=4)
    with pytest.raises(LayerNotFoundError, match=r"^Unknown layer 'layer4' in ImageClassifier\. Did you mean 'net\.l"):
        get_layer(model, "layer4")
    with pytest.raises(LayerNotFoundError, match=r"Did you mean 'net\.conv1'\?"):  # not 'net.layer1.0.conv1'
        get_layer(model, "conv1")
    trainer = tiny_trainer(str(tmp_path), [CAMCallback(layers=["layer3"], num_probes=2)], max_epochs=1)
    with pytest.raises(LayerNotFoundError, match=r"^CAMCallback: Unknown layer 'layer3' in ImageClassifier\. Did you"):
        trainer.fit(model, datamodule=ShapesDataModule(num_train=8, num_val=4, image_size=32, batch_size=4))
    assert trainer.global_step == 0
