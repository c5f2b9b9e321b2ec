"""Early, clear checks of what a pure method is given (the callbacks check the same at setup)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["check_images", "check_eval", "check_classes", "check_reaches_input"]


def check_images(fn: str, x: object) -> None:
    """``x`` must be a floating ``[B, C, H, W]`` tensor."""
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a float image batch [B, C, H, W] (one image: x[None]); got {what}")


def _mode_dependent(module: nn.Module) -> bool:
    """Modules whose forward differs between train and eval mode (batch statistics, random drops)."""
    if isinstance(module, _BatchNorm):
        return True
    if isinstance(module, _InstanceNorm):  # running statistics used in eval mode only when tracked
        return module.track_running_stats
    if isinstance(module, (_DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)):
        return module.p > 0
    name = type(module).__name__
    return name.endswith("DropPath") or name == "StochasticDepth"  # timm, torchvision


def check_eval(fn: str, model: nn.Module) -> None:
    """Refuse a model whose BatchNorm / dropout layers are in training mode: its maps would mix the images of a
    batch (batch statistics) or be random (dropout), and every forward would update BatchNorm's running
    statistics."""
    bad = [n or type(model).__name__ for n, m in model.named_modules() if m.training and _mode_dependent(m)]
    if bad:
        shown = ", ".join(repr(n) for n in bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise ValueError(
            f"{fn}: the model is in training mode ({shown}: batch statistics / random drops, and BatchNorm would "
            "update its running statistics). Call it inside lightning_viz.capture.isolated(model) (eval mode, "
            "restored on exit) or call model.eval() first."
        )


def check_classes(fn: str, classes: Tensor, batch: int, num_classes: Optional[int] = None) -> Tensor:
    """``classes`` as ``long [batch]`` (one int: every image), or a clear error naming ``fn`` when they are not
    one class index ``0..num_classes-1`` per image (``num_classes=None``: the count only)."""
    cls = classes.long().view(-1)
    if cls.numel() == 1:
        cls = cls.expand(batch)
    if cls.numel() != batch:
        raise ValueError(f"{fn}: needs one class per image: got {cls.numel()} classes for {batch} images")
    bad = cls[(cls < 0) | (cls >= num_classes)] if num_classes is not None else cls[:0]
    if bad.numel():
        assert num_classes is not None
        raise ValueError(
            f"{fn}: class indices must be 0..{num_classes - 1} (the model has {num_classes} classes); got "
            f"{bad[:5].tolist()}"
        )
    return cls.clone() if cls.is_inference() else cls


def check_reaches_input(fn: str, reaches: bool) -> None:
    """Refuse a model whose output the input cannot reach through autograd (``reaches`` is ``False``): its forward
    runs the network, or the part before the output, under ``torch.no_grad()`` / ``torch.inference_mode()`` or
    detaches a tensor (a frozen backbone called under ``torch.no_grad()``). Every gradient w.r.t. the input would
    be missing: zero maps, images that never change."""
    if not reaches:
        raise ValueError(
            f"{fn} needs gradients w.r.t. the input, but the model's output does not depend on its input through "
            "autograd: its forward runs (part of) the network under torch.no_grad() / torch.inference_mode() or "
            "detaches a tensor (e.g. a frozen backbone called under torch.no_grad()). Freeze the backbone with "
            "requires_grad_(False) instead (training is the same), or leave out the methods that need gradients."
        )
