"""Real multi-process CPU (gloo) training for ``tests/test_ddp.py``; also importable (test callbacks, configs).

    python tests/ddp_script.py OUT --runs equal,one_probe_bf16,errors,syncbn_validate
                                   [--strategy ddp|ddp_spawn] [--devices 2] [--callbacks callbacks.json]

Each run is one ``Trainer.fit`` (or ``Trainer.validate``) writing TensorBoard events to ``OUT/<run>/`` and,
per rank, ``OUT/<run>/rank<r>.json`` (what that rank's callbacks wrote, its final parameters' checksum). With
``strategy="ddp"`` Lightning launches rank 1 by re-running this script; later runs reuse the process
group (``LOCAL_RANK`` is then set, so no new processes are started).

The callbacks attached are data-driven: :data:`CALLBACKS` lists them in LightningCLI form
(``class_path`` + ``init_args``; a nested dict with a ``class_path`` is instantiated too). Add other
families' callbacks there.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import sys
import warnings
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import lightning as L
import torch
from helpers import LitTiny, TinyCNN, tiny_dataset
from torch.utils.data import DataLoader, Sampler

import lightning_viz.logging as vlog
from lightning_viz.callbacks.base import VisualizationCallback, VisualizationWarning
from lightning_viz.callbacks.maps import MapCallback
from lightning_viz.probe import ProbeSet

CALLBACKS: list[dict[str, Any]] = [
    {
        "class_path": "helpers.InputGradMap",
        "init_args": {
            "num_probes": 5,
            "normalize": "both",
            "tracker": {
                "class_path": "lightning_viz.tracking.MapTracker",
                "init_args": {"faithfulness": True, "deletion_steps": 4, "sanity_check": True, "max_frames": 3},
            },
        },
    },
    {"class_path": "lightning_viz.callbacks.filters.FilterCallback", "init_args": {}},
    {
        "class_path": "lightning_viz.callbacks.activations.ActivationCallback",
        "init_args": {"num_probes": 5, "max_channels": 2},
    },
    {
        "class_path": "lightning_viz.callbacks.gradients.GradientCallback",
        "init_args": {
            "num_probes": 5,
            "methods": ["saliency", "integrated_gradients", "smoothgrad_saliency"],
            "ig_steps": 3,
            "smoothgrad_samples": 2,
        },
    },
    {
        "class_path": "lightning_viz.callbacks.cam.CAMCallback",
        "init_args": {
            "num_probes": 5,
            "methods": ["gradcam", "gradcam++"],
            "tracker": {
                "class_path": "lightning_viz.tracking.MapTracker",
                "init_args": {"faithfulness": True, "deletion_steps": 3},
            },
        },
    },
    {
        "class_path": "lightning_viz.callbacks.occlusion.OcclusionCallback",
        "init_args": {"num_probes": 5, "window": 4, "stride": 2},
    },
    {
        "class_path": "lightning_viz.callbacks.patches.TopPatchesCallback",
        "init_args": {"layers": ["net.conv2"], "num_units": 2, "k": 2, "num_probes": 8, "patch_px": 8},
    },
    {
        "class_path": "lightning_viz.callbacks.embeddings.EmbeddingCallback",
        "init_args": {"num_probes": 12, "projector": False},
    },
    {"class_path": "lightning_viz.callbacks.synthesis.ClassModelCallback", "init_args": {"steps": 2}},
    {
        "class_path": "lightning_viz.callbacks.synthesis.UnitCallback",
        "init_args": {"layers": "net.conv2", "channels": [0, 1], "steps": 2},
    },
    {
        "class_path": "lightning_viz.callbacks.synthesis.InversionCallback",
        "init_args": {"layers": "net.conv1", "num_probes": 5, "steps": 2},
    },
    {
        "class_path": "lightning_viz.callbacks.synthesis.AdversarialCallback",
        "init_args": {"num_probes": 5, "steps": 2, "min_flip": False},
    },
]

#: name -> Trainer/data options. ``equal`` is compared with a 1-process run with ``batch_size=8``: the
#: model has no BatchNorm, so 2 ranks x 4 images (gradients averaged) train exactly like 1 x 8 images.
#: SyncBatchNorm cannot be *trained* under DDP on CPU (torch: "SyncBatchNorm layers only work with GPU
#: modules"), but Lightning wraps the model in DDP only when fitting, and the callbacks run it in eval
#: mode (no cross-rank sync): ``syncbn_validate`` runs every callback at validation epoch end of a
#: ``Trainer.validate`` of a SyncBatchNorm model on 2 ranks (compared with 1 process in test_ddp.py).
RUNS: dict[str, dict[str, Any]] = {
    "equal": {"batchnorm": False, "batch_size": 4, "max_epochs": 2, "data": "shapes"},
    "one_probe_bf16": {"batch_size": 4, "max_epochs": 2, "num_probes": 1, "precision": "bf16-mixed", "compile": True},
    # one rank fails: every rank must raise (recorded, not re-raised, so training goes on)
    "errors": {
        "batch_size": 4,
        "max_epochs": 1,
        "callbacks": [
            {"class_path": "ddp_script.FailingCallback", "init_args": {"fail_in": "log", "fail_rank": 0}},
            {"class_path": "ddp_script.FailingCallback", "init_args": {"fail_in": "compute", "fail_rank": 1}},
            # computed on rank 0 only (as filters, class model, units): both ranks name rank 0
            {
                "class_path": "ddp_script.FailingCallback",
                "init_args": {"fail_in": "compute", "fail_rank": 0, "rank0_only": True},
            },
            # picking probes fails on rank 1 (at the first epoch end): every rank raises, naming rank 1
            {"class_path": "ddp_script.FailingCallback", "init_args": {"fail_in": "probes", "fail_rank": 1}},
            # on_error="warn": rank 0 warns (naming rank 1), every rank trains on
            {
                "class_path": "ddp_script.FailingCallback",
                "init_args": {"fail_in": "compute", "fail_rank": 1, "on_error": "warn"},
            },
        ],
    },
    "syncbn_validate": {"validate": True, "sync_batchnorm": True, "data": "shapes"},
    "lazy": {
        "max_epochs": 1,
        "data": "lazy_sharded",
        "callbacks": [
            # picked at the first epoch end (the data exists only from the module's on_fit_start), from each rank's
            # shard; the second callback takes the same pick
            {"class_path": "helpers.InputGradMap", "init_args": {"num_probes": 6}},
            {"class_path": "lightning_viz.callbacks.activations.ActivationCallback", "init_args": {"num_probes": 6}},
            # given probes built from each rank's own random numbers
            {
                "class_path": "helpers.InputGradMap",
                "init_args": {"num_probes": 3, "name": "given", "probes": {"class_path": "ddp_script.rank_probes"}},
            },
        ],
    },
    # rank 1's items are unreadable: picking at setup fails there; every rank must stop with a clear error
    "pick_fails": {
        "max_epochs": 1,
        "data": "unreadable_on_rank1",
        "expect_error": True,
        "callbacks": [{"class_path": "helpers.InputGradMap", "init_args": {"num_probes": 4}}],
    },
    # a setup check fails on rank 1 only (its shard's item 0 has label 7, the model 3 classes): every rank must stop
    # at setup with the error (rank 0: naming rank 1's), none waiting in Lightning's post-setup barrier
    "check_fails": {
        "max_epochs": 1,
        "data": "bad_label_on_rank1",
        "expect_error": True,
        "callbacks": [
            {"class_path": "lightning_viz.callbacks.gradients.GradientCallback", "init_args": {"target": "label"}}
        ],
    },
    # the same in trainer.validate of a module with configure_model (checked at on_validation_start)
    "check_fails_late": {
        "validate": True,
        "data": "bad_label_on_rank1",
        "module_kind": "configure_model",
        "expect_error": True,
        "callbacks": [
            {"class_path": "lightning_viz.callbacks.gradients.GradientCallback", "init_args": {"target": "label"}}
        ],
    },
    # probes picked at the first epoch end from each rank's shard; rank 1's has no labels, which target='label' needs:
    # every rank uses rank 0's (labeled) probes, so the run must not fail over rank 1's own pick
    "lazy_unlabeled_rank1": {
        "max_epochs": 1,
        "data": "lazy_sharded",
        "module_kind": "unlabeled_on_rank1",
        "expect_error": True,
        "callbacks": [
            {
                "class_path": "lightning_viz.callbacks.gradients.GradientCallback",
                "init_args": {"target": "label", "num_probes": 4},
            }
        ],
    },
    # ... and with no labels on any rank: rank 0's probes fail the check on every rank, one error named once
    "lazy_unlabeled": {
        "max_epochs": 1,
        "data": "lazy_sharded",
        "module_kind": "unlabeled",
        "expect_error": True,
        "callbacks": [
            {
                "class_path": "lightning_viz.callbacks.gradients.GradientCallback",
                "init_args": {"target": "label", "num_probes": 4},
            }
        ],
    },
    # rank 0's disk fills while the first callback's image is written in the background (the second callback's run
    # waits for it): every rank must raise rank 0's error, naming the first callback
    "full_disk": {
        "max_epochs": 1,
        "full_disk": "viz-inputgrad/",
        "expect_error": True,
        "callbacks": [
            {"class_path": "helpers.InputGradMap", "init_args": {"num_probes": 2}},
            {
                "class_path": "lightning_viz.callbacks.activations.ActivationCallback",
                "init_args": {"layers": ["net.conv1"], "num_probes": 2},
            },
        ],
    },
    # each rank's dataset is its own shard (as a datamodule's setup may build it): all ranks must use rank 0's probes
    "sharded": {
        "max_epochs": 1,
        "data": "sharded",
        "callbacks": [{"class_path": "helpers.InputGradMap", "init_args": {"num_probes": 6}}],
    },
}


class RankStrideSampler(Sampler):
    """Items ``rank, rank + world, ...`` in order (rank read when iterated): with batch size ``B`` per rank,
    step ``k`` of all ranks together sees exactly the items of step ``k`` of one process with ``world * B``."""

    def __init__(self, n: int):
        self.n = n

    @staticmethod
    def _world() -> tuple[int, int]:
        d = torch.distributed
        return (d.get_rank(), d.get_world_size()) if d.is_available() and d.is_initialized() else (0, 1)

    def __iter__(self):
        rank, world = self._world()
        return iter(range(rank, self.n, world))

    def __len__(self) -> int:
        rank, world = self._world()
        return len(range(rank, self.n, world))


class FailingCallback(MapCallback):
    """Raises ``RuntimeError`` in ``compute`` or ``log_results`` on one rank; records what ``run`` raised
    on this rank in :attr:`errors` instead of stopping the training."""

    method = "failing"

    def __init__(self, fail_in: str = "compute", fail_rank: int = 1, rank0_only: bool = False, **kwargs):
        # several in one run: each its own name (one family's panels at one tag are refused at setup)
        kwargs.setdefault("name", f"{fail_in}-rank{fail_rank}{'-only' if rank0_only else ''}-{kwargs.get('on_error')}")
        super().__init__(num_probes=4, **kwargs)
        self.fail_in, self.fail_rank = fail_in, fail_rank
        self.per_probe = not rank0_only  # False: rank 0 computes on every probe, the others wait for its outcome
        self.errors: list[str] = []

    def state_key_parts(self):
        return super().state_key_parts() + (self.fail_in, self.fail_rank, self.on_error)

    def get_probes(self, trainer):
        if self.fail_in == "probes" and trainer.global_rank == self.fail_rank:
            raise RuntimeError("boom in probes")
        return super().get_probes(trainer)

    def compute_maps(self, pl_module, probe):
        if self.fail_in == "compute" and pl_module.global_rank == self.fail_rank:
            raise RuntimeError("boom in compute")
        return {"failing/input": probe.images.mean(dim=1)}

    def log_results(self, logger, results, probe, trainer):
        if self.fail_in == "log":
            raise RuntimeError("boom in log")
        super().log_results(logger, results, probe, trainer)

    def run(self, trainer, pl_module):
        try:
            return super().run(trainer, pl_module)
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")


def _rank() -> int:
    """This process's rank, also before the Trainer starts the process group (Lightning sets ``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def rank_probes() -> ProbeSet:
    """Probe images drawn from each rank's own random numbers: other images on every rank."""
    g = torch.Generator().manual_seed(100 + _rank())
    return ProbeSet(images=torch.randn(3, 3, 8, 8, generator=g), labels=torch.tensor([0, 1, 2]))


class UnreadableOnRank1(torch.utils.data.Dataset):
    """``tiny_dataset(48)``, whose items on rank 1 are text (a broken shard): no probe can be read from it there."""

    def __init__(self):
        self.base, self.rank = tiny_dataset(48), _rank()

    def __len__(self) -> int:
        return 48

    def __getitem__(self, i):
        x, y = self.base[i]
        return ("unreadable", y) if self.rank == 1 else (x, y)


def bad_label_on_rank1() -> torch.utils.data.Dataset:
    """``tiny_dataset(48)`` (3 classes), whose item 0 on rank 1 has label 7 (a broken shard)."""
    x, y = tiny_dataset(48).tensors
    y = y.clone()
    if _rank() == 1:
        y[0] = 7
    return torch.utils.data.TensorDataset(x, y)


class ConfigureModelLit(LitTiny):
    """Overrides ``configure_model``: the callbacks check the model at ``on_fit_start`` / ``on_validation_start``."""

    def configure_model(self):
        pass


class LazyShardedLit(LitTiny):
    """Builds its data (this rank's shard) in ``on_fit_start``, after the callbacks' setup: probes are picked lazily."""

    data = None

    def on_fit_start(self):
        rank, world = self.trainer.global_rank, self.trainer.world_size
        self.data = torch.utils.data.Subset(tiny_dataset(48), range(rank, 48, world))

    def train_dataloader(self):
        if self.data is None:
            raise RuntimeError("the data is built in on_fit_start")
        return DataLoader(self.data, batch_size=4)


class LazyUnlabeledOnRank1(LazyShardedLit):
    """As :class:`LazyShardedLit`, but rank 1's shard has images only (no labels; it trains on label 0)."""

    unlabeled_ranks = (1,)

    def on_fit_start(self):
        super().on_fit_start()
        if self.trainer.global_rank in self.unlabeled_ranks:
            self.data = torch.utils.data.TensorDataset(torch.stack([self.data[i][0] for i in range(len(self.data))]))

    def training_step(self, batch, batch_idx):
        x = batch[0]
        return super().training_step((x, batch[1] if len(batch) > 1 else torch.zeros(len(x), dtype=torch.long)), 0)


class LazyUnlabeled(LazyUnlabeledOnRank1):
    """Every rank's shard has images only."""

    unlabeled_ranks = (0, 1)


def _resolve(class_path: str):
    module, _, name = class_path.rpartition(".")
    if module == "ddp_script" and __name__ == "__main__":
        return globals()[name]
    return getattr(importlib.import_module(module), name)


def instantiate(spec: Any) -> Any:
    """``{"class_path": ..., "init_args": {...}}`` -> object (nested specs too)."""
    if isinstance(spec, dict) and "class_path" in spec:
        args = {k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()}
        return _resolve(spec["class_path"])(**args)
    return spec


#: callbacks that read one probe image only (input shape and value range): they take no num_probes
ONE_PROBE_IMAGE = {"FilterCallback", "ClassModelCallback", "UnitCallback"}


def build_callbacks(num_probes: int | None = None, specs: list[dict] | None = None, run_on: str | None = None) -> list:
    out = []
    for spec in specs if specs is not None else CALLBACKS:
        spec = {"class_path": spec["class_path"], "init_args": dict(spec.get("init_args") or {})}
        if num_probes is not None and spec["class_path"].rsplit(".", 1)[1] not in ONE_PROBE_IMAGE:
            spec["init_args"]["num_probes"] = num_probes
        if run_on is not None:
            spec["init_args"]["run_on"] = run_on
        out.append(instantiate(spec))
    return out


def fit(
    logdir: str,
    devices: int,
    strategy: str = "auto",
    batch_size: int = 8,
    max_epochs: int = 2,
    sync_batchnorm: bool = False,
    num_probes: int | None = None,
    precision: str = "32-true",
    seed: int = 0,
    batchnorm: bool = True,
    compile: bool = False,
    callbacks: list[dict] | None = None,
    data: str = "tiny",
    validate: bool = False,
    expect_error: bool = False,
    module_kind: str | None = None,
    full_disk: str | None = None,
):
    """One training run; returns (trainer, callbacks, module). ``validate=True``: one ``Trainer.validate``
    of the untrained model instead (callbacks run at validation epoch end; ``max_epochs`` unused).
    ``expect_error``: the error the fit raised is kept in ``trainer.fit_error`` (``None`` if none). ``module_kind``:
    ``"configure_model"`` for a LightningModule overriding that hook, ``"unlabeled_on_rank1"`` / ``"unlabeled"``:
    see :class:`LazyUnlabeledOnRank1`. ``full_disk``: writing an image whose tag starts with it fails (ENOSPC)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    L.seed_everything(seed, verbose=False)
    if data == "shapes":  # 4 classes, items (image, label, mask): the pointing game runs too
        from lightning_viz.data.shapes import ShapesDataset

        dataset, classes = ShapesDataset(48, image_size=12, seed=1), 4
    elif data == "sharded":  # items rank, rank + world, ... of one dataset: each rank picks from its own
        rank, world = RankStrideSampler._world()
        dataset, classes = torch.utils.data.Subset(tiny_dataset(48), range(rank, 48, world)), 3
    elif data == "unreadable_on_rank1":
        dataset, classes = UnreadableOnRank1(), 3
    elif data == "bad_label_on_rank1":
        dataset, classes = bad_label_on_rank1(), 3
    else:
        dataset, classes = tiny_dataset(48), 3
    net = TinyCNN(num_classes=classes, width=4)
    if not batchnorm:
        net.bn1 = torch.nn.Identity()
    # Lightning's sync_batchnorm converts only under DDP and only when fitting: convert here otherwise
    if sync_batchnorm and (devices == 1 or validate):
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    if compile:
        net = torch.compile(net, backend="aot_eager")  # dynamo + AOTAutograd like inductor, minus the C++ compile
    lazy = data == "lazy_sharded"
    kinds = {
        "configure_model": ConfigureModelLit,
        "unlabeled_on_rank1": LazyUnlabeledOnRank1,
        "unlabeled": LazyUnlabeled,
    }
    module = kinds.get(module_kind or "", LazyShardedLit if lazy else LitTiny)(net, lr=0.05)
    per_rank = data in ("sharded", "unreadable_on_rank1", "bad_label_on_rank1")  # each rank's own data: no sampler
    sampler = None if per_rank else RankStrideSampler(len(dataset))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler)
    callbacks = build_callbacks(num_probes, callbacks, run_on="validation_epoch_end" if validate else None)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        sync_batchnorm=sync_batchnorm and devices > 1 and not validate,
        precision=precision,
        logger=TensorBoardLogger(logdir, name="", version=0),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=1,
        limit_val_batches=1 if validate else 0,
        use_distributed_sampler=False,
    )
    trainer.fit_error = None
    png_summary = vlog._png_summary
    if full_disk is not None:

        def no_space(tag, hwc):
            if tag.startswith(full_disk):
                raise OSError(errno.ENOSPC, "No space left on device")
            return png_summary(tag, hwc)

        vlog._png_summary = no_space
    try:
        if validate:
            trainer.validate(module, loader, verbose=False)
        else:
            trainer.fit(module, None if lazy else loader)
    except Exception as exc:
        if not expect_error:
            raise
        trainer.fit_error = f"{type(exc).__name__}: {exc}"
    finally:
        vlog._png_summary = png_summary
    return trainer, callbacks, module


def checksum(module) -> float:
    return float(sum(p.detach().double().abs().sum() for p in module.parameters()))


def _rows(results: Any) -> int:
    """How many probes' results ``run`` returned on this rank (the most rows of a tensor in them; ``None``: 0)."""
    if isinstance(results, torch.Tensor):
        return int(results.shape[0]) if results.ndim else 1
    if isinstance(results, dict):
        return max((_rows(v) for v in results.values()), default=0)
    return 0


def main_runs(out: str, runs: list[str], devices: int, strategy: str) -> None:
    received: dict[str, list[int]] = {}  # per callback class: the probes' results each run returned on this rank
    base_run = VisualizationCallback.run

    def run(self, trainer, pl_module, *args, **kwargs):
        results = base_run(self, trainer, pl_module, *args, **kwargs)
        received.setdefault(type(self).__name__, []).append(_rows(results))
        return results

    VisualizationCallback.run = run  # type: ignore[method-assign]
    for name in runs:
        received.clear()
        opts = dict(RUNS[name])
        logdir = os.path.join(out, name)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", VisualizationWarning)
            trainer, callbacks, module = fit(logdir, devices, strategy, **opts)
        if strategy == "ddp_spawn":  # the callbacks that ran live in the (gone) worker processes
            continue
        rank = trainer.global_rank
        info = {
            "rank": rank,
            "world_size": trainer.world_size,
            "written": {type(cb).__name__: list(cb.last_logged_tags) for cb in callbacks},
            "checksum": checksum(module),
            "syncbn": sum(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules()),
            "compiled": hasattr(module.net, "_orig_mod"),
            "errors": {
                f"{cb.fail_in}@rank{cb.fail_rank}" + ("/warn" if cb.on_error == "warn" else ""): cb.errors
                for cb in callbacks
                if isinstance(cb, FailingCallback)
            },
            "warnings": [str(w.message) for w in caught if issubclass(w.category, VisualizationWarning)],
            "global_step": trainer.global_step,
            "probes": {
                type(cb).__name__ + f"/{cb.name}" * bool(cb.name): cb.probes.fingerprint()
                for cb in callbacks
                if cb.probes is not None
            },
            "fit_error": trainer.fit_error,
            "received": dict(received),
        }
        with open(os.path.join(logdir, f"rank{rank}.json"), "w") as f:
            json.dump(info, f)
        # later Trainers in this process reuse the process group instead of launching new processes
        if strategy == "ddp":
            os.environ.setdefault("LOCAL_RANK", str(trainer.local_rank))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 exits only when every rank has written its file


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--runs", default="equal,one_probe_bf16,errors,syncbn_validate")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--strategy", default="ddp")
    p.add_argument("--callbacks", default=None, help="JSON file: a list like CALLBACKS, used instead of it")
    a = p.parse_args()
    if a.callbacks:
        with open(a.callbacks) as f:
            CALLBACKS[:] = json.load(f)
    main_runs(a.out, a.runs.split(","), a.devices, a.strategy)


if __name__ == "__main__":
    main()
