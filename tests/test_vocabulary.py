"""One vocabulary across callbacks: ``layers`` (one name or a list), ``chunk_size``, distinct names for distinct
meanings, deprecated aliases that still work (with a DeprecationWarning naming the new option), and each callback
exposing only the options it uses (as LightningCLI shows them)."""

from __future__ import annotations

import inspect
import sys
import warnings

import pytest
import torch
from helpers import LitTiny, TinyCNN, image_steps, read_events, tiny_loaders, tiny_trainer

from lightning_viz.callbacks import (
    CALLBACKS,
    ActivationCallback,
    AdversarialCallback,
    CAMCallback,
    ClassModelCallback,
    EmbeddingCallback,
    FilterCallback,
    InversionCallback,
    TopPatchesCallback,
    UnitCallback,
)

#: (callback, old option, value, new attribute, expected value): every rename and its deprecated alias
RENAMES = [
    (FilterCallback, "layer", "net.conv2", "layer", "net.conv2"),
    (FilterCallback, "normalize", "global", "scale", "global"),
    (EmbeddingCallback, "layer", "net.conv2", "layer", "net.conv2"),
    (EmbeddingCallback, "batch_size", 7, "chunk_size", 7),
    (TopPatchesCallback, "batch_size", 7, "chunk_size", 7),
    (UnitCallback, "layer", "net.conv2", "layer", "net.conv2"),
    (InversionCallback, "layer", "net.conv2", "layer", "net.conv2"),
    (AdversarialCallback, "target", "next_class", "mode", "next_class"),
]
REQUIRED = {UnitCallback: {"channels": [0]}, TopPatchesCallback: {"layers": "net.conv2"}}
NEW_NAME = {"layer": "layers", "normalize": "scale", "batch_size": "chunk_size", "target": "mode"}


@pytest.mark.parametrize("cls,old,value,attr,expected", RENAMES, ids=[f"{r[0].__name__}.{r[1]}" for r in RENAMES])
def test_deprecated_alias_still_works_and_names_the_new_option(cls, old, value, attr, expected):
    with pytest.warns(DeprecationWarning, match=f"{cls.__name__}: option '{old}' is deprecated.*use '{NEW_NAME[old]}'"):
        cb = cls(**{old: value}, **REQUIRED.get(cls, {}))
    assert getattr(cb, attr) == expected
    new = cls(**{NEW_NAME[old]: value}, **REQUIRED.get(cls, {}))
    assert getattr(new, attr) == expected and new.state_key == cb.state_key  # same callback, same checkpoint key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        other = {"layer": "net.conv1", "normalize": "per_filter", "batch_size": 3, "target": "untargeted"}[old]
        if other != inspect.signature(cls).parameters[NEW_NAME[old]].default:
            with pytest.raises(ValueError, match=f"both {NEW_NAME[old]}=.* and its deprecated alias {old}="):
                cls(**{old: value, NEW_NAME[old]: other}, **REQUIRED.get(cls, {}))


def test_deprecations_are_shown_by_default_outside_main():
    """Plain DeprecationWarnings are hidden unless raised in ``__main__``; LightningCLI builds the callbacks."""
    import subprocess

    code = (
        "from lightning_viz.cli import cli_main; cli_main(['--trainer.logger=false', "
        "'--trainer.callbacks+=FilterCallback', '--trainer.callbacks.layer=net.conv1'], run=False)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "VizDeprecationWarning: FilterCallback: option 'layer' is deprecated" in proc.stderr


def test_layers_takes_one_name_or_a_list_everywhere():
    for cls in CALLBACKS:
        params = inspect.signature(cls).parameters
        if "layers" in params or "layer" in params:
            assert "layers" in params, f"{cls.__name__} must call its layer option 'layers'"
    assert ActivationCallback(layers="net.conv1").layers == ["net.conv1"]
    assert CAMCallback(layers="net.conv1").layer_names == ["net.conv1"]
    assert TopPatchesCallback(layers="net.conv1").layers == ["net.conv1"]
    assert FilterCallback(layers=["net.conv1"]).layer == "net.conv1"  # a one-element list is fine
    assert UnitCallback("net.conv2", [0]).layer == "net.conv2"  # the first positional argument is still the layer
    with pytest.raises(ValueError, match="FilterCallback shows one layer per instance; got layers=.*'a', 'b'"):
        FilterCallback(layers=["a", "b"])
    with pytest.raises(ValueError, match="CAMCallback: layers must name at least one layer"):
        CAMCallback(layers=[])
    with pytest.raises(ValueError, match="UnitCallback needs layers"):
        UnitCallback(channels=[0])
    with pytest.raises(ValueError, match="InversionCallback needs layers"):
        InversionCallback()


def test_chunk_size_everywhere_and_no_batch_size_option():
    for cls in CALLBACKS:
        params = inspect.signature(cls).parameters
        if "batch_size" in params:  # only as a deprecated alias next to chunk_size
            assert "chunk_size" in params and params["batch_size"].default is None, cls.__name__
    assert TopPatchesCallback(layers="x", chunk_size=None).chunk_size is None
    assert EmbeddingCallback().chunk_size is None and TopPatchesCallback(layers="x").chunk_size is None  # budget


def test_unused_probe_options_are_not_exposed():
    from jsonargparse import ArgumentParser

    def options(cls):
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "cb")
        return set(parser.get_defaults()["cb"].keys())

    for cls in (FilterCallback, ClassModelCallback, UnitCallback):
        shown = options(cls)
        assert not shown & {"num_probes", "probe_seed"}, cls.__name__
        assert {"every_n_epochs", "probe_source", "probes"} <= shown  # one image gives the shape / value range
        with pytest.raises(TypeError, match=f"{cls.__name__} takes no num_probes"):
            cls(num_probes=4, **REQUIRED.get(cls, {}))
    assert "input_shape" not in options(InversionCallback)
    assert {"num_probes", "probe_seed"} <= options(InversionCallback)
    assert (
        "target" not in options(AdversarialCallback)
        or inspect.signature(AdversarialCallback).parameters["target"].default is None
    )  # only the deprecated alias
    assert "scale" in options(FilterCallback) and "mode" in options(AdversarialCallback)


def test_shape_only_callbacks_pick_one_probe_image(tmp_path):
    linear = LitTiny(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)))
    filters = FilterCallback(kind="linear", layers="net.1")
    tiny_trainer(str(tmp_path / "a"), [filters], max_epochs=1).fit(linear, *tiny_loaders(n=12))
    classes = ClassModelCallback(steps=2)
    tiny_trainer(str(tmp_path / "b"), [classes], max_epochs=1).fit(LitTiny(TinyCNN(width=2)), *tiny_loaders(n=12))
    assert len(filters.probes) == 1 and len(classes.probes) == 1  # was num_probes=16 images read for one shape
    assert image_steps(read_events(str(tmp_path / "b")), "viz-class_model/grid") == [0]


def test_an_old_config_still_runs_through_the_cli(tmp_path, monkeypatch):
    """A config written before the renames (layer:, normalize: of FilterCallback, target: of AdversarialCallback)."""
    from lightning_viz.cli import cli_main

    monkeypatch.setattr(sys, "argv", ["lightning-viz"])
    cfg = tmp_path / "old.yaml"
    cfg.write_text("""
trainer:
  logger: false
  callbacks:
    - class_path: lightning_viz.callbacks.filters.FilterCallback
      init_args: {layer: net.conv2, normalize: global}
    - class_path: lightning_viz.callbacks.synthesis.AdversarialCallback
      init_args: {target: next_class, epsilon: 0.1}
    - class_path: lightning_viz.callbacks.synthesis.UnitCallback
      init_args: {layer: net.conv3, channels: [0]}
model: {width: 4}
""")
    with pytest.warns(DeprecationWarning) as record:
        cli = cli_main(["--config", str(cfg)], run=False)
    assert {str(w.message).split(":")[0] for w in record} >= {"FilterCallback", "AdversarialCallback", "UnitCallback"}
    f, a, u = [
        cb for cb in cli.trainer.callbacks if isinstance(cb, (FilterCallback, AdversarialCallback, UnitCallback))
    ]
    assert (f.layer, f.scale, a.mode, u.layer) == ("net.conv2", "global", "next_class", "net.conv3")
