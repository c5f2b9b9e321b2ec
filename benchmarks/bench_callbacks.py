"""Cost of every callback in ``configs/demo.yaml`` per run, against one training epoch of the demo.

For each callback: seconds per run, model forward calls and images pushed through the model during the
run (counted with a forward pre-hook on the LightningModule), that time as a multiple of one
training epoch (2000 shapes, batch 64, SmallCNN), and the process's minor page faults during the run (median;
each a 4 KiB page of fresh memory the kernel maps and zeroes: glibc hands large blocks back to the system and
maps them again, depending on what the process allocated before, so a change of batch size in one callback moves
faults into others; Unix only). A method that needs P passes over N probes should
show about P * N images forwarded in a handful of batched calls.

The training epoch is timed *in the same run*, just before the epoch-end pause it is compared with
(first training batch start to last training batch end, each epoch), so a machine whose load drifts
still gives fair ratios; the last line is the whole pause (wall clock from the end of the epoch's training
to the end of the last callback's hook: every callback, and the images written in the background while the
later ones compute) over its epoch's training, per epoch (the first epoch also picks the probes and measures
activation memory once).

    python benchmarks/bench_callbacks.py                      # CPU, the demo config, 2 epochs
    python benchmarks/bench_callbacks.py --config configs/digits.yaml --epochs 3
    python benchmarks/bench_callbacks.py --accelerator gpu --epochs 4   # the demo trained on one GPU

Numbers depend on the machine and its load: run on a quiet machine before quoting them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import tempfile
import time

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_viz.callbacks.base import VisualizationCallback

try:
    import resource
except ImportError:  # Windows: no getrusage
    resource = None  # type: ignore[assignment]


def minor_faults() -> int:
    """Minor page faults of this process so far (-1 where getrusage is missing)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else -1


def instantiate(spec):
    """A ``{class_path, init_args}`` dict (nested ones too) -> the object."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    if isinstance(spec, list):
        return [instantiate(v) for v in spec]
    return spec


class Counted:
    """Wrap a callback's ``run`` to count model forwards and images during it."""

    profiler = None  # a cProfile.Profile enabled around every run when --profile is given

    def __init__(self, cb: VisualizationCallback):
        self.cb, self.calls, self.images, self.seconds, self.faults = cb, 0, 0, [], []
        run = cb.run

        def counted_run(trainer, pl_module):
            counts = [0, 0]

            def pre_hook(module, args):
                counts[0] += 1
                counts[1] += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 0

            handle = pl_module.register_forward_pre_hook(pre_hook)
            start, faults = time.perf_counter(), minor_faults()
            if Counted.profiler is not None:
                Counted.profiler.enable()
            try:
                return run(trainer, pl_module)
            finally:
                if Counted.profiler is not None:
                    Counted.profiler.disable()
                if cb.should_run(trainer):
                    self.seconds.append(time.perf_counter() - start)
                    self.faults.append(minor_faults() - faults)
                    self.calls, self.images = counts
                handle.remove()

        cb.run = counted_run


class EpochClock(L.Callback):
    """Training time of each epoch: first training batch start to last training batch end."""

    def __init__(self):
        self.start, self.end, self.train_s, self.faults = 0.0, 0.0, [], []

    def on_train_epoch_start(self, trainer, pl_module):
        self.start, self.start_faults = time.perf_counter(), minor_faults()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # runs before the visualization callbacks' hooks
        if pl_module.device.type == "cuda":  # the epoch's queued GPU work belongs to training
            torch.cuda.synchronize(pl_module.device)
            self.end = time.perf_counter()
        self.train_s.append(self.end - self.start)
        self.faults.append(minor_faults() - self.start_faults)
        self.pause_start = time.perf_counter()


class PauseEnd(L.Callback):
    """Last in the callback list: the whole epoch-end pause (wall clock, every visualization callback's hook, the
    images they left to the background writer included) ends here."""

    def __init__(self, clock: EpochClock):
        self.clock, self.pause_s = clock, []

    def on_train_epoch_end(self, trainer, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.pause_s.append(time.perf_counter() - self.clock.pause_start)


def build(
    config: dict, logdir: str, callbacks: list, epochs: int, accelerator: str = "cpu"
) -> tuple[L.Trainer, L.LightningModule, L.LightningDataModule]:
    from lightning_viz.models import ImageClassifier

    model = ImageClassifier(**config["model"])
    data = instantiate(config["data"])
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=TensorBoardLogger(logdir),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator=accelerator,
        devices=1,
    )
    return trainer, model, data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator: cpu, gpu (one device)")
    parser.add_argument("--profile", default="", help="write a cProfile of every callback run to this file")
    args = parser.parse_args()
    if args.profile:
        import cProfile

        Counted.profiler = cProfile.Profile()
    if args.threads:
        torch.set_num_threads(args.threads)
    with open(args.config) as f:
        config = yaml.safe_load(f)
    L.seed_everything(config.get("seed_everything", 0), verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        callbacks = instantiate(config["trainer"].get("callbacks") or [])
        counted = [Counted(cb) for cb in callbacks]
        clock = EpochClock()
        end = PauseEnd(clock)
        trainer, model, data = build(config, tmp, [clock] + callbacks + [end], args.epochs, args.accelerator)
        trainer.fit(model, datamodule=data)
    epoch_s = statistics.median(clock.train_s)
    print(
        f"training epoch (same run, median of {len(clock.train_s)}): {epoch_s:.2f} s, "
        f"{statistics.median(clock.faults):.0f} page faults  "
        f"(torch threads: {torch.get_num_threads()}, accelerator: {args.accelerator})"
    )
    print("| callback | s per run | x epoch | forward calls | images forwarded | page faults |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in counted:
        ratio = statistics.median(s / t for s, t in zip(c.seconds, clock.train_s)) if c.seconds else float("nan")
        s = statistics.median(c.seconds) if c.seconds else float("nan")
        label = type(c.cb).__name__ + ("" if not getattr(c.cb, "methods", None) else f" {list(c.cb.methods)}")
        faults = statistics.median(c.faults) if c.faults else float("nan")
        print(f"| {label} | {s:.3f} | {ratio:.2f} | {c.calls} | {c.images} | {faults:.0f} |")
    pauses = end.pause_s
    print(
        "whole epoch-end pause / that epoch's training: "
        + ", ".join(
            f"epoch {e}: {p:.2f} s / {t:.2f} s = {p / t:.2f}" for e, (p, t) in enumerate(zip(pauses, clock.train_s))
        )
    )
    ratios = [p / t for p, t in zip(pauses, clock.train_s)]
    print(
        f"median over the epochs: pause {statistics.median(pauses):.2f} s, training {epoch_s:.2f} s, "
        f"per-epoch ratio {statistics.median(ratios):.2f}"
    )
    if args.profile:
        Counted.profiler.dump_stats(args.profile)
        print(f"profile of every callback run: {args.profile} (python -m pstats {args.profile})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
