"""The documented TensorBoard command really serves every epoch's images (a real server on loopback)."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from helpers import LitTiny, tiny_loaders, tiny_trainer

from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.logging import TENSORBOARD_SAMPLES_FLAG, tensorboard_command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def _served_steps(logdir: str, flags: list[str], tag: str, timeout_s: float = 60.0) -> list[int]:
    """Start TensorBoard on a free loopback port; return the steps its images API serves for ``tag``."""
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "tensorboard.main",
        "--logdir",
        logdir,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *flags,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}/data"
    deadline = time.monotonic() + timeout_s
    try:
        while True:  # until the server listens and has loaded the run's image tags
            try:
                tags = _get_json(f"{base}/plugin/images/tags")
                run = next((r for r, t in tags.items() if tag in t), None)
                if run is not None:
                    query = urllib.parse.urlencode({"run": run, "tag": tag, "sample": 0})
                    return [d["step"] for d in _get_json(f"{base}/plugin/images/images?{query}")]
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"TensorBoard did not list {tag!r} within {timeout_s} s")
            time.sleep(0.3)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_documented_flag_serves_every_epoch_and_zero_serves_none(tmp_path):
    epochs = 12  # more than TensorBoard's default sample of 10 images per tag
    tiny_trainer(str(tmp_path), [GradientCallback(num_probes=1)], max_epochs=epochs).fit(LitTiny(), *tiny_loaders(n=8))
    assert tensorboard_command("lightning_logs") == f"tensorboard --logdir lightning_logs {TENSORBOARD_SAMPLES_FLAG}"
    tag = "viz-gradients/panel/p000"
    assert _served_steps(str(tmp_path), shlex.split(TENSORBOARD_SAMPLES_FLAG), tag) == list(range(epochs))
    assert _served_steps(str(tmp_path), ["--samples_per_plugin", "images=0"], tag) == []  # what the README warns of
