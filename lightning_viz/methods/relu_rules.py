"""Modified ReLU backward rules for guided backpropagation and the deconvnet, as a context manager.

Forward passes are unchanged; only the gradient that flows back through every ReLU is replaced:

* ``"guided"`` -- guided backpropagation (Springenberg et al., "Striving for Simplicity: The All
  Convolutional Net", ICLR-W 2015, Eq. in Fig. 1): ``R_in = 1[x > 0] * relu(R_out)``.
* ``"deconv"`` -- deconvnet (Zeiler & Fergus, "Visualizing and Understanding Convolutional Networks",
  ECCV 2014, Sec. 2.1): ``R_in = relu(R_out)`` (the forward mask is ignored).

How every ReLU is covered: :func:`relu_rule` installs a :class:`torch.overrides.TorchFunctionMode`
that intercepts the *functions* ``F.relu`` / ``F.relu_``, ``torch.relu`` / ``torch.relu_`` and the
methods ``Tensor.relu`` / ``Tensor.relu_``. ``nn.ReLU`` modules call ``F.relu``, so modules, functional
calls and a ReLU module reused several times in one forward (torchvision ResNet) are all caught.
In-place calls keep in-place semantics.

Cost: the guided rule keeps the ReLU itself (its C++ forward and its backward mask ``1[x > 0]``, in
place where it was in place) and only adds a tensor hook on its output that takes ``relu`` of the
incoming gradient -- one elementwise kernel per ReLU in the backward, as Captum's module hooks cost,
but also for functional ReLUs. The deconv rule replaces the ReLU by :class:`DeconvReLU` (the mask
must go), in place for in-place calls (``ctx.mark_dirty``).
Other activations (``hardswish``, ``relu6``, ``gelu``) keep their ordinary gradient.

A TorchScript module (scripted or traced) runs its ReLUs in the TorchScript interpreter, which no
``TorchFunctionMode`` sees: there the rule cannot apply, and the map would silently be the plain gradient's.
:func:`check_scripted_relus` refuses such a model (every pass with a rule, and the callbacks at setup).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Literal, Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["RULES", "ReLURule", "relu_rule", "GuidedReLU", "DeconvReLU", "scripted_relus", "check_scripted_relus"]

ReLURule = Literal["guided", "deconv"]
RULES = ("guided", "deconv")


class GuidedReLU(torch.autograd.Function):
    """ReLU forward; backward ``1[out > 0] * relu(grad)`` (guided backprop)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        out = x.clamp_min(0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp_min(0) * (out > 0).to(grad.dtype)


def _positive(grad: Tensor) -> Tensor:
    return grad.clamp_min(0)


class DeconvReLU(torch.autograd.Function):
    """ReLU forward; backward ``relu(grad)`` (deconvnet, Zeiler-Fergus rule)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


class _DeconvReLUInplace(torch.autograd.Function):
    """:class:`DeconvReLU` for in-place calls: the input is clamped in place and marked dirty."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.mark_dirty(x)
        return x.clamp_min_(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.clamp_min(0)


_FUNCTIONS = {"guided": GuidedReLU, "deconv": DeconvReLU}
_OUT_OF_PLACE = {F.relu, torch.relu, Tensor.relu}
_IN_PLACE = {F.relu_, torch.relu_, Tensor.relu_}


class _ReLURuleMode(TorchFunctionMode):
    def __init__(self, rule: str):
        super().__init__()
        self.rule = rule
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _OUT_OF_PLACE or func in _IN_PLACE:
            x = args[0]
            inplace = func in _IN_PLACE or (
                func is F.relu and bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            )
            if isinstance(x, Tensor) and torch.is_grad_enabled() and x.requires_grad:
                self.calls += 1
                if self.rule == "guided":  # relu's own backward applies 1[x > 0] after the hook's relu(grad)
                    out = func(*args, **kwargs)
                    out.register_hook(_positive)
                    return out
                return _DeconvReLUInplace.apply(x) if inplace else DeconvReLU.apply(x)
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_rule(rule: Optional[str]) -> Iterator[Optional[_ReLURuleMode]]:
    """Replace the backward rule of every ReLU called inside the block (``None``: plain gradients).

    Yields the active mode (``mode.calls`` counts the ReLU calls it rewrote) or ``None``.
    """
    if rule is None:
        yield None
        return
    if rule not in _FUNCTIONS:
        raise ValueError(f"unknown ReLU rule {rule!r}; allowed: {', '.join(map(repr, RULES))} or None (plain gradient)")
    with _ReLURuleMode(rule) as mode:
        yield mode


#: TorchScript graph nodes of a ReLU (``nn.ReLU``, ``F.relu`` and their in-place spellings compile to these)
_SCRIPT_RELUS = ("aten::relu", "aten::relu_")
_CALLS_RELU: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _block_calls_relu(block: torch._C.Block | torch._C.Graph) -> bool:
    return any(
        node.kind() in _SCRIPT_RELUS or any(_block_calls_relu(b) for b in node.blocks()) for node in block.nodes()
    )


def _script_calls_relu(module: nn.Module) -> bool:
    if module not in _CALLS_RELU:
        try:
            _CALLS_RELU[module] = _block_calls_relu(cast(torch._C.Graph, module.inlined_graph))
        except (AttributeError, RuntimeError):  # no forward compiled (an attribute container): nothing it runs
            _CALLS_RELU[module] = False
    return _CALLS_RELU[module]


def scripted_relus(model: nn.Module) -> list[str]:
    """Names of the outermost TorchScript modules of ``model`` (``torch.jit.script`` / ``torch.jit.trace``; ``""``:
    the model itself) whose compiled forward calls a ReLU, which :func:`relu_rule` cannot reach."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(f == "" or name.startswith(f + ".") for f in found):
            continue
        if isinstance(module, torch.jit.ScriptModule) and _script_calls_relu(module):
            found.append(name)
    return found


def check_scripted_relus(who: str, model: nn.Module, what: str, plural: bool = True) -> None:
    """Refuse ``model`` when a TorchScript module of it calls ReLUs (:func:`scripted_relus`): ``what`` (the rule, or
    the methods using one: ``plural``) would give the plain gradient there. ``who`` starts the message."""
    names = scripted_relus(model)
    if not names:
        return
    one = len(names) == 1
    shown = ", ".join(map(repr, names))
    where = (
        "the model, a TorchScript module," if names == [""] else f"the TorchScript module{'' if one else 's'} {shown}"
    )
    raise ValueError(
        f"{who}: {what} change{'' if plural else 's'} the backward of every ReLU, but {where} "
        f"{'runs its' if one else 'run their'} ReLUs in the TorchScript interpreter, where no rule can reach them (the "
        "map there would be the plain gradient's). Visualize the eager (unscripted) module, or use methods without a "
        "ReLU rule ('saliency', 'gradient'; CAMs: 'gradcam')."
    )
