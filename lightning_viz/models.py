"""Models for the demos: a small CNN made for visualization, and a LightningModule around any classifier.

``ImageClassifier(arch=...)`` builds ``"small_cnn"`` or any torchvision classification model by its
builder name (``resnet18``, ``vgg11``, ``densenet121``, ``mobilenet_v3_small``, ...) with random
weights, or with torchvision's pretrained ``weights`` (``"DEFAULT"``, ``"IMAGENET1K_V1"`` or
``"ResNet18_Weights.IMAGENET1K_V1"``) read from the local torch hub cache -- never downloaded at run
time (:func:`pretrained_weights_file` says which file to place where). The network is ``self.net``, so
layer names read ``net.conv3`` or ``net.layer4`` in callback options.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import named_layers
from .probe import split_sample

__all__ = [
    "SmallCNN",
    "ImageClassifier",
    "available_archs",
    "build_model",
    "resolve_weights",
    "pretrained_weights_file",
]


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks, global average pooling and a linear head (so CAM applies).

    Layers: ``conv1 bn1 relu1 pool1 conv2 bn2 (F.relu) pool2 conv3 bn3 relu3 gap fc``; ``relu1``/``relu3``
    are in-place ``nn.ReLU`` modules and block 2 uses the functional ``F.relu``, the mix visualization
    methods meet in real models. Channels: ``width``, ``2*width``, ``4*width``; resolution halves twice.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 4, width: int = 16):
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(in_channels, w, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(w, 2 * w, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * w)
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(2 * w, 4 * w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * w)
        self.relu3 = nn.ReLU(inplace=True)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(F.relu(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(self.gap(x).flatten(1))


def available_archs() -> list[str]:
    """``"small_cnn"`` and every torchvision classification builder name."""
    import torchvision

    return ["small_cnn"] + sorted(torchvision.models.list_models(module=torchvision.models))


def _set_module(net: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(net.get_submodule(parent_name) if parent_name else net, attr, module)


def _replace_first_conv(net: nn.Module, in_channels: int, keep_weights: bool = False) -> None:
    """Swap the first ``Conv2d`` for one taking ``in_channels`` (same kernel, stride, padding, ...). With
    ``keep_weights`` (pretrained), its kernels are the mean over the old input channels times ``3 / in_channels``
    (a gray image then gives the same response as the same image in RGB)."""
    for name, m in named_layers(net).items():
        if isinstance(m, nn.Conv2d):
            geometry: dict[str, Any] = dict(
                kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation
            )
            new = nn.Conv2d(
                in_channels, m.out_channels, **geometry, bias=m.bias is not None, padding_mode=m.padding_mode
            )
            if keep_weights:
                with torch.no_grad():
                    mean = m.weight.mean(dim=1, keepdim=True) * (m.in_channels / in_channels)
                    new.weight.copy_(mean.expand(-1, in_channels, -1, -1))
                    if m.bias is not None and new.bias is not None:
                        new.bias.copy_(m.bias)
            _set_module(net, name, new)
            return
    raise ValueError(f"cannot adapt {type(net).__name__} to in_channels={in_channels}: it has no Conv2d layer")


def _replace_head(net: nn.Module, num_outputs: int, num_classes: int) -> None:
    """Swap the last layer giving ``num_outputs`` (``nn.Linear``, or the ``Conv2d`` of squeezenet) for a fresh
    one giving ``num_classes``."""
    for name, m in reversed(list(named_layers(net).items())):
        if isinstance(m, nn.Linear) and m.out_features == num_outputs:
            _set_module(net, name, nn.Linear(m.in_features, num_classes, bias=m.bias is not None))
            return
        if isinstance(m, nn.Conv2d) and m.out_channels == num_outputs:
            geometry: dict[str, Any] = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding)
            _set_module(net, name, nn.Conv2d(m.in_channels, num_classes, **geometry, bias=m.bias is not None))
            return
    raise ValueError(f"cannot find the classifier of {type(net).__name__} ({num_outputs} outputs) to replace")


def resolve_weights(arch: str, weights: str) -> Any:
    """The torchvision ``WeightsEnum`` member for ``arch`` named ``weights`` (``"DEFAULT"``, ``"IMAGENET1K_V1"``
    or ``"ResNet18_Weights.IMAGENET1K_V1"``); a clear error listing the allowed names."""
    import torchvision

    if arch == "small_cnn":
        raise ValueError(
            "small_cnn has no pretrained weights; use a torchvision arch (e.g. arch='resnet18') or weights=None"
        )
    enum = torchvision.models.get_model_weights(arch)
    allowed = ["DEFAULT"] + [f"{enum.__name__}.{w.name}" for w in enum] + [w.name for w in enum]
    name = weights.split(".", 1)[1] if weights.startswith(enum.__name__ + ".") else weights
    if name == "DEFAULT":
        return enum.DEFAULT
    if name not in enum.__members__:
        raise ValueError(f"unknown weights {weights!r} for arch {arch!r}; allowed: {', '.join(allowed)}")
    return enum[name]


def pretrained_weights_file(weights: Any) -> str:
    """Where torchvision looks for ``weights`` in the local hub cache: ``torch.hub.get_dir()/checkpoints/<file>``."""
    from urllib.parse import urlparse

    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(weights.url).path))


def build_model(
    arch: str = "small_cnn", num_classes: int = 4, in_channels: int = 3, width: int = 16, weights: Optional[str] = None
) -> nn.Module:
    """A classifier, randomly initialised or (``weights``) from torchvision's pretrained weights in the local
    torch hub cache. ``width`` applies to ``small_cnn`` only. With ``weights``, a ``num_classes`` other than the
    weights' gets a fresh classifier layer, and ``in_channels`` other than 3 a first conv whose kernels are the
    pretrained ones averaged over RGB.

    Raises:
        ValueError: for an unknown ``arch`` or ``weights``, listing the allowed names.
        FileNotFoundError: when the weights file is not in the hub cache, naming the file and its URL.
    """
    if arch == "small_cnn":
        if weights is not None:
            resolve_weights(arch, weights)  # raises: no pretrained small_cnn
        return SmallCNN(in_channels=in_channels, num_classes=num_classes, width=width)
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise ValueError(f"Unknown arch {arch!r}. Allowed: {', '.join(available_archs())}.")
    kwargs: dict[str, Any] = {"aux_logits": False} if arch in ("googlenet", "inception_v3") else {}
    if weights is None:
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes, **kwargs)
    else:
        enum = resolve_weights(arch, weights)
        path = pretrained_weights_file(enum)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained weights {enum} for {arch!r} are not in the local torch hub cache: place the file\n"
                f"  {path}\n(download it once where there is network: {enum.url}; e.g. "
                f"`curl -L --create-dirs -o {path} {enum.url}`). lightning-viz never downloads at run time; "
                "TORCH_HOME or torch.hub.set_dir() choose the cache folder."
            )
        net = torchvision.models.get_model(arch, weights=enum, progress=False, **kwargs)  # reads the cached file
        categories = len(enum.meta.get("categories") or ())
        if categories and num_classes != categories:
            _replace_head(net, categories, num_classes)
    if in_channels != 3:
        _replace_first_conv(net, in_channels, keep_weights=weights is not None)
    return net


def _check_class_probabilities(y: Tensor) -> None:
    """``[B, K]`` labels ImageClassifier's cross-entropy can take: rows of class probabilities (one-hot, smoothed,
    mixed), each non-negative and summing to 1; multi-hot rows (multi-label targets) are refused, naming a row."""
    sums = y.detach().sum(dim=1)
    bad = ((sums - 1).abs() > 1e-3) | (y.detach() < 0).any(dim=1)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"ImageClassifier trains with cross-entropy (one class per image), so [B, K] labels must be class "
            f"probabilities (one-hot or soft rows, non-negative and summing to 1); row {i} of this batch is "
            f"{[round(v, 4) for v in y[i].tolist()][:16]} (sum {float(sums[i]):.4g}): multi-hot labels (a "
            "multi-label task)? Train those with your own LightningModule and BCEWithLogitsLoss (README: Binary, "
            "multi-label and regression heads)"
        )


class ImageClassifier(L.LightningModule):
    """Cross-entropy classifier trained with Adam; logs ``train_loss``, ``val_loss`` and ``val_acc`` (``test_loss``
    and ``test_acc`` under ``trainer.test``); ``trainer.predict`` returns class probabilities.

    Args:
        arch: ``"small_cnn"`` or a torchvision classification builder name (see :func:`available_archs`).
        num_classes: number of output logits.
        in_channels: image channels (the first conv of torchvision models is replaced when not 3).
        lr: Adam learning rate.
        weight_decay: Adam weight decay.
        width: base channel width of ``small_cnn`` (ignored by torchvision architectures).
        weights: torchvision pretrained weights of ``arch`` (``"DEFAULT"``, ``"IMAGENET1K_V1"``,
            ``"ResNet18_Weights.IMAGENET1K_V1"``), read from ``torch.hub.get_dir()/checkpoints`` (never downloaded;
            a missing file is an error naming it and its URL). ``None``: random initialisation.

    Batches may be ``(x, y)``, ``(x, y, mask)`` or dicts (see :func:`lightning_viz.probe.split_sample`).
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        num_classes: int = 4,
        in_channels: int = 3,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        width: int = 16,
        weights: Optional[str] = None,
    ):
        if num_classes < 2:
            raise ValueError(
                f"ImageClassifier(num_classes={num_classes}): it trains with cross-entropy over the classes, which "
                "is 0 for a single class (nothing would be learnt); a binary classifier is num_classes=2 with "
                "labels 0/1 (for one logit trained with BCEWithLogitsLoss, write your own LightningModule)"
            )
        super().__init__()
        self.save_hyperparameters()
        self.net = build_model(arch, num_classes=num_classes, in_channels=in_channels, width=width, weights=weights)
        self.lr, self.weight_decay = lr, weight_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def setup(self, stage: str) -> None:
        """Fail before any step when the datamodule declares more classes or other ``in_channels``."""
        dm = getattr(self.trainer, "datamodule", None)
        for attr in ("num_classes", "in_channels"):
            theirs, mine = getattr(dm, attr, None), self.hparams[attr]
            if isinstance(theirs, int) and (theirs > mine if attr == "num_classes" else theirs != mine):
                raise ValueError(
                    f"ImageClassifier({attr}={mine}) does not match the data: {type(dm).__name__} has "
                    f"{attr}={theirs}. Set model.{attr} (CLI: --model.{attr}={theirs})."
                )

    def _step(self, batch) -> tuple[Tensor, Tensor]:
        x, y, _ = split_sample(batch, classes=False)
        if y is None:
            raise ValueError("ImageClassifier needs labelled batches: (x, y), (x, y, mask) or a dict with a label key")
        logits = self(x)
        if y.ndim == 2 and y.shape == logits.shape:  # one-hot or soft labels (label smoothing, mixup, cutmix)
            y = y.to(logits.dtype)  # class probabilities: cross-entropy against them, not against their arg-max
            _check_class_probabilities(y)
            return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y.argmax(dim=1)).float().mean()
        return F.cross_entropy(logits, y), (logits.argmax(dim=1) == y).float().mean()

    def training_step(self, batch, batch_idx: int) -> Tensor:
        loss, _ = self._step(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        loss, acc = self._step(batch)
        # sync_dist: under DDP the epoch values are averaged over ranks (a no-op on one device).
        self.log("val_loss", loss, prog_bar=True, sync_dist=True)
        self.log("val_acc", acc, prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        loss, acc = self._step(batch)
        self.log("test_loss", loss, sync_dist=True)
        self.log("test_acc", acc, sync_dist=True)

    def predict_step(self, batch, batch_idx: int) -> Tensor:
        """Class probabilities ``[B, num_classes]`` (softmax of the logits); labels in the batch are ignored."""
        return self(split_sample(batch)[0]).softmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
