"""What an explanation explains: a scalar score per sample, computed from the logits.

A :class:`Target` maps ``(logits[B, K], labels[B])`` to ``score[B]`` and, when the score is one
class's logit, also says which class (``classes``), which CAM needs to pick its weights.

Spelled in configs as ``"label"`` (true label, the default), ``"predicted"``, an ``int`` class
index, or a Python callable ``logits -> score[B]``.

The model adapter (:class:`ModelAdapter`, option ``logits_fn`` of every callback) says how to call the
model and read logits ``[B, K]`` from what it returns: by default a tensor is the logits, and a mapping
or object with a ``logits`` entry/attribute (Hugging Face / timm conventions) is read; anything else
needs ``logits_fn``, a callable ``(model, x) -> logits`` or its dotted import path (usable from YAML).
"""

from __future__ import annotations

import dataclasses
import importlib
import numbers
import operator
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Optional, Union, cast

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "Target",
    "LabelTarget",
    "PredictedTarget",
    "ClassTarget",
    "CallableTarget",
    "resolve_target",
    "TargetSpec",
    "LogitsFn",
    "ModelOutputError",
    "ModelAdapter",
    "model_adapter",
    "choose_memory_format",
    "resolve_logits_fn",
    "read_logits",
    "binary_logits",
    "as_logits",
    "check_labels",
    "invalid_classes",
    "describe_output",
    "logits_fn_example",
    "PROBABILITIES",
    "Probabilities",
    "check_probabilities",
    "class_probabilities",
    "class_probability",
]


class Target:
    """Base class: ``score(logits, labels) -> Tensor[B]``; ``classes`` gives the class per sample or ``None``."""

    name: str = "target"

    def classes(self, logits: Tensor, labels: Tensor | None) -> Tensor | None:
        return None

    def score(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        cls = self.classes(logits, labels)
        if cls is None:
            raise NotImplementedError
        return logits.gather(1, cls.to(logits.device).long().view(-1, 1)).squeeze(1)

    def __call__(self, logits: Tensor, labels: Tensor | None = None) -> Tensor:
        return self.score(logits, labels)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class LabelTarget(Target):
    """Logit of the true label (needs labels)."""

    name = "label"

    def classes(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        if labels is None:
            raise ValueError(
                "target='label' needs labels; the probe set has none. Use target='predicted' or a class index."
            )
        check_labels(labels, logits.shape[1])
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"target='label' needs one label per image: got {labels.shape[0]} labels for {logits.shape[0]} images"
            )
        return labels.to(logits.device).long()


#: what a pure method given a raw one-logit model says (the callbacks wrap the model themselves)
_ONE_LOGIT_HINT = (
    "; a one-logit binary head is read as classes 0 and 1 through lightning_viz.targets.model_adapter(model)"
)


def check_labels(labels: Tensor, num_classes: int) -> None:
    """Labels usable as class indices of logits ``[B, num_classes]``: one whole number per sample in
    ``0..num_classes-1`` (``float`` 0./1. labels of a binary classifier are fine); else a clear error."""
    if labels.ndim != 1:
        raise ValueError(
            f"target='label' needs one class index per sample, but the labels have shape {tuple(labels.shape)} "
            "(multi-hot / multi-label or dense targets); use target='predicted', a class index, or a callable "
            "logits -> score[B]"
        )
    bad = invalid_classes(labels, num_classes)
    if bad.numel():
        one_logit = "; a one-logit binary classifier reads as classes 0 and 1" if num_classes == 2 else ""
        one_logit = _ONE_LOGIT_HINT if num_classes == 1 else one_logit
        whole = bool((bad.double() == bad.double().round()).all())
        why = (
            "-1 marking unlabeled images, an ignore_index such as 255, or counts?" if whole else "a regression target?"
        )
        raise ValueError(
            f"target='label' needs class indices 0..{num_classes - 1} (the model has {num_classes} classes"
            f"{one_logit}), but the labels include {bad[:5].tolist()} ({why}); use "
            "target='predicted', a class index 0..K-1, or a callable logits -> score[B]"
        )


def invalid_classes(values: Tensor, num_classes: Optional[int] = None) -> Tensor:
    """The entries of ``values`` that are no class index ``0..num_classes-1`` (``None``: any ``>= 0``): fractions,
    negatives, too large ones (bool, integer and float values; ``1.0`` is class 1)."""
    v = values.double()
    bad = (v != v.round()) | (v < 0)
    if num_classes is not None:
        bad |= v >= num_classes
    return values[bad] if values.numel() else values


class PredictedTarget(Target):
    """Logit of the predicted (arg-max) class."""

    name = "predicted"

    def classes(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        return logits.detach().argmax(dim=1)


class ClassTarget(Target):
    """Logit of one fixed class index for every sample."""

    def __init__(self, index: int):
        self.index = int(index)
        if self.index < 0:
            raise ValueError(
                f"target class index must be >= 0; got {self.index} "
                "(allowed: 'label', 'predicted', or a class index 0..K-1)"
            )
        self.name = f"class{self.index}"

    def classes(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        if not 0 <= self.index < logits.shape[1]:
            raise ValueError(
                f"target class {self.index} is out of range: the model has {logits.shape[1]} classes "
                f"(0..{logits.shape[1] - 1}){_ONE_LOGIT_HINT if logits.shape[1] == 1 else ''}."
            )
        return torch.full((logits.shape[0],), self.index, dtype=torch.long, device=logits.device)

    def __repr__(self) -> str:
        return f"ClassTarget({self.index})"


class CallableTarget(Target):
    """Any ``fn(logits) -> score[B]`` (e.g. a margin, a sum of classes, a probability)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str | None = None):
        self.fn = fn
        self.name = name or cast(str, getattr(fn, "__name__", "custom"))

    def score(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        out = self.fn(logits)
        if out.shape != (logits.shape[0],):
            raise ValueError(
                f"custom target must return one score per sample, shape ({logits.shape[0]},); got {tuple(out.shape)}"
            )
        return out


TargetSpec = Union[str, int, Target, Callable[[Tensor], Tensor]]


def resolve_target(spec: TargetSpec) -> Target:
    """Turn ``"label" | "predicted" | int | Target | callable`` into a :class:`Target`."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, (bool, np.bool_)):
        raise ValueError(
            f"invalid target {spec!r}; allowed: 'label', 'predicted', a class index (int), or a callable logits -> "
            "score[B]"
        )
    if isinstance(spec, int):
        return ClassTarget(spec)
    if _is_class_index(spec):  # a numpy integer, a 0-d integer tensor (e.g. labels[0], logits.argmax())
        return ClassTarget(operator.index(spec))  # type: ignore[arg-type]
    if isinstance(spec, str):
        if spec == "label":
            return LabelTarget()
        if spec == "predicted":
            return PredictedTarget()
        if spec.lstrip("-").isdigit():
            return ClassTarget(int(spec))
        raise ValueError(
            f"unknown target {spec!r}; allowed: 'label', 'predicted', a class index (int), "
            "or a callable logits -> score[B] (a class is named by its index, not by its name)"
        )
    if callable(spec):
        return CallableTarget(spec)
    per_image = (
        " (one class per image: pass them as labels with target='label')"
        if isinstance(spec, (list, tuple)) or getattr(spec, "ndim", 0) == 1
        else ""
    )
    raise ValueError(
        f"invalid target {spec!r}; allowed: 'label', 'predicted', a class index (int), or a callable logits -> score[B]"
        + per_image
    )


def _is_class_index(spec: object) -> bool:
    """An integer scalar that is no ``bool``: a numpy integer or a 0-d integer tensor."""
    if isinstance(spec, Tensor):
        return spec.ndim == 0 and not spec.is_floating_point() and not spec.is_complex() and spec.dtype != torch.bool
    return isinstance(spec, numbers.Integral) and not isinstance(spec, bool)


# ---------------------------------------------------------------------------------------------- model adapter
LogitsFn = Union[str, Callable[[nn.Module, Tensor], Tensor]]
_LOGITS_HINT = (
    "set logits_fn=<a callable (model, x) -> logits[B, K]> (Python, e.g. "
    "logits_fn=lambda model, x: model(x)[0]), or in YAML logits_fn: my_package.my_module.my_logits_fn "
    "(the dotted import path of such a function)"
)


class ModelOutputError(ValueError):
    """The model's output could not be read as logits ``[B, K]`` (or the model could not be called as ``model(x)``)."""


def describe_output(out: Any) -> str:
    """A short description of a model output: type plus keys / length / fields / shape."""
    name = type(out).__name__
    if isinstance(out, Tensor):
        return f"a Tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"a {name} with keys {list(out.keys())[:20]}"
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return f"a dataclass {name} with fields {[f.name for f in dataclasses.fields(out)]}"
    if isinstance(out, (tuple, list)):
        parts = ", ".join(describe_output(o) if isinstance(o, Tensor) else type(o).__name__ for o in out[:6])
        return f"a {name} of length {len(out)} ({parts}{', ...' if len(out) > 6 else ''})"
    return f"a {name}"


def read_logits(out: Any) -> Tensor:
    """Logits from a model output: a tensor as is; a mapping's ``"logits"`` entry; an object's ``logits`` attribute."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    if isinstance(getattr(out, "logits", None), Tensor):
        return out.logits
    raise ModelOutputError(
        f"the model returned {describe_output(out)}, which has no logits tensor (not a Tensor, "
        f"and no 'logits' entry or attribute); {_LOGITS_HINT}.{logits_fn_example(out)}"
    )


def logits_fn_example(out: Any) -> str:
    """A ``logits_fn`` that would read the first tensor of model output ``out`` (a mapping's entry, a sequence's
    item, a dataclass's field), averaged over the pixels when it is a dense ``[B, K, H, W]`` map (a segmentation
    head: the class's mean score over the image); ``""`` when there is none."""
    where, t = "", out
    if isinstance(out, Mapping):
        key = next((k for k, v in out.items() if isinstance(v, Tensor)), None)
        where, t = ("", None) if key is None else (f"[{key!r}]", out[key])
    elif isinstance(out, (tuple, list)):
        i = next((i for i, v in enumerate(out) if isinstance(v, Tensor)), None)
        where, t = ("", None) if i is None else (f"[{i}]", out[i])
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        name = next((f.name for f in dataclasses.fields(out) if isinstance(getattr(out, f.name), Tensor)), None)
        where, t = ("", None) if name is None else (f".{name}", getattr(out, name))
    if not isinstance(t, Tensor):
        return ""
    if t.ndim == 4:
        return (
            f" Its {where or 'output'} is a dense map {tuple(t.shape)} (a segmentation head): e.g. "
            f"logits_fn=lambda model, x: model(x){where}.mean(dim=(2, 3)) explains each class's mean score over "
            "the image."
        )
    return f" Here perhaps: logits_fn=lambda model, x: model(x){where}." if where else ""


def binary_logits(logits: Tensor) -> Tensor:
    """A one-logit binary classifier's output ``[B, 1]`` (``z``, the log-odds of the positive class, trained with
    ``BCEWithLogitsLoss``) as two-class logits ``[B, 2] = (-z/2, z/2)``: their softmax is ``(1 - sigmoid(z),
    sigmoid(z))``, their arg-max is ``z > 0``, and class 1's logit minus class 0's is ``z`` (the logistic model is
    the two-class softmax model with these logits). So class 1 is the positive class, class 0 the negative one
    (its score ``-z/2``: the evidence against), and targets, probabilities and accuracies mean what they mean for
    any classifier. Any other shape is returned as it is."""
    if logits.ndim == 2 and logits.shape[1] == 1:
        half = 0.5 * logits
        return torch.cat([-half, half], dim=1)
    return logits


#: How logits ``[B, K]`` become class probabilities: ``"softmax"`` (one class per image, the default) or
#: ``"sigmoid"`` (multi-label heads trained with ``BCEWithLogitsLoss``: ``sigmoid(z_c)`` per class, independent).
PROBABILITIES = ("softmax", "sigmoid")
Probabilities = str  # one of PROBABILITIES


def check_probabilities(probabilities: Any, where: str = "probabilities") -> None:
    """Fail with the allowed values unless ``probabilities`` is one of :data:`PROBABILITIES`."""
    if probabilities not in PROBABILITIES:
        raise ValueError(f"{where} must be 'softmax' or 'sigmoid' (multi-label heads); got {probabilities!r}")


def class_probabilities(logits: Tensor, probabilities: Probabilities = "softmax") -> Tensor:
    """Class probabilities ``[B, K]`` of logits ``[B, K]``: their softmax over classes, or with ``"sigmoid"``
    each class's own ``sigmoid(z_c)`` (multi-label: independent per class, not summing to 1)."""
    check_probabilities(probabilities)
    if probabilities == "softmax" and logits.ndim == 2 and logits.shape[1] == 1:
        raise ValueError(
            "the model returns one logit [B, 1], whose softmax is 1 whatever the input (flat curves, no "
            "probability drop, equal Score-CAM weights); a one-logit binary head is read as classes 0 and 1 "
            "(softmax = sigmoid(z)) through lightning_viz.targets.model_adapter(model), or pass "
            "probabilities='sigmoid'"
        )
    return logits.softmax(dim=1) if probabilities == "softmax" else logits.sigmoid()


def class_probability(logits: Tensor, classes: Tensor, probabilities: Probabilities = "softmax") -> Tensor:
    """``[B]``: row b's probability of class ``classes[b]`` (:func:`class_probabilities` of ``logits [B, K]``)."""
    return class_probabilities(logits, probabilities).gather(1, classes.reshape(-1, 1)).squeeze(1)


def as_logits(logits: Tensor, batch: int) -> Tensor:
    """Logits ``[B, K]`` as the methods read them: a one-logit output squeezed to ``[B]`` (``model(x).squeeze(1)``,
    or ``[]`` for one image after ``.squeeze()``) as ``[B, 1]``, then a one-logit output as two classes
    (:func:`binary_logits`); other shapes as they are."""
    if (logits.ndim == 1 and logits.shape[0] == batch) or (logits.ndim == 0 and batch == 1):
        logits = logits.reshape(batch, 1)
    return binary_logits(logits)


def resolve_logits_fn(spec: Optional[LogitsFn]) -> Optional[Callable[[nn.Module, Tensor], Any]]:
    """``None``, a callable, or the dotted import path ``"package.module.function"`` of a callable."""
    if spec is None or callable(spec):
        return spec
    if not isinstance(spec, str) or "." not in spec.strip("."):
        raise ValueError(
            f"logits_fn must be a callable (model, x) -> logits[B, K] or the dotted import path of one "
            f"('package.module.function'); got {spec!r}"
        )
    module_name, _, attr = spec.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(
            f"logits_fn={spec!r} cannot be imported ({type(exc).__name__}: {exc}); give the dotted path "
            "of a function (model, x) -> logits[B, K] importable from the training script"
        ) from None
    if not callable(fn):
        raise ValueError(f"logits_fn={spec!r} is a {type(fn).__name__}, not a callable (model, x) -> logits[B, K]")
    return fn


class ModelAdapter(nn.Module):
    """Calls ``module`` on a batch ``x`` the way the user said and returns logits ``[B, K]``.

    ``forward(x)`` is ``logits_fn(module, x)`` (or ``module(x)``), then, with ``logits=True``, the logits read off
    the output (:func:`read_logits`; one logit ``[B, 1]`` or ``[B]`` as two classes, :func:`as_logits`); with
    ``logits=False`` the raw output (for methods that only hook layers).
    The wrapped module is a registered child, so its parameters, buffers and hooks are the adapter's; layer
    names are unchanged (:func:`lightning_viz.layers.unwrap_model` sees through the adapter).

    ``memory_format`` (set by :func:`choose_memory_format`, else ``None``: inputs as given): the layout 4-D CPU
    inputs are given to the model in. The values are the same; only the strides (and so the kernels) change.
    """

    memory_format: Optional[torch.memory_format] = None
    layout_checked = False

    def __init__(
        self, module: nn.Module, logits_fn: Optional[Callable[[nn.Module, Tensor], Any]] = None, logits: bool = True
    ):
        super().__init__()
        self.module = module
        self.logits_fn = logits_fn
        self.logits = logits

    @property
    def device(self) -> torch.device:
        """Device of the first parameter (as :func:`lightning_viz.layers.module_device`)."""
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the first floating-point parameter (as :func:`lightning_viz.layers.module_dtype`)."""
        p = next((p for p in self.parameters() if p.is_floating_point()), None)
        return p.dtype if p is not None else torch.float32

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:
                raise
            return getattr(inner, name)  # anything else reads as the wrapped model's (trainer, hparams, ...)

    def call(self, x: Tensor) -> Any:
        """The raw model call (``logits_fn(module, x)`` or ``module(x)``), 4-D CPU inputs in ``memory_format``."""
        if self.memory_format is not None and x.dim() == 4 and x.device.type == "cpu":
            x = x.contiguous(memory_format=self.memory_format)
        return self.module(x) if self.logits_fn is None else self.logits_fn(self.module, x)

    def forward(self, x: Tensor) -> Any:
        out = self.call(x)
        return as_logits(read_logits(out), x.shape[0]) if self.logits else out


def _tensors(out: Any) -> list[Tensor]:
    """The tensors in a model output (a tensor, or mappings / lists / tuples / dataclasses of them)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    if dataclasses.is_dataclass(out) and not isinstance(out, type):
        return [t for f in dataclasses.fields(out) for t in _tensors(getattr(out, f.name))]
    return []


def choose_memory_format(adapter: ModelAdapter, x: Tensor, reference: Any) -> None:
    """Have ``adapter`` call its model in channels_last (NHWC strides) on the CPU when that gives the same output.

    On the CPU, convolution and max-pooling kernels run several times faster on channels_last inputs than on
    NCHW ones at the batch sizes the methods use (e.g. a 64-image 16->32-channel 3x3 convolution ~3.5x), while
    training keeps its own layout. Checked once per adapter on ``x`` (one data item, the model in eval mode,
    no grad) against ``reference``, the model's NCHW output for it: a model that raises on the other layout
    (``x.view`` of a feature map) or gives outputs of other shapes or values beyond rounding (``rtol=1e-4``)
    keeps NCHW. GPU inputs keep their layout."""
    if adapter.layout_checked:
        return
    adapter.layout_checked = True
    if x.dim() != 4 or x.device.type != "cpu":
        return
    ref = [t.detach() for t in _tensors(reference)]  # a setup forward with grad: compared as values
    if not ref or any(not t.is_floating_point() for t in ref):
        return
    xc = x.contiguous(memory_format=torch.channels_last)
    try:
        with torch.no_grad():
            out = _tensors(adapter.call(xc))  # memory_format is still None: the call as configured, nothing converted
    except Exception:  # the model cannot take this layout: it gets its inputs as given
        return
    same = len(out) == len(ref) and all(
        o.shape == r.shape
        and o.dtype == r.dtype
        and bool(torch.isfinite(r).all())
        and torch.allclose(o, r, rtol=1e-4, atol=1e-5 * float(r.abs().max().clamp_min(1.0)))
        for o, r in zip(out, ref)
    )
    if same:
        adapter.memory_format = torch.channels_last


_ADAPTERS: weakref.WeakValueDictionary[tuple, ModelAdapter] = weakref.WeakValueDictionary()


def model_adapter(model: nn.Module, logits_fn: Optional[LogitsFn] = None, logits: bool = True) -> ModelAdapter:
    """The :class:`ModelAdapter` of ``(model, logits_fn, logits)``: one object while any holder keeps it (so every
    callback with the same adapter shares one gradient-pass cache); ``model`` itself if it already is an adapter."""
    if isinstance(model, ModelAdapter):
        return model
    fn = resolve_logits_fn(logits_fn)
    key = (id(model), fn, logits)  # the adapter holds the model: its id cannot be reused while the entry lives
    adapter = _ADAPTERS.get(key)
    if adapter is None or adapter.module is not model:
        adapter = ModelAdapter(model, fn, logits)
        _ADAPTERS[key] = adapter
    return adapter
