"""Resolve dotted layer names to modules, with errors that list what is allowed.

Names are the ones ``model.named_modules()`` yields (``"layer4.1.conv2"``, ``"features.0"``).
Wrapper prefixes added by ``torch.compile`` (``_orig_mod.``) and DDP/DataParallel (``module.``)
are ignored, so the same name works on the plain, compiled and wrapped model.
Also: where a module lives (:func:`module_device`, :func:`module_dtype`), so inputs can be put there.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = [
    "LayerNotFoundError",
    "unwrap_model",
    "canonical_name",
    "named_layers",
    "get_layer",
    "conv_layer_names",
    "linear_layer_names",
    "first_conv_name",
    "last_conv_name",
    "require_conv",
    "resolve_layers",
    "module_device",
    "module_dtype",
]

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LayerNotFoundError(ValueError):
    """A layer name that is not in the model (or not of the kind a method needs)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` / DDP / DataParallel wrappers and return the module with the real names."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def canonical_name(name: str) -> str:
    """Drop wrapper prefixes anywhere in a dotted name (``_orig_mod.model.conv1`` -> ``model.conv1``)."""
    return ".".join(p for p in name.split(".") if p != "_orig_mod")


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All submodules by canonical dotted name (the root is ``""``)."""
    model = unwrap_model(model)
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        out.setdefault(canonical_name(name), module)
    return out


def _format_names(names: Iterable[str], limit: int = 60) -> str:
    names = list(names)
    shown = ", ".join(repr(n) for n in names[:limit])
    if len(names) > limit:
        shown += f", ... ({len(names) - limit} more)"
    return shown or "(none)"


def conv_layer_names(model: nn.Module) -> list[str]:
    """Names of every convolution layer, in definition order."""
    return [n for n, m in named_layers(model).items() if isinstance(m, CONV_TYPES)]


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` layer, in definition order."""
    return [n for n, m in named_layers(model).items() if isinstance(m, nn.Linear)]


def get_layer(model: nn.Module, name: str) -> nn.Module:
    """Return the submodule called ``name``.

    Raises:
        LayerNotFoundError: naming the unknown layer and listing the valid conv/linear layer names
            (the usual targets), plus a hint that any ``named_modules()`` name is accepted.
    """
    layers = named_layers(model)
    key = canonical_name(name)
    if key in layers:
        return layers[key]
    # Forgive a DDP-style 'module.' prefix that is not part of the model's own names.
    if key.startswith("module.") and key[len("module."):] in layers:
        return layers[key[len("module."):]]
    convs = conv_layer_names(model)
    linears = linear_layer_names(model)
    raise LayerNotFoundError(
        f"Unknown layer {name!r} in {type(unwrap_model(model)).__name__}. "
        f"Valid conv layers: {_format_names(convs)}. Valid linear layers: {_format_names(linears)}. "
        "Any dotted name from model.named_modules() is accepted (e.g. a block such as 'layer4')."
    )


def resolve_layers(model: nn.Module, names: str | Iterable[str] | None, default: str = "last_conv") -> list[str]:
    """Validate layer names (or pick a default) and return canonical names.

    ``names`` may be one name, a list of names, or ``None`` for ``default``
    (``"last_conv"`` or ``"first_conv"``).
    """
    if names is None:
        names = [last_conv_name(model) if default == "last_conv" else first_conv_name(model)]
    elif isinstance(names, str):
        names = [names]
    out = []
    for n in names:
        get_layer(model, n)
        out.append(canonical_name(n))
    return out


def _require_any_conv(model: nn.Module, what: str) -> list[str]:
    convs = conv_layer_names(model)
    if not convs:
        raise LayerNotFoundError(
            f"{what} needs a convolution layer, but {type(unwrap_model(model)).__name__} has none "
            f"(its layers: {_format_names(n for n in named_layers(model) if n)})."
        )
    return convs


def first_conv_name(model: nn.Module) -> str:
    """Name of the first convolution layer in definition order."""
    return _require_any_conv(model, "Finding the first conv layer")[0]


def last_conv_name(model: nn.Module) -> str:
    """Name of the last convolution layer in definition order (the usual Grad-CAM target)."""
    return _require_any_conv(model, "Finding the last conv layer")[-1]


def require_conv(model: nn.Module, name: str, method: str) -> nn.Module:
    """Return layer ``name`` if it is a convolution, else explain that ``method`` needs one."""
    layer = get_layer(model, name)
    if not isinstance(layer, CONV_TYPES):
        convs = _require_any_conv(model, method)
        raise LayerNotFoundError(
            f"{method} needs a convolution layer, but {name!r} is a {type(layer).__name__}. "
            f"Valid conv layers: {_format_names(convs)}."
        )
    return layer


def module_device(module: nn.Module) -> torch.device:
    """Device of the module's first parameter (CPU for a module without parameters)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of the module's first floating-point parameter (float32 if it has none): the dtype its
    inputs must have (e.g. float64 under ``precision="64-true"``)."""
    p = next((p for p in module.parameters() if p.is_floating_point()), None)
    return p.dtype if p is not None else torch.float32
