"""Resolve dotted layer names to modules, with errors that list what is allowed.

Names are the ones ``model.named_modules()`` yields (``"layer4.1.conv2"``, ``"features.0"``).
Wrapper prefixes added by ``torch.compile`` (``_orig_mod.``) and DDP/DataParallel (``module.``)
are ignored, so the same name works on the plain, compiled and wrapped model.
Also: where a module lives (:func:`module_device`, :func:`module_dtype`), so inputs can be put there, and
the default layer of CAM methods (:func:`default_cam_layer`: the last block feeding global pooling).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .targets import ModelAdapter

__all__ = [
    "LayerNotFoundError",
    "unwrap_model",
    "canonical_name",
    "named_layers",
    "conv_produced_maps",
    "channels_last_maps",
    "MapLayout",
    "map_layouts",
    "get_layer",
    "hookable_layer",
    "conv_layer_names",
    "linear_layer_names",
    "linear_calls",
    "last_called_linear",
    "first_conv_name",
    "last_conv_name",
    "require_conv",
    "resolve_layers",
    "module_device",
    "module_dtype",
    "has_lazy_parameters",
    "default_cam_layer",
]

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LayerNotFoundError(ValueError):
    """A layer name that is not in the model (or not of the kind a method needs)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip ``torch.compile`` / DDP / DataParallel / :class:`~lightning_viz.targets.ModelAdapter` wrappers and
    return the module with the real names."""
    while True:
        if isinstance(model, ModelAdapter):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


#: the attribute under which torch's activation-checkpoint wrapper (``apply_activation_checkpointing``, used by
#: Lightning's FSDP ``activation_checkpointing_policy``) holds the layer it wraps
_CHECKPOINT_WRAPPED = "_checkpoint_wrapped_module"


def canonical_name(name: str) -> str:
    """Drop wrapper segments anywhere in a dotted name: ``torch.compile``'s (``_orig_mod.model.conv1`` ->
    ``model.conv1``) and the activation-checkpoint wrapper's (``conv1._checkpoint_wrapped_module`` -> ``conv1``)."""
    if "_orig_mod" not in name and _CHECKPOINT_WRAPPED not in name:  # most names: as they are (no split and join)
        return name
    return ".".join(p for p in name.split(".") if p not in ("_orig_mod", _CHECKPOINT_WRAPPED))


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """All submodules by canonical dotted name (the root is ``""``); a layer wrapped for activation checkpointing
    under its own name (the wrapper's), so it keeps its kind (a conv) and its hooks fire inside the checkpoint."""
    model = unwrap_model(model)
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        key = canonical_name(name)
        if key not in out or name.endswith(_CHECKPOINT_WRAPPED):
            out[key] = module
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


@contextmanager
def linear_calls(model: nn.Module) -> Iterator[list[str]]:
    """Names of the ``nn.Linear`` layers called during forwards inside the block, in call order (forward hooks,
    removed on exit). The last one called is the classifier head, whatever order the layers were defined in (a
    discriminator defined before its generator, an auxiliary head defined after the classifier)."""
    calls: list[str] = []
    handles = [
        m.register_forward_hook(lambda _m, _i, _o, name=name: calls.append(name))
        for name, m in named_layers(model).items()
        if isinstance(m, nn.Linear)
    ]
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def last_called_linear(model: nn.Module, x: Optional[Tensor] = None) -> Optional[str]:
    """The last ``nn.Linear`` called in one no-grad forward of ``x`` (``None`` if none is); without ``x`` the last
    one defined (a fallback where no forward is available)."""
    if x is None:
        linears = linear_layer_names(model)
        return linears[-1] if linears else None
    with linear_calls(model) as calls, torch.no_grad():
        model(x)
    return calls[-1] if calls else None


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
    if key.startswith("module.") and key[len("module.") :] in layers:
        return layers[key[len("module.") :]]
    convs = conv_layer_names(model)
    linears = linear_layer_names(model)
    within = [n for n in layers if n.endswith("." + key)]  # 'layer4' of the network held as 'net' of a module
    nearest = min(within, key=lambda n: n.count("."), default=None)
    hint = (
        f" Did you mean {nearest!r}? Names start at the model given (for callbacks the LightningModule)."
        if within
        else ""
    )
    raise LayerNotFoundError(
        f"Unknown layer {name!r} in {type(unwrap_model(model)).__name__}.{hint} "
        f"Valid conv layers: {_format_names(convs)}. Valid linear layers: {_format_names(linears)}. "
        "Any dotted name from model.named_modules() is accepted (e.g. a block such as 'layer4')."
    )


def hookable_layer(model: nn.Module, name: str) -> nn.Module:
    """:func:`get_layer`, for a layer whose output is to be recorded: a TorchScript module (``torch.jit.script`` /
    ``torch.jit.trace``) and each module inside one take no hooks (torch's bare "register_forward_hook is not
    supported on ScriptModules"), so such a layer raises a :class:`LayerNotFoundError` saying what to name instead."""
    module = get_layer(model, name)
    if not isinstance(module, torch.jit.ScriptModule):
        return module
    outer = next(  # the outermost TorchScript module holding it (named_modules: parents first)
        n for n, m in named_layers(model).items() if isinstance(m, torch.jit.ScriptModule) and module in m.modules()
    )
    key = canonical_name(name)
    what = (
        f"is a TorchScript module ({type(module).__name__})"
        if outer == key
        else f"is inside a TorchScript module ({outer!r})"
        if outer
        else "is inside a TorchScript model"
    )
    raise LayerNotFoundError(
        f"layer {name!r} {what}, made by torch.jit.script / torch.jit.trace, which takes no hooks: its output cannot "
        "be recorded. Name an eager layer before or after it, or visualize the eager (unscripted) module. Conv layers: "
        f"{_format_names(conv_layer_names(model))}."
    )


def resolve_layers(model: nn.Module, names: str | Iterable[str] | None, default: str = "last_conv") -> list[str]:
    """Validate layer names (or pick a default) and return canonical names (layers whose output can be recorded:
    :func:`hookable_layer`).

    ``names`` may be one name, a list of names, or ``None`` for ``default``
    (``"last_conv"`` or ``"first_conv"``).
    """
    if names is None:
        names = [last_conv_name(model) if default == "last_conv" else first_conv_name(model)]
    elif isinstance(names, str):
        names = [names]
    out = []
    for n in names:
        hookable_layer(model, n)
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


def has_lazy_parameters(module: nn.Module) -> bool:
    """Whether ``module`` holds parameters or buffers of lazy layers (``nn.LazyConv2d``, ...) that its first forward
    has not created yet (their shape, and values, are not known before it)."""
    return any(is_lazy(t) for t in (*module.parameters(), *module.buffers()))


_ADAPTIVE_POOLS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)


def _spatial(t: Any) -> int:
    """``h * w`` of a ``[B, C, h, w]`` tensor, else 0."""
    return int(t.shape[-1] * t.shape[-2]) if isinstance(t, Tensor) and t.ndim == 4 else 0


@dataclass(frozen=True)
class MapLayout:
    """How a layer output that is no ``[B, C, h, w]`` tensor is read as one (pytorch-grad-cam's
    ``reshape_transform``): ``"channels_last"``, a ``[B, h, w, C]`` map (torchvision's Swin stages), permuted; or
    ``"tokens"``, a transformer's ``[B, skip + h * w, C]`` tokens (a ViT block's), whose ``skip`` leading class /
    register tokens are dropped and whose patch tokens are laid out on the ``h x w`` grid of the patch embedding."""

    kind: str  # "channels_last" or "tokens"
    skip: int = 0
    grid: tuple[int, int] = (0, 0)

    def to_map(self, t: Tensor, name: str = "") -> Tensor:
        """``t`` (the layer's output) as ``[B, C, h, w]``, a view of it (autograd reaches ``t`` through it)."""
        if self.kind == "channels_last":
            if t.ndim != 4:
                raise ValueError(f"layer {name!r}: a channels-last [B, h, w, C] map expected, got {tuple(t.shape)}")
            return t.permute(0, 3, 1, 2)
        h, w = self.grid
        if t.ndim != 3 or t.shape[1] != self.skip + h * w:
            raise ValueError(
                f"layer {name!r}: {self.skip} + {h} x {w} tokens [B, N, C] expected (as at setup), got "
                f"{tuple(t.shape)}: images of another size than the data's?"
            )
        return t[:, self.skip :].unflatten(1, (h, w)).permute(0, 3, 1, 2)

    def from_map(self, m: Tensor, t: Tensor) -> Tensor:
        """The layer output a ``[B, C, h, w]`` map ``m`` stands for (the inverse of :meth:`to_map`; ``t``: the
        output ``m`` was read from, whose class / register tokens are kept)."""
        if self.kind == "channels_last":
            return m.permute(0, 2, 3, 1)
        return torch.cat([t[:, : self.skip], m.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)

    def describe(self, name: str) -> str:
        """One line for captions and messages: what was done to ``name``'s output."""
        if self.kind == "channels_last":
            return f"{name!r}: channels-last [B, h, w, C] output read as [B, C, h, w]"
        h, w = self.grid
        drop = f"{self.skip} class/register token(s) dropped, " if self.skip else ""
        return f"{name!r}: [B, tokens, C] output read as [B, C, {h}, {w}] ({drop}patch tokens on the {h}x{w} grid)"


@dataclass
class _MapTrace:
    """What one forward tells about a model's feature maps (see :func:`_trace_maps`)."""

    layers: dict[str, nn.Module]
    ends: dict[str, tuple[int, Tensor]]  # conv-produced [B, C, h, w] outputs: name -> (clock, output)
    pool_start: list[int]  # clock of each pooling (without convs) that reduces space away
    token_calls: list[tuple[int, str, tuple[int, ...]]]  # weighted modules called on >= 3-D non-maps
    clock: int
    channels_last: dict[str, str]  # 4-D outputs read as [B, h, w, C]: name -> a module reading the last axis
    tokens: dict[str, MapLayout]  # 3-D [B, skip + h * w, C] outputs after an h x w conv-produced map
    ambiguous: dict[str, str]  # 4-D outputs of a shape [B, n, w, n] whose last axis a module reads: NCHW or NHWC?


def _trace_maps(model: nn.Module, x: Tensor) -> _MapTrace:
    """One no-grad forward of ``x`` recording, in call order, every module output that is a conv-produced
    ``[B, C, h, w]`` map: the output of a convolution or of a module containing one, or of a module without one
    (norm, activation, pooling, ``Identity``) that keeps the ``[B, C]`` of such a map."""
    # a TorchScript module (and each module inside it) takes no hooks: its outputs go unseen
    layers = {n: m for n, m in named_layers(model).items() if n and not isinstance(m, torch.jit.ScriptModule)}
    has_conv = {n: any(isinstance(s, CONV_TYPES) for s in m.modules()) for n, m in layers.items()}
    weighted = {n for n, m in layers.items() if next(m.parameters(recurse=False), None) is not None}
    clock = [0]
    starts: dict[str, int] = {}
    ends: dict[str, tuple[int, Tensor]] = {}
    pool_start: list[int] = []
    map_shape: list[Any] = [None]  # shape of the latest conv-produced map
    token_calls: list[tuple[int, str, tuple[int, ...]]] = []  # weighted modules called on >= 3-D non-maps
    last_axis_readers: dict[tuple[int, ...], str] = {}  # 4-D shapes a Linear / LayerNorm read channels-last
    cube_readers: dict[tuple[int, ...], str] = {}  # the same for shapes with h == C: NCHW and NHWC look alike
    shapes: dict[str, tuple[int, ...]] = {}  # every 4-D module output
    tokens: dict[str, MapLayout] = {}

    def pre_hook(name: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            clock[0] += 1
            starts.setdefault(name, clock[0])
            first = inputs[0] if inputs else None
            if isinstance(first, Tensor) and first.ndim == 4 and first.shape[1] != first.shape[-1]:
                width = (
                    module.in_features
                    if isinstance(module, nn.Linear)
                    else module.normalized_shape[0]
                    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1
                    else None
                )
                if width == first.shape[-1]:  # mixes or normalizes the last axis: channels-last [B, h, w, C]
                    last_axis_readers.setdefault(tuple(first.shape), name)
            elif isinstance(first, Tensor) and first.ndim == 4 and _reads_last_axis(module, first):
                cube_readers.setdefault(tuple(first.shape), name)  # [B, n, w, n]: channels-last or not?
            if name in weighted and isinstance(first, Tensor) and first.ndim >= 3 and first.shape != map_shape[0]:
                token_calls.append((clock[0], name, tuple(first.shape)))

        return hook

    def post_hook(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            clock[0] += 1
            if isinstance(output, Tensor) and output.ndim == 4:
                shapes[name] = tuple(output.shape)
            grid = map_shape[0]
            if isinstance(output, Tensor) and output.ndim == 3 and grid is not None and len(grid) == 4:
                skip = output.shape[1] - grid[-2] * grid[-1]  # patch tokens of the latest map, after class tokens
                if 0 <= skip <= MAX_PREFIX_TOKENS and output.shape[0] == grid[0]:
                    tokens[name] = MapLayout("tokens", int(skip), (int(grid[-2]), int(grid[-1])))
            first = inputs[0] if inputs else None
            if (
                not has_conv[name]
                and isinstance(first, Tensor)
                and _spatial(first)
                and isinstance(output, Tensor)
                and (
                    isinstance(module, _ADAPTIVE_POOLS)
                    or (
                        _spatial(first) > 1
                        and (_spatial(output) == 1 or output.ndim == 2)
                        and output.numel() < first.numel()
                    )
                )
            ):
                pool_start.append(starts[name])  # a pooling without convs reducing space away (e.g. in SE blocks too)
            if (
                isinstance(output, Tensor)
                and output.ndim == 4
                and (
                    has_conv[name]  # a conv, or a block containing one (as an explicit name must be)
                    or (  # a norm, activation, spatial pooling ... on that map
                        isinstance(first, Tensor)
                        and first.shape == map_shape[0]
                        and output.shape[:2] == first.shape[:2]
                    )
                )
            ):
                ends[name] = (clock[0], output)
                map_shape[0] = output.shape

        return hook

    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(pre_hook(name)))
            handles.append(module.register_forward_hook(post_hook(name)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    channels_last = {n: last_axis_readers[shape] for n, shape in shapes.items() if shape in last_axis_readers}
    ambiguous = {n: cube_readers[shape] for n, shape in shapes.items() if shape in cube_readers}
    return _MapTrace(layers, ends, pool_start, token_calls, clock[0], channels_last, tokens, ambiguous)


def _reads_last_axis(module: nn.Module, t: Tensor) -> bool:
    """``module`` (an ``nn.Linear`` or a one-axis ``nn.LayerNorm``) mixes or normalizes the last axis of ``t``."""
    if isinstance(module, nn.Linear):
        return module.in_features == t.shape[-1]
    return isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (t.shape[-1],)


#: The most leading tokens (class, distillation, register tokens) a token layout drops before the patch tokens.
MAX_PREFIX_TOKENS = 16


def map_layouts(
    model: nn.Module, x: Tensor, names: Iterable[str], ambiguous: Optional[dict[str, str]] = None
) -> dict[str, MapLayout]:
    """How each of ``names`` whose output in a forward of ``x`` is no ``[B, C, h, w]`` map is read as one
    (:class:`MapLayout`): a channels-last ``[B, h, w, C]`` output (:func:`channels_last_maps`) is permuted, a
    ``[B, N, C]`` token output with ``N = skip + h * w`` for the ``h x w`` grid of the latest conv-produced map
    before it (a ViT's patch embedding) drops its ``skip`` leading tokens (``<= MAX_PREFIX_TOKENS``). Call inside
    :func:`lightning_viz.capture.isolated`. ``ambiguous`` (a dict, if given) receives the names whose output has
    ``h == C`` where a module reads the last axis of a tensor of that shape (Swin-T at 384 px: ``[B, 96, 96, 96]``):
    channels-last or not cannot be told, they are read as they are (each with the module reading such a tensor)."""
    trace = _trace_maps(model, x)
    out: dict[str, MapLayout] = {}
    for n in names:
        module = get_layer(model, n)
        key = next((k for k, m in trace.layers.items() if m is module), None)
        if key in trace.channels_last:
            out[n] = MapLayout("channels_last")
        elif key in trace.tokens:
            out[n] = trace.tokens[key]
        elif key in trace.ambiguous and ambiguous is not None:
            ambiguous[n] = trace.ambiguous[key]
    return out


def conv_produced_maps(model: nn.Module, x: Tensor) -> set[str]:
    """Names of the layers whose output is a conv-produced ``[B, C, h, w]`` map in a forward of ``x`` (call inside
    :func:`lightning_viz.capture.isolated`): what a CAM method can explain (e.g. DenseNet's ``features.norm5``,
    VGG's last ``MaxPool2d``), but not a transformer's token tensors nor a channels-last ``[B, h, w, C]`` map."""
    trace = _trace_maps(model, x)
    return set(trace.ends) - set(trace.channels_last)


def channels_last_maps(model: nn.Module, x: Tensor) -> dict[str, str]:
    """The layers whose 4-D output, in a forward of ``x``, is a channels-last ``[B, h, w, C]`` map (torchvision's
    Swin transformer: a conv, then ``Permute``; its stages' LayerNorms and Linears read the last axis), each with
    the module that reads its last axis as channels."""
    return _trace_maps(model, x).channels_last


def default_cam_layer(model: nn.Module, x: Tensor, owner: str = "") -> str:
    """The layer CAM methods explain by default: the last block feeding global pooling, found by one forward of
    ``x`` (a batch of the data's shape; call inside :func:`lightning_viz.capture.isolated`).

    The *final spatial feature map* is the last conv-produced ``[B, C, h, w]`` module output completed before the
    global pooling starts (the last module without convolutions that turns a spatial map into a vector or a ``1x1``
    map, or the last adaptive pooling; squeeze-excitation pools come before it). Conv-produced, as an explicit
    ``layers=[...]`` name must be: the output of a convolution or of a module containing one, or of a module
    without one (norm, activation, pooling, ``Identity``) that keeps the ``[B, C]`` of such a map. Of the modules
    that return that very tensor (e.g. ``layer4``, ``layer4.1`` and its last ``relu``), the outermost is the stage
    and its child returning it the last block: ``layer4.1`` of a ResNet (``model.layer4[-1]``), ``features.<last>``
    of VGG / DenseNet / MobileNet / EfficientNet / ConvNeXt -- the layer CAM libraries tell users to pick. Not the
    last conv, which sits before the last BatchNorm, residual add and ReLU (Grad-CAM maps of residual nets are
    degenerate there). A channels-last ``[B, h, w, C]`` final map (torchvision's Swin: ``norm``) is one, read as
    ``[B, C, h, w]`` by the callers (:func:`map_layouts`). A map that layers with weights then process as tokens
    before the pooling (a vision transformer's patch embedding) is no final map: error. ``owner`` (e.g.
    ``"CAMCallback"``) starts the errors.
    """
    trace = _trace_maps(model, x)
    layers, ends, token_calls = trace.layers, trace.ends, trace.token_calls
    limit = max(trace.pool_start, default=trace.clock + 1)  # the last one is the global pooling before the head
    before = {n: e for n, e in ends.items() if e[0] < limit and not isinstance(layers[n], _ADAPTIVE_POOLS)}
    who = f"{owner}: " if owner else ""
    kind = type(unwrap_model(model)).__name__
    allowed = "a convolution or a block containing convolutions with a [B, C, h, w] output (e.g. 'layer4' of a ResNet)"
    if not before:
        raise LayerNotFoundError(
            f"{who}found no layer with a [B, C, h, w] output before global pooling in {kind} "
            f"(its layers: {_format_names(layers)}); name the layer to explain with layers=[...]: {allowed}."
        )
    end, final = max(before.values(), key=lambda e: e[0])
    later = [c for c in token_calls if end < c[0] < limit]
    if later:
        last = max(before, key=lambda n: (before[n][0], -n.count(".")))
        raise LayerNotFoundError(
            f"{who}found no final [B, C, h, w] feature map before global pooling in {kind}: the last conv-produced "
            f"map, {last!r}, is processed further as tokens (e.g. {later[0][1]!r} on shape "
            f"{list(later[0][2])}), not as a feature map (a vision transformer?); name the layer to explain with "
            f"layers=[...]: {allowed}; or a layer of tokens, read on the patch grid, before the last block's "
            "attention (after it only the class token reaches the head): 'blocks.11.norm1' of a timm ViT, "
            "'encoder.layers.encoder_layer_11.ln_1' of torchvision's."
        )
    same = {n: e[0] for n, e in before.items() if e[1] is final}  # modules returning the final map itself
    depth = min(n.count(".") for n in same)
    outer = [n for n in same if n.count(".") == depth]
    outer.sort(key=lambda n: (not isinstance(layers[n], nn.Identity), same[n]))  # the last completed, not an Identity
    stage = outer[-1]
    blocks = [n for n in same if n.startswith(stage + ".") and n.count(".") == depth + 1]
    return max(blocks, key=lambda n: same[n]) if blocks else stage
