"""Early, clear checks of what a pure method is given (the callbacks check the same at setup)."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterable, Iterator
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.nn.modules.instancenorm import _InstanceNorm

from ..targets import describe_output, invalid_classes

__all__ = [
    "check_images",
    "check_eval",
    "check_classes",
    "check_labels_per_image",
    "check_logits",
    "input_matches_model",
    "check_reaches_input",
    "check_layers_get_gradients",
    "check_chunk_size",
]


def check_chunk_size(chunk_size: object, owner: str = "", option: str = "chunk_size") -> Optional[int]:
    """``chunk_size`` (images per forward) as an ``int >= 1``, or ``None``; a numpy integer counts, a bool or float
    does not, and ``0`` or a negative number is refused (no "one chunk" or "automatic" meaning). ``None`` is
    automatic: as many as the memory budget holds (:mod:`~lightning_viz.methods.batching`), or all at once where a
    method has no budget. The one rule of every pure method and callback taking ``chunk_size``: the pure methods check
    it when called, before any forward; the callbacks when built. ``owner`` prefixes the message (``"MapTracker"``;
    callbacks get theirs from the base class); ``option``: the name it goes by (``batch_size`` of
    :func:`~lightning_viz.methods.embeddings.extract_features` and :func:`~lightning_viz.methods.patches.scan_topk`)."""
    who = f"{owner}: {option}" if owner else option
    if chunk_size is None:
        return None
    try:
        if isinstance(chunk_size, bool):
            raise TypeError
        n = operator.index(chunk_size)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{who} must be a whole number of images >= 1, or None; got {chunk_size!r}") from None
    if n < 1:
        raise ValueError(f"{who} must be >= 1 or None; got {chunk_size}")
    return n


def check_images(fn: str, x: object) -> None:
    """``x`` must be a floating ``[B, C, H, W]`` tensor."""
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a float image batch [B, C, H, W] (one image: x[None]); got {what}")


def check_labels_per_image(fn: str, labels: object, batch: int) -> Optional[Tensor]:
    """``labels`` (``None``, or one label per image: a tensor, list or array) as a tensor, or a clear error naming
    ``fn`` when their count is not ``batch`` (a method that slices them per chunk would silently pair the images
    with the first labels of a longer tensor)."""
    if labels is None:
        return None
    t = labels if isinstance(labels, Tensor) else torch.as_tensor(labels)
    if t.ndim == 0 or t.shape[0] != batch:
        got = "one label (a 0-d tensor)" if t.ndim == 0 else f"{t.shape[0]} labels"
        raise ValueError(f"{fn}: labels must hold one label per image: got {got} for {batch} images")
    return t


@contextlib.contextmanager
def input_matches_model(fn: str, model: nn.Module, x: Tensor) -> Iterator[None]:
    """Inside the block, torch's bare device / dtype error of a forward given ``x`` on another device or of another
    dtype than the model's parameters becomes a clear one naming ``fn`` and both. Checked only once a forward
    failed: a model that moves or casts its input itself, or runs under autocast, is fine."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        p = next((p for p in model.parameters() if p.is_floating_point()), None)
        text = str(exc)
        if p is None or (p.device == x.device and p.dtype == x.dtype) or not ("device" in text or "type" in text):
            raise
        raise ValueError(
            f"{fn}: x is {x.dtype} on {x.device} but the model's parameters are {p.dtype} on {p.device}; pass x on "
            f"the model's device and dtype, e.g. x.to(next(model.parameters())). (torch: {text.splitlines()[0]})"
        ) from exc


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
            "update its running statistics). Call it inside lightning_viz.isolated(model) (eval mode, "
            "restored on exit) or call model.eval() first."
        )


def check_classes(fn: str, classes: Tensor, batch: int, num_classes: Optional[int] = None) -> Tensor:
    """``classes`` as ``long [batch]`` (one int: every image), or a clear error naming ``fn`` when they are not
    one class index ``0..num_classes-1`` per image (``num_classes=None``: the count only)."""
    bad = invalid_classes(classes.reshape(-1), num_classes)  # 2.7 is no class 2, nor -0.5 class 0
    if bad.numel():
        allowed = f"0..{num_classes - 1} (the model has {num_classes} classes)" if num_classes is not None else ">= 0"
        raise ValueError(f"{fn}: class indices must be {allowed}, whole numbers; got {bad[:5].tolist()}")
    cls = classes.long().view(-1)
    if cls.numel() == 1:
        cls = cls.expand(batch)
    if cls.numel() != batch:
        raise ValueError(f"{fn}: needs one class per image: got {cls.numel()} classes for {batch} images")
    return cls.clone() if cls.is_inference() else cls


def check_logits(fn: str, out: object, batch: Optional[int]) -> Tensor:
    """``out``, the model's output for ``batch`` images, as logits ``[batch, K]``; else a clear error naming ``fn``
    that points at :func:`lightning_viz.targets.model_adapter` (dict / dataclass outputs, a ``logits_fn``, one-logit
    heads squeezed to ``[B]``)."""
    if isinstance(out, Tensor) and out.ndim == 2 and (batch is None or out.shape[0] == batch):
        return out
    here = "" if batch is None else f" (here B={batch})"
    raise ValueError(
        f"{fn}: the model must return logits [B, K]{here}, but it returned {describe_output(out)}. Wrap "
        "it: lightning_viz.targets.model_adapter(model, logits_fn=None) reads a 'logits' entry or attribute, any "
        "output through logits_fn=<a callable (model, x) -> logits>, and a one-logit head [B] or [B, 1] as two "
        "classes."
    )


def check_layers_get_gradients(
    fn: str, without_grad: Iterable[str], instead: str = "", unreached: Iterable[str] = ()
) -> None:
    """Refuse a gradient w.r.t. layers no gradient reaches (named in the message with ``fn``; ``instead``: a sentence
    on what works without one): ``without_grad``, those that ran with autograd off (inside ``torch.no_grad()`` in the
    forward, or reentrant gradient checkpointing outside :func:`~lightning_viz.capture.isolated`), and ``unreached``,
    those the score does not depend on through autograd (a ``.detach()`` after them). Their gradient would be missing:
    all-zero maps."""
    off, cut = sorted(without_grad), sorted(set(unreached) - set(without_grad))
    if not off and not cut:
        return
    tail = f" {instead}" if instead else ""
    if off:
        raise ValueError(
            f"{fn}: layer(s) {off} ran with autograd off, so no gradient reaches them: inside torch.no_grad() or "
            "torch.inference_mode() in the model's forward (freeze such a backbone with requires_grad_(False) "
            "instead: training is the same), or torch.utils.checkpoint(..., use_reentrant=True) outside "
            "lightning_viz.isolated (which runs such blocks as plain calls; or use use_reentrant=False)." + tail
        )
    raise ValueError(
        f"{fn}: the score does not depend on layer(s) {cut} through autograd, so no gradient reaches them: the "
        "forward detaches their output or a tensor after them before the logits (e.g. features = backbone(x)"
        ".detach(): freeze the backbone with requires_grad_(False) instead, training is the same), or they do not "
        "feed the logits." + tail
    )


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
