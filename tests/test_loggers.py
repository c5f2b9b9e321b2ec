"""Every Lightning logger gets the visualizations: TensorBoard, CSV, MLflow (sqlite), W&B (offline) and the
plain image folder, each read back with that logger's own tools; nothing is computed when nothing is written."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import shlex
import struct
import warnings

import lightning as L
import numpy as np
import pytest
import torch
from helpers import InputGradMap, LitTiny, image_steps, read_events, tiny_loaders, tiny_trainer
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from PIL import Image

from lightning_viz.logging import (
    TENSORBOARD_SAMPLES_FLAG,
    FolderBackend,
    NothingWrittenWarning,
    VizLogger,
    WandbBackend,
    describe_sinks,
    image_relpath,
    logger_name,
    tensorboard_command,
)

EPOCHS = 2


class Recorder(L.Callback):
    """Records, per epoch, the tags the visualization callback before it wrote (images and scalars)."""

    def __init__(self, viz):
        self.viz, self.tags = viz, {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.tags[trainer.current_epoch] = set(self.viz.last_logged_tags)


class CountingMap(InputGradMap):
    calls = 0

    def compute_maps(self, pl_module, probe):
        type(self).calls += 1
        return super().compute_maps(pl_module, probe)


def fit(logger, root, **cb_kw):
    """A 2-epoch fit of a tiny CNN on 16 px images with one map callback (2 probes); returns the recorder."""
    torch.manual_seed(0)
    viz = InputGradMap(num_probes=2, **cb_kw)
    rec = Recorder(viz)
    trainer = tiny_trainer(
        str(root),
        [viz, rec],
        EPOCHS,
        logger=logger,
        default_root_dir=str(root),
        limit_train_batches=2,
        limit_val_batches=1,
    )
    train, val = tiny_loaders(n=12, batch_size=6, size=16)
    trainer.fit(LitTiny(), train, val)
    assert sorted(rec.tags) == list(range(EPOCHS)) and (cb_kw or all(rec.tags.values()))
    return rec, trainer


def written(rec) -> set:
    return {(e, t) for e, tags in rec.tags.items() for t in tags}


def png_tags(folder: str) -> dict:
    """``{(epoch, tag): HWC uint8}`` for every ``epoch_NNNN/<tag>.png`` under ``folder``."""
    out = {}
    for path in glob.glob(os.path.join(folder, "epoch_*", "**", "*.png"), recursive=True):
        rel = os.path.relpath(path, folder).replace(os.sep, "/")
        epoch, tag = rel.split("/", 1)
        out[(int(epoch[len("epoch_") :]), tag[: -len(".png")])] = np.asarray(Image.open(path))
    return out


def folder_scalars(folder: str) -> dict:
    with open(os.path.join(folder, "scalars.csv")) as f:
        return {(int(r["epoch"]), r["tag"]): float(r["value"]) for r in csv.DictReader(f)}


def csv_scalars(log_dir: str, tags: set) -> dict:
    """``{(step, column): value}`` for the given columns of a CSVLogger's ``metrics.csv``."""
    with open(os.path.join(log_dir, "metrics.csv")) as f:
        return {(int(r["step"]), k): float(v) for r in csv.DictReader(f) for k, v in r.items() if k in tags and v}


def check_split(rec, images: dict, scalars: dict) -> None:
    """Every written (epoch, tag) came back exactly once, as an image or a scalar; both kinds, every epoch."""
    assert not set(images) & set(scalars)
    assert set(images) | set(scalars) == written(rec)
    for e in range(EPOCHS):
        assert any(k[0] == e for k in images) and any(k[0] == e for k in scalars), e
    for img in images.values():
        # the default panel: caption (16) + method names (14) + padding over one row of image | map, 16 px shown at 128,
        # and the map's colorbar (24) under it
        assert img.dtype == np.uint8 and img.shape == (16 + 14 + 2 + 128 + 1 + 24 + 2, 2 * 128 + 3 * 2, 3)
    assert all(np.isfinite(v) for v in scalars.values())


# ---------------------------------------------------------------------------------------------- readers
def mlflow_artifacts(client, run_id: str, path: str = "") -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path or None):
        out += mlflow_artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def wandb_history(run_dir: str) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``.wandb`` transaction log (a LevelDB-style log
    of 32 KiB blocks of ``Record`` protobufs after a 7-byte ``:W&B`` header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "*.wandb"))
    with open(path, "rb") as fh:
        data = fh.read()
    assert data[:4] == b":W&B"
    pos, buf, rows = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # block padding
            pos += left
            continue
        buf, pos = buf + data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):  # a full record, or the last piece of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
    return rows


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline and MLflow local: no network, every file under tmp_path, no background process left."""
    for k, v in dict(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(tmp_path),
        WANDB_CONFIG_DIR=str(tmp_path),
        WANDB_CACHE_DIR=str(tmp_path),
        WANDB_DATA_DIR=str(tmp_path),
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
        MLFLOW_DISABLE_TELEMETRY="true",
        DO_NOT_TRACK="true",
    ).items():
        monkeypatch.setenv(k, v)
    yield tmp_path
    if "wandb" in __import__("sys").modules:
        import wandb

        wandb.finish()
        wandb.teardown()  # stops the wandb-core service process


def wandb_logger(root, prefix=""):
    import wandb

    return WandbLogger(
        save_dir=str(root),
        offline=True,
        project="viz",
        prefix=prefix,
        settings=wandb.Settings(
            console="off", x_disable_stats=True, x_disable_meta=True, x_save_requirements=False, disable_git=True
        ),
    )


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One sqlite database for the module's tests (creating one runs MLflow's migrations: seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def mlflow_logger(uri, root, prefix=""):
    return MLFlowLogger(
        experiment_name=f"viz-{root.name}", tracking_uri=uri, artifact_location=str(root / "artifacts"), prefix=prefix
    )


# ---------------------------------------------------------------------------------------------- tests
def test_csv_logger_alone_gets_scalars_in_metrics_csv_and_images_in_the_folder(tmp_path):
    logger = CSVLogger(str(tmp_path), name="", version=0)
    rec, _ = fit(logger, tmp_path)
    folder = os.path.join(logger.log_dir, "lightning_viz")
    tags = {t for _, t in written(rec)}
    scalars = csv_scalars(logger.log_dir, tags)
    check_split(rec, png_tags(folder), scalars)
    assert folder_scalars(folder) == pytest.approx(scalars)  # the folder's own scalars.csv agrees
    assert image_relpath("viz/a b/p0", 3) == "epoch_0003/viz/a_b/p0.png"


@pytest.mark.parametrize("prefix", ["", "run1"])
def test_csv_rows_of_the_visualizations_have_their_epoch_column(tmp_path, prefix):
    """A ``metrics.csv`` read by its ``epoch`` column (``df.groupby("epoch")``, the usual way) puts each epoch's
    visualization scalars with that epoch's ``val_loss``. Was: their rows had ``step`` = epoch and an empty ``epoch``,
    so a read by epoch dropped every one of them (and ``step`` means the global step in Lightning's rows)."""
    logger = CSVLogger(str(tmp_path), name="", version=0, prefix=prefix)
    fit(logger, tmp_path, run_at_start=True)
    pre = f"{prefix}-" if prefix else ""
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    viz = [r for r in rows if any(v and k.startswith(pre + "viz-") for k, v in r.items())]
    assert len(viz) == EPOCHS + 1  # one row per callback run: before training, then every epoch
    assert [(int(r[pre + "epoch"]), int(r["step"])) for r in viz] == [(e, e) for e in range(-1, EPOCHS)]
    by_epoch: dict = {}
    for r in rows:
        if r[pre + "epoch"]:
            by_epoch.setdefault(int(r[pre + "epoch"]), {}).update({k: v for k, v in r.items() if v})
    tag = pre + "viz-inputgrad/time_s"
    assert all(pre + "val_loss" in by_epoch[e] and tag in by_epoch[e] for e in range(EPOCHS))


def test_a_fresh_fit_into_an_earlier_runs_image_folder_warns_and_a_resumed_one_does_not(tmp_path):
    """``CSVLogger(version=0)`` given again: Lightning starts ``metrics.csv`` afresh, and the image folder beside it
    would mix the new run's epochs with the earlier run's images and scalars.csv rows. Was: silently; now one warning
    naming the folder. A fit resumed from a checkpoint continues the folder, as it should, without a word."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(epochs, ckpt_path=None):
        torch.manual_seed(0)
        trainer = tiny_trainer(
            str(tmp_path),
            [InputGradMap(num_probes=1), ModelCheckpoint(dirpath=str(tmp_path / "ck"), save_last=True)],
            max_epochs=epochs,
            logger=CSVLogger(str(tmp_path), name="", version=0),
            enable_checkpointing=True,
            limit_train_batches=1,
            limit_val_batches=1,
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(LitTiny(), *tiny_loaders(n=12, batch_size=6), ckpt_path=ckpt_path)
        return [str(w.message) for w in caught if "earlier run" in str(w.message)]

    folder = os.path.join(str(tmp_path), "version_0", "lightning_viz")
    assert run(2) == []
    assert run(3, ckpt_path=str(tmp_path / "ck" / "last.ckpt")) == []  # resumed: epoch 2 goes on after 0 and 1
    assert sorted(os.listdir(folder)) == ["epoch_0000", "epoch_0001", "epoch_0002", "scalars.csv"]
    (message,) = run(1)  # from scratch into the same version
    assert message.startswith(f"lightning-viz: the image folder {folder} already holds an earlier run's files (")
    assert "Give the logger a new version" in message


def test_logger_false_writes_a_new_image_folder_version_per_trainer(tmp_path):
    rec, _ = fit(False, tmp_path)
    folder = tmp_path / "lightning_logs" / "version_0" / "lightning_viz"
    scalars = folder_scalars(str(folder))
    check_split(rec, png_tags(str(folder)), scalars)
    _rec2, _ = fit(False, tmp_path, every_n_epochs=2, run_at_start=True)
    second = tmp_path / "lightning_logs" / "version_1" / "lightning_viz"
    assert {e for e, _ in png_tags(str(second))} == {1}  # (1 + 1) % 2 == 0
    # the run_at_start baseline (step -1) in before_training/ (was: epoch_-001/), its scalars at epoch -1
    assert sorted(os.listdir(second)) == ["before_training", "epoch_0001", "scalars.csv"]
    assert {e for e, _ in folder_scalars(str(second))} == {-1, 1}
    assert os.path.isfile(second / "before_training" / "viz-inputgrad" / "panel" / "p000.png")
    assert image_relpath("viz-cam/panel/p000", -1) == "before_training/viz-cam/panel/p000.png"


def test_logger_false_at_a_checkout_root_leaves_the_package_folder_alone(tmp_path):
    """``logger=False`` run from a directory holding a ``lightning_viz`` package (a checkout's root, the default
    ``default_root_dir``): the images go under ``lightning_logs/version_<n>/lightning_viz``, where Lightning's default
    logger writes, and a later run with that logger takes the next version. Was: ``./lightning_viz/version_0``,
    inside the package."""
    package = tmp_path / "lightning_viz"
    package.mkdir()
    (package / "__init__.py").write_text("")
    rec, trainer = fit(False, tmp_path)
    assert sorted(os.listdir(package)) == ["__init__.py"]
    folder = tmp_path / "lightning_logs" / "version_0" / "lightning_viz"
    check_split(rec, png_tags(str(folder)), folder_scalars(str(folder)))
    assert describe_sinks(trainer) == f"writing to an image folder at {folder}"
    _rec, later = fit(None, tmp_path)  # Lightning's default TensorBoardLogger under the same default_root_dir
    assert later.logger.log_dir == str(tmp_path / "lightning_logs" / "version_1")


def test_mlflow_logger_alone_gets_metrics_and_artifacts(offline, mlflow_uri):
    from mlflow.tracking import MlflowClient

    logger = mlflow_logger(mlflow_uri, offline)
    rec, trainer = fit(logger, offline)
    client = MlflowClient(mlflow_uri)
    paths = mlflow_artifacts(client, logger.run_id)
    assert paths and all(p.startswith("lightning_viz/epoch_") for p in paths)
    images = {}
    for p in paths:
        epoch, tag = p[len("lightning_viz/") :].split("/", 1)
        local = client.download_artifacts(logger.run_id, p, str(offline / "dl"))
        images[(int(epoch[len("epoch_") :]), tag[: -len(".png")])] = np.asarray(Image.open(local))
    scalars = {}
    for tag in {t for _, t in written(rec)} - {t for _, t in images}:
        for m in client.get_metric_history(logger.run_id, tag):
            scalars[(m.step, tag)] = m.value
    check_split(rec, images, scalars)
    assert not glob.glob(str(offline / "dl" / "*mlflow*"))
    # the start-up line names the run whose artifacts hold the images (was: "MLflow (images as artifacts ...)")
    assert describe_sinks(trainer) == (
        f"writing to MLflow run {logger.run_id} at {mlflow_uri} (images as artifacts under lightning_viz/epoch_NNNN/)"
    )


def test_wandb_logger_alone_offline_keeps_every_point_with_epoch_as_x_axis(offline):
    logger = wandb_logger(offline)
    rec, trainer = fit(logger, offline)
    run_dir = os.path.dirname(logger.experiment.dir)
    # After training, W&B's own step is far past epoch 0: a write at epoch 0 must still be kept, with its
    # caption, an embedding table and a plain-folder twin of the same write.
    vl = VizLogger([WandbBackend(logger), FolderBackend(str(offline / "twin"))], step=0)
    vl.image("viz/extra/p0", torch.full((3, 16, 16), 0.5), caption="cat (p=0.9)")
    vl.embedding(
        torch.arange(6.0).view(3, 2),
        metadata=[["a", 1], ["b", 2], ["c", 0]],
        label_img=torch.zeros(3, 3, 4, 4),
        tag="viz/extra/emb",
        metadata_header=["label", "pred"],
    )
    vl.scalar("viz/extra/late", 7.0)
    vl.flush()
    import wandb

    wandb.finish()
    wandb.teardown()  # waits until wandb-core has written the last records, and stops it
    rows = wandb_history(run_dir)
    images, scalars = {}, {}
    for row in rows:
        for k, v in row.items():
            if k.endswith("/_type") and v == "image-file":
                tag = k[: -len("/_type")]
                path = os.path.join(run_dir, "files", row[tag + "/path"])
                images[(row["epoch"], tag)] = np.asarray(Image.open(path).convert("RGB"))
            elif (row.get("epoch"), k) in written(rec) and isinstance(v, (int, float)):
                scalars[(row["epoch"], k)] = v
    extra = {k for k in images if k[1].startswith("viz/extra")}
    assert extra == {(0, "viz/extra/p0")}
    images = {k: v for k, v in images.items() if k not in extra}
    check_split(rec, images, scalars)
    last = rows[-1]
    assert last["epoch"] == 0 and last["viz/extra/late"] == 7.0 and last["viz/extra/p0/caption"] == "cat (p=0.9)"
    assert last["viz/extra/emb/_type"] == "table-file" and last["viz/extra/emb/nrows"] == 3
    assert last["_step"] > trainer.global_step  # W&B's step went on; the epoch-0 point is there all the same
    assert os.path.exists(offline / "twin" / "epoch_0000" / "viz" / "extra" / "emb" / "tensors.tsv")


def test_wandb_captions_name_the_probe_and_map_of_per_probe_images(offline):
    """``layout="per_probe"`` overlays carry no text; W&B shows their caption: the probe id, its true class and the
    map key (and the scale when both are logged). Was: no caption, so a W&B image card did not say whose map it was."""
    logger = wandb_logger(offline)
    _, trainer = fit(logger, offline, layout="per_probe", normalize="both")
    probe = trainer.callbacks[0].probes
    run_dir = os.path.dirname(logger.experiment.dir)
    import wandb

    wandb.finish()
    wandb.teardown()
    captions = {
        (row["epoch"], k[: -len("/caption")]): v
        for row in wandb_history(run_dir)
        for k, v in row.items()
        if "/caption" in k
    }
    assert set(captions) == {
        (e, f"viz-inputgrad/inputgrad/input/{pid}{s}")
        for e in range(EPOCHS)
        for pid in probe.ids
        for s in ("", "/fixed")
    }
    for i, pid in enumerate(probe.ids):
        true = int(probe.labels[i])
        assert captions[(0, f"viz-inputgrad/inputgrad/input/{pid}")] == f"{pid}  true: {true}  inputgrad/input"
        assert captions[(1, f"viz-inputgrad/inputgrad/input/{pid}/fixed")] == (
            f"{pid}  true: {true}  inputgrad/input (fixed scale)"
        )


@pytest.mark.parametrize("prefix", ["", "run1"])
def test_all_loggers_write_the_same_values_and_pixels_as_tensorboard(offline, mlflow_uri, prefix):
    """Every logger gets the same keys, values and pixels. A logger's ``prefix`` (Lightning: "put at the beginning of
    metric keys", joined with ``-``) starts every key that logger gets, as it does the user's own metrics: was only
    in CSV and MLflow (through their ``log_metrics``), while TensorBoard and W&B had the bare keys."""
    from mlflow.tracking import MlflowClient

    tb, csvl, ml, wb = (
        TensorBoardLogger(str(offline), name="tb", version=0, prefix=prefix),
        CSVLogger(str(offline), name="csv", prefix=prefix),
        mlflow_logger(mlflow_uri, offline, prefix=prefix),
        wandb_logger(offline, prefix=prefix),
    )
    rec, _ = fit([tb, csvl, ml, wb], offline)
    import wandb

    wandb.finish()
    wandb.teardown()  # waits until wandb-core has written the last records, and stops it
    pre = f"{prefix}-" if prefix else ""
    acc = read_events(tb.log_dir)
    img_tags = [t for t in acc.Tags()["images"] if t.startswith(pre + "viz")]
    sc_tags = [t for t in acc.Tags()["scalars"] if t.startswith(pre + "viz")]
    ref_sc = {(e.step, t): e.value for t in sc_tags for e in acc.Scalars(t)}
    ref_img = {
        (e.step, t): np.asarray(Image.open(io.BytesIO(e.encoded_image_string))) for t in img_tags for e in acc.Images(t)
    }
    assert {(e, pre + t) for e, t in written(rec)} == set(ref_sc) | set(ref_img)
    assert all(image_steps(acc, t) == [0, 1] for t in img_tags)
    assert {t for t in acc.Tags()["scalars"] if "viz" not in t} == {pre + "train_loss", pre + "val_loss", pre + "epoch"}
    # CSV: metrics.csv, no image folder (TensorBoard keeps the images)
    assert csv_scalars(csvl.log_dir, set(sc_tags)) == pytest.approx(ref_sc, rel=1e-6)
    assert not os.path.exists(os.path.join(csvl.log_dir, "lightning_viz"))
    # MLflow
    client = MlflowClient(mlflow_uri)
    ml_sc = {(m.step, t): m.value for t in sc_tags for m in client.get_metric_history(ml.run_id, t)}
    assert ml_sc == pytest.approx(ref_sc, rel=1e-6)
    for (e, t), img in ref_img.items():
        local = client.download_artifacts(ml.run_id, f"lightning_viz/{image_relpath(t, e)}", str(offline / "dl"))
        np.testing.assert_array_equal(np.asarray(Image.open(local)), img)
    # W&B
    run_dir = os.path.dirname(wb.experiment.dir)
    wb_sc, wb_img = {}, {}
    for row in wandb_history(run_dir):
        for t in sc_tags:
            if t in row:
                wb_sc[(row[pre + "epoch"], t)] = row[t]
        for t in img_tags:
            if t + "/path" in row:
                wb_img[(row[pre + "epoch"], t)] = np.asarray(
                    Image.open(os.path.join(run_dir, "files", row[t + "/path"]))
                )
    assert wb_sc == pytest.approx(ref_sc, rel=1e-6)
    assert set(wb_img) == set(ref_img)
    for k, img in ref_img.items():
        np.testing.assert_array_equal(wb_img[k][..., :3], img)


def test_restricting_loggers_writes_only_there_and_an_empty_list_computes_nothing(tmp_path):
    tb, csvl = TensorBoardLogger(str(tmp_path), name="tb", version=0), CSVLogger(str(tmp_path), name="csv")
    rec, _ = fit([tb, csvl], tmp_path, loggers=["csv"])
    assert not [t for t in read_events(tb.log_dir).Tags()["images"] if t.startswith("viz")]
    tags = {t for _, t in written(rec)}
    assert {t for _, t in csv_scalars(csvl.log_dir, tags)} and not os.path.exists(
        os.path.join(csvl.log_dir, "lightning_viz")
    )

    CountingMap.calls = 0
    cb = CountingMap(num_probes=2, loggers=[])
    trainer = tiny_trainer(
        str(tmp_path),
        [cb],
        EPOCHS,
        logger=TensorBoardLogger(str(tmp_path), name="none", version=0),
        limit_train_batches=1,
        limit_val_batches=1,
    )
    with pytest.warns(NothingWrittenWarning, match="writes nowhere") as record:
        trainer.fit(LitTiny(), *tiny_loaders(n=12, batch_size=6))
    assert len([w for w in record if w.category is NothingWrittenWarning]) == 1
    assert CountingMap.calls == 0 and cb.last_logged_tags == [] and cb.probes is None


def test_the_start_up_line_says_where_each_callback_writes(tmp_path, caplog):
    """The start-up line names every TensorBoard run and CSV file written to, and, when callbacks write to different
    loggers (``loggers=[...]``), where each one writes. Was: one line for all, from the Trainer's loggers: a callback
    with ``loggers=["csv"]`` was said to write to TensorBoard, and only the first TensorBoardLogger was named."""
    tb1, tb2 = (TensorBoardLogger(str(tmp_path), name=n, version=0) for n in ("tb1", "tb2"))
    csvl = CSVLogger(str(tmp_path), name="csv", version=0)
    only_csv = InputGradMap(num_probes=2, loggers=["csv"], name="c")
    every = InputGradMap(num_probes=2, name="e")
    trainer = tiny_trainer(
        str(tmp_path),
        [only_csv, every],
        max_epochs=1,
        logger=[tb1, csvl, tb2],
        limit_train_batches=1,
        limit_val_batches=1,
    )
    with caplog.at_level("INFO"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12, batch_size=6))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-viz:")]
    csv_at = f"CSV at {os.path.join(csvl.log_dir, 'metrics.csv')} (scalars only)"
    tb_at = [f"TensorBoard at {tb.log_dir} (view with: tensorboard --logdir {tmp_path} " for tb in (tb1, tb2)]
    head, per_callback = line.split("; ", 1)
    assert head == "lightning-viz: 2 visualization callback(s) (every epoch): inputgrad[c], inputgrad[e]"
    only, rest = per_callback.split("; ")
    assert only == f"inputgrad[c]: writing to {csv_at}"
    assert rest.startswith(f"inputgrad[e]: writing to {tb_at[0]}") and tb_at[1] in rest and rest.endswith(csv_at)
    # as said: the restricted callback wrote no image to either TensorBoard run, the other one to both
    for tb in (tb1, tb2):
        images = read_events(tb.log_dir).Tags()["images"]
        assert any(t.startswith("viz-inputgrad/e/") for t in images)
        assert not any(t.startswith("viz-inputgrad/c/") for t in images)


def test_the_start_up_line_names_the_wandb_run_and_where_its_files_are(offline, caplog):
    """As it does for TensorBoard, CSV and MLflow, the start-up line says which W&B run gets the visualizations and
    where: an offline run's folder (where its images are, and what ``wandb sync`` uploads), an online run's page.
    Was: "W&B (x-axis: epoch)", no run named."""
    logger = wandb_logger(offline)
    with caplog.at_level("INFO"):
        fit(logger, offline)
    run = logger.experiment
    run_dir = os.path.dirname(run.dir)
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-viz:")]
    assert line.endswith(
        f"writing to W&B run {run.id} at {run_dir} (offline: wandb sync {shlex.quote(run_dir)} uploads it; "
        "x-axis: epoch)"
    )
    import wandb

    wandb.finish()
    wandb.teardown()
    images = [row[k] for row in wandb_history(run_dir) for k in row if k.endswith("/path")]
    assert images and all(os.path.isfile(os.path.join(run_dir, "files", p)) for p in images)


@pytest.mark.parametrize("logdir", ["lightning_logs", "/data/my runs", "runs/it's $HOME"])
def test_the_tensorboard_command_pastes_into_a_shell_as_is(logdir):
    """The start-up line's TensorBoard command, pasted into a shell, opens that folder. Was: the folder unquoted, so
    ``/data/my runs`` became ``--logdir /data/my`` and a stray ``runs`` argument."""
    args = shlex.split(tensorboard_command(logdir))
    assert args == ["tensorboard", "--logdir", logdir, *shlex.split(TENSORBOARD_SAMPLES_FLAG)]


def test_a_name_mlflow_would_mangle_fails_at_setup_when_mlflow_is_written_to(offline, mlflow_uri):
    """``name="lr=0.1"``: MLflow drops ``=`` from metric names (Lightning warns at every write), so the metrics read
    ``viz-inputgrad/lr0.1/...`` and the artifacts ``viz-inputgrad/lr=0.1/...``. Was: so, with a warning per key and
    epoch; now a setup error naming the callback, the option and a name that works. Without MLflow the name is fine."""
    logger = mlflow_logger(mlflow_uri, offline)
    with pytest.raises(ValueError) as err:
        fit(logger, offline, name="lr=0.1")
    assert str(err.value) == (
        "InputGradMap: name='lr=0.1' has '=', which MLflow drops from metric names (its metrics would read 'lr0.1', "
        "its artifacts 'lr=0.1'). Allowed: letters, digits, '_', '-', '.' and ' ', e.g. name='lr_0.1'."
    )
    from mlflow.tracking import MlflowClient

    assert not MlflowClient(mlflow_uri).get_run(logger.run_id).data.metrics  # not one step trained
    tb = TensorBoardLogger(str(offline), name="tb", version=0)
    rec, _ = fit([tb, logger], offline, name="lr 0.1", loggers=["tensorboard"])  # no MLflow written to: fine
    assert any(t.startswith("viz-inputgrad/lr_0.1/") for _, t in written(rec))


def test_loggers_option_fails_early_naming_what_the_trainer_has(tmp_path):
    with pytest.raises(ValueError, match=r"list of logger names"):
        InputGradMap(loggers="csv")
    cb = InputGradMap(num_probes=2, loggers=["wandb", "folder"])
    trainer = tiny_trainer(str(tmp_path), [cb], 1, logger=CSVLogger(str(tmp_path)))
    with pytest.raises(
        ValueError,
        match=r"InputGradMap: loggers=\['wandb', 'folder'\] names \['wandb'\].*"
        r"\['csv', 'folder'\]",
    ):
        trainer.fit(LitTiny(), *tiny_loaders(n=12, batch_size=6))


class _ScalarsOnly(Logger):
    """A project's own logger (scalars in a list), not one of Lightning's."""

    def __init__(self):
        super().__init__()
        self.rows = []

    name = property(lambda self: "mine")
    version = property(lambda self: 0)

    def log_hyperparams(self, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


@pytest.mark.parametrize("cls_name", ["TensorBoardLogger", "WandbLogger", "MLFlowLogger"])
def test_an_own_logger_named_like_lightnings_is_not_taken_for_it(tmp_path, cls_name):
    """A project's own ``Logger`` subclass whose class is named like one of Lightning's (``TensorBoardLogger``, a
    wrapper) is another logger: its name is its class name (``tensorboardlogger``), it gets the scalars through
    ``log_metrics`` and the images go to the image folder. Was: taken for Lightning's by its name, the fit stopped
    at setup (AttributeError: 'NoneType' object has no attribute 'log_dir') or its images were dropped."""
    own = type(cls_name, (_ScalarsOnly,), {})()
    assert logger_name(own) == cls_name.lower()
    rec, trainer = fit(own, tmp_path)
    folder = os.path.join(str(tmp_path), "lightning_logs", "version_0", "lightning_viz")
    check_split(rec, png_tags(folder), folder_scalars(folder))
    assert {(step, tag) for step, row in own.rows for tag in row if tag.startswith("viz-")} == set(
        folder_scalars(folder)
    )
    # the start-up line names it by its class (was: "the tensorboardlogger logger")
    assert describe_sinks(trainer) == (
        f"writing to {cls_name} (scalars only, through its log_metrics), an image folder at {folder}"
    )


def test_png_writer_round_trips_exact_pixels_through_pil_and_the_event_file(tmp_path):
    """lightning-viz's own PNG writer: RGB and gray images of odd sizes (one pixel, one row, one column), all zero,
    all 255 and random, decode with PIL to exactly the written pixels, and so do TensorBoard summaries read back
    from the event file (at the step, with the height and width, gray as gray)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from lightning_viz.logging import _encode_png, _png_summary

    rng = np.random.default_rng(0)
    images = {}
    for h, w in [(1, 1), (1, 9), (13, 1), (7, 5), (33, 65)]:
        for c in (3, 1):
            images[f"zero/{h}x{w}x{c}"] = np.zeros((h, w, c), np.uint8)
            images[f"full/{h}x{w}x{c}"] = np.full((h, w, c), 255, np.uint8)
            images[f"rand/{h}x{w}x{c}"] = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    stripes = np.repeat(np.repeat(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8), 4, axis=0), 4, axis=1)
    images["nearest_upscaled"] = stripes  # repeated rows: the Up filter's zero rows
    images["non_contiguous"] = stripes[::2, 1::3]

    def decode(png: bytes) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(png)))

    writer = SummaryWriter(str(tmp_path))
    for tag, img in images.items():
        assert np.array_equal(decode(_encode_png(img)).reshape(img.shape), img), tag
        writer._get_file_writer().add_summary(_png_summary(tag, img), 5)
    gray = rng.integers(0, 256, (6, 11), dtype=np.uint8)
    assert np.array_equal(decode(_encode_png(gray)), gray)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == sorted(images)
    for tag, img in images.items():
        (ev,) = acc.Images(tag)
        assert (ev.step, ev.height, ev.width) == (5, *img.shape[:2])
        got = decode(ev.encoded_image_string)
        assert got.ndim == (3 if img.shape[2] == 3 else 2), tag
        assert np.array_equal(got.reshape(img.shape), img), tag


def test_event_record_checksums_match_tensorboards_own(tmp_path):
    """The numpy CRC-32C that image records are checksummed with gives TensorBoard's own (pure-Python) checksums, at
    and around the lane and merge boundaries; once an image is logged, TensorBoard's record writer uses it."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import crc32c as slow_crc32c
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as slow_masked
    from tensorboard.summary.writer import record_writer
    from torch.utils.tensorboard import SummaryWriter

    from lightning_viz._crc32c import LANE, crc32c, masked

    rng = np.random.default_rng(0)
    fast = masked(slow_masked)
    for n in [4, 5, LANE - 1, LANE, LANE + 1, 3 * LANE, 64 * LANE, 64 * LANE + 1, 128 * LANE - 3, 100_003]:
        for data in (rng.integers(0, 256, n, dtype=np.uint8).tobytes(), bytes(n), b"\xff" * n):
            assert crc32c(data) == slow_crc32c(data), n
            assert fast(data) == slow_masked(data), n
    writer = SummaryWriter(str(tmp_path))
    VizLogger(writer, step=0).image("viz-test/noise", torch.rand(3, 40, 50))
    writer.close()
    assert read_events(str(tmp_path)).Tags()["images"] == ["viz-test/noise"]  # the reader checks every checksum
    assert record_writer.masked_crc32c.__module__ == "lightning_viz._crc32c"


def test_tensorboard_images_read_back_with_the_exact_pixels_and_size(tmp_path):
    """TensorBoard images are encoded by lightning-viz (a faster PNG setting than add_image's): the event file must
    still hold exactly the logged uint8 pixels, with add_image's height/width/colorspace, at the logged step; a
    compose'd panel (uint8) is pasted pixel for pixel (values outside [0, 1] clamped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from lightning_viz.render import compose, to_uint8_hwc

    g = torch.Generator().manual_seed(0)
    tiles = [torch.rand(3, 9, 7, generator=g) * 1.4 - 0.2, torch.rand(1, 5, 4, generator=g)]
    panel = compose([tiles], ["a", "b"], "cap")
    assert panel.dtype == torch.uint8
    x0 = 2  # pad; the first tile sits under the caption strip and the column labels
    y0 = panel.shape[1] - 2 - 9
    u8 = [(t.clamp(0, 1) * 255).round().to(torch.uint8) for t in tiles]
    assert torch.equal(panel[:, y0 : y0 + 9, x0 : x0 + 7], u8[0])
    assert torch.equal(panel[:, y0 : y0 + 5, x0 + 7 + 2 : x0 + 7 + 2 + 4], u8[1].expand(3, -1, -1))
    assert (panel[:, y0 + 5 :, x0 + 7 + 2 :] == 255).all()  # white under the shorter tile
    writer = SummaryWriter(str(tmp_path))
    VizLogger(writer, step=3).image("viz-test/panel", panel)
    noise = torch.rand(3, 33, 65, generator=g)
    VizLogger(writer, step=3).image("viz-test/noise", noise)
    writer.close()
    ea = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    ea.Reload()
    assert sorted(ea.Tags()["images"]) == ["viz-test/noise", "viz-test/panel"]
    for tag, img in [("viz-test/panel", panel), ("viz-test/noise", noise)]:
        (ev,) = ea.Images(tag)
        expected = to_uint8_hwc(img)
        assert ev.step == 3 and (ev.height, ev.width) == expected.shape[:2]
        got = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)).convert("RGB"))
        assert np.array_equal(got, expected)


@pytest.mark.parametrize("loggers", [None, ["tensorboard"], ["folder"], ["wandb", "folder"]])
def test_fast_dev_run_computes_every_callback_and_writes_nothing(tmp_path, monkeypatch, caplog, loggers):
    """fast_dev_run swaps the loggers for Lightning's DummyLogger: the callbacks still compute (that is what the
    run is for), write no file anywhere (no image folder in the working directory either), and a ``loggers``
    list naming the replaced loggers is no setup error."""
    monkeypatch.chdir(tmp_path)
    CountingMap.calls = 0
    cb = CountingMap(num_probes=2, loggers=loggers)
    trainer = tiny_trainer(
        str(tmp_path),
        [cb],
        logger=TensorBoardLogger(str(tmp_path / "logs")),
        fast_dev_run=True,
        default_root_dir=str(tmp_path),
    )
    with caplog.at_level("INFO"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12, batch_size=6))
    assert CountingMap.calls == 1 and any(t.startswith("viz-inputgrad/") for t in cb.last_logged_tags)
    assert [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs] == []
    assert "Lightning switched logging off (fast_dev_run)" in caplog.text


def test_a_fast_dev_run_validate_then_fit_says_nothing_of_steps_written_before(tmp_path, caplog, monkeypatch):
    """``trainer.validate`` then ``trainer.fit`` under fast_dev_run: neither writes anything, so the fit has no earlier
    step to warn of. Was: "writes step 0, which a trainer.validate before this fit already wrote to this log
    directory" (the dry run's steps counted as written)."""
    monkeypatch.chdir(tmp_path)
    cb = InputGradMap(num_probes=2, run_on="validation_epoch_end")
    train, val = tiny_loaders(n=12, batch_size=6)
    with caplog.at_level("INFO", logger="lightning_viz"):
        tiny_trainer(str(tmp_path), [cb], fast_dev_run=True).validate(LitTiny(), val)
        tiny_trainer(str(tmp_path), [cb], fast_dev_run=True).fit(LitTiny(), train, val)
    assert "ran once at a reduced size" in caplog.text and "already wrote" not in caplog.text
    assert [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs] == []


def test_only_dummy_loggers_compute_at_full_size_and_say_so_without_naming_fast_dev_run(tmp_path, caplog):
    """``logger=DummyLogger()`` (not a fast dev run): the callbacks compute and write nothing, at their full size
    (every probe), and the start-up line names the DummyLogger. Was: it said "Lightning switched logging off
    (fast_dev_run)", which the user had not asked for."""
    from lightning.pytorch.loggers.logger import DummyLogger

    sizes = []

    class Sized(InputGradMap):
        def compute_maps(self, pl_module, probe):
            sizes.append(len(probe))
            return super().compute_maps(pl_module, probe)

    trainer = tiny_trainer(str(tmp_path), [Sized(num_probes=5)], max_epochs=1, logger=DummyLogger())
    with caplog.at_level("INFO", logger="lightning_viz"):
        trainer.fit(LitTiny(), *tiny_loaders(n=12, batch_size=6))
    assert sizes == [5]
    assert "every logger is Lightning's no-op DummyLogger" in caplog.text and "fast_dev_run" not in caplog.text


def test_a_tensorboard_prefix_starts_the_custom_scalars_layout_regexes_too(tmp_path):
    """TensorBoard matches the Custom Scalars layout's regexes from the tag's start: with a logger prefix they
    must match the prefixed tags (and no bare one)."""
    import re

    from tensorboard.plugins.custom_scalar import layout_pb2
    from torch.utils.tensorboard import SummaryWriter

    from lightning_viz.logging import TensorBoardBackend
    from lightning_viz.tracking import TRACKING_LAYOUT

    writer = SummaryWriter(str(tmp_path))
    vl = VizLogger(TensorBoardBackend(writer, prefix="run1-"), step=0)
    vl.custom_scalars(TRACKING_LAYOUT)
    vl.scalar("viz-cam/gradcam/net.conv2/drift/rank_corr", 0.5)
    vl.flush()
    writer.close()
    acc = read_events(str(tmp_path))
    assert [t for t in acc.Tags()["scalars"]] == ["run1-viz-cam/gradcam/net.conv2/drift/rank_corr"]
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    regexes = [r for c in layout.category for chart in c.chart for r in chart.multiline.tag]
    assert len(regexes) == sum(len(chart[1]) for c in TRACKING_LAYOUT.values() for chart in c.values())
    matching = [r for r in regexes if re.match(r, "run1-viz-cam/gradcam/net.conv2/drift/rank_corr")]
    assert matching == ["run1\\-viz-.*/drift/rank_corr"]
    assert not [r for r in regexes if re.match(r, "viz-cam/gradcam/net.conv2/drift/rank_corr")]
