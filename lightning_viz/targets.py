"""What an explanation explains: a scalar score per sample, computed from the logits.

A :class:`Target` maps ``(logits[B, K], labels[B])`` to ``score[B]`` and, when the score is one
class's logit, also says which class (``classes``), which CAM needs to pick its weights.

Spelled in configs as ``"label"`` (true label, the default), ``"predicted"``, an ``int`` class
index, or a Python callable ``logits -> score[B]``.
"""

from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

__all__ = ["Target", "LabelTarget", "PredictedTarget", "ClassTarget", "CallableTarget", "resolve_target", "TargetSpec"]


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
            raise ValueError("target='label' needs labels; the probe set has none. Use target='predicted' or a class index.")
        return labels.to(logits.device).long()


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
            raise ValueError(f"target class index must be >= 0; got {self.index} (allowed: 'label', 'predicted', or a class index 0..K-1)")
        self.name = f"class{self.index}"

    def classes(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        if not 0 <= self.index < logits.shape[1]:
            raise ValueError(f"target class {self.index} is out of range: the model has {logits.shape[1]} classes (0..{logits.shape[1] - 1}).")
        return torch.full((logits.shape[0],), self.index, dtype=torch.long, device=logits.device)

    def __repr__(self) -> str:
        return f"ClassTarget({self.index})"


class CallableTarget(Target):
    """Any ``fn(logits) -> score[B]`` (e.g. a margin, a sum of classes, a probability)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str | None = None):
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "custom")

    def score(self, logits: Tensor, labels: Tensor | None) -> Tensor:
        out = self.fn(logits)
        if out.shape != (logits.shape[0],):
            raise ValueError(f"custom target must return one score per sample, shape ({logits.shape[0]},); got {tuple(out.shape)}")
        return out


TargetSpec = Union[str, int, Target, Callable[[Tensor], Tensor]]


def resolve_target(spec: TargetSpec) -> Target:
    """Turn ``"label" | "predicted" | int | Target | callable`` into a :class:`Target`."""
    if isinstance(spec, Target):
        return spec
    if isinstance(spec, bool):
        raise ValueError(f"invalid target {spec!r}")
    if isinstance(spec, int):
        return ClassTarget(spec)
    if isinstance(spec, str):
        if spec == "label":
            return LabelTarget()
        if spec == "predicted":
            return PredictedTarget()
        if spec.lstrip("-").isdigit():
            return ClassTarget(int(spec))
        raise ValueError(f"unknown target {spec!r}; allowed: 'label', 'predicted', a class index (int), or a callable logits -> score[B]")
    if callable(spec):
        return CallableTarget(spec)
    raise ValueError(f"invalid target {spec!r}; allowed: 'label', 'predicted', a class index (int), or a callable logits -> score[B]")
