"""What the terminal shows around the callbacks: every line on the ``lightning_viz`` logger (so the README's one line
silences them), warnings once, progress on long work. Real ``Trainer.fit`` runs, the real log records and streams."""

from __future__ import annotations

import logging

import pytest
from helpers import InputGradMap, LitTiny, tiny_loaders, tiny_trainer


class _Tested(LitTiny):
    def test_step(self, batch, batch_idx):
        return None


@pytest.fixture
def viz_level():
    """Restore the ``lightning_viz`` logger's level after a test changes it."""
    log = logging.getLogger("lightning_viz")
    level = log.level
    yield log
    log.setLevel(level)


def test_the_readme_line_silences_every_info_line_start_up_included(tmp_path, caplog, viz_level):
    """README: ``logging.getLogger("lightning_viz").setLevel(logging.WARNING)`` silences the callbacks' lines. Was: the
    start-up line (which callbacks run, where they write) and the "do not run under trainer.test" line went through
    Lightning's ``rank_zero_info`` logger and stayed."""
    trainer = tiny_trainer(str(tmp_path), [InputGradMap(num_probes=2)], max_epochs=1, limit_train_batches=1)
    model, (train, val) = _Tested(), tiny_loaders(n=12, batch_size=6)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, train, val)
        trainer.test(model, val, verbose=False)
    ours = [(r.name, r.getMessage()) for r in caplog.records if r.getMessage().startswith("lightning-viz")]
    assert [m.split(":")[0] for _, m in ours] == ["lightning-viz", "lightning-viz epoch 0", "lightning-viz"]
    assert ours[0][1].startswith("lightning-viz: 1 visualization callback(s): inputgrad (every 1); writing to ")
    assert ours[2][1].startswith("lightning-viz: the 1 visualization callback(s) do not run under trainer.test ")
    assert {name for name, _ in ours} == {"lightning_viz"}

    caplog.clear()
    viz_level.setLevel(logging.WARNING)
    trainer = tiny_trainer(str(tmp_path), [InputGradMap(num_probes=2)], max_epochs=1, limit_train_batches=1)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, train, val)
        trainer.test(model, val, verbose=False)
    assert [r.getMessage() for r in caplog.records if "lightning-viz" in r.getMessage()] == []
    assert any(r.name.startswith("lightning.pytorch") for r in caplog.records)  # Lightning's own lines still show
