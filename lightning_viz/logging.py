"""Writing visualizations: one writer interface, one backend per logger in ``trainer.loggers``, rank 0 only.

Backends: TensorBoard (images, scalars, projector embeddings, Custom Scalars), MLflow (scalars as metrics,
images as PNG artifacts under ``lightning_viz/epoch_NNNN/<tag>.png``), Weights & Biases (``wandb.Image``
with captions, scalars, embeddings as a ``wandb.Table``), any other Lightning logger (scalars through
its ``log_metrics``, e.g. ``CSVLogger``'s ``metrics.csv``) and a plain image folder (``epoch_NNNN/<tag>.png``,
the ``run_at_start`` baseline in ``before_training/<tag>.png``, plus ``scalars.csv``), used when no attached
logger can store images (``CSVLogger`` alone, ``logger=False``).

Tag scheme: the first segment is ``viz-<family>``, the callback's ``method`` (``viz-cam``, ``viz-gradients``,
``viz-embeddings``, ...), so TensorBoard shows each callback family as its own collapsible group, apart from
the user's own metrics. The rest names what is shown: ``viz-cam/panel/<probe-id>`` (per-probe panel),
``viz-cam/<method>/<layer>/<probe-id>`` and ``.../stats/<stat>`` (per map key), ``viz-cam/time_s`` (seconds
the callback took). A callback's ``name`` goes right after the family: ``viz-cam/<name>/panel/p000``.
The step is always the epoch: TensorBoard, MLflow and ``CSVLogger`` take it as the step of each value;
W&B gets ``epoch`` as the x-axis of every visualization key (``define_metric``), because its own step must
only grow.

TensorBoard serves only 10 images per tag by default (a random sample of the epochs); start it with
:func:`tensorboard_command` (``--samples_per_plugin images=1000``) to see every epoch. Note that
``images=0`` serves *no* image at all in current TensorBoard (2.21), not "all of them".
"""

from __future__ import annotations

import csv
import hashlib
import html
import os
import re
import shlex
import shutil
import struct
import tempfile
import threading
import unicodedata
import weakref
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
from torch import Tensor

from . import _crc32c
from ._warnings import LightningVizWarning, VisualizationWarning
from .render import to_uint8_hwc

__all__ = [
    "find_tensorboard",
    "make_tag",
    "indexed",
    "INDEX_DIGITS",
    "namespaced",
    "TAG_PREFIX",
    "tensorboard_command",
    "TENSORBOARD_SAMPLES_FLAG",
    "VizLogger",
    "NothingWrittenWarning",
    "Backend",
    "TensorBoardBackend",
    "MLflowBackend",
    "WandbBackend",
    "MetricsBackend",
    "FolderBackend",
    "logger_name",
    "sink_names",
    "check_sinks",
    "wait_for_writes",
    "close_writer",
    "submit_write",
    "WriteOwner",
    "describe_sinks",
    "image_folder",
    "image_relpath",
    "step_label",
    "FOLDER",
    "BEFORE_TRAINING",
    "DRY_RUN",
    "logging_disabled",
]

#: Keep up to 1000 images per tag (one per epoch) instead of TensorBoard's default sample of 10.
TENSORBOARD_SAMPLES_FLAG = "--samples_per_plugin images=1000"

#: The name of the plain image folder in a callback's ``loggers`` option.
FOLDER = "folder"
#: Logger names whose backend stores images (the others only get scalars).
IMAGE_LOGGERS = ("tensorboard", "mlflow", "wandb")


def tensorboard_command(logdir: str) -> str:
    """The command that shows a run's visualizations, every epoch of them (the folder quoted for a POSIX shell when it
    needs it: ``--logdir 'my runs'``)."""
    return f"tensorboard --logdir {shlex.quote(str(logdir))} {TENSORBOARD_SAMPLES_FLAG}"


class NothingWrittenWarning(LightningVizWarning):
    """Warned once per callback when it would write nowhere, so its computation is skipped."""


def logger_name(logger: Any) -> str:
    """``"tensorboard"``, ``"csv"``, ``"mlflow"``, ``"wandb"`` (Lightning's loggers and their subclasses), or the class
    name without ``Logger``, lower case; a class of another lineage named like one of Lightning's (a project's own
    ``TensorBoardLogger``) keeps its whole name (``"tensorboardlogger"``): it is not written to as Lightning's."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    builtin = (
        (TensorBoardLogger, "tensorboard"),
        (CSVLogger, "csv"),
        (MLFlowLogger, "mlflow"),
        (WandbLogger, "wandb"),
    )
    for cls, name in builtin:
        if isinstance(logger, cls):
            return name
    name = type(logger).__name__.lower()
    short = name[: -len("logger")] if name.endswith("logger") and name != "logger" else name
    return name if short in (n for _, n in builtin) else short


def _attached(trainer: Any) -> list[Any]:
    return list(getattr(trainer, "loggers", None) or [])


#: The one sink of a trainer whose logging Lightning switched off (``fast_dev_run``): computed, written nowhere.
DRY_RUN = "dry_run"


def logging_disabled(trainer: Any) -> bool:
    """Whether Lightning switched logging off: ``fast_dev_run`` (which swaps every logger for its no-op
    ``DummyLogger``), or only ``DummyLogger`` attached."""
    from lightning.pytorch.loggers.logger import DummyLogger

    if getattr(trainer, "fast_dev_run", False):
        return True
    attached = _attached(trainer)
    return bool(attached) and all(isinstance(lg, DummyLogger) for lg in attached)


def sink_names(trainer: Any, loggers: Optional[Sequence[str]] = None) -> list[str]:
    """Where a callback writes: the names of the chosen loggers, plus ``"folder"`` for the image folder.

    ``loggers=None``: every logger in ``trainer.loggers``, and the image folder when none of them stores
    images (``CSVLogger`` alone, ``logger=False``). A list picks among the attached loggers' names and
    ``"folder"``; ``[]`` writes nowhere. The same on every rank (no logger experiment is created).
    When Lightning switched logging off (:func:`logging_disabled`: ``fast_dev_run``), ``[DRY_RUN]``: the callbacks
    still compute and render (that is what a fast dev run is for: find the bugs; once, at a reduced size, see
    :meth:`~lightning_viz.callbacks.base.VisualizationCallback.dev_run_options`) and write nothing, like
    Lightning's own logging callbacks, whatever ``loggers`` names (except ``[]``). Under ``Trainer(barebones=True)``
    (logging off to measure the loop's raw speed) ``[]``: nothing is computed either.
    """
    if getattr(trainer, "barebones", False):  # Lightning switched logging off to time the loop: nothing is computed
        return []
    if logging_disabled(trainer):
        return [] if loggers is not None and not list(loggers) else [DRY_RUN]
    attached = list(dict.fromkeys(logger_name(lg) for lg in _attached(trainer)))
    if loggers is None:
        return attached if any(n in IMAGE_LOGGERS for n in attached) else attached + [FOLDER]
    return [n for n in dict.fromkeys(loggers) if n == FOLDER or n in attached]


#: What MLflow keeps in a metric name (Lightning's ``MLFlowLogger.log_metrics`` drops the rest, warning each time).
_MLFLOW_DROPS = re.compile(r"[^a-zA-Z0-9_/. -]")


def check_sinks(trainer: Any, loggers: Optional[Sequence[str]], owner: str, name: Optional[str] = None) -> None:
    """Fail early when ``loggers`` names a logger that the trainer does not have, or when the callback's ``name``
    (in every tag) has characters that MLflow drops from metric names while it writes to MLflow."""
    if logging_disabled(trainer):  # fast_dev_run replaced the loggers it would check
        return
    dropped = sorted(set(_MLFLOW_DROPS.findall(_clean(name)))) if name is not None else []
    if dropped and "mlflow" in sink_names(trainer, loggers):
        fixed = _MLFLOW_DROPS.sub("_", _clean(name))
        raise ValueError(
            f"{owner}: name={name!r} has {', '.join(repr(c) for c in dropped)}, which MLflow drops from metric names "
            f"(its metrics would read {_MLFLOW_DROPS.sub('', _clean(name))!r}, its artifacts {name!r}). Allowed: "
            f"letters, digits, '_', '-', '.' and ' ', e.g. name={fixed!r}."
        )
    if loggers is None:
        return
    allowed = list(dict.fromkeys(logger_name(lg) for lg in _attached(trainer))) + [FOLDER]
    unknown = [n for n in loggers if n not in allowed]
    if unknown:
        raise ValueError(
            f"{owner}: loggers={list(loggers)} names {unknown}, which the Trainer does not have. Allowed: {allowed} "
            "(the Trainer's loggers by name, and 'folder' for the plain image folder); None uses them all."
        )


def find_tensorboard(trainer: Any):
    """The first ``TensorBoardLogger`` in ``trainer.loggers`` (or ``None``)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for lg in getattr(trainer, "loggers", []) or []:
        if isinstance(lg, TensorBoardLogger):
            return lg
    return None


def describe_sinks(trainer: Any, loggers: Optional[Sequence[str]] = None) -> str:
    """One line for the user: where the visualizations go (rank 0; creates the MLflow and W&B runs to name them, as
    Lightning does at the fit's start)."""
    parts = []
    for name in sink_names(trainer, loggers):
        if name == DRY_RUN:
            if getattr(trainer, "fast_dev_run", False):
                return (
                    "writing nothing: Lightning switched logging off (fast_dev_run); each runs once, at a reduced "
                    "size (a few probes and steps) that still checks every code path"
                )
            return (
                "writing nothing: every logger is Lightning's no-op DummyLogger, so the visualizations are "
                "computed, to check them, and not written"
            )
        if name == "tensorboard":  # every TensorBoardLogger is written to
            for tb in (lg for lg in _attached(trainer) if logger_name(lg) == name):
                parts.append(f"TensorBoard at {tb.log_dir} (view with: {tensorboard_command(tb.save_dir)})")
        elif name == "csv":
            for lg in (lg for lg in _attached(trainer) if logger_name(lg) == name):
                parts.append(f"CSV at {os.path.join(lg.log_dir, 'metrics.csv')} (scalars only)")
        elif name == FOLDER:
            parts.append(f"an image folder at {image_folder(trainer)}")
        elif name == "mlflow":  # which run (Lightning creates it right after setup anyway): where the artifacts are
            for lg in (lg for lg in _attached(trainer) if logger_name(lg) == name):
                try:
                    run = f" run {lg.run_id} at {getattr(lg, '_tracking_uri', None) or 'the tracking URI'}"
                except Exception:  # an unreachable tracking server: Lightning says so when it creates the run
                    run = ""
                parts.append(f"MLflow{run} (images as artifacts under {MLflowBackend.ARTIFACT_ROOT}/epoch_NNNN/)")
        elif name == "wandb":  # which run (Lightning creates it at the fit's start anyway): where its files are
            for lg in (lg for lg in _attached(trainer) if logger_name(lg) == name):
                parts.append(_wandb_run_words(lg))
        else:  # any other logger, by its class name (``MyLogger``, not "the my logger")
            for lg in (lg for lg in _attached(trainer) if logger_name(lg) == name):
                parts.append(f"{type(lg).__name__} (scalars only, through its log_metrics)")
    return "writing to " + ", ".join(parts) if parts else "writing nowhere, so computing nothing"


def _wandb_run_words(logger: Any) -> str:
    """``W&B run <id> at <page>``, or for an offline run its folder (where its media are) and how to upload it."""
    try:
        run = logger.experiment
        if getattr(run, "disabled", False):  # WANDB_MODE=disabled: a run that keeps nothing
            return "W&B, disabled (WANDB_MODE=disabled: nothing is kept)"
        if getattr(run, "offline", False):
            folder = os.path.dirname(run.dir)  # wandb/offline-run-<time>-<id>; its files/ holds the media
            return f"W&B run {run.id} at {folder} (offline: wandb sync {shlex.quote(folder)} uploads it; x-axis: epoch)"
        return f"W&B run {run.id} at {run.url or run.dir} (x-axis: epoch)"
    except Exception:  # no run to name (W&B unreachable, disabled): Lightning says so when it creates the run
        return "W&B (x-axis: epoch)"


_folders: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


def image_folder(trainer: Any) -> str:
    """The plain image folder of a trainer: ``<log_dir>/lightning_viz`` of its first logger that has a
    ``log_dir`` (e.g. ``CSVLogger``: ``lightning_logs/version_0/lightning_viz``), else (``logger=False``, W&B,
    MLflow) ``<default_root_dir>/lightning_logs/version_<n>/lightning_viz``, where Lightning's default logger would
    have put it, a new version per trainer (never ``./lightning_viz``, the package's own name at a checkout's root)."""
    if trainer in _folders:
        return _folders[trainer]
    folder = None
    for lg in _attached(trainer):
        log_dir = getattr(lg, "log_dir", None)
        if isinstance(log_dir, str) and log_dir:
            folder = os.path.join(log_dir, "lightning_viz")
            break
    if folder is None:
        root = os.path.join(getattr(trainer, "default_root_dir", None) or os.getcwd(), "lightning_logs")
        taken = [
            int(d[len("version_") :])
            for d in (os.listdir(root) if os.path.isdir(root) else [])
            if re.fullmatch(r"version_\d+", d)
        ]
        folder = os.path.join(root, f"version_{max(taken, default=-1) + 1}", "lightning_viz")
    _folders[trainer] = folder
    return folder


_folders_checked: weakref.WeakSet[Any] = weakref.WeakSet()


def _warn_earlier_run(trainer: Any, folder: str) -> None:
    """Before a trainer's first write to the image folder: warn when a fresh fit (not resumed from a checkpoint) finds
    an earlier run's files there (a logger version given again, e.g. ``CSVLogger(version=0)``, which starts its own
    ``metrics.csv`` afresh): the fit would mix its epochs with the earlier ones."""
    if trainer in _folders_checked:
        return
    _folders_checked.add(trainer)
    fn = str(getattr(getattr(getattr(trainer, "state", None), "fn", None), "value", ""))
    if fn != "fit" or getattr(trainer, "ckpt_path", None) is not None or not os.path.isdir(folder):
        return
    earlier = sorted(n for n in os.listdir(folder) if n in ("scalars.csv", BEFORE_TRAINING) or n.startswith("epoch_"))
    if earlier:
        from lightning.pytorch.utilities import rank_zero_warn

        shown = ", ".join(earlier[:3] + (["..."] if len(earlier) > 3 else []))
        rank_zero_warn(
            f"lightning-viz: the image folder {folder} already holds an earlier run's files ({shown}); this fit, "
            "not resumed from a checkpoint, replaces the images of the epochs it writes, leaves the others and adds "
            "its rows to scalars.csv. Give the logger a new version (or clear the folder) to keep the runs apart.",
            category=VisualizationWarning,
        )


def _safe_part(part: str) -> str:
    part = re.sub(r"[^A-Za-z0-9_.=+-]", "_", part)
    return "_" if part in ("", ".", "..") else part


#: The folder of the ``run_at_start`` baseline (step ``-1``) in the image folder and in MLflow's artifacts.
BEFORE_TRAINING = "before_training"


def image_relpath(tag: str, step: int, ext: str = ".png") -> str:
    """``epoch_0003/viz-cam/gradcam/layer4/p000.png``: where a tag's file lands in the folder and in MLflow; the
    ``run_at_start`` baseline (step ``-1``) in ``before_training/`` (not ``epoch_-001``)."""
    folder = BEFORE_TRAINING if int(step) < 0 else f"epoch_{int(step):04d}"
    return "/".join([folder] + [_safe_part(p) for p in tag.split("/")]) + ext


def step_label(step: int) -> str:
    """How an image names the point it shows: ``"epoch 3"``, or ``"before training"`` for the ``run_at_start``
    baseline (step ``-1``), as its folder and the start-up line say."""
    return "before training" if int(step) < 0 else f"epoch {int(step)}"


def _write_png(path: str, hwc: np.ndarray) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(hwc).save(path)


def _write_embedding(folder: str, features: Tensor, metadata: list | None, header: list[str] | None) -> None:
    """The TensorBoard projector's files: ``tensors.tsv`` (one row per point) and ``metadata.tsv``."""
    os.makedirs(folder, exist_ok=True)
    np.savetxt(os.path.join(folder, "tensors.tsv"), features.detach().float().cpu().numpy(), delimiter="\t", fmt="%.6g")
    if metadata is not None:
        with open(os.path.join(folder, "metadata.tsv"), "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            if header:
                w.writerow(header)
            w.writerows(row if isinstance(row, (list, tuple)) else [row] for row in metadata)


def _encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``[H, W, 3]`` (RGB) or ``[H, W]`` / ``[H, W, 1]`` (gray) array, written with numpy
    and zlib: PNG's "Up" filter on every row (the byte difference to the row above, so a row repeated by a
    nearest upscale is all zeros), zlib level 1. Measured on the demo's images: ~2x faster than PIL's adaptive
    filters at level 1 with the run-length strategy, ~7% larger."""
    h, w = image.shape[:2]
    c = 1 if image.ndim == 2 else image.shape[2]
    rows = image.reshape(h, w * c)
    data = np.empty((h, w * c + 1), np.uint8)
    data[:, 0] = 2  # the filter type of every row: Up (the first row's "above" is zeros)
    data[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=data[1:, 1:])  # wraps modulo 256, as PNG's filter arithmetic

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))

    header = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 0, 0, 0, 0)  # 8 bits, RGB or gray, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(data.data, 1))
        + chunk(b"IEND", b"")
    )


def _png_summary(tag: str, hwc: np.ndarray) -> Any:
    """The TensorBoard image summary of a uint8 ``[H, W, 3]`` array (what ``SummaryWriter.add_image`` writes for
    it, with a faster PNG encoding of the same pixels: :func:`_encode_png`)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    h, w, c = hwc.shape
    img = Summary.Image(height=h, width=w, colorspace=c, encoded_image_string=_encode_png(hwc))
    return Summary(value=[Summary.Value(tag=tag, image=img)])


# ------------------------------------------------------------------------------------ background writes
# In a callback run at an epoch end where later callbacks still run, TensorBoard images are PNG-encoded (zlib
# releases the GIL) and written, and projector files written, on one background thread, in order, overlapping the
# later callbacks' computations on the other core. The last run of the point waits for all of it
# (wait_for_writes, inside its run, so a failure reaches every DDP rank), as does a run called on its own and a
# callback's teardown. A VizLogger made outside a run writes at once. (A callback's whole log stage on that thread
# was measured no faster on 2 cores: its torch and Python work competes with the computations.)
_writes_lock = threading.Lock()
_writer_pool: tuple[int, ThreadPoolExecutor] | None = None  # (pid, pool): a forked child starts its own
_pending: list[tuple[Future, WriteOwner]] = []


@dataclass(frozen=True)
class WriteOwner:
    """Who logged a background write: ``label`` for messages, ``key`` (``id`` of the callback) and whether a
    failure only warns (``on_error="warn"``)."""

    label: str
    key: int
    warn: bool = False


def submit_write(fn: Callable[[], Any], owner: WriteOwner) -> None:
    """Run ``fn`` on the background writer thread after every job submitted before it."""
    global _writer_pool
    with _writes_lock:
        if _writer_pool is None or _writer_pool[0] != os.getpid():
            _writer_pool = (os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="lightning-viz-writer"))
            _pending.clear()  # a parent's futures (after a fork) are not this process's
        _pending.append((_writer_pool[1].submit(fn), owner))


def wait_for_writes() -> list[tuple[WriteOwner, Exception]]:
    """Wait until every background job is done (also those submitted meanwhile); the ones that failed, in order,
    with their error. ``KeyboardInterrupt`` and the like are raised."""
    failures: list[tuple[WriteOwner, Exception]] = []
    while True:
        with _writes_lock:
            pending = list(_pending)
            _pending.clear()
        if not pending:
            return failures
        for future, owner in pending:
            exc = future.exception()
            if exc is not None and not isinstance(exc, Exception):
                raise exc
            if exc is not None:
                failures.append((owner, exc))


def close_writer() -> None:
    """Wait for every background job, then end the writer thread (at the end of a fit or validate: no thread is left
    behind; a later write starts a new one). Failures stay for :func:`wait_for_writes`."""
    global _writer_pool
    with _writes_lock:
        pool, _writer_pool = _writer_pool, None
    if pool is not None and pool[0] == os.getpid():
        pool[1].shutdown(wait=True)


def _fast_record_checksums() -> None:
    """Have TensorBoard's record writer checksum records with :mod:`lightning_viz._crc32c` (the same checksums,
    ~30x faster on images than its pure-Python loop), where it uses that pure-Python loop (no TensorFlow)."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    if record_writer.masked_crc32c is pywrap_tensorflow.masked_crc32c:
        record_writer.masked_crc32c = _crc32c.masked(pywrap_tensorflow.masked_crc32c)


def _figure_to_hwc(fig: Any) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


# ---------------------------------------------------------------------------------------------- backends
class Backend:
    """One destination. Images come as uint8 ``[H, W, 3]`` arrays, the step is the epoch; a method that a
    destination cannot keep does nothing. ``flush`` ends one callback run (batched writes happen there)."""

    def image(self, tag: str, hwc: np.ndarray, step: int, caption: str | None = None) -> None:
        pass

    def scalar(self, tag: str, value: float, step: int) -> None:
        pass

    def embedding(
        self,
        tag: str,
        features: Tensor,
        metadata: list | None,
        label_img: Tensor | None,
        metadata_header: list[str] | None,
        step: int,
    ) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        pass

    def custom_scalars(self, layout: dict) -> None:
        pass

    def flush(self) -> None:
        pass


def _continue_projector_config(writer: Any) -> None:
    """A ``SummaryWriter`` keeps the projector config it wrote in memory and rewrites the whole file at every
    ``add_embedding``: a new one on a log directory that has the file (a fit resumed there) would drop the earlier
    embeddings from the Projector tab. Start it from the file's entries instead."""
    if hasattr(writer, "_projector_config"):
        return
    path = os.path.join(writer._get_file_writer().get_logdir(), "projector_config.pbtxt")
    if not os.path.isfile(path):
        return
    from google.protobuf import text_format
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    config = ProjectorConfig()
    try:
        with open(path) as f:
            text_format.Parse(f.read(), config)
    except Exception:  # unreadable: written afresh, as before
        return
    writer._projector_config = config


#: Per ``SummaryWriter``: the projector sprites it wrote, ``digest of the images -> (path, [w, h])``.
_tb_sprites: weakref.WeakKeyDictionary[Any, dict[str, tuple[str, list[int]]]] = weakref.WeakKeyDictionary()


def _earlier_sprite(writer: Any, label_img: Tensor | None) -> tuple[tuple[str, list[int]] | None, str | None]:
    """The sprite this writer already wrote of the same images (the probes are fixed: the same thumbnails at every
    epoch), if its file is still there, and the images' digest."""
    if label_img is None:
        return None, None
    arr = np.ascontiguousarray(label_img.detach().cpu().numpy())
    digest = hashlib.sha1(arr.tobytes() + str((arr.shape, arr.dtype)).encode()).hexdigest()
    try:
        earlier = _tb_sprites.setdefault(writer, {}).get(digest)
    except TypeError:  # not weak-referenceable: a sprite per call, as add_embedding does
        return None, None
    if earlier is not None and not os.path.isfile(os.path.join(writer._get_file_writer().get_logdir(), earlier[0])):
        earlier = None
    return earlier, digest


def _remember_sprite(writer: Any, digest: str | None) -> None:
    """After :func:`_add_embedding` wrote a sprite: remember it for the later embeddings of the same images."""
    config = getattr(writer, "_projector_config", None)
    if digest is None or config is None or not config.embeddings:
        return
    entry = config.embeddings[-1]
    if entry.sprite.image_path:
        _tb_sprites.setdefault(writer, {})[digest] = (entry.sprite.image_path, list(entry.sprite.single_image_dim))


def _add_embedding(
    writer: Any,
    features: Tensor,
    metadata: list | None,
    label_img: Tensor | None,
    step: int,
    tag: str,
    metadata_header: list[str] | None,
    sprite: tuple[str, list[int]] | None = None,
) -> None:
    """``writer.add_embedding(features, metadata, label_img, step, tag, metadata_header)``: the same files byte for
    byte and the same projector config entry, but ``tensors.tsv`` is formatted from one ``tolist()`` and written at
    once. ``SummaryWriter`` formats it value by value (a numpy scalar's ``.item()`` each) and appends line by line
    through TensorBoard's gfile, a file open per line: 6.7 -> 3.5 ms for 128 x 64 features (the rest is float repr).
    ``sprite``: ``(path, [w, h])`` of a sprite written before (of the same images; ``label_img`` is then ``None``),
    which the entry points to, so a long run stores the probes' sprite once; the config is written once."""
    from google.protobuf import text_format
    from tensorboard.compat import tf
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig
    from torch.utils.tensorboard._convert_np import make_np
    from torch.utils.tensorboard._embedding import _gfile_join, get_embedding_info, make_sprite, make_tsv, write_pbtxt

    mat = make_np(features)
    subdir = f"{str(step).zfill(5)}/{writer._encode(tag)}"
    logdir = writer._get_file_writer().get_logdir()
    save_path = os.path.join(logdir, subdir)
    if not tf.io.gfile.exists(save_path):  # an existing folder (the same step again): its files written over
        tf.io.gfile.makedirs(save_path)
    if metadata is not None:
        if mat.shape[0] != len(metadata):
            raise AssertionError("#labels should equal with #data points")
        make_tsv(metadata, save_path, metadata_header=metadata_header)
    if label_img is not None:
        if mat.shape[0] != label_img.shape[0]:
            raise AssertionError("#images should equal with #data points")
        make_sprite(label_img, save_path)
    if mat.ndim != 2:
        raise AssertionError("mat should be 2D, where mat.size(0) is the number of data points")
    rows = "".join("\t".join(map(str, row)) + "\n" for row in mat.tolist())  # str(float), as .item() then str
    with tf.io.gfile.GFile(_gfile_join(save_path, "tensors.tsv"), "wb") as f:
        f.write(tf.compat.as_bytes(rows))
    if not hasattr(writer, "_projector_config"):
        writer._projector_config = ProjectorConfig()
    entry = get_embedding_info(metadata, label_img, subdir, step, tag)
    if sprite is not None:
        entry.sprite.image_path = sprite[0]
        entry.sprite.single_image_dim.extend(sprite[1])
    writer._projector_config.embeddings.extend([entry])
    write_pbtxt(logdir, text_format.MessageToString(writer._projector_config))


#: per TensorBoard writer: the Custom Scalars charts written to it so far (category -> chart -> spec)
_custom_scalars_written: weakref.WeakKeyDictionary[Any, dict[str, dict[str, list]]] = weakref.WeakKeyDictionary()


class TensorBoardBackend(Backend):
    """A TensorBoard ``SummaryWriter`` (the ``TensorBoardLogger``'s ``experiment``)."""

    def __init__(self, writer: Any, prefix: str = ""):
        self.writer = writer
        self.prefix = prefix  # the logger's prefix and join char (``"run1-"``): starts every tag, see _key_prefix
        self.background: WriteOwner | None = None  # in a callback run: images are written in the background
        self.submitted = False  # images went to the background writer: the flush goes there too, after them
        self.pending: list[tuple[str, float, int]] = []  # a run's scalars, written in the background at its flush

    def image(self, tag, hwc, step, caption=None):
        from torch.utils.tensorboard import SummaryWriter

        tag = self.prefix + tag
        # add_image's summary with a faster PNG encoding of the same pixels (see _png_summary) and faster record
        # checksums, only where add_image is torch's own: a tensorboardX writer (its own protos) or a
        # replaced/overridden add_image gets the call
        if getattr(getattr(self.writer, "add_image", None), "__func__", None) is not SummaryWriter.add_image:
            self.writer.add_image(tag, hwc, step, dataformats="HWC")
            return
        _fast_record_checksums()
        file_writer = self.writer._get_file_writer()
        if self.background is None:
            file_writer.add_summary(_png_summary(tag, hwc), step)
            return
        hwc = hwc.copy()  # the caller may reuse its array; the background thread encodes this copy
        submit_write(lambda: file_writer.add_summary(_png_summary(tag, hwc), step), self.background)
        self.submitted = True

    def scalar(self, tag, value, step):
        from torch.utils.tensorboard import SummaryWriter

        tag = self.prefix + tag
        # in a callback run, torch's own add_scalar of a float (no torch op) goes to the writer thread, all of the
        # run's at its flush in one job: add_scalar waits whenever TensorBoard's event queue is full of images
        if self.background is None or getattr(self.writer.add_scalar, "__func__", None) is not SummaryWriter.add_scalar:
            self.writer.add_scalar(tag, value, step)
        else:
            self.pending.append((tag, float(value), step))

    def figure(self, tag: str, fig: Any, step: int) -> None:
        self.writer.add_figure(self.prefix + tag, fig, step, close=False)

    def embedding(self, tag, features, metadata, label_img, metadata_header, step):
        writer, tag = self.writer, self.prefix + tag

        def write() -> None:
            _continue_projector_config(writer)
            earlier, digest = _earlier_sprite(writer, label_img)
            img = None if earlier else label_img
            _add_embedding(writer, features, metadata, img, step, tag, metadata_header, sprite=earlier)
            if earlier is None:
                _remember_sprite(writer, digest)

        if self.background is None:
            write()
        else:  # the projector files (a tsv written value by value, the sprite) in the background too
            submit_write(write, self.background)
            self.submitted = True

    def text(self, tag, text, step):
        self.writer.add_text(self.prefix + tag, text, step)

    def custom_scalars(self, layout):
        """Add ``layout``'s charts to those written before to this writer and write the whole when it gained one:
        TensorBoard shows a run's last layout only, so one tracker's layout would hide another's charts."""
        try:
            merged = _custom_scalars_written.setdefault(self.writer, {})
        except TypeError:  # not weak-referenceable: each layout as given
            merged = {}
        added = {c: {t: s for t, s in charts.items() if merged.get(c, {}).get(t) != s} for c, charts in layout.items()}
        if not any(added.values()):
            return
        for category, charts in added.items():
            merged.setdefault(category, {}).update(charts)
        layout = {category: dict(charts) for category, charts in merged.items()}  # the writer's, not the record
        if self.prefix:  # the layout's tag regexes are matched from the tag's start
            layout = {
                category: {
                    chart: [kind, [re.escape(self.prefix) + r for r in regexes]] for chart, (kind, regexes) in c.items()
                }
                for category, c in layout.items()
            }
        self.writer.add_custom_scalars(layout)

    def flush(self):
        if (self.submitted or self.pending) and self.background is not None:
            writer, scalars = self.writer, self.pending
            self.pending = []

            def write() -> None:
                for tag, value, step in scalars:
                    writer.add_scalar(tag, value, step)
                writer.flush()

            submit_write(write, self.background)
        else:
            self.writer.flush()


class MetricsBackend(Backend):
    """Scalars through a Lightning logger's ``log_metrics(metrics, step=epoch)``, one call per run (e.g.
    ``CSVLogger``: one row of ``metrics.csv`` whose ``step`` and ``epoch`` are the epoch). Images are not kept."""

    def __init__(self, logger: Any):
        self.logger = logger
        self.metrics: dict[str, float] = {}
        self.step = 0
        # CSVLogger: the row's ``epoch`` column too, as in Lightning's rows (read by epoch, the rows line up)
        self.epoch_column = logger_name(logger) == "csv"

    def scalar(self, tag, value, step):
        self.metrics[tag] = value
        self.step = step

    def flush(self):
        if self.metrics:
            metrics = {**self.metrics, "epoch": self.step} if self.epoch_column else self.metrics
            self.logger.log_metrics(metrics, step=self.step)
            self.logger.save()
            self.metrics = {}


class _FileWriter(Backend):
    """Images, embeddings and texts as files under ``root`` (layout: :func:`image_relpath`)."""

    root: str

    def image(self, tag, hwc, step, caption=None):
        _write_png(os.path.join(self.root, image_relpath(tag, step)), hwc)

    def embedding(self, tag, features, metadata, label_img, metadata_header, step):
        _write_embedding(os.path.join(self.root, image_relpath(tag, step, ext="")), features, metadata, metadata_header)

    def text(self, tag, text, step):
        path = os.path.join(self.root, image_relpath(tag, step, ext=".txt"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


class FolderBackend(_FileWriter):
    """A plain folder: ``epoch_NNNN/<tag>.png`` per image and ``scalars.csv`` (``epoch,tag,value``)."""

    def __init__(self, root: str):
        self.root = root
        self.rows: list[tuple[int, str, float]] = []

    def scalar(self, tag, value, step):
        self.rows.append((int(step), tag, value))

    def flush(self):
        if self.rows:
            os.makedirs(self.root, exist_ok=True)
            path = os.path.join(self.root, "scalars.csv")
            new = not os.path.exists(path)
            with open(path, "a", newline="") as f:
                w = csv.writer(f)
                if new:
                    w.writerow(["epoch", "tag", "value"])
                w.writerows(self.rows)
            self.rows = []


class MLflowBackend(MetricsBackend, _FileWriter):
    """An ``MLFlowLogger``: scalars as metrics (step = epoch); images, embeddings and texts as artifacts
    under ``lightning_viz/epoch_NNNN/<tag>.png``, uploaded once per run from a temporary folder."""

    ARTIFACT_ROOT = "lightning_viz"

    def __init__(self, logger: Any):
        MetricsBackend.__init__(self, logger)
        self.root = ""
        self.prefix = _key_prefix(logger)  # the scalars get it from the logger's log_metrics, the artifacts here

    def _ensure_root(self) -> None:
        if not self.root:
            self.root = tempfile.mkdtemp(prefix="lightning_viz_mlflow_")

    def image(self, tag, hwc, step, caption=None):
        self._ensure_root()
        super().image(self.prefix + tag, hwc, step, caption)

    def embedding(self, tag, features, metadata, label_img, metadata_header, step):
        self._ensure_root()
        super().embedding(self.prefix + tag, features, metadata, label_img, metadata_header, step)

    def text(self, tag, text, step):
        self._ensure_root()
        super().text(self.prefix + tag, text, step)

    def flush(self):
        MetricsBackend.flush(self)
        if self.root:
            try:
                self.logger.experiment.log_artifacts(self.logger.run_id, self.root, artifact_path=self.ARTIFACT_ROOT)
            finally:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = ""


_wandb_defined: weakref.WeakKeyDictionary[Any, set] = weakref.WeakKeyDictionary()


class WandbBackend(Backend):
    """A ``WandbLogger``'s run: one ``run.log`` per callback run with ``epoch`` in it, and every key defined
    with ``epoch`` as its x-axis (``define_metric``). No ``step=`` is passed, so W&B's own step just grows and
    no point is dropped (``run.log(step=epoch)`` would drop every point once training has logged further)."""

    def __init__(self, logger: Any):
        self.logger = logger
        self.prefix = _key_prefix(logger)  # starts every key, ``epoch`` too (Lightning logs its ``<prefix>-epoch``)
        self.row: dict[str, Any] = {}
        self.step = 0

    def _put(self, tag: str, value: Any, step: int) -> None:
        self.row[self.prefix + tag] = value
        self.step = step

    def image(self, tag, hwc, step, caption=None):
        import wandb

        self._put(tag, wandb.Image(hwc, caption=caption), step)

    def scalar(self, tag, value, step):
        self._put(tag, value, step)

    def embedding(self, tag, features, metadata, label_img, metadata_header, step):
        import wandb

        feats = features.detach().float().cpu().numpy()
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in metadata] if metadata is not None else None
        meta_cols = list(metadata_header) if metadata_header else (["label"] if rows else [])
        columns = meta_cols + [f"d{i}" for i in range(feats.shape[1])]
        data = [(rows[i] if rows else []) + [float(v) for v in feats[i]] for i in range(feats.shape[0])]
        if label_img is not None:
            columns.append("image")
            for i, img in enumerate(label_img):
                data[i].append(wandb.Image(to_uint8_hwc(img)))
        self._put(tag, wandb.Table(columns=columns, data=data), step)

    def text(self, tag, text, step):
        import wandb

        self._put(tag, wandb.Html(f"<pre>{html.escape(text)}</pre>"), step)

    def flush(self):
        if not self.row:
            return
        run = self.logger.experiment
        try:
            defined = _wandb_defined.setdefault(run, set())
        except TypeError:  # not weak-referenceable: define again (idempotent)
            defined = set()
        epoch = self.prefix + "epoch"
        for key in self.row:
            if key not in defined:
                run.define_metric(key, step_metric=epoch)
                defined.add(key)
        run.log({**self.row, epoch: self.step})
        self.row = {}


def _key_prefix(logger: Any) -> str:
    """What a Lightning logger puts before every metric key it logs: its ``prefix`` and ``LOGGER_JOIN_CHAR``
    (``TensorBoardLogger(prefix="run1")``: ``"run1-"``), or ``""``. Every key lightning-viz writes to that logger
    starts with it, as the user's own metrics do (TensorBoard and W&B are written to directly, not through
    ``log_metrics``, so the backends add it; ``CSVLogger`` and MLflow's metrics get it from ``log_metrics``)."""
    prefix = getattr(logger, "_prefix", "")
    return f"{prefix}{getattr(logger, 'LOGGER_JOIN_CHAR', '-')}" if isinstance(prefix, str) and prefix else ""


def _backend_for(trainer: Any, name: str) -> list[Backend]:
    if name == DRY_RUN:  # takes every write and keeps none: the callbacks render as usual
        return [Backend()]
    if name == FOLDER:
        folder = image_folder(trainer)
        _warn_earlier_run(trainer, folder)
        return [FolderBackend(folder)]
    out: list[Backend] = []
    for lg in _attached(trainer):
        if logger_name(lg) != name:
            continue
        if name == "tensorboard":
            out.append(TensorBoardBackend(lg.experiment, prefix=_key_prefix(lg)))
        elif name == "mlflow":
            out.append(MLflowBackend(lg))
        elif name == "wandb":
            out.append(WandbBackend(lg))
        else:
            out.append(MetricsBackend(lg))
    return out


def _clean(part: Any) -> str:
    s = str(part).strip("/").replace(" ", "_")
    return s or "_"


#: First characters of every lightning-viz tag: ``viz-<family>/...``.
TAG_PREFIX = "viz-"


def make_tag(family: str, *parts: Any) -> str:
    """``make_tag("cam", "gradcam", "layer4", "p003")`` -> ``"viz-cam/gradcam/layer4/p003"``: the first
    segment ``viz-<family>`` is TensorBoard's group (``family`` = the callback's ``method``); empty parts skipped.
    A part may hold several segments (``"gradcam/layer4"``)."""
    return "/".join([TAG_PREFIX + _clean(family)] + [_clean(p) for p in parts if p is not None and str(p) != ""])


#: Fewest digits of an index in a tag (``p000``, ``unit000``, ``class000``): the same tags in runs of up to 1000.
INDEX_DIGITS = 3
#: Most characters of a class name in a tag (ImageNet's run to 80 with their synonyms).
TAG_NAME_CHARS = 32


def indexed(prefix: str, index: int, largest: int, name: Any = None) -> str:
    """One tag segment naming item ``index`` of a numbered set: ``indexed("unit", 7, 511)`` -> ``"unit007"``,
    ``indexed("class", 2, 9, "cat")`` -> ``"class002_cat"``. The index is zero-padded to the digits of ``largest``,
    the run's largest index (the probes', the layer's channels', the model's classes' count less one), at least
    :data:`INDEX_DIGITS`, so that TensorBoard's string sort is the numeric one. A ``name`` (a class name) other than
    the index itself follows after ``_``: accents dropped, other characters than ASCII letters, digits, ``.`` and
    ``-`` as ``_`` (a ``/`` would start a new segment; Lightning's MLflow logger drops the others from metric names,
    ``,`` and non-ASCII letters), at most :data:`TAG_NAME_CHARS` of them."""
    index = int(index)
    out = f"{prefix}{index:0{max(INDEX_DIGITS, len(str(max(index, int(largest)))))}d}"
    label = "" if name is None else unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")[:TAG_NAME_CHARS]
    return out if label in ("", str(index)) else f"{out}_{label}"


def namespaced(tag: str, namespace: str | None) -> str:
    """Insert ``namespace`` after the family segment: ``viz-cam/panel/p000`` -> ``viz-cam/<namespace>/panel/p000``
    (tags that are not lightning-viz tags are left alone)."""
    if not namespace or not tag.startswith(TAG_PREFIX):
        return tag
    family, _, rest = tag.partition("/")
    return "/".join(p for p in (family, _clean(namespace), rest) if p)


class VizLogger:
    """The one writer every callback uses: forwards each write to its backends, nothing off rank 0.

    ``VizLogger(writer, step)`` takes a TensorBoard ``SummaryWriter``, one :class:`Backend` or a list of them;
    :meth:`from_trainer` builds the backends from ``trainer.loggers``. Callbacks never check the rank.
    """

    def __init__(self, writer: Any | None, step: int, enabled: bool = True, namespace: str | None = None):
        if writer is None:
            backends: list[Backend] = []
        elif isinstance(writer, Backend):
            backends = [writer]
        elif isinstance(writer, (list, tuple)):
            backends = list(writer)
        else:
            backends = [TensorBoardBackend(writer)]
        self.backends = backends
        self.writer = writer
        self.step = int(step)
        self.enabled = enabled and bool(backends)
        self.namespace = namespace
        self.written: list[str] = []

    def _tag(self, tag: str) -> str:
        """Insert the namespace after the family (``viz-cam/...`` -> ``viz-cam/<namespace>/...``)."""
        return namespaced(tag, self.namespace)

    @classmethod
    def from_trainer(
        cls,
        trainer: Any,
        step: int,
        namespace: str | None = None,
        loggers: Optional[Sequence[str]] = None,
    ) -> VizLogger:
        """Backends for :func:`sink_names` ``(trainer, loggers)``, built on rank 0 only."""
        enabled = bool(trainer.is_global_zero)
        backends = [b for n in sink_names(trainer, loggers) for b in _backend_for(trainer, n)] if enabled else []
        return cls(backends, step, enabled=enabled, namespace=namespace)

    def write_in_background(self, owner: WriteOwner) -> None:
        """TensorBoard images and projector files go to the background writer thread (see :func:`submit_write`),
        for ``owner``; the others write at once."""
        for b in self.backends:
            if isinstance(b, TensorBoardBackend):
                b.background = owner

    def image(self, tag: str, image01: Tensor, caption: str | None = None) -> None:
        """Log one ``[3, H, W]`` float image in ``[0, 1]`` or uint8 image (e.g. from ``compose``; see
        :func:`~lightning_viz.render.to_uint8_hwc`); ``caption``: shown by W&B, kept by none else."""
        if self.enabled:
            tag = self._tag(tag)
            hwc = to_uint8_hwc(image01)
            for b in self.backends:
                b.image(tag, hwc, self.step, caption)
            self.written.append(tag)

    def scalar(self, tag: str, value: float | Tensor) -> None:
        if self.enabled:
            tag = self._tag(tag)
            for b in self.backends:
                b.scalar(tag, float(value), self.step)
            self.written.append(tag)

    def scalars(self, values: dict[str, float | Tensor]) -> None:
        for tag, v in values.items():
            self.scalar(tag, v)

    def figure(self, tag: str, fig: Any) -> None:
        """Log a matplotlib figure (closed afterwards)."""
        import matplotlib.pyplot as plt

        try:
            if self.enabled:
                tag = self._tag(tag)
                hwc = None
                for b in self.backends:
                    if isinstance(b, TensorBoardBackend):
                        b.figure(tag, fig, self.step)
                    else:
                        hwc = _figure_to_hwc(fig) if hwc is None else hwc
                        b.image(tag, hwc, self.step)
                self.written.append(tag)
        finally:
            plt.close(fig)

    def embedding(
        self,
        features: Tensor,
        metadata: list | None = None,
        label_img: Tensor | None = None,
        tag: str = "default",
        metadata_header: list[str] | None = None,
    ) -> None:
        if self.enabled:
            tag = self._tag(tag)
            for b in self.backends:
                b.embedding(tag, features, metadata, label_img, metadata_header, self.step)
            self.written.append(tag)

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            tag = self._tag(tag)
            for b in self.backends:
                b.text(tag, text, self.step)
            self.written.append(tag)

    def custom_scalars(self, layout: dict) -> None:
        """TensorBoard's Custom Scalars layout (other backends have no such thing)."""
        if self.enabled:
            for b in self.backends:
                b.custom_scalars(layout)

    def flush(self) -> None:
        """End of one callback run: every backend writes what it batched (first error raised after all)."""
        error = None
        for b in self.backends if self.enabled else []:
            try:
                b.flush()
            except Exception as exc:
                error = error or exc
        if error is not None:
            raise error
