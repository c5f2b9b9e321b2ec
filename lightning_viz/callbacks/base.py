"""VisualizationCallback: the one base every lightning-viz callback stands on.

It owns everything that is the same for every method: the schedule (``every_n_epochs``, train- or
validation-epoch end, never during the sanity check), the probe set (picked once, saved in
checkpoints), isolation (the model is left exactly as it was), the rank split and gather under DDP,
timing, and rank-0-only writing to the trainer's loggers (:mod:`lightning_viz.logging`). A subclass
overrides :meth:`compute` (all ranks, its shard of the probes, returns per-probe tensors) and
:meth:`log_results` (rank 0, the gathered results).
"""

from __future__ import annotations

import ast
import functools
import inspect
import pickle
import re
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import CombinedLoader, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import default_collate
from torch.utils.data._utils.collate import default_convert

from .._warnings import VisualizationWarning
from ..capture import (
    capture,
    fork_rng,
    grad_enabled,
    isolated,
    layout_of,
    layout_set_explicitly,
    one_thread,
    read_as_map,
    torch_threads,
)
from ..layers import (
    LayerNotFoundError,
    MapLayout,
    has_lazy_parameters,
    map_layouts,
    module_device,
    module_dtype,
)
from ..logging import (
    FOLDER,
    NothingWrittenWarning,
    VizLogger,
    WriteOwner,
    check_sinks,
    close_writer,
    describe_sinks,
    image_folder,
    logging_disabled,
    make_tag,
    sink_names,
    wait_for_writes,
)
from ..methods.batching import default_memory_mb, scaled_budget
from ..methods.checks import check_layers_get_gradients, check_reaches_input
from ..probe import (
    PROBE_BANK_KEY,
    CollatedItems,
    NormalizationMismatchError,
    ProbeSet,
    SampleFormatError,
    dataset_attr,
    dataset_normalization,
    probe_bank_get,
    probe_bank_put,
    read_item,
)
from ..progress import interruptible, reporting, warnings_above_bars
from ..progress import logger as _log
from ..targets import (
    ClassTarget,
    ModelAdapter,
    ModelOutputError,
    as_logits,
    check_labels,
    choose_memory_format,
    describe_output,
    logits_fn_example,
    model_adapter,
    read_logits,
    resolve_logits_fn,
    resolve_target,
)
from ._options import instance_label, refuse_non_finite, unknown_option_error

if sys.version_info >= (3, 12):
    from typing import override
else:  # Python < 3.12
    from typing_extensions import override

__all__ = [
    "VisualizationCallback",
    "VisualizationError",
    "VisualizationWarning",
    "gather_results",
    "BASELINE_STEP",
    "OOM_RETRIES",
    "DEV_RUN_STEPS",
    "dev_run",
    "SHARDING_STRATEGIES",
]

#: Step of the ``run_at_start`` baseline (before epoch 0, which logs at step 0).
BASELINE_STEP = -1

#: How many times a callback that ran out of device memory halves its default memory budget and computes again.
OOM_RETRIES = 3

#: Under ``Trainer(fast_dev_run=...)``: the most steps of a callback's iterative loops (input optimizations, attacks,
#: integrated-gradient points, deletion curves) in its one run (see :meth:`VisualizationCallback.dev_run_options`).
DEV_RUN_STEPS = 2

#: Strategies whose module holds only a shard of the parameters (refused at setup).
SHARDING_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


class VisualizationError(RuntimeError):
    """A visualization failed; raised on every rank so DDP ranks stay in step."""


def _first_not_none(*sources_and_attr: Any) -> Any:
    """``getattr(source, attr)`` of the first source where it is not ``None`` (tensors are fine)."""
    *sources, attr = sources_and_attr
    for src in sources:
        value = getattr(src, attr, None)
        if value is not None:
            return value
    return None


#: per trainer: the entry points (``"fit"``, ``"validate"``, ...) whose start-up line was logged
_announced: weakref.WeakKeyDictionary[Trainer, set[str]] = weakref.WeakKeyDictionary()


def _viz_callbacks(trainer: Trainer) -> list[VisualizationCallback]:
    """The trainer's visualization callbacks, in ``trainer.callbacks`` order."""
    # ``Trainer.callbacks`` is assigned by Lightning's callback connector, not declared on the class
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    return [cb for cb in callbacks if isinstance(cb, VisualizationCallback)]


def _runs_under(cb: VisualizationCallback, stage: str) -> bool:
    """Whether ``cb`` can run under the entry point ``stage`` (``"fit"``, ``"validate"``, ``"test"``,
    ``"predict"``): in a fit; under ``trainer.validate`` with ``run_on="validation_epoch_end"``; never in a test
    or predict run (nothing is checked or picked there either)."""
    if stage == "validate":
        return cb.run_on == "validation_epoch_end" and cb.every_n_epochs > 0
    return stage == "fit"


def _announce(trainer: Trainer, stage: str) -> None:
    """Once per trainer and entry point (rank 0): which visualization callbacks run, and where to look at them."""
    stage = str(getattr(stage, "value", stage))  # Lightning passes a TrainerFn (a str enum)
    seen = _announced.setdefault(trainer, set())
    if stage in seen:
        return
    seen.add(stage)
    cbs = _viz_callbacks(trainer)
    if getattr(trainer, "barebones", False):
        rank_zero_warn(
            f"lightning-viz: Trainer(barebones=True) switches logging off to measure the loop's raw speed, so the "
            f"{len(cbs)} visualization callback(s) compute and write nothing. Drop barebones=True to get them "
            "(logger=False writes their images to a folder).",
            category=NothingWrittenWarning,
        )
        return
    running = [cb for cb in cbs if _runs_under(cb, stage)]
    if not running:
        if trainer.is_global_zero:  # the lightning_viz logger, which users silence (not Lightning's)
            _log.info(
                "lightning-viz: the %d visualization callback(s) do not run under trainer.%s (they run in fit, and "
                "under trainer.validate when run_on='validation_epoch_end').",
                len(cbs),
                stage,
            )
        return
    label = {id(cb): cb._instance() for cb in running}
    schedules = {_schedule_words(cb) for cb in running} if stage == "fit" else set()
    if len(schedules) == 1:  # one schedule for all, said once: "(every epoch): gradients, cam"
        names = f" ({schedules.pop()}): " + ", ".join(label[id(cb)] for cb in running)
    else:
        names = ": " + ", ".join(label[id(cb)] + (f" ({_schedule_words(cb)})" if schedules else "") for cb in running)
    where = ""
    if trainer.is_global_zero:  # where each callback writes: once when all write alike, else per group (loggers=[...])
        groups: dict[tuple[str, ...], list[VisualizationCallback]] = {}
        for cb in running:
            groups.setdefault(tuple(sink_names(trainer, cb.loggers)), []).append(cb)
        where = "; ".join(
            ("" if len(groups) == 1 else ", ".join(label[id(cb)] for cb in cbs) + ": ")
            + describe_sinks(trainer, cbs[0].loggers)
            for cbs in groups.values()
        )
    under = "" if stage == "fit" else f" under trainer.{stage}"
    if trainer.is_global_zero:
        _log.info("lightning-viz: %d visualization callback(s)%s%s; %s", len(running), under, names, where)


#: per trainer: the point being summed up ((step, where)) and (callback label, seconds) of each run there
_epoch_runs: weakref.WeakKeyDictionary[Trainer, tuple[tuple[int, str], list[tuple[str, float]]]] = (
    weakref.WeakKeyDictionary()
)


def _builds_in_configure_model(pl_module: LightningModule) -> bool:
    """Whether the module overrides Lightning's ``configure_model`` hook or its own ``setup`` (its layers may not exist
    at the callbacks' ``setup``: Lightning calls the module's ``setup`` after them, ``configure_model`` after both)."""
    return any(is_overridden(hook, pl_module) for hook in ("configure_model", "configure_sharded_model", "setup"))


def dev_run(trainer: Trainer) -> bool:
    """Whether the trainer is a ``Trainer(fast_dev_run=True or n)``: one batch (or ``n``) to find bugs fast, logging
    and checkpointing off. The callbacks then run once, at a reduced size
    (:meth:`VisualizationCallback.dev_run_options`), and write nothing."""
    return bool(getattr(trainer, "fast_dev_run", False))


def _baseline_due(c: VisualizationCallback, trainer: Trainer) -> bool:
    """Whether ``c`` runs before training (``run_at_start``): at a fresh fit's start, not a resume; under fast_dev_run
    only when no epoch end runs it (``every_n_epochs=0``), so that it runs once there."""
    fresh = trainer.current_epoch == 0 and trainer.global_step == 0
    return c.run_at_start and fresh and not (dev_run(trainer) and c.every_n_epochs > 0)


def _runs_at(c: VisualizationCallback, trainer: Trainer, where: str) -> bool:
    """Whether callback ``c`` (not run yet at this point) will run at ``where`` of the current epoch."""
    if where == "start":  # as on_train_start: a fresh fit, not a resume
        return _baseline_due(c, trainer)
    if where == "end":
        return c._trained_epoch is not None and c.every_n_epochs > 0 and c._last_run_epoch != c._trained_epoch
    if c.run_on != where or not c.should_run(trainer) or not sink_names(trainer, c.loggers):
        return False
    return not (_fitting(trainer) and c._last_run_epoch == trainer.current_epoch)


#: per trainer in a fast dev run's fit: (callback label, seconds) of each run, said in one line at its end
_dev_runs: weakref.WeakKeyDictionary[Trainer, list[tuple[str, float]]] = weakref.WeakKeyDictionary()


def _run_label(cb: VisualizationCallback) -> str:
    """``cb``'s name in the epoch line: ``cam``, ``cam 'b'``, ``cam failed`` (a run that failed under on_error="warn"
    says so: its warning is shown only once)."""
    return cb._instance() + (" failed" if getattr(cb, "_run_failed", False) else "")


def _say_runs(what: str, runs: list[tuple[str, float]]) -> None:
    """The one line of ``runs``: ``lightning-viz <what>: 7.1 s (cam 2.88 s, ...)``, slowest first."""
    parts = ", ".join(f"{label} {t:.2f} s" for label, t in sorted(runs, key=lambda r: -r[1]))
    _log.info("lightning-viz %s: %.1f s (%s)", what, sum(t for _, t in runs), parts)


def _dev_report(trainer: Trainer) -> None:
    """At the end of a fast dev run's fit (rank 0): one line for the runs of all its callbacks, whatever point each
    ran at."""
    runs = _dev_runs.pop(trainer, None)
    if runs:
        _say_runs(
            f"fast_dev_run: {len(runs)} visualization callback{'s' * (len(runs) > 1)} ran once at a reduced size (a "
            "few probes and steps, to check every code path), writing nothing",
            runs,
        )


def _epoch_report(cb: VisualizationCallback, trainer: Trainer, step: int, where: str, seconds: float) -> None:
    """After ``cb`` ran at ``where`` (``"start"``, ``"train_epoch_end"``, ``"validation_epoch_end"``, ``"end"``):
    note its seconds; when no later visualization callback (``trainer.callbacks`` order) runs there, log one
    line for all of them (rank 0, logger ``lightning_viz``); in a fast dev run's fit one line at its end
    (:func:`_dev_report`)."""
    if not trainer.is_global_zero:
        return
    if dev_run(trainer) and _fitting(trainer):
        if cb.epoch_summary:
            _dev_runs.setdefault(trainer, []).append((_run_label(cb), seconds))
        return
    if _epoch_runs.get(trainer, (None,))[0] != (step, where):  # a new point (or one cut short by an error)
        _epoch_runs[trainer] = ((step, where), [])
    runs = _epoch_runs[trainer][1]
    if cb.epoch_summary:
        runs.append((_run_label(cb), seconds))
    cbs = _viz_callbacks(trainer)
    if any(_runs_at(c, trainer, where) for c in cbs[cbs.index(cb) + 1 :]):
        return
    _epoch_runs.pop(trainer, None)
    if runs:
        when = {
            "start": "before training",
            # trainer.validate logs at a step that need not be an epoch trained (the next free one: see run_on)
            "validation_epoch_end": f"epoch {step} (validation end)"
            if _fitting(trainer)
            else f"trainer.validate, step {step}",
            "end": f"epoch {step} (end of training)",
        }.get(where, f"epoch {step}")
        if dev_run(trainer):  # trainer.validate of a fast dev run: its one point
            when = f"fast_dev_run, {when}: {len(runs)} visualization callback{'s' * (len(runs) > 1)} ran once at a "
            when += "reduced size (a few probes and steps, to check every code path), writing nothing"
        _say_runs(when, runs)


def _schedule_words(cb: VisualizationCallback) -> str:
    """When ``cb`` runs in a fit: ``"every epoch"``, ``"every 2 epochs, at validation ends, and before training"``..."""
    n = cb.every_n_epochs
    every = ("every epoch" if n == 1 else f"every {n} epochs") if n else "epoch ends off"
    if n and cb.run_on == "validation_epoch_end":  # only epochs that validate (check_val_every_n_epoch)
        every += ", at validation ends"
    return every + (", and before training" if cb.run_at_start else "")


def _world(trainer: Trainer) -> tuple[int, int]:
    return int(getattr(trainer, "global_rank", 0)), int(getattr(trainer, "world_size", 1))


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _to_cpu(obj: Any) -> Any:
    """Tensors in ``obj`` (dicts, lists, tuples, named tuples of them) detached and on the CPU."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple takes its fields as arguments
        return type(obj)(*(_to_cpu(v) for v in obj))
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


def _all_gather(obj: Any, what: str, rank: int, world: int) -> list[Any]:
    """Every rank's ``obj`` (as ``all_gather_object``); a timeout or broken process group raises a
    :class:`VisualizationError` saying so."""
    try:
        gathered = _exchange_objects(obj, world, to=None)
    except Exception as exc:  # timeouts and broken process groups
        raise VisualizationError(
            f"lightning-viz: gathering {what} across {world} ranks failed on rank {rank} "
            f"({type(exc).__name__}: {exc}). Every rank must reach the same point: check that no rank "
            "skipped the callback or crashed, or raise the process-group timeout (DDPStrategy(timeout=...)) "
            "if one rank is much slower."
        ) from exc
    return gathered


def _exchange_objects(obj: Any, world: int, to: int | None, src: int | None = None) -> Any:
    """Picklable objects across the ranks: every rank's ``obj`` on every rank (``to=None``, as torch's
    ``all_gather_object``, with the same tensor collectives), or on rank ``to`` only (the others get ``None``; as
    ``gather_object``), or rank ``src``'s ``obj`` on every rank. They travel as byte tensors on the current device:
    the CPU for gloo, ``torch.cuda.current_device()`` for nccl (Lightning sets it per rank). Unlike torch's, a call
    returns only once gloo's threads have let go of its tensors (see :func:`_released`)."""
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    rank = dist.get_rank()
    data = None
    if src is None or rank == src:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(device)
    if src is not None:  # its size, then its bytes, from src
        size = torch.tensor([0 if data is None else data.numel()], dtype=torch.long, device=device)
        _released(dist.broadcast, [size], size, src=src)
        if data is None:
            data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
        _released(dist.broadcast, [data], data, src=src)
        return pickle.loads(data.cpu().numpy().tobytes())
    assert data is not None
    size = torch.tensor([data.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    _released(dist.all_gather, [size, *sizes], sizes, size)
    longest = max(int(n.item()) for n in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: data.numel()] = data
    parts = [torch.empty(longest, dtype=torch.uint8, device=device) for _ in range(world)] if to in (None, rank) else []
    if to is None:
        _released(dist.all_gather, [padded, *parts], parts, padded)
    else:
        _released(dist.gather, [padded, *parts], padded, parts or None, dst=to)
        if rank != to:
            return None
    return [pickle.loads(p[: int(n.item())].cpu().numpy().tobytes()) for p, n in zip(parts, sizes)]


def _released(collective: Callable[..., Any], tensors: list[Tensor], *args: Any, **kwargs: Any) -> None:
    """``collective(*args, **kwargs)`` (synchronous), then wait until the process group's threads have let go of
    ``tensors`` (at most 10 s). gloo's worker thread frees a finished collective's tensors after the caller got its
    result, and for tensors made in Python that takes the GIL: when that thread is late (a loaded machine) and it
    was the run's last collective, the interpreter may have begun to exit, the thread is stopped (Python 3.11:
    ``pthread_exit``) inside the free, and the process aborts ("terminate called without an active exception",
    the rank's exit code lost: the DDP launcher kills the other ranks). Our references keep them until then."""
    collective(*args, **kwargs)
    cpu = [t for t in tensors if t.device.type == "cpu"]  # nccl's are its watchdog's until it polls
    deadline = time.monotonic() + 10.0
    while any(t._use_count() > 1 for t in cpu) and time.monotonic() < deadline:  # type: ignore[attr-defined]
        time.sleep(1e-4)  # lets that thread take the GIL


def _broadcast_from_rank0(box: list[Any], who: str, what: str) -> None:
    """Rank 0's ``box`` (a list) into ``box`` on every rank (as ``broadcast_object_list``); a timeout or broken
    process group (a rank that crashed or was killed meanwhile: gloo's bare "Connection reset by peer") raises a
    :class:`VisualizationError` starting with ``who`` and naming ``what`` was being shared."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    try:
        box[:] = _exchange_objects(box if rank == 0 else None, world, to=None, src=0)
    except Exception as exc:  # timeouts and broken process groups
        raise VisualizationError(
            f"{who}: sharing {what} across {world} ranks failed on rank {rank} ({type(exc).__name__}: {exc}). Every "
            "rank must reach the same point: check that no rank skipped the callback or crashed, or raise the "
            "process-group timeout (DDPStrategy(timeout=...)) if one rank is much slower."
        ) from exc


def _failure(error: BaseException | None) -> str | None:
    """What a rank sends of its outcome: ``None``, or ``"<ErrorType>: <message>"``."""
    return None if error is None else f"{type(error).__name__}: {error}"


def _ranks_failed(failures: list[str | None]) -> str:
    """The failed ranks of gathered :func:`_failure` outcomes: ``"rank 1: E"``, one error on several ranks named
    once (``"ranks 0, 1: E"``: a check of the probes they share); ``""`` when none failed."""
    by_error: dict[str, list[int]] = {}
    for r, e in enumerate(failures):
        if e is not None:
            by_error.setdefault(e, []).append(r)
    return "; ".join(f"rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}: {e}" for e, rs in by_error.items())


def gather_results(trainer: Trainer, local: Any, error: BaseException | None, what: str = "visualization") -> Any:
    """Gather every rank's ``local`` results (concatenated in rank order) on rank 0, which writes them; the other
    ranks get ``None`` (they would only hold every rank's maps until the run ends).

    Every rank calls this exactly once per run, also a rank that failed or has no probes (it sends
    ``None``), so all ranks make the same collective calls: a small gather of the outcomes on all ranks, then one of
    the results on rank 0. If any rank failed, every rank raises a :class:`VisualizationError` naming the failed
    ranks and their errors.
    """
    rank, world = _world(trainer)
    failure = _failure(error)
    distributed = world > 1 and _dist_ready()
    failures = _all_gather(failure, f"{what} outcomes", rank, world) if distributed else [failure]
    msg = _ranks_failed(failures)
    if msg:
        if error is not None:
            raise VisualizationError(f"lightning-viz {what} failed: {msg}") from error
        raise VisualizationError(f"lightning-viz {what} failed: {msg}")
    if not distributed:
        return _concat([_to_cpu(local)])
    try:
        gathered = _exchange_objects(_to_cpu(local), world, to=0)
    except Exception as exc:  # timeouts and broken process groups
        raise VisualizationError(
            f"lightning-viz: gathering {what} results on rank 0 failed on rank {rank} ({type(exc).__name__}: {exc}). "
            "Every rank must reach the same point: check that no rank crashed, or raise the process-group timeout "
            "(DDPStrategy(timeout=...)) if one rank is much slower."
        ) from exc
    return None if gathered is None else _concat(gathered)


def _stop_all_ranks(trainer: Trainer, error: BaseException | None, who: str, what: str) -> None:
    """Raise ``error`` if this rank's ``what`` failed, and under DDP on every other rank too (all ranks call this:
    one small gather): a check of one rank's data (item 0 of a dataset sharded per rank) fails there only, and the
    others would wait in the next collective (Lightning's post-setup barrier) until gloo or nccl gives up."""
    rank, world = _world(trainer)
    if world > 1 and _dist_ready():
        msg = _ranks_failed(_all_gather(_failure(error), f"{who}'s outcome of {what}", rank, world))
        if msg and error is None:
            raise VisualizationError(f"lightning-viz {who}: {what} failed on another rank ({msg}); every rank stops.")
    if error is not None:
        raise error


def _share_rank0_error(error: BaseException | None, what: str, force: bool = False) -> None:
    """Broadcast rank 0's outcome; every other rank raises if rank 0 failed (all ranks call this), with
    ``force`` (see :meth:`VisualizationCallback._failed`) as the error's attribute: rank 0's
    :class:`VisualizationError` word for word (it names the callback and the rank), another error as
    ``lightning-viz <what> failed on rank 0: <error>``."""
    text = _failure(error)
    if isinstance(error, VisualizationError):
        text = str(error)
    box: list[Any] = [text, force, isinstance(error, VisualizationError)]
    _broadcast_from_rank0(box, "lightning-viz", f"rank 0's {what} status")
    if box[0] is not None and error is None:
        failed = VisualizationError(box[0] if box[2] else f"lightning-viz {what} failed on rank 0: {box[0]}")
        failed.force = bool(box[1])  # type: ignore[attr-defined]
        raise failed


# torch's messages for a conv/pool window larger than what is left of the image after the model's downsampling
_TOO_SMALL = re.compile(r"too small|Kernel size can't be greater|smaller than kernel size")
# ... for two paths of a model (a residual add) whose maps differ in size on sides the model's strides do not divide
_ODD_SIZE = re.compile(r"tensor a \(\d+\) must match the size of tensor b \(\d+\) at non-singleton dimension [23]\b")
# ... and for a flatten + linear head built for images of another size
_FLAT_HEAD = re.compile(r"mat1 and mat2 shapes cannot be multiplied")


def image_size_hint(x: Tensor, exc: Exception) -> str:
    """Why a model failed on an image of ``x``'s size, when torch's message says so; else ``""``."""
    h, w = x.shape[-2:]
    if _TOO_SMALL.search(str(exc)):
        return (
            f"The images ({h}x{w} px) are too small for the model: its downsampling leaves a feature map smaller "
            "than a later kernel. Use larger images (a resize transform in the data) or a model that downsamples "
            "less."
        )
    if _ODD_SIZE.search(str(exc)):
        return (
            f"Two paths of the model (e.g. a residual add) likely meet with maps of different sizes on {h}x{w} px "
            "images: its downsampling needs sides divisible by its total stride (often 32). Resize or crop the "
            "images to such sides."
        )
    if _FLAT_HEAD.search(str(exc)):
        return (
            f"A linear layer got another number of features than it was built for: a flatten + linear head sized "
            f"for images other than {h}x{w} px. Give the images the size the model was built for (a resize "
            "transform), or end its features with a global pooling (nn.AdaptiveAvgPool2d(1))."
        )
    return ""


def _dense_hint(out: Any) -> str:
    """What to do with a dense ``[B, K, H, W]`` output a ``logits_fn`` gave (a segmentation head); else ``""``."""
    if not isinstance(out, Tensor) or out.ndim != 4:
        return ""
    return (
        " It is a dense map (a segmentation head): let the logits_fn average it over the pixels (return "
        "out.mean(dim=(2, 3)) of that map) to explain each class's mean score over the image."
    )


#: autograd nodes that only reshape, select or cast the output (looked through for the op that made it)
_SHAPE_OPS = ("Squeeze", "Unsqueeze", "View", "Reshape", "Select", "Slice", "Clone", "ToCopy", "Expand", "Alias")


class VisualizationCallback(Callback):
    """Base class. Subclasses set ``method`` and override :meth:`compute` and :meth:`log_results`.

    Args:
        every_n_epochs: Lightning's ``ModelCheckpoint`` convention: run when ``(current_epoch + 1) % n == 0``
            (``n=1``: every epoch; ``n=2``: epochs 1, 3, 5, ...), and always at the last epoch of a fit: at its
            epoch-end hook when the end is known there (``current_epoch == max_epochs - 1``, ``max_steps``
            reached, ``trainer.should_stop`` already set), else at ``on_train_end`` on the final weights, logged
            at that epoch's step (an EarlyStopping after this callback, a last epoch without validation).
            ``0`` turns the epoch-end runs off. Under ``trainer.validate`` it runs at every call (unless ``0``).
        run_on: ``"train_epoch_end"`` (default) or ``"validation_epoch_end"`` (also runs under
            ``trainer.validate``, inside inference mode; ``trainer.test`` and ``trainer.predict`` run no callback).
            With several validations per epoch (``val_check_interval`` < 1.0 or an int) it runs once per epoch: at
            the validation after the epoch's last training batch when the schedule has one, else at the first
            validation of the epoch.
            A ``trainer.validate`` logs at step ``current_epoch``, or after the latest step this callback wrote
            to the same log directory (validating twice after fit: two steps, never one step twice).
            A fit where it could never run (no validation data or ``validation_step``, ``limit_val_batches=0``,
            or no scheduled epoch that validates) is refused at setup.
        num_probes: how many probe images to pick (class-stratified, seeded).
        probe_seed: seed of the probe pick.
        probe_source: ``"val"`` (fall back to train) or ``"train"`` dataloader's dataset; with several val
            dataloaders (a list, or a dict), the first one's.
        probes: an explicit :class:`ProbeSet` (overrides the three options above).
        log_time: log the seconds each run took as ``viz-<method>/time_s``.
        name: optional namespace inserted in every tag after the family (``viz-<method>/<name>/...``), to tell
            apart two instances of one callback (e.g. two targets); also part of the checkpoint state key.
        on_error: ``"raise"`` (default: a failed run stops training with a :class:`VisualizationError`)
            or ``"warn"`` (warn and go on training; under DDP every rank decides the same way). Errors while
            logging (e.g. a full disk when writing or flushing) are handled the same way.
        run_at_start: also run once before training (``on_train_start`` of a fresh fit, not on resume), a
            baseline of the untrained model, logged at step ``-1`` (:data:`BASELINE_STEP`); epoch ``e`` logs at
            step ``e``.
        logits_fn: how to call the model and get logits ``[B, K]``: a callable ``(model, x) -> logits`` or its
            dotted import path (``"my_pkg.heads.logits"``, for YAML). Default: ``model(x)``, whose output is used
            as is when a tensor, else its ``logits`` entry or attribute. Checked by one forward at setup.
        loggers: where to write, by name: ``None`` (default) every logger in ``trainer.loggers`` (plus the
            plain image folder when none of them stores images), or a list of the trainer's logger names
            (``"tensorboard"``, ``"csv"``, ``"mlflow"``, ``"wandb"``, ...) and ``"folder"``. ``[]`` writes
            nowhere, and then nothing is computed (one warning).
        class_names: names of the classes (index -> name) for captions and legends; default the
            datamodule's or the probe dataset's ``classes`` (torchvision ``ImageFolder`` convention), else indices.
        epoch_summary: count this callback in the one line logged at every epoch end (logger ``lightning_viz``:
            ``lightning-viz epoch 3: 1.7 s (embeddings 0.55 s, cam 0.29 s)``); no line when no callback is counted.
        num_threads: torch CPU threads while this callback computes (``None``: as training; restored after). On a
            machine where other processes hold cores, ``1`` keeps the many small steps of the input optimizations
            from waiting at every OpenMP barrier for a descheduled thread (class-model images: 0.43 s with one
            thread, 4.8 s with two, on a loaded 2-core machine; see ``benchmarks/README.md``).
    """

    method: str = "viz"
    #: the default memory budget per forward is multiplied by this (halved after running out of device memory)
    _budget_scale: float = 1.0
    #: False for methods whose work is not split over probes (e.g. filters, class-model images):
    #: only rank 0 computes, and nothing is gathered.
    per_probe: bool = True
    #: False for methods that use no probe images at all: ``compute``/``log_results`` get ``probe=None``.
    needs_probes: bool = True
    #: How :meth:`compute` uses the model: ``"logits"`` (reads logits), ``"forward"`` (only runs it, e.g. to
    #: hook layers) or ``"none"`` (never calls it). Decides what :meth:`adapted` returns and checks at setup.
    model_use: Literal["logits", "forward", "none"] = "logits"
    #: True when :meth:`compute` takes gradients of the logits w.r.t. the input: the setup forward then checks that
    #: the input reaches the logits through autograd (not a backbone called under ``torch.no_grad()``).
    needs_input_grad: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Each subclass's ``__init__`` runs under :meth:`_naming`, so an option error names the callback
        (``CAMCallback: ...``) also when a shared helper raised it: with many callbacks in one YAML config,
        the message is all that tells which one is wrong."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_names_errors", False):
            return

        params = list(inspect.signature(init).parameters)[1:]
        own = cls.__module__.startswith("lightning_viz.")  # a subclass of yours may take inf for its own options

        @functools.wraps(init)
        def named_init(self: VisualizationCallback, *args: Any, **kw: Any) -> None:
            with self._naming():
                if own:
                    refuse_non_finite({**dict(zip(params, args)), **kw})
                try:
                    init(self, *args, **kw)
                except TypeError as exc:  # the innermost __init__ that refused it says so, naming the user's class
                    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
                    if unknown is None or unknown.group(1) not in kw:
                        raise
                    option, name = unknown.group(1), kw.get("name")
                    raise unknown_option_error(type(self), option, VisualizationCallback, name) from None

        named_init._names_errors = True  # type: ignore[attr-defined]
        cls.__init__ = named_init  # type: ignore[method-assign]

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
        logits_fn: Optional[Union[str, Callable]] = None,
        loggers: Optional[list[str]] = None,
        run_at_start: bool = False,
        class_names: Optional[list[str]] = None,
        epoch_summary: bool = True,
        num_threads: Optional[int] = None,
    ):
        super().__init__()
        who = type(self).__name__
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise ValueError(f"{who}: num_threads must be an int >= 1 or None (as training); got {num_threads!r}")
        self.num_threads = num_threads
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise ValueError(
                f"{who}: every_n_epochs must be an int >= 0 (0 = off, as in ModelCheckpoint); got {every_n_epochs!r}"
            )
        if run_on not in ("train_epoch_end", "validation_epoch_end"):
            raise ValueError(f"{who}: run_on must be 'train_epoch_end' or 'validation_epoch_end'; got {run_on!r}")
        if probe_source not in ("val", "train"):
            raise ValueError(f"{who}: probe_source must be 'val' or 'train'; got {probe_source!r}")
        if num_probes < 1:
            raise ValueError(f"{who}: num_probes must be >= 1; got {num_probes}")
        if on_error not in ("raise", "warn"):
            raise ValueError(f"{who}: on_error must be 'raise' or 'warn'; got {on_error!r}")
        if isinstance(loggers, str):
            raise ValueError(
                f"{who}: loggers must be a list of logger names, e.g. [{loggers!r}]; got the string {loggers!r}"
            )
        if name is not None and (not name.strip() or "/" in name):
            raise ValueError(f"{who}: name must be a non-empty tag part without '/'; got {name!r}")
        self.every_n_epochs = every_n_epochs
        self.run_on = run_on
        self.num_probes = num_probes
        self.probe_seed = probe_seed
        self.probe_source = probe_source
        self.probes = probes
        self._probes_given = probes is not None
        self.log_time = log_time
        self.name = name
        self.on_error = on_error
        resolve_logits_fn(logits_fn)  # a bad path or type fails here
        self.logits_fn = logits_fn
        self._adapter: ModelAdapter | None = None
        self._num_classes: int | None = None  # columns of the logits, seen at the setup forward
        self._one_logit = False  # the model gives one logit, read as classes 0 and 1 (seen at the setup forward)
        self.loggers = None if loggers is None else list(loggers)
        self.run_at_start = run_at_start
        self._last_run_epoch: int | None = None  # last epoch run in this fit (never run an epoch twice)
        self._trained_epoch: int | None = None  # last epoch trained in this fit
        #: per log destination (:func:`_destination`): each step written there -> by trainer.validate (shared by the
        #: callbacks of one state key, see :meth:`_steps_written`)
        self._written: dict[tuple[str, ...], dict[int, bool]] = {}
        self.class_names = None if class_names is None else [str(c) for c in class_names]
        self.epoch_summary = epoch_summary
        self._found_class_names: list[str] | None = None
        self.last_logged_tags: list[str] = []
        self.last_duration_s: float | None = None

    #: set by :meth:`_run_and_report` while a later callback runs at the same point (see :meth:`run`)
    _defer_writes = False
    #: the step :meth:`run` chose (for the epoch line of :meth:`_run_and_report`)
    _run_step: int | None = None
    #: the setup stage whose model checks wait for ``configure_model`` (see :meth:`setup`), else ``None``
    _model_checks_due: str | None = None
    #: 1, or ``k`` for the k-th callback of one family and ``name`` on a Trainer (set at setup): its ``time_s_<k>``
    _twin: int = 1
    #: the Trainer this callback last ran or was set up under (see :meth:`_start_over`)
    _ran_with: weakref.ReferenceType[Trainer] | None = None
    #: the last epoch run according to a checkpoint restored in this entry point (``trainer.validate(ckpt_path=...)``
    #: logs after it, see :meth:`_validate_step`), else ``None``
    _restored_epoch: int | None = None
    #: ``False`` from :meth:`on_load_checkpoint` until :meth:`load_state_dict` when this entry point does not run the
    #: callback (``trainer.test`` / ``predict``, ``trainer.validate`` of a ``train_epoch_end`` one): state left alone
    _takes_state: bool = True

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

    def check_input(self, model: ModelAdapter, x: Tensor) -> None:
        """Checks that need one forward (``x``: one data item, ``[1, C, H, W]``), run at setup inside
        :func:`isolated` after the model output was checked; ``model`` is :meth:`adapted`."""

    def dev_run_probes(self) -> int:
        """Under ``Trainer(fast_dev_run=...)``: how many probes the one run takes at most, the first ones of the set
        (the pick goes round the classes: one per class first)."""
        return 2

    def dev_run_options(self) -> dict[str, Any]:
        """Under ``Trainer(fast_dev_run=...)``: the options the one run takes instead of the callback's own, smaller
        ones that still go through every part of it (``{"steps": 2}``), by attribute name (a dotted name reaches an
        attribute's own: ``"tracker.deletion_steps"``). Set for the run, restored after it; the setup checks saw the
        options as given, so a fast dev run fails on them as a real run would."""
        return {}

    #: set by :meth:`_dev_sized` for the run of a fast dev run: :meth:`run` takes :meth:`dev_run_probes` probes
    _dev_run_size = False

    @contextmanager
    def _dev_sized(self, trainer: Trainer) -> Iterator[None]:
        """Inside the block, under fast_dev_run, the options of :meth:`dev_run_options` and the probe cap; else
        nothing changes."""
        if not dev_run(trainer):
            yield
            return
        saved: list[tuple[Any, str, Any]] = []
        try:
            for path, value in self.dev_run_options().items():
                *parents, attr = path.split(".")
                owner = functools.reduce(getattr, parents, self)
                saved.append((owner, attr, getattr(owner, attr)))
                setattr(owner, attr, value)
            self._dev_run_size = True
            yield
        finally:
            self._dev_run_size = False
            for owner, attr, value in reversed(saved):
                setattr(owner, attr, value)

    @contextmanager
    def _naming(self) -> Iterator[None]:
        """Layer and option errors raised inside start with this callback's class and ``name=`` if given
        (``CAMCallback 'b': ...``: with several callbacks attached, the user sees which one is wrong)."""
        try:
            yield
        except (LayerNotFoundError, ValueError, TypeError) as exc:
            who = type(self).__name__
            label = instance_label(who, getattr(self, "name", None))
            message = str(exc)
            if message.startswith(label) or isinstance(exc, VisualizationError):
                raise
            try:
                named = type(exc)(label + message[len(who) :] if message.startswith(who) else f"{label}: {message}")
            except Exception:  # an exception type that takes other arguments: as it was
                raise exc from None
            raise named from exc

    def check_layer_outputs(
        self,
        model: ModelAdapter,
        x: Tensor,
        layers: list[str],
        dims: Optional[tuple[int, ...]] = (4,),
        what: str = "layers",
        needs_grad: Optional[str] = None,
    ) -> dict[str, Tensor]:
        """At setup: one no-grad forward of ``x`` recording ``layers``; each output must have one of ``dims``
        dimensions (4: a ``[B, C, h, w]`` feature map, 2: ``[B, C]`` features), else a clear error naming this
        callback and option ``what``; ``None``: any shape. With 4, a Swin stage's channels-last ``[B, h, w, C]`` and a
        ViT block's ``[B, tokens, C]`` are read as ``[B, C, h, w]`` maps from now on (``read_as_map``).
        A layer the forward does not call fails too. With ``needs_grad`` (the callback needs gradients of the layers;
        what works instead, a sentence ending the error) the forward runs with autograd on, and a layer that runs with
        it off (inside ``torch.no_grad()`` in the forward) fails. Returns the outputs (detached)."""
        if dims is not None and 4 in dims:  # a Swin stage's [B, h, w, C], a ViT block's tokens: read as maps
            self.read_as_maps(model, x, layers)
        grad = needs_grad is not None
        with grad_enabled() if grad else torch.no_grad(), capture(model, layers, grad=grad) as cap:
            model(x.detach().clone().requires_grad_() if grad else x)
        if needs_grad is not None:
            check_layers_get_gradients(type(self).__name__, cap.without_grad, needs_grad)
        outs = {n: cap[n].detach() for n in layers}
        for n, out in outs.items():
            if dims is not None and out.ndim not in dims:
                kinds = " or ".join({4: "a [B, C, h, w] feature map", 2: "[B, C] features"}[d] for d in dims)
                raise ValueError(
                    f"{type(self).__name__}: {what} names {n!r}, whose output has shape {tuple(out.shape)}, but it "
                    f"needs {kinds} (channels are the units). Choose a convolution layer or a block of them "
                    "(e.g. 'layer4' of a ResNet); a transformer block's [B, tokens, D] output is one only after a "
                    "conv patch embedding (a ViT's, read on its grid)."
                )
        return outs

    def read_as_maps(self, model: ModelAdapter, x: Tensor, layers: list[str]) -> dict[str, MapLayout]:
        """At setup: ``layers`` whose output is a channels-last ``[B, h, w, C]`` map (a Swin stage) or ``[B, tokens,
        C]`` after a conv patch embedding (a ViT block) are read as ``[B, C, h, w]`` maps from now on, as
        pytorch-grad-cam's ``reshape_transform`` does (:func:`~lightning_viz.capture.read_as_map`); says so once."""
        unsure: dict[str, str] = {}
        read_as_map(model, dict(map_layouts(model, x, layers, unsure)), explicit=False)
        layouts = {n: lay for n in layers if (lay := layout_of(model, n)) is not None}
        for name, layout in layouts.items():
            if getattr(rank_zero_only, "rank", 0) == 0:  # the lightning_viz logger, as the start-up line
                _log.info("lightning-viz: %s: %s", type(self).__name__, layout.describe(name))
        for name, reader in unsure.items():
            if not layout_set_explicitly(model, name):
                with torch.no_grad(), capture(model, [name]) as cap:
                    model(x)
                rank_zero_warn(
                    f"{type(self).__name__}: layer {name!r} gives shape {list(cap[name].shape)}, and {reader!r} "
                    "reads the last axis of a tensor of that shape: whether it is a channels-last [B, h, w, C] map "
                    "(a Swin or ConvNeXt stage at h == C) cannot be told, so it is read as [B, C, h, w]. If it is "
                    "channels-last, say so before fit: lightning_viz.read_as_map(model, "
                    f"{{{name!r}: lightning_viz.MapLayout('channels_last')}}) (None: as it is, and no warning).",
                    category=VisualizationWarning,
                )
        return layouts

    def adapted(self, pl_module: torch.nn.Module) -> Any:
        """``pl_module`` behind this callback's model adapter (a :class:`~lightning_viz.targets.ModelAdapter`, typed
        ``Any`` as it stands in for the LightningModule in subclasses' signatures): ``adapted(m)(x)`` gives logits
        ``[B, K]`` (``model_use="logits"``) or the raw output; layer names, parameters and hooks are those of
        ``pl_module``. One adapter object per (model, ``logits_fn``), shared by callbacks (and their pass caches)."""
        if isinstance(pl_module, ModelAdapter):
            return pl_module
        if self._adapter is None or self._adapter.module is not pl_module:
            self._adapter = model_adapter(pl_module, self.logits_fn, logits=self.model_use == "logits")
        return self._adapter

    def __getstate__(self) -> dict[str, Any]:
        # the adapter holds the model: never pickled with the callback (nor the weak reference to a Trainer)
        return {**self.__dict__, "_adapter": None, "_ran_with": None}

    def warn_non_finite(self, what: str, values: Tensor, rows: str = "probes") -> Tensor:
        """``True`` per row of ``values`` (dim 0: ``rows``) that is all finite; warns (rank 0, naming this callback)
        when some are not, e.g. after the model's weights became NaN."""
        ok = torch.isfinite(values.detach()).flatten(1).all(dim=1) if values.ndim > 1 else torch.isfinite(values)
        if not bool(ok.all()):
            rank_zero_warn(
                f"{type(self).__name__}: {what} contain non-finite values (NaN or inf) for {int((~ok).sum())} of "
                f"{ok.numel()} {rows} (has the model diverged?)"
                + ("; these are left out of the images, statistics and fixed scales." if rows == "probes" else "."),
                category=VisualizationWarning,
            )
        return ok

    def class_options(self) -> dict[str, list[int]]:
        """Class indices this callback's options name, ``{option: indices}``: checked against the model's classes
        at the setup forward, not at the first run. Default: a class-index ``target`` and ``tracker.target``."""
        out: dict[str, list[int]] = {}
        tracker = getattr(self, "tracker", None)
        for option, spec in (
            ("target", getattr(self, "target", None)),
            ("tracker.target", getattr(tracker, "target", None)),
        ):
            try:
                target = None if spec is None else resolve_target(spec)
            except (ValueError, TypeError):  # not a target (e.g. AdversarialCallback's attack mode)
                target = None
            if isinstance(target, ClassTarget):
                out[option] = [target.index]
        return out

    def needs_labels(self) -> bool:
        """True when :meth:`compute` needs probe labels (e.g. ``target="label"``); checked on the data at setup."""
        return False

    def extra_state(self) -> dict[str, Any]:
        """Subclass state to keep in checkpoints (history for filmstrips, fixed scales, ...)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Replace the state :meth:`extra_state` keeps by ``state`` (``{}``: forget it, as a fresh fit does)."""

    def shared_tags(self) -> set[str]:
        """Tags (after ``viz-<family>/<name>/``) this callback writes whatever its methods and layers, e.g. one panel
        per probe: two callbacks of one family writing one of them must be told apart by ``name=`` (checked at setup).
        """
        return set()

    def state_key_parts(self) -> tuple[Any, ...]:
        """Distinguish several instances of one callback class in a checkpoint (override to add options)."""
        return (self.name, self.method, self.num_probes, self.probe_seed, self.probe_source)

    # ------------------------------------------------------------------ schedule
    def should_run(self, trainer: Trainer) -> bool:
        """Whether this epoch end is scheduled (see ``every_n_epochs`` in the class docstring)."""
        if trainer.sanity_checking or self.every_n_epochs == 0:
            return False
        if not _fitting(trainer):  # trainer.validate: every call
            return True
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0 or _last_epoch(trainer)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._restored_epoch = None  # set again by load_state_dict when this entry point restores a checkpoint
        self._takes_state = True
        _number_twins(trainer)
        if getattr(trainer, "barebones", False) or not _runs_under(self, stage):  # nothing runs: nothing to check
            self._model_checks_due = None
            _announce(trainer, stage)
            return
        error = None
        try:  # the checks of one rank's data (item 0 of a dataset sharded per rank) may fail there only
            self._setup_checks(trainer, pl_module, stage)
        except Exception as exc:  # raised on every rank by _stop_all_ranks
            error = exc
        _stop_all_ranks(trainer, error, self._label(), "the setup checks")
        _announce(trainer, stage)

    def _setup_checks(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _check_strategy(self, trainer)
        _check_tag_clash(self, trainer, stage)
        check_sinks(trainer, self.loggers, type(self).__name__, self.name)
        self._num_classes = None
        if not sink_names(trainer, self.loggers):
            rank_zero_warn(
                f"lightning-viz: {type(self).__name__} writes nowhere (loggers={self.loggers}), so it "
                "computes nothing. Attach a logger or allow one, e.g. loggers=None (all) or ['folder'].",
                category=NothingWrittenWarning,
            )
        if stage == "fit":
            self._last_run_epoch = self._trained_epoch = None
            self._start_over(trainer)
            with self._naming():
                self._check_schedule(trainer, pl_module)
        else:  # trainer.validate
            self._start_over(trainer)
        # A model that builds its layers in configure_model or its own setup (Lightning calls both after this hook) is
        # checked once they exist: on_fit_start / on_validation_start, still before the first step.
        self._model_checks_due = stage if _builds_in_configure_model(pl_module) else None
        if self._model_checks_due is None:
            with self._naming():
                self.check_model(trainer, pl_module, stage)

    def _start_over(self, trainer: Trainer) -> None:
        """A fresh fit (or a ``trainer.validate``) under another Trainer than the one this callback last ran under
        (callbacks reused for a new model or data: a sweep, a notebook cell run again) starts over: probes it picked
        are picked again from this run's data, class names found again, and the history (filmstrips, drift, fixed
        scales) forgotten. A resumed fit (``ckpt_path``) gets them back from the checkpoint, restored after setup.
        Being set up counts as running: probes picked for a fit that stopped before any visualization (an error in
        the first epoch) are not taken into the next Trainer's fit on other data."""
        before, ran_with = self._ran_with, None if self._ran_with is None else self._ran_with()
        self._ran_with = weakref.ref(trainer)
        if before is None or ran_with is trainer or trainer.current_epoch != 0 or trainer.global_step != 0:
            return
        if not self._probes_given:
            self.probes = None
        self._found_class_names = None
        self.load_extra_state({})

    def check_model(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """The setup checks that need the model's layers: :meth:`check` (options against the model) and one
        forward of a data item (:meth:`_check_model_call`). Subclasses add theirs after ``super()``."""
        self.check(pl_module)
        self._check_model_call(trainer, pl_module)

    def _warn_probabilities(self, logits: Tensor, how: str) -> None:
        """Warn when the model's ``[1, K]`` output looks like probabilities (in [0, 1], summing to 1): a softmax
        in its forward. The callbacks take a softmax of the logits for probabilities (captions, faithfulness,
        occlusion ``prob``, Score-CAM); over probabilities that is a second one, flattened toward 1/K."""
        v = logits.detach().double()
        if v.shape[1] < 2 or not bool(torch.isfinite(v).all()) or not bool(((v >= 0) & (v <= 1)).all()):
            return
        if abs(float(v.sum()) - 1.0) > 1e-3:
            return
        rank_zero_warn(
            f"{type(self).__name__}: {how} returns probabilities (its output is in [0, 1] and sums to 1: a "
            "softmax in the forward?), but lightning-viz reads logits: the maps explain the probabilities, and the "
            "probabilities it shows (captions, faithfulness curves, occlusion 'prob', Score-CAM) are a softmax of "
            "them, flattened toward 1/K. Return the logits before the softmax, or set logits_fn=lambda model, x: "
            "model(x).log() (log-probabilities: their softmax is the model's probabilities).",
            category=VisualizationWarning,
        )

    def _warn_sigmoid(self, raw: Tensor, how: str) -> None:
        """Warn when the model's output is a sigmoid's (its autograd graph ends in one, up to reshapes and casts): a
        forward ending in ``nn.Sigmoid`` / ``torch.sigmoid`` (a binary or multi-label model trained with ``BCELoss``)
        returns probabilities where lightning-viz reads logits. Seen only when the setup forward builds a graph."""
        fn = raw.grad_fn
        while fn is not None and type(fn).__name__.startswith(_SHAPE_OPS) and fn.next_functions:
            fn = fn.next_functions[0][0]
        if fn is None or type(fn).__name__ != "SigmoidBackward0":
            return
        one = raw.numel() == 1
        rank_zero_warn(
            f"{type(self).__name__}: {how} ends in a sigmoid, so it returns probabilities, but lightning-viz reads "
            "logits: the maps explain the probabilities (flat where they saturate), and the probabilities it shows "
            "(captions, faithfulness curves, occlusion 'prob', Score-CAM) are taken of them again"
            + (
                " (one output p is read as the logit of class 1: every probe is predicted class 1, shown at 50-73%)"
                if one
                else ""
            )
            + ". Return the logits before the sigmoid (and train with BCEWithLogitsLoss), or set logits_fn=lambda "
            "model, x: torch.logit(model(x), eps=1e-6) (the logits of the model's probabilities).",
            category=VisualizationWarning,
        )

    def _check_uint8_call(self, model: ModelAdapter, x_u8: Tensor, logits: Tensor, how: str) -> None:
        """8-bit data: the callbacks call the model on the same pixels as floats (gradients need them); a forward
        that treats ``uint8`` inputs otherwise (``if x.dtype == torch.uint8: x = x.float() / 255``) would be
        explained on other inputs than it trains on: a clear error. A model that takes no ``uint8`` input at all
        (its first conv raises) is fine: floats are then its only input."""
        try:
            with torch.no_grad():
                ref = as_logits(read_logits(model.call(x_u8)), 1)
        except Exception:
            return
        if not isinstance(ref, Tensor) or ref.shape != logits.shape:
            return
        dtype = str(logits.dtype).replace("torch.", "")
        ref, got = ref.detach().double(), logits.detach().double()
        if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(got).all())):
            return
        err = float((ref - got).abs().max())
        if err > 1e-3 * (1.0 + float(ref.abs().max())):
            raise ModelOutputError(
                f"{type(self).__name__}: the data gives uint8 images, and {how} returns other logits for a uint8 item "
                f"than for the same pixel values as {dtype} (up to {err:.3g} apart), "
                "which is what lightning-viz passes (gradients need floating-point inputs): the maps would explain "
                "other inputs than the model trains on. Convert regardless of the dtype in the forward (e.g. "
                "x = x.float() / 255, not only when x.dtype is torch.uint8), or convert in the data (e.g. "
                "torchvision's ToDtype(torch.float32, scale=True))."
            )

    def _run_due_model_checks(self, trainer: Trainer, pl_module: LightningModule) -> None:
        stage = self._model_checks_due
        if stage is not None:
            self._model_checks_due = None
            error = None
            try:
                with self._naming():
                    self.check_model(trainer, pl_module, stage)
            except Exception as exc:  # raised on every rank by _stop_all_ranks
                error = exc
            _stop_all_ranks(trainer, error, self._label(), "the setup checks")

    def _check_model_call(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """One forward of one data item (a probe, else item 0 of the probe dataset; skipped when neither is
        there yet) through :meth:`adapted`, inside :func:`isolated`: the model can be called as configured and
        returns logits ``[B, K]`` (``model_use="logits"``), then :meth:`check_input`. Fails before training."""
        if self.model_use == "none" or (self.every_n_epochs == 0 and not self.run_at_start):
            return
        if not sink_names(trainer, self.loggers):  # nothing would be written: nothing is computed
            return
        if has_lazy_parameters(pl_module):  # its first training forward creates them (drawing from the RNGs): a
            return  # forward here would initialize them otherwise; the checks are made at the first run instead
        x, label = None, None
        if self.probes is not None and len(self.probes) > 0:
            x = self.probes.subset(slice(0, 1)).to("cpu")
            label = None if self.probes.labels is None else self.probes.labels[:1]
        else:
            dataset = _find_dataset(trainer, self.probe_source)
            if dataset is not None:
                try:
                    image, label, _ = read_item(dataset, 0)
                except SampleFormatError as exc:
                    raise VisualizationError(self._unreadable_message(dataset, exc)) from exc
                # 8-bit images too: the callbacks pass them as floats in the parameters' dtype, as below
                usable = isinstance(image, Tensor) and (image.is_floating_point() or image.dtype == torch.uint8)
                x = image[None] if usable else None
        if x is None:
            return
        name = type(self).__name__
        how = "model(x)" if self.logits_fn is None else f"logits_fn={self.logits_fn!r}"
        with isolated(pl_module):
            model = self.adapted(pl_module)
            x_u8 = x.to(module_device(model), copy=True) if x.dtype == torch.uint8 else None
            x = x.to(module_device(model), module_dtype(model), copy=True)
            x_in = x.clone().requires_grad_() if self.needs_input_grad and self.model_use == "logits" else x
            try:
                with torch.enable_grad() if x_in.requires_grad else torch.no_grad():
                    out = model.call(x_in)
            except Exception as exc:
                hint = image_size_hint(x, exc) or (
                    "If its forward takes other arguments or inputs, set logits_fn=<a callable (model, x) -> "
                    "logits[B, K]> or its dotted import path (YAML)."
                )
                raise ModelOutputError(
                    f"{name}: calling the model as {how} on one data item of shape {tuple(x.shape)} failed "
                    f"({type(exc).__name__}: {exc}). {hint}"
                ) from exc
            if self.model_use == "logits":
                try:
                    raw = read_logits(out)
                except ModelOutputError as exc:
                    raise ModelOutputError(f"{name}: {exc}") from None
                logits = as_logits(raw, x.shape[0])
                if x_in.requires_grad:
                    check_reaches_input(name, logits.requires_grad)
                if logits.ndim != 2 or logits.shape[0] != 1:
                    raise ModelOutputError(
                        f"{name} needs logits [B, K] from the model, but {how} gave {describe_output(raw)} for one "
                        f"input of shape {tuple(x.shape)}"
                        + ("" if out is raw else f" (read from {describe_output(out)})")
                        + "; set logits_fn=<a callable (model, x) -> logits[B, K]> or its dotted import path (YAML)."
                        + (logits_fn_example(raw) if self.logits_fn is None else _dense_hint(raw))
                    )
                self._num_classes = int(logits.shape[1])
                self._one_logit = logits is not raw
                gave = (
                    f"{how} gave logits of shape {tuple(logits.shape)}"
                    if logits is raw
                    else f"{how} gave one logit, shape {tuple(raw.shape)}, read as classes 0 (negative) and 1 "
                    "(positive)"
                )
                if self.class_names is not None and len(self.class_names) < self._num_classes:
                    pair = f", e.g. ['not {self.class_names[0]}', '{self.class_names[0]}']" if logits is not raw else ""
                    raise ValueError(
                        f"{name}: class_names: {len(self.class_names)} names for a model with {self._num_classes} "
                        f"classes ({gave}); give one name per class, by index{pair}, or leave class_names out to use "
                        "the data's `classes`."
                    )
                for option, indices in self.class_options().items():
                    bad = [c for c in indices if not 0 <= c < self._num_classes]
                    if bad:
                        raise ValueError(
                            f"{name}: {option}: class {bad[0] if len(bad) == 1 else bad} is out of range: the model "
                            f"has {self._num_classes} classes (0..{self._num_classes - 1}; {gave})."
                        )
                if getattr(self, "probabilities", "softmax") == "sigmoid" and logits is not raw:
                    raise ValueError(
                        f"{name}(probabilities='sigmoid'): the model has one logit z (a binary classifier), read as "
                        "two classes whose softmax already is sigmoid(z); keep probabilities='softmax' ('sigmoid' "
                        "is for multi-label heads with one logit per class)."
                    )
                self._warn_probabilities(logits, how)
                self._warn_sigmoid(raw, how)
                if x_u8 is not None:
                    self._check_uint8_call(model, x_u8, logits, how)
                if self.needs_labels() and isinstance(label, Tensor) and label.numel() == 1:
                    # a class index the model has: else fail now, not at the first epoch end (check_model runs
                    # under _naming, which puts this callback's name in front of the message)
                    check_labels(label.reshape(1), self._num_classes)
            self.check_input(model, x)
            choose_memory_format(model, x, out)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # after a checkpoint's callback states are restored (a resumed run keeps its probes), before the sanity check
        self._run_due_model_checks(trainer, pl_module)
        self._setup_probes(trainer)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not _fitting(trainer) and _runs_under(self, "validate"):  # trainer.validate
            self._run_due_model_checks(trainer, pl_module)
            self._setup_probes(trainer)

    def _check_schedule(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Refuse a ``run_on="validation_epoch_end"`` schedule that can never run in this fit."""
        if self.run_on != "validation_epoch_end" or self.every_n_epochs == 0:
            return
        name, n = type(self).__name__, self.every_n_epochs
        fix = "Use run_on='train_epoch_end', or give the fit validation data"
        limit = getattr(trainer, "limit_val_batches", 1.0)
        if limit == 0:
            raise ValueError(
                f"{name} would never run: run_on='validation_epoch_end' but the Trainer has "
                f"limit_val_batches={limit}, so no validation runs. {fix} (limit_val_batches > 0)."
            )
        source = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "val_loop", None)
        source = getattr(source, "_data_source", None)
        defined = source is None or source.is_defined()
        if not defined or not is_overridden("validation_step", pl_module):
            what = "validation_step" if defined else "val dataloader"
            raise ValueError(
                f"{name} would never run: run_on='validation_epoch_end' but the fit has no {what}, so no "
                f"validation runs. {fix} (val_dataloaders=..., a datamodule with val_dataloader(), and "
                "a validation_step)."
            )
        every_val = getattr(trainer, "check_val_every_n_epoch", 1)
        max_epochs = getattr(trainer, "max_epochs", None)
        if every_val is None or max_epochs is None or max_epochs <= 0:  # by steps, no last epoch, or no epoch at all
            return
        if not any(
            (e + 1) % every_val == 0 and ((e + 1) % n == 0 or e == max_epochs - 1)
            for e in range(min(max_epochs, every_val * n))
        ):
            # what would run: a max_epochs ending on a validating epoch (always scheduled, being the last), a
            # check_val_every_n_epoch dividing max_epochs (the same), every_n_epochs=1 if some epoch validates
            fixes = [
                f"max_epochs={-(-max_epochs // every_val) * every_val} (a multiple of check_val_every_n_epoch)",
                f"a check_val_every_n_epoch that divides max_epochs={max_epochs} (e.g. 1)",
            ]
            if n != 1 and max_epochs >= every_val:
                fixes.append("every_n_epochs=1")
            raise ValueError(
                f"{name} would never run: run_on='validation_epoch_end' with every_n_epochs={n} but the Trainer "
                f"validates only at epochs {every_val - 1}, {2 * every_val - 1}, ... "
                f"(check_val_every_n_epoch={every_val}) and max_epochs={max_epochs} ends before any of them is "
                f"scheduled. Use {', '.join(fixes)}, or run_on='train_epoch_end'."
            )

    def check_probes(self, probe: ProbeSet) -> None:
        """Validate the probe set against the options (at setup when the data allows, else when picked)."""
        if self.needs_labels() and probe.labels is None:
            raise ValueError(
                f"{type(self).__name__}: target='label' needs a class label per image, but the probe images have "
                f"none{self._origin()}: its items give no label, or one that is not a class (a class index, or a "
                "one-hot / probability vector), e.g. a multi-label or regression target, or a negative one (-1 marking "
                "unlabeled images, or the negative class of labels -1/1: give 0/1). Use target='predicted' or a class "
                "index, or data that yields (x, y)."
            )
        if self.needs_labels() and probe.labels is not None and self._num_classes is not None:
            try:  # every probe's label is a class of the model (seen at the setup forward)
                check_labels(probe.labels, self._num_classes)
            except ValueError as exc:
                raise ValueError(f"{type(self).__name__}: {exc}") from None

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _warn_epochless(trainer)
        if _baseline_due(self, trainer):  # a fresh fit, not a resume
            if has_lazy_parameters(pl_module):  # no forward created them yet (no sanity check): the first step will
                rank_zero_warn(
                    f"{type(self).__name__}: run_at_start=True, but the model's lazy layers (nn.LazyConv2d, ...) have "
                    "no weights before the first training step: no baseline is logged. Call the model once on a "
                    "batch before fit (in __init__ or setup) to get one.",
                    category=VisualizationWarning,
                )
                return
            self._run_and_report(trainer, pl_module, "start", step=BASELINE_STEP, scheduled=True)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trained_epoch = trainer.current_epoch
        # already run: at a checkpoint saved before this hook (see on_save_checkpoint), also in the fit resumed from it
        if self.run_on == "train_epoch_end" and self._last_run_epoch != trainer.current_epoch:
            self._run_and_report(trainer, pl_module, "train_epoch_end")

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _dev_report(trainer)  # the first callback's call says it for all

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        _finish_writes()
        self._release_model(pl_module)  # a fit stopped by an error, Ctrl+C or SIGTERM gets no teardown

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _finish_writes()
        self._release_model(pl_module)

    def _release_model(self, pl_module: LightningModule) -> None:
        """The fit (validate, test) is over: keep no reference to its model, and through it its Trainer (a callback
        kept for the next experiment held both until its next fit): our adapter (the next stage's setup adapts the
        model again), and the model's ``log`` / ``log_dict`` Lightning attached to every callback (it attaches them
        again at the next fit, validate or test)."""
        self._adapter = None
        for name in ("log", "log_dict"):
            if getattr(vars(self).get(name), "__self__", None) is pl_module:
                delattr(self, name)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The last epoch of a fit is always visualized. When its end was not known at the epoch-end hook (an
        # EarlyStopping or other callback setting should_stop after this one, no validation in the last epoch),
        # run now, on the final weights, at that epoch's step.
        epoch = self._trained_epoch
        if epoch is not None and self.every_n_epochs > 0 and self._last_run_epoch != epoch:
            self._run_and_report(trainer, pl_module, "end", step=epoch, scheduled=True)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.run_on != "validation_epoch_end" or not _chosen_validation(trainer):
            return
        if _fitting(trainer) and self._last_run_epoch == trainer.current_epoch:
            return  # once per epoch, also when the first validation of an epoch was the chosen one
        self._run_and_report(trainer, pl_module, "validation_epoch_end")

    def _run_and_report(
        self, trainer: Trainer, pl_module: LightningModule, where: str, step: int | None = None, scheduled: bool = False
    ) -> None:
        """:meth:`run`, then its part of the one log line of this point (see :func:`_epoch_report`)."""
        if not (scheduled or self.should_run(trainer)) or not sink_names(trainer, self.loggers):
            return
        start, clock = time.perf_counter(), time.monotonic()
        cbs = _viz_callbacks(trainer)
        # a later callback runs at this point too: this run's background image writes need not be waited for (the
        # last run waits for all of them), so they overlap the later callbacks' computations
        self._defer_writes = self in cbs and any(_runs_at(c, trainer, where) for c in cbs[cbs.index(self) + 1 :])
        self._run_step, self._run_failed = None, False
        try:
            with (
                interruptible(functools.partial(_stop_on_sigterm, self, trainer)),  # a long loop stops at a SIGTERM
                warnings_above_bars(),  # not glued to a tqdm bar
                self._dev_sized(trainer),  # fast_dev_run: the reduced options, restored after the run
            ):
                if scheduled:
                    self.run(trainer, pl_module, step=step, scheduled=True)
                else:  # the plain call, as subclasses overriding run(trainer, pl_module) expect
                    self.run(trainer, pl_module)
        finally:
            self._defer_writes = False
            _pause_val_clock(trainer, time.monotonic() - clock)
        step = (self._run_step if self._run_step is not None else trainer.current_epoch) if step is None else step
        _epoch_report(self, trainer, step, where, time.perf_counter() - start)

    def get_class_names(self, trainer: Trainer | None) -> list[str] | None:
        """Class names (index -> name): the ``class_names`` option, else ``classes`` of the trainer's datamodule
        or of the probe dataset (torchvision ``ImageFolder`` convention), else ``None`` (indices are shown)."""
        if self.class_names is not None:
            return self.class_names
        if self._found_class_names is None and trainer is not None:
            looked = _names_looked.setdefault(trainer, {})
            if self.probe_source not in looked:  # once per trainer: data without names are not asked again each run
                names = getattr(getattr(trainer, "datamodule", None), "classes", None)
                if names is None:
                    names = dataset_attr(_find_dataset(trainer, self.probe_source), "classes")
                if names is None or isinstance(names, (str, bytes)):
                    looked[self.probe_source] = None
                else:
                    looked[self.probe_source] = [str(c) for c in names]
            self._found_class_names = looked[self.probe_source]
        names = self._found_class_names
        if names is not None and len(names) == 1 and self._one_logit:  # the data names the positive class alone
            return [f"not {names[0]}", names[0]]
        return names

    # ------------------------------------------------------------------ probes
    def get_probes(self, trainer: Trainer) -> ProbeSet:
        """The full probe set (same on every rank): given, picked at setup, or picked on first use."""
        if self.probes is None:
            probes = self._pick_probes(trainer)
            self.check_probes(probes)  # failing: picked and checked again at the next run (not computed unchecked)
            self.probes = probes
        return self.probes

    def _setup_probes(self, trainer: Trainer) -> None:
        """Pick the probes before training when the data allows, so that data problems (no labels, no masks, images of
        different sizes, an IterableDataset) stop the run before the first step. Under DDP every rank then takes rank
        0's probes (:func:`_rank0_probes`), also given ones, and a failure on one rank raises on all."""
        if not self.needs_probes or (self.every_n_epochs == 0 and not self.run_at_start):
            return
        if not sink_names(trainer, self.loggers):  # nothing would be written: nothing is read or computed
            return
        probes, error = self.probes, None
        if probes is None:
            try:
                dataset, iterable = _find_dataset(trainer, self.probe_source, with_iterable=True)
                if dataset is None and iterable is not None:
                    raise VisualizationError(self._no_dataset_message(iterable))
                if dataset is not None:  # else no data known yet: picked at the first run
                    probes = self._pick_probes(trainer)
            except Exception as exc:  # raised on every rank by _rank0_probes
                error = exc
        self.probes = self._same_probes(trainer, probes, error, raise_errors=True)
        if self.probes is not None:
            self.check_probes(self.probes)

    def _same_probes(
        self, trainer: Trainer, probes: ProbeSet | None, error: BaseException | None, raise_errors: bool = False
    ) -> ProbeSet | None:
        """Rank 0's probes on every rank (all ranks call this, see :func:`_rank0_probes`); a shared pick that another
        callback takes too is replaced with them."""
        world = _world(trainer)[1]
        if self._probes_given and probes is not None:
            why = (
                f"the probes given (probes=...) differ across the {world} ranks (built from unseeded random "
                "numbers, or from each rank's own data?); every rank uses rank 0's. Build the same probes on every "
                "rank."
            )
        else:
            why = (
                f"the {getattr(self, '_probe_origin', 'probe')} dataset the probes are picked from differs across "
                f"the {world} ranks (sharded per rank?), so each rank picked other images; every rank uses rank 0's "
                "probes. Give every rank the whole dataset to pick from, or pass probes=ProbeSet(...)."
            )
        agreed = _rank0_probes(trainer, probes, error, type(self).__name__, why, raise_errors)
        if agreed is not probes and probes is not None:
            picks = _picks.get(trainer, {})
            for key, value in list(picks.items()):
                if value is probes:
                    picks[key] = agreed  # type: ignore[assignment]
        return agreed

    def _origin(self) -> str:
        origin = getattr(self, "_probe_origin", None)
        return "" if origin is None else f" (picked from the {origin} dataset)"

    def _no_dataset_message(self, iterable: Any = None) -> str:
        other = "train" if self.probe_source == "val" else "val"
        seen = f" (found {type(iterable).__name__}, an IterableDataset)" if iterable is not None else ""
        return (
            f"{type(self).__name__}: found no map-style {self.probe_source} or {other} dataset to pick probes from"
            f"{seen}: probes are picked by index (len() and indexing), which an IterableDataset cannot do. Pass "
            "probes=ProbeSet(images=..., labels=...) or give the Trainer a datamodule / dataloaders over a "
            "map-style dataset."
        )

    def _unreadable_message(self, dataset: Any, exc: Exception) -> str:
        return (
            f"{type(self).__name__}: reading an item of the {_dataset_name(dataset)} dataset "
            f"(probe_source={self.probe_source!r}) failed: {exc}. Make its items a tensor, (image, label[, mask]) "
            "or such a dict, or pass probes=ProbeSet(images=..., labels=...)."
        )

    def _pick_probes(self, trainer: Trainer) -> ProbeSet:
        """Pick (or take the pick of an earlier callback with the same options); this rank's pick (see
        :meth:`_same_probes`)."""
        dataset = _find_dataset(trainer, self.probe_source)
        if dataset is None:
            raise VisualizationError(self._no_dataset_message())
        dm = getattr(trainer, "datamodule", None)
        mean, std = _first_not_none(dm, "mean"), _first_not_none(dm, "std")
        source = f"the {type(dm).__name__} datamodule's mean/std attributes"
        if mean is None:
            source = f"the {_dataset_name(dataset)} dataset's mean/std attributes"
        mean = mean if mean is not None else dataset_attr(dataset, "mean")  # also through Subset / ConcatDataset
        std = std if std is not None else dataset_attr(dataset, "std")
        if mean is None and std is None:  # none declared: the Normalize of the dataset's transform, if any
            mean, std = dataset_normalization(dataset) or (None, None)
            source = f"the Normalize transform of the {_dataset_name(dataset)} dataset"
        self._probe_origin = _dataset_name(dataset)
        picks = _picks.setdefault(trainer, {})
        key = (id(dataset), self.num_probes, self.probe_seed)
        if key not in picks:  # callbacks with the same options share one pick (and one copy in checkpoints)
            try:
                picks[key] = ProbeSet.from_dataset(
                    dataset, num=self.num_probes, seed=self.probe_seed, mean=mean, std=std
                )
            except SampleFormatError as exc:
                raise VisualizationError(self._unreadable_message(dataset, exc)) from exc
            except NormalizationMismatchError as exc:
                shown = ", ".join(
                    f"{name}={torch.as_tensor(v, dtype=torch.float64).flatten().tolist()}"
                    for name, v in (("mean", mean), ("std", std))
                    if v is not None
                )
                raise VisualizationError(
                    f"{type(self).__name__}: the normalization the probes are shown with, {shown} from {source}, "
                    f"does not fit the images: {exc}. Fix those values, or pass probes=ProbeSet(..., mean=..., "
                    "std=...)."
                ) from exc
            except Exception as exc:
                # images of different sizes: the usual cause (unless the message already says what to do)
                sizes = ("size" in str(exc) or "stack" in str(exc)) and "Resize" not in str(exc)
                hint = (
                    " Make the dataset's items stackable (e.g. a resize transform, torchvision.transforms.Resize((H, "
                    "W)), so that every image has one size), or pass probes=ProbeSet(...)."
                    if sizes
                    else " Or pass probes=ProbeSet(...)."
                )
                raise VisualizationError(
                    f"{type(self).__name__}: picking {self.num_probes} probe images (probe_seed={self.probe_seed}) "
                    f"from the {_dataset_name(dataset)} dataset failed: {type(exc).__name__}: {exc}.{hint}"
                ) from exc
            _warn_batch_hooks(trainer)
        if len(picks[key]) < self.num_probes:
            rank_zero_warn(
                f"{instance_label(type(self).__name__, self.name)}: num_probes={self.num_probes} "
                f"but the {_dataset_name(dataset)} dataset it picks from (probe_source={self.probe_source!r}) has only "
                f"{len(picks[key])} items: all {len(picks[key])} are the probes. Lower num_probes to silence this.",
                category=VisualizationWarning,
            )
        return picks[key]

    # ------------------------------------------------------------------ run
    def run(
        self, trainer: Trainer, pl_module: LightningModule, step: int | None = None, scheduled: bool = False
    ) -> dict[str, Any] | None:
        """Compute on this rank's shard, gather, and log on rank 0 at ``step`` (default: the epoch).
        Returns the gathered results (on rank 0; ``None`` on the others under DDP, see :func:`gather_results`).
        ``scheduled=True`` skips :meth:`should_run`.

        Under DDP every rank makes the same collective calls whatever happens: per-probe methods gather the
        probes' fingerprints (every rank takes rank 0's probes) and the results (a rank without probes sends
        ``None``); then one broadcast of rank 0's outcome, so an
        error on any rank (picking probes, computing, or rank 0's logging) raises on every rank
        instead of leaving the others waiting in the next collective.
        """
        if not scheduled and not self.should_run(trainer):
            return None
        if not sink_names(trainer, self.loggers):  # nothing would be written
            return None
        self._ran_with = weakref.ref(trainer)
        step = trainer.current_epoch if step is None else step
        if _fitting(trainer) and step >= 0:
            self._last_run_epoch = step
        elif trainer.is_global_zero and step == trainer.current_epoch:  # trainer.validate at the plain step
            step = self._validate_step(trainer, step)
        self._run_step = step
        rank, world = _world(trainer)
        start = time.perf_counter()
        distributed = self.per_probe and self.needs_probes and world > 1  # without probes there is nothing to split
        probe, local, error, stage, picked = None, None, None, "probes", False
        try:
            if self.needs_probes and (distributed or rank == 0):
                if distributed and self.probes is None:  # this rank's pick, checked once it is rank 0's (below)
                    self.probes, picked = self._pick_probes(trainer), True
                probe = self.get_probes(trainer)
        except Exception as exc:  # re-raised on every rank below
            error = exc
        if distributed:  # probes picked now (or given) may differ across ranks: rank 0's, None if a rank failed
            try:
                probe = self._same_probes(trainer, probe, error)
            except VisualizationError as exc:  # the gather itself failed (a timeout, a broken process group)
                self._failed(exc)
                return None
            self.probes = self.probes if probe is None else probe
            if picked and probe is not None:  # the probes every rank uses: the same check (and outcome) everywhere
                try:
                    self.check_probes(probe)
                except Exception as exc:  # re-raised on every rank by gather_results
                    error, self.probes = exc, None
        if probe is not None and self._dev_run_size:  # fast_dev_run: the first probes (one per class first)
            probe = probe.subset(slice(0, self.dev_run_probes()))
        if error is None and (distributed or rank == 0) and not (distributed and probe is None):
            stage = "compute"
            shard = probe.shard(rank, world) if distributed and probe is not None else probe
            try:
                if shard is not None and len(shard) == 0:
                    local = None
                else:
                    local = self._compute_within_memory(pl_module, shard, rank, world)
            except Exception as exc:  # re-raised on every rank by gather_results
                error = exc
        if distributed:
            try:
                results = gather_results(trainer, local, error, what=self._instance())
            except VisualizationError as exc:  # raised on every rank alike
                self._failed(exc)
                return None
            error = None
        else:  # as a DDP gather gives them: detached, on the CPU (no GPU memory kept by a subclass's history)
            results = _to_cpu(local)
        if rank == 0 and error is None and results is not None:
            stage = "log"
            try:
                if not logging_disabled(trainer):  # a dry run (fast_dev_run) writes no step
                    self._note_step(trainer, step)
                logger = VizLogger.from_trainer(trainer, step=step, namespace=self.name, loggers=self.loggers)
                logger.write_in_background(self._owner())
                try:
                    with one_thread():  # small tensors: threads cost more than they give, the most on a busy machine
                        self.log_results(logger, results, probe, trainer)
                    self.last_duration_s = time.perf_counter() - start
                    if self.log_time:
                        timing = "time_s" if self._twin == 1 else f"time_s_{self._twin}"
                        logger.scalar(make_tag(self.method, timing), self.last_duration_s)
                finally:
                    self.last_logged_tags = logger.written
                    logger.flush()
            except Exception as exc:  # any logging error (a full disk when writing or flushing): shared below
                error = exc
        culprit, force = self._label(), False
        if rank == 0 and not self._defer_writes:  # everything left to the writer thread is done (below: shared)
            for owner, failure in wait_for_writes():
                if owner.key != id(self) and owner.warn:  # an earlier callback's, on_error="warn": warned here
                    rank_zero_warn(
                        f"lightning-viz {owner.label} failed while logging at step {step}: "
                        f"{type(failure).__name__}: {failure} (on_error='warn': training goes on)",
                        category=VisualizationWarning,
                    )
                elif error is None:  # this callback's own, or an earlier one's that raises whatever this one does
                    error, stage, culprit, force = failure, "log", owner.label, owner.key != id(self)
        failed: BaseException | None = None  # what this rank raises: under DDP rank 0 shares it with the others
        if error is not None and stage == "log":
            msg = f"lightning-viz {culprit} failed while logging at step {step}: {type(error).__name__}: {error}"
            failed = VisualizationError(msg)
        elif error is not None and stage == "compute":  # a rank-0-only computation under DDP names its rank
            where = " on rank 0" if world > 1 and not distributed else ""
            msg = f"lightning-viz {self._instance()} failed{where}: {type(error).__name__}: {error}"
            failed = VisualizationError(msg)
        elif error is not None:
            failed = error  # rank 0's own probe-picking error: unchanged type
        if world > 1 and _dist_ready():
            try:
                _share_rank0_error(failed if rank == 0 else None, self._instance(), force)
            except VisualizationError as exc:  # rank 0 failed: every other rank gets here
                self._failed(exc, force=getattr(exc, "force", False))
                return None
        if failed is not None:
            self._failed(failed, None if failed is error else error, force=force)
            return None
        return results

    def _compute_within_memory(self, pl_module: LightningModule, shard: ProbeSet | None, rank: int, world: int) -> Any:
        """:meth:`compute`, isolated; after running out of device memory (``torch.OutOfMemoryError``), computed
        again with half the default memory budget per forward (:func:`~lightning_viz.methods.batching.scaled_budget`;
        an explicit ``chunk_size`` is kept), up to :data:`OOM_RETRIES` times. Later runs keep the smaller budget."""
        while True:
            try:
                with (
                    scaled_budget(self._budget_scale),
                    isolated(pl_module),
                    torch_threads(self.num_threads),
                    reporting(self._instance() if rank == 0 else None),
                ):
                    return self.compute(pl_module, shard)
            except torch.OutOfMemoryError as exc:
                if self._budget_scale <= 0.5**OOM_RETRIES:
                    raise torch.OutOfMemoryError(
                        f"{exc} (lightning-viz: still out of memory at 1/{round(1 / self._budget_scale)} of the "
                        "default memory budget per forward; lower num_probes or set chunk_size)"
                    ) from exc
                reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else "no details"
            # here the failed attempt's tensors are free (the exception and its frames are gone)
            device = module_device(pl_module)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self._budget_scale /= 2
            with scaled_budget(self._budget_scale):
                budget = default_memory_mb(device)
            warnings.warn(
                f"{self._label()} ran out of device memory{f' on rank {rank}' if world > 1 else ''} ({reason}); "
                f"computing again with half the memory budget per forward ({budget:.3g} MiB of activations; an "
                "explicit chunk_size is kept). Later runs keep it.",
                VisualizationWarning,
                stacklevel=2,
            )

    def _validate_step(self, trainer: Trainer, step: int) -> int:
        """The step of a ``trainer.validate`` run: ``step`` (the epoch), or past every step this callback
        wrote to the same log destination (a second validate after fit: the next step, never one step twice), and
        past the epochs of a checkpoint it validates (``ckpt_path=``: its filmstrips and drift go on from them)."""
        restored = self._restored_epoch
        if restored is not None and step <= restored:  # a fresh Trainer (epoch 0) on a fit's checkpoint
            step = restored + 1
        written = self._steps_written(trainer)
        if not written or step > max(written):
            return step
        free = max(written) + 1
        _log.info(  # rank 0, inside the validation loop: the lightning_viz logger prints above a progress bar
            "lightning-viz: %s under trainer.validate logs at step %d (this log directory already has its step %d%s).",
            self._label(),
            free,
            step,
            " and later" if max(written) > step else "",
        )
        return free

    def _note_step(self, trainer: Trainer, step: int) -> None:
        """Remember that this callback writes ``step`` (rank 0); a fit writing where a validate wrote says so."""
        written = self._steps_written(trainer)
        fitting = _fitting(trainer)
        if fitting and written.get(step):
            sinks = sink_names(trainer, self.loggers)
            files = [w for n, w in ((FOLDER, "the image folder's"), ("mlflow", "MLflow's")) if n in sinks]
            kept = ["TensorBoard shows both"] if "tensorboard" in sinks else []
            kept += [f"{' and '.join(files)} files of that step are replaced by the fit's"] if files else []
            _log.info(  # rank 0, inside the fit loop: the lightning_viz logger prints above a progress bar
                "lightning-viz: %s writes step %d, which a trainer.validate before this fit already wrote to this log "
                "directory (%s); give the fit its own logger version to keep them apart.",
                self._label(),
                step,
                "; ".join(kept) or "both are kept",
            )
        written[step] = written.get(step, False) or not fitting
        latest = max(written)
        for s in [s for s, by_validate in written.items() if not by_validate and s < latest]:
            del written[s]  # a fit's step below the latest: never asked about again (bounded over long runs)

    def _steps_written(self, trainer: Trainer) -> dict[int, bool]:
        """The steps written to this trainer's log destination by this callback or any other with its state key (the
        same tags): a fresh instance for each entry point (``LightningModule.configure_callbacks``) goes on after
        them too. Each step maps to whether a ``trainer.validate`` wrote it. A destination's entries last while a
        Trainer that wrote there does (:func:`_writes_to`); this instance keeps its own steps beyond."""
        destination = _destination(trainer)
        _writes_to(trainer, destination)
        key = (destination, self.state_key)
        written = _steps_by_key.get(key)
        if written is None:
            written = _steps_by_key[key] = self._written.get(destination, {})
        self._written[destination] = written
        return written

    def _instance(self) -> str:
        """This instance in messages and the epoch line: ``gradients``, ``gradients[a]`` with ``name="a"``, and
        ``gradients#2`` for the second of several callbacks of one family and name on one Trainer (:attr:`_twin`)."""
        label = self.method if self.name is None else f"{self.method}[{self.name}]"
        return label if self._twin == 1 else f"{label}#{self._twin}"

    def _label(self) -> str:
        """``"GradientCallback (gradients[a])"``: the callback in messages."""
        return f"{type(self).__name__} ({self._instance()})"

    def _owner(self) -> WriteOwner:
        return WriteOwner(self._label(), id(self), self.on_error == "warn")

    def _failed(self, error: BaseException, cause: BaseException | None = None, force: bool = False) -> None:
        """Raise ``error`` (``on_error="raise"``, or ``force``: an earlier callback's failure whose own setting is
        "raise") or warn and let training go on (``"warn"``)."""
        if self.on_error == "warn" and not force:
            rank_zero_warn(f"{error} (on_error='warn': training goes on)", category=VisualizationWarning)
            self._run_failed = True  # the epoch's line says so
            return None
        if cause is not None:
            raise error from cause
        raise error

    # ------------------------------------------------------------------ checkpoint
    @property
    @override
    def state_key(self) -> str:
        key = self._generate_state_key(key=self.state_key_parts())
        _refuse_duplicate(self, key)
        return key

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "probes": None if self.probes is None else self.probes.state_dict(),
            "extra": self.extra_state(),
            "last_run_epoch": self._last_run_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._takes_state:  # a checkpoint restored by an entry point this callback does not run under
            self._takes_state = True
            return
        if state_dict.get("probes") is not None:
            self.probes = ProbeSet.from_state_dict(state_dict["probes"])
        self.load_extra_state(state_dict.get("extra") or {})
        self._last_run_epoch = state_dict.get("last_run_epoch")
        self._restored_epoch = self._last_run_epoch

    def _due_after_checkpoint(self, trainer: Trainer) -> bool:
        """Whether this epoch's run is still to come though the training it shows is over: a checkpoint saved
        between its last step and ``on_train_epoch_end`` (``train_epoch_end``: ModelCheckpoint at the validation
        after the last batch, with ``val_check_interval`` < 1.0 or ``check_val_every_n_epoch`` > 1, or at the last
        batch's ``on_train_batch_end`` with ``every_n_train_steps``), or (``validation_epoch_end``) at the
        ``on_train_batch_end`` of the batch whose validation is the one it runs at: a fit resumed from there skips
        that validation (Lightning fast-forwards past it), so it runs now, on the weights that validation sees."""
        if not _fitting(trainer) or trainer.sanity_checking:
            return False
        if trainer.state.status != "running":  # e.g. OnExceptionCheckpoint saving after an error: nothing runs
            return False
        epoch = trainer.fit_loop.epoch_progress.current  # an epoch under way, its end hooks not reached (not after fit)
        if not getattr(epoch, "started", 0) > getattr(epoch, "processed", 0):
            return False
        progress = trainer.fit_loop.epoch_loop.batch_progress
        current = progress.current  # a _ProcessedTracker: ``processed`` counts the batches trained (and stepped)
        trained = current.ready == getattr(current, "processed", -1) > 0
        if self.run_on == "train_epoch_end":
            return progress.is_last_batch and trained and _runs_at(self, trainer, "train_epoch_end")
        if trainer.validating or not trained or not _validates_after_batch(trainer):
            return False
        return _chosen_validation(trainer) and _runs_at(self, trainer, "validation_epoch_end")

    @override
    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Run now when this epoch's run is still to come (:meth:`_due_after_checkpoint`; the weights are the epoch's
        final ones), so the checkpoint holds it and a fit resumed from it goes on after it; then move this callback's
        probes into the checkpoint's shared probe bank (each image stored once)."""
        states = checkpoint.get("callbacks")
        term = getattr(trainer, "received_sigterm", False)  # after a SIGTERM: saved at once, the run left out
        if isinstance(states, dict) and self.state_key in states and not term and self._due_after_checkpoint(trainer):
            self._run_and_report(trainer, pl_module, self.run_on)
            states[self.state_key] = self.state_dict()
        entry = (checkpoint.get("callbacks") or {}).get(self.state_key)
        probes = entry.get("probes") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and isinstance(probes, dict) and "images" in probes:
            entry["probes"] = {"bank_ref": probe_bank_put(checkpoint.setdefault(PROBE_BANK_KEY, {}), probes)}

    @override
    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        """Lightning calls this before :meth:`load_state_dict`: resolve the probe-bank reference in place. An entry
        point that does not run this callback (``trainer.test(ckpt_path=...)``) restores nothing: its probes and
        history would otherwise carry into a later fresh fit as if it were that checkpoint's run."""
        stage = getattr(getattr(trainer, "state", None), "fn", None)
        self._takes_state = stage is None or _runs_under(self, str(getattr(stage, "value", stage)))
        states = checkpoint.get("callbacks") or {}
        entry = states.get(self.state_key, states.get(self._legacy_state_key))
        if entry is None and self._takes_state:
            self._say_options_changed(trainer, states)
        probes = entry.get("probes") if isinstance(entry, dict) else None
        if isinstance(entry, dict) and isinstance(probes, dict) and "bank_ref" in probes:
            entry["probes"] = probe_bank_get(checkpoint[PROBE_BANK_KEY], probes["bank_ref"])

    def _say_options_changed(self, trainer: Trainer, states: dict[Any, Any]) -> None:
        """A checkpoint without this callback's state but with one of its class and ``name`` that no callback of this
        Trainer takes: it was saved with other options (those of :meth:`state_key_parts`). Say what that costs."""
        cls, taken = type(self).__qualname__, {cb.state_key for cb in _viz_callbacks(trainer)}
        for key in states:
            if not isinstance(key, str) or not key.startswith(cls + "{") or key in taken:
                continue
            try:
                parts = ast.literal_eval(key[len(cls) :]).get("key")
            except (ValueError, SyntaxError, TypeError, AttributeError, MemoryError, RecursionError):
                continue
            if isinstance(parts, tuple) and parts and parts[0] == self.name:
                now = self.state_key_parts()
                changed = ", ".join(f"{a!r} -> {b!r}" for a, b in zip(parts, now) if a != b) or "other parts"
                rank_zero_warn(
                    f"{self._label()}: the checkpoint holds the state of a {cls} of this name saved with other "
                    f"options ({changed}; its key {parts}, here {now}: name, family, num_probes, probe_seed, "
                    "probe_source, then options of its own such as target, methods and layers), so its probes, "
                    "filmstrips, drift and fixed scales are not restored: they start afresh in this run. Give it "
                    "the checkpointed run's options to go on with them, or another name= to start afresh without "
                    "this warning.",
                    category=VisualizationWarning,
                )
                return


#: per log destination and callback state key: the steps written there (see ``VisualizationCallback._steps_written``)
_steps_by_key: dict[tuple[tuple[str, ...], str], dict[int, bool]] = {}
#: the live Trainers that wrote to each destination of :data:`_steps_by_key`
_trainers_by_destination: dict[tuple[str, ...], weakref.WeakSet[Trainer]] = {}


def _writes_to(trainer: Trainer, destination: tuple[str, ...]) -> None:
    """Note that ``trainer`` writes to ``destination``: once the last such Trainer is garbage-collected, the
    destination's folders are done with and its entries of :data:`_steps_by_key` go (a sweep of many fits kept one
    per run and callback for the whole process)."""
    trainers = _trainers_by_destination.setdefault(destination, weakref.WeakSet())
    if trainer not in trainers:
        trainers.add(trainer)
        weakref.finalize(trainer, _trainer_gone, destination).atexit = False  # nothing to free at exit


def _trainer_gone(destination: tuple[str, ...]) -> None:
    trainers = _trainers_by_destination.get(destination)
    if trainers is not None and any(True for _ in trainers):  # another Trainer still writes there
        return
    _trainers_by_destination.pop(destination, None)
    for key in [k for k in _steps_by_key if k[0] == destination]:
        del _steps_by_key[key]


#: trainers already warned that their training data has no epochs (see :func:`_warn_epochless`)
_epochless_warned: weakref.WeakSet[Trainer] = weakref.WeakSet()


def _warn_epochless(trainer: Trainer) -> None:
    """Once per trainer (rank 0): training data without a length (an ``IterableDataset``) and no last epoch
    (``max_epochs=-1``, e.g. set by Lightning for ``max_steps``): an epoch ends only where the stream does, so a stream
    that never ends gets a single visualization, at the end of training, however often it validates."""
    if trainer in _epochless_warned or trainer.num_training_batches != float("inf"):
        return
    if trainer.max_epochs is not None and trainer.max_epochs >= 0:
        return
    if not any(cb.every_n_epochs > 0 for cb in _viz_callbacks(trainer)):
        return
    _epochless_warned.add(trainer)
    rank_zero_warn(
        "lightning-viz: the training data has no length (an IterableDataset), so an epoch ends only when the stream "
        "does: the visualization callbacks run at epoch ends (and once per epoch under run_on='validation_epoch_end'), "
        "so a stream that never ends is visualized once, at the end of training. Set the Trainer's "
        "limit_train_batches=N for epochs of N batches (or give the dataset a __len__).",
        category=VisualizationWarning,
    )


def _stop_on_sigterm(cb: VisualizationCallback, trainer: Trainer, done: int, total: int, what: str) -> None:
    """Raise Lightning's ``SIGTERMException`` (what its loops raise after the hook) once the Trainer got a SIGTERM: a
    loop of many chunks (Score-CAM's masked images, occlusion windows, ...) stops at its next step, not minutes
    later; the model is restored on the way out, nothing more is logged at this point."""
    if not getattr(trainer, "received_sigterm", False):
        return
    rank, world = _world(trainer)
    where = f" on rank {rank}" if world > 1 else ""
    _log.warning(
        "lightning-viz %s: SIGTERM received%s; stopped at %d/%d %s, nothing more logged at step %s (the fit stops)",
        cb._label(),
        where,
        done,
        total,
        what,
        cb._run_step if cb._run_step is not None else trainer.current_epoch,
    )
    raise SIGTERMException()


def _pause_val_clock(trainer: Trainer, seconds: float) -> None:
    """With validation by time (``val_check_interval`` a ``timedelta``, dict or ``"DD:HH:MM:SS"``), the ``seconds`` a
    run took in training (before it, at a train epoch end or step) are not training time: Lightning's clock since the
    last validation is moved on by them, so attaching a callback adds no validation (nor moves the checkpoints and
    early stopping decided there). A run inside a validation needs nothing: Lightning restarts the clock when it ends.
    """
    if getattr(trainer, "_val_check_time_interval", None) is None or not _fitting(trainer) or trainer.validating:
        return
    last = getattr(trainer, "_last_val_time", None)
    if isinstance(last, (int, float)):
        trainer._last_val_time = last + seconds  # type: ignore[attr-defined]


def _finish_writes() -> None:
    """Wait for the images still being written in the background (a fit stopped by an error, or ended) and end the
    writer thread; an error writing them is warned about, not raised over the one that stopped the fit."""
    close_writer()
    for owner, failure in wait_for_writes():
        rank_zero_warn(
            f"lightning-viz {owner.label} failed while logging: {type(failure).__name__}: {failure}",
            category=VisualizationWarning,
        )


def _refuse_duplicate(callback: VisualizationCallback, key: str) -> None:
    """Lightning refuses two stateful callbacks with one state key at ``Trainer(...)`` with a generic message;
    when that check (``_validate_callbacks_list``) asks for a key it has seen, say how to fix it: ``name=``."""
    frame = sys._getframe(2)
    if frame.f_code.co_name != "_validate_callbacks_list" or key not in frame.f_locals.get("seen_callbacks", ()):
        return
    cls = type(callback).__name__
    raise RuntimeError(
        f"Two {cls} callbacks have the same checkpoint state key ({key}): their options do not tell them apart. "
        f"Give each a distinct name=, e.g. {cls}(..., name='a') and {cls}(..., name='b') (the name is also "
        "inserted in their tags), or remove the duplicate."
    )


def _destination(trainer: Trainer) -> tuple[str, ...]:
    """Where a trainer's runs are written: the image folder (the first logger's directory) and every logger's
    directory or run, so a fresh Trainer on a new logger version starts its steps afresh."""
    parts = [image_folder(trainer)]
    for lg in trainer.loggers:
        log_dir = getattr(lg, "log_dir", None)
        run = (type(lg).__name__, getattr(lg, "save_dir", None), getattr(lg, "version", None))
        parts.append(log_dir if isinstance(log_dir, str) else repr(run))
    return tuple(parts)


def _fitting(trainer: Trainer) -> bool:
    """True while fitting (also in its validation loops); False under ``trainer.validate``/``test``."""
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return fn is None or fn == "fit"


def _last_epoch(trainer: Trainer) -> bool:
    """The fit ends after this epoch: ``max_epochs``, ``max_steps`` or a stop request (e.g. EarlyStopping)."""
    max_epochs = getattr(trainer, "max_epochs", None)
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs - 1:
        return True
    max_steps = getattr(trainer, "max_steps", -1)
    if max_steps is not None and max_steps >= 0 and trainer.global_step >= max_steps:
        return True
    return bool(getattr(trainer, "should_stop", False)) and bool(getattr(trainer.fit_loop, "_can_stop_early", True))


def _validates_after_last_batch(trainer: Trainer) -> bool:
    """Whether this fit's validation schedule has a validation after each epoch's last training batch."""
    if getattr(trainer, "_val_check_time_interval", None) is not None or trainer.check_val_every_n_epoch is None:
        return False  # validation by time or by global step: not tied to epoch ends
    every, n = trainer.val_check_batch, trainer.num_training_batches
    if every is None or every == float("inf") or n == float("inf"):
        return every is not None
    return int(n) % int(every) == 0


def _validates_after_batch(trainer: Trainer) -> bool:
    """At a training batch's end (before Lightning's validation check): whether a validation follows this batch
    (Lightning's own check; never for validation by time, whose moment is not known before)."""
    loop = trainer.fit_loop.epoch_loop
    if getattr(trainer, "_val_check_time_interval", None) is not None or getattr(loop, "_skip_next_val", False):
        return False
    fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
    if fetcher is None:
        return False
    try:
        return bool(loop._should_check_val_fx(fetcher))
    except Exception:  # another Lightning version's loop: run at the validation as usual
        return False


def _chosen_validation(trainer: Trainer) -> bool:
    """With several validations per epoch, the one a ``validation_epoch_end`` callback runs at (see ``run_on``)."""
    if not _fitting(trainer):
        return True
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return progress.is_last_batch or trainer.should_stop or not _validates_after_last_batch(trainer)


def _rank0_probes(
    trainer: Trainer,
    probes: ProbeSet | None,
    error: BaseException | None,
    who: str,
    why: str,
    raise_errors: bool = False,
) -> ProbeSet | None:
    """Under DDP, rank 0's probes on every rank (all ranks call this, also one whose pick failed: ``error``). Ranks
    pick by index from their own dataset, the same everywhere unless it is sharded per rank (e.g. built from the rank
    in a datamodule's ``setup``), and given probes may be built differently per rank: then each rank would draw the
    maps of its share of the probes on other images than rank 0 shows them with. One small gather of the
    fingerprints; rank 0's probes travel only when they differ (one warning: ``who: why``). If a rank failed:
    ``None`` (its error is raised by the caller), or with ``raise_errors`` this rank's error, or one naming the
    failed ranks."""
    rank, world = _world(trainer)
    if world < 2 or not _dist_ready():
        if error is not None and raise_errors:
            raise error
        return probes
    local = (_failure(error), None if probes is None else probes.fingerprint())
    gathered = _all_gather(local, f"{who}'s probe fingerprints", rank, world)
    msg = _ranks_failed([e for e, _ in gathered])
    if msg:
        if not raise_errors:
            return None
        if error is not None:
            raise error
        raise VisualizationError(f"{who}: picking the probes failed on another rank ({msg})")
    prints = [fp for _, fp in gathered]
    if len(set(prints)) == 1:
        return probes
    box: list[Any] = [probes if rank == 0 else None]
    _broadcast_from_rank0(box, who, "rank 0's probes")
    if box[0] is not None:
        rank_zero_warn(f"{who}: {why}", category=VisualizationWarning)
    return box[0]


def _number_twins(trainer: Trainer) -> None:
    """Number the trainer's callbacks of one family and ``name`` in ``trainer.callbacks`` order
    (:attr:`VisualizationCallback._twin`: 1, 2, ...), so the second writes ``time_s_2``, not the first's tag."""
    seen: dict[tuple[str, str | None], int] = {}
    for cb in _viz_callbacks(trainer) if hasattr(trainer, "callbacks") else []:
        key = (cb.method, cb.name)
        seen[key] = cb._twin = seen.get(key, 0) + 1


def _check_tag_clash(callback: VisualizationCallback, trainer: Trainer, stage: str) -> None:
    """Refuse two callbacks of one family (``method``) and ``name`` that would write the same images at every step
    (:meth:`VisualizationCallback.shared_tags`, e.g. two CAM callbacks' panels), one over the other."""
    mine = callback.shared_tags()
    for other in _viz_callbacks(trainer):
        if other is callback:
            return
        if other.method != callback.method or other.name != callback.name or not _runs_under(other, stage):
            continue
        common = sorted(mine & other.shared_tags())
        if common:
            a, b = type(other).__name__, type(callback).__name__
            raise ValueError(
                f"{b} and {a} both write viz-{callback.method}/"
                + ("" if callback.name is None else f"{callback.name}/")
                + f"{{{', '.join(t + '/...' if t in ('panel', 'filmstrip') else t for t in common)}}} at every step "
                f"(same family, name={callback.name!r}): one would be written over the other. Give each a distinct "
                f"name=, e.g. {a}(..., name='a') and {b}(..., name='b') (inserted in their tags)."
            )


def _check_strategy(callback: VisualizationCallback, trainer: Trainer) -> None:
    """Refuse strategies that shard parameters: the unwrapped module there holds only this rank's shard."""
    strategy = getattr(trainer, "strategy", None)
    sharded = next((c.__name__ for c in type(strategy).__mro__ if c.__name__ in SHARDING_STRATEGIES), None)
    if sharded is not None:
        raise ValueError(
            f"{type(callback).__name__} does not support {type(strategy).__name__}: it shards the model's parameters "
            f"across devices ({sharded}), so the module a visualization runs holds only a shard. Supported strategies: "
            "a single device (strategy='auto' with devices=1, SingleDeviceStrategy) and the DDP family ('ddp', "
            "'ddp_spawn', 'ddp_fork', 'ddp_notebook', DDPStrategy(...)). Visualize this model with one of them, e.g. "
            "a short fit or trainer.validate from a checkpoint."
        )


_picks: weakref.WeakKeyDictionary[Trainer, dict[tuple, ProbeSet]] = weakref.WeakKeyDictionary()

#: per trainer and ``probe_source``: the class names found in its data (``None``: none there), looked up once
_names_looked: weakref.WeakKeyDictionary[Trainer, dict[str, list[str] | None]] = weakref.WeakKeyDictionary()


#: per trainer: dataloaders a datamodule's / module's hook returned when the callbacks asked for it before the loops
#: loaded theirs (setup), by (hook owner, hook name, entry point, global step): one call per setup, not per callback
_hook_loaders: weakref.WeakKeyDictionary[Trainer, dict[tuple, Any]] = weakref.WeakKeyDictionary()


def _call_loader_hook(trainer: Trainer, owner: Any, name: str) -> Any:
    """``owner.<name>()`` (``val_dataloader`` / ``train_dataloader`` of a datamodule or module), called at most once
    per trainer, entry point and step, with every global RNG forked (a hook may draw random numbers: training must
    not see them consumed); ``None`` when it is missing or raises."""
    fn = getattr(owner, name, None)
    if fn is None:
        return None
    key = (id(owner), name, str(getattr(trainer.state, "fn", None)), trainer.global_step)
    cache = _hook_loaders.setdefault(trainer, {})
    if key not in cache:
        for old in [k for k in cache if k[:3] == key[:3]]:  # an earlier step's: not asked for again
            del cache[old]
        try:
            with fork_rng():
                cache[key] = fn()
        except Exception:
            cache[key] = None
    return cache[key]


def _source_loaders(trainer: Trainer, which: str) -> Any:
    """Dataloaders given to ``fit``/``validate`` (or a module's dataloader hooks), before the loops load them."""
    loop = getattr(trainer, "fit_loop", None)
    if which == "val":
        loop = getattr(trainer, "validate_loop", None) if not _fitting(trainer) else getattr(loop, "epoch_loop", None)
        loop = getattr(loop, "val_loop", loop)
    source = getattr(loop, "_data_source", None)
    instance = getattr(source, "instance", None)
    if source is None or instance is None or not source.is_defined():
        return None
    if isinstance(instance, (LightningModule, LightningDataModule)):
        return _call_loader_hook(trainer, instance, source.name)
    return instance


#: per trainer: the :class:`CollatedItems` view of each (dataset, collate_fn), one object each (probe picks are shared
#: by the dataset's identity)
_collated_views: weakref.WeakKeyDictionary[Trainer, dict[tuple[int, int], CollatedItems]] = weakref.WeakKeyDictionary()


def _collated(trainer: Trainer, dataset: Any, collate_fn: Any) -> Any:
    """``dataset`` as its loader gives items to the model: through a ``collate_fn`` of the user's
    (:class:`CollatedItems`), else as it is (torch's default collate only stacks them)."""
    if collate_fn is None or collate_fn in (default_collate, default_convert):
        return dataset
    views = _collated_views.setdefault(trainer, {})
    key = (id(dataset), id(collate_fn))
    if key not in views:
        views[key] = CollatedItems(dataset, collate_fn)
    return views[key]


#: trainers warned that the probes skip their batch-transfer hooks
_batch_hooks_warned: weakref.WeakSet[Trainer] = weakref.WeakSet()


def _warn_batch_hooks(trainer: Trainer) -> None:
    """Once per trainer: probes are read from the dataset (through its ``collate_fn``), not through the
    LightningModule's or datamodule's ``on_before_batch_transfer`` / ``on_after_batch_transfer``; a hook there that
    converts or normalizes the images would leave the visualizations other inputs than training's."""
    owners = [o for o in (trainer.lightning_module, getattr(trainer, "datamodule", None)) if o is not None]
    hooks = [
        f"{type(o).__name__}.{h}"
        for o in owners
        for h in ("on_before_batch_transfer", "on_after_batch_transfer")
        if is_overridden(h, o)
    ]
    if not hooks or trainer in _batch_hooks_warned:
        return
    _batch_hooks_warned.add(trainer)
    rank_zero_warn(
        f"lightning-viz: the probe images are read from the dataset (through the DataLoader's collate_fn) and do not "
        f"pass through {' and '.join(hooks)}. If that hook converts or normalizes the images (not only augments them "
        "for training), the visualizations see other inputs than the model trains on: do that step in the dataset's "
        "transform, the collate_fn or the model's forward, or pass probes=ProbeSet(images as the model gets them).",
        category=VisualizationWarning,
    )


def _dataset_name(dataset: Any) -> str:
    """The class name of the user's dataset (not of the :class:`CollatedItems` view over it)."""
    return type(dataset.dataset if isinstance(dataset, CollatedItems) else dataset).__name__


def _find_dataset(trainer: Trainer, source: str, with_iterable: bool = False) -> Any:
    """The map-style dataset behind the val (or train) dataloader, without iterating a sampler.

    With ``with_iterable`` returns ``(dataset, iterable)``, ``iterable`` an IterableDataset seen on the way."""
    order = ["val", "train"] if source == "val" else ["train", "val"]
    found, iterable = None, None
    for which in order:
        loaders = getattr(trainer, "val_dataloaders" if which == "val" else "train_dataloader", None)
        if loaders is None:
            dm = getattr(trainer, "datamodule", None)
            if dm is not None:
                loaders = _call_loader_hook(trainer, dm, "val_dataloader" if which == "val" else "train_dataloader")
        if loaders is None:
            loaders = _source_loaders(trainer, which)
        if isinstance(loaders, CombinedLoader):  # fit(model, CombinedLoader(...)): the loaders it combines
            loaders = loaders.iterables
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        if isinstance(loaders, dict):
            loaders = next(iter(loaders.values()), None)
        dataset = getattr(loaders, "dataset", None)
        if dataset is not None:
            if isinstance(dataset, torch.utils.data.IterableDataset):
                iterable = iterable if iterable is not None else dataset
                continue
            try:
                if len(dataset) > 0:
                    found = _collated(trainer, dataset, getattr(loaders, "collate_fn", None))
                    break
            except TypeError:  # no len(): cannot be sampled by index
                iterable = iterable if iterable is not None else dataset
                continue
    return (found, iterable) if with_iterable else found
