"""What a real training script sees around the callbacks: the terminal under Lightning's progress bars, common
Trainer knobs together, a user's own LightningCLI script, ``logger=False``. Real ``Trainer.fit`` runs, event files
read back."""

from __future__ import annotations

import io
import logging
import re

import lightning as L
import rich
from helpers import LitTiny, image_steps, read_events, tiny_loaders
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.gradients import GradientCallback
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
        "lightning-viz epoch 2 (validation end): ",
        "lightning-viz epoch 3 (validation end): ",
        "lightning-viz: CAMCallback (cam) under trainer.validate logs at step 3 ",
    ]
    for start in expected:  # each line once, on a line of its own on the bar's console (above the bars)
        lines = re.findall(rf"(?:^|\n|\x1b\[2K)({re.escape(start)}[^\n\x1b]*)\n", out)
        assert len(lines) == 1 and lines[0].rstrip().endswith((")", ").")), (start, out[-3000:])
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-gradients/panel/p000") == [0, 1]
    assert image_steps(acc, "viz-cam/panel/p000") == [0, 1, 2, 3]
