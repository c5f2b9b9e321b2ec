"""Base-callback options shared by every family: name (tag namespace), on_error, the start-up message,
and normalization stats given as tensors."""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from helpers import LitTiny, image_steps, read_events, scalar_steps, tiny_loaders, tiny_trainer

from lightning_viz.callbacks.base import VisualizationError, VisualizationWarning
from lightning_viz.callbacks.cam import CAMCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.callbacks.maps import MapCallback
from lightning_viz.tracking import MapTracker


class FailFromEpoch(MapCallback):
    """Mean of channel 0 as a 'map' until ``fail_from`` epochs, then an error."""

    method = "failing"

    def __init__(self, fail_from: int = 1, **kw):
        super().__init__(**kw)
        self.fail_from = fail_from
        self.epoch = 0

    def run(self, trainer, pl_module):
        self.epoch = trainer.current_epoch
        return super().run(trainer, pl_module)

    def compute_maps(self, pl_module, probe):
        if self.epoch >= self.fail_from:
            raise RuntimeError(f"boom at epoch {self.epoch}")
        return {"failing/x": probe.images[:, 0]}


def test_name_namespaces_tags_and_separates_two_instances(tmp_path):
    by_label = GradientCallback(num_probes=2)
    by_pred = GradientCallback(num_probes=2, target="predicted", name="pred")
    assert by_label.state_key != by_pred.state_key
    tiny_trainer(str(tmp_path), [by_label, by_pred], max_epochs=2).fit(LitTiny(), *tiny_loaders(n=12))
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-gradients/panel/p000") == [0, 1]
    assert image_steps(acc, "viz-gradients/pred/panel/p000") == [0, 1]
    assert scalar_steps(acc, "viz-gradients/pred/saliency/input/stats/max_abs") == [0, 1]
    assert scalar_steps(acc, "viz-gradients/time_s") == [0, 1]
    assert scalar_steps(acc, "viz-gradients/pred/time_s") == [0, 1]


def test_two_unnamed_callbacks_of_one_family_each_log_their_own_time_and_are_told_apart(tmp_path, caplog):
    """Two GradientCallbacks (other methods, no name=) may run side by side: each keeps its own ``time_s`` (the second
    ``time_s_2``, in ``trainer.callbacks`` order), and the start-up and epoch lines say ``gradients#2``. Was: both
    wrote ``viz-gradients/time_s`` at the same step (one hid the other) and the lines showed ``gradients`` twice."""
    from lightning.pytorch.loggers import CSVLogger

    caplog.set_level(logging.INFO, logger="lightning_viz")
    first = GradientCallback(methods=["saliency"], layout="per_probe", num_probes=2)
    second = GradientCallback(methods=["gradient"], layout="per_probe", num_probes=2)
    named = GradientCallback(methods=["gradient"], layout="per_probe", num_probes=2, name="b")
    tb_dir, csv_dir = tmp_path / "tb", tmp_path / "csv"
    for logger in (None, CSVLogger(str(csv_dir), name="", version=0)):
        kw = {} if logger is None else {"logger": logger}
        tiny_trainer(str(tb_dir), [first, second, named], max_epochs=2, **kw).fit(LitTiny(), *tiny_loaders(n=12))
    acc = read_events(str(tb_dir))
    timings = {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if "time_s" in t}
    assert sorted(timings) == ["viz-gradients/b/time_s", "viz-gradients/time_s", "viz-gradients/time_s_2"]
    assert scalar_steps(acc, "viz-gradients/time_s") == scalar_steps(acc, "viz-gradients/time_s_2") == [0, 1]
    assert timings["viz-gradients/time_s"] != timings["viz-gradients/time_s_2"]
    assert (first._twin, second._twin, named._twin) == (1, 2, 1)
    import csv

    with open(csv_dir / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f)]
    assert sum(bool(r.get("viz-gradients/time_s")) for r in rows) == 2
    assert sum(bool(r.get("viz-gradients/time_s_2")) for r in rows) == 2
    last = [float(r["viz-gradients/time_s_2"]) for r in rows if r.get("viz-gradients/time_s_2")][-1]
    assert last == pytest.approx(second.last_duration_s)  # the second's own seconds
    lines = [r.getMessage() for r in caplog.records]
    assert any("callback(s) (every epoch): gradients, gradients#2, gradients[b]; " in ln for ln in lines), lines
    assert any(ln.startswith("lightning-viz epoch 1:") and "gradients#2 " in ln for ln in lines), lines


def test_a_failing_callback_is_named_by_its_name(tmp_path):
    """A compute error names the instance (``failing[mine]``), not only its family. Was: ``lightning-viz failing
    failed``, the same for every instance of the family."""
    trainer = tiny_trainer(str(tmp_path), [FailFromEpoch(fail_from=0, num_probes=2, name="mine")], max_epochs=1)
    with pytest.raises(VisualizationError, match=r"^lightning-viz failing\[mine\] failed: RuntimeError: boom at epoch"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))


def test_setup_errors_name_the_instance_by_its_name(tmp_path):
    """Of two CAMCallbacks, the one with a bad layer is named by its ``name=`` in the setup error (``CAMCallback 'b':``;
    was: ``CAMCallback:`` for either); the message itself is unchanged."""
    from lightning_viz.callbacks.cam import CAMCallback
    from lightning_viz.layers import LayerNotFoundError

    cbs = [CAMCallback(layers="net.conv2", name="a"), CAMCallback(layers="net.conv9", name="b")]
    with pytest.raises(LayerNotFoundError, match=r"^CAMCallback 'b': Unknown layer 'net.conv9' in LitTiny\."):
        tiny_trainer(str(tmp_path), cbs, max_epochs=1).fit(LitTiny(), *tiny_loaders(n=8))
    with pytest.raises(ValueError, match=r"^GradientCallback 'c': methods: unknown gradient method 'x'"):
        GradientCallback(methods=["x"], name="c")  # an option error in __init__ too


@pytest.mark.parametrize("bad", ["", "a/b"])
def test_bad_name_is_refused(bad):
    with pytest.raises(ValueError, match="name must be"):
        GradientCallback(name=bad)


def test_on_error_warn_keeps_training_and_earlier_logs(tmp_path):
    cb = FailFromEpoch(fail_from=1, num_probes=2, on_error="warn")
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=3)
    with pytest.warns(VisualizationWarning, match="boom at epoch 1"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert trainer.current_epoch == 3  # training went on to the end
    acc = read_events(str(tmp_path))
    assert image_steps(acc, "viz-failing/panel/p000") == [0]
    assert scalar_steps(acc, "train_loss")  # training metrics kept flowing


def test_on_error_raise_is_the_default(tmp_path):
    trainer = tiny_trainer(str(tmp_path), [FailFromEpoch(fail_from=0, num_probes=2)], max_epochs=1)
    with pytest.raises(VisualizationError, match="failing failed: RuntimeError: boom at epoch 0"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))


def test_bad_on_error_is_refused():
    with pytest.raises(ValueError, match="on_error must be 'raise' or 'warn'"):
        GradientCallback(on_error="ignore")


def test_startup_message_names_callbacks_and_tensorboard_command(tmp_path, caplog):
    """The schedule of each callback, where it runs included: a run_on='validation_epoch_end' one runs only at epochs
    that validate (was: 'every 1' alike, though with check_val_every_n_epoch=2 it runs every other epoch)."""
    cbs = [GradientCallback(num_probes=2, every_n_epochs=2), CAMCallback(num_probes=2, run_on="validation_epoch_end")]
    with caplog.at_level(logging.INFO):
        tiny_trainer(str(tmp_path), cbs, max_epochs=2, check_val_every_n_epoch=2).fit(LitTiny(), *tiny_loaders(n=12))
    msgs = [r.getMessage() for r in caplog.records if "lightning-viz:" in r.getMessage()]
    assert len(msgs) == 1, msgs
    assert "2 visualization callback(s): gradients (every 2 epochs), cam (every epoch, at validation ends);" in msgs[0]
    assert f"tensorboard --logdir {tmp_path}" in msgs[0]


class TensorStatsData(L.LightningDataModule):
    """A datamodule whose mean/std are tensors (a multi-element tensor has no truth value)."""

    mean = torch.tensor([0.5, 0.5, 0.5])
    std = torch.tensor([0.25, 0.25, 0.25])

    def train_dataloader(self):
        return tiny_loaders(n=12)[0]

    def val_dataloader(self):
        return tiny_loaders(n=12)[1]


def test_datamodule_stats_may_be_tensors(tmp_path):
    cb = GradientCallback(num_probes=2)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), datamodule=TensorStatsData())
    x = cb.probes.images
    torch.testing.assert_close(cb.probes.display_images(), (x * 0.25 + 0.5).clamp(0, 1))


def test_map_rendering_options_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"unknown colormap 'nope'.*'jet', 'viridis'"):
        GradientCallback(cmap="nope")
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\].*got " + str(alpha)):
            GradientCallback(alpha=alpha)
    assert GradientCallback(alpha=0.0, cmap="bwr").alpha == 0.0


class Stream(torch.utils.data.IterableDataset):
    """A stream: no ``len``, no indexing, so no probe can be picked from it."""

    def __iter__(self):
        return iter(tiny_loaders(n=12)[0].dataset)


def test_iterable_data_without_probes_is_a_clear_error(tmp_path):
    loader = torch.utils.data.DataLoader(Stream(), batch_size=4)
    trainer = tiny_trainer(
        str(tmp_path), [GradientCallback(num_probes=2)], max_epochs=1, limit_train_batches=2, limit_val_batches=0
    )
    with pytest.raises(
        VisualizationError, match=r"no map-style val or train dataset.*IterableDataset.*probes=ProbeSet"
    ):
        trainer.fit(LitTiny(), loader)


class Unlabeled(L.LightningDataModule):
    """Images only: nothing to take target='label' from."""

    def train_dataloader(self):
        return torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(tiny_loaders(n=12)[0].dataset.tensors[0]), batch_size=4
        )

    val_dataloader = train_dataloader


class Unsupervised(LitTiny):
    def training_step(self, batch, batch_idx):
        return self(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        pass


def test_label_target_without_labels_fails_at_setup(tmp_path):
    trainer = tiny_trainer(str(tmp_path), [GradientCallback(num_probes=2)], max_epochs=1)
    with pytest.raises(
        ValueError, match=r"GradientCallback: target='label' needs a class label.*TensorDataset.*'predicted'"
    ):
        trainer.fit(Unsupervised(), datamodule=Unlabeled())
    assert trainer.global_step == 0  # before any training step
    cb = GradientCallback(num_probes=2, target="predicted")  # no labels needed: works
    tiny_trainer(str(tmp_path / "ok"), [cb], max_epochs=1).fit(Unsupervised(), datamodule=Unlabeled())
    assert cb.probes.labels is None and cb.last_logged_tags


def test_tracker_label_target_without_labels_fails_at_setup(tmp_path):
    """MapTracker(target='label', faithfulness=True) on unlabeled probes fails before training, naming the tracker's
    option; before, the first epoch's end failed with the callback's target looking fine."""
    tracker = MapTracker(faithfulness=True, target="label", filmstrip=False)
    cb = GradientCallback(num_probes=2, target="predicted", tracker=tracker)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
    with pytest.raises(ValueError, match=r"GradientCallback\(tracker=MapTracker\(target='label'\)\).*have none"):
        trainer.fit(Unsupervised(), datamodule=Unlabeled())
    assert trainer.global_step == 0


def test_validation_schedule_that_never_meets_fails_at_setup(tmp_path):
    """check_val_every_n_epoch=2 validates at epochs 1, 3, ...; every_n_epochs=3 runs at epochs 2, 5, ... and the
    last one: in a 3-epoch fit (epochs 0-2) no validation is ever scheduled."""
    cb = GradientCallback(num_probes=2, run_on="validation_epoch_end", every_n_epochs=3)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=3, check_val_every_n_epoch=2)
    with pytest.raises(
        ValueError,
        match=r"GradientCallback would never run.*every_n_epochs=3.*check_val_every_n_epoch=2"
        r".*max_epochs=3",
    ):
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert trainer.global_step == 0
    ok = tiny_trainer(str(tmp_path), max_epochs=4, check_val_every_n_epoch=2)  # the last epoch (3) validates
    GradientCallback(run_on="validation_epoch_end", every_n_epochs=3).setup(ok, LitTiny(), "fit")


def test_too_few_class_names_fail_at_setup(tmp_path):
    """Two names for a model with more classes left the other classes' captions as bare indices, silently."""
    trainer = tiny_trainer(str(tmp_path), [GradientCallback(num_probes=2, class_names=["a", "b"])], max_epochs=1)
    with pytest.raises(ValueError, match=r"^GradientCallback: class_names: 2 names for a model with 3 classes"):
        trainer.fit(LitTiny(), *tiny_loaders(n=8))
    assert trainer.global_step == 0


def test_setup_and_option_errors_name_the_callback(tmp_path):
    """With many callbacks attached (the demo has eleven), every setup or option error says which one is wrong."""
    from lightning_viz.callbacks.activations import ActivationCallback
    from lightning_viz.callbacks.filters import FilterCallback
    from lightning_viz.callbacks.patches import TopPatchesCallback
    from lightning_viz.callbacks.synthesis import InversionCallback
    from lightning_viz.layers import LayerNotFoundError

    for make in (
        lambda: FilterCallback(layers="net.relu3"),
        lambda: ActivationCallback(layers=["net.relu3"], num_probes=2),
        lambda: TopPatchesCallback(layers=["net.relu3"], num_probes=4),
        lambda: InversionCallback(layers="net.relu3", num_probes=2),
    ):
        cb = make()
        trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1, limit_train_batches=1, limit_val_batches=1)
        with pytest.raises(LayerNotFoundError, match=rf"^{type(cb).__name__}: Unknown layer 'net.relu3'"):
            trainer.fit(LitTiny(), *tiny_loaders(n=8))
    for kwargs, what in (({"num_probes": 0}, "num_probes"), ({"every_n_epochs": -1}, "every_n_epochs")):
        with pytest.raises(ValueError, match=rf"^GradientCallback: {what} must be"):
            GradientCallback(**kwargs)


def test_results_reach_log_results_detached_on_the_cpu_also_without_ddp(tmp_path):
    """A subclass's compute may return tensors that need grad (or, on a GPU, live there) in a named tuple: its
    log_results (and any history it keeps) gets them detached and on the CPU, as a DDP gather would give them."""
    from collections import namedtuple

    from lightning_viz.callbacks.base import VisualizationCallback
    from lightning_viz.logging import make_tag

    Out = namedtuple("Out", ["norm", "extra"])
    seen = []

    class GradNorm(VisualizationCallback):
        method = "gradnorm"

        def compute(self, pl_module, probe):
            x = probe.images.clone().requires_grad_()
            return Out(norm=pl_module(x).square().sum(1), extra=[x.sum()])

        def log_results(self, logger, results, probe, trainer):
            seen.append(results)
            logger.scalar(make_tag(self.method, "mean"), results.norm.mean())

    cb = GradNorm(num_probes=3)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1).fit(LitTiny(), *tiny_loaders(n=8))
    (res,) = seen
    assert isinstance(res, Out) and res.norm.shape == (3,)
    assert not res.norm.requires_grad and not res.extra[0].requires_grad and res.norm.device.type == "cpu"
    assert scalar_steps(read_events(str(tmp_path)), "viz-gradnorm/mean") == [0]


@pytest.mark.parametrize(
    "make, option, allowed",
    [
        ("CAMCallback(methods=['gradcamm'])", "methods", "gradcam"),
        ("GradientCallback(methods=['salincy'])", "methods", "saliency"),
        ("GradientCallback(methods=[])", "methods", "saliency"),
        ("GradientCallback(target='foo')", "target", "'predicted'"),
        ("CAMCallback(reduce='max')", "reduce", "'abs_sum'"),
        ("OcclusionCallback(fill='black')", "fill", "'blur'"),
        ("OcclusionCallback(window=0)", "window", ">= 1"),
        ("GradientCallback(cmap='notacmap')", "cmap", "'viridis'"),
        ("GradientCallback(alpha=2)", "alpha", "[0, 1]"),
        ("ActivationCallback(logits_fn='no.such.fn')", "logits_fn", "dotted path"),
        ("TopPatchesCallback(layers='net.conv2', k=0)", "k", ">= 1"),
        ("TopPatchesCallback(layers='net.conv2', chunk_size=0)", "chunk_size", ">= 1 or None"),
        ("EmbeddingCallback(chunk_size=0)", "chunk_size", ">= 1 or None"),
        ("EmbeddingCallback(projection=['umap'])", "projection", "'tsne'"),
        ("ClassModelCallback(tv=-1)", "tv", ">= 0"),
        ("ClassModelCallback(clip_percentile=200)", "clip_percentile", "(0, 100)"),
        ("ClassModelCallback(blur_every=2, blur_sigma=-1)", "blur_sigma", "> 0"),
        ("UnitCallback(layers='net.conv2', channels=[0], blur_sigma=1.0)", "blur_sigma", "give blur_every too"),
        ("AdversarialCallback(min_flip_iterations=-1)", "min_flip_iterations", ">= 0"),
        ("MapTracker(topk=1.5)", "topk", "(0, 1]"),
        ("MapTracker(target='foo')", "target", "'label'"),
    ],
)
def test_option_errors_at_construction_name_the_callback_the_option_and_what_is_allowed(make, option, allowed):
    """In a CLI run the message is all a user sees of a bad value among many callbacks: it must say whose option
    it is (messages raised by shared helpers included), which option, and what is allowed."""
    import lightning_viz
    from lightning_viz.tracking import MapTracker

    owner = make.split("(")[0]
    with pytest.raises((ValueError, TypeError)) as info:
        eval(make, {**{c: getattr(lightning_viz, c) for c in lightning_viz.__all__}, "MapTracker": MapTracker})
    message = str(info.value)
    assert message.startswith(f"{owner}: "), message
    assert option in message and allowed in message, message


@pytest.mark.parametrize(
    "make, option",
    [
        ("GradientCallback(smoothgrad_sigma=float('nan'))", "smoothgrad_sigma"),
        ("GradientCallback(ig_baseline=float('inf'))", "ig_baseline"),
        ("ClassModelCallback(lr=float('nan'))", "lr"),
        ("ClassModelCallback(None, 16, float('inf'))", "l2"),  # positional: named all the same
        ("InversionCallback(layers='net.conv1', tv=float('nan'))", "tv"),
        ("AdversarialCallback(epsilon=float('inf'))", "epsilon"),
        ("AdversarialCallback(step_size=float('nan'))", "step_size"),
        ("EmbeddingCallback(tsne_perplexity=float('nan'))", "tsne_perplexity"),
        ("OcclusionCallback(memory_mb=float('inf'))", "memory_mb"),
        ("MapTracker(pointing_tolerance=float('nan'))", "pointing_tolerance"),
    ],
)
def test_nan_or_inf_for_a_float_option_is_refused_at_construction_naming_it(make, option):
    """NaN and inf passed every ``< 0`` check: an ``lr`` or ``epsilon`` of NaN gave NaN images at the first run,
    ``memory_mb=inf`` an OverflowError there. Now refused when the callback is built (in a CLI run too)."""
    import lightning_viz
    from lightning_viz.tracking import MapTracker

    owner = make.split("(")[0]
    with pytest.raises(ValueError) as info:
        eval(make, {**{c: getattr(lightning_viz, c) for c in lightning_viz.__all__}, "MapTracker": MapTracker})
    message = str(info.value)
    assert message.startswith(f"{owner}: {option} must be a finite number; got "), message


def test_inf_in_a_yaml_config_is_refused_naming_the_callback_and_option():
    """YAML's ``.inf`` / ``.nan`` are floats (jsonargparse refuses ``nan`` on the command line, not in YAML)."""
    from lightning_viz.cli import cli_main

    yaml = "trainer: {callbacks: [{class_path: lightning_viz.ClassModelCallback, init_args: {lr: .inf}}]}"
    with pytest.raises(ValueError, match="^ClassModelCallback: lr must be a finite number; got inf"):
        cli_main(["--trainer.logger=false", "--config", yaml], run=False)


class ThreadsSeen(FailFromEpoch):
    """Records torch's CPU thread count while computing (never fails: ``fail_from`` is out of reach)."""

    method = "threads"

    def compute(self, pl_module, probe):
        self.seen = torch.get_num_threads()
        return super().compute(pl_module, probe)


def test_num_threads_holds_while_computing_and_is_restored(tmp_path):
    before = torch.get_num_threads()
    want = 1 if before > 1 else 2
    cb = ThreadsSeen(fail_from=99, num_probes=2, num_threads=want)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
    trainer.fit(LitTiny(), *tiny_loaders(n=12))
    assert cb.seen == want
    assert torch.get_num_threads() == before
    assert image_steps(read_events(str(tmp_path)), "viz-threads/panel/p000") == [0]


class LogThreadsSeen(ThreadsSeen):
    """Records torch's CPU thread count while logging too."""

    def log_results(self, logger, results, probe, trainer):
        self.seen_logging = torch.get_num_threads()
        return super().log_results(logger, results, probe, trainer)


def test_the_log_stage_runs_on_one_torch_thread_and_the_count_is_restored(tmp_path):
    """Rendering, statistics and t-SNE at log time work on small tensors: on 2 threads of a loaded 2-core machine each
    parallel op waited for the other thread (a torch min over a [3, 14, 64] strip took ~16 ms), so the log stage
    runs on one thread (with OpenMP, torch's CPU backend here) and training gets its count back."""
    from lightning_viz.capture import _openmp_backend

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cb = LogThreadsSeen(fail_from=99, num_probes=2)
        trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
        trainer.fit(LitTiny(), *tiny_loaders(n=12))
        assert cb.seen == 2  # the compute as training (num_threads=None)
        assert cb.seen_logging == (1 if _openmp_backend() else 2)
        assert torch.get_num_threads() == 2
        assert image_steps(read_events(str(tmp_path)), "viz-threads/panel/p000") == [0]
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_num_threads_is_refused(bad):
    with pytest.raises(ValueError, match="GradientCallback: num_threads must be an int >= 1 or None"):
        GradientCallback(num_threads=bad)


def test_an_unknown_option_is_named_with_the_callbacks_options():
    """``GradientCallback(layers=...)`` raised Python's ``VisualizationCallback.__init__() got an unexpected keyword
    argument 'layers'`` (another class than the one written); the error names the user's class, the option, the
    closest names and every option."""
    from lightning_viz.callbacks.cam import CAMCallback
    from lightning_viz.callbacks.gradients import GradientCallback

    with pytest.raises(TypeError) as err:
        GradientCallback(layers=["net.conv1"])
    msg = str(err.value)
    assert msg.startswith("GradientCallback: unknown option 'layers'") and "; its options: " in msg
    assert "smoothgrad_samples" in msg and "num_probes" in msg and "VisualizationCallback" not in msg
    with pytest.raises(TypeError, match=r"CAMCallback: unknown option 'num_probe' \(did you mean 'num_probes'"):
        CAMCallback(num_probe=4)
    with pytest.raises(TypeError, match="CAMCallback 'b': unknown option 'methodz'"):
        CAMCallback(name="b", methodz=["gradcam"])


@pytest.mark.parametrize(
    "make",
    [
        "GradientCallback(chunk_size={v})",
        "CAMCallback(chunk_size={v})",
        "ActivationCallback(chunk_size={v})",
        "EmbeddingCallback(chunk_size={v})",
        "TopPatchesCallback(layers='net.conv2', chunk_size={v})",
        "ClassModelCallback(chunk_size={v})",
        "AdversarialCallback(chunk_size={v})",
        "MapTracker(chunk_size={v})",
    ],
)
@pytest.mark.parametrize("value", ["2.5", "True", "'4'"])
def test_chunk_size_that_is_not_a_whole_number_fails_at_construction(make, value):
    """Was: 2.5 and True passed the ``>= 1`` check and 2.5 failed at the first epoch end (a string: Python's
    "'<' not supported"); now every callback refuses them when built, with the same message."""
    import lightning_viz
    from lightning_viz.tracking import MapTracker

    make = make.format(v=value)
    with pytest.raises(TypeError) as info:
        eval(make, {**{c: getattr(lightning_viz, c) for c in lightning_viz.__all__}, "MapTracker": MapTracker})
    message = str(info.value)
    assert message.startswith(make.split("(")[0] + ": "), message
    assert f"chunk_size must be a whole number of images >= 1, or None; got {value}" in message, message


def test_chunk_size_accepts_numpy_integers():
    import numpy as np

    from lightning_viz import GradientCallback

    assert GradientCallback(chunk_size=np.int64(3)).chunk_size == 3
