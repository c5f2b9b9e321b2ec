"""VisualizationCallback: the one base every lightning-viz callback stands on.

It owns everything that is the same for every method: the schedule (``every_n_epochs``, train- or
validation-epoch end, never during the sanity check), the probe set (picked once, saved in
checkpoints), isolation (the model is left exactly as it was), the rank split and gather under DDP,
timing, and rank-0-only writing to the trainer's loggers (:mod:`lightning_viz.logging`). A subclass
overrides :meth:`compute` (all ranks, its shard of the probes, returns per-probe tensors) and
:meth:`log_results` (rank 0, the gathered results).
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..capture import isolated
from ..logging import NothingWrittenWarning, VizLogger, check_sinks, describe_sinks, make_tag, sink_names
from ..probe import ProbeSet, read_item
from ..progress import logger as _log
from ..progress import reporting

try:
    from typing import override
except ImportError:  # Python < 3.12
    from typing_extensions import override

__all__ = ["VisualizationCallback", "VisualizationError", "VisualizationWarning", "gather_results"]


class VisualizationError(RuntimeError):
    """A visualization failed; raised on every rank so DDP ranks stay in step."""


class VisualizationWarning(UserWarning):
    """A visualization failed and ``on_error="warn"`` let training go on."""


def _first_not_none(*sources_and_attr: Any) -> Any:
    """``getattr(source, attr)`` of the first source where it is not ``None`` (tensors are fine)."""
    *sources, attr = sources_and_attr
    for src in sources:
        value = getattr(src, attr, None)
        if value is not None:
            return value
    return None


_announced: "weakref.WeakSet[Trainer]" = weakref.WeakSet()


def _announce(trainer: Trainer) -> None:
    """Once per trainer (rank 0): which visualization callbacks run, and where to look at them."""
    if trainer in _announced:
        return
    _announced.add(trainer)
    cbs = [cb for cb in trainer.callbacks if isinstance(cb, VisualizationCallback)]
    where = describe_sinks(trainer) if trainer.is_global_zero else ""
    names = ", ".join(f"{cb.method}{'' if cb.name is None else f'[{cb.name}]'} (every {cb.every_n_epochs})" for cb in cbs)
    rank_zero_info(f"lightning-viz: {len(cbs)} visualization callback(s): {names}; {where}")


#: per trainer: (epoch, run_on) of the epoch end being summed up, and (callback label, seconds) of each run
_epoch_runs: "weakref.WeakKeyDictionary[Trainer, tuple[tuple[int, str], list[tuple[str, float]]]]" = \
    weakref.WeakKeyDictionary()


def _epoch_report(cb: "VisualizationCallback", trainer: Trainer, seconds: float) -> None:
    """After ``cb`` ran at an epoch end: note its seconds; the last visualization callback scheduled at that
    epoch end (``trainer.callbacks`` order) logs one line for all of them (rank 0, logger ``lightning_viz``)."""
    if not trainer.is_global_zero:
        return
    when = (trainer.current_epoch, cb.run_on)
    if _epoch_runs.get(trainer, (None,))[0] != when:  # a new epoch end (or one cut short by an error)
        _epoch_runs[trainer] = (when, [])
    runs = _epoch_runs[trainer][1]
    if cb.epoch_summary:
        runs.append((cb.method if cb.name is None else f"{cb.method}[{cb.name}]", seconds))
    peers = [c for c in trainer.callbacks
             if isinstance(c, VisualizationCallback) and c.run_on == cb.run_on and c.should_run(trainer)]
    if peers and peers[-1] is cb:
        _epoch_runs.pop(trainer, None)
        if runs:
            parts = ", ".join(f"{label} {t:.2f} s" for label, t in sorted(runs, key=lambda r: -r[1]))
            where = "" if cb.run_on == "train_epoch_end" else " (validation end)"
            _log.info("lightning-viz epoch %d%s: %.1f s (%s)", trainer.current_epoch, where,
                      sum(t for _, t in runs), parts)


def _world(trainer: Trainer) -> tuple[int, int]:
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _concat(parts: list[Any]) -> Any:
    """Concatenate per-rank results in rank order: tensors on dim 0, lists end to end, dicts per key."""
    first = next((p for p in parts if p is not None), None)
    if isinstance(first, dict):
        keys = list(first)
        return {k: _concat([p.get(k) for p in parts if p is not None]) for k in keys}
    if isinstance(first, Tensor):
        nonempty = [p for p in parts if p is not None and p.shape[0] > 0] or [first]
        return torch.cat(nonempty, dim=0)
    if isinstance(first, list):
        return [x for p in parts if p is not None for x in p]
    return first


def gather_results(trainer: Trainer, local: Any, error: BaseException | None, what: str = "visualization") -> Any:
    """Gather every rank's ``local`` results (concatenated in rank order) on all ranks.

    Every rank calls this exactly once per run, also a rank that failed or has no probes (it sends
    ``None``), so all ranks make the same collective calls. If any rank failed, every rank raises a
    :class:`VisualizationError` naming the failed ranks and their errors.
    """
    rank, world = _world(trainer)
    payload = (None if error is None else f"{type(error).__name__}: {error}", _to_cpu(local) if error is None else None)
    if world > 1 and _dist_ready():
        # Objects travel as byte tensors on the current device: CPU for gloo, torch.cuda.current_device()
        # for nccl (Lightning calls torch.cuda.set_device per rank), so both backends work.
        gathered: list[Any] = [None] * world
        try:
            torch.distributed.all_gather_object(gathered, payload)
        except Exception as exc:  # timeouts and broken process groups
            raise VisualizationError(
                f"lightning-viz: gathering {what} results across {world} ranks failed on rank {rank} "
                f"({type(exc).__name__}: {exc}). Every rank must reach the same epoch end: check that no rank "
                "skipped the callback or crashed, or raise the process-group timeout (DDPStrategy(timeout=...)) "
                "if one rank is much slower."
            ) from exc
    else:
        gathered = [payload]
    errors = [(r, e) for r, (e, _) in enumerate(gathered) if e is not None]
    if errors:
        msg = "; ".join(f"rank {r}: {e}" for r, e in errors)
        if error is not None:
            raise VisualizationError(f"lightning-viz {what} failed: {msg}") from error
        raise VisualizationError(f"lightning-viz {what} failed: {msg}")
    return _concat([res for _, res in gathered])


def _share_rank0_error(error: BaseException | None, what: str) -> None:
    """Broadcast rank 0's outcome; every other rank raises if rank 0 failed (all ranks call this)."""
    box = [None if error is None else f"{type(error).__name__}: {error}"]
    try:
        torch.distributed.broadcast_object_list(box, src=0)
    except Exception as exc:  # timeouts and broken process groups
        raise VisualizationError(
            f"lightning-viz: sharing rank 0's {what} status failed on rank {torch.distributed.get_rank()} ({exc}). "
            "Every rank must reach the same epoch end; check that no rank skipped or crashed."
        ) from exc
    if box[0] is not None and error is None:
        raise VisualizationError(f"lightning-viz {what} failed on rank 0: {box[0]}")


class VisualizationCallback(Callback):
    """Base class. Subclasses set ``method`` and override :meth:`compute` and :meth:`log_results`.

    Args:
        every_n_epochs: run at epochs 0, n, 2n, ... (``current_epoch % n == 0``).
        run_on: ``"train_epoch_end"`` (default) or ``"validation_epoch_end"`` (also runs under
            ``trainer.validate``, inside inference mode).
        num_probes: how many probe images to pick (class-stratified, seeded).
        probe_seed: seed of the probe pick.
        probe_source: ``"val"`` (fall back to train) or ``"train"`` dataloader's dataset.
        probes: an explicit :class:`ProbeSet` (overrides the three options above).
        log_time: log the seconds each run took as ``viz-<method>/time_s``.
        name: optional namespace inserted in every tag after the family (``viz-<method>/<name>/...``), to tell
            apart two instances of one callback (e.g. two targets); also part of the checkpoint state key.
        on_error: ``"raise"`` (default: a failed run stops training with a :class:`VisualizationError`)
            or ``"warn"`` (warn and go on training; under DDP every rank decides the same way).
        loggers: where to write, by name: ``None`` (default) every logger in ``trainer.loggers`` (plus the
            plain image folder when none of them stores images), or a list of the trainer's logger names
            (``"tensorboard"``, ``"csv"``, ``"mlflow"``, ``"wandb"``, ...) and ``"folder"``. ``[]`` writes
            nowhere, and then nothing is computed (one warning).
        class_names: names of the classes (index -> name) for captions and legends; default the
            datamodule's or the probe dataset's ``classes`` (torchvision ``ImageFolder`` convention), else indices.
        epoch_summary: count this callback in the one line logged at every epoch end (logger ``lightning_viz``:
            ``lightning-viz epoch 3: 1.7 s (embeddings 0.55 s, cam 0.29 s)``); no line when no callback is counted.
    """

    method: str = "viz"
    #: False for methods whose work is not split over probes (e.g. filters, class-model images):
    #: only rank 0 computes, and nothing is gathered.
    per_probe: bool = True
    #: False for methods that use no probe images at all: ``compute``/``log_results`` get ``probe=None``.
    needs_probes: bool = True

    def __init__(
        self,
        every_n_epochs: int = 1,
        run_on: Literal["train_epoch_end", "validation_epoch_end"] = "train_epoch_end",
        num_probes: int = 16,
        probe_seed: int = 0,
        probe_source: Literal["val", "train"] = "val",
        probes: ProbeSet | None = None,
        log_time: bool = True,
        name: Optional[str] = None,
        on_error: Literal["raise", "warn"] = "raise",
        loggers: Optional[list[str]] = None,
        class_names: Optional[list[str]] = None,
        epoch_summary: bool = True,
    ):
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1; got {every_n_epochs}")
        if run_on not in ("train_epoch_end", "validation_epoch_end"):
            raise ValueError(f"run_on must be 'train_epoch_end' or 'validation_epoch_end'; got {run_on!r}")
        if probe_source not in ("val", "train"):
            raise ValueError(f"probe_source must be 'val' or 'train'; got {probe_source!r}")
        if num_probes < 1:
            raise ValueError(f"num_probes must be >= 1; got {num_probes}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn'; got {on_error!r}")
        if isinstance(loggers, str):
            raise ValueError(f"loggers must be a list of logger names, e.g. [{loggers!r}]; got the string {loggers!r}")
        if name is not None and (not name.strip() or "/" in name):
            raise ValueError(f"name must be a non-empty tag part without '/'; got {name!r}")
        self.every_n_epochs = every_n_epochs
        self.run_on = run_on
        self.num_probes = num_probes
        self.probe_seed = probe_seed
        self.probe_source = probe_source
        self.probes = probes
        self.log_time = log_time
        self.name = name
        self.on_error = on_error
        self.loggers = None if loggers is None else list(loggers)
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.epoch_summary = epoch_summary
        self._found_class_names: list[str] | None = None
        self.last_logged_tags: list[str] = []
        self.last_duration_s: float | None = None

    # ------------------------------------------------------------------ subclass API
    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        """Compute on ``probe`` (this rank's shard) inside :func:`isolated`; return tensors with the
        probe dimension first (lists also concatenate), gathered to rank 0 in probe order.
        ``probe`` is ``None`` when ``needs_probes`` is False."""
        raise NotImplementedError

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        """Render and write the gathered ``results`` for the full ``probe`` set (rank 0 only)."""
        raise NotImplementedError

    def check(self, pl_module: LightningModule) -> None:
        """Validate options against the model before training starts (raise a clear error)."""

    def needs_labels(self) -> bool:
        """True when :meth:`compute` needs probe labels (e.g. ``target="label"``); checked on the data at setup."""
        return False

    def extra_state(self) -> dict[str, Any]:
        """Subclass state to keep in checkpoints (history for filmstrips, fixed scales, ...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_key_parts(self) -> tuple[Any, ...]:
        """Distinguish several instances of one callback class in a checkpoint (override to add options)."""
        return (self.name, self.method, self.num_probes, self.probe_seed, self.probe_source)

    # ------------------------------------------------------------------ schedule
    def should_run(self, trainer: Trainer) -> bool:
        if trainer.sanity_checking:
            return False
        return trainer.current_epoch % self.every_n_epochs == 0

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.check(pl_module)
        check_sinks(trainer, self.loggers, type(self).__name__)
        if not sink_names(trainer, self.loggers):
            rank_zero_warn(f"lightning-viz: {type(self).__name__} writes nowhere (loggers={self.loggers}), so it "
                           "computes nothing. Attach a logger or allow one, e.g. loggers=None (all) or ['folder'].",
                           category=NothingWrittenWarning)
        every_val = getattr(trainer, "check_val_every_n_epoch", None) or 1  # validation ends epochs k*every_val - 1
        n = self.every_n_epochs
        if stage == "fit" and self.run_on == "validation_epoch_end" and not any(
                (e + 1) % every_val == 0 and e % n == 0 for e in range(every_val * n)):
            raise ValueError(
                f"{type(self).__name__} would never run: run_on='validation_epoch_end' with every_n_epochs={n} "
                f"(epochs 0, {n}, ...) but the Trainer validates only at epochs {every_val - 1}, {2 * every_val - 1}, ... "
                f"(check_val_every_n_epoch={every_val}). Use an every_n_epochs with no common factor with "
                f"{every_val} (e.g. 1), or run_on='train_epoch_end'."
            )
        if stage in ("fit", "validate") and self.needs_probes and self.probes is None and self.needs_labels():
            self._check_labels(trainer)
        _announce(trainer)

    def _check_labels(self, trainer: Trainer) -> None:
        """Fail before training when the probe dataset's items carry no class label (one item is read)."""
        dataset = _find_dataset(trainer, self.probe_source)
        if dataset is None:  # dataloaders given to fit() are attached later: checked when the probes are picked
            return
        _, label, _ = read_item(dataset, 0)
        if label is None or label.numel() != 1:
            raise ValueError(
                f"{type(self).__name__}: target='label' needs a class label per image, but the items of the probe "
                f"dataset ({type(dataset).__name__}) have none. Use target='predicted' or a class index, or data "
                "that yields (x, y)."
            )

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.run_on == "train_epoch_end":
            self._run_and_report(trainer, pl_module)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.run_on == "validation_epoch_end":
            self._run_and_report(trainer, pl_module)

    def _run_and_report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.should_run(trainer):
            return
        start = time.perf_counter()
        self.run(trainer, pl_module)
        _epoch_report(self, trainer, time.perf_counter() - start)

    def get_class_names(self, trainer: Trainer | None) -> list[str] | None:
        """Class names (index -> name): the ``class_names`` option, else ``classes`` of the trainer's datamodule
        or of the probe dataset (torchvision ``ImageFolder`` convention), else ``None`` (indices are shown)."""
        if self.class_names is not None:
            return self.class_names
        if self._found_class_names is None and trainer is not None:
            names = getattr(getattr(trainer, "datamodule", None), "classes", None)
            if names is None:
                names = getattr(_find_dataset(trainer, self.probe_source), "classes", None)
            if names is not None and not isinstance(names, (str, bytes)):
                self._found_class_names = [str(c) for c in names]
        return self._found_class_names

    # ------------------------------------------------------------------ probes
    def get_probes(self, trainer: Trainer) -> ProbeSet:
        """The full probe set (same on every rank), picked on first use."""
        if self.probes is None:
            self.probes = self._pick_probes(trainer)
        return self.probes

    def _pick_probes(self, trainer: Trainer) -> ProbeSet:
        dataset = _find_dataset(trainer, self.probe_source)
        if dataset is None:
            other = "train" if self.probe_source == "val" else "val"
            raise VisualizationError(
                f"{type(self).__name__}: found no map-style {self.probe_source} or {other} dataset to pick probes from "
                "(one with len() and indexing; an IterableDataset cannot be sampled). Pass probes=ProbeSet(...) or give "
                "the Trainer a datamodule / dataloaders over a map-style dataset."
            )
        dm = getattr(trainer, "datamodule", None)
        mean, std = _first_not_none(dm, dataset, "mean"), _first_not_none(dm, dataset, "std")
        return ProbeSet.from_dataset(dataset, num=self.num_probes, seed=self.probe_seed, mean=mean, std=std)

    # ------------------------------------------------------------------ run
    def run(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any] | None:
        """Compute on this rank's shard, gather, and log on rank 0. Returns the gathered results.

        Under DDP every rank makes the same collective calls whatever happens: one gather (per-probe
        methods; a rank without probes sends ``None``) and one broadcast of rank 0's outcome, so an
        error on any rank (picking probes, computing, or rank 0's logging) raises on every rank
        instead of leaving the others waiting in the next collective.
        """
        if not self.should_run(trainer) or not sink_names(trainer, self.loggers):  # nothing would be written
            return None
        rank, world = _world(trainer)
        start = time.perf_counter()
        distributed = self.per_probe and self.needs_probes and world > 1  # without probes there is nothing to split
        probe, local, error, stage = None, None, None, "probes"
        try:
            if self.needs_probes and (distributed or rank == 0):
                probe = self.get_probes(trainer)
        except Exception as exc:  # re-raised on every rank below
            error = exc
        if error is None and (distributed or rank == 0):
            stage = "compute"
            shard = probe.shard(rank, world) if distributed and probe is not None else probe
            try:
                with isolated(pl_module), reporting(self.method if rank == 0 else None):
                    local = None if shard is not None and len(shard) == 0 else self.compute(pl_module, shard)
            except Exception as exc:  # re-raised on every rank by gather_results
                error = exc
        if distributed:
            try:
                results = gather_results(trainer, local, error, what=self.method)
            except VisualizationError as exc:  # raised on every rank alike
                return self._failed(exc)
            error = None
        else:
            results = local
        if rank == 0 and error is None and results is not None:
            stage = "log"
            try:
                logger = VizLogger.from_trainer(trainer, step=trainer.current_epoch, namespace=self.name,
                                                loggers=self.loggers)
                try:
                    self.log_results(logger, results, probe, trainer)
                    self.last_duration_s = time.perf_counter() - start
                    if self.log_time:
                        logger.scalar(make_tag(self.method, "time_s"), self.last_duration_s)
                finally:
                    self.last_logged_tags = logger.written
                    logger.flush()
            except Exception as exc:  # shared with the other ranks below
                error = exc
        if world > 1 and _dist_ready():
            try:
                _share_rank0_error(error if rank == 0 else None, self.method)
            except VisualizationError as exc:  # rank 0 failed: every other rank gets here
                return self._failed(exc)
        if error is not None:
            if stage != "compute":
                return self._failed(error)  # rank 0's own probe-picking or logging error: unchanged type
            return self._failed(VisualizationError(f"lightning-viz {self.method} failed: {type(error).__name__}: {error}"), error)
        return results

    def _failed(self, error: BaseException, cause: BaseException | None = None) -> None:
        """Raise ``error`` (``on_error="raise"``) or warn and let training go on (``"warn"``)."""
        if self.on_error == "warn":
            rank_zero_warn(f"{error} (on_error='warn': training goes on)", category=VisualizationWarning)
            return None
        if cause is not None:
            raise error from cause
        raise error

    # ------------------------------------------------------------------ checkpoint
    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(key=self.state_key_parts())

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"probes": None if self.probes is None else self.probes.state_dict(), "extra": self.extra_state()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("probes") is not None:
            self.probes = ProbeSet.from_state_dict(state_dict["probes"])
        self.load_extra_state(state_dict.get("extra") or {})


def _find_dataset(trainer: Trainer, source: str) -> Any:
    """The dataset behind the val (or train) dataloader, without iterating a sampler."""
    order = ["val", "train"] if source == "val" else ["train", "val"]
    for which in order:
        loaders = getattr(trainer, "val_dataloaders" if which == "val" else "train_dataloader", None)
        if loaders is None:
            dm = getattr(trainer, "datamodule", None)
            fn = getattr(dm, "val_dataloader" if which == "val" else "train_dataloader", None) if dm is not None else None
            if fn is not None:
                try:
                    loaders = fn()
                except Exception:  # noqa: BLE001 - a datamodule without that split
                    loaders = None
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        dataset = getattr(loaders, "dataset", None)
        if dataset is not None:
            try:
                if len(dataset) > 0:
                    return dataset
            except TypeError:  # iterable dataset
                continue
    return None
