"""Context managers that let a visualization touch a live, training model without changing it.

* :func:`eval_mode` puts every submodule in eval mode and restores each one's own flag afterwards
  (a model may deliberately keep some submodules in eval mode while training).
* :func:`frozen_params` turns ``requires_grad`` off on every parameter and restores it, so no
  visualization can ever write a parameter's ``.grad`` (and autograd builds no parameter graph).
* :func:`isolated` combines both, forks the global RNG (restored on exit), and enables autograd even
  when the trainer runs under ``torch.inference_mode`` (``trainer.validate``).
* :func:`capture` records the outputs of named layers with forward hooks; the hooks are removed in
  ``finally`` even when the forward pass raises.
* :func:`forward_until` cuts forward passes short once the named layers have run (nothing after them is
  computed), for methods that only read those layers' outputs.

BatchNorm running statistics are only updated in train mode, so :func:`eval_mode` also guarantees
they are untouched.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import random
import re
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._warnings import LightningVizWarning
from .layers import (
    CONV_TYPES,
    LayerNotFoundError,
    MapLayout,
    get_layer,
    hookable_layer,
    map_layouts,
    module_device,
    named_layers,
    unwrap_model,
)

__all__ = [
    "eval_mode",
    "frozen_params",
    "buffers_kept",
    "attributes_kept",
    "log_muted",
    "isolated",
    "grad_enabled",
    "capture",
    "Capture",
    "LayerNotCalledError",
    "forward_until",
    "fork_rng",
    "deterministic_warn_only",
    "NondeterministicOpWarning",
    "torch_threads",
    "one_thread",
    "read_as_map",
    "layout_of",
    "layout_set_explicitly",
    "detect_layouts",
]

#: Layers whose output visualizations read as a [B, C, h, w] map (see :func:`read_as_map`), by module.
_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, MapLayout] = weakref.WeakKeyDictionary()
_EXPLICIT: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layouts the user set: setup's detection keeps them


def read_as_map(model: nn.Module, layouts: dict[str, MapLayout | None], explicit: bool = True) -> None:
    """From now on :func:`capture` records each named layer's output as the ``[B, C, h, w]`` map its
    :class:`~lightning_viz.layers.MapLayout` gives (a Swin stage's channels-last map permuted, a ViT block's patch
    tokens on their grid; ``None``: as it is): what pytorch-grad-cam's ``reshape_transform`` does, for every method.
    Callbacks call it at setup (``explicit=False``) for the layers they are given, with the layouts
    :func:`lightning_viz.layers.map_layouts` finds; call it yourself before ``fit`` where that detection cannot tell
    (a channels-last map with ``h == C``): the callbacks keep what you set. The model's forward is unchanged."""
    for name, layout in layouts.items():
        module = get_layer(model, name)
        if not explicit and module in _EXPLICIT:
            continue
        if explicit:
            _EXPLICIT.add(module)
        if layout is None:
            _LAYOUTS.pop(module, None)
        else:
            _LAYOUTS[module] = layout


_DECIDED: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # layers detect_layouts looked at (found a layout or not)


def detect_layouts(model: nn.Module, x: Tensor, names: Iterable[str]) -> None:
    """For the functions of :mod:`lightning_viz.methods`: once per layer, one no-grad forward of ``x[:1]`` tells
    whether it gives a channels-last map or tokens (:func:`lightning_viz.layers.map_layouts`), read as a
    ``[B, C, h, w]`` map from then on (:func:`read_as_map`, ``explicit=False``); a convolution's output needs none.
    Nothing on a model with modules in training mode (that forward would change BatchNorm's statistics)."""
    layers = {n: get_layer(model, n) for n in names}
    todo = [n for n, m in layers.items() if not isinstance(m, CONV_TYPES) and m not in _DECIDED]
    if todo and x.shape[0] and not any(m.training for m in model.modules()):  # a forward in training mode changes it
        read_as_map(model, dict(map_layouts(model, x[:1], todo)), explicit=False)
        _DECIDED.update(layers[n] for n in todo)


def layout_set_explicitly(model: nn.Module, name: str) -> bool:
    """``True`` when the user set layer ``name``'s layout with :func:`read_as_map` (``explicit=True``)."""
    return get_layer(model, name) in _EXPLICIT


def layout_of(model: nn.Module, name: str) -> MapLayout | None:
    """The :class:`~lightning_viz.layers.MapLayout` layer ``name``'s output is read with (:func:`read_as_map`), or
    ``None``: as it is."""
    return _LAYOUTS.get(get_layer(model, name))


class LayerNotCalledError(LayerNotFoundError, KeyError):
    """A layer the forward did not call (read from a :class:`Capture`); a ``KeyError`` too, as it always was."""

    __str__ = LayerNotFoundError.__str__  # the message as written, not KeyError's repr of it


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` (the CPU intra-op threads) for the block, the previous count restored on exit;
    ``None``: unchanged."""
    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 for the block, then restored (with the OpenMP backend; the native one cannot
    change its count once it has run). Small products and element-wise ops (t-SNE on a probe set, the rendering and
    statistics of the log stage) gain nothing from threads, while MKL's threaded GEMMs and OpenMP barriers were
    measured 5-6x slower on a loaded 2-core machine; one thread also makes the result independent of the thread
    count."""
    threads = torch.get_num_threads()
    if threads == 1 or not _openmp_backend():
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def _openmp_backend() -> bool:
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Switch every submodule to eval mode; restore each submodule's own ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, was_training in flags:
            m.training = was_training


@contextlib.contextmanager
def frozen_params(model: nn.Module) -> Iterator[nn.Module]:
    """Set ``requires_grad=False`` on every parameter; restore the flags on exit.

    Gradients are then only ever taken w.r.t. inputs or activations (``torch.autograd.grad``),
    so parameter ``.grad`` fields and DDP's gradient hooks are never touched.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bit equality (NaN payloads and the sign of zero included)."""
    try:
        return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    except RuntimeError:  # dtypes without a byte view
        return torch.equal(a, b)


_PLAIN = (bool, int, float, str, type(None))

#: what ``nn.Module`` keeps in its ``__dict__`` itself (parameters, buffers, submodules, hooks): not user state
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


def _changed(now: list | dict, then: list | dict) -> bool:
    """Whether a list or dict no longer holds the very objects it held (an append, a new value for a key)."""
    if isinstance(now, dict) and isinstance(then, dict):
        return now.keys() != then.keys() or any(now[k] is not v for k, v in then.items())
    return len(now) != len(then) or any(a is not b for a, b in zip(now, then))


def _same_entries(now: dict, then: dict) -> bool:
    """Whether a module's ``__dict__`` holds the very objects it held, under the same keys (one C-level pass)."""
    return len(now) == len(then) and now.keys() == then.keys() and all(map(operator.is_, now.values(), then.values()))


@contextlib.contextmanager
def attributes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every plain Python attribute (``bool``, ``int``, ``float``, ``str``, ``None``) of every submodule
    that changed inside the block, and remove the plain ones the block added: a ``forward`` that counts its calls
    or flips a flag (a warm-up counter, a "first call" switch) is as training left it. Lists and dicts of a submodule
    get their items back in place (the same object): a forward hook that collects features for a loss
    (``self.feats.append(out)``) would otherwise hand training the visualization's tensors."""
    snaps = [(m, vars(m).copy()) for m in model.modules()]  # shallow: the objects each attribute names
    kept = [
        (m, k, v, list(v) if isinstance(v, list) else dict(v))
        for m, snap in snaps
        for k in snap.keys() - _MODULE_INTERNALS
        if isinstance(v := snap[k], (list, dict))
    ]
    try:
        yield model
    finally:
        for m, snap in snaps:
            d = vars(m)
            if _same_entries(d, snap):  # nothing rebound, added or removed (the usual case)
                continue
            for k in [k for k, v in d.items() if k not in snap and isinstance(v, _PLAIN)]:
                del d[k]
            d.update((k, v) for k, v in snap.items() if isinstance(v, _PLAIN))
        for m, k, obj, items in kept:
            if vars(m).get(k) is not obj:
                vars(m)[k] = obj
            if _changed(obj, items):
                if isinstance(obj, list):
                    obj[:] = items
                else:
                    obj.clear()
                    obj.update(items)


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Restore every buffer that changed inside the block to its exact value (and object) on exit.

    Eval mode stops BatchNorm updates, but some buffers change in any mode: quantization-aware-training
    observers (``FakeQuantize`` updates its ranges, scale and zero point on every forward), or any buffer a
    ``forward`` writes. Only what changed is written back, so untouched buffers keep their version counters.
    """
    saved = [
        (m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None
    ]
    try:
        yield model
    finally:
        with torch.no_grad():
            for m, name, b, value in saved:
                if m._buffers.get(name) is not b:  # reassigned: put the original tensor back
                    m._buffers[name] = b
                if b.shape != value.shape:
                    b.resize_(value.shape)
                elif _same_bits(b, value):
                    continue
                b.copy_(value)


@contextlib.contextmanager
def grad_enabled() -> Iterator[None]:
    """Enable autograd, also inside ``torch.inference_mode`` (as under ``trainer.validate``).

    Tensors created before entering (the probe images) must be cloned inside the context to leave
    inference mode; :func:`isolated` callers do that with ``x.clone()``.
    """
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _rng_devices() -> list[int]:
    """Every initialized CUDA device (a data pipeline may draw on any of them). ``is_initialized`` first: a flag,
    where ``is_available`` asks the driver (~0.1 ms, at every :func:`isolated` of every callback on a CPU run)."""
    if torch.cuda.is_initialized() and torch.cuda.is_available():
        return list(range(torch.cuda.device_count()))
    return []


@contextlib.contextmanager
def fork_rng() -> Iterator[None]:
    """Fork every global RNG a data pipeline or a method may draw from -- torch (CPU and every
    initialized CUDA device), numpy's global ``np.random`` and python's ``random`` -- and restore
    them all on exit, also on error."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=_rng_devices()):
            yield
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _autocast_off(model: nn.Module) -> contextlib.AbstractContextManager:
    """Autocast off for the model's device type while an enclosing ``torch.autocast`` has it on: visualizations
    compute in the parameters' dtype wherever they are called from. (Lightning's ``precision="16-mixed"`` /
    ``"bf16-mixed"`` autocasts only its ``*_step`` calls, not the callback hooks; an autocast around a direct call
    would give float16 gradients, whose small values underflow, and bfloat16 maps.)"""
    device_type = module_device(model).type
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: one query per device type
        enabled = torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()
    except RuntimeError:  # a device type without autocast
        enabled = False
    return torch.autocast(device_type, enabled=False) if enabled else contextlib.nullcontext()


def _eager_stance() -> contextlib.AbstractContextManager:
    """Run ``torch.compile``d code eagerly: compiled graphs ignore hooks registered after compilation
    (and would recompile for every probe shape), so visualizations run the original Python modules."""
    set_stance = getattr(getattr(torch, "compiler", None), "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


@contextlib.contextmanager
def reentrant_checkpoint_direct() -> Iterator[None]:
    """Run ``torch.utils.checkpoint(fn, ..., use_reentrant=True)`` blocks as the plain call ``fn(...)`` inside the
    block. Reentrant checkpointing runs ``fn`` with autograd off and refuses ``torch.autograd.grad`` in its backward
    ("incompatible with .grad()"), so no gradient w.r.t. the input or a layer inside ``fn`` could be taken through
    it; in eval mode with frozen parameters the plain call computes the same values. (``use_reentrant=False``
    supports ``torch.autograd.grad`` and is left as it is.) The class attribute is restored on exit; training,
    outside the block, checkpoints as before."""
    try:
        from torch.utils.checkpoint import CheckpointFunction
    except ImportError:  # a torch without it
        yield
        return
    own = vars(CheckpointFunction).get("apply")  # normally inherited from torch.autograd.Function

    def direct(function: Callable[..., Any], preserve_rng_state: bool, *args: Any) -> Any:
        return function(*args)

    CheckpointFunction.apply = staticmethod(direct)
    try:
        yield
    finally:
        if own is None:
            del CheckpointFunction.apply
        else:
            CheckpointFunction.apply = own


class NondeterministicOpWarning(LightningVizWarning):
    """A visualization ran an op without a deterministic implementation under ``deterministic=True``."""


_NO_DETERMINISTIC = " does not have a deterministic implementation"
_warned_ops: set[str] = set()
#: the "shown once" memory of the warnings :func:`deterministic_warn_only` passes on (else shown at every run)
_passed_on: dict[Any, Any] = {}


def _off_rank_zero() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


_FULL_BACKWARD_HOOK_NOTE = "Full backward hook is firing when gradients are computed with respect to module outputs"


@contextlib.contextmanager
def _filter_first(entry: tuple[Any, ...]) -> Iterator[None]:
    """``entry`` first among Python's warning filters inside the block, put in the list in place: a change through
    ``warnings.filterwarnings`` or ``catch_warnings`` resets Python's "shown once" memory of every warning, so the
    user's own warnings (and Lightning's) printed again after every visualization run."""
    filters: list[Any] = warnings.filters  # type: ignore[assignment]  # the list the C module reads
    filters.insert(0, entry)
    try:
        yield
    finally:
        for i, f in enumerate(filters):
            if f is entry:
                del filters[i]
                break


@contextlib.contextmanager
def user_backward_hooks_quiet() -> Iterator[None]:
    """Inside the block, silence torch's note that a user's ``register_full_backward_hook`` fires "with respect to
    module outputs since no inputs require gradients": a visualization freezes the parameters and differentiates
    w.r.t. activations, so a hooked layer's inputs need no gradient there, never in training. The user's hook still
    runs; other warnings pass (an ignored warning leaves Python's memory of those shown as it was)."""
    with _filter_first(("ignore", re.compile(re.escape(_FULL_BACKWARD_HOOK_NOTE), re.I), UserWarning, None, 0)):
        yield


@contextlib.contextmanager
def _recorded(caught: list[warnings.WarningMessage]) -> Iterator[None]:
    """Every warning inside the block appended to ``caught``, not shown: ``catch_warnings(record=True)`` with
    ``simplefilter("always")`` (no "shown once" memory kept), without resetting that memory (:func:`_filter_first`)."""
    show = warnings.showwarning

    def keep(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        caught.append(warnings.WarningMessage(message, category, filename, lineno, file, line))

    with _filter_first(("always", None, Warning, None, 0)):
        warnings.showwarning = keep
        try:
            yield
        finally:
            warnings.showwarning = show


@contextlib.contextmanager
def deterministic_warn_only() -> Iterator[None]:
    """Under ``torch.use_deterministic_algorithms(True)`` (``Trainer(deterministic=True)``), let ops without a
    deterministic implementation run inside the block instead of raising. A visualization differentiates where
    training never does -- w.r.t. the input, through a frozen backbone -- so it can meet such a backward (on CUDA:
    bilinear upsampling, adaptive pooling to more than 1x1, reflection padding) that training never runs; it
    changes no training state, so it must not stop the run. One :class:`NondeterministicOpWarning` per op names
    it (torch's own warnings are replaced); the mode is restored on exit, also on error."""
    if not torch.are_deterministic_algorithms_enabled() or torch.is_deterministic_algorithms_warn_only_enabled():
        yield
        return
    torch.use_deterministic_algorithms(True, warn_only=True)
    caught: list[warnings.WarningMessage] = []
    try:
        with _recorded(caught):
            yield
    finally:
        torch.use_deterministic_algorithms(True)
        for w in caught:
            text = str(w.message)
            if _NO_DETERMINISTIC not in text:  # not ours to rephrase: as it came, once per place as Python shows it
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, registry=_passed_on)
                continue
            op = text.split(_NO_DETERMINISTIC)[0].strip()
            if op not in _warned_ops:
                _warned_ops.add(op)
                if _off_rank_zero():  # every DDP rank runs the op: one line, rank 0's
                    continue
                warnings.warn(
                    f"lightning-viz: a visualization ran {op}, which has no deterministic implementation, under "
                    "deterministic=True (torch.use_deterministic_algorithms). It ran anyway: training does not run "
                    "it and stays deterministic; only that visualization may vary in the last bits between runs.",
                    NondeterministicOpWarning,
                    stacklevel=3,
                )


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Stands in for ``LightningModule.log`` / ``log_dict`` inside :func:`log_muted`."""


@contextlib.contextmanager
def log_muted(model: nn.Module) -> Iterator[nn.Module]:
    """Make ``self.log`` / ``self.log_dict`` of every LightningModule in ``model`` do nothing inside the block: a
    ``forward`` that logs (an auxiliary loss, a feature statistic) must not add the probes' values to the user's
    metrics, nor fail where Lightning refuses logging (setup: "You can't `self.log()` inside `setup`"). Told by the
    class name, so this module needs no Lightning import; an instance attribute of that name (not Lightning's
    method) is left alone; the ones set here are removed on exit."""
    muted = [
        (m, k)
        for m in model.modules()
        if any(c.__name__ == "LightningModule" for c in type(m).__mro__)
        for k in ("log", "log_dict")
        if k not in vars(m)
    ]
    for m, k in muted:
        vars(m)[k] = _no_log
    try:
        yield model
    finally:
        for m, k in muted:
            vars(m).pop(k, None)


@contextlib.contextmanager
def isolated(model: nn.Module) -> Iterator[nn.Module]:
    """Everything a visualization needs to leave training exactly as it was.

    Eval mode (restored per submodule), frozen parameters (no ``.grad`` writes, no BatchNorm
    updates), every buffer restored if it changed (:func:`buffers_kept`), every plain Python attribute of
    every submodule too (:func:`attributes_kept`: call counters, flags), every global RNG forked
    and restored (:func:`fork_rng`; methods draw noise from their own seeded ``torch.Generator``),
    and autograd enabled even under inference mode; autocast off (:func:`_autocast_off`); ``self.log`` in a
    ``forward`` muted (:func:`log_muted`); ``torch.compile``d modules run eagerly (so hooks fire); reentrant
    gradient checkpointing runs as plain calls (:func:`reentrant_checkpoint_direct`); ops without a
    deterministic implementation do not raise under ``deterministic=True`` (:func:`deterministic_warn_only`).
    Yields the unwrapped model.
    """
    model = unwrap_model(model)
    with contextlib.ExitStack() as stack:
        stack.enter_context(attributes_kept(model))  # first in, last out: after eval_mode restored the modes
        stack.enter_context(deterministic_warn_only())
        stack.enter_context(user_backward_hooks_quiet())
        stack.enter_context(fork_rng())
        stack.enter_context(grad_enabled())
        stack.enter_context(_autocast_off(model))
        stack.enter_context(_eager_stance())
        stack.enter_context(reentrant_checkpoint_direct())
        stack.enter_context(eval_mode(model))
        stack.enter_context(frozen_params(model))
        stack.enter_context(buffers_kept(model))
        stack.enter_context(log_muted(model))
        yield model


class Capture:
    """Layer outputs recorded by :func:`capture`: ``cap[name]`` is that layer's last output.

    With ``grad=True`` the recorded tensors are part of the autograd graph, so
    ``torch.autograd.grad(score, [cap[n] for n in names])`` gives d score / d activation.
    """

    def __init__(self, names: list[str], model: nn.Module | None = None):
        self.names = names
        self.model = model  # to name the same layer elsewhere when one is not called
        self.outputs: dict[str, Tensor] = {}
        self.without_grad: set[str] = set()  # grad=True: layers that ran with autograd off (see capture)
        self.passed_on: dict[str, Tensor] = {}  # grad=True: the copy each layer handed downstream
        self._handed: dict[str, Any] = {}  # grad=True: that copy's autograd node when handed on

    def rectified_later(self, name: str) -> bool:
        """``True`` when the forward, right after layer ``name``, rectified the layer's output in place with one
        ReLU or ReLU6 (``nn.ReLU(inplace=True)`` after a conv, DenseNet's ``F.relu(norm5, inplace=True)``,
        MobileNetV2's ``nn.ReLU6(inplace=True)``): the tensor the layer handed on was modified in place, and the rest
        of the network reads that rectified map, :meth:`read_later`. Told by the operation (the autograd node now on
        that tensor is the rectifier, applied to it directly), not by the values, which would mistake a ReLU6 for a
        ReLU as long as no value exceeds 6. Another in-place op (an add, SiLU, Hardswish) leaves it ``False``.
        Only with ``grad=True``; ask after the forward. (An inference tensor, made under ``torch.inference_mode()`` in
        the forward, keeps no version counter nor autograd record to tell it by: ``False``.)"""
        passed = self.passed_on.get(name)
        if passed is None or passed.is_inference() or passed._version == 0 or name not in self.outputs:
            return False
        node = passed.grad_fn
        if node is None or not node.next_functions or node.next_functions[0][0] is not self._handed.get(name):
            return False  # no autograd record, or other in-place ops came first
        kind = node.name()
        if kind in ("ReluBackward0", "_DeconvReLUInplaceBackward"):  # (the latter: relu_rules' deconv rule)
            top = None
        elif kind == "HardtanhBackward0" and float(getattr(node, "_saved_min_val", -1.0)) == 0.0:
            top = float(getattr(node, "_saved_max_val", 6.0))  # ReLU6 = hardtanh(x, 0, 6)
        else:
            return False
        with torch.no_grad():
            out = self.outputs[name].detach()
            return passed.shape == out.shape and bool(torch.equal(passed.detach(), out.clamp(0, top)))

    def read_later(self, name: str) -> Tensor:
        """The map the rest of the network read from layer ``name``: ``ReLU(output)`` (or ``ReLU6``) when the
        forward rectified it in place (:meth:`rectified_later`), else the output itself; detached."""
        return (self.passed_on[name] if self.rectified_later(name) else self[name]).detach()

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.outputs:
            raise LayerNotCalledError(
                f"Layer {name!r} produced no output in the forward pass: the model's forward did not call it in eval "
                "mode, the mode visualizations run it in (e.g. GoogLeNet's and Inception's auxiliary heads run only "
                f"in training mode); choose a layer the eval-mode forward calls. Recorded: {sorted(self.outputs)}"
                + self._elsewhere(name)
            )
        return self.outputs[name]

    def _elsewhere(self, name: str) -> str:
        """A hint naming the same layer under another prefix (``ema.module.conv2`` for ``net.conv2``: an averaged
        copy of the network the eval-mode forward runs instead, torch's ``AveragedModel``), if the model has one."""
        if self.model is None or "." not in name:
            return ""
        layers = named_layers(self.model)
        suffix = "." + name.split(".", 1)[1]
        alike = [n for n, m in layers.items() if n != name and n.endswith(suffix) and type(m) is type(layers.get(name))]
        if not alike:
            return ""
        return (
            f". The model has the same layer as {', '.join(repr(n) for n in alike)} (e.g. an averaged copy of the "
            "network that the eval-mode forward runs): name that one to explain what the forward runs."
        )

    def __contains__(self, name: str) -> bool:
        return name in self.outputs

    def clear(self) -> None:
        self.outputs.clear()
        self.passed_on.clear()
        self._handed.clear()


@contextlib.contextmanager
def capture(model: nn.Module, layer_names: Iterable[str], grad: bool = False) -> Iterator[Capture]:
    """Record the output of each named layer during forward passes inside the block.

    Later in-place operations (``nn.ReLU(inplace=True)``, ``F.relu(x, inplace=True)``) cannot overwrite
    the recorded values: without grad the hook keeps a detached copy; with ``grad=True`` it keeps the
    layer's own output node (whose gradient is wanted) and passes a copy downstream, and notes in
    ``cap.without_grad`` the layers that ran with autograd off (no gradient can reach them). Take gradients
    inside the block: gradient checkpointing recomputes the forward during the backward, hooks included.
    A module called several times in one forward (a reused module) keeps its last call's output.
    Hooks are removed on exit, also on error.
    """
    names = list(layer_names)
    cap = Capture(names, model)

    def make_hook(name: str):
        def hook(module: nn.Module, inputs, output):
            if not isinstance(output, Tensor):
                raise TypeError(
                    f"Layer {name!r} ({type(module).__name__}) returns {type(output).__name__}, not a tensor; "
                    "choose a layer whose output is a single tensor."
                )
            layout = _LAYOUTS.get(module)
            if grad:
                if not torch.is_grad_enabled():  # e.g. inside torch.utils.checkpoint(use_reentrant=True)'s forward
                    cap.without_grad.add(name)
                # Keep the layer's own output node; hand a copy downstream so in-place ops there
                # cannot modify the recorded tensor (which would break autograd.grad w.r.t. it).
                # With frozen parameters and an input that needs no grad, make it a leaf that does.
                node = output if output.requires_grad else output.detach().requires_grad_(True)
                if layout is not None:  # record the map view; downstream reads the output rebuilt from it
                    view = layout.to_map(node, name)
                    cap.outputs[name] = view
                    cap.passed_on[name] = layout.from_map(view, node).clone()
                else:
                    cap.outputs[name] = node
                    cap.passed_on[name] = node.clone()  # a fresh tensor: its version counts later in-place ops
                cap._handed[name] = cap.passed_on[name].grad_fn
                return cap.passed_on[name]
            out = output.detach() if layout is None else layout.to_map(output.detach(), name)
            cap.outputs[name] = out.clone()
            return None

        return hook

    with _forward_hooks(model, names, make_hook):
        yield cap


@contextlib.contextmanager
def _forward_hooks(model: nn.Module, names: Iterable[str], make_hook: Callable[[str], Callable]) -> Iterator[None]:
    """``make_hook(name)`` as a forward hook on each named layer for the block; removed on exit, also on error."""
    handles = []
    try:
        for name in names:
            handles.append(hookable_layer(model, name).register_forward_hook(make_hook(name)))
        yield
    finally:
        for h in handles:
            h.remove()


class _ForwardStopped(BaseException):
    """Ends a forward pass early (a ``BaseException``, so model code catching ``Exception`` cannot swallow it)."""


def _distributed_wrappers() -> tuple[type, ...]:
    kinds: list[type] = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append(FullyShardedDataParallel)
    except ImportError:  # torch built without distributed support
        pass
    return tuple(kinds)


@contextlib.contextmanager
def forward_until(model: nn.Module, layer_names: Iterable[str]) -> Iterator[Callable[[Callable[[], Any]], Any]]:
    """Cut forward passes of ``model`` short once the named layers have run.

    Inside the block, ``run(call)`` returns ``call()`` (e.g. ``functools.partial(model, x)``), or ``None`` when
    the pass was stopped right after the last named layer's forward hooks: nothing after it is computed, and only
    what hooks recorded (a :func:`capture` entered *before* this block, whose hooks then run first) is available.
    The first ``run`` goes through the whole model and counts the layers' calls; later passes are cut only when
    each named layer ran exactly once in it (a reused module's *last* output is the one :func:`capture` keeps).
    Never cut: no layer names, or a DDP / DataParallel / FSDP wrapper inside ``model`` (their forward pairs with
    collectives and a backward). Hooks are removed on exit, also on error.
    """
    names = list(dict.fromkeys(layer_names))
    counts = dict.fromkeys(names, 0)
    state = {"armed": False, "first": True, "running": False}
    wrapped = bool(names) and any(isinstance(m, _distributed_wrappers()) for m in model.modules())

    def make_hook(name: str):
        def hook(module: nn.Module, inputs, output) -> None:
            counts[name] += 1
            # only inside run(): a backward that recomputes the forward (gradient checkpointing) runs it whole
            if state["armed"] and state["running"] and all(counts.values()):
                raise _ForwardStopped

        return hook

    def run(call: Callable[[], Any]) -> Any:
        for name in counts:
            counts[name] = 0
        state["running"] = True
        try:
            out = call()
        except _ForwardStopped:
            return None
        finally:
            state["running"] = False
        if state["first"]:
            state["first"] = False
            state["armed"] = bool(names) and not wrapped and all(c == 1 for c in counts.values())
        return out

    with _forward_hooks(model, [] if wrapped else names, make_hook):
        yield run
