"""One forward + one backward per chunk, shared by every gradient and CAM method.

:func:`gradient_pass` runs, per chunk of inputs, a single forward pass that records the activations of
a union of layers (:func:`lightning_viz.capture.capture` with ``grad=True``), then a single
``torch.autograd.grad`` call of the summed target score w.r.t. the input *and* all those activations.
Saliency, input x gradient, guided backprop / deconvnet (with a :mod:`relu_rules` rule), Grad-CAM,
Grad-CAM++, XGrad-CAM, LayerCAM, CAM ... are all read off that one :class:`PassResult`.
A pass that serves only layers (``input_grad=False``: no gradient method asks for ``dS/dx``) leaves the input
out of the graph, so autograd records nothing below the earliest requested layer and the backward stops
there (as Captum's ``LayerGradCam`` and torchcam do).

:class:`PassCache` shares passes between callbacks: each consumer registers the layers it needs for a
``(target, rule)`` before training (``register``; :data:`INPUT` among the layers = the input gradient), and the
first consumer to ask at an epoch end
(``get``) computes one pass over the union of layers; the others reuse it. An entry is valid while the
model is the same module object, its parameters and buffers are unchanged (their autograd version
counters, bumped by every optimizer step / BatchNorm update / ``load_state_dict``, and a checksum of a strided
sample of their values, which sees writes through ``p.data`` too) and the probe images are the same
(``ProbeSet.fingerprint``). Each model
gets its own cache (:func:`pass_cache`, a weak mapping); its entries stay on the probes' device until the model next
changes or :meth:`PassCache.clear` is called. The callbacks also clear the cache at every training batch start (to
free it while training) and at teardown.

No parameter ``.grad`` is written (``autograd.grad`` w.r.t. inputs/activations only); call inside
:func:`lightning_viz.capture.isolated` for eval mode, frozen parameters and an untouched RNG.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from ..capture import capture, grad_enabled
from ..layers import linear_calls
from ..targets import CallableTarget, TargetSpec, resolve_target
from .batching import images_per_forward
from .checks import (
    check_chunk_size,
    check_eval,
    check_images,
    check_labels_per_image,
    check_layers_get_gradients,
    check_logits,
    check_reaches_input,
    input_matches_model,
)
from .relu_rules import check_scripted_relus, relu_rule

__all__ = ["INPUT", "PassResult", "gradient_pass", "PassCache", "pass_cache", "target_key", "model_version", "chunks"]


#: the methods that take a pass with each ReLU rule, as errors name them
_RULE_METHODS = {"guided": "guided backprop and guided Grad-CAM", "deconv": "deconvnet"}

#: the "layer" name a :class:`PassCache` consumer lists when it reads the input gradient ``dS/dx``
INPUT = "<input>"


def chunks(n: int, chunk_size: Optional[int]) -> list[slice]:
    """Slices covering ``range(n)`` in pieces of ``chunk_size`` (``None``: one piece; else as
    :func:`~lightning_viz.methods.checks.check_chunk_size` allows)."""
    chunk_size = check_chunk_size(chunk_size)
    if chunk_size is None or chunk_size >= n:
        return [slice(0, n)]
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def pass_chunks(model: nn.Module, x: Tensor, chunk_size: Optional[int]) -> list[slice]:
    """The chunks of a :func:`gradient_pass` over ``x``: ``chunk_size`` images each, or (``None``) as many as the
    default memory budget holds with a backward (:func:`~lightning_viz.methods.batching.images_per_forward`)."""
    if chunk_size is None and x.shape[0] > 1:
        chunk_size = images_per_forward(model, x, grad=True)
    return chunks(x.shape[0], chunk_size)


@dataclass
class PassResult:
    """Everything one forward + backward gives, concatenated over chunks (all detached).

    Attributes:
        logits: ``[B, K]``.  scores: ``[B]`` target score.  classes: ``[B]`` target class or ``None``
        (callable targets).  input_grad: ``[B, C, H, W]`` d score / d x, ``None`` when the pass was taken
        with ``input_grad=False``.  activations / grads:
        ``{layer: [B, ...]}`` layer outputs and d score / d output; an output the forward then rectifies in place
        (``ReLU(inplace=True)`` after a conv, DenseNet's ``norm5``; or a ``ReLU6``) is recorded as ``ReLU(output)``,
        the map the network reads, as in Grad-CAM's VGG-16 (Caffe's ``conv5_3`` blob after the in-place
        ``relu5_3``) and pytorch-grad-cam on the CPU; its gradient stays d score / d output (torchcam takes it after
        the ReLU). rule: the ReLU rule used.
        head: the last ``nn.Linear`` called in the forward (the classifier of CAM's head), ``None`` if none was.
        without_grad: layers that ran with autograd off (inside ``torch.no_grad()`` in the forward); unreached: layers
        the score does not depend on through autograd (those, and layers whose output the forward detaches). Their
        activations are recorded, their gradients are zeros that :meth:`gradient` refuses to hand out.
    """

    logits: Tensor
    scores: Tensor
    classes: Optional[Tensor]
    input_grad: Optional[Tensor]
    activations: dict[str, Tensor] = field(default_factory=dict)
    grads: dict[str, Tensor] = field(default_factory=dict)
    rule: Optional[str] = None
    head: Optional[str] = None
    without_grad: frozenset[str] = frozenset()
    unreached: frozenset[str] = frozenset()

    def layer(self, name: str) -> tuple[Tensor, Tensor]:
        if name not in self.activations:
            raise KeyError(f"layer {name!r} was not recorded in this pass; recorded: {sorted(self.activations)}")
        return self.activations[name], self.grads[name]

    def gradient(self, name: str, fn: str, instead: str = "") -> Tensor:
        """d score / d output of layer ``name`` for ``fn`` (named in the error, with ``instead``): refused for a layer
        no gradient reaches (:attr:`without_grad`, :attr:`unreached`), whose zeros are no gradient
        (:func:`~lightning_viz.methods.checks.check_layers_get_gradients`)."""
        check_layers_get_gradients(fn, self.without_grad & {name}, instead, self.unreached & {name})
        return self.layer(name)[1]


def _cat(parts: list[Any]) -> Any:
    if parts[0] is None:
        return None
    return torch.cat(parts, dim=0)


def gradient_pass(
    model: nn.Module,
    x: Tensor,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    layers: str | Iterable[str] = (),
    rule: Optional[str] = None,
    chunk_size: Optional[int] = None,
    input_grad: bool = True,
) -> PassResult:
    """One forward + one ``autograd.grad`` per chunk: logits, target scores, input gradient, and the
    activations and activation gradients of ``layers`` (one name or several), with ReLU backward ``rule``
    (None/guided/deconv). Chunks of ``chunk_size`` images (``None``: as many as the default memory budget holds,
    :func:`pass_chunks`).

    ``input_grad=False`` (only with ``layers``): the input does not require grad, so the graph -- and the
    backward -- begins at the earliest recorded layer; ``PassResult.input_grad`` is then ``None``."""
    check_images("gradient_pass", x)
    chunk_size = check_chunk_size(chunk_size)
    check_eval("gradient and CAM methods", model)
    labels = check_labels_per_image("gradient and CAM methods", labels, x.shape[0])
    if rule is not None:
        check_scripted_relus(_RULE_METHODS.get(rule, "gradient_pass"), model, f"the ReLU rule {rule!r}", False)
    with input_matches_model("gradient and CAM methods", model, x):
        return _gradient_pass(model, x, target, labels, layers, rule, chunk_size, input_grad)


def _gradient_pass(
    model: nn.Module,
    x: Tensor,
    target: TargetSpec,
    labels: Optional[Tensor],
    layers: str | Iterable[str],
    rule: Optional[str],
    chunk_size: Optional[int],
    input_grad: bool,
) -> PassResult:
    tgt = resolve_target(target)
    names = list(dict.fromkeys([layers] if isinstance(layers, str) else layers))  # one name: not its characters
    if not input_grad and not names:
        raise ValueError(
            "gradient_pass with input_grad=False needs at least one layer: there is nothing to differentiate"
        )
    parts: dict[str, list] = {"logits": [], "scores": [], "classes": [], "input_grad": []}
    acts: dict[str, list] = {n: [] for n in names}
    grads: dict[str, list] = {n: [] for n in names}
    head: Optional[str] = None  # the last nn.Linear called
    without_grad: set[str] = set()
    unreached: set[str] = set()
    for sl in pass_chunks(model, x, chunk_size):
        with grad_enabled():  # a caller's torch.no_grad() / inference_mode() would zero every gradient
            xc = x[sl].detach()
            if input_grad or xc.is_inference():  # a normal tensor autograd may save, also from an inference-mode x
                xc = xc.clone().requires_grad_(input_grad)
            lab = None if labels is None else labels[sl].to(x.device)
            if lab is not None and lab.is_inference():  # gather saves the index for the backward
                lab = lab.clone()
        # The backward runs inside the hooks and the ReLU rule: gradient checkpointing (torch.utils.checkpoint)
        # recomputes the forward during it, which must be the same forward.
        with grad_enabled(), capture(model, names, grad=True) as cap, relu_rule(rule), linear_calls(model) as calls:
            logits = check_logits("gradient and CAM methods", model(xc), xc.shape[0])
            scores = tgt.score(logits, lab)
            cls = tgt.classes(logits, lab) if not isinstance(tgt, CallableTarget) else None
            outs = [cap[n] for n in names]
            # CAM's A is the map the network goes on to read: rectified when the forward applies an in-place ReLU
            # (or ReLU6) to the layer's output (a conv followed by ReLU(inplace=True), DenseNet's norm5)
            reads = [cap.read_later(n) for n in names]
            head = calls[-1] if calls else None
            without_grad |= cap.without_grad  # their activations are read; a gradient of them is refused
            if input_grad:  # else every input gradient is missing: silently zero maps
                check_reaches_input("a gradient method", scores.requires_grad)
            wrt = ([xc] if input_grad else []) + outs
            g: tuple[Optional[Tensor], ...]
            if scores.requires_grad:
                try:
                    g = torch.autograd.grad(scores.sum(), wrt, allow_unused=True)
                except torch.utils.checkpoint.CheckpointError as exc:
                    if rule is None:
                        raise
                    raise ValueError(
                        f"the {rule} ReLU rule cannot run through torch.utils.checkpoint: its recomputation during "
                        "the backward does not see the rule. Turn gradient checkpointing off for the visualized "
                        f"model (timm: set_grad_checkpointing(False)) to use it. ({exc})"
                    ) from exc
            else:  # no recorded layer feeds the target (only possible with input_grad=False): every gradient is 0
                g = (None,) * len(wrt)
        if not input_grad:
            g = (None,) + tuple(g)
        else:
            check_reaches_input("a gradient method", g[0] is not None)
        unreached.update(n for n, ga in zip(names, g[1:]) if ga is None)
        parts["logits"].append(logits.detach())
        parts["scores"].append(scores.detach())
        parts["classes"].append(None if cls is None else cls.detach())
        if input_grad:
            parts["input_grad"].append(torch.zeros_like(xc) if g[0] is None else g[0])
        for n, a, ga, read in zip(names, outs, g[1:], reads):
            acts[n].append(read)
            grads[n].append(torch.zeros_like(a) if ga is None else ga.detach())
    return PassResult(
        logits=_cat(parts["logits"]),
        scores=_cat(parts["scores"]),
        classes=_cat(parts["classes"]),
        input_grad=_cat(parts["input_grad"]) if input_grad else None,
        activations={n: _cat(v) for n, v in acts.items()},
        grads={n: _cat(v) for n, v in grads.items()},
        rule=rule,
        head=head,
        without_grad=frozenset(without_grad),
        unreached=frozenset(unreached),
    )


class _Same:
    """Hashable by identity, holding its object: while a key lives, no other object can take that id."""

    __slots__ = ("obj",)

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.obj is self.obj


def target_key(target: TargetSpec) -> Hashable:
    """A hashable identity of a target: its name, or the callable itself (by identity)."""
    tgt = resolve_target(target)
    if isinstance(tgt, CallableTarget):
        return ("callable", _Same(tgt.fn))
    return (type(tgt).__name__, tgt.name)


def model_version(model: nn.Module) -> tuple[int, int, Optional[tuple[float, ...]]]:
    """Changes whenever any parameter or buffer is modified in place: their autograd version counters (optimizer
    step, BN update, load) and a checksum of their values, which also sees writes through ``.data`` (no version bump:
    Lightning's ``WeightAveraging`` swapping the averaged weights in and out around its validation)."""
    params, buffers = list(model.parameters()), list(model.buffers())
    return sum(p._version for p in params), sum(b._version for b in buffers), _checksum(model, params + buffers)


#: elements of each tensor the checksum reads (evenly strided): a whole-tensor sum of a ResNet-18's 11 M weights at
#: every cache lookup cost a quarter of a forward + backward at 64 px (five lookups for five maps)
CHECKSUM_SAMPLES = 4096

#: per model: the storages its checksum views were made of, and those views (strided samples of each floating
#: tensor, grouped by device and dtype); made again when a tensor is replaced (another storage, dtype or shape)
_SAMPLED: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, dict[tuple, list[Tensor]]]] = weakref.WeakKeyDictionary()


def _checksum(model: nn.Module, tensors: list[Tensor]) -> Optional[tuple[float, ...]]:
    """The L1 norm of :data:`CHECKSUM_SAMPLES` evenly strided elements of each floating-point tensor (all of a smaller
    or non-contiguous one), one fused ``_foreach_norm`` and one device-to-host copy per device and dtype: a write that
    changes the values (averaged weights swapped in, pruning, a load through ``.data``) changes it in practice. The
    sample views are kept per model, so a lookup makes no new tensors (~120 on a ResNet-18: their per-operation cost
    dominated). Integer buffers (``num_batches_tracked``) count by their version counters only. A reduction's order
    depends on the thread count, so two counts may give other bits (only a pass computed again); ``None`` where the
    tensors cannot be read (e.g. fake tensors)."""
    try:
        key = tuple((t.data_ptr(), t.dtype, t.shape) for t in tensors)
        cached = _SAMPLED.get(model)
        if cached is None or cached[0] != key:
            groups: dict[tuple, list[Tensor]] = {}
            with torch.no_grad():
                for t in tensors:
                    t = torch.view_as_real(t.detach()) if t.is_complex() else t.detach()
                    if not t.is_floating_point():
                        continue
                    if t.is_contiguous():
                        t = t.view(-1)[:: max(1, -(-t.numel() // CHECKSUM_SAMPLES))]
                    groups.setdefault((t.device, t.dtype), []).append(t)
            cached = _SAMPLED[model] = (key, groups)
        with torch.no_grad():
            return tuple(v for views in cached[1].values() for v in torch.stack(torch._foreach_norm(views, 1)).tolist())
    except Exception:  # a tensor that cannot be read: the version counters alone
        return None


class PassCache:
    """Shares :func:`gradient_pass` results between consumers (callbacks) of one model; see module doc.

    ``forwards`` counts the chunks actually computed (one forward + one backward each).
    """

    def __init__(self) -> None:
        self.needs: dict[tuple, set[str]] = {}
        self.entries: dict[tuple, PassResult] = {}
        self.version: Any = None
        self.forwards = 0

    def register(self, target: TargetSpec, rule: Optional[str], layers: Iterable[str]) -> None:
        """Declare that a consumer will ask for ``layers`` under ``(target, rule)`` (call at setup);
        list :data:`INPUT` (or no layer at all) to read the input gradient."""
        self.needs.setdefault((target_key(target), rule), set()).update(list(layers) or [INPUT])

    def get(
        self,
        model: nn.Module,
        x: Tensor,
        probe_key: Hashable,
        target: TargetSpec = "label",
        labels: Optional[Tensor] = None,
        layers: Iterable[str] = (INPUT,),
        rule: Optional[str] = None,
        chunk_size: Optional[int] = None,
    ) -> PassResult:
        """The pass for ``(probe_key, target, rule)`` covering at least ``layers`` (:data:`INPUT`: the input
        gradient; no layer at all means the same), computed once per model state over the union of every
        registered consumer's needs. The input gradient is computed only when some consumer of that
        ``(target, rule)`` listed :data:`INPUT` or the rule is guided/deconv (a pass without it is recomputed,
        with it, if a later unregistered consumer asks for it)."""
        version = (weakref.ref(model),) + model_version(model)  # another model (e.g. a copy) never shares entries
        if version != self.version:
            self.entries.clear()
            self.version = version
        layers = list(layers) or [INPUT]
        tkey = target_key(target)
        key = (probe_key, tkey, rule, str(x.device), x.dtype)
        hit = self.entries.get(key)
        if hit is not None and all(
            (hit.input_grad is not None) if n == INPUT else n in hit.activations for n in layers
        ):
            return hit
        wanted = self.needs.get((tkey, rule), set()) | set(layers) | (set(hit.activations) if hit else set())
        input_grad = INPUT in wanted or rule is not None or (hit is not None and hit.input_grad is not None)
        names = sorted(wanted - {INPUT})
        result = gradient_pass(model, x, target, labels, names, rule, chunk_size, input_grad=input_grad)
        self.forwards += len(pass_chunks(model, x, chunk_size))
        self.entries[key] = result
        return result

    def clear(self) -> None:
        self.entries.clear()
        self.version = None

    def __getstate__(self) -> dict[str, Any]:
        # passes belong to one live model (held by a weak reference): only the registered needs travel
        return {**self.__dict__, "entries": {}, "version": None}


_CACHES: weakref.WeakKeyDictionary[nn.Module, PassCache] = weakref.WeakKeyDictionary()


def pass_cache(model: nn.Module) -> PassCache:
    """The :class:`PassCache` of ``model`` (created on first use, freed with the model)."""
    cache = _CACHES.get(model)
    if cache is None:
        cache = _CACHES[model] = PassCache()
    return cache
