"""Learned weights shown as images: first-layer conv filters and linear-classifier templates.

* :func:`conv_filters`: the kernels of a convolution, ``[out, in, kh, kw]`` -- the first layer's
  filters are directly interpretable as image patches (Krizhevsky et al. 2012, Fig. 3;
  Zeiler & Fergus 2014, Fig. 6).
* :func:`linear_templates`: the rows ``w_k`` of a linear classifier ``s_k = w_k . vec(x) + b_k`` fed
  directly by the flattened image, reshaped to the image shape: one "template" per class
  (Simonyan et al. 2014, "Deep Inside Convolutional Networks", its linear-model intuition).

Both read weights only (no forward pass) and return detached copies.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional, cast

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.overrides import TorchFunctionMode

from ..capture import isolated
from ..layers import LayerNotFoundError, first_conv_name, get_layer, linear_layer_names, require_conv, unwrap_model

__all__ = ["conv_filters", "applied_weight", "linear_templates", "first_linear_name"]


def conv_filters(model: nn.Module, layer: str | None = None) -> Tensor:
    """Kernels of the 2-D convolution ``layer`` (default: the first conv), ``Tensor[out, in/groups, kh, kw]``: the
    ones its forward convolves with (:func:`applied_weight`: standardized, scaled or fake-quantized where the conv
    does that, as timm's NFNets and BiT ResNets do), else ``weight``.

    Raises:
        LayerNotFoundError: unknown name (listing valid ones) or a layer that is not a 2-D convolution.
    """
    name = layer if layer is not None else first_conv_name(model)
    conv = require_conv(model, name, "conv_filters")
    weight = cast(Tensor, conv.weight)  # require_conv returns a convolution, whose weight is a tensor
    _require_created(weight, name, type(conv).__name__, "conv_filters")
    if weight.ndim != 4:
        raise LayerNotFoundError(
            f"conv_filters needs a 2-D convolution (nn.Conv2d), but {name!r} is a {type(conv).__name__} "
            f"with weight shape {tuple(weight.shape)}."
        )
    applied = applied_weight(conv)
    return (applied if applied is not None else weight).detach().clone()


class _ConvWeight(TorchFunctionMode):
    """Records the ``weight`` of the first ``conv2d`` call."""

    weight: Optional[Tensor] = None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.conv2d and self.weight is None:
            self.weight = kwargs.get("weight", args[1] if len(args) > 1 else None)
        return func(*args, **kwargs)


def applied_weight(conv: nn.Module) -> Optional[Tensor]:
    """The kernel a 2-D convolution's forward actually convolves with, when it is another tensor of the weight's
    shape than ``conv.weight``: weight standardization (timm's ``StdConv2d`` of BiT, ``ScaledStdConv2d`` of
    NFNets, which standardize each filter and scale it by a learned gain) or fake quantization (QAT). One forward of
    a small zero image through ``conv.forward`` (no hooks; inside :func:`~lightning_viz.capture.isolated`, so
    nothing changes); ``None`` when the forward convolves ``conv.weight`` itself or fails."""
    weight = cast(Tensor, conv.weight)
    pads = getattr(conv, "padding", 0)
    pad = max(pads) if isinstance(pads, tuple) else 0
    size = [2 * ((k - 1) * d + 1 + pad) for k, d in zip(weight.shape[-2:], getattr(conv, "dilation", (1, 1)))]
    x = torch.zeros(1, weight.shape[1] * getattr(conv, "groups", 1), *size, dtype=weight.dtype, device=weight.device)
    try:
        with isolated(conv), torch.no_grad(), _ConvWeight() as mode:
            conv.forward(x)
    except Exception:
        return None
    w = mode.weight
    if not isinstance(w, Tensor) or w.shape != weight.shape or w is weight:
        return None
    return w


def _require_created(weight: Tensor, name: str, kind: str, method: str) -> None:
    if is_lazy(weight):
        raise ValueError(
            f"{method}: layer {name!r} is a {kind} whose weights do not exist yet (a lazy layer creates them at "
            "the model's first forward); call the model once first."
        )


def first_linear_name(model: nn.Module) -> str:
    """Name of the first ``nn.Linear`` layer (the only one a flattened image can feed directly)."""
    names = linear_layer_names(model)
    if not names:
        raise LayerNotFoundError(f"{type(unwrap_model(model)).__name__} has no nn.Linear layer to show templates of.")
    return names[0]


def linear_templates(model: nn.Module, layer: str | None, input_shape: Sequence[int]) -> Tensor:
    """Weights of linear layer ``layer`` (default: the first) reshaped to images, ``Tensor[K, C, H, W]``.

    Only meaningful when the layer is fed by the flattened image itself (``in_features == C*H*W``);
    row ``k`` is then the template whose dot product with ``x`` gives the score of output ``k``.

    Args:
        input_shape: ``(C, H, W)`` of one model input.

    Raises:
        LayerNotFoundError: unknown name, or a layer that is not ``nn.Linear``.
        ValueError: ``in_features`` differs from ``C*H*W``.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W); got {shape}")
    name = layer if layer is not None else first_linear_name(model)
    lin = get_layer(model, name)
    if not isinstance(lin, nn.Linear):
        raise LayerNotFoundError(
            f"linear_templates needs an nn.Linear layer, but {name!r} is a {type(lin).__name__}. "
            f"Valid linear layers: {', '.join(repr(n) for n in linear_layer_names(model)) or '(none)'}."
        )
    _require_created(lin.weight, name, type(lin).__name__, "linear_templates")
    c, h, w = shape
    if lin.in_features != c * h * w:
        raise ValueError(
            f"linear_templates: layer {name!r} has in_features={lin.in_features}, but an input of shape "
            f"{shape} flattens to {c * h * w}; templates only exist for a linear layer fed directly by the image."
        )
    return lin.weight.detach().clone().view(lin.out_features, c, h, w)
