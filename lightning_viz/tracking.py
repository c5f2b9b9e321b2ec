"""MapTracker: how a callback's heatmaps evolve over training, attached to any ``MapCallback(tracker=...)``.

Per scheduled epoch and per map key (``"<method>/<layer>"``) it logs, in the callback's group
``viz-<family>`` (``<family>`` = the callback's ``method``, e.g. ``cam``):

* filmstrips ``viz-<family>/filmstrip/<probe-id>``: one image per probe, one row per map key, the probe's
  overlay at every epoch so far side by side with the epoch under each frame (downsampled frames; at
  most ``max_frames``, always the first and the latest);
* drift ``viz-<family>/<key>/drift/{rank_corr,topk_iou}``: Spearman correlation and top-k% IoU with the maps
  of the previous run, and ``viz-<family>/drift/prediction_flips`` (share of probes whose predicted
  class changed) plus ``viz-<family>/probe_accuracy``;
* faithfulness ``viz-<family>/<key>/faithfulness/{deletion_auc,insertion_auc}`` (Petsiuk et al. 2018);
* localization ``viz-<family>/<key>/localization/{pointing_game,energy_in_mask}`` on probes with masks;
* sanity ``viz-<family>/<key>/sanity/rank_corr``: similarity of the maps to those of a randomly re-initialized
  copy of the model (Adebayo et al. 2018, model parameter randomization; high = the map ignores the model); for
  signed maps also ``sanity/rank_corr_abs``, of their absolute values (Adebayo et al. report both);
* once, a TensorBoard custom-scalars layout grouping all of these charts.

:meth:`MapTracker.compute` runs on every rank on its probe shard (no collectives); :meth:`MapTracker.log`
runs on rank 0 with the gathered results and keeps the history (saved in checkpoints).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import math
import re
import types
from collections.abc import Iterable
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from .capture import fork_rng
from .layers import module_device, module_dtype
from .logging import VizLogger, indexed, make_tag
from .methods.checks import check_chunk_size
from .methods.metrics import (
    average_ranks,
    curve_auc,
    energy_in_mask,
    perturbation_curves,
    pointing_game,
    rank_correlation,
    topk_iou,
)
from .probe import ProbeSet
from .progress import reporting_part
from .render import (
    _shared_strip,
    class_name,
    compose,
    diverging_cmap,
    normalize_maps,
    overlay,
    resize_maps,
    text_px,
    to_uint8,
    upscale,
)
from .targets import LabelTarget, PredictedTarget, Target, resolve_target

__all__ = ["MapTracker", "randomized_copy", "TRACKING_LAYOUT"]

PREFIX = "track:"
#: The sanity check keeps its last randomized copy's tensors (to see the next copy is the same and reuse its maps)
#: only for a model of at most this many MiB of parameters and buffers: a larger CPU model is not held twice.
SANITY_MEMO_MB = 256.0

#: Custom-scalars layout (regexes over tags, so one layout serves every callback and layer).
TRACKING_LAYOUT: dict[str, dict[str, list]] = {
    "lightning-viz drift": {
        "map rank correlation with the previous run": ["Multiline", [r"viz-.*/drift/rank_corr"]],
        "map top-k IoU with the previous run": ["Multiline", [r"viz-.*/drift/topk_iou"]],
        "prediction flips on probes": ["Multiline", [r"viz-.*/drift/prediction_flips"]],
        "probe accuracy": ["Multiline", [r"viz-.*/probe_accuracy"]],
    },
    "lightning-viz faithfulness": {
        "deletion AUC (lower is better)": ["Multiline", [r"viz-.*/faithfulness/deletion_auc"]],
        "insertion AUC (higher is better)": ["Multiline", [r"viz-.*/faithfulness/insertion_auc"]],
    },
    "lightning-viz localization": {
        "pointing game": ["Multiline", [r"viz-.*/localization/pointing_game"]],
        "energy in mask": ["Multiline", [r"viz-.*/localization/energy_in_mask"]],
    },
    "lightning-viz sanity check": {
        "rank correlation with randomized model (lower passes)": ["Multiline", [r"viz-.*/sanity/rank_corr$"]],
        "rank correlation of |maps| with randomized model (signed maps)": [
            "Multiline",
            [r"viz-.*/sanity/rank_corr_abs$"],
        ],
    },
}


def charts_of(tags: Iterable[str]) -> dict[str, dict[str, list]]:
    """The charts of :data:`TRACKING_LAYOUT` that show one of ``tags`` (regexes matched from the tag's start, as
    TensorBoard does): a chart no tracker fills (no masks: no pointing game) is left out of the layout."""
    tags = list(tags)
    out: dict[str, dict[str, list]] = {}
    for category, charts in TRACKING_LAYOUT.items():
        shown = {title: spec for title, spec in charts.items() if any(re.match(r, t) for r in spec[1] for t in tags)}
        if shown:
            out[category] = shown
    return out


def randomized_copy(module: nn.Module, seed: int = 2018) -> nn.Module:
    """A deep copy of ``module`` with every parameter re-initialized (Adebayo et al. 2018, Sec. 3.1,
    full model parameter randomization): ``reset_parameters()`` where a layer has one, Gaussian noise with the
    parameter's own std for every parameter no reset wrote (a pruned or weight-normed layer resets a derived
    weight). Seeded and identical on every rank; the global RNG is restored. A LightningModule's trainer
    reference is not copied (``__getstate__`` drops it). The copy runs its own forward: see :func:`_own_methods`."""
    memo: dict[int, Any] = {}
    for m in module.modules():  # a weight a forward pre-hook derived with autograd on (pruning, legacy weight
        for value in vars(m).values():  # norm) cannot be deep-copied; the copy's next forward derives its own
            if isinstance(value, Tensor) and not value.is_leaf:
                memo[id(value)] = value.detach().clone()
    try:
        clone = copy.deepcopy(module, memo)
    except Exception as exc:
        raise RuntimeError(
            f"sanity_check needs a deep copy of {type(module).__name__}, which failed ({type(exc).__name__}: {exc}). "
            "Set sanity_check=False or make the module deep-copyable."
        ) from exc
    _own_methods(clone, memo)
    with fork_rng(), torch.no_grad():
        torch.manual_seed(seed)
        for m in clone.modules():
            own = list(m.parameters(recurse=False))
            if not own:
                continue
            versions = [p._version for p in own]
            reset = getattr(m, "reset_parameters", None)
            if callable(reset):
                reset()
            for p, v in zip(own, versions):
                # noise where no reset wrote the parameter (none, or it reset a derived tensor: pruning's
                # ``weight`` = ``weight_orig * weight_mask``, legacy weight norm's ``weight``)
                if p._version == v:
                    std = float(p.float().std()) if p.numel() > 1 else 1.0
                    p.normal_(0.0, std if std > 0 else 1.0)
    return clone


def _own_methods(clone: nn.Module, memo: dict[int, Any]) -> None:
    """Make a deep copy call its own methods, not the original's.

    ``deepcopy`` rebinds an instance-level bound method to the copy, but copies a plain function as is: a
    wrapper around a bound method of the original (Lightning's ``trainer.fit(torch.compile(module))`` sets
    ``module.forward`` and the ``*_step`` methods to dynamo wrappers of the original's methods) would run
    the original model. Such an attribute is replaced by the wrapped method bound to the copy (run eagerly),
    and Lightning's ``_compiler_ctx`` is cleared on the copy."""
    for m in clone.modules():
        for name, value in list(vars(m).items()):
            if isinstance(value, (nn.Module, Tensor)) or not callable(value):
                continue
            inner = inspect.unwrap(value)
            owner = getattr(inner, "__self__", None)
            if inner is value or not isinstance(inner, types.MethodType) or not isinstance(owner, nn.Module):
                continue
            twin = memo.get(id(owner))  # the copy of the module the method is bound to, if an original
            if isinstance(twin, nn.Module) and twin is not owner:
                setattr(m, name, types.MethodType(inner.__func__, twin))
        if isinstance(vars(m).get("_compiler_ctx"), dict):
            vars(m)["_compiler_ctx"] = None


def _same_tensors(a: list[Tensor], b: list[Tensor]) -> bool:
    """The same tensors bit for bit (shapes, dtypes, values; a NaN is never equal)."""
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and x.device == y.device and torch.equal(x, y) for x, y in zip(a, b)
    )


def _nanmean(v: Tensor) -> float | None:
    v = v.float()
    ok = ~torch.isnan(v)
    return float(v[ok].mean()) if ok.any() else None


def _epoch_label(epoch: int, width: int) -> str:
    """The label under a filmstrip frame ``width`` px wide: ``epoch 12``, or ``12`` where that would be cut (small
    frames); ``before`` for run_at_start's baseline (step -1, as its folder ``before_training/`` says)."""
    if epoch < 0:
        return "before"
    return f"epoch {epoch}" if text_px(f"epoch {epoch}", 13) <= width else str(epoch)


#: A filmstrip stores at most this many times ``max_frames`` runs (then every other one is dropped).
STORED_PER_SHOWN = 8


class MapTracker:
    """How a ``MapCallback``'s maps evolve over training: filmstrips, drift, faithfulness, localization, sanity check.

    The tags are listed in the module docstring. Deletion/insertion AUC: Petsiuk et al. 2018 (RISE), Sec. 4.1;
    pointing game: Zhang et al. 2016; energy in mask: Wang et al. 2020 (Score-CAM), Sec. 4.3; sanity check: Adebayo
    et al. 2018, Sec. 3.1 (model parameter randomization).

    Args:
        filmstrip: log a filmstrip per probe: one row per map key, one frame per run with its epoch underneath.
        max_frames: most frames per filmstrip (its width stays bounded); at most ``8 * max_frames`` runs are
            stored (memory and checkpoints stay bounded), thinned evenly, always the first and the latest.
        frame_size: longest side of a stored frame, in pixels (frames are kept downsampled).
        display_px: shorter side of a shown frame: stored frames upscaled (nearest, crisp) by the smallest integer
            factor that reaches it (0: as stored; ``None``: the callback's ``display_px``). 64 keeps a 12-frame
            filmstrip about 800 px wide (TensorBoard fits wider images to its card anyway) and its rendering cheap.
        drift: log drift scalars (map rank correlation, top-k IoU, prediction flips, probe accuracy).
        topk: fraction of pixels for the top-k IoU. Drift compares the maps downsampled to ``frame_size``.
        faithfulness: log deletion (zero baseline) and insertion (blur baseline) AUC; costs
            ``2 * (deletion_steps - 1)`` images forwarded per probe and key, plus 3 per probe shared by all keys
            (the image and both baselines), batched together; keys whose maps move exactly the same pixels of a probe
            at a step (CAM and Grad-CAM on a global-average-pooling head at every step) share that image.
        deletion_steps: steps of each deletion/insertion curve (``deletion_steps + 1`` points, both ends included).
        chunk_size: images per forward pass of the deletion/insertion curves (``None``: as many as the default
            memory budget holds, on the CPU at most ``CPU_THROUGHPUT_MB`` of activations but ``CPU_MIN_IMAGES``; see
            :func:`lightning_viz.methods.metrics.perturbation_curves`).
        pointing_game: log pointing game and energy in mask; ``None`` = when the probes have masks.
        pointing_tolerance: pixels of tolerance of the pointing game (distance <= it: a closed disc, see
            :func:`~lightning_viz.methods.metrics.pointing_game` for TorchRay's open one).
        sanity_check: log the rank correlation between the maps and those of a randomized copy of the
            model (one extra ``compute_maps`` per run; a ``"predicted"`` target stays the trained model's class). On
            the CPU the last run's randomized copy and its maps are kept: a run whose copy has the same parameters and
            buffers bit for bit (every layer reset by ``reset_parameters``: the same whatever training did), on the
            same probes and classes, takes those maps instead of computing them again (models of at most
            ``SANITY_MEMO_MB`` of parameters and buffers).
        seed: seed of the randomized copy (same on every rank). Keep it different from the seed the
            model was initialized with: an untrained model re-initialized with its own seed is itself.
        target: class whose probability (the callback's ``probabilities``: softmax or per-class sigmoid) the
            deletion/insertion curves follow: ``"label"``,
            ``"predicted"`` or an index; ``None`` = the callback's own ``target`` if it has one, else
            the label (or the prediction when the probes have no labels).
        custom_scalars: write the custom-scalars layout once.
    """

    def __init__(
        self,
        filmstrip: bool = True,
        max_frames: int = 12,
        frame_size: int = 32,
        display_px: Optional[int] = 64,
        drift: bool = True,
        topk: float = 0.1,
        faithfulness: bool = False,
        deletion_steps: int = 16,
        chunk_size: Optional[int] = None,
        pointing_game: Optional[bool] = None,
        pointing_tolerance: float = 0,
        sanity_check: bool = False,
        seed: int = 2018,
        target: Optional[Union[str, int]] = None,
        custom_scalars: bool = True,
    ):
        from .callbacks._options import refuse_non_finite  # here: the callbacks package imports this module

        refuse_non_finite({"topk": topk, "pointing_tolerance": pointing_tolerance}, "MapTracker")
        if max_frames < 2:
            raise ValueError(f"MapTracker: max_frames must be >= 2 (first and latest epoch); got {max_frames}")
        if frame_size < 4:
            raise ValueError(f"MapTracker: frame_size must be >= 4 pixels; got {frame_size}")
        if display_px is not None and display_px < 0:
            raise ValueError(f"MapTracker: display_px must be >= 0 pixels (0: as stored) or None; got {display_px}")
        if not 0 < topk <= 1:
            raise ValueError(f"MapTracker: topk must be a fraction in (0, 1]; got {topk}")
        if deletion_steps < 1:
            raise ValueError(f"MapTracker: deletion_steps must be >= 1; got {deletion_steps}")
        chunk_size = check_chunk_size(chunk_size, "MapTracker")
        if pointing_tolerance < 0:
            raise ValueError(f"MapTracker: pointing_tolerance must be >= 0; got {pointing_tolerance}")
        if target is not None:
            try:
                resolve_target(target)  # fails early with the allowed values
            except ValueError as exc:
                raise ValueError(f"MapTracker: target: {exc}") from None
        self.filmstrip = filmstrip
        self.max_frames = max_frames
        self.frame_size = frame_size
        self.display_px = display_px
        self.drift = drift
        self.topk = topk
        self.faithfulness = faithfulness
        self.deletion_steps = deletion_steps
        self.chunk_size = chunk_size
        self.pointing_game = pointing_game
        self.pointing_tolerance = pointing_tolerance
        self.sanity_check = sanity_check
        self.seed = seed
        self.target = target
        self.custom_scalars = custom_scalars
        # history (rank 0), saved in checkpoints
        self.frames: dict[str, dict[str, list[Tensor]]] = {}  # key -> probe id -> uint8 [3, h, w] per run
        self.epochs: dict[str, list[int]] = {}  # key -> epoch of each stored frame
        self.run_ids: dict[str, list[int]] = {}  # key -> run index (0, 1, ...) of each stored frame
        self.strides: dict[str, int] = {}  # key -> runs kept are multiples of this (see _thin)
        self.prev_maps: dict[str, Tensor] = {}  # key -> [N, h, w] downsampled maps of the previous run
        self.prev_preds: Tensor | None = None  # [N] predicted classes, or [N, K] decisions (probabilities="sigmoid")
        # (key, probe id) -> (display_px, {run index: shown frame, upscaled}); not saved, rebuilt from the frames
        self._shown: dict[tuple[str, str], tuple[int, dict[int, np.ndarray]]] = {}
        # the sanity check's last randomized copy on the CPU: (what its maps depend on, its tensors, its maps)
        self._sanity_memo: tuple[tuple, list[Tensor], dict[str, Tensor]] | None = None
        # key -> (maps, their average_ranks): the drift's previous maps, the randomized copy's maps (not saved)
        self._prev_ranks: dict[str, tuple[Tensor, Tensor]] = {}
        self._rand_ranks: dict[str, tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ all ranks
    def compute(
        self, pl_module: nn.Module, probe: ProbeSet, maps: dict[str, Tensor], callback: Any = None
    ) -> dict[str, Tensor]:
        """Per-probe tracking values for this rank's ``probe`` shard (keys start with ``"track:"``)."""
        out: dict[str, Tensor] = {}
        use_masks = self._use_masks(probe)
        if not (self.drift or self.faithfulness or use_masks or self.sanity_check):
            return out
        device = module_device(pl_module)
        if self.drift or self.faithfulness:
            x = probe.to(device, module_dtype(pl_module))
            with torch.no_grad():
                logits = pl_module(x)
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise ValueError(
                    f"MapTracker needs the model to return logits [B, K] for predictions and faithfulness; "
                    f"got {getattr(logits, 'shape', type(logits).__name__)}. Set drift=False and faithfulness=False."
                )
            out[PREFIX + "pred"] = logits.argmax(dim=1).cpu()
            if getattr(callback, "probabilities", "softmax") == "sigmoid":  # multi-label: the predicted set flips
                out[PREFIX + "decisions"] = (logits.detach() > 0).cpu()
            if self.faithfulness:
                classes = self._classes(logits, probe, callback)
                # every key's deletion (zero baseline) and insertion (blur baseline) curve in one batched pass
                curves = perturbation_curves(
                    pl_module,
                    x,
                    maps,
                    classes,
                    steps=self.deletion_steps,
                    chunk_size=self.chunk_size,
                    probabilities=getattr(callback, "probabilities", "softmax"),  # the MapCallback's option
                )
                for mode, per_key in curves.items():
                    for key, curve in per_key.items():
                        out[f"{PREFIX}{mode}/{key}"] = curve_auc(curve).cpu()
        if use_masks:
            masks = probe.masks
            assert masks is not None  # _use_masks is True only with masks
            for key, m in maps.items():
                out[f"{PREFIX}pointing/{key}"] = pointing_game(m.cpu(), masks, self.pointing_tolerance)
                out[f"{PREFIX}energy/{key}"] = energy_in_mask(m.cpu(), masks)
        if self.sanity_check:
            if callback is None or not hasattr(callback, "compute_maps"):
                raise ValueError(
                    "MapTracker(sanity_check=True) needs the MapCallback to recompute maps; "
                    "attach it as MapCallback(tracker=...)."
                )
            with reporting_part("sanity check"):  # its progress lines say which maps these are
                rand_maps = self._randomized_maps(pl_module, probe, callback, out.get(PREFIX + "pred"))
            signed = bool(getattr(callback, "signed", False))
            for key, m in maps.items():
                if key in rand_maps:
                    a, b = m.detach().float().cpu(), rand_maps[key].detach().float().cpu()
                    b_ranks = None
                    if a.shape == b.shape:  # the randomized copy's maps of the last run again: their ranks too
                        kept = self._rand_ranks.get(key)
                        b_ranks = kept[1] if kept is not None and kept[0] is rand_maps[key] else average_ranks(b)
                        self._rand_ranks[key] = (rand_maps[key], b_ranks)
                    out[f"{PREFIX}sanity/{key}"] = rank_correlation(a, b, b_ranks=b_ranks)
                    if signed:  # Adebayo et al. report both; a random sign hides a shared |map| (Quantus' MPRT: abs)
                        out[f"{PREFIX}sanity_abs/{key}"] = rank_correlation(a.abs(), b.abs())
        return out

    def _randomized_maps(
        self, pl_module: nn.Module, probe: ProbeSet, callback: Any, classes: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The callback's maps of a randomized copy of the model. A ``"predicted"`` target stays the class the trained
        model predicts (``classes``, when :meth:`compute` already has them; Adebayo et al. compare maps of one class;
        Quantus' MPRT keeps ``y``), not the copy's own."""
        copy = randomized_copy(pl_module, self.seed)
        target = getattr(callback, "target", None)
        predicted = target is not None and isinstance(resolve_target(target), PredictedTarget)
        if predicted and classes is None:
            with torch.no_grad():
                classes = pl_module(probe.to(module_device(pl_module), module_dtype(pl_module))).argmax(dim=1).cpu()
        # the maps are a function of the copy (its modules, parameters and buffers), the probes, the classes and the
        # callback's options (and the thread count: a reduction's order may follow it)
        tensors = [t.detach() for t in itertools.chain(copy.parameters(), copy.buffers())]
        key = (
            id(callback),
            callback.state_key_parts() if hasattr(callback, "state_key_parts") else None,
            tuple((n, type(m)) for n, m in copy.named_modules()),
            probe.fingerprint(),
            tuple(classes.tolist()) if predicted and classes is not None else None,
            torch.get_num_threads(),
        )
        memo = self._sanity_memo
        if memo is not None and memo[0] == key and _same_tensors(memo[1], tensors):
            return memo[2]
        if not predicted:
            maps = callback.compute_maps(copy, probe)
        else:
            pinned = dataclasses.replace(probe, labels=classes, _fingerprint=None)
            callback.target = LabelTarget() if isinstance(target, Target) else "label"
            try:
                maps = callback.compute_maps(copy, pinned)
            finally:
                callback.target = target
        on_cpu = all(t.device.type == "cpu" for t in tensors) and all(m.device.type == "cpu" for m in maps.values())
        small = sum(t.numel() * t.element_size() for t in tensors) <= SANITY_MEMO_MB * 2**20
        self._sanity_memo = (key, tensors, maps) if on_cpu and small else None
        return maps

    def _use_masks(self, probe: ProbeSet) -> bool:
        if self.pointing_game is False:
            return False
        if probe.masks is None:
            if self.pointing_game:
                raise ValueError(
                    "MapTracker(pointing_game=True) needs ground-truth masks in the probe set (e.g. the shapes "
                    "dataset, whose items are (image, label, mask)); these probes have none. "
                    "Use pointing_game=None or False."
                )
            return False
        return True

    def _classes(self, logits: Tensor, probe: ProbeSet, callback: Any) -> Tensor:
        spec = self.target
        if spec is None:
            spec = getattr(callback, "target", None)
        if spec is None:
            spec = "label" if probe.labels is not None else "predicted"
        classes = resolve_target(spec).classes(logits, probe.labels)
        if classes is None:  # a custom score has no class: follow the prediction
            classes = logits.argmax(dim=1)
        return classes.to(logits.device).long()

    # ------------------------------------------------------------------ rank 0
    def log(
        self,
        logger: VizLogger,
        maps: dict[str, Tensor],
        results: dict[str, Any],
        probe: ProbeSet,
        trainer: Any = None,
        callback: Any = None,
    ) -> None:
        """Write filmstrips and tracking scalars for the gathered ``maps``/``results`` (rank 0)."""
        method = getattr(callback, "method", None) or (next(iter(maps)).split("/")[0] if maps else "viz")
        if self.filmstrip and maps:
            self._log_filmstrips(logger, maps, probe, trainer, callback, method)
        for key, m in maps.items():
            if self.drift:
                cur = self._small(m.float().unsqueeze(1)).squeeze(1)
                prev = self.prev_maps.get(key)
                if prev is not None and prev.shape == cur.shape:  # the last run's ranks were kept with its maps
                    cur_ranks = average_ranks(cur)
                    kept = self._prev_ranks.get(key)
                    prev_ranks = kept[1] if kept is not None and kept[0] is prev else None
                    rc = _nanmean(rank_correlation(cur, prev, cur_ranks, prev_ranks))
                    self._prev_ranks[key] = (cur, cur_ranks)
                    if rc is not None:
                        logger.scalar(make_tag(method, key, "drift", "rank_corr"), rc)
                    iou = _nanmean(topk_iou(cur, prev, self.topk))
                    if iou is not None:
                        logger.scalar(make_tag(method, key, "drift", "topk_iou"), iou)
                self.prev_maps[key] = cur
            for name, group, stat in (
                ("deletion", "faithfulness", "deletion_auc"),
                ("insertion", "faithfulness", "insertion_auc"),
                ("pointing", "localization", "pointing_game"),
                ("energy", "localization", "energy_in_mask"),
                ("sanity", "sanity", "rank_corr"),
                ("sanity_abs", "sanity", "rank_corr_abs"),
            ):
                v = results.get(f"{PREFIX}{name}/{key}")
                if v is not None:
                    mean = _nanmean(torch.as_tensor(v))
                    if mean is not None:
                        logger.scalar(make_tag(method, key, group, stat), mean)
        preds = results.get(PREFIX + "pred")  # also there for faithfulness alone: logged only with drift
        if preds is not None and self.drift:
            # multi-label (probabilities="sigmoid"): each class's own decision [N, K], a flip is any of them changing
            decided = results.get(PREFIX + "decisions", preds)
            if self.prev_preds is not None and self.prev_preds.shape == decided.shape:
                flips = (decided != self.prev_preds).reshape(len(decided), -1).any(dim=1)
                logger.scalar(make_tag(method, "drift", "prediction_flips"), flips.float().mean())
            if probe.labels is not None and probe.labels.shape == preds.shape:
                logger.scalar(make_tag(method, "probe_accuracy"), (preds == probe.labels).float().mean())
            self.prev_preds = decided.clone()
        if self.custom_scalars:  # the charts of what was logged (drift's from the second run); TensorBoard adds them
            layout = charts_of(logger.written)
            if layout:
                logger.custom_scalars(layout)

    def _small(self, images: Tensor) -> Tensor:
        """``[N, C, H, W]`` downsampled so the longest side is at most ``frame_size``."""
        h, w = images.shape[-2:]
        scale = self.frame_size / max(h, w)
        if scale >= 1:
            return images.float()
        size = (max(1, math.floor(h * scale)), max(1, math.floor(w * scale)))
        return torch.nn.functional.interpolate(images.float(), size=size, mode="area")

    def _thin(self, key: str) -> None:
        """Bound the stored frames of ``key`` (memory and checkpoint size over long runs): keep the runs whose index
        is a multiple of a stride, plus the latest; past ``STORED_PER_SHOWN * max_frames`` stored, the stride
        doubles. The frames kept stay evenly spaced over the whole run, from the first to the latest."""
        epochs, history = self.epochs[key], self.frames[key]
        runs = self.run_ids.setdefault(key, list(range(len(epochs) - 1)))
        runs.append(runs[-1] + 1 if runs else 0)
        if len(runs) != len(epochs) or any(len(seq) != len(epochs) for seq in history.values()):
            return  # a history this tracker did not build run by run: left as it is
        stride = self.strides.get(key, 1)
        drop = [len(runs) - 2] if len(runs) >= 2 and runs[-2] % stride else []  # the latest until now, off-stride
        if len(runs) - len(drop) > STORED_PER_SHOWN * self.max_frames:
            stride = self.strides[key] = stride * 2
            drop = [j for j in range(len(runs) - 1) if runs[j] % stride]
        if drop:
            gone = set(drop)
            keep = [j for j in range(len(runs)) if j not in gone]
            self.run_ids[key] = [runs[j] for j in keep]
            self.epochs[key] = [epochs[j] for j in keep]
            for pid, seq in history.items():
                history[pid] = [seq[j] for j in keep]

    def _log_filmstrips(
        self, logger: VizLogger, maps: dict[str, Tensor], probe: ProbeSet, trainer: Any, callback: Any, method: str
    ) -> None:
        """Store this run's downsampled overlays, then log one ``viz-<family>/filmstrip/<probe-id>`` per probe:
        one row per map key, one column per run (at most ``max_frames``), the epoch under each frame."""
        signed = bool(getattr(callback, "signed", False))
        cmap = diverging_cmap(getattr(callback, "cmap", None), signed)
        small01 = self._small(probe.display_images())
        epoch = int(getattr(logger, "step", 0))
        for key, m in maps.items():
            m01 = normalize_maps(resize_maps(m.float(), small01.shape[-2:]), "per_image", signed=signed)
            frames = overlay(small01, m01, float(getattr(callback, "alpha", 0.5)), cmap)
            history = self.frames.setdefault(key, {})
            for pid, frame in zip(probe.ids, to_uint8(frames)):
                history.setdefault(pid, []).append(frame)
            self.epochs.setdefault(key, []).append(epoch)
            self._thin(key)
        display_px = self.display_px
        if display_px is None:
            display_px = int(getattr(callback, "display_px", 128) or 0)
        names = callback.get_class_names(trainer) if hasattr(callback, "get_class_names") else None
        layers = {k.split("/", 1)[-1] for k in maps}
        for i, pid in enumerate(probe.ids):
            rows, under = [], []
            for key in maps:
                seq = self.frames[key][pid]
                epochs = self.epochs.get(key, [])
                epochs = epochs[-len(seq) :] if len(epochs) >= len(seq) else list(range(len(seq)))
                keep = list(range(len(seq)))
                if len(seq) > self.max_frames:  # an even subsample, always the first and the latest frame
                    keep = torch.linspace(0, len(seq) - 1, self.max_frames).round().long().tolist()
                frames, strips, w = self._film_row(key, pid, seq, keep, epochs, display_px)
                label = key.split("/", 1)[0] if len(layers) == 1 else key.replace("/", " ")
                # the label column: as wide as a frame, at least 96 px, wider (up to 200 px) for a longer label
                rows.append([_shared_strip(max(w, 96, min(text_px(label, 14), 200)), [label], 14), frames])
                under.append([None, strips])
            caption = pid if probe.labels is None else f"{pid}  true: {class_name(probe.labels[i], names)}"
            logger.image(make_tag(method, "filmstrip", pid), compose(rows, None, caption, under=under), caption=caption)

    def _film_row(
        self, key: str, pid: str, seq: list[Tensor], keep: list[int], epochs: list[int], display_px: int
    ) -> tuple[Tensor, Tensor, int]:
        """One filmstrip row as two uint8 tiles -- the kept frames side by side (2 px of white between, as
        :func:`compose` pads columns) and the epoch labels under them, pasted in numpy at once -- and the width of a
        frame. A shown frame is upscaled once and kept while it stays shown (by run index)."""
        runs = self.run_ids.get(key)
        ids = [runs[j] for j in keep] if runs is not None and len(runs) == len(seq) else [None] * len(keep)
        px, cache = self._shown.get((key, pid), (display_px, {}))
        cache = cache if px == display_px else {}
        shown = []
        for j, rid in zip(keep, ids):
            frame = cache.get(rid) if rid is not None else None
            if frame is None:
                t = upscale(seq[j][None], display_px)[0] if display_px else seq[j]
                frame = np.asarray(t.permute(1, 2, 0))  # [h, w, 3] uint8
            shown.append(frame)
        self._shown[(key, pid)] = (display_px, {rid: f for rid, f in zip(ids, shown) if rid is not None})
        # frames of other sizes (a resume with another frame_size): top-left in columns as wide as the widest
        h, w = max(f.shape[0] for f in shown), max(f.shape[1] for f in shown)
        pad, n = 2, len(shown)
        row = np.full((h, n * w + (n - 1) * pad, 3), 255, np.uint8)
        under = np.full((13, row.shape[1], 3), 255, np.uint8)
        for i, (frame, j) in enumerate(zip(shown, keep)):
            x = i * (w + pad)
            row[: frame.shape[0], x : x + frame.shape[1]] = frame
            label = _epoch_label(epochs[j], w)
            under[:, x : x + w] = np.asarray(_shared_strip(w, [label], 13).permute(1, 2, 0))
        return torch.from_numpy(row).permute(2, 0, 1), torch.from_numpy(under).permute(2, 0, 1), w

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "frames": {k: {pid: torch.stack(seq) for pid, seq in h.items()} for k, h in self.frames.items()},
            "epochs": {k: list(v) for k, v in self.epochs.items()},
            "run_ids": {k: list(v) for k, v in self.run_ids.items()},
            "strides": dict(self.strides),
            "prev_maps": dict(self.prev_maps),
            "prev_preds": self.prev_preds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.frames = {
            k: {pid: list(t.unbind(0)) for pid, t in _padded_ids(h).items()}
            for k, h in (state.get("frames") or {}).items()
        }
        self.epochs = {k: list(v) for k, v in (state.get("epochs") or {}).items()}
        self.run_ids = {k: list(v) for k, v in (state.get("run_ids") or {}).items()}
        self.strides = dict(state.get("strides") or {})
        self.prev_maps = dict(state.get("prev_maps") or {})
        self.prev_preds = state.get("prev_preds")
        self._shown = {}
        self._sanity_memo = None
        self._prev_ranks, self._rand_ranks = {}, {}


def _padded_ids(history: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's frames by probe id under today's ids: before :func:`indexed` padded every id to the digits of
    the largest, 1001 probes were ``p000`` .. ``p999``, ``p1000`` (``p0000`` .. ``p1000`` now); up to 1000 alike."""
    numbers = {pid: int(pid[1:]) for pid in history if re.fullmatch(r"p\d+", pid)}
    if len(numbers) < len(history) or not numbers:
        return history
    largest = max(numbers.values())
    return {indexed("p", n, largest): history[pid] for pid, n in numbers.items()}
