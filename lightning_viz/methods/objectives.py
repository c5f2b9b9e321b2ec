"""Objectives for input optimization: small callables ``(logits, activations) -> score[B]`` to maximize.

Each image in the batch has its own target (one class / one channel per image), so a whole set of
class-model or unit images is optimized in one batched run. Objectives compose like in lucid:
``class_logit([0, 1]) + 0.1 * channel("conv2", [3, 3])`` is again an objective (sum, weight, negate).

``activations`` maps layer names to their outputs in the same forward pass (see
:func:`lightning_viz.capture.capture`); an objective lists the layers it needs in ``layers``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .checks import check_logits

__all__ = ["Objective", "class_logit", "channel", "neuron", "feature_match", "per_image"]

ScoreFn = Callable[[Tensor, Mapping[str, Tensor], Tensor], Tensor]
#: ``(logits, activations, rows, seed) -> [(tensor, gradient), ...]`` (see :meth:`Objective.backward_seeds`)
SeedFn = Callable[[Tensor, Mapping[str, Tensor], Tensor, Tensor], "list[tuple[Tensor, Tensor]] | None"]


def as_index(values: int | Sequence[int] | Tensor) -> Tensor:
    """Indices as a 1-D long tensor (an int gives one index, used for every image)."""
    return torch.as_tensor(values, dtype=torch.long).view(-1)


def per_image(values: Tensor, rows: Tensor, batch: int) -> Tensor:
    """The entries of per-image ``values`` for the images ``rows`` of the current (chunk of the) batch;
    a single value is broadcast to every image."""
    if values.shape[0] == 1:
        return values.expand(batch, *values.shape[1:])
    if int(rows.max()) >= values.shape[0]:
        raise ValueError(
            f"the objective has {values.shape[0]} per-image targets but is used on image {int(rows.max())}"
        )
    return values[rows.to(values.device)]


class _PerChunk:
    """A value computed once per chunk: the optimization passes the same ``rows`` tensor at every step, so
    per-image targets are picked and checked once, not at every step. ``get`` recomputes for other ``rows``
    (another object) or another ``key`` (shapes, device)."""

    def __init__(self) -> None:
        self.rows: Tensor | None = None
        self.key: tuple = ()
        self.value: Any = None

    def get(self, rows: Tensor, key: tuple, make: Callable[[], Any]) -> Any:
        if rows is not self.rows or key != self.key:
            self.value = make()
            self.rows, self.key = rows, key
        return self.value


class Objective:
    """A score ``fn(logits[B, K], activations, rows) -> Tensor[B]`` to maximize, one value per image.

    ``rows`` are the indices of the current images in the whole optimized batch (the batch may be run
    in chunks); objectives with per-image targets pick theirs with :func:`per_image`.
    ``layers`` are the layer names whose outputs ``fn`` reads. ``uses_logits=False`` says ``fn`` never reads
    ``logits`` (only activations): the forward pass may then stop after the last of ``layers`` (``fn`` gets an
    empty ``[B, 0]`` tensor as logits when it did). ``a + b``, ``w * a``, ``a - b`` and ``-a`` build new objectives
    (weights are plain floats), so ``sum([...])`` also works.

    ``linear=True`` says ``fn`` is linear in what it reads (a logit, a channel's mean, a unit: its gradient does not
    depend on their values), ``seeds`` gives the gradient in closed form (see :meth:`backward_seeds`); with either, an
    optimization step starts its backward at the tensors ``fn`` reads without running ``fn``.
    """

    def __init__(
        self,
        fn: ScoreFn,
        layers: Sequence[str] = (),
        name: str = "objective",
        uses_logits: bool = True,
        linear: bool = False,
        seeds: SeedFn | None = None,
    ):
        self.fn = fn
        self.layers = tuple(dict.fromkeys(layers))
        self.name = name
        self.uses_logits = bool(uses_logits)
        self.linear = bool(linear)
        self.seeds = seeds
        self._grads = _PerChunk()  # a linear objective's gradient, per chunk

    def __call__(
        self, logits: Tensor, activations: Mapping[str, Tensor] | None = None, rows: Tensor | None = None
    ) -> Tensor:
        if self.uses_logits:
            check_logits(f"objective {self.name!r}", logits, None)  # a dict or [B] output: a clear error
        if rows is None:
            rows = torch.arange(logits.shape[0])
        out = self.fn(logits, activations or {}, rows)
        if out.ndim != 1 or out.shape[0] != logits.shape[0]:
            raise ValueError(
                f"objective {self.name!r} must return one score per image, shape ({logits.shape[0]},); "
                f"got {tuple(out.shape)}"
            )
        return out

    def backward_seeds(
        self, logits: Tensor, activations: Mapping[str, Tensor], rows: Tensor, seed: Tensor
    ) -> list[tuple[Tensor, Tensor]] | None:
        """The tensors ``fn`` reads (``logits``, ``activations[name]``), each with ``d (seed * sum_b score_b) / d``
        tensor -- the values the backward through ``fn`` would give them, bit for bit -- without running ``fn``
        (``seed``: a 0-dim tensor, the loss's derivative w.r.t. the summed score; the same object every step).
        ``None`` when the objective has neither ``seeds`` nor ``linear``: differentiate its score then.

        A linear objective's gradient does not depend on the values it reads: it is taken once per chunk (``rows``,
        shapes), by autograd through ``self`` on stand-in leaves, and reused; a gather's, an index's and a mean's
        backward do not read their input."""
        if self.seeds is not None:
            return self.seeds(logits, activations, rows, seed)
        if not self.linear:
            return None
        read = ([logits] if self.uses_logits else []) + [_layer_output(activations, n) for n in self.layers]
        key = (seed, *((t.shape, t.dtype, t.device) for t in read))

        def gradients() -> list[Tensor | None]:
            leaves = [t.detach().requires_grad_(True) for t in read]
            acts = dict(activations)
            acts.update(zip(self.layers, leaves[1:] if self.uses_logits else leaves))
            with torch.enable_grad():
                score = self(leaves[0] if self.uses_logits else logits, acts, rows).sum()
            if not score.requires_grad:  # reads none of them: the loop's own check says so
                return [None] * len(leaves)
            return list(torch.autograd.grad(score, leaves, seed, allow_unused=True))

        # a tensor the score does not depend on gets no gradient (as in autograd's backward); none at all: no seeds
        pairs = [(t, g) for t, g in zip(read, self._grads.get(rows, key, gradients)) if g is not None]
        return pairs or None

    def __add__(self, other: Objective | float) -> Objective:
        if isinstance(other, (int, float)):
            if other == 0:  # sum([...]) starts from 0
                return self
            return NotImplemented
        return Objective(
            lambda lg, acts, rows: self(lg, acts, rows) + other(lg, acts, rows),
            self.layers + other.layers,
            f"{self.name} + {other.name}",
            self.uses_logits or other.uses_logits,
            linear=self.linear and other.linear,
        )

    __radd__ = __add__

    def __mul__(self, weight: float) -> Objective:
        if not isinstance(weight, (int, float)):
            return NotImplemented
        w = float(weight)
        return Objective(
            lambda lg, acts, rows: w * self(lg, acts, rows),
            self.layers,
            f"{w:g} * {self.name}",
            self.uses_logits,
            linear=self.linear,
        )

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return -1.0 * self

    def __sub__(self, other: Objective) -> Objective:
        return self + (-other)

    def __repr__(self) -> str:
        return f"Objective({self.name})"


def class_logit(classes: int | Sequence[int] | Tensor) -> Objective:
    """Unnormalized class score S_c(I) of class ``classes[b]`` for image ``b`` (Simonyan et al. 2014:
    the logit, not the softmax, so the image cannot win by suppressing the other classes)."""
    idx = as_index(classes)
    memo = _PerChunk()

    def pick(logits: Tensor, rows: Tensor) -> Tensor:
        cls = per_image(idx, rows, logits.shape[0]).to(logits.device)
        if int(cls.max()) >= logits.shape[1] or int(cls.min()) < 0:
            raise ValueError(
                f"class index out of range: the model has {logits.shape[1]} classes "
                f"(0..{logits.shape[1] - 1}); got {cls.tolist()}"
            )
        return cls.view(-1, 1)

    def fn(logits: Tensor, acts: Mapping[str, Tensor], rows: Tensor) -> Tensor:
        cls = memo.get(rows, (*logits.shape, logits.device), lambda: pick(logits, rows))
        return logits.gather(1, cls).squeeze(1)

    return Objective(fn, (), f"class_logit{idx.tolist()}", linear=True)


def _layer_output(acts: Mapping[str, Tensor], layer: str) -> Tensor:
    if layer not in acts:
        raise KeyError(f"layer {layer!r} was not captured in the forward pass; captured: {sorted(acts)}")
    return acts[layer]


def _selected_channels(acts: Mapping[str, Tensor], layer: str, idx: Tensor, rows: Tensor, memo: _PerChunk) -> Tensor:
    """Channel ``idx[b]`` of ``layer``'s output for each image ``b`` of the (chunk of the) batch:
    ``[B, h, w]`` (or ``[B]`` for a linear layer); clear error for a channel out of range."""
    a = _layer_output(acts, layer)

    def pick() -> tuple[Tensor, Tensor]:
        ch = per_image(idx, rows, a.shape[0]).to(a.device)
        if int(ch.max()) >= a.shape[1] or int(ch.min()) < 0:
            raise ValueError(
                f"channel out of range for layer {layer!r}: it has {a.shape[1]} channels "
                f"(0..{a.shape[1] - 1}); got {ch.tolist()}"
            )
        return torch.arange(a.shape[0], device=a.device), ch

    return a[memo.get(rows, (*a.shape[:2], a.device), pick)]


def channel(layer: str, channels: int | Sequence[int] | Tensor) -> Objective:
    """Mean activation of channel ``channels[b]`` of ``layer`` over all positions, for image ``b``
    (activation maximization, Erhan et al. 2009: x* = argmax_x h_ij(theta, x))."""
    idx = as_index(channels)
    memo = _PerChunk()

    def fn(logits: Tensor, acts: Mapping[str, Tensor], rows: Tensor) -> Tensor:
        sel = _selected_channels(acts, layer, idx, rows, memo)
        return sel.flatten(1).mean(1) if sel.ndim > 1 else sel

    return Objective(fn, (layer,), f"channel({layer}, {idx.tolist()})", uses_logits=False, linear=True)


def neuron(layer: str, channels: int | Sequence[int] | Tensor, y: int | None = None, x: int | None = None) -> Objective:
    """One unit: channel ``channels[b]`` of ``layer`` at position ``(y, x)`` (default: the center) for image ``b``
    (Erhan et al. 2009; Yosinski et al. 2015 optimize single units the same way)."""
    idx = as_index(channels)
    memo = _PerChunk()

    def fn(logits: Tensor, acts: Mapping[str, Tensor], rows: Tensor) -> Tensor:
        sel = _selected_channels(acts, layer, idx, rows, memo)
        if sel.ndim == 1:
            return sel
        h, w = sel.shape[-2:]
        return sel[:, h // 2 if y is None else y, w // 2 if x is None else x]

    return Objective(fn, (layer,), f"neuron({layer}, {idx.tolist()})", uses_logits=False, linear=True)


def feature_match(layer: str, target: Tensor) -> Objective:
    """Negative normalized reconstruction loss ``-||phi(x) - phi0||^2 / ||phi0||^2`` at ``layer``
    (feature inversion, Mahendran & Vedaldi 2015: their objective with the normalized Euclidean loss)."""
    phi0 = target.detach()
    memo, coef = _PerChunk(), _PerChunk()

    def targets(a: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        t = per_image(phi0, rows, a.shape[0]).to(a.device, a.dtype)  # a: float32 at least (below)
        if t.shape != a.shape:
            raise ValueError(
                f"feature_match target has shape {tuple(t.shape)} but layer {layer!r} gives {tuple(a.shape)}"
            )
        return t, t.flatten(1).pow(2).sum(1).clamp_min(1e-12)

    def fn(logits: Tensor, acts: Mapping[str, Tensor], rows: Tensor) -> Tensor:
        a = _layer_output(acts, layer)
        if a.dtype in (torch.float16, torch.bfloat16):  # sums of squares overflow float16 (max 65504)
            a = a.float()
        t, norm = memo.get(rows, (*a.shape, a.device, a.dtype), lambda: targets(a, rows))
        return -(a - t).flatten(1).pow(2).sum(1) / norm

    def seeds(
        logits: Tensor, acts: Mapping[str, Tensor], rows: Tensor, seed: Tensor
    ) -> list[tuple[Tensor, Tensor]] | None:
        """``d (seed * sum_b fn_b) / d a = 2 c_b (a - t)`` with ``c_b = -(seed / norm_b)`` (rounded as ``fn``'s backward
        rounds it: the quotient, then the negation), made once per chunk: its backward's ``c_b * (2 (a - t))`` is the
        same number (doubling is exact), in two kernels instead of seven."""
        a = _layer_output(acts, layer)
        if a.dtype in (torch.float16, torch.bfloat16):  # fn squares a float32 copy
            return None
        t, norm = memo.get(rows, (*a.shape, a.device, a.dtype), lambda: targets(a, rows))
        c2 = coef.get(
            rows, (seed, *a.shape, a.device, a.dtype), lambda: 2 * -(seed / norm).view(-1, *[1] * (a.ndim - 1))
        )
        return [(a, torch.sub(a.detach(), t).mul_(c2))]

    return Objective(fn, (layer,), f"feature_match({layer})", uses_logits=False, seeds=seeds)
