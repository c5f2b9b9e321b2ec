"""Receptive fields of conv units: which input pixels a unit at ``(i, j)`` of a layer can see.

Two ways, which agree on conv/pool stacks:

* :func:`stack_receptive_field` -- exact layer arithmetic (Araujo et al., "Computing Receptive Fields
  of Convolutional Neural Networks", Distill 2019). Walking the conv/pool layers in
  execution order, with kernel ``k``, stride ``s``, padding ``p``, dilation ``d``:
  ``R_l = R_{l-1} + (d_l (k_l - 1)) J_{l-1}``, ``J_l = J_{l-1} s_l``, ``P_l = P_{l-1} + p_l J_{l-1}``;
  unit ``i`` then covers input pixels ``[i J - P, i J - P + R)``. The walk checks that every layer's
  input has the spatial size the chain predicts and that no tensor feeds two modules, so a model with
  branches (a ResNet's downsample shortcut, an Inception block) is refused rather than answered wrongly.
* :func:`gradient_receptive_field` -- for any model: the non-zero support of ``d unit / d input``,
  united over a few random inputs (seeded generator), one batched backward for all positions.

:func:`graph_receptive_boxes` gives the gradient method's boxes by layer arithmetic followed op by op through
residual sums, concatenations and squeeze-and-excitation gates (one forward, no backward).

The first two return a :class:`ReceptiveField` whose :meth:`ReceptiveField.boxes` give, for every output
position, the input box ``(y0, x0, y1, x1)`` (end exclusive; may extend past the image border, the
crop pads there, see :func:`crop_boxes`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..capture import buffers_kept, capture, eval_mode, forward_until, grad_enabled
from ..layers import get_layer, named_layers
from ..progress import progress
from .batching import images_per_forward
from .checks import check_chunk_size, check_eval

__all__ = [
    "ReceptiveField",
    "NotAConvStackError",
    "layer_geometry",
    "compose",
    "stack_receptive_field",
    "graph_receptive_boxes",
    "gradient_receptive_field",
    "gradient_receptive_boxes",
    "receptive_field",
    "crop_boxes",
]

_GEOMETRIC = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
# Modules that do not move pixels (elementwise or per-channel); anything else in the path is refused.
_NEUTRAL = (
    nn.BatchNorm2d,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.InstanceNorm2d,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.PReLU,
    nn.Softplus,
    nn.Mish,
)


class NotAConvStackError(ValueError):
    """The path to a layer is not a plain chain of conv/pool layers (use the gradient method)."""


@dataclass(frozen=True)
class ReceptiveField:
    """Per axis ``(y, x)``: ``size`` R, ``jump`` J (input pixels between neighbouring units), ``offset`` P.

    Unit ``(i, j)`` covers rows ``[i*J_y - P_y, i*J_y - P_y + R_y)`` and the like for columns.
    ``grid`` is the layer's ``(h, w)`` output size.
    """

    size: tuple[int, int]
    jump: tuple[int, int]
    offset: tuple[int, int]
    grid: tuple[int, int]

    def boxes(self) -> Tensor:
        """``LongTensor[h, w, 4]`` of ``(y0, x0, y1, x1)`` input boxes, one per output position."""
        h, w = self.grid
        iy = torch.arange(h) * self.jump[0] - self.offset[0]
        ix = torch.arange(w) * self.jump[1] - self.offset[1]
        y0 = iy.view(h, 1).expand(h, w)
        x0 = ix.view(1, w).expand(h, w)
        return torch.stack([y0, x0, y0 + self.size[0], x0 + self.size[1]], dim=-1)

    def box(self, i: int, j: int) -> tuple[int, int, int, int]:
        y0, x0 = i * self.jump[0] - self.offset[0], j * self.jump[1] - self.offset[1]
        return y0, x0, y0 + self.size[0], x0 + self.size[1]


def _two(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def layer_geometry(
    module: nn.Module,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], bool]:
    """``(kernel, stride, padding, dilation, ceil_mode)`` of a Conv2d / MaxPool2d / AvgPool2d, per axis."""
    if isinstance(module, nn.Conv2d):
        if isinstance(module.padding, str):
            if module.padding == "valid":
                pad = (0, 0)
            else:  # 'same' (stride 1): total padding d (k - 1), the left part is half of it
                pad = _two([d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation)])
        else:
            pad = _two(module.padding)
        return _two(module.kernel_size), _two(module.stride), pad, _two(module.dilation), False
    if isinstance(module, nn.MaxPool2d):
        return (
            _two(module.kernel_size),
            _two(module.stride or module.kernel_size),
            _two(module.padding),
            _two(module.dilation),
            bool(module.ceil_mode),
        )
    if isinstance(module, nn.AvgPool2d):
        return (
            _two(module.kernel_size),
            _two(module.stride or module.kernel_size),
            _two(module.padding),
            (1, 1),
            bool(module.ceil_mode),
        )
    raise TypeError(f"no receptive-field geometry for {type(module).__name__}; supported: Conv2d, MaxPool2d, AvgPool2d")


def _same_padding(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.padding == "same"


def compose(geometries: Sequence[tuple], input_size: Sequence[int]) -> ReceptiveField:
    """Compose ``(kernel, stride, padding, dilation[, ceil_mode])`` per-layer geometries (first layer first).

    ``padding`` is the left/top padding; the ``grid`` assumes the same on the right/bottom (not so for
    ``padding='same'`` with an even kernel, which :func:`stack_receptive_field` accounts for).
    """
    r, j, p, n = [1, 1], [1, 1], [0, 0], [int(input_size[0]), int(input_size[1])]
    for g in geometries:
        k, s, pad, d = (_two(v) for v in g[:4])
        ceil = bool(g[4]) if len(g) > 4 else False
        for a in range(2):
            r[a] += d[a] * (k[a] - 1) * j[a]
            p[a] += pad[a] * j[a]
            j[a] *= s[a]
            span = n[a] + 2 * pad[a] - d[a] * (k[a] - 1) - 1
            out = (-(-span // s[a]) if ceil else span // s[a]) + 1
            if ceil and (out - 1) * s[a] >= n[a] + pad[a]:  # torch: the last window must start inside input or left pad
                out -= 1
            n[a] = out
    return ReceptiveField(size=(r[0], r[1]), jump=(j[0], j[1]), offset=(p[0], p[1]), grid=(n[0], n[1]))


def stack_receptive_field(model: nn.Module, layer: str, input_shape: Sequence[int]) -> ReceptiveField:
    """Exact receptive field of ``layer``'s units by layer arithmetic over the modules run before it.

    One forward of zeros ``[1, *input_shape]`` (no grad; call inside ``isolated``/eval) records the
    leaf modules in execution order up to the end of ``layer``. Conv/pool layers compose; norms and
    activations are neutral; anything else (adaptive pools, linear, upsampling) or a layer whose
    input size is not the one the chain predicts (a branch) raises :class:`NotAConvStackError`.
    """
    target = get_layer(model, layer)
    names = {id(m): n for n, m in named_layers(model).items()}
    calls: list[tuple[nn.Module, tuple[int, ...]]] = []
    done = [False]
    out_size: list[tuple[int, ...]] = [()]

    def pre(m, inputs):
        if not done[0] and inputs and isinstance(inputs[0], Tensor):
            calls.append((m, tuple(inputs[0].shape[-2:])))

    def post_target(m, inputs, out):
        done[0] = True
        if isinstance(out, Tensor):
            out_size[0] = tuple(out.shape[-2:])

    # Parallel branches of the same size (an Inception block's 1x1 / 3x3 / pool paths, a Fire module's expands)
    # pass the size check; they show as one tensor read by two modules that each make a new tensor (a module
    # that returns its input, e.g. an in-place ReLU, passes it along). A shortcut added with ``+`` is no module
    # read and needs none: an identity path sees less than the conv path it joins.
    readers: dict[int, tuple[Tensor, str]] = {}
    fan_out: list[str] = []

    def post(m, inputs, out):
        if done[0] or not inputs or not isinstance(inputs[0], Tensor) or out is inputs[0]:
            return
        name = names.get(id(m), type(m).__name__)
        seen = readers.get(id(inputs[0]))
        if seen is not None and seen[0] is inputs[0] and not fan_out:
            fan_out.append(f"{seen[1]!r} and {name!r} both read one tensor")
        readers[id(inputs[0])] = (inputs[0], name)  # the tensor kept alive, so its id is not reused

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = []
    try:
        try:
            for m in leaves:
                handles += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
            handles.append(target.register_forward_hook(post_target))
        except RuntimeError as exc:  # a scripted module takes no hooks: not followed here (no hook left behind)
            raise NotAConvStackError(f"a module of the model takes no forward hooks ({exc})") from exc
        p = next(model.parameters(), None)
        x = torch.zeros(
            1,
            *input_shape,
            device=p.device if p is not None else "cpu",
            dtype=p.dtype if p is not None else torch.float32,
        )
        # shapes only: a training-mode model neither updates its BatchNorm statistics nor draws dropout masks
        with torch.no_grad(), eval_mode(model), buffers_kept(model):
            try:
                model(x)
            except Exception as exc:
                raise NotAConvStackError(f"forward of a {tuple(input_shape)} input failed: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    if not done[0]:
        raise NotAConvStackError(f"layer {layer!r} was not called in the forward pass")
    if fan_out:
        raise NotAConvStackError(
            f"the model branches before the end of {layer!r} ({fan_out[0]}: parallel paths, e.g. an Inception "
            "block), so layer arithmetic does not apply; use the gradient method"
        )
    geoms: list[tuple] = []
    size = list(input_shape[-2:])
    for m, in_size in calls:
        name = names.get(id(m), type(m).__name__)
        if list(in_size) != size:
            raise NotAConvStackError(
                f"{name!r} sees a {in_size[0]}x{in_size[1]} input where the chain of conv/pool layers before it "
                f"predicts {size[0]}x{size[1]}: the model branches (e.g. a residual shortcut); use the gradient method"
            )
        if isinstance(m, _GEOMETRIC):
            geoms.append(layer_geometry(m))
            if not _same_padding(m):  # 'same' keeps the size (an even kernel pads one more on the right)
                size = list(compose([geoms[-1]], size).grid)
        elif not isinstance(m, _NEUTRAL):
            raise NotAConvStackError(
                f"{name!r} ({type(m).__name__}) is not a conv/pool/elementwise layer, "
                "so layer arithmetic does not apply; use the gradient method"
            )
    rf = compose(geoms, input_shape[-2:])
    if any(_same_padding(m) for m, _ in calls):
        rf = ReceptiveField(size=rf.size, jump=rf.jump, offset=rf.offset, grid=(size[0], size[1]))
    if list(rf.grid) != list(out_size[0]):
        raise NotAConvStackError(
            f"layer {layer!r} outputs {tuple(out_size[0])} positions where its conv/pool chain predicts {rf.grid} "
            "(functional pooling or a branch); use the gradient method"
        )
    return rf


_GLOBAL_REDUCTIONS = {
    torch.mean,
    Tensor.mean,
    torch.sum,
    Tensor.sum,
    torch.amax,
    Tensor.amax,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
}


class _ConstantGlobalContext(TorchFunctionMode):
    """Global spatial reductions of a feature map (``[B, C, H, W]`` -> ``[B, C]`` or ``[B, C, 1, 1]``: the squeeze of
    a squeeze-and-excitation block, a global-context gate) are detached, so the gates they feed count as constants:
    else every unit after the first SE block (EfficientNet, MobileNetV3, timm's SE-ResNets) depends on every pixel
    and its receptive field is the whole image."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if _global_reduction(func, args, out):
            return tuple(o.detach() for o in out) if isinstance(out, tuple) else out.detach()
        return out


def _support_boxes(support: Tensor) -> Tensor:
    """``[P, H, W]`` boolean support -> ``[P, 4]`` bounding boxes (empty support -> zero-size box at 0)."""
    rows, cols = support.any(2), support.any(1)
    h, w = support.shape[1:]
    ar_h, ar_w = torch.arange(h, device=support.device), torch.arange(w, device=support.device)
    y0 = torch.where(rows, ar_h, h).amin(1)
    y1 = torch.where(rows, ar_h + 1, 0).amax(1)
    x0 = torch.where(cols, ar_w, w).amin(1)
    x1 = torch.where(cols, ar_w + 1, 0).amax(1)
    return torch.stack([y0.clamp(max=y1), x0.clamp(max=x1), y1, x1], 1)


def _position_supports(
    model: nn.Module,
    layer: str,
    input_shape: Sequence[int],
    trials: int,
    seed: int,
    chunk_size: Optional[int],
    memory_mb: Optional[float],
    positions: Callable[[int, int], Tensor],
) -> tuple[int, int, Tensor, Tensor]:
    """``(h, w, pos, support[P, H, W])``: the gradient support of the flat positions ``pos = positions(h, w)`` of
    ``layer``'s ``h x w`` grid, united over ``trials`` seeded inputs (the same inputs for every ``pos``)."""
    chunk_size = check_chunk_size(chunk_size)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(seed)
    H, W = int(input_shape[-2]), int(input_shape[-1])
    support, chosen, h, w = None, torch.zeros(0, dtype=torch.long), 0, 0
    # The batched passes stop right after ``layer`` (forward_until): what follows it adds nothing to d unit / d input
    # (resnet18's layer2 at 224 px: ~55% of the forward's FLOPs); the first, one-image pass runs whole.
    with capture(model, [layer], grad=True) as cap, forward_until(model, [layer]) as run:
        for t in range(trials):
            x0 = torch.randn(1, *input_shape, generator=gen).to(device=device, dtype=dtype)
            with torch.no_grad():
                run(partial(model, x0))
            h, w = cap[layer].shape[-2:]
            if support is None:
                chosen = positions(h, w)
                support = torch.zeros(len(chosen), H, W, dtype=torch.bool)
            if chunk_size is None:
                chunk_size = images_per_forward(model, x0, memory_mb, grad=True)
            n = len(chosen)
            for s in range(0, n, chunk_size):
                progress(t * n + s, trials * n, "receptive-field positions")  # inside a callback run (rank 0)
                rows = torch.arange(s, min(s + chunk_size, n))
                pos = chosen[rows]
                x = x0.expand(len(pos), *x0.shape[1:]).clone().requires_grad_(True)
                cap.clear()
                with _ConstantGlobalContext():
                    run(partial(model, x))
                act = cap[layer]
                sel = act.sum(1).flatten(1)[torch.arange(len(pos)), pos.to(device)]
                (g,) = torch.autograd.grad(sel.sum(), x)
                support[rows] |= (g.detach().abs().sum(1) > 0).cpu()
    assert support is not None
    return h, w, chosen, support


@grad_enabled()  # also under a caller's torch.no_grad() / inference_mode()
def gradient_receptive_field(
    model: nn.Module,
    layer: str,
    input_shape: Sequence[int],
    trials: int = 2,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    memory_mb: Optional[float] = None,
) -> tuple[Tensor, Tensor]:
    """Receptive field of every output position of ``layer`` as the support of ``d unit / d input``.

    For position ``(i, j)`` the unit is the sum over channels of the layer output at ``(i, j)``; the
    support (pixels with a non-zero gradient in any channel) is united over ``trials`` random normal
    inputs drawn from a seeded generator (a ReLU that happens to be off hides a path for one input
    only); global spatial reductions (the squeeze of a squeeze-and-excitation block) count as constants, else
    every unit after one would see the whole image. Positions are batched: ``chunk_size`` copies of the input, one
    position each, one backward (``None``: as many as ``memory_mb`` of activations hold with their gradients, by
    default the budget of :mod:`lightning_viz.methods.batching`; a ResNet-50's ``layer4`` at 224 px has 49
    positions, 4.4 GB in one batch). Needs autograd w.r.t. the input only (parameters may be frozen). For the
    boxes alone, :func:`gradient_receptive_boxes` gets the same from far fewer positions.

    Returns ``(support[h, w, H, W] bool, boxes[h, w, 4])``, boxes clipped to the image.
    """
    H, W = int(input_shape[-2]), int(input_shape[-1])
    h, w, _, support = _position_supports(
        model, layer, input_shape, trials, seed, chunk_size, memory_mb, lambda h, w: torch.arange(h * w)
    )
    return support.view(h, w, H, W), _support_boxes(support).view(h, w, 4)


def _probe_positions(h: int, w: int) -> Tensor:
    """Flat positions whose boxes give every other one on a translation-equivariant grid: the middle column (each
    row's vertical extent) and the middle row (each column's horizontal extent), plus the corners and the quarter
    points as checks."""
    ci, cj = h // 2, w // 2
    cells = {(i, cj) for i in range(h)} | {(ci, j) for j in range(w)}
    cells |= {(i, j) for i in (0, h // 4, (3 * h) // 4, h - 1) for j in (0, w // 4, (3 * w) // 4, w - 1)}
    return torch.tensor(sorted(i * w + j for i, j in cells), dtype=torch.long)


def _separable_boxes(boxes: Tensor) -> Tensor:
    """``[h, w, 4]`` boxes whose rows ``(y0, y1)`` are those of the middle column and columns ``(x0, x1)`` those of
    the middle row (an empty box there: empty, ``(0, 0, 0, 0)`` as :func:`_support_boxes` gives)."""
    h, w = boxes.shape[:2]
    col, row = boxes[:, w // 2], boxes[h // 2]  # [h, 4], [w, 4]
    out = torch.stack(
        [
            col[:, 0].view(h, 1).expand(h, w),
            row[:, 1].view(1, w).expand(h, w),
            col[:, 2].view(h, 1).expand(h, w),
            row[:, 3].view(1, w).expand(h, w),
        ],
        -1,
    )
    empty = (col[:, 2] == col[:, 0]).view(h, 1) | (row[:, 3] == row[:, 1]).view(1, w)
    return torch.where(empty.unsqueeze(-1), torch.zeros_like(out), out)


@grad_enabled()
def gradient_receptive_boxes(
    model: nn.Module,
    layer: str,
    input_shape: Sequence[int],
    trials: int = 2,
    seed: int = 0,
    chunk_size: Optional[int] = None,
    memory_mb: Optional[float] = None,
) -> Tensor:
    """The boxes ``[h, w, 4]`` of :func:`gradient_receptive_field` (same arguments, same result), from ``h + w + 15``
    positions at most instead of ``h * w`` where the model is translation equivariant.

    A conv net's unit ``(i, j)`` sees the rows of unit ``(i, j')`` and the columns of ``(i', j)`` (shifted by the
    stride, cut at the image border the same way), so the supports of the middle column and the middle row give
    every box. They also check it: each position computed (those two lines, the corners, the quarter points) must
    have the box so derived; where one does not (a positional mask, a coordinate-dependent op), the remaining
    positions are computed too. A model that treats only positions off those lines differently goes unseen: there,
    :func:`gradient_receptive_field` computes every position.
    """
    h, w, pos, support = _position_supports(
        model, layer, input_shape, trials, seed, chunk_size, memory_mb, _probe_positions
    )
    boxes = torch.zeros(h * w, 4, dtype=torch.long)
    boxes[pos] = _support_boxes(support)
    if len(pos) < h * w:
        derived = _separable_boxes(boxes.view(h, w, 4)).view(h * w, 4)
        if torch.equal(derived[pos], boxes[pos]):
            return derived.view(h, w, 4)
        rest = torch.ones(h * w, dtype=torch.bool)
        rest[pos] = False
        _, _, more, support = _position_supports(
            model, layer, input_shape, trials, seed, chunk_size, memory_mb, lambda h, w: rest.nonzero()[:, 0]
        )
        boxes[more] = _support_boxes(support)
    return boxes.view(h, w, 4)


# ---- layer arithmetic over a graph (residual sums, concatenations, gates) ----------------------------------------

# Per axis, the input pixels ``[lo[i], hi[i])`` that unit ``i`` sees inside the image (empty: ``lo > hi``).
_Axis = tuple[Tensor, Tensor]
_Field = tuple[_Axis, _Axis]  # (rows, columns)
_POISON = None  # the field of a tensor that an op the walk does not know has touched
_FAR = 1 << 40  # the edges of an empty field
# Ops that keep every position where it is and mix nothing across positions (one tracked input, the same grid out).
_POINTWISE = frozenset(
    [
        "relu",
        "relu_",
        "relu6",
        "hardtanh",
        "hardtanh_",
        "leaky_relu",
        "leaky_relu_",
        "elu",
        "elu_",
        "selu",
        "selu_",
        "celu",
        "gelu",
        "silu",
        "silu_",
        "mish",
        "sigmoid",
        "sigmoid_",
        "tanh",
        "tanh_",
        "hardswish",
        "hardswish_",
        "hardsigmoid",
        "hardsigmoid_",
        "softplus",
        "prelu",
        "rrelu",
        "threshold",
        "dropout",
        "dropout2d",
        "feature_dropout",
        "alpha_dropout",
        "clone",
        "contiguous",
        "to",
        "float",
        "half",
        "double",
        "bfloat16",
        "type",
        "abs",
        "neg",
        "exp",
        "clamp",
        "clamp_",
        "clip",
        "clip_",
        "square",
        "sqrt",
        "rsqrt",
        "pow",
    ]
)
# Reshapes that keep the last two dims: a row-major view or reshape then keeps every element's (row, column).
_RESHAPE = frozenset(["view", "reshape", "flatten", "unsqueeze", "squeeze", "contiguous"])
_SUM = frozenset(["add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__"])
_PRODUCT = frozenset(
    [
        "mul",
        "mul_",
        "__mul__",
        "__rmul__",
        "__imul__",
        "div",
        "div_",
        "__truediv__",
        "__rtruediv__",
        "__itruediv__",
        "true_divide",
    ]
)
_IN_PLACE = frozenset(
    ["__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__"]
)
_POOLS = frozenset(["max_pool2d", "max_pool2d_with_indices", "_max_pool2d", "avg_pool2d"])


def _arg(args: tuple, kwargs: dict, i: int, name: str, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _global_reduction(func, args: tuple, out) -> bool:
    """A global spatial reduction of a feature map, ``[B, C, H, W]`` -> ``[B, C]`` or ``[B, C, 1, 1]`` (the squeeze of a
    squeeze-and-excitation block): what :class:`_ConstantGlobalContext` detaches and the arithmetic walk counts as
    a constant."""
    if func not in _GLOBAL_REDUCTIONS or not args or not isinstance(args[0], Tensor):
        return False
    x, y = args[0], out[0] if isinstance(out, tuple) else out
    return (
        x.ndim == 4
        and x.shape[-2] * x.shape[-1] > 1
        and isinstance(y, Tensor)
        and tuple(y.shape[:2]) == tuple(x.shape[:2])
        and (y.ndim == 2 or (y.ndim == 4 and tuple(y.shape[-2:]) == (1, 1)))
    )


def _window(field: _Field, kernel, stride, padding, dilation, grid: Sequence[int]) -> _Field:
    """The field of a conv/pool window's ``grid`` of outputs: output ``i`` reads inputs ``i s - p + t d``
    (``t < k``) that lie inside the input, and sees what they see (Araujo et al. Eq. 1-2, cut at the border)."""
    k, d = _two(kernel), _two(dilation)
    s = _two(stride) if stride is not None and stride != [] and stride != () else k
    if isinstance(padding, str):  # 'valid', or 'same' (stride 1; the left part of d (k - 1))
        p = (0, 0) if padding == "valid" else (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    else:
        p = _two(padding)
    out = []
    for a, (lo, hi) in enumerate(field):
        taps = torch.arange(int(grid[a])).view(-1, 1) * s[a] - p[a] + torch.arange(k[a]).view(1, -1) * d[a]
        inside = (taps >= 0) & (taps < len(lo))
        at = taps.clamp(0, len(lo) - 1)
        out.append((torch.where(inside, lo[at], _FAR).amin(1), torch.where(inside, hi[at], -_FAR).amax(1)))
    return (out[0], out[1])


def _union(fields: list[_Field]) -> _Field:
    """The field of a sum or concatenation: per unit and axis, the outermost edges of its inputs' fields."""
    return (
        (torch.stack([f[0][0] for f in fields]).amin(0), torch.stack([f[0][1] for f in fields]).amax(0)),
        (torch.stack([f[1][0] for f in fields]).amin(0), torch.stack([f[1][1] for f in fields]).amax(0)),
    )


class _FieldWalk(TorchFunctionMode):
    """Follows one forward op by op: each tensor that depends on the input gets its field per position (conv/pool
    windows compose, sums and concatenations unite, pointwise ops pass it on, global reductions are constants as
    in :class:`_ConstantGlobalContext`); any other op that reads a tracked tensor makes its outputs unknown."""

    def __init__(self, x: Tensor, model: nn.Module):
        super().__init__()
        rows, cols = torch.arange(x.shape[-2]), torch.arange(x.shape[-1])
        # weak references: the activations are freed as the forward goes (an id reused later is a new tensor,
        # which the walk marks when an op makes it)
        self.fields: dict[int, tuple[weakref.ref, Optional[_Field]]] = {}
        self.mark(x, ((rows, rows + 1), (cols, cols + 1)))
        # constants: the model's parameters and buffers, and what ops on constants make; a tensor that is none of
        # these nor tracked was made where the walk cannot see (a scripted module): unknown
        self.state = {id(t) for t in (*model.parameters(), *model.buffers())}
        self.consts: dict[int, weakref.ref] = {}

    def const(self, t: Tensor) -> bool:
        seen = self.consts.get(id(t))
        return id(t) in self.state or (seen is not None and seen() is t)

    def mark(self, t: Tensor, field: Optional[_Field]) -> None:
        self.fields[id(t)] = (weakref.ref(t), field)

    def field(self, t: Tensor) -> tuple[bool, Optional[_Field]]:
        """``(tracked, field)``: not tracked = a constant; a tracked field of ``None`` = unknown."""
        seen = self.fields.get(id(t))
        return (False, None) if seen is None or seen[0]() is not t else (True, seen[1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = [v for a in (*args, *kwargs.values()) for v in (a if isinstance(a, (list, tuple)) else (a,))]
        tracked = [(t, f) for t in flat if isinstance(t, Tensor) for ok, f in [self.field(t)] if ok]
        unseen = [t for t in flat if isinstance(t, Tensor) and not self.field(t)[0] and not self.const(t)]
        tracked += [(t, _POISON) for t in unseen[:1]]
        name = getattr(func, "__name__", "")
        # no gradient flows back through a detach or a global reduction: a constant, as for the gradient method
        if not tracked or _global_reduction(func, args, out) or name == "detach":
            for o in out if isinstance(out, (list, tuple)) else (out,):
                if isinstance(o, Tensor) and not self.field(o)[0]:
                    self.consts[id(o)] = weakref.ref(o)
            return out
        field = self._rule(name, args, kwargs, tracked, out)
        outs = out if isinstance(out, (list, tuple)) else (out,)
        in_place = (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE
        if in_place and args and isinstance(args[0], Tensor):
            outs = (*outs, args[0])
            if args[0]._base is not None:  # a view: the tensor it shows changed too, in a part only
                self.mark(args[0]._base, _POISON)
        for i, o in enumerate(outs):
            if isinstance(o, Tensor):
                self.mark(o, field if i == 0 or name in ("chunk", "split") or o is args[0] else _POISON)
        return out

    def _rule(self, name: str, args: tuple, kwargs: dict, tracked: list, out) -> Optional[_Field]:
        lead = out[0] if isinstance(out, (list, tuple)) and out else out
        if not isinstance(lead, Tensor) or lead.ndim < 2 or any(f is _POISON for _, f in tracked):
            return _POISON
        src, field = tracked[0]
        same_grid = all(t.ndim >= 2 and t.shape[-2:] == lead.shape[-2:] for t, _ in tracked)
        if name == "conv2d" or name in _POOLS:
            if len(tracked) != 1 or src is not args[0] or src.ndim != 4:
                return _POISON
            if name == "conv2d":
                stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
                dilation = _arg(args, kwargs, 5, "dilation", 1)
                return _window(field, args[1].shape[-2:], stride, padding, dilation, lead.shape[-2:])
            kernel = _arg(args, kwargs, 1, "kernel_size", None)
            stride = _arg(args, kwargs, 2, "stride", None)
            padding = _arg(args, kwargs, 3, "padding", 0)
            dilation = 1 if name == "avg_pool2d" else _arg(args, kwargs, 4, "dilation", 1)
            return _window(field, kernel, stride, padding, dilation, lead.shape[-2:])
        if not same_grid:
            return _POISON
        if name in _POINTWISE or name == "batch_norm":
            if len(tracked) != 1 or (name == "batch_norm" and _arg(args, kwargs, 5, "training", False)):
                return _POISON  # batch statistics of the positions mix them all
            return field
        if name in _SUM or name in _PRODUCT or name in ("cat", "concat", "concatenate"):
            if name in _PRODUCT:  # a constant factor that varies over positions (a mask) cuts paths: unknown
                consts = [a for a in args if isinstance(a, Tensor) and not self.field(a)[0]]
                if any(c.ndim >= 2 and c.shape[-2] * c.shape[-1] > 1 for c in consts):
                    return _POISON
            if name.startswith("cat") or name == "concat":
                dim = _arg(args, kwargs, 1, "dim", 0)
                if dim % lead.ndim >= lead.ndim - 2:
                    return _POISON
            return _union([f for _, f in tracked])
        if len(tracked) != 1:
            return _POISON
        if name in _RESHAPE:
            return field
        if name in ("chunk", "split"):
            dim = _arg(args, kwargs, 2, "dim", 0)
            return field if dim % src.ndim < src.ndim - 2 else _POISON
        if name in ("transpose", "swapaxes"):
            dims = [_arg(args, kwargs, 1, "dim0", 0), _arg(args, kwargs, 2, "dim1", 0)]
            return field if all(d % src.ndim < src.ndim - 2 for d in dims) else _POISON
        if name == "__getitem__":
            idx = args[1]
            items = idx if isinstance(idx, tuple) else (idx,)
            if len(items) <= src.ndim - 2 and all(isinstance(i, (int, slice)) for i in items):
                return field
        return _POISON


def graph_receptive_boxes(model: nn.Module, layer: str, input_shape: Sequence[int]) -> Tensor:
    """The boxes ``[h, w, 4]`` of :func:`gradient_receptive_boxes` (cut at the image border as those are) by layer
    arithmetic, for models with residual sums, parallel branches joined by concatenation and squeeze-and-excitation
    gates: one forward of zeros ``[1, *input_shape]`` followed op by op (:class:`_FieldWalk`), no backward. Unit
    ``i`` of a conv/pool sees what its inputs inside the map see; a sum or concatenation what any of its inputs
    sees. The gradient support is that wherever no weight on a path is zero (and a max-pool's argmax reaches each
    window's edge for some channel and trial). Raises :class:`NotAConvStackError` where an op on the path is not
    known (a positional mask, a resize, a permute, a normalization over positions)."""
    target = get_layer(model, layer)
    found: list[Optional[_Field]] = []
    p = next(model.parameters(), None)
    x = torch.zeros(
        1, *input_shape, device=p.device if p is not None else "cpu", dtype=p.dtype if p is not None else torch.float32
    )
    walk = _FieldWalk(x, model)

    def hook(m, inputs, out):
        tracked, field = walk.field(out) if isinstance(out, Tensor) else (False, None)
        found.append(field if tracked and out.ndim >= 3 else _POISON)

    handle = target.register_forward_hook(hook)
    try:
        with torch.no_grad(), eval_mode(model), buffers_kept(model), walk:
            try:
                model(x)
            except Exception as exc:
                raise NotAConvStackError(f"forward of a {tuple(input_shape)} input failed: {exc}") from exc
    finally:
        handle.remove()
        walk.fields.clear()
    field = found[0] if len(found) == 1 else _POISON
    if field is _POISON:
        raise NotAConvStackError(f"no layer arithmetic for {layer!r}: an op on its path is not conv/pool/pointwise")
    (y0, y1), (x0, x1) = field
    h, w = len(y0), len(x0)
    empty = ((y0 >= y1).view(h, 1) | (x0 >= x1).view(1, w)).unsqueeze(-1)  # as _support_boxes: (0, 0, 0, 0)
    boxes = torch.stack(
        [
            y0.view(h, 1).expand(h, w),
            x0.view(1, w).expand(h, w),
            y1.view(h, 1).expand(h, w),
            x1.view(1, w).expand(h, w),
        ],
        -1,
    )
    return torch.where(empty, torch.zeros_like(boxes), boxes)


def receptive_field(
    model: nn.Module, layer: str, input_shape: Sequence[int], method: str = "auto", memory_mb: Optional[float] = None
) -> Tensor:
    """Input boxes ``[h, w, 4]`` (``y0, x0, y1, x1``, end exclusive) of every output position of ``layer``
    (receptive fields, Araujo et al. 2019).

    ``method``: ``"arithmetic"`` (:func:`stack_receptive_field`, boxes may extend past the border),
    ``"gradient"`` (:func:`gradient_receptive_field`; boxes clipped by the border are extended back to
    the full receptive-field size seen at interior positions), or ``"auto"`` (arithmetic when the path
    is a plain conv/pool chain; else, for residual sums, concatenations and gates, the gradient method's
    boxes by arithmetic op by op, :func:`graph_receptive_boxes`; else gradient, ``memory_mb``: its activation
    budget per batch).
    """
    if method not in ("auto", "arithmetic", "gradient"):
        raise ValueError(f"receptive field method must be 'auto', 'arithmetic' or 'gradient'; got {method!r}")
    if method in ("auto", "arithmetic"):
        try:
            return stack_receptive_field(model, layer, input_shape).boxes()
        except NotAConvStackError:
            if method == "arithmetic":
                raise
        try:  # residual sums, concatenations, gates: the gradient method's boxes without a backward
            return _unclip(graph_receptive_boxes(model, layer, input_shape), int(input_shape[-2]), int(input_shape[-1]))
        except NotAConvStackError:
            pass
    check_eval("receptive_field (gradient)", model)  # batch statistics would spread every input over every output
    boxes = gradient_receptive_boxes(model, layer, input_shape, memory_mb=memory_mb)
    return _unclip(boxes, int(input_shape[-2]), int(input_shape[-1]))


def _unclip(boxes: Tensor, H: int, W: int) -> Tensor:
    """Extend boxes cut by the image border back to the full receptive field, per axis.

    With a position whose box lies inside the image on that axis, its size is the field's; else (a field at least
    as large as the image's side, e.g. on the short side of a non-square image) the field follows from the edges
    that are inside: ``y0 = i J - P`` of some positions and ``y1 = i J - P + R`` of others, ``J`` from neighbours."""
    b = boxes.clone()
    for axis, (lo, hi, n) in enumerate(((0, 2, H), (1, 3, W))):
        size = b[..., hi] - b[..., lo]
        inside = (b[..., lo] > 0) & (b[..., hi] < n)
        exact = _field_from_edges(b, axis, lo, hi, n) if not bool(inside.any()) else None
        if exact is not None:
            b[..., lo], b[..., hi] = exact
            continue
        full = int(size.max())
        short = size < full
        at_lo = short & (b[..., lo] == 0) & (b[..., hi] < n)
        at_hi = short & (b[..., hi] == n) & (b[..., lo] > 0)
        b[..., lo] = torch.where(at_lo, b[..., hi] - full, b[..., lo])
        b[..., hi] = torch.where(at_hi, b[..., lo] + full, b[..., hi])
    return b


def _field_from_edges(b: Tensor, axis: int, lo: int, hi: int, n: int) -> tuple[Tensor, Tensor] | None:
    """``(starts, ends)`` of every position's field on ``axis`` from the edges inside the image, or ``None`` when
    they do not tell the jump, offset and size (every box spans the whole side)."""
    line = b[:, b.shape[1] // 2] if axis == 0 else b[b.shape[0] // 2]  # [positions, 4]: the boxes along the axis
    i = torch.arange(line.shape[0])
    starts, ends = line[:, lo], line[:, hi]
    free_lo, free_hi = starts > 0, ends < n
    steps = [int(d) for e, f in ((starts, free_lo), (ends, free_hi)) for d in (e[1:] - e[:-1])[f[1:] & f[:-1]]]
    if not steps or not bool(free_lo.any()) or not bool(free_hi.any()) or len(set(steps)) != 1 or steps[0] < 1:
        return None
    jump = steps[0]
    offsets = {int(v) for v in (i * jump - starts)[free_lo]}
    sizes = {int(v) for v in (ends - i * jump)[free_hi]}
    if len(offsets) != 1 or len(sizes) != 1:  # not a regular grid of fields: keep what was measured
        return None
    offset = offsets.pop()
    size = sizes.pop() + offset
    start = (torch.arange(b.shape[axis]) * jump - offset).view(*((-1, 1) if axis == 0 else (1, -1)))
    return start.expand(b.shape[:2]).clone(), (start + size).expand(b.shape[:2]).clone()


def crop_boxes(images: Tensor, boxes: Tensor, pad_value: float = 0.5, max_size: Sequence[int] | None = None) -> Tensor:
    """Crop ``boxes[M, 4]`` from ``images[M, C, H, W]`` (one box per image), padding where a box leaves the image.

    All boxes must have the same size, which is also the output size; ``max_size=(h, w)`` caps it
    (keeping each box's center), so a receptive field much larger than the image stays viewable.
    """
    if boxes.shape[0] == 0:
        return images.new_zeros(0, images.shape[1], 1, 1)
    hs, ws = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    bh, bw = int(hs.max()), int(ws.max())
    y0, x0 = boxes[:, 0].clone(), boxes[:, 1].clone()
    if max_size is not None:
        ch, cw = min(bh, int(max_size[0])), min(bw, int(max_size[1]))
        y0, x0 = y0 + (hs - ch) // 2, x0 + (ws - cw) // 2
        bh, bw = ch, cw
    _, _, H, W = images.shape
    pad_t, pad_l = max(0, -int(y0.min())), max(0, -int(x0.min()))
    pad_b = max(0, int((y0 + bh).max()) - H)
    pad_r = max(0, int((x0 + bw).max()) - W)
    padded = F.pad(images, (pad_l, pad_r, pad_t, pad_b), value=pad_value)
    out = [
        padded[m, :, y + pad_t : y + pad_t + bh, x + pad_l : x + pad_l + bw]
        for m, (y, x) in enumerate(zip(y0.tolist(), x0.tolist()))
    ]
    return torch.stack(out)
