"""Real 2-process CPU (gloo) DDP training from a subprocess (tests/ddp_script.py), compared with 1 process.

One subprocess run covers: the 2-rank == 1-rank comparison, rank-0-only writing, 1 probe on 2 ranks
with bf16-mixed, errors on one rank raising on all, and every callback on a SyncBatchNorm model under
``Trainer.validate`` on 2 ranks (== 1 process). SyncBatchNorm cannot be *trained* under DDP on CPU
(torch refuses: "SyncBatchNorm layers only work with GPU modules"; Lightning wraps in DDP only when
fitting), so SyncBatchNorm training, with ``torch.compile``, is tested in-process on 1 device.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import pathlib
import subprocess
import sys

import ddp_script
import numpy as np
import pytest
from helpers import image_steps, read_events

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp_script.py")


def _run_script(*args: str, timeout: int = 240) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "RANK")}
    env["PYTHONWARNINGS"] = "ignore"
    proc = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, f"ddp_script failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.fixture(scope="module")
def ddp_out(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    runs = "equal,one_probe_bf16,errors,syncbn_validate,sharded,lazy,pick_fails"
    _run_script(out, "--runs", runs, "--devices", "2", "--strategy", "ddp")
    return out


@pytest.fixture(scope="module")
def failures_out(tmp_path_factory):
    """Runs where one rank fails: a hang (a rank left waiting in a collective) fails fast."""
    out = str(tmp_path_factory.mktemp("ddp_failures"))
    runs = "check_fails,check_fails_late,lazy_unlabeled_rank1,lazy_unlabeled,full_disk"
    _run_script(out, "--runs", runs, "--devices", "2", "--strategy", "ddp", timeout=90)
    return out


@pytest.fixture(scope="module")
def single_out(tmp_path_factory):
    """The 'equal' run on one process with the union batch (2 x 4 = 8)."""
    out = str(tmp_path_factory.mktemp("single"))
    opts = dict(ddp_script.RUNS["equal"], batch_size=8)
    _, _, module = ddp_script.fit(out, devices=1, **opts)
    return out, ddp_script.checksum(module)


def _decode(event) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(event.encoded_image_string))).astype(np.int16)


def _json(out: str, run: str, rank: int) -> dict:
    with open(os.path.join(out, run, f"rank{rank}.json")) as f:
        return json.load(f)


#: tracker scalar groups of the test InputGradMap (shapes data: masks, so the pointing game runs too)
GROUPS = (
    "drift/rank_corr",
    "faithfulness/deletion_auc",
    "faithfulness/insertion_auc",
    "sanity/rank_corr",
    "localization/pointing_game",
    "localization/energy_in_mask",
)


def _assert_same_events(two_dir: str, one_dir: str, steps: tuple[int, ...] = (0, 1), groups=GROUPS) -> None:
    two, one = read_events(two_dir), read_events(one_dir)
    tags = sorted(t for t in two.Tags()["images"] if t.startswith("viz-"))
    assert tags == sorted(t for t in one.Tags()["images"] if t.startswith("viz-"))
    # probes 0..4 split 3 + 2 over the ranks, all present; filmstrips and activations too
    for pid in ("p000", "p001", "p002", "p003", "p004"):
        assert f"viz-inputgrad/panel/{pid}" in tags and f"viz-inputgrad/filmstrip/{pid}" in tags
        assert f"viz-activations/net.conv2/{pid}" in tags
    for tag in tags:
        e2, e1 = two.Images(tag), one.Images(tag)
        assert [e.step for e in e2] == [e.step for e in e1] == list(steps), tag
        for a, b in zip(e2, e1):
            # float reduction order may move a pixel value by a level or two, or shift a plotted
            # point's anti-aliasing (matplotlib figures): allow that, nothing more
            diff = np.abs(_decode(a) - _decode(b))
            off = float((diff > 2).mean())
            assert off <= 1e-3 and diff.max() <= 32, (
                f"{tag} step {a.step}: {off:.2%} of pixels differ, by up to {diff.max()}"
            )
    scalar_tags = [t for t in two.Tags()["scalars"] if t.startswith("viz-") and not t.endswith("time_s")]
    assert set(scalar_tags) == {t for t in one.Tags()["scalars"] if t.startswith("viz-") and not t.endswith("time_s")}
    for group in groups:
        assert f"viz-inputgrad/inputgrad/input/{group}" in scalar_tags
    for tag in scalar_tags:
        v2, v1 = [e.value for e in two.Scalars(tag)], [e.value for e in one.Scalars(tag)]
        np.testing.assert_allclose(v2, v1, rtol=1e-3, atol=1e-5, err_msg=tag)


def test_two_ranks_log_the_same_maps_and_scalars_as_one(ddp_out, single_out):
    single_dir, single_sum = single_out
    info = _json(ddp_out, "equal", 0)
    assert info["world_size"] == 2
    assert info["checksum"] == pytest.approx(single_sum, rel=1e-5)  # same training, so same maps expected
    _assert_same_events(os.path.join(ddp_out, "equal"), single_dir)


def test_ddp_spawn_logs_the_same_as_one_process(tmp_path, single_out):
    _run_script(str(tmp_path), "--runs", "equal", "--devices", "2", "--strategy", "ddp_spawn")
    files = glob.glob(os.path.join(tmp_path, "equal", "**", "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    _assert_same_events(os.path.join(tmp_path, "equal"), single_out[0])


def _assert_only_rank_zero_wrote(out: str, run: str) -> None:
    files = glob.glob(os.path.join(out, run, "**", "events.out.tfevents.*"), recursive=True)
    assert len(files) == 1, files
    r0, r1 = _json(out, run, 0), _json(out, run, 1)
    assert r1["rank"] == 1 and all(tags == [] for tags in r1["written"].values())
    assert all(tags for tags in r0["written"].values())


def test_only_rank_zero_writes(ddp_out):
    for run in ("equal", "one_probe_bf16"):
        _assert_only_rank_zero_wrote(ddp_out, run)


#: callback class -> tags it must write (images, then scalars) in the ``syncbn_validate`` run
FAMILY_TAGS = {
    "InputGradMap": (
        "viz-inputgrad/panel/p004",
        "viz-inputgrad/filmstrip/p000",
        "viz-inputgrad/inputgrad/input/faithfulness/deletion_auc",
        "viz-inputgrad/inputgrad/input/sanity/rank_corr",
    ),
    "FilterCallback": ("viz-filters/net.conv1/grid", "viz-filters/net.conv1/mean_norm"),
    "ActivationCallback": ("viz-activations/net.conv1/p004", "viz-activations/net.conv2/dead_fraction"),
    "GradientCallback": (
        "viz-gradients/panel/p000",
        "viz-gradients/panel/p004",
        "viz-gradients/smoothgrad_saliency/input/stats/max_abs",
    ),
    "CAMCallback": (
        "viz-cam/panel/p004",
        "viz-cam/filmstrip/p000",
        "viz-cam/gradcam/net.conv2/localization/pointing_game",
    ),
    "OcclusionCallback": ("viz-occlusion/panel/p004", "viz-occlusion/occlusion/prob/stats/max_abs"),
    "TopPatchesCallback": ("viz-top_patches/net.conv2/unit001", "viz-top_patches/net.conv2/unit000/max"),
    "EmbeddingCallback": ("viz-embeddings/penultimate/pca", "viz-embeddings/penultimate/knn_accuracy"),
    "ClassModelCallback": ("viz-class_model/grid", "viz-class_model/class003_cross/score"),
    "UnitCallback": ("viz-units/net.conv2/grid", "viz-units/net.conv2/unit001/activation"),
    "InversionCallback": ("viz-inversion/net.conv1/p004", "viz-inversion/net.conv1/feature_error"),
    "AdversarialCallback": ("viz-adversarial/p004", "viz-adversarial/flip_rate"),
}


@pytest.fixture(scope="module")
def single_validate_out(tmp_path_factory):
    """The 'syncbn_validate' run on one process."""
    out = str(tmp_path_factory.mktemp("single_validate"))
    _, _, module = ddp_script.fit(out, devices=1, **ddp_script.RUNS["syncbn_validate"])
    return out, module


def test_only_rank_zero_receives_the_gathered_results(ddp_out):
    """Rank 0 writes, so it alone gets every rank's results: the other ranks do not hold all probes' maps (with
    NCCL, all of them at once on the GPU) until the run ends."""
    r0, r1 = _json(ddp_out, "equal", 0)["received"], _json(ddp_out, "equal", 1)["received"]
    # 5 probes (rank 0 computes 3, rank 1 computes 2), 12 for the embeddings; at epochs 0 and 1
    for name in ("InputGradMap", "ActivationCallback", "GradientCallback", "CAMCallback", "OcclusionCallback"):
        assert r0[name] == [5, 5] and r1[name] == [0, 0], name
    assert r0["EmbeddingCallback"] == [12, 12] and r1["EmbeddingCallback"] == [0, 0]


def test_syncbatchnorm_validate_on_two_ranks_logs_the_same_as_one(ddp_out, single_validate_out):
    """Lightning wraps the model in DDP only when fitting, and the callbacks run it in eval mode (no
    cross-rank sync), so every callback works on a SyncBatchNorm model under ``Trainer.validate``."""
    import torch

    single_dir, single_module = single_validate_out
    run_dir = os.path.join(ddp_out, "syncbn_validate")
    r0, r1 = _json(ddp_out, "syncbn_validate", 0), _json(ddp_out, "syncbn_validate", 1)
    assert r0["world_size"] == 2
    assert r0["syncbn"] == r1["syncbn"] == 1  # bn1 converted on both ranks
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in single_module.modules()) == 1
    assert r0["checksum"] == r1["checksum"] == pytest.approx(ddp_script.checksum(single_module), rel=1e-6)
    _assert_only_rank_zero_wrote(ddp_out, "syncbn_validate")
    assert set(r0["written"]) == set(FAMILY_TAGS)  # a family added to CALLBACKS needs its tags here
    acc = read_events(run_dir)
    for family, tags in FAMILY_TAGS.items():
        for tag in tags:
            kind = "images" if tag in acc.Tags()["images"] else "scalars"
            assert tag in r0["written"][family] and tag in acc.Tags()[kind], (family, tag)
            assert [e.step for e in getattr(acc, kind.capitalize())(tag)] == [0], (family, tag)
    _assert_same_events(run_dir, single_dir, steps=(0,), groups=[g for g in GROUPS if not g.startswith("drift/")])


def test_one_probe_on_two_ranks_with_bf16_and_a_compiled_model(ddp_out):
    assert _json(ddp_out, "one_probe_bf16", 0)["compiled"] and _json(ddp_out, "one_probe_bf16", 1)["compiled"]
    acc = read_events(os.path.join(ddp_out, "one_probe_bf16"))
    imgs = acc.Tags()["images"]
    assert image_steps(acc, "viz-inputgrad/panel/p000") == [0, 1]
    assert image_steps(acc, "viz-activations/net.conv1/p000") == [0, 1]
    assert not any(t.endswith("p001") for t in imgs)  # rank 1 had no probe and sent nothing
    assert [e.step for e in acc.Scalars("viz-inputgrad/drift/prediction_flips")] == [1]


def test_an_error_on_one_rank_raises_on_every_rank(ddp_out):
    # each FailingCallback has its own name=, which the messages give after the family (failing[<name>])
    err = "VisualizationError: lightning-viz failing"
    r0, r1 = _json(ddp_out, "errors", 0)["errors"], _json(ddp_out, "errors", 1)["errors"]
    # compute failed on rank 1: both ranks raise, naming rank 1
    for errs in (r0["compute@rank1"], r1["compute@rank1"]):
        assert errs == [err + "[compute-rank1-None] failed: rank 1: RuntimeError: boom in compute"]
    # a rank-0-only computation failed: both ranks raise, naming rank 0
    for errs in (r0["compute@rank0"], r1["compute@rank0"]):
        assert errs == [err + "[compute-rank0-only-None] failed on rank 0: RuntimeError: boom in compute"]
    # rank 0's logging failed: rank 0 raises its error, rank 1 the same (instead of hanging later)
    logged = "VisualizationError: lightning-viz FailingCallback (failing[log-rank0-None]) failed while logging at step"
    assert r0["log@rank0"] == r1["log@rank0"] == [logged + " 0: RuntimeError: boom in log"]
    # picking the probes failed on rank 1 at the first epoch end: both ranks raise, naming rank 1
    for errs in (r0["probes@rank1"], r1["probes@rank1"]):
        assert errs == [err + "[probes-rank1-None] failed: rank 1: RuntimeError: boom in probes"]
    # on_error="warn": nothing raised on any rank, rank 0 warns once naming rank 1, both ranks train on
    assert r0["compute@rank1/warn"] == r1["compute@rank1/warn"] == []
    warned = [w for w in _json(ddp_out, "errors", 0)["warnings"] if "training goes on" in w]
    assert warned == [
        "lightning-viz failing[compute-rank1-warn] failed: rank 1: RuntimeError: boom in compute "
        "(on_error='warn': training goes on)"
    ]
    assert _json(ddp_out, "errors", 1)["warnings"] == []
    assert _json(ddp_out, "errors", 0)["global_step"] == _json(ddp_out, "errors", 1)["global_step"] == 6


def test_a_dataset_sharded_per_rank_gives_every_rank_rank_zeros_probes(ddp_out):
    """Each rank picks from its own shard: without a check, rank 1 would draw the maps of its share of the probes on
    other images than rank 0 shows them with (silently). Every rank takes rank 0's probes, and rank 0 says so."""
    r0, r1 = _json(ddp_out, "sharded", 0), _json(ddp_out, "sharded", 1)
    assert r0["probes"]["InputGradMap"] == r1["probes"]["InputGradMap"]
    assert [w for w in r0["warnings"] if "differs across the 2 ranks" in w] and r1["warnings"] == []
    acc = read_events(os.path.join(ddp_out, "sharded"))
    assert image_steps(acc, "viz-inputgrad/panel/p005") == [0]


def test_probes_picked_after_setup_or_given_are_rank_zeros_on_every_rank(ddp_out):
    """Probes picked at the first epoch end (the data exists only from the module's ``on_fit_start``) from each
    rank's shard, and probes given built from each rank's own random numbers: every rank uses rank 0's, once warned."""
    r0, r1 = _json(ddp_out, "lazy", 0), _json(ddp_out, "lazy", 1)
    assert r0["probes"] == r1["probes"] and len(r0["probes"]) == 3
    assert r0["probes"]["InputGradMap"] == r0["probes"]["ActivationCallback"]
    warned = sorted(w for w in r0["warnings"] if "differ" in w)
    assert len(warned) == 2 and r1["warnings"] == []
    assert warned[0].startswith("InputGradMap: the Subset dataset the probes are picked from differs across the 2")
    assert warned[1].startswith("InputGradMap: the probes given (probes=...) differ across the 2 ranks")
    acc = read_events(os.path.join(ddp_out, "lazy"))
    assert image_steps(acc, "viz-inputgrad/panel/p005") == image_steps(acc, "viz-inputgrad/given/panel/p002") == [0]


def test_a_probe_pick_failing_on_one_rank_at_setup_stops_every_rank_clearly(ddp_out):
    r0, r1 = _json(ddp_out, "pick_fails", 0), _json(ddp_out, "pick_fails", 1)
    assert r1["fit_error"].startswith(
        "VisualizationError: InputGradMap: picking 4 probe images (probe_seed=0) from the UnreadableOnRank1 dataset"
    )
    assert r0["fit_error"].startswith(
        "VisualizationError: InputGradMap: picking the probes failed on another rank (rank 1: VisualizationError: "
        "InputGradMap: picking 4 probe images"
    )
    assert r0["global_step"] == r1["global_step"] == 0


@pytest.mark.parametrize("run", ["check_fails", "check_fails_late"])
def test_a_setup_check_failing_on_one_rank_stops_every_rank_clearly(failures_out, run):
    """Rank 1's shard has label 7 at item 0 (the model has 3 classes): the setup forward's label check fails there
    only. Rank 1 raises its error; rank 0 raises one naming it, at setup too (fit), or at on_validation_start
    (trainer.validate of a module with configure_model), instead of gloo's "Connection closed by peer" after
    waiting in Lightning's post-setup barrier (or a hang while rank 1 lives on)."""
    r0, r1 = _json(failures_out, run, 0), _json(failures_out, run, 1)
    own = "ValueError: GradientCallback: target='label' needs class indices 0..2 (the model has 3 classes), but the "
    assert r1["fit_error"].startswith(own + "labels include [7]")
    assert r0["fit_error"].startswith(
        "VisualizationError: lightning-viz GradientCallback (gradients): the setup checks failed on another rank "
        f"(rank 1: {own}labels include [7]"
    )
    assert r0["fit_error"].endswith("); every rank stops.")
    assert r0["global_step"] == r1["global_step"] == 0


def test_probes_picked_at_a_run_are_checked_once_they_are_rank_zeros(failures_out):
    """Probes picked at the first epoch end from each rank's shard: rank 1's pick has no labels (target='label' needs
    them), but every rank uses rank 0's labeled probes, so the run goes on. Was: every rank failed on rank 1's pick
    ("rank 1: ValueError: GradientCallback: target='label' needs a class label per image")."""
    r0, r1 = _json(failures_out, "lazy_unlabeled_rank1", 0), _json(failures_out, "lazy_unlabeled_rank1", 1)
    assert r0["fit_error"] is None and r1["fit_error"] is None
    assert r0["probes"] == r1["probes"]
    assert [w for w in r0["warnings"] if "differs across the 2 ranks" in w] and r1["warnings"] == []
    acc = read_events(os.path.join(failures_out, "lazy_unlabeled_rank1"))
    assert image_steps(acc, "viz-gradients/panel/p003") == [0]


def test_a_check_failing_alike_on_every_rank_names_the_error_once(failures_out):
    """No rank's shard has labels: rank 0's probes, which every rank uses, fail the check on every rank; each rank
    raises one message naming the ranks together (was: the same long error once per rank)."""
    for rank in (0, 1):
        err = _json(failures_out, "lazy_unlabeled", rank)["fit_error"]
        assert err.startswith(
            "VisualizationError: lightning-viz gradients failed: ranks 0, 1: ValueError: GradientCallback: "
            "target='label' needs a class label per image"
        )
        assert err.count("needs a class label") == 1


def test_a_background_write_failing_on_rank_zero_names_its_callback_on_every_rank(failures_out):
    """The disk fills while InputGradMap's image is written in the background; ActivationCallback's run (the next at
    that epoch end) waits for it and raises. Every rank says which callback failed and how, as rank 0 does. Was, on
    rank 1: "lightning-viz activations failed on rank 0: OSError: ..." (another callback, no word of logging)."""
    expected = (
        "VisualizationError: lightning-viz InputGradMap (inputgrad) failed while logging at step 0: OSError: "
        "[Errno 28] No space left on device"
    )
    r0, r1 = _json(failures_out, "full_disk", 0), _json(failures_out, "full_disk", 1)
    assert r0["fit_error"] == r1["fit_error"] == expected


@contextlib.contextmanager
def _rank0_of_two(peer_code: str):
    """This process as rank 0 of a 2-rank gloo group (5 s timeout) whose rank 1 is a subprocess that joins the group
    and then runs ``peer_code`` (``d`` is ``torch.distributed``); the group is destroyed and the peer killed after."""
    from datetime import timedelta

    import torch.distributed as dist
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    assert not dist.is_initialized()
    port = find_free_network_port()
    peer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import os, sys, time, datetime, torch.distributed as d; print('ready', flush=True); "
                f"d.init_process_group('gloo', init_method='tcp://127.0.0.1:{port}', rank=1, world_size=2, "
                f"timeout=datetime.timedelta(seconds=5)); {peer_code}"
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert peer.stdout.readline().strip() == "ready"  # imported: both ranks meet well within the timeout
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2, timeout=timedelta(seconds=5)
        )
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        peer.kill()
        peer.wait()


def test_gather_timeout_is_a_clear_error():
    """This process is rank 0 of a 2-rank gloo group (5 s timeout) whose rank 1 never gathers."""
    from types import SimpleNamespace

    import torch

    from lightning_viz.callbacks.base import VisualizationError, _rank0_probes, gather_results

    with _rank0_of_two("time.sleep(8)"):
        with pytest.raises(VisualizationError) as err:
            gather_results(SimpleNamespace(global_rank=0, world_size=2), {"x": torch.zeros(1)}, None, what="probe")
        with pytest.raises(VisualizationError) as err_probes:  # the probes' check at setup and at each run
            _rank0_probes(SimpleNamespace(global_rank=0, world_size=2), None, None, "InputGradMap", "")
    msg = str(err.value)
    assert "gathering probe outcomes across 2 ranks failed on rank 0" in msg  # the first of its two gathers
    assert "DDPStrategy(timeout=" in msg
    msg = str(err_probes.value)
    assert "gathering InputGradMap's probe fingerprints across 2 ranks failed on rank 0" in msg
    assert "check that no rank skipped the callback or crashed" in msg


def test_a_process_group_breaking_while_probes_are_shared_is_a_clear_error():
    """This process is rank 0 of a 2-rank gloo group whose rank 1 sends other probe fingerprints, then dies before
    rank 0's probes are broadcast. Was: gloo's raw error (``RuntimeError: [../gloo/transport/tcp/pair.cc:...]
    Connection closed by peer``); now a VisualizationError naming the callback and what was being shared."""
    from types import SimpleNamespace

    import torch

    from lightning_viz.callbacks.base import VisualizationError, _rank0_probes
    from lightning_viz.probe import ProbeSet

    probes = ProbeSet(torch.zeros(2, 3, 4, 4), labels=torch.tensor([0, 1]))
    with _rank0_of_two("d.all_gather_object([None, None], (None, 'rank 1 picked other probes')); os._exit(0)"):
        with pytest.raises(VisualizationError) as err:
            _rank0_probes(SimpleNamespace(global_rank=0, world_size=2), probes, None, "InputGradMap", "they differ")
    msg = str(err.value)
    assert msg.startswith("InputGradMap: sharing rank 0's probes across 2 ranks failed on rank 0 ("), msg
    assert "check that no rank skipped the callback or crashed" in msg and "DDPStrategy(timeout=" in msg, msg


def _gloo_threads() -> set[int]:
    """This process's gloo worker threads (``pt_gloo_runloop``; a worker names itself once it runs)."""
    tasks = pathlib.Path("/proc/self/task")
    return {int(t.name) for t in tasks.iterdir() if (t / "comm").read_text().strip() == "pt_gloo_runloop"}


def _gloo_workers_late(earlier: set[int]) -> set[int]:
    """The gloo worker threads of this process's process group (not in ``earlier``: an earlier group's) made to run
    only when nothing else can, on the one CPU this process is then left on: as a worker descheduled on a loaded
    machine, it frees a finished collective's tensors only once the caller waits. Returns the CPUs to restore
    (``os.sched_setaffinity(0, ...)``)."""
    import time

    import torch
    import torch.distributed as dist

    threads = dist.group.WORLD._get_backend(torch.device("cpu")).options._threads

    deadline = time.monotonic() + 30
    while len(tids := _gloo_threads() - earlier) < threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(tids) == threads, f"{len(tids)} of gloo's {threads} worker threads found"
    cpus = os.sched_getaffinity(0)
    cpu = min(cpus)
    os.sched_setaffinity(0, {cpu})  # this (the main) thread
    for tid in tids:
        os.sched_setaffinity(tid, {cpu})
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    return cpus


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="needs Linux thread scheduling")
def test_collectives_return_once_gloo_let_go_of_their_tensors():
    """gloo's worker thread frees a finished collective's tensors after the caller got its result, taking the GIL
    (they were made in Python). A callback's last collective of a fit was followed by the process exit: a late
    worker (a loaded machine) was stopped inside that free by the exiting interpreter, and the rank aborted
    ("terminate called without an active exception"; the ddp_spawn launcher then killed the other rank). Now each
    of our collectives returns once gloo holds none of its tensors. The peer runs torch's object collectives."""
    import gc
    from types import SimpleNamespace

    import torch

    from lightning_viz.callbacks.base import _all_gather, _broadcast_from_rank0, gather_results

    def tensors() -> dict[int, int]:
        return {id(o): o._use_count() for o in gc.get_objects() if type(o) is torch.Tensor}

    peer = (
        "[(d.all_gather_object([None, None], 'peer'), d.all_gather_object([None, None], None), "
        "d.gather_object(torch.ones(1), None, dst=0), d.broadcast_object_list([None])) for _ in range(5)]; "
        "d.barrier()"
    )
    trainer = SimpleNamespace(global_rank=0, world_size=2)
    held = []
    earlier = _gloo_threads()
    with _rank0_of_two("import torch; " + peer):
        cpus = _gloo_workers_late(earlier)
        try:
            for _ in range(5):
                before = tensors()
                assert _all_gather("rank 0", "names", 0, 2) == ["rank 0", "peer"]
                after_gather = tensors()
                assert torch.equal(gather_results(trainer, torch.zeros(1), None), torch.tensor([0.0, 1.0]))
                after_results = tensors()
                box = ["rank 0's"]
                _broadcast_from_rank0(box, "test", "a box")
                assert box == ["rank 0's"]
                after_box = tensors()
                # tensors made by the call still held by another reference than their Python object's: gloo's
                for now in (after_gather, after_results, after_box):
                    held += [n for key, n in now.items() if key not in before and n > 1]
                    before = now
        finally:
            os.sched_setaffinity(0, cpus)
        import torch.distributed as dist

        dist.barrier()
    assert held == []


def test_syncbatchnorm_compiled_bf16_model_in_process(tmp_path):
    import torch

    _trainer, _callbacks, module = ddp_script.fit(
        str(tmp_path), devices=1, sync_batchnorm=True, compile=True, precision="bf16-mixed", max_epochs=2
    )
    assert hasattr(module.net, "_orig_mod")  # really compiled
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())
    acc = read_events(str(tmp_path))
    for tag in (
        "viz-inputgrad/panel/p004",
        "viz-inputgrad/filmstrip/p000",
        "viz-activations/net.conv1/p000",
        "viz-filters/net.conv1/grid",
    ):
        assert image_steps(acc, tag) == [0, 1], tag
    assert [e.step for e in acc.Scalars("viz-inputgrad/inputgrad/input/faithfulness/deletion_auc")] == [0, 1]


def test_shared_contracts_cover_every_exported_callback():
    """``lightning_viz.callbacks.CALLBACKS`` is the one list: the package exports follow it, and each shared test
    contract (bit-identical training, DDP == 1 process, the tags each family writes) must cover all of it."""
    from test_foundation_training import CALLBACK_FACTORIES

    import lightning_viz
    from lightning_viz.callbacks import CALLBACKS

    names = {cls.__name__ for cls in CALLBACKS}
    assert names <= set(lightning_viz.__all__) and all(
        getattr(lightning_viz, n) is c for c in CALLBACKS for n in [c.__name__]
    )
    contracts = {
        "test_foundation_training.CALLBACK_FACTORIES": {type(make()).__name__ for _, make in CALLBACK_FACTORIES},
        "ddp_script.CALLBACKS": {spec["class_path"].rsplit(".", 1)[1] for spec in ddp_script.CALLBACKS},
        "test_ddp.FAMILY_TAGS": set(FAMILY_TAGS),
    }
    for where, covered in contracts.items():
        assert names <= covered, f"{where} misses {sorted(names - covered)}"
