"""The README's examples run as written: every Python block is executed (tiny stand-ins only for what a block
leaves to the user: a model, images, a run to fit), the files, tags and shapes its comments promise are checked,
every YAML block builds its callbacks through LightningCLI, and the options, defaults and tags the README's
tables state are those of the code and of a real run."""

from __future__ import annotations

import ast
import glob
import inspect
import logging
import os
import re
import sys
import types

import lightning
import lightning.pytorch
import pytest
import torch
from helpers import LitTiny, read_events

from lightning_viz.tracking import MapTracker

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

with open(os.path.join(ROOT, "README.md")) as _f:
    README = _f.read()


def blocks(lang: str) -> list[tuple[int, str]]:
    """``(line, body)`` of every fenced ``lang`` block of the README."""
    return [
        (README[: m.start()].count("\n") + 1, m.group(2))
        for m in re.finditer(r"```(\w+)\n(.*?)```", README, flags=re.S)
        if m.group(1) == lang
    ]


_Trainer = lightning.Trainer


class _TinyTrainer(_Trainer):
    """The blocks' own ``L.Trainer(...)``, with every argument they give kept, and two batches per epoch (one for
    validation), at most 2 epochs when the block leaves ``max_epochs`` open, no progress bar: the only change the
    harness makes to a block that trains."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("limit_train_batches", 2)
        kwargs.setdefault("limit_val_batches", 1)
        kwargs.setdefault("max_epochs", 2)
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("enable_model_summary", False)
        kwargs.setdefault("log_every_n_steps", 1)
        kwargs.setdefault("accelerator", "cpu")
        super().__init__(*args, **kwargs)


@pytest.fixture
def harness(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-viz"])
    for module in (lightning, lightning.pytorch):
        monkeypatch.setattr(module, "Trainer", _TinyTrainer)
    return tmp_path


def tiny_model():
    from lightning_viz.models import ImageClassifier

    return ImageClassifier(arch="small_cnn", num_classes=4, width=4)


def tiny_data():
    from lightning_viz.data import ShapesDataModule

    return ShapesDataModule(num_train=32, num_val=16, image_size=16, batch_size=8)


def run_block(body: str, namespace: dict) -> list:
    """Execute ``body`` statement by statement in ``namespace``; returns the values of its bare expressions
    (``CAMCallback(...)`` on a line of its own), which a plain ``exec`` would drop."""
    values = []
    for node in ast.parse(body).body:
        if isinstance(node, ast.Expr):
            values.append(eval(compile(ast.Expression(node.value), "README.md", "eval"), namespace))
        else:
            exec(compile(ast.Module([node], type_ignores=[]), "README.md", "exec"), namespace)
    return values


def comment_paths(body: str) -> list[str]:
    """Paths in a block's comments (``a/b/...png``), as glob patterns (``...`` = anything below)."""
    comments = " ".join(line.split("#", 1)[1] for line in body.splitlines() if "#" in line)
    paths = re.findall(r"[\w.*-]+(?:/[\w.*-]+)+", comments)
    return [p.replace("...", "**/*") for p in paths if not p.startswith("viz-")]


def assert_globs(patterns: list[str], prefix: str = "") -> None:
    assert patterns
    for pattern in patterns:
        assert glob.glob(prefix + pattern, recursive=True), f"README promises {pattern}; not written"


def comment_tags(body: str) -> list[str]:
    comments = " ".join(line.split("#", 1)[1] for line in body.splitlines() if "#" in line)
    return re.findall(r"viz-[\w./-]+[\w.]", comments)


def assert_tags_written(tags: list[str], logdir: str) -> None:
    acc = read_events(logdir)
    written = acc.Tags()["images"] + acc.Tags()["scalars"]
    assert tags
    for tag in tags:
        if tag.endswith("..."):
            assert any(t.startswith(tag[:-3]) for t in written), (tag, written)
        else:
            assert tag in written, (tag, written)


class TupleNet(LitTiny):
    """``forward`` returns ``(logits, features)``."""

    def forward(self, x):
        return self.net(x), x.mean((2, 3))

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0])[0], batch[1])

    def validation_step(self, batch, batch_idx):
        pass


class TemperatureNet(LitTiny):
    """``forward`` takes a second, required argument."""

    def forward(self, x, temperature):
        return self.net(x) / temperature

    def training_step(self, batch, batch_idx):
        return torch.nn.functional.cross_entropy(self(batch[0], 1.0), batch[1])

    def validation_step(self, batch, batch_idx):
        pass


def _check_logger_block(body, ns, values, tmp_path):
    """A Trainer with a logger and a CAM callback: fit it on the tiny data, then the files the comment names."""
    ns["trainer"].fit(tiny_model(), datamodule=tiny_data())
    if "WandbLogger" in body:
        import wandb

        wandb.finish()
    prefix = "mlartifacts/**/" if "MLFlowLogger" in body else ""
    assert_globs(comment_paths(body), prefix)
    if "CSVLogger" in body:  # "one row per callback run, step = epoch"
        import csv

        with open("logs/lightning_logs/version_0/metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("viz-cam/time_s")]
        assert [int(r["step"]) for r in rows] == [0, 1]
    if "default_root_dir" in body:  # "scalars.csv (epoch,tag,value)"
        with open("runs/lightning_logs/version_0/lightning_viz/scalars.csv") as f:
            lines = f.read().splitlines()
        assert lines[0] == "epoch,tag,value" and any(ln.startswith("1,viz-cam/time_s,") for ln in lines)
    if "MLFlowLogger" in body:  # "scalars as metrics (step = epoch, ... get_metric_history(run_id, tag))"
        from mlflow.tracking import MlflowClient

        run_id = ns["logger"].run_id
        history = MlflowClient(tracking_uri="sqlite:///mlflow.db").get_metric_history(run_id, "viz-cam/time_s")
        assert sorted(m.step for m in history) == [0, 1]


def _check_attaching(body, ns, values, tmp_path):
    tags = ["viz-filters/net.conv1/grid", "viz-activations/net.conv1/p000", "viz-activations/net.relu3/p003"]
    assert_tags_written(tags, "lightning_logs")  # the layer and probe tags of the Methods table


def _check_tracker(body, ns, values, tmp_path):
    from helpers import tiny_trainer

    (cam,) = values
    tiny_trainer(str(tmp_path / "tracker"), [cam], limit_train_batches=2, limit_val_batches=1).fit(
        tiny_model(), datamodule=tiny_data()
    )
    key = "viz-cam/layercam/net.conv3"
    tags = ["viz-cam/filmstrip/p007", f"{key}/drift/rank_corr", f"{key}/drift/topk_iou", "viz-cam/probe_accuracy"]
    tags += ["viz-cam/drift/prediction_flips", f"{key}/faithfulness/deletion_auc", f"{key}/sanity/rank_corr"]
    tags += [f"{key}/faithfulness/insertion_auc", f"{key}/localization/pointing_game"]
    assert_tags_written(tags, str(tmp_path / "tracker"))


def _check_logits_fn(body, ns, values, tmp_path):
    """Each callback on a model its comment describes: it runs (without ``logits_fn`` setup refuses the model)."""
    from helpers import tiny_loaders, tiny_trainer

    with pytest.raises(Exception, match="logits_fn"):
        tiny_trainer(str(tmp_path / "plain"), [type(values[0])()], max_epochs=1).fit(TupleNet(), *tiny_loaders(n=16))
    for callback, model in zip(values, (TupleNet(), TemperatureNet())):
        logdir = str(tmp_path / type(model).__name__)
        tiny_trainer(logdir, [callback], max_epochs=1, limit_train_batches=1).fit(model, *tiny_loaders(n=16))
        family = callback.method
        assert_tags_written([f"viz-{family}/panel/p000", f"viz-{family}/time_s"], logdir)


def _check_relu_rule(body, ns, values, tmp_path):
    calls = int(re.search(r"\((\d+) for a torchvision resnet18\)", body).group(1))
    assert ns["mode"].calls == calls
    assert ns["x"].grad is not None and ns["x"].grad.abs().sum() > 0
    from lightning_viz.capture import isolated
    from lightning_viz.methods import gradient

    with isolated(ns["model"]) as m:  # "methods.gradient(model, x, target, labels, rule="guided") does the same"
        same = gradient(m, ns["x"].detach(), "label", ns["y"], rule="guided")
    torch.testing.assert_close(same, ns["x"].grad)
    assert all(p.grad is None for p in ns["model"].parameters()) and ns["model"].training


def _check_methods(body, ns, values, tmp_path):
    for name, shape in re.findall(r"(\w+) = .*# \[([\d, ]+)\]", body):
        assert list(ns[name].shape) == [int(s) for s in shape.split(",")], name
    assert ns["margin"].shape == ns["cam"].shape and ns["model"].training


def _check_own_callback(body, ns, values, tmp_path):
    assert_tags_written(comment_tags(body), "lightning_logs")


# A distinctive line of each README Python block -> how its result is checked. Every block must be listed.
CHECKS = {
    "logger=CSVLogger": _check_logger_block,
    'logger=False, default_root_dir="runs"': _check_logger_block,
    "MLFlowLogger(experiment_name": _check_logger_block,
    "WandbLogger(project=": _check_logger_block,
    "FilterCallback(layers=": _check_attaching,
    "tracker=MapTracker(": _check_tracker,
    "logits_fn=lambda model, x: model(x)[0]": _check_logits_fn,
    'relu_rule("guided")': _check_relu_rule,
    "integrated_gradients(m, x": _check_methods,
    "class LogitMargin": _check_own_callback,
}


def _block_ids() -> list[str]:
    return [f"line{line}" for line, _ in blocks("python")]


@pytest.mark.parametrize("index", range(len(blocks("python"))), ids=_block_ids())
def test_readme_python_block_runs(index, harness, monkeypatch):
    """The block as written, in a namespace holding only what its text leaves to the reader: ``L`` and the
    callback classes it names without importing (blocks continuing an earlier one), and for the blocks on "any
    model, x, labels y" a torchvision resnet18 with 32 px images. Blocks that build a Trainer without fitting it
    are fitted on tiny shapes; blocks that fit run with two batches per epoch (``_TinyTrainer``)."""
    import torchvision
    from lightning.pytorch.loggers import CSVLogger

    from lightning_viz.callbacks import CAMCallback, GradientCallback

    line, body = blocks("python")[index]
    (check,) = [fn for key, fn in CHECKS.items() if key in body] or [None]
    assert check is not None, f"README.md:{line}: a Python block without a check here; add it to CHECKS"
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    namespace = {
        "__name__": "readme_block",
        "L": lightning,
        "CSVLogger": CSVLogger,
        "CAMCallback": CAMCallback,
        "GradientCallback": GradientCallback,
        "model": model,
        "x": torch.randn(2, 3, 32, 32),
        "y": torch.tensor([0, 3]),
    }
    if "WandbLogger" in body:
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.setenv("WANDB_SILENT", "true")
    # classes defined in a block must be importable by name for checkpoints and DDP pickling
    module = types.ModuleType("readme_block")
    monkeypatch.setitem(sys.modules, "readme_block", module)
    namespace = module.__dict__ | namespace
    values = run_block(body, namespace)
    check(body, namespace, values, harness)


def test_every_readme_python_block_has_one_check():
    for line, body in blocks("python"):
        assert len([key for key in CHECKS if key in body]) == 1, f"README.md:{line}"
    assert len(blocks("python")) == len(CHECKS)


def test_readme_yaml_blocks_build_their_callbacks_through_lightning_cli(tmp_path, monkeypatch):
    """Each YAML block, as a LightningCLI config (a bare ``- class_path`` list is a ``trainer.callbacks`` list),
    builds the callbacks it names with the options it gives; a dotted ``logits_fn`` is imported and used."""
    import yaml

    from lightning_viz.cli import cli_main
    from lightning_viz.targets import resolve_logits_fn

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-viz"])
    heads = types.ModuleType("my_project.heads")
    heads.logits_of = lambda model, x: model(x)["cls"]
    monkeypatch.setitem(sys.modules, "my_project", types.ModuleType("my_project"))
    monkeypatch.setitem(sys.modules, "my_project.heads", heads)
    built = 0
    for line, body in blocks("yaml"):
        config = yaml.safe_load(body)
        if isinstance(config, list):
            config = {"trainer": {"callbacks": config}}
        path = tmp_path / f"block{line}.yaml"
        path.write_text(yaml.safe_dump(config))
        cli = cli_main(["--config", str(path)], run=False)
        names = [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]]
        ours = [c for c in cli.trainer.callbacks if type(c).__module__.startswith("lightning_viz.callbacks")]
        assert [type(c).__name__ for c in ours] == names, f"README.md:{line}"
        for callback, spec in zip(ours, config["trainer"]["callbacks"]):
            for option, value in (spec.get("init_args") or {}).items():
                if option == "logits_fn":
                    assert resolve_logits_fn(callback.logits_fn) is heads.logits_of
                    continue
                got = getattr(
                    callback, option if hasattr(callback, option) else option.rstrip("s")
                )  # FilterCallback.layer
                assert got == value or got == [value], (line, option, got, value)
        built += len(ours)
    assert built >= 3


def _accepted(cls) -> dict[str, inspect.Parameter]:
    """Init parameters of ``cls``, following ``**kwargs`` up the MRO (as LightningCLI does), nearest first."""
    params: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        sig = inspect.signature(klass.__init__).parameters
        for name, p in sig.items():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and name != "self":
                params.setdefault(name, p)
        if not any(p.kind == p.VAR_KEYWORD for p in sig.values()):
            break
    return params


def _same(default, text: str) -> bool:
    """Whether a README default (``16``, ``0.15``, ``None``, ``val``, ``on``) is the signature's ``default``."""
    text = text.strip().strip("`")
    words = {"None": None, "True": True, "False": False, "on": True, "off": False}
    if text in words:
        return default is words[text] or default == words[text]
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        try:
            return float(text) == default
        except ValueError:
            return False
    return default == text


def _table(header: str) -> list[list[str]]:
    """Cells of the rows of the README table whose header line starts with ``header``."""
    start = README.index(header)
    rows = []
    for line in README[start:].splitlines()[2:]:
        line = line.strip()
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_readme_option_tables_name_real_options_with_their_defaults():
    """The Common options, heatmap options, renamed options, tracker and Methods tables, the synthesis options
    paragraph and the built-in model/data signatures: every option they name is an init argument of the class
    they name it for, and every default they state is the signature's."""
    import lightning_viz.callbacks as cbs
    from lightning_viz import data
    from lightning_viz.callbacks.base import VisualizationCallback
    from lightning_viz.callbacks.maps import MapCallback
    from lightning_viz.models import ImageClassifier
    from lightning_viz.tracking import MapTracker

    checked = 0

    def check(cls, name: str, default: str | None = None) -> None:
        nonlocal checked
        params = _accepted(cls)
        assert name in params, f"README names option {name!r} of {cls.__name__}; its options: {sorted(params)}"
        if default is not None:
            assert _same(params[name].default, default), (cls.__name__, name, params[name].default, default)
        checked += 1

    for header, cls in (
        ("| Option | Default | Meaning |\n|---|---|---|\n| `every_n", VisualizationCallback),
        ("| Option | Default | Meaning |\n|---|---|---|\n| `normalize", MapCallback),
    ):
        for option, default, _ in _table(header):
            names, defaults = re.findall(r"`(\w+)`", option), re.findall(r"`([^`]+)`", default)
            assert len(names) == len(defaults), option
            for name, value in zip(names, defaults):
                check(cls, name, value)
    values = {"layer": "net.conv1", "batch_size": 4, "normalize": "per_filter", "target": "untargeted"}
    for callback, old, new in _table("| Callback | Old (deprecated) | New |"):
        for name in re.findall(r"`(\w+)`", callback):
            for option in re.findall(r"(?:^|, )`(\w+)`", old) + re.findall(r"`(\w+)`", new):
                check(getattr(cbs, name), option)
            for option, renamed in zip(re.findall(r"(?:^|, )`(\w+)`", old), re.findall(r"`(\w+)`", new)):
                with pytest.warns(DeprecationWarning, match=renamed):  # "accepted with a warning naming the new one"
                    required = {"TopPatchesCallback": {"layers": ["net.conv1"]}, "UnitCallback": {"channels": [0]}}
                    required = required.get(name, {})
                    getattr(cbs, name)(**{option: values[option]}, **required)
    for what, option, _ in _table("| What | Option (default) | Tags"):
        for name, number in re.findall(r"`(\w+)`=(\d[\d.]*)", what):  # `max_frames`=12 in the description
            check(MapTracker, name, number)
        # `drift` (on), `deletion_steps`=16, `display_px` (64; ...), `pointing_game` (`None` = ...): the defaults
        pattern = r"`(\w+)`(?:\s*\((on|off|`None`|\d[\d.]*)[;:) =]|\s*=\s*([\d.]+))?"
        for name, flag, number in re.findall(pattern, option.split(" (a hit")[0]):
            if name not in ("None", "True"):
                check(MapTracker, name, flag or number or None)
    for row in _table("| Callback | What it shows |"):
        path = re.match(r"`(\w+)\.(\w+)`", row[0])
        cls = getattr(cbs, path.group(2), None) or MapTracker
        if cls is MapTracker:
            continue
        for name, value in re.findall(r"`(\w+)`\s*=\s*(\d[\d.e-]*)(?! eps)", row[1]):
            check(cls, name, value)
        for name in re.findall(r"`(\w+)=", row[1]):
            check(cls, name)
        for name, value in re.findall(r"`(\w+)` \((\d[\d.e-]*)[,)]", row[1]):
            check(cls, name, value)
        for name, value in re.findall(r"`(\w+)` \(default `\[(\w+)\]`\)", row[1]):  # `methods` (default `[gradcam]`)
            check(cls, name)
            assert _accepted(cls)[name].default == [value], (cls.__name__, name)
    differ = re.search(r"\(defaults differ: ([^)]*)\)", README).group(1)  # of num_probes
    for family, value in re.findall(r"(\w[\w ]*?) (\d+)", differ):
        (cls,) = [c for c in cbs.CALLBACKS if c.method == family.strip().replace(" ", "_")]
        check(cls, "num_probes", value)
    start = README.index("share these options:")
    shared = README[start : start + re.search(r"They and\s+`AdversarialCallback`", README[start:]).start()]
    shared = re.sub(r"\([^()]*\)", "", shared)  # option values and remarks in parentheses
    for cls in (cbs.ClassModelCallback, cbs.UnitCallback, cbs.InversionCallback):
        for name in re.findall(r"`(\w+)`", shared):
            if not (cls is cbs.InversionCallback and name == "input_shape"):  # as the README says
                check(cls, name)
        for name, value in re.findall(r"`(\w+)` \((\d[\d.]*)\)", README[README.index("share these options:") :][:300]):
            check(cls, name, value)
    with pytest.raises(TypeError, match="input_shape"):  # "InversionCallback takes no input_shape"
        cbs.InversionCallback(input_shape=[3, 8, 8])
    for cls in (cbs.FilterCallback, cbs.ClassModelCallback, cbs.UnitCallback):  # "take no num_probes/probe_seed"
        for option in ("num_probes", "probe_seed"):
            with pytest.raises(TypeError, match=option):
                cls(**{option: 4})
    for cls in (cbs.ClassModelCallback, cbs.UnitCallback, cbs.InversionCallback, cbs.AdversarialCallback):
        check(cls, "display_px", "96")
    check(cbs.ActivationCallback, "display_px", "48")
    for cls in (ImageClassifier, data.ShapesDataModule, data.DigitsDataModule, data.ImageFolderDataModule):
        call = max(re.findall(rf"`(?:[\w.]+\.)?{cls.__name__}\(([^`]*)\)`", README), key=len)  # the full signature
        params = list(_accepted(cls))
        stated = ast.parse(f"f({call})").body[0].value
        assert [a.arg for a in stated.keywords] == params[len(stated.args) :], cls.__name__
        for keyword in stated.keywords:
            assert _accepted(cls)[keyword.arg].default == ast.literal_eval(keyword.value), (cls, keyword.arg)
        checked += 1
    assert checked >= 80


def _tiny_demo_and_other_layouts(root: str) -> tuple[set[str], str]:
    """The tags of the demo config (tiny, 2 epochs) and of a 1-epoch run of the other layouts and a named
    instance; returns ``(tags, demo log directory)``."""
    from helpers import tiny_trainer

    import lightning_viz.callbacks as cbs
    from lightning_viz.cli import cli_main

    demo = os.path.join(root, "demo")
    cli_main(
        [
            "fit",
            "--config",
            os.path.join(ROOT, "configs", "demo.yaml"),
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.logger.init_args.save_dir={demo}",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_train=32",
            "--data.init_args.num_val=16",
            "--data.init_args.image_size=16",
            "--model.width=4",
        ]
    )
    other = os.path.join(root, "other")
    conv3 = {"layers": ["net.conv3"], "methods": ["gradcam"], "num_probes": 2}
    callbacks = [
        cbs.ActivationCallback(num_probes=2),
        cbs.GradientCallback(  # signed maps: the sanity check's rank_corr_abs
            methods=["gradient"],
            reduce="sum",
            layout="per_probe",
            normalize="both",
            num_probes=2,
            tracker=MapTracker(filmstrip=False, drift=False, sanity_check=True),
        ),
        cbs.CAMCallback(layout="per_probe", normalize="both", **conv3),
        cbs.CAMCallback(name="x", **conv3),
        cbs.CAMCallback(name="y", layout="grid", **conv3),
        cbs.OcclusionCallback(layout="per_probe", num_probes=2),
        cbs.TopPatchesCallback(layers=["net.conv2"], num_units=2, k=2, num_probes=8),
        cbs.InversionCallback(layers="net.conv2", steps=2, num_probes=2),
        cbs.AdversarialCallback(steps=2, num_probes=2, min_flip_iterations=1),
    ]
    tiny_trainer(other, callbacks, max_epochs=1, limit_train_batches=1, limit_val_batches=1).fit(
        tiny_model(), datamodule=tiny_data()
    )
    tags: set[str] = set()
    for logdir in (demo, other):
        acc = read_events(logdir)
        tags |= {t for t in acc.Tags()["images"] + acc.Tags()["scalars"] if t.startswith("viz-")}
    return tags, demo


def _pattern(text: str, prefix: str = "") -> re.Pattern:
    """A README tag pattern (``<layer>``, ``<key>`` = two segments, ``{a,b}``, ``...``) as a regex."""
    out = re.escape(prefix + text)
    out = out.replace(re.escape("<key>"), "[^/]+/[^/]+")
    out = re.sub(r"<[^>]+>", "[^/]+", out.replace("\\<", "<").replace("\\>", ">"))
    out = re.sub(r"\\\{([^}]*)\\\}", lambda m: "(?:" + m.group(1).replace(",", "|") + ")", out)
    return re.compile(out.replace(re.escape("..."), ".+") + "$")


def _bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_readme_tags_are_the_tags_a_run_writes(tmp_path, monkeypatch, caplog):
    """The Methods table's and the tracker table's tag patterns, the 'Tags inside a group' table and the demo's
    card count: every pattern is written by the tiny demo or a run of the other layouts, and every ``viz-`` tag
    those runs write is one of the Methods table's patterns (or ``time_s``)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-viz"])
    caplog.set_level(logging.INFO, logger="lightning_viz")
    tags, demo = _tiny_demo_and_other_layouts(str(tmp_path))
    (example,) = re.findall(r"e\.g\.\n?\s*`(lightning-viz epoch [^`]+)`", README)  # the line at every epoch end
    shape = r"lightning-viz epoch \d+: \d+\.\d s \((\w+ \d+\.\d\d s, )*\w+ \d+\.\d\d s\)"
    assert re.fullmatch(shape, example.replace("...", "filters 0.01 s")), example
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-viz epoch 1:")]
    assert lines and all(re.fullmatch(shape, line) for line in lines), (shape, lines)
    plain = {re.sub(r"^(viz-cam)/[xy]/", r"\1/", t) for t in tags}  # the named instances' tags, name dropped

    methods = []
    for row in _table("| Callback | What it shows |"):
        for text in re.findall(r"`([^`]+)`", row[2]):
            if "/" in text and "=" not in text and " " not in text and "%2f" not in text and text != "/fixed":
                methods.append(_pattern(text, "viz-"))
        for text in re.findall(r"`([^`]+)` \(\+ `/fixed`", row[2]):  # the fixed-scale image of `normalize="both"`
            methods.append(_pattern(text + "/fixed", "viz-"))
    tracker = [
        _pattern(t, "viz-<family>/")
        for row in _table("| What | Option (default) | Tags")
        for t in re.findall(r"`([^`]+)`", row[2])
    ]
    for pattern in methods + tracker:
        assert any(pattern.match(t) for t in plain), f"README tag {pattern.pattern} is never written"
    for tag in sorted(plain):
        assert tag.endswith("/time_s") or any(p.match(tag) for p in methods), f"{tag} is not in the Methods table"
    for what, tag in _table("| What | Tag |"):
        for text in re.findall(r"`(viz-[^`]+)`", tag):
            assert text in plain, (what, text)
    assert "viz-cam/x/time_s" in tags and "viz-cam/y/gradcam/net.conv3/grid" in tags  # `name=` as stated
    prose = re.findall(r"`(viz-[^`]*/[^`]*)`", re.sub(r"```.*?```", "", README, flags=re.S))
    generic = [t for t in prose if "..." in t or "*" in t or "<name>" in t or "<method>" in t]
    assert len(prose) - len(generic) >= 15
    for text in sorted(set(prose) - set(generic)):
        pattern = _pattern(text)
        assert any(pattern.match(t) for t in tags | plain), f"README names {text}; not written"

    acc = read_events(demo)
    images = acc.Tags()["images"]
    cards, groups = map(int, re.search(r"The demo writes (\d+) image cards in (\d+) groups", README).groups())
    assert len(images) == cards and len({t.split("/")[0] for t in images}) == groups
    stated = re.findall(r"`(viz-\w+)`", README[README.index("- **Groups**") : README.index("- **Tags inside")])
    assert {t.split("/")[0] for t in tags} <= set(stated)
    (regex,) = {t for t in prose if ".*" in t}  # the Custom Scalars layout's regexes
    events = glob.glob(os.path.join(demo, "**", "events.out.tfevents.*"), recursive=True)
    assert any(regex.encode() in _bytes(f) for f in events), regex
    run_dir = os.path.dirname(glob.glob(os.path.join(demo, "**", "events.out.tfevents.*"), recursive=True)[0])
    assert os.path.exists(os.path.join(run_dir, "projector_config.pbtxt"))
    for name in ("tensors.tsv", "metadata.tsv", "sprite.png"):  # <epoch:05d>/viz-embeddings%2f<layer>/...
        assert os.path.exists(os.path.join(run_dir, "00000", "viz-embeddings%2fpenultimate", name)), name


def test_example_train_shapes_runs_and_writes_its_tags(harness):
    """``python examples/train_shapes.py`` as a user runs it (its Trainer limited to two batches per epoch)."""
    import runpy

    runpy.run_path(os.path.join(ROOT, "examples", "train_shapes.py"), run_name="__main__")
    acc = read_events(os.path.join("lightning_logs", "example"))
    assert [e.step for e in acc.Images("viz-filters/net.conv1/grid")] == [0, 1, 2]
    assert [e.step for e in acc.Images("viz-activations/net.relu3/p003")] == [0, 1, 2]


def test_example_make_gallery_writes_the_gallery(harness, monkeypatch):
    """``python examples/make_gallery.py --epochs 1 --out DIR`` writes every gallery PNG the README shows (the demo
    it runs made tiny by the test overrides appended to its command line)."""
    import runpy

    from PIL import Image

    import lightning_viz.cli as cli

    real = cli.cli_main
    tiny = ["--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--model.width=4"]
    tiny += ["--data.init_args.num_train=32", "--data.init_args.num_val=16", "--data.init_args.batch_size=8"]
    tiny += ["--data.init_args.image_size=16"]
    monkeypatch.setattr(cli, "cli_main", lambda args, **kw: real([*args, *tiny], **kw))
    out = harness / "gallery"
    monkeypatch.setattr(sys, "argv", ["make_gallery.py", "--epochs", "1", "--out", str(out)])
    namespace = runpy.run_path(os.path.join(ROOT, "examples", "make_gallery.py"), run_name="__main__")
    assert sorted(os.listdir(out)) == sorted(namespace["GALLERY"])
    for name in namespace["GALLERY"]:
        assert Image.open(out / name).size[0] > 16
    shown = set(re.findall(r"\]\((docs/gallery/[\w.]+)\)", README)) | set(
        re.findall(r"`(docs/gallery/[\w.]+)`", README)
    )
    assert shown and {os.path.basename(p) for p in shown} <= set(namespace["GALLERY"])
    assert all(os.path.exists(os.path.join(ROOT, p)) for p in shown)


def test_objectives_docstring_example_composes_as_stated():
    """``class_logit([0, 1]) + 0.1 * channel("conv2", [3, 3])`` (the objectives module's example) is the class
    logit plus a tenth of the channel's mean activation; ``-a``, ``a - b`` and ``sum([...])`` compose alike."""
    from helpers import TinyCNN

    import lightning_viz.methods.objectives as objectives
    from lightning_viz.capture import capture

    (example,) = re.findall(r"``(class_logit\(.*?)``", objectives.__doc__)
    objective = eval(example, vars(objectives))
    torch.manual_seed(0)
    model, x = TinyCNN(), torch.randn(2, 3, 8, 8)
    with torch.no_grad(), capture(model, objective.layers) as cap:
        logits = model(x)
    acts = {name: cap[name] for name in objective.layers}
    expected = logits[[0, 1], [0, 1]] + 0.1 * acts["conv2"][:, 3].mean((1, 2))
    torch.testing.assert_close(objective(logits, acts), expected)
    a, b = objectives.class_logit([0, 1]), objectives.channel("conv2", [3, 3])
    torch.testing.assert_close(sum([a, 0.1 * b])(logits, acts), expected)
    torch.testing.assert_close((a - b)(logits, acts), (-(b - a))(logits, acts))


def test_readme_inline_calls_name_real_arguments():
    """Calls written inline in the README text (``GradientCallback(reduce="sum")``, ``MapTracker(pointing_game=True)``,
    ``methods.gradient(..., rule="guided")``, ...) pass keywords the callee accepts; every function the README lists
    under "Also there" is in ``lightning_viz.methods``."""
    import lightning_viz
    import lightning_viz.methods as methods
    from lightning_viz import data, models, targets

    spaces = (lightning_viz, methods, data, models, targets)
    calls = 0
    for span in re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", README, flags=re.S)):
        for name, args in re.findall(r"(?<![\w.])(?:[\w.]*\.)?(\w+)\(([^()]*(?:\([^()]*\)[^()]*)*)\)", span):
            owner = next((getattr(s, name) for s in spaces if hasattr(s, name)), None)
            if owner is None or not callable(owner):
                continue
            params = _accepted(owner) if isinstance(owner, type) else dict(inspect.signature(owner).parameters)
            for keyword in re.findall(r"(?:^|[(,]\s*)(\w+)\s*=(?!=)", args):
                assert keyword in params, f"README `{span}`: {name} takes no {keyword!r}; takes {sorted(params)}"
            calls += 1
    assert calls >= 10
    also = README[README.index("Also there:") : README.index("## Writing your own callback")]
    listed = re.findall(r"`(\w+)`", also)
    assert len(listed) >= 20
    assert not [n for n in listed if not callable(getattr(methods, n, None))]


def _readme_commands() -> list[str]:
    """The README's ``lightning-viz fit`` commands that run the demo config on other data, or a model on an image
    folder (the others are run by tests/test_cli.py or need two processes)."""
    commands = [c.replace("\\\n", " ") for c in re.findall(r"lightning-viz fit (?:\\\n|[^`\n])*", README)]
    return [c for c in commands if "--data=" in c and "my_pkg" not in c]


@pytest.mark.parametrize(
    "command",
    _readme_commands(),
    ids=lambda c: "pretrained" if "weights" in c else re.search(r"--data=(\w+)", c).group(1),
)
def test_readme_commands_on_other_data_run(command, tmp_path, monkeypatch):
    """``--config configs/demo.yaml --data=DigitsDataModule ...`` ("every callback of the demo works on digits too"),
    the same on an image folder, and the pretrained-model command on an image folder: as written, with the
    placeholders filled (a folder of 4 classes x 4 PNGs), tiny overrides appended (two batches per epoch, small
    images, one epoch), and ``--model.weights=DEFAULT`` first checked to fail naming the file to place (no weights
    can be downloaded here), then left out."""
    import shlex

    from PIL import Image

    from lightning_viz.cli import cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["lightning-viz"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for c in range(4):
        os.makedirs(tmp_path / "images" / f"class{c}")
        for i in range(4):
            pixels = torch.randint(0, 256, (12, 12, 3), generator=torch.Generator().manual_seed(4 * c + i))
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(tmp_path / "images" / f"class{c}" / f"{i}.png")
    command = command.replace("path/to/images", "images").replace("my_images", "images")
    args = shlex.split(command.replace("<number of class folders>", "4").replace("=5", "=4"))[2:]  # lightning-viz fit
    args = [os.path.join(ROOT, a) if a.startswith("configs/") else a for a in args]
    tiny = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    tiny += ["--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", "--data.batch_size=8"]
    tiny += (
        ["--data.image_size=16", "--data.val_fraction=0.05"]
        if "DigitsDataModule" in command
        else ["--data.image_size=16", "--data.val_fraction=0.5"]
    )
    if "--model.weights=DEFAULT" in args:
        with pytest.raises(Exception, match=r"resnet18-f37072fd\.pth") as error:
            cli_main(["fit", *args, *tiny])
        assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in str(error.value)  # as the README says
        args.remove("--model.weights=DEFAULT")
    if "--config" in args:
        tiny += ["--model.width=4", "--trainer.logger.init_args.save_dir=logs"]
    cli = cli_main(["fit", *args, *tiny])
    assert cli.trainer.current_epoch == 1
    acc = read_events(".")
    families = {t.split("/")[0] for t in acc.Tags()["images"]}
    expected = 11 if "--config" in args else 2  # the demo's every family; CAM and gradients
    assert len(families) == expected, families


def test_readme_paths_and_dotted_names_exist():
    """Every repository file the README names (``tests/test_hardening.py``, ``lightning_viz/{probe,capture}.py``,
    ...) exists, and every dotted ``lightning_viz....`` name imports (module or attribute)."""
    import importlib

    paths = set()
    for path in re.findall(
        r"(?<![\w/.-])((?:\.ci|\.pre-commit|tests|benchmarks|configs|examples|docs|lightning_viz)"
        r"[\w./{},-]*[\w/}])",
        README,
    ):
        braces = re.search(r"\{([\w,]+)\}", path)
        options = braces.group(1).split(",") if braces else [""]
        paths |= {path.replace(braces.group(0), o) if braces else path for o in options}
    files = {p for p in paths if "/" in p and not p.startswith(("lightning_viz/epoch_", "lightning_viz/configs"))}
    assert len(files) >= 30
    assert not [p for p in sorted(files) if not os.path.exists(os.path.join(ROOT, p))]
    names = set(re.findall(r"\blightning_viz(?:\.\w+)+", README))
    assert len(names) >= 20
    for name in sorted(names):
        module, attr = name, None
        while True:
            try:
                obj = importlib.import_module(module)
                break
            except ModuleNotFoundError:
                module, _, last = module.rpartition(".")
                attr = last if attr is None else f"{last}.{attr}"
        for part in (attr or "").split(".") if attr else []:
            obj = getattr(obj, part)
        assert obj is not None, name
        # as typed after the import: a package attribute named like its module (lightning_viz.capture is the function
        # capture, lightning_viz.methods.occlusion the function occlusion) hides the module's other names
        obj = importlib.import_module("lightning_viz")
        for part in name.split(".")[1:]:
            assert hasattr(obj, part), f"{name}: {part!r} is not an attribute of {obj!r} (a function hides its module)"
            obj = getattr(obj, part)


def _resolves(ref: str, module: str) -> bool:
    import builtins
    import importlib

    package = module.rpartition(".")[0]
    for candidate in (f"{module}.{ref}", f"{package}.{ref}", f"lightning_viz.{ref}", ref):
        parts = candidate.strip(".").split(".")
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for part in parts[i:]:
                    obj = getattr(obj, part)
                return True
            except AttributeError:
                break
    return hasattr(builtins, ref)


def test_docstring_references_name_real_functions_modules_and_classes():
    """Every ``:func:``/``:mod:``/``:class:``/``:data:`` reference in the package's docstrings (the methods'
    "see :func:`x`" usage pointers) names something that exists: a renamed function leaves no stale pointer."""
    refs = 0
    for path in sorted(glob.glob(os.path.join(ROOT, "lightning_viz", "**", "*.py"), recursive=True)):
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
        with open(path) as f:
            source = f.read()
        for ref in re.findall(r":(?:func|mod|class|data|exc):`~?([\w.]+)`", source):
            assert _resolves(ref, module), f"{module}: :`{ref}` names nothing"
            refs += 1
    assert refs >= 100


def test_every_callback_docstring_cites_its_papers():
    """Each callback (and ``MapTracker``) names in its own docstring the papers the README's Methods table gives it,
    so ``help(CAMCallback)`` says where its method comes from."""
    from lightning_viz.callbacks import CALLBACKS
    from lightning_viz.tracking import MapTracker

    rows = {re.match(r"`\w+\.(\w+)`", row[0]).group(1): row[3] for row in _table("| Callback | What it shows |")}
    for cls in (*CALLBACKS, MapTracker):
        doc = " ".join(inspect.getdoc(cls).split())
        cited = re.findall(r"([A-Z][\w-]+)(?: et al\.| & [A-Z][\w-]+)?,? (1[89]\d\d|20\d\d)", rows[cls.__name__])
        assert cited, cls.__name__
        for author, year in cited:
            assert re.search(rf"{author}\b.{{0,40}}\b{year}", doc), (cls.__name__, author, year)


def _cli_help(cls, option: str) -> str:
    """The help text ``lightning-viz fit --trainer.callbacks.help <cls>`` prints for ``option`` (jsonargparse's
    reading of the docstrings, ``**kwargs`` followed into the bases)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(cls, "x")
    (action,) = [a for a in parser._actions if a.dest == f"x.{option}"]
    return " ".join((action.help or "").split())


def test_chunk_size_help_says_what_none_does_as_the_readme(monkeypatch):
    """README: ``chunk_size`` ``None`` is "as many as the memory budget holds for the gradient, CAM, embedding and
    top-patch callbacks, all at once for the others"; each callback's ``--trainer.callbacks.help`` says the same (the
    gradient and CAM help said "all at once" while their passes were sized by the memory budget)."""
    import lightning_viz.callbacks as cbs
    from lightning_viz.methods.shared_pass import pass_chunks

    (families,) = re.findall(r"as many as the memory\s+budget holds for the ([\w, -]+?) callbacks, all at once", README)
    names = {"gradient": "gradients", "CAM": "cam", "embedding": "embeddings", "top-patch": "top_patches"}
    budget = {names[f.strip()] for f in re.split(r",|\band\b", families) if f.strip()}
    assert budget == {"gradients", "cam", "embeddings", "top_patches"}
    checked = set()
    for cls in cbs.CALLBACKS:
        if "chunk_size" not in _accepted(cls):
            continue
        text = _cli_help(cls, "chunk_size")
        assert ("memory budget" in text) == (cls.method in budget), (cls.__name__, text)
        assert ("all at once" in text) == (cls.method not in budget), (cls.__name__, text)
        checked.add(cls.method)
    assert budget <= checked
    # and the gradient/CAM pass does size its chunks by the budget: a 1-image budget gives one image per chunk
    from helpers import TinyCNN

    import lightning_viz.methods.shared_pass as sp

    monkeypatch.setattr(sp, "images_per_forward", lambda model, x, grad=False: 1)
    assert len(pass_chunks(TinyCNN(), torch.zeros(3, 3, 8, 8), None)) == 3


def test_every_public_name_of_the_package_is_in_the_readme():
    """Each name of ``lightning_viz.__all__`` and ``lightning_viz.methods.__all__`` is named in the README, where a
    user looks for it (``GradientMapCallback``, ``get_layer``, ``LayerNotFoundError``, ``eval_mode``,
    ``resolve_target``, ``gradient_pass``, ``optimize_input``, ... were exported but named nowhere), and what it
    says of the helpers holds."""
    import torchvision

    import lightning_viz
    import lightning_viz.methods

    text = re.sub(r"```.*?```", "", README, flags=re.S)
    spans = re.findall(r"`([^`]+)`", text)
    names = [*lightning_viz.__all__, *lightning_viz.methods.__all__]  # the package and its pure methods
    missing = [n for n in names if not any(re.search(rf"\b{n}\b", span) for span in spans)]
    assert not missing, missing
    model = torchvision.models.resnet18(weights=None, num_classes=4)
    assert lightning_viz.get_layer(model, "layer4") is model.layer4
    with pytest.raises(lightning_viz.LayerNotFoundError, match="layer4"):  # lists the valid names
        lightning_viz.get_layer(model, "layer5")
    with lightning_viz.eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert all(m.training for m in model.modules())
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    torch.testing.assert_close(lightning_viz.resolve_target("predicted")(logits), torch.tensor([2.0, 3.0]))
    torch.testing.assert_close(lightning_viz.resolve_target(2)(logits), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(lightning_viz.resolve_target("label")(logits, torch.tensor([0, 0])), logits[:, 0])


def test_readme_benchmark_commands_parse_and_their_comments_state_the_defaults(monkeypatch):
    """Each ``python benchmarks/<script>.py ...`` line of the README's bash blocks parses with that script's own
    argument parser (stopped right after parsing: no benchmark runs), and the defaults its comment states
    (``resnet18, 64 px, 16 probes, 2 threads``; ``the demo, 2 epochs``) are the parser's."""
    import argparse
    import runpy
    import shlex

    class Parsed(Exception):
        pass

    seen = {}

    def stop(self, args=None, namespace=None):
        seen["args"] = argparse.ArgumentParser.parse_known_args(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    lines = [ln for _, body in blocks("bash") for ln in body.splitlines() if ln.startswith("python benchmarks/")]
    assert len(lines) >= 3
    for line in lines:
        command, _, comment = line.partition("#")
        argv = shlex.split(command)[1:]
        monkeypatch.setattr(sys, "argv", argv)
        seen.clear()
        with pytest.raises(Parsed):
            runpy.run_path(os.path.join(ROOT, argv[0]), run_name="__main__")
        args, unknown = seen["args"]
        assert not unknown, (line, unknown)
        stated = {
            "arch": re.search(r"\b(resnet\d+)\b", comment),
            "size": re.search(r"(\d+) px", comment),
            "batch": re.search(r"(\d+) probes", comment),
            "threads": re.search(r"(\d+) threads", comment),
            "epochs": re.search(r"(\d+) epochs", comment),
        }
        for name, found in stated.items():
            if found:
                assert str(getattr(args, name)) == found.group(1), (line, name, getattr(args, name))
        if "the demo" in comment:
            assert os.path.samefile(args.config, os.path.join(ROOT, "configs", "demo.yaml"))
