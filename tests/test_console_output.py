"""What the terminal shows around the callbacks: every line on the ``lightning_viz`` logger (so the README's one line
silences them), warnings once, progress on long work. Real ``Trainer.fit`` runs, the real log records and streams."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import subprocess
import sys
import warnings

import lightning as L
import pytest
import torch
from helpers import InputGradMap, LitTiny, tiny_loaders, tiny_trainer
from lightning.pytorch.callbacks import TQDMProgressBar

from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.gradients import GradientCallback

#: the child processes import this checkout's lightning_viz (not an installed one)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}


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
    assert ours[0][1].startswith("lightning-viz: 1 visualization callback(s) (every epoch): inputgrad; writing to ")
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


class _Noisy(LitTiny):
    def training_step(self, batch, batch_idx):
        warnings.warn("the model's own note", UserWarning, stacklevel=1)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("deterministic, hooked", [(False, False), (True, False), (False, True)])
def test_a_warning_of_the_users_model_prints_once_with_the_callbacks_attached(tmp_path, deterministic, hooked):
    """Python shows a warning once per place; attaching the callbacks keeps it so. Was: every run changed the warning
    filters (``catch_warnings`` for torch's backward-hook note; for ``deterministic=True`` its op warnings), which
    resets Python's memory of the warnings shown, so the model's own warning (and Lightning's) printed again after
    every epoch's visualizations."""
    callbacks = [GradientCallback(num_probes=2), CAMCallback(num_probes=2)]
    trainer = tiny_trainer(str(tmp_path), callbacks, max_epochs=3, limit_train_batches=2, deterministic=deterministic)
    model = _Noisy()
    if hooked:  # a user's full backward hook: torch's note about it is silenced inside a visualization
        model.net.conv2.register_full_backward_hook(lambda m, grad_in, grad_out: None)
    try:
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("default")  # Python's own default for a UserWarning: once per place
            trainer.fit(model, *tiny_loaders(n=12, batch_size=6))
    finally:
        torch.use_deterministic_algorithms(False)
    assert [str(w.message) for w in shown].count("the model's own note") == 1
    assert [cb.last_logged_tags is not None for cb in callbacks] == [True, True]


class _Diverged(LitTiny):
    def on_train_epoch_end(self):
        with torch.no_grad():
            self.net.fc.weight.fill_(float("nan"))


def test_a_warning_during_a_run_prints_above_the_tqdm_bar(tmp_path, monkeypatch):
    """Lightning's ``TQDMProgressBar`` on the terminal, warnings shown as Python shows them (no recorder). Was: a
    warning of a run went straight to ``sys.stderr`` and was glued to the end of the bar
    (``Epoch 0: 100%|...| 2/2 [00:00<00:00]/.../base.py:647: InputGradMap: the inputgrad/input maps ...``)."""
    monkeypatch.setattr(warnings, "showwarning", warnings._showwarning_orig)  # as outside pytest's recorder
    monkeypatch.setattr(warnings, "_showwarnmsg_impl", lambda msg: sys.stderr.write(warnings._formatwarnmsg(msg)))
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        default_root_dir=str(tmp_path),
        callbacks=[InputGradMap(num_probes=2), TQDMProgressBar()],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    screen = io.StringIO()  # the terminal: the bar (stdout) and the warnings (stderr) on one screen
    with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen), warnings.catch_warnings():
        warnings.simplefilter("default")
        trainer.fit(_Diverged(), *tiny_loaders(n=12, batch_size=6))
    out = screen.getvalue()
    assert "Epoch 1: 100%" in out
    (line,) = [ln for ln in re.split(r"[\r\n]", out) if "non-finite values" in ln]
    assert "Epoch" not in line and "InputGradMap: the inputgrad/input maps contain non-finite values" in line


def test_the_start_up_line_says_each_schedule_in_words_once(tmp_path, caplog):
    """Was: ``gradients (every 1), cam (every 1), ...`` after each of the demo's 11 callbacks ("every 1" what?)."""
    trainer = tiny_trainer(
        str(tmp_path),
        [GradientCallback(num_probes=2, every_n_epochs=2, run_at_start=True), CAMCallback(num_probes=2)],
        max_epochs=1,
        limit_train_batches=1,
    )
    with caplog.at_level(logging.INFO):
        trainer.fit(LitTiny(), *tiny_loaders(n=12, batch_size=6))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-viz: ")]
    assert line.startswith(
        "lightning-viz: 2 visualization callback(s): gradients (every 2 epochs, and before training), "
        "cam (every epoch); writing to TensorBoard at "
    )


def test_a_deprecated_option_warns_on_rank_zero_only():
    """DDP (``strategy="ddp"``) runs the script again for each other rank, with ``LOCAL_RANK`` set, which builds the
    callbacks again. Was: every rank printed the deprecation, the same line once per rank."""
    from lightning_viz.callbacks._options import VizDeprecationWarning
    from lightning_viz.callbacks.embeddings import EmbeddingCallback

    with pytest.warns(VizDeprecationWarning, match="option 'batch_size' is deprecated"):
        EmbeddingCallback(batch_size=8)
    code = "from lightning_viz.callbacks.embeddings import EmbeddingCallback; EmbeddingCallback(batch_size=8)"
    env = {**_ENV, "LOCAL_RANK": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert "deprecated" not in proc.stderr, proc.stderr


def test_the_same_loop_again_from_zero_starts_its_rate_anew(caplog, monkeypatch):
    """A run can go through the same loop twice (Score-CAM's masked images, then again on the randomized model of the
    tracker's sanity check). Was: the second pass, starting at 0 like the first, counted as the same loop, so its rate
    ran from the first pass's start: ``17/512 masked images (218 s, ~6047 s left)`` where ~180 s were left."""
    from lightning_viz import progress as progress_module

    clock = iter([0.0, 10.0, 20.0, 30.0, 40.0, 50.0])
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(progress_module.logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning_viz")
    with progress_module.reporting("cam", every_s=0.0):  # run start: 0 s
        progress_module.progress(0, 20, "masked images")  # 10 s: the first pass's first report
        progress_module.progress(10, 20, "masked images")  # 20 s: 10 in 10 s
        progress_module.progress(20, 20, "masked images")  # 30 s: done
        progress_module.progress(0, 20, "masked images")  # 40 s: the second pass
        progress_module.progress(10, 20, "masked images")  # 50 s: 10 in 10 s again, 10 left
    msgs = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    assert msgs[-2:] == [
        "lightning-viz cam: 0/20 masked images (40 s)",
        "lightning-viz cam: 10/20 masked images (50 s, ~10 s left)",
    ]


def test_the_sanity_checks_second_pass_says_so_in_its_progress_lines(tmp_path, caplog, monkeypatch):
    """``MapTracker(sanity_check=True)`` computes the maps again on a randomized model. Was: its Score-CAM pass logged
    ``lightning-viz cam: 0/512 masked images`` right after the first pass's ``510/512``, as if it started over."""
    from lightning_viz import progress as progress_module
    from lightning_viz.tracking import MapTracker

    monkeypatch.setattr(progress_module, "PROGRESS_EVERY_S", 0.0)  # every chunk: a line
    monkeypatch.setattr(progress_module.logger, "propagate", True)
    caplog.set_level(logging.INFO, logger="lightning_viz")
    tracker = MapTracker(sanity_check=True, filmstrip=False, drift=False)
    cb = CAMCallback(methods=["scorecam"], layers=["net.conv2"], num_probes=2, chunk_size=4, tracker=tracker)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1, limit_train_batches=1).fit(LitTiny(), *tiny_loaders(n=12))
    lines = [r.getMessage() for r in caplog.records if "masked images" in r.getMessage()]
    labels = [m.split(":")[0] for m in lines]
    first = labels.index("lightning-viz cam (sanity check)")
    assert first > 0 and set(labels[:first]) == {"lightning-viz cam"}
    assert set(labels[first:]) == {"lightning-viz cam (sanity check)"}
    assert lines[first].startswith("lightning-viz cam (sanity check): 0/8 masked images")


class _Failing(InputGradMap):
    def compute_maps(self, pl_module, probe):
        raise RuntimeError("shape mismatch in my layer")


def test_the_epoch_line_says_which_run_failed_under_on_error_warn(tmp_path, caplog):
    """``on_error="warn"``: Python shows the same warning once, so a callback failing every epoch warns at the first
    only. Was: the later epochs' lines read ``inputgrad 0.00 s`` as if it had run; now ``inputgrad failed 0.00 s``."""
    cbs = [_Failing(num_probes=2, on_error="warn"), InputGradMap(num_probes=2, name="ok")]
    trainer = tiny_trainer(str(tmp_path), cbs, max_epochs=2, limit_train_batches=1)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="shape mismatch in my layer"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12, batch_size=6))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-viz epoch")]
    assert len(lines) == 2
    for line in lines:
        parts = line.split(" (", 1)[1].rstrip(")").split(", ")
        assert sorted(p.rsplit(" ", 2)[0] for p in parts) == ["inputgrad failed", "inputgrad[ok]"], line


_TWO_RANKS = """
import os, sys, warnings, torch, torch.distributed as dist, torch.multiprocessing as mp

def work(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from lightning_viz.capture import deterministic_warn_only

    torch.use_deterministic_algorithms(True)
    with deterministic_warn_only():  # what a visualization meets on each rank (on the GPU: e.g. a bilinear backward)
        warnings.warn("foo_backward_cuda does not have a deterministic implementation, but you set ...")
    dist.barrier()
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(int(sys.argv[1]),), nprocs=2)
"""


def test_a_nondeterministic_op_is_warned_once_under_ddp_not_per_rank(tmp_path):
    """``deterministic=True`` on two ranks: every rank runs the visualization's op. Was: each rank printed the same
    ``NondeterministicOpWarning``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "two_ranks.py"
    script.write_text(_TWO_RANKS)
    proc = subprocess.run(
        [sys.executable, str(script), str(port)], capture_output=True, text=True, check=True, timeout=120, env=_ENV
    )
    assert proc.stderr.count("lightning-viz: a visualization ran foo_backward_cuda") == 1, proc.stderr


def test_a_warning_passed_on_under_deterministic_mode_shows_once(monkeypatch):
    """``deterministic=True``: the warnings a visualization meets are caught (to rephrase torch's op warnings) and the
    others passed on. Was: passed on without Python's memory of those shown, so the model's own warning in its
    forward printed at every run."""
    from lightning_viz.capture import deterministic_warn_only

    try:
        torch.use_deterministic_algorithms(True)
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter("default")
            for _ in range(3):  # three epochs' runs
                with deterministic_warn_only():
                    warnings.warn("the model's forward note", UserWarning, stacklevel=1)
    finally:
        torch.use_deterministic_algorithms(False)
    assert [str(w.message) for w in shown] == ["the model's forward note"]


#: the calls that issue a warning, and where their category goes (positional index, else the ``category`` keyword)
_WARNING_CALLS = {"warn": 1, "warn_explicit": 1, "rank_zero_warn": None}
#: warnings passed on as they came (another library's, caught while a visualization ran): not the library's own
_PASSED_ON = {("lightning_viz.capture", "w.category")}


def _warning_sites() -> list[tuple[str, int, str]]:
    """``(module, line, category expression)`` of every call in lightning_viz that issues a warning."""
    import ast
    import glob

    sites = []
    for path in sorted(glob.glob(os.path.join(_ROOT, "lightning_viz", "**", "*.py"), recursive=True)):
        module = os.path.relpath(path, _ROOT)[: -len(".py")].replace(os.sep, ".").removesuffix(".__init__")
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name not in _WARNING_CALLS:
                continue
            at = _WARNING_CALLS[name]
            category = next((k.value for k in node.keywords if k.arg == "category"), None)
            if category is None and at is not None and len(node.args) > at:
                category = node.args[at]
            sites.append((module, node.lineno, "" if category is None else ast.unparse(category)))
    return sites


def test_every_warning_the_library_issues_is_a_lightning_viz_warning():
    """Every ``warnings.warn`` / ``rank_zero_warn`` in lightning_viz names a category under the one public
    ``LightningVizWarning`` (a ``UserWarning``), so ``warnings.filterwarnings("ignore" or "error",
    category=LightningVizWarning)`` reaches them all. Was: four unrelated bases and a bare ``UserWarning`` (the image
    folder's earlier-run warning)."""
    import importlib

    import lightning_viz
    from lightning_viz import LightningVizWarning

    assert issubclass(LightningVizWarning, UserWarning) and "LightningVizWarning" in lightning_viz.__all__
    sites = _warning_sites()
    assert len(sites) > 20  # the walk found them (25 today)
    wrong = []
    for module, line, category in sites:
        if (module, category) in _PASSED_ON:
            continue
        cls = getattr(importlib.import_module(module), category, None) if category.isidentifier() else None
        if not (isinstance(cls, type) and issubclass(cls, LightningVizWarning)):
            wrong.append(f"{module}:{line} category={category or None}")
    assert wrong == []


def test_a_real_warning_is_a_lightning_viz_warning_and_one_filter_silences_them_all(tmp_path):
    """A fresh fit into an earlier run's image folder (``CSVLogger(version=0)`` again) warns with a
    ``LightningVizWarning``; ``filterwarnings("ignore", category=LightningVizWarning)`` silences it and the others
    (more probes asked than items, a deprecated option) while Lightning's own warnings still show."""
    from lightning.pytorch.loggers import CSVLogger

    from lightning_viz import LightningVizWarning
    from lightning_viz.callbacks.filters import FilterCallback

    def fit(callbacks):
        trainer = tiny_trainer(
            str(tmp_path), callbacks, max_epochs=1, logger=CSVLogger(str(tmp_path), name="", version=0)
        )
        trainer.fit(LitTiny(), *tiny_loaders(n=12, batch_size=6))

    fit([InputGradMap(num_probes=1)])
    with pytest.warns(LightningVizWarning, match="already holds an earlier run's files"):
        fit([InputGradMap(num_probes=1)])

    def ours(silenced):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if silenced:
                warnings.filterwarnings("ignore", category=LightningVizWarning)
            fit([InputGradMap(num_probes=20), FilterCallback(layer="net.conv1")])
        shown = [str(w.message) for w in caught]
        assert any("Experiment logs directory" in m for m in shown), shown  # Lightning's own: always shown
        return [m for m in shown if "lightning-viz" in m or "is deprecated and will" in m or "num_probes=20" in m]

    assert len(ours(silenced=False)) == 3  # the earlier run's folder, the deprecated option, the 12 items
    assert ours(silenced=True) == []


def test_a_fast_dev_run_says_in_one_line_that_the_callbacks_ran_at_a_reduced_size(tmp_path, caplog):
    """Callbacks that run at different points of a fast dev run (before training, at the validation end, at the epoch
    end) are summed up in one line at the fit's end, naming each. Was: one line per point, each counting only its
    own."""
    cbs = [
        InputGradMap(num_probes=3, name="start", every_n_epochs=0, run_at_start=True),
        InputGradMap(num_probes=3, name="val", run_on="validation_epoch_end"),
        GradientCallback(num_probes=3),
    ]
    with caplog.at_level(logging.INFO, logger="lightning_viz"):
        tiny_trainer(str(tmp_path), cbs, fast_dev_run=True).fit(LitTiny(), *tiny_loaders(n=12, batch_size=6))
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_viz"]
    (line,) = [m for m in lines if "ran once" in m]
    assert line.startswith("lightning-viz fast_dev_run: 3 visualization callbacks ran once at a reduced size (")
    assert all(f"{label} 0." in line for label in ("inputgrad[start]", "inputgrad[val]", "gradients")), line
    assert not [m for m in lines if m.startswith("lightning-viz epoch") or m.startswith("lightning-viz before")]
