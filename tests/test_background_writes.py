"""TensorBoard images of a callback run are encoded and written on a background thread while the later callbacks of
the same epoch end compute; the last run waits for them, so the whole epoch's images are on disk when the pause
ends, and a failed write names the callback that logged the image."""

from __future__ import annotations

import errno
import glob
import os

import lightning as L
import pytest
import torch
from helpers import InputGradMap, LitTiny, image_steps, read_events, tiny_loaders, tiny_trainer

import lightning_viz.callbacks.base as base
import lightning_viz.logging as vlog
from lightning_viz.callbacks import ActivationCallback, EmbeddingCallback
from lightning_viz.callbacks.base import VisualizationError, VisualizationWarning


class Waits:
    """Counts ``wait_for_writes`` calls made by callback runs (a spy around the real function)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = base.wait_for_writes

        def counted():
            self.calls += 1
            return real()

        monkeypatch.setattr(base, "wait_for_writes", counted)


class OnDiskAtPauseEnd(L.Callback):
    """Last callback: when the epoch-end pause ends, nothing is pending, the event file has both image callbacks'
    images of this epoch (read back with TensorBoard's reader) and the projector has this epoch's tensors."""

    def __init__(self, logdir: str, waits: Waits):
        self.logdir, self.waits, self.checked = logdir, waits, []

    def on_train_epoch_end(self, trainer, pl_module):
        assert vlog._pending == []
        acc = read_events(self.logdir)
        epoch = trainer.current_epoch
        assert epoch in image_steps(acc, "viz-inputgrad/panel/p000")
        assert epoch in image_steps(acc, "viz-activations/net.conv1/p000")
        (tsv,) = glob.glob(os.path.join(self.logdir, "version_0", f"{epoch:05d}", "*", "tensors.tsv"))
        with open(tsv) as f:
            assert len(f.read().splitlines()) == 6
        self.checked.append((epoch, self.waits.calls))


def test_the_last_run_of_an_epoch_end_waits_for_every_background_image(tmp_path, monkeypatch):
    waits = Waits(monkeypatch)
    owners = []
    real_submit = vlog.submit_write

    def submit(fn, owner):
        owners.append(owner.label)
        real_submit(fn, owner)

    monkeypatch.setattr(vlog, "submit_write", submit)
    check = OnDiskAtPauseEnd(str(tmp_path), waits)
    cbs = [
        InputGradMap(num_probes=2),
        EmbeddingCallback(num_probes=6, projector=True),
        ActivationCallback(layers=["net.conv1"], num_probes=2),
        check,
    ]
    tiny_trainer(str(tmp_path), cbs, max_epochs=2).fit(LitTiny(), *tiny_loaders(n=12))
    # one wait per epoch end, by the last visualization callback (the first ones' images were left to the thread)
    assert check.checked == [(0, 1), (1, 2)]
    assert {"InputGradMap (inputgrad)", "EmbeddingCallback (embeddings)", "ActivationCallback (activations)"} <= set(
        owners
    )


def test_a_failed_background_write_names_the_callback_that_logged_the_image(tmp_path, monkeypatch):
    """The disk fills while the first callback's image is written in the background: the error (its type and
    message) is reported for that callback at that step, by the run that waits for it."""
    trainer_ref = {}
    real = vlog._png_summary

    def full_disk(tag, hwc):
        if tag.startswith("viz-inputgrad/") and trainer_ref["t"].current_epoch == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tag, hwc)

    monkeypatch.setattr(vlog, "_png_summary", full_disk)
    cbs = [InputGradMap(num_probes=2), ActivationCallback(layers=["net.conv1"], num_probes=2)]
    trainer = trainer_ref["t"] = tiny_trainer(str(tmp_path), cbs, max_epochs=3)
    with pytest.raises(VisualizationError, match=r"InputGradMap \(inputgrad\) failed while logging at step 1: OSError"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-inputgrad/panel/p000") == [0]
    assert image_steps(acc, "viz-activations/net.conv1/p000") == [0, 1]  # written before the error was raised


class Broken(InputGradMap):
    method = "broken"

    def compute_maps(self, pl_module, probe):
        if self.trainer_epoch == 1:
            raise RuntimeError("broken at epoch 1")
        return super().compute_maps(pl_module, probe)

    def on_train_epoch_end(self, trainer, pl_module):
        self.trainer_epoch = trainer.current_epoch
        super().on_train_epoch_end(trainer, pl_module)


def test_a_failed_background_write_warns_or_raises_as_its_own_callback_says(tmp_path, monkeypatch):
    """The failure of an earlier callback's background logging follows that callback's on_error, not the one of the
    callback that waits for it: "warn" trains on (every later epoch still logged), "raise" stops the fit."""
    real = vlog._png_summary
    epoch = {"now": 0}

    def full_disk(tag, hwc):
        if tag.startswith("viz-inputgrad/") and epoch["now"] == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tag, hwc)

    class Epoch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            epoch["now"] = trainer.current_epoch

    monkeypatch.setattr(vlog, "_png_summary", full_disk)
    cbs = [Epoch(), InputGradMap(num_probes=2, on_error="warn"), ActivationCallback(layers=["net.conv1"], num_probes=2)]
    with pytest.warns(
        VisualizationWarning, match=r"InputGradMap \(inputgrad\) failed while logging at step 1: OSError"
    ):
        tiny_trainer(str(tmp_path / "warn"), cbs, max_epochs=3).fit(LitTiny(), *tiny_loaders(n=12))
    acc = read_events(str(tmp_path / "warn"))
    assert image_steps(acc, "viz-inputgrad/panel/p000") == [0, 2]
    assert image_steps(acc, "viz-activations/net.conv1/p000") == [0, 1, 2]
    cbs = [Epoch(), InputGradMap(num_probes=2), ActivationCallback(layers=["net.conv1"], num_probes=2, on_error="warn")]
    with pytest.raises(VisualizationError, match=r"InputGradMap \(inputgrad\) failed while logging at step 1"):
        tiny_trainer(str(tmp_path / "raise"), cbs, max_epochs=3).fit(LitTiny(), *tiny_loaders(n=12))


def test_images_left_to_the_thread_are_written_when_a_later_callback_fails(tmp_path):
    """Nothing already logged is lost: the last callback fails at epoch 1, and the first one's epoch-1 images (left
    to the background thread) are in the event file after the fit stopped."""
    cbs = [ActivationCallback(layers=["net.conv1"], num_probes=2), Broken(num_probes=2)]
    trainer = tiny_trainer(str(tmp_path), cbs, max_epochs=3)
    with pytest.raises(VisualizationError, match="broken at epoch 1"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert vlog._pending == []
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-activations/net.conv1/p000") == [0, 1]
    assert image_steps(acc, "viz-broken/panel/p000") == [0]


def test_a_viz_logger_made_outside_a_run_writes_at_once(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    vlog.VizLogger(writer, step=4).image("viz-test/now", torch.rand(3, 6, 5))
    assert vlog._pending == []
    writer.flush()
    assert image_steps(read_events(str(tmp_path)), "viz-test/now") == [4]
    writer.close()


def test_a_runs_scalars_go_to_the_writer_thread_at_its_flush(tmp_path):
    """In a run, torch's ``add_scalar`` can wait while TensorBoard's event queue is full of images: the run's
    scalars are kept until its flush and written then, in order, on the writer thread; outside a run at once."""
    import threading

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path))
    file_writer = writer._get_file_writer()
    real, threads = file_writer.add_summary, []

    def add_summary(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    file_writer.add_summary = add_summary
    backend = vlog.TensorBoardBackend(writer)
    backend.scalar("viz-test/now", 0.5, 1)  # no run: at once, on this thread
    assert threads == [threading.current_thread().name]
    backend.background = vlog.WriteOwner("test", 1)
    for step, value in ((2, 1.0), (2, 2.0), (3, 4.0)):
        backend.scalar("viz-test/later", value, step)
    assert len(threads) == 1 and vlog._pending == []  # kept until the flush
    backend.flush()
    assert vlog.wait_for_writes() == []
    assert len(threads) == 4 and all(t.startswith("lightning-viz-writer") for t in threads[1:])
    acc = read_events(str(tmp_path))
    assert [(e.step, e.value) for e in acc.Scalars("viz-test/later")] == [(2, 1.0), (2, 2.0), (3, 4.0)]
    assert [(e.step, e.value) for e in acc.Scalars("viz-test/now")] == [(1, 0.5)]
    writer.close()


@pytest.mark.parametrize("fails", [False, True])
def test_no_writer_thread_is_left_after_a_fit(tmp_path, fails):
    """The background writer thread ends with the fit (also one stopped by an error in training_step), with every
    image on disk; a later fit starts a new one."""
    import threading

    class Failing(LitTiny):
        def training_step(self, batch, batch_idx):
            if fails and self.current_epoch == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    def writers():
        return [t for t in threading.enumerate() if t.name.startswith("lightning-viz-writer")]

    for version in (0, 1):
        cbs = [InputGradMap(num_probes=2), ActivationCallback(num_probes=2)]
        trainer = tiny_trainer(str(tmp_path / str(version)), cbs, max_epochs=2)
        if fails:
            with pytest.raises(RuntimeError, match="boom"):
                trainer.fit(Failing(), *tiny_loaders(n=16))
        else:
            trainer.fit(Failing(), *tiny_loaders(n=16))
        assert writers() == []
        acc = read_events(str(tmp_path / str(version)))
        assert image_steps(acc, "viz-inputgrad/panel/p000") == ([0] if fails else [0, 1])
