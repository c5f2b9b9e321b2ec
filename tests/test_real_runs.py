"""What a real training script sees around the callbacks: the terminal under Lightning's progress bars, common
Trainer knobs together, a user's own LightningCLI script, ``logger=False``. Real ``Trainer.fit`` runs, event files
read back."""

from __future__ import annotations

import io
import logging
import os
import re

import lightning as L
import pytest
import rich
import torch
import torch.nn.functional as F
from helpers import LitTiny, image_steps, read_events, tiny_loaders, tiny_trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.callbacks.synthesis import UnitCallback
from lightning_viz.progress import _BarAwareHandler


def test_lines_print_above_a_rich_progress_bar(tmp_path):
    """``RichProgressBar`` (Lightning's default progress bar when ``rich`` is installed) swaps ``sys.stderr`` for a
    proxy that prints above its live bars. Was: the handler kept the ``sys.stderr`` of import time and wrote into the
    bars, so the next redraw erased the epoch-0 line and left the last one between two copies of the bar; and the
    step note of a second ``trainer.validate`` went through Lightning's own handler, glued to the validation bar."""
    screen = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 200})
    log = logging.getLogger("lightning_viz")
    handler, level = _BarAwareHandler(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        trainer = L.Trainer(
            max_epochs=2,
            accelerator="cpu",
            devices=1,
            logger=TensorBoardLogger(str(tmp_path), name="", version=0),
            callbacks=[GradientCallback(num_probes=2), CAMCallback(num_probes=2, run_on="validation_epoch_end"), bar],
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        model, (train, val) = LitTiny(), tiny_loaders()
        trainer.fit(model, train, val)
        trainer.validate(model, val, verbose=False)  # step 2
        trainer.validate(model, val, verbose=False)  # step 3, and a note saying so
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        rich.reconfigure()  # the global console back to its defaults
    out = screen.getvalue()
    expected = [
        *(f"lightning-viz epoch {e}{w}: " for e in (0, 1) for w in ("", " (validation end)")),
        "lightning-viz trainer.validate, step 2: ",  # not "epoch 2": a 2-epoch fit has no epoch 2
        "lightning-viz trainer.validate, step 3: ",
        "lightning-viz: CAMCallback (cam) under trainer.validate logs at step 3 ",
    ]
    for start in expected:  # each line once, on a line of its own on the bar's console (above the bars)
        lines = re.findall(rf"(?:^|\n|\x1b\[2K)({re.escape(start)}[^\n\x1b]*)\n", out)
        assert len(lines) == 1 and lines[0].rstrip().endswith((")", ").")), (start, out[-3000:])
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-gradients/panel/p000") == [0, 1]
    assert image_steps(acc, "viz-cam/panel/p000") == [0, 1, 2, 3]


class _LogsInForward(LitTiny):
    """A ``forward`` that logs a feature statistic (as modules logging an auxiliary loss in ``forward`` do)."""

    def forward(self, x):
        net = self.net
        h = F.relu(net.conv2(net.relu(net.bn1(net.conv1(x)))))
        self.log("feat_mean", h.mean(), on_step=False, on_epoch=True)
        return net.fc(net.pool(h).flatten(1))


def test_a_forward_that_logs_keeps_its_metrics_and_runs(tmp_path):
    """``self.log`` inside ``forward`` is muted while a callback calls the model. Was: the setup check failed
    (``You can't `self.log()` inside `setup```), so no callback could run on such a module; at epoch ends the probes'
    values would have joined the user's metric. The logged values are those of a run without callbacks, and the
    training bit-identical."""
    runs = {}
    for viz in (False, True):
        torch.manual_seed(0)
        model, logdir = _LogsInForward(), str(tmp_path / f"viz{int(viz)}")
        cbs = [GradientCallback(num_probes=2), CAMCallback(num_probes=2, run_on="validation_epoch_end")] if viz else []
        tiny_trainer(logdir, cbs).fit(model, *tiny_loaders())
        acc = read_events(logdir)
        runs[viz] = [(e.step, e.value) for e in acc.Scalars("feat_mean")], model.state_dict()
        if viz:
            assert image_steps(acc, "viz-gradients/panel/p000") == [0, 1]
            assert image_steps(acc, "viz-cam/panel/p000") == [0, 1]
    assert len(runs[False][0]) == 4 and runs[True][0] == runs[False][0]  # train + val epoch values, 2 epochs
    assert all(torch.equal(v, runs[True][1][k]) for k, v in runs[False][1].items())
    assert "log" not in vars(model) and "log_dict" not in vars(model)  # the mute left nothing behind


def test_unit_callback_without_options_names_both_it_needs():
    """``UnitCallback()``: both missing options in one message. Was: "needs layers", and once given, "needs
    channels"."""
    with pytest.raises(ValueError, match=r"UnitCallback needs layers and channels: .*channels=\[0, 1, 2\]\)"):
        UnitCallback()


class _OneCycle(LitTiny):
    """Adam with OneCycleLR stepped every optimizer step (its length from the trainer's estimate)."""

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        total = self.trainer.estimated_stepping_batches
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_common_trainer_knobs_together_train_the_same(tmp_path):
    """A usual training setup: two validations per epoch, gradient accumulation and clipping, OneCycleLR,
    EarlyStopping and ModelCheckpoint on ``val_loss``, LearningRateMonitor. With the callbacks (one on each
    ``run_on``) the weights, every scalar the run logs and the checkpoints kept are those of the run without them;
    each visualization is written once per epoch, at the epoch."""
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

    runs = {}
    for viz in (False, True):
        torch.manual_seed(0)
        logdir = str(tmp_path / f"viz{int(viz)}")
        ckpt = ModelCheckpoint(dirpath=logdir + "/ckpt", monitor="val_loss", save_top_k=2)
        cbs = [LearningRateMonitor(), ckpt, EarlyStopping("val_loss", patience=3)]
        if viz:
            cbs += [GradientCallback(num_probes=2), CAMCallback(num_probes=2, run_on="validation_epoch_end")]
        model = _OneCycle(lr=0.05)
        kw = dict(val_check_interval=0.5, accumulate_grad_batches=2, gradient_clip_val=1.0, enable_checkpointing=True)
        trainer = tiny_trainer(logdir, cbs, **kw)
        trainer.fit(model, *tiny_loaders(n=64))
        acc = read_events(logdir)
        scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if "viz-" not in t}
        runs[viz] = model.state_dict(), scalars, sorted(os.listdir(logdir + "/ckpt")), trainer.global_step
        if viz:
            assert image_steps(acc, "viz-gradients/panel/p000") == [0, 1]
            assert image_steps(acc, "viz-cam/panel/p000") == [0, 1]
    assert runs[False][3] == 8  # 8 batches an epoch, 2 per optimizer step, 2 epochs
    assert len(runs[False][1]["val_loss"]) == 4 and {s for s, _ in runs[False][1]["lr-Adam"]} == set(range(8))
    assert runs[True][1:] == runs[False][1:]
    assert all(torch.equal(v, runs[True][0][k]) for k, v in runs[False][0].items())
