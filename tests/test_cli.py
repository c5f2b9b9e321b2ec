"""The ``lightning-viz`` CLI on the shipped configs (made tiny by overrides), README and CI commands."""

from __future__ import annotations

import os
import re
import sys

import pytest
from helpers import image_steps, read_events, scalar_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.yaml")
DIGITS = os.path.join(ROOT, "configs", "digits.yaml")

DEMO_COMMAND = (
    "python -m pip install torch==2.14.1 torchvision==0.29.1 -e . && lightning-viz fit --config configs/demo.yaml"
)
TEST_COMMAND = 'python -m pip install torch==2.14.1 torchvision==0.29.1 -e ".[dev]" && python -m pytest -q'


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when it gets ``args`` while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["lightning-viz"])


def tiny_overrides(logdir: str, epochs: int = 2) -> list[str]:
    return [
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.accelerator=cpu",
        "--trainer.log_every_n_steps=1",
        f"--trainer.logger.init_args.save_dir={logdir}",
        "--data.init_args.batch_size=8",
    ]


def test_demo_config_through_console_entry_point(tmp_path, monkeypatch):
    """What ``lightning-viz fit --config configs/demo.yaml`` does (``sys.exit(main())``), made tiny."""
    from lightning_viz.cli import main

    monkeypatch.chdir(tmp_path)
    logdir = str(tmp_path / "logs")
    args = [
        "fit",
        "--config",
        DEMO,
        *tiny_overrides(logdir),
        "--data.init_args.num_train=32",
        "--data.init_args.num_val=16",
        "--data.init_args.image_size=16",
    ]
    assert main(args) is None  # the console script calls sys.exit(main()): anything else exits with status 1
    acc = read_events(logdir)
    assert image_steps(acc, "viz-filters/net.conv1/grid") == [0, 1]
    layer_tags = [t for t in acc.Tags()["images"] if t.startswith("viz-activations/")]
    assert sorted(layer_tags) == ["viz-activations/net.conv1/grid", "viz-activations/net.relu3/grid"]  # layout: grid
    assert image_steps(acc, "viz-activations/net.conv1/grid") == [0, 1]
    assert scalar_steps(acc, "viz-filters/net.conv1/rel_change") == [1]
    assert scalar_steps(acc, "val_acc") and scalar_steps(acc, "train_loss")
    saved = [os.path.join(d, f) for d, _, fs in os.walk(logdir) for f in fs if f == "config.yaml"]
    assert saved, "LightningCLI should save the resolved config next to the events"
    assert not os.path.exists(tmp_path / "lightning_logs")  # the save_dir override took effect


def test_demo_config_under_fast_dev_run_runs_each_callback_once_small_and_writes_nothing(tmp_path, monkeypatch, caplog):
    """``--trainer.fast_dev_run=true`` on the demo config (Lightning: one batch, loggers swapped for ``DummyLogger``):
    each callback computes and renders once, on at most 2 probes (the embeddings: 2 per class + 1, for the separation
    scores and a t-SNE), its input optimizations and attacks capped to 2 steps, and writes no file; one line says so.
    Was: every callback at full size (the demo's 64-step class-model images, 100-step inversions, 8 probes' PGD and
    min-flip searches...: 47 s of visualization on this machine after one batch of training)."""
    import logging

    from lightning_viz.callbacks import CALLBACKS
    from lightning_viz.cli import cli_main

    runs = []
    for cls in CALLBACKS:  # each callback's own compute, counted (the real one runs)

        def counted(self, pl_module, probe, _compute=cls.compute):
            steps = {k: getattr(self, k) for k in ("steps", "ig_steps", "smoothgrad_samples") if hasattr(self, k)}
            runs.append((type(self).__name__, None if probe is None else len(probe), steps))
            return _compute(self, pl_module, probe)

        monkeypatch.setattr(cls, "compute", counted)
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", DEMO, "--trainer.fast_dev_run=true", "--trainer.accelerator=cpu"]
    args += ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    args += ["--data.init_args.num_train=32", "--data.init_args.num_val=24", "--data.init_args.batch_size=8"]
    with caplog.at_level(logging.INFO, logger="lightning_viz"):
        cli = cli_main(args)
    assert sorted(name for name, _, _ in runs) == sorted(cls.__name__ for cls in CALLBACKS)  # each once
    probes = {name: n for name, n, _ in runs}
    assert probes.pop("EmbeddingCallback") == 9  # 4 classes
    assert probes.pop("ClassModelCallback") == probes.pop("UnitCallback") == 1  # the input's shape and range
    assert probes.pop("FilterCallback") is None and set(probes.values()) == {2}
    assert all(v <= 2 for _, _, steps in runs for v in steps.values()), runs
    cbs = [cb for cb in cli.trainer.callbacks if type(cb) in CALLBACKS]
    assert all(cb.last_logged_tags for cb in cbs)  # each rendered its images (written nowhere)
    by_type = {type(cb).__name__: cb for cb in cbs}
    assert by_type["ClassModelCallback"].steps == 64 and by_type["UnitCallback"].channels == list(range(8))
    assert [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs] == []
    lines = [r.getMessage() for r in caplog.records if r.name == "lightning_viz" and "fast_dev_run" in r.getMessage()]
    assert len(lines) == 2, lines  # the start-up line, and one when they ran
    assert "each runs once, at a reduced size" in lines[0]
    assert "11 visualization callbacks ran once at a reduced size" in lines[1], lines


def test_digits_config_in_process(tmp_path, monkeypatch):
    from lightning_viz.cli import cli_main
    from lightning_viz.data.digits import DigitsDataModule

    monkeypatch.chdir(tmp_path)
    logdir = str(tmp_path / "logs")
    cli = cli_main(["fit", "--config", DIGITS, *tiny_overrides(logdir, epochs=1), "--data.init_args.image_size=8"])
    assert isinstance(cli.datamodule, DigitsDataModule)
    assert cli.model.net.conv1.in_channels == 1 and cli.model.net.fc.out_features == 10
    acc = read_events(logdir)
    assert image_steps(acc, "viz-filters/net.conv1/grid") == [0]
    assert len([t for t in acc.Tags()["images"] if t.startswith("viz-activations/net.conv1/")]) == 10


def test_cli_builds_other_arch_and_data_by_short_name():
    """Short class names work for the built-in data modules (``--data=ShapesDataModule``)."""
    from lightning_viz.cli import cli_main
    from lightning_viz.data.shapes import ShapesDataModule

    cli = cli_main(
        [
            "--model.arch=resnet18",
            "--model.num_classes=3",
            "--data=ShapesDataModule",
            "--data.num_classes=3",
            "--trainer.logger=false",
        ],
        run=False,
    )
    assert isinstance(cli.datamodule, ShapesDataModule) and cli.datamodule.num_classes == 3
    assert cli.model.net.fc.out_features == 3 and hasattr(cli.model.net, "layer4")


def test_console_script_readme_and_ci_commands():
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert 'lightning-viz = "lightning_viz.cli:main"' in f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    assert DEMO_COMMAND in readme and TEST_COMMAND in readme
    ci = os.path.join(ROOT, ".ci", "run")
    assert os.access(ci, os.X_OK)
    with open(ci) as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "set -euo pipefail" and TEST_COMMAND in lines


class UserNet(__import__("lightning").LightningModule):
    """A user's own LightningModule (not an ImageClassifier), for ``--model=test_cli.UserNet``."""

    def __init__(self, hidden: int = 6, num_classes: int = 4):
        super().__init__()
        import torch.nn as nn

        self.features = nn.Sequential(nn.Conv2d(3, hidden, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch, batch_idx):
        import torch.nn.functional as F

        x, y = batch[0], batch[1]
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        import torch

        return torch.optim.SGD(self.parameters(), lr=0.01)


def test_cli_trains_a_user_lightning_module_with_the_default_data(tmp_path, monkeypatch):
    from lightning_viz.cli import cli_main
    from lightning_viz.data.shapes import ShapesDataModule

    monkeypatch.chdir(tmp_path)
    logdir = str(tmp_path / "logs")
    cli = cli_main(
        [
            "fit",
            "--model=test_cli.UserNet",
            "--model.hidden=5",
            "--data.num_train=16",
            "--data.num_val=8",
            "--data.image_size=16",
            "--data.batch_size=8",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.accelerator=cpu",
            "--trainer.logger=TensorBoardLogger",
            f"--trainer.logger.save_dir={logdir}",
            "--trainer.callbacks+=lightning_viz.CAMCallback",
            "--trainer.callbacks.layers=features.0",
            "--trainer.callbacks.num_probes=2",
            "--trainer.callbacks.probe_source=train",
        ]
    )
    assert type(cli.model) is UserNet and cli.model.head.in_features == 5
    assert isinstance(cli.datamodule, ShapesDataModule)  # the default data module
    acc = read_events(logdir)
    assert image_steps(acc, "viz-cam/panel/p000") == [0]
    assert scalar_steps(acc, "viz-cam/gradcam/features.0/stats/max_abs") == [0]


class UserNet3(UserNet):
    """UserNet with 3 classes by default (ImageClassifier's default is 4)."""

    def __init__(self, hidden: int = 6, num_classes: int = 3):
        super().__init__(hidden, num_classes)


class UserData(__import__("lightning").LightningDataModule):
    """A user's own LightningDataModule whose defaults differ from ShapesDataModule's (batch_size=64, seed=0)."""

    def __init__(self, batch_size: int = 5, seed: int = 3):
        super().__init__()
        self.batch_size, self.seed = batch_size, seed


@pytest.mark.parametrize("from_yaml", [False, True])
def test_a_user_class_keeps_its_own_defaults_not_the_builtin_ones(tmp_path, capsys, from_yaml):
    """jsonargparse carries init_args over to a new class_path: the built-in defaults' values (ImageClassifier's
    num_classes=4, ShapesDataModule's batch_size=64 and seed=0) replaced UserNet3's and UserData's own."""
    from lightning_viz.cli import cli_main

    if from_yaml:
        cfg = tmp_path / "user.yaml"
        cfg.write_text("model:\n  class_path: test_cli.UserNet3\n  init_args: {hidden: 7}\ndata: test_cli.UserData\n")
        args = ["--config", str(cfg)]
    else:
        args = ["--model=test_cli.UserNet3", "--data=test_cli.UserData", "--model.hidden=7"]
    cli = cli_main([*args, "--trainer.logger=false"], run=False)
    assert cli.config.model.init_args.as_dict() == {"hidden": 7, "num_classes": 3} and cli.model.head.out_features == 3
    assert (cli.datamodule.batch_size, cli.datamodule.seed) == (5, 3)
    # an explicit value before the class still carries over (jsonargparse's documented behaviour)
    cli = cli_main(["--data.batch_size=9", "--data=test_cli.UserData", "--trainer.logger=false"], run=False)
    assert (cli.datamodule.batch_size, cli.datamodule.seed) == (9, 3)
    with pytest.raises(SystemExit):  # --print_config prints the same values
        cli_main([*args, "--print_config"], run=False)
    printed = __import__("yaml").safe_load(capsys.readouterr().out)
    assert (
        printed["model"]["init_args"] == {"hidden": 7, "num_classes": 3} and printed["data"]["init_args"]["seed"] == 3
    )


def test_cli_defaults_to_image_classifier_and_shapes():
    from lightning_viz.cli import cli_main
    from lightning_viz.data.shapes import ShapesDataModule
    from lightning_viz.models import ImageClassifier

    cli = cli_main(["--model.width=4", "--trainer.logger=false"], run=False)
    assert type(cli.model) is ImageClassifier and cli.model.net.conv1.out_channels == 4
    assert type(cli.datamodule) is ShapesDataModule


def test_cli_version_help_and_packaged_config_by_name(capsys):
    from lightning_viz import __version__
    from lightning_viz.cli import cli_main, resolve_config

    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"lightning-viz {__version__}"
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "visualization callbacks" in capsys.readouterr().out
    assert resolve_config("demo") == resolve_config("demo.yaml") == os.path.realpath(DEMO)
    assert resolve_config("no_such_config") == "no_such_config"  # jsonargparse then reports the missing file
    cli = cli_main(["--config", "digits", "--trainer.logger=false"], run=False)
    assert cli.model.hparams.in_channels == 1 and cli.model.hparams.num_classes == 10


def test_config_path_of_the_repository_layout_resolves_from_anywhere(tmp_path, monkeypatch):
    """``--config configs/demo.yaml`` as the README writes it also works outside the repository."""
    from lightning_viz.cli import packaged_configs, resolve_config

    monkeypatch.chdir(tmp_path)
    assert resolve_config("configs/demo.yaml") == str(packaged_configs()["demo"])
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_text("model: {width: 4}\n")
    assert resolve_config("configs/demo.yaml") == "configs/demo.yaml"  # an existing file always wins
    assert set(packaged_configs()) >= {"demo", "digits"}


def test_help_lists_every_callback_with_its_summary_and_how_to_see_its_options(capsys):
    from lightning_viz.callbacks import CALLBACKS
    from lightning_viz.cli import cli_main

    for args in (["--help"], ["fit", "--help"]):
        with pytest.raises(SystemExit):
            cli_main(args)
        out = capsys.readouterr().out
        for cls in CALLBACKS:
            assert f"  {cls.__name__} " in out, (args, cls.__name__)
        assert "  CAMCallback           Class activation maps of the probe images." in out
        assert "  MapTracker " in out and "--trainer.callbacks.help NAME" in out


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--trainer.callbacks.methods=[gradcamm]"],
            "CAMCallback: methods: unknown CAM method 'gradcamm'; allowed: cam,",
        ),
        (
            ["--trainer.callbacks.tracker=MapTracker", "--trainer.callbacks.tracker.topk=2"],
            "MapTracker: topk must be a fraction in (0, 1]; got 2",
        ),
    ],
)
def test_a_bad_callback_option_on_the_command_line_ends_with_the_callbacks_own_message(options, message):
    """Not jsonargparse's 'Does not validate against any of the Union subtypes' with the message buried inside."""
    from lightning_viz.cli import cli_main

    with pytest.raises(ValueError) as info:
        cli_main(["--trainer.logger=false", "--trainer.callbacks+=CAMCallback", *options], run=False)
    assert str(info.value).startswith(message), str(info.value)
    assert info.value.__cause__ is None and "Union" not in str(info.value)


def test_a_folder_named_like_a_packaged_config_does_not_hide_it(tmp_path, monkeypatch):
    """``--config demo`` in a directory that has a ``demo/`` folder (a run or data folder) still finds the config."""
    from lightning_viz.cli import packaged_configs, resolve_config

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    assert resolve_config("demo") == str(packaged_configs()["demo"])


def _accepted(cls) -> set[str]:
    """Init argument names of ``cls``, following ``**kwargs`` up the MRO as LightningCLI does."""
    import inspect

    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = inspect.signature(klass.__init__).parameters
        names |= {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n != "self"}
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            break
    return names


def test_readme_snippets_import_and_name_only_real_classes_and_options():
    """Every README Python block compiles and its lightning_viz imports work; every YAML block and every
    ``lightning-viz fit`` command names importable classes and options they accept (the runs themselves are
    checked by hand and by the tests of each feature; this keeps renamed options out of the docs)."""
    import importlib
    import re
    import shlex

    import yaml

    import lightning_viz
    import lightning_viz.data as data
    from lightning_viz.models import ImageClassifier

    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    blocks = re.findall(r"```(\w+)\n(.*?)```", readme, flags=re.S)
    assert len([b for lang, b in blocks if lang == "python"]) >= 10

    def resolve(path: str):
        if "." not in path:
            return getattr(lightning_viz, path, None) or getattr(data, path)
        module, name = path.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    def check_yaml(node) -> None:
        if isinstance(node, dict):
            if "class_path" in node:
                cls = resolve(node["class_path"])
                unknown = set(node.get("init_args") or {}) - _accepted(cls)
                assert not unknown, (node["class_path"], unknown)
            for value in node.values():
                check_yaml(value)
        elif isinstance(node, list):
            for value in node:
                check_yaml(value)

    for lang, body in blocks:
        if lang == "python":
            compile(body, "README.md", "exec")
            imports = "\n".join(ln for ln in body.splitlines() if re.match(r"(from|import) lightning_viz", ln))
            exec(imports, {})
        elif lang == "yaml":
            check_yaml(yaml.safe_load(body))
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        with open(os.path.join(ROOT, "configs", name)) as f:
            check_yaml(yaml.safe_load(f))
    commands = re.findall(r"lightning-viz fit (?:\\\n|[^`\n])*", readme)
    assert len(commands) >= 8
    for command in commands:
        owner: dict[str, type] = {"model": ImageClassifier, "data": data.ShapesDataModule}
        for arg in shlex.split(command.replace("\\\n", " ")):
            key, _, value = arg.partition("=")
            if key == "--trainer.callbacks.help":
                assert shlex.split(command)[-1] in lightning_viz.__all__, command
            elif key == "--trainer.callbacks+":
                owner["callbacks"] = resolve(value)
            elif key in ("--model", "--data"):
                owner[key[2:]] = resolve(value) if not value.startswith("my_pkg") else object
            elif re.match(r"--(model|data|trainer\.callbacks)\.\w+$", key):
                group, option = key[2:].rsplit(".", 1)
                cls = owner[group.replace("trainer.", "")]
                assert cls is object or option in _accepted(cls), (command, cls.__name__, option)


def _options(obj) -> dict:
    """An object's plain options (numbers, strings, lists, None; nested callables/objects by their own options)."""
    plain = (int, float, str, bool, list, tuple, dict, type(None))
    out = {k: v for k, v in vars(obj).items() if isinstance(v, plain) and not k.startswith("_")}
    return {**out, **{k: (type(v).__name__, _options(v)) for k, v in vars(obj).items() if hasattr(v, "__dict__")}}


def test_print_config_of_a_config_with_callbacks_loads_back_to_the_same_run(tmp_path, capsys, monkeypatch):
    """`lightning-viz fit --config demo --print_config > run.yaml`, then `--config run.yaml`: the printed config
    (every callback with all its options) loads again, prints the same again, and builds the same callbacks, model
    and data as the original config (a callback option that jsonargparse cannot print would break this)."""
    from lightning_viz.cli import cli_main

    monkeypatch.chdir(tmp_path)

    def printed(config: str) -> str:
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["--config", config, "--trainer.max_epochs=1", "--print_config"], run=False)
        assert exit_info.value.code in (0, None)
        return capsys.readouterr().out

    first = printed("demo")
    assert first.count("class_path: lightning_viz.callbacks.") == 11
    (tmp_path / "run.yaml").write_text(first)
    assert printed(str(tmp_path / "run.yaml")) == first
    original = cli_main(["--config", "demo", "--trainer.max_epochs=1"], run=False)
    again = cli_main(["--config", str(tmp_path / "run.yaml")], run=False)
    cbs = [cb for cb in original.trainer.callbacks if type(cb).__module__.startswith("lightning_viz.callbacks")]
    assert len(cbs) == 11
    assert [(type(cb), _options(cb)) for cb in cbs] == [
        (type(cb), _options(cb))
        for cb in again.trainer.callbacks
        if type(cb).__module__.startswith("lightning_viz.callbacks")
    ]
    assert original.trainer.max_epochs == again.trainer.max_epochs == 1
    assert dict(original.model.hparams) == dict(again.model.hparams)
    assert dict(original.datamodule.hparams) == dict(again.datamodule.hparams)


def test_mlflow_logger_with_a_database_tracking_uri_through_the_cli(tmp_path, monkeypatch):
    """``--trainer.logger=MLFlowLogger`` with a ``sqlite:///`` (or server) tracking URI has no local directory
    (``save_dir`` is None): the resolved config goes to ``default_root_dir`` and the run trains, with the
    visualizations in MLflow. Was: LightningCLI's SaveConfigCallback stopped the fit at setup with a bare
    ``assert log_dir is not None`` (Lightning-AI/pytorch-lightning#19441)."""
    import mlflow

    from lightning_viz.cli import cli_main

    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = [
        "fit",
        "--config",
        DIGITS,
        *[a for a in tiny_overrides("unused", epochs=1) if "logger" not in a],
        "--trainer.logger=MLFlowLogger",
        "--trainer.logger.experiment_name=cli",
        f"--trainer.logger.tracking_uri={uri}",
        f"--trainer.logger.artifact_location={tmp_path / 'artifacts'}",
        f"--trainer.default_root_dir={tmp_path / 'root'}",
        "--data.init_args.image_size=8",
    ]
    cli = cli_main(args)
    assert os.path.isfile(tmp_path / "root" / "config.yaml")
    client = mlflow.MlflowClient(uri)
    run_id = cli.trainer.logger.run_id
    assert [m.step for m in client.get_metric_history(run_id, "viz-filters/net.conv1/mean_norm")] == [0]
    epoch0 = [f.path for f in client.list_artifacts(run_id, "lightning_viz/epoch_0000/viz-filters/net.conv1")]
    assert epoch0 == ["lightning_viz/epoch_0000/viz-filters/net.conv1/grid.png"]


def test_test_and_predict_subcommands_run_on_a_checkpoint_of_the_builtin_model(tmp_path, monkeypatch):
    """``lightning-viz test/predict --ckpt_path`` with the built-in model and data (the test and predict loaders are
    the validation split). Was: ``MisconfigurationException: No
    test_step() method defined`` (and no predict or test dataloader)."""
    import torch

    from lightning_viz.cli import cli_main, main

    monkeypatch.chdir(tmp_path)
    data = ["--data.num_train=16", "--data.num_val=12", "--data.image_size=16", "--data.batch_size=8"]
    trainer = [
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    assert main(["fit", "--trainer.max_epochs=1", *trainer, *data]) is None
    (ckpt,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".ckpt")]
    assert main(["test", "--ckpt_path", ckpt, *trainer, *data]) is None
    acc = read_events(str(tmp_path / "lightning_logs" / "version_1"))
    assert scalar_steps(acc, "test_acc") and scalar_steps(acc, "test_loss")
    cli = cli_main(["predict", "--ckpt_path", ckpt, *trainer, *data])
    probs = torch.cat(cli.trainer.predict_loop.predictions)
    assert probs.shape == (12, 4) and torch.allclose(probs.sum(1), torch.ones(12))
    x = torch.stack([cli.datamodule.val_set[i][0] for i in range(12)])
    assert torch.allclose(probs, cli.model.eval()(x).softmax(1), atol=1e-6)


@pytest.mark.parametrize(
    "options, lead",
    [
        (  # a misspelled option in a YAML config: the callback, the option, a suggestion, every allowed option
            [
                "--config",
                "trainer: {callbacks: [{class_path: lightning_viz.CAMCallback, init_args: {methodz: [cam]}}]}",
            ],
            "CAMCallback (trainer.callbacks): unknown option 'methodz' (did you mean 'methods'?); allowed: methods, ",
        ),
        (  # nested: the tracker of a callback, with a wrong type
            [
                "--trainer.callbacks+=CAMCallback",
                "--trainer.callbacks.tracker=MapTracker",
                "--trainer.callbacks.tracker.topk=x",
            ],
            "CAMCallback (trainer.callbacks): tracker: MapTracker: topk: expected float, got 'x'",
        ),
        (
            ["--trainer.callbacks+=CAMCallback", "--trainer.callbacks.normalize=fixd"],
            "CAMCallback (trainer.callbacks): normalize: expected one of 'per_image', 'fixed', 'both', got 'fixd'",
        ),
        (
            ["--trainer.callbacks+=CAMCalback"],
            "trainer.callbacks: unknown class 'CAMCalback' (did you mean 'CAMCallback'?); allowed: FilterCallback, ",
        ),
        (["--model.lrr=0.1"], "ImageClassifier (model): unknown option 'lrr' (did you mean 'lr'?); allowed: arch, "),
        (  # a value matching no member of an Optional/Union option (was: no lead line, only jsonargparse's report)
            ["--trainer.callbacks+=GradientCallback", "--trainer.callbacks.loggers=tensorboard"],
            "GradientCallback (trainer.callbacks): loggers: expected list[str] or null, got 'tensorboard' "
            "(a list: [tensorboard])",
        ),
        (  # YAML reads unquoted digits and yes/no as numbers and booleans
            [
                "--config",
                "trainer: {callbacks: [{class_path: lightning_viz.CAMCallback, init_args: {class_names: [0, no]}}]}",
            ],
            "CAMCallback (trainer.callbacks): class_names: expected list[str] or null, got [0, False] "
            "(0 is a number: quote names, '0')",
        ),
        (  # one name or a list of Literal choices
            ["--trainer.callbacks+=EmbeddingCallback", "--trainer.callbacks.projection=[pca,umap]"],
            "EmbeddingCallback (trainer.callbacks): projection: expected one of 'pca', 'tsne' or a list of 'pca', "
            "'tsne', got ['pca', 'umap']",
        ),
        (
            ["--trainer.callbacks+=UnitCallback", "--trainer.callbacks.channels=3"],
            "UnitCallback (trainer.callbacks): channels: expected list[int] or null, got '3' (a list: [3])",
        ),
        (
            [
                "--trainer.callbacks+=CAMCallback",
                "--trainer.callbacks.tracker=MapTracker",
                "--trainer.callbacks.tracker.display_px=null",
            ],
            "CAMCallback (trainer.callbacks): tracker: MapTracker: display_px: expected int or null, got 'None' "
            "(null on the command line",
        ),
    ],
)
def test_a_parse_error_starts_with_the_class_the_option_and_what_is_allowed(options, lead, capsys):
    """Not only jsonargparse's 'Does not validate against any of the Union subtypes' with the useful line buried
    inside it, after a usage line listing every Trainer option."""
    from lightning_viz.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", "--trainer.logger=false", *options], run=False)
    err = capsys.readouterr().err
    usage, tip, first, *details = err.splitlines()
    assert usage.startswith("usage: lightning-viz ") and len(usage) < 100 and tip.startswith("tip: ")  # one line
    assert first.startswith("error: " + lead), first
    assert "Does not validate against any of the Union subtypes" in "\n".join(details)  # jsonargparse's, below


def test_every_option_of_the_cli_classes_has_its_own_help_line():
    """``lightning-viz fit --trainer.callbacks.help X`` (and ``--data.help``) describes every option: an ``Args:``
    entry naming several options at once (``ig_steps, ig_baseline: ...``) gave those options no help at all."""
    from jsonargparse import ArgumentParser

    from lightning_viz.callbacks import CALLBACKS
    from lightning_viz.data import DigitsDataModule, ImageFolderDataModule, ShapesDataModule
    from lightning_viz.models import ImageClassifier
    from lightning_viz.tracking import MapTracker

    for cls in (*CALLBACKS, MapTracker, ImageClassifier, ShapesDataModule, DigitsDataModule, ImageFolderDataModule):
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(cls, "x")
        options = [a for a in parser._actions if a.dest.startswith("x.") and not a.dest.endswith(".help")]
        assert len(options) >= 3, cls
        assert [a.dest for a in options if not (a.help or "").strip()] == [], cls.__name__


def test_an_unrecognized_argument_suggests_the_close_option(capsys):
    from lightning_viz.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", "--trainer.max_epochz=1"], run=False)
    err = capsys.readouterr().err
    assert re.search(
        r"error: unrecognized arguments: (fit )?--trainer.max_epochz=1 \(did you mean --trainer.max_epochs\?\)", err
    )


def test_one_method_is_a_name_or_a_list_like_one_layer():
    """``methods: gradcam`` (one name, as ``layers: net.conv1``) and ``methods: [gradcam, layercam]`` both parse, on
    the command line and in YAML. Was: one name refused ("expected a list") though the callbacks take it."""
    from lightning_viz.cli import cli_main

    def methods(*args):
        cli = cli_main([*args, "--trainer.logger=false"], run=False)
        return [cb.methods for cb in cli.trainer.callbacks if hasattr(cb, "methods")]

    assert methods("--trainer.callbacks+=CAMCallback", "--trainer.callbacks.methods=layercam") == [["layercam"]]
    assert methods("--trainer.callbacks+=CAMCallback", "--trainer.callbacks.methods=[cam,gradcam++]") == [
        ["cam", "gradcampp"]
    ]
    yaml = "trainer: {callbacks: [{class_path: lightning_viz.GradientCallback, init_args: {methods: saliency}}]}"
    assert methods("--config", yaml) == [["saliency"]]


def test_one_projection_or_occlusion_output_is_a_name_or_a_list():
    """``projection: tsne`` and ``outputs: prob`` (one name, as ``methods``) parse on the command line and in YAML, as
    do lists. Was: refused with "expected list, got 'tsne'" (and ``outputs="prob"`` from Python: an error)."""
    from lightning_viz.callbacks import OcclusionCallback
    from lightning_viz.cli import cli_main

    def option(name, *args):
        cli = cli_main([*args, "--trainer.logger=false"], run=False)
        return [getattr(cb, name) for cb in cli.trainer.callbacks if hasattr(cb, name)]

    emb = "--trainer.callbacks+=EmbeddingCallback"
    assert option("projection", emb, "--trainer.callbacks.projection=tsne") == [["tsne"]]
    assert option("projection", emb, "--trainer.callbacks.projection=[tsne,pca]") == [["tsne", "pca"]]
    occ = "--trainer.callbacks+=OcclusionCallback"
    assert option("outputs", occ, "--trainer.callbacks.outputs=prob") == [["prob"]]
    yaml = "trainer: {callbacks: [{class_path: lightning_viz.OcclusionCallback, init_args: {outputs: score}}]}"
    assert option("outputs", "--config", yaml) == [["score"]]
    assert OcclusionCallback(outputs="prob").outputs == ["prob"]


@pytest.mark.parametrize(
    "options, lead",
    [
        (
            ["--trainer.callbacks+=GradientCallback", "--trainer.callbacks.num_probes=null"],
            "GradientCallback (trainer.callbacks): num_probes: null is not allowed; expected int (default: 16)",
        ),
        (  # was accepted: log_time None
            ["--trainer.callbacks+=CAMCallback", "--trainer.callbacks.log_time=null"],
            "CAMCallback (trainer.callbacks): log_time: null is not allowed; expected bool (default: True)",
        ),
        (  # was accepted: the fit failed in configure_optimizers
            ["--model.lr=null"],
            "ImageClassifier (model): lr: null is not allowed; expected float (default: 0.001)",
        ),
        (
            [
                "--config",
                "trainer: {callbacks: [{class_path: lightning_viz.CAMCallback, init_args: "
                "{tracker: {class_path: lightning_viz.MapTracker, init_args: {topk: null}}}}]}",
            ],
            "CAMCallback (trainer.callbacks): tracker: MapTracker: topk: null is not allowed; expected float",
        ),
    ],
)
def test_null_for_an_option_that_takes_no_none_is_a_parse_error(options, lead, capsys):
    """jsonargparse takes ``null`` for any init argument of a class given by class_path: ``num_probes: null`` failed
    when the callback was built, with Python's ``'<' not supported between instances of 'NoneType' and 'int'``, and
    ``log_time: null`` or ``--model.lr=null`` were taken as they were."""
    from lightning_viz.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["--trainer.logger=false", *options], run=False)
    assert f"error: {lead}" in capsys.readouterr().err


def test_null_where_an_option_takes_none_still_parses():
    from lightning_viz.cli import cli_main

    cli = cli_main(
        [
            "--trainer.logger=false",
            "--trainer.callbacks+=GradientCallback",
            "--trainer.callbacks.chunk_size=null",
            "--trainer.callbacks.cmap=null",
            "--trainer.callbacks.name=null",
        ],
        run=False,
    )
    (cb,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GradientCallback"]
    assert (cb.chunk_size, cb.cmap, cb.name) == (None, None, None)


def test_a_callback_without_its_required_option_names_it(capsys):
    from lightning_viz.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["--trainer.logger=false", "--trainer.callbacks+=TopPatchesCallback"], run=False)
    assert "error: TopPatchesCallback (trainer.callbacks): missing required option layers\n" in capsys.readouterr().err


def test_viz_cli_in_a_script_with_its_own_model_and_data_classes(capsys):
    """``VizCLI(MyNet, MyData)`` (a script's own LightningCLI with lightning-viz's parse errors and messages):
    the classes are the script's, and a bad callback option ends with the callback's own message. Was:
    ``NSKeyError: No action for key "model.class_path"`` (the built-in defaults set on a non-subclass-mode model)."""
    from lightning.pytorch import LightningModule

    from lightning_viz.cli import VizCLI
    from lightning_viz.data import ShapesDataModule

    cb = ["--trainer.callbacks+=CAMCallback", "--trainer.callbacks.layers=features.0"]
    args = ["--model.hidden=5", "--data.image_size=16", "--trainer.logger=false", *cb]
    cli = VizCLI(UserNet, ShapesDataModule, args=args, run=False)
    assert type(cli.model) is UserNet and cli.model.head.in_features == 5 and cli.datamodule.image_size == 16
    assert [
        type(c).__name__ for c in cli.trainer.callbacks if type(c).__module__.startswith("lightning_viz.callbacks")
    ] == ["CAMCallback"]
    with pytest.raises(ValueError, match="^CAMCallback: unknown colormap 'jett'"):
        VizCLI(UserNet, ShapesDataModule, args=[*args, "--trainer.callbacks.cmap=jett"], run=False)
    # in subclass mode of the script's own base class, the built-in model (no subclass of it) is no default
    with pytest.raises(SystemExit):
        VizCLI(UserNet, subclass_mode_model=True, args=["--trainer.logger=false"], run=False)
    assert "model" in capsys.readouterr().err
    cli = VizCLI(LightningModule, subclass_mode_model=True, args=["--trainer.logger=false"], run=False)
    assert type(cli.model).__name__ == "ImageClassifier" and type(cli.datamodule).__name__ == "ShapesDataModule"


def test_help_of_a_misspelled_callback_suggests_the_close_name(capsys):
    """``--trainer.callbacks.help CAMCalback``: was ``option: unknown class 'CAMCalback'; give the full import path``
    (no key, no suggestion, no list), as if the name could not be known."""
    from lightning_viz.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", "--trainer.callbacks.help", "CAMCalback"], run=False)
    assert (
        "error: trainer.callbacks: unknown class 'CAMCalback' (did you mean 'CAMCallback'?); allowed: FilterCallback, "
        in capsys.readouterr().err
    )


def test_print_config_from_the_command_line_warns_of_nothing(monkeypatch, capsys):
    """``lightning-viz fit --print_config`` (the real command line, no ``args``): was Lightning's warning "not
    recommended to provide both args and command line arguments", from the CLI's own first parse."""
    import warnings

    from lightning_viz.cli import main

    monkeypatch.setattr(sys, "argv", ["lightning-viz", "fit", "--trainer.max_epochs=2", "--print_config"])
    with warnings.catch_warnings(record=True) as seen, pytest.raises(SystemExit):
        warnings.simplefilter("always")
        main()
    assert [str(w.message) for w in seen if "args parameter" in str(w.message)] == []
    assert "max_epochs: 2" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, required",
    [("UnitCallback", ["layers", "channels"]), ("InversionCallback", ["layers"])],
)
def test_help_says_required_for_options_a_deprecated_alias_keeps_optional(name, required, capsys):
    """``--trainer.callbacks.help UnitCallback``: ``layers`` and ``channels`` are required (their defaults are ``None``
    only so that the deprecated ``layer`` still works): the help says ``required``. Was: ``default: null``."""
    from lightning_viz.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["fit", "--trainer.callbacks.help", name], run=False)
    out = capsys.readouterr().out
    entries = {
        m.group(1): " ".join(m.group(2).split())
        for m in re.finditer(r"^  --trainer\.callbacks\.(\w+) .*\n((?:^ {20,}.*\n)+)", out, re.MULTILINE)
    }
    for option in required:
        assert "(required, type:" in entries[option] and "default:" not in entries[option], entries[option]
    assert "default: noise" in entries["init"] or "default: channel" in entries["unit"]  # the others keep theirs


def test_maptracker_listed_in_the_help_says_how_to_see_and_attach_it(capsys):
    """``lightning-viz --help`` lists MapTracker beside the callbacks and says ``--trainer.callbacks.help NAME`` lists
    options; for MapTracker that failed with ``unknown class 'MapTracker'; allowed: FilterCallback, ...``. The help,
    and that error (also for ``--trainer.callbacks+=MapTracker``), now give the commands that work, and they do."""
    from lightning_viz.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    shown = "--trainer.callbacks+=CAMCallback --trainer.callbacks.tracker.help MapTracker"
    assert f"`lightning-viz fit {shown}` lists its options" in out
    for args in (["--trainer.callbacks.help", "MapTracker"], ["--trainer.callbacks+=MapTracker"]):
        with pytest.raises(SystemExit):
            cli_main(["fit", *args, "--trainer.logger=false"], run=False)
        err = capsys.readouterr().err
        assert "error: trainer.callbacks: MapTracker is no callback but the tracker option of GradientCallback" in err
        assert shown in err and "--trainer.callbacks.tracker=MapTracker" in err
    with pytest.raises(SystemExit) as done:
        cli_main(shown.split(), run=False)
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--trainer.callbacks.tracker.faithfulness {true,false}" in out
    assert not re.search(r"(?<![\w.-])--tracker\.", out)  # was --tracker.faithfulness, refused on the command line
    attach = ["--trainer.callbacks+=CAMCallback", "--trainer.callbacks.tracker=MapTracker", "--trainer.logger=false"]
    cli = cli_main([*attach, "--trainer.callbacks.tracker.faithfulness=true"], run=False)  # as the help names it
    (cam,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "CAMCallback"]
    assert type(cam.tracker).__name__ == "MapTracker" and cam.tracker.faithfulness


def test_help_gives_each_subcommand_its_whole_first_sentence(capsys):
    """``lightning-viz --help`` cut ``test`` and ``predict`` mid-sentence (``It's separated from fit to make sure you
    never run on your``: Lightning keeps the docstring's first line); now the whole first paragraph, also on top of
    ``lightning-viz test --help``."""
    from lightning_viz.cli import cli_main

    with pytest.raises(SystemExit):
        cli_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "never run on your test set until you want to." in out
    assert "Useful to perform distributed and batched predictions." in out
    with pytest.raises(SystemExit):
        cli_main(["test", "--help"])
    out = capsys.readouterr().out
    assert "never run on your test set until you want to." in " ".join(out.split())
    assert "never run on your:" not in out  # the title of the ckpt_path group was cut too


def test_callback_help_shows_no_sphinx_markup(capsys):
    """``--trainer.callbacks.help CAMCallback`` printed the docstrings' roles as written (``:data:`~lightning_viz.
    methods.cam.CAM_VARIANTS```, ``:class:`VisualizationError```, ``:data:`BASELINE_STEP```); now plain names."""
    from lightning_viz.callbacks import CALLBACKS
    from lightning_viz.cli import cli_main

    role = re.compile(r":(?:func|class|data|meth|mod|attr|exc|obj):`")
    for cls in CALLBACKS:
        with pytest.raises(SystemExit):
            cli_main(["fit", "--trainer.callbacks.help", cls.__name__], run=False)
        out = capsys.readouterr().out
        assert "--trainer.callbacks.on_error" in out and not role.search(out), (cls.__name__, role.findall(out))
        if cls.__name__ == "CAMCallback":
            assert "any of ``CAM_VARIANTS``: ``cam``, ``gradcam``" in " ".join(out.split())
            assert "a ``VisualizationError``" in " ".join(out.split())
    with pytest.raises(SystemExit):
        cli_main(["--trainer.callbacks+=CAMCallback", "--trainer.callbacks.tracker.help", "MapTracker"], run=False)
    assert not role.search(capsys.readouterr().out)


def test_class_help_titles_are_whole_sentences(capsys):
    """``--trainer.callbacks.help UnitCallback`` and ``--model.help ImageClassifier`` titled the options with the
    docstring's first line, cut mid-sentence (``... for each channel of ``layers`` the image:``); now the sentence."""
    from lightning_viz.cli import cli_main

    cases = {
        ("--trainer.callbacks.help", "UnitCallback"): 'its center unit (``"neuron"``); rank 0 only:',
        ("--trainer.callbacks.help", "AdversarialCallback"): "as a robustness curve over training:",
        ("--trainer.callbacks.help", "CAMCallback"): "\nClass activation maps of the probe images:\n",
        ("--model.help", "ImageClassifier"): "``trainer.predict`` returns class probabilities:",
    }
    for args, title in cases.items():
        with pytest.raises(SystemExit):
            cli_main(["fit", *args], run=False)
        assert title in capsys.readouterr().out, args
