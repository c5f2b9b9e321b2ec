"""The wheel built from the repository: configs, py.typed and the license inside; the demo runs from it, elsewhere."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from helpers import image_steps, read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """Build the wheel from a copy of the sources (the checkout stays clean), without network."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    for name in ("lightning_viz", "configs"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        env={**os.environ, "PIP_NO_INDEX": "1"},
    )
    (whl,) = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl")]
    return whl


def test_wheel_carries_configs_typing_marker_license_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    for cfg in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        assert f"lightning_viz/configs/{cfg}" in names
    assert "lightning_viz/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    packages = {
        os.path.relpath(d, ROOT).replace(os.sep, "/")
        for d, _, fs in os.walk(os.path.join(ROOT, "lightning_viz"))
        if "__init__.py" in fs
    }
    assert {p + "/__init__.py" for p in packages} <= names  # every subpackage is listed in pyproject.toml
    assert "License-Expression: MIT" in meta and "Classifier: Typing :: Typed" in meta
    assert "lightning-viz = lightning_viz.cli:main" in entry_points


def test_demo_config_by_name_from_the_unpacked_wheel_outside_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    version = subprocess.run(
        [sys.executable, "-m", "lightning_viz.cli", "--version"],
        cwd=run,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert version.stdout.strip() == "lightning-viz 0.1.0"
    args = [
        "fit",
        "--config",
        "demo",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        "--trainer.accelerator=cpu",
        "--data.init_args.batch_size=8",
        "--data.init_args.num_train=16",
        "--data.init_args.num_val=16",
        "--data.init_args.image_size=16",
        "--trainer.callbacks=lightning_viz.callbacks.filters.FilterCallback",
    ]
    code = (
        "import lightning_viz, sys; from lightning_viz.cli import main; "
        "print(lightning_viz.__file__); main(sys.argv[1:])"
    )
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=run, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(site))  # the unpacked wheel, not the checkout
    acc = read_events(str(run / "lightning_logs"))
    assert image_steps(acc, "viz-filters/net.conv1/grid") == [0]
