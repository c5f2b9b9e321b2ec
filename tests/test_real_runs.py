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

from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.progress import _BarAwareHandler


def test_epoch_line_prints_above_a_rich_progress_bar(tmp_path):
    """``RichProgressBar`` (Lightning's default progress bar when ``rich`` is installed) swaps ``sys.stderr`` for a
    proxy that prints above its live bars. Was: the handler kept the ``sys.stderr`` of import time and wrote into the
    bars, so the next redraw erased the epoch-0 line and left the last one between two copies of the bar."""
    screen = io.StringIO()
    bar = RichProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 100})
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
            callbacks=[GradientCallback(num_probes=2), bar],
            enable_checkpointing=False,
            enable_model_summary=False,
        )
        trainer.fit(LitTiny(), *tiny_loaders())
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        rich.reconfigure()  # the global console back to its defaults
    out = screen.getvalue()
    for epoch in (0, 1):  # each line once, on a line of its own on the bar's console (above the bars)
        lines = re.findall(rf"(?:^|\n|\x1b\[2K)(lightning-viz epoch {epoch}: [^\n\x1b]*)\n", out)
        assert len(lines) == 1 and lines[0].endswith(" s)"), (epoch, out[-2000:])
    assert image_steps(read_events(str(tmp_path)), "viz-gradients/panel/p000") == [0, 1]
