"""Regenerate the README gallery (``docs/gallery/*.png``) from a real demo run.

Runs ``configs/demo.yaml`` for a few epochs in a temporary folder, reads the TensorBoard event file back
and saves the latest image of a few tags (a CAM panel, a gradient panel, a CAM filmstrip, ...)::

    python examples/make_gallery.py              # 3 epochs, writes docs/gallery/
    python examples/make_gallery.py --epochs 2 --out /tmp/gallery
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile

from PIL import Image

#: gallery file name -> TensorBoard tag of the demo run (the latest epoch is saved)
GALLERY = {
    "cam_panel.png": "viz-cam/panel/p001",
    "gradients_panel.png": "viz-gradients/panel/p001",
    "cam_filmstrip.png": "viz-cam/filmstrip/p001",
    "top_patches.png": "viz-top_patches/net.conv2/grid",
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "gallery"))
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "demo.yaml"))
    args = parser.parse_args(argv)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightning_viz.cli import cli_main

    with tempfile.TemporaryDirectory() as tmp:
        cli_main(
            [
                "fit",
                "--config",
                os.path.abspath(args.config),
                f"--trainer.max_epochs={args.epochs}",
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_checkpointing=false",
                f"--trainer.logger.init_args.save_dir={tmp}",
            ]
        )
        run = next(d for d, _, files in os.walk(tmp) if any(f.startswith("events.") for f in files))
        acc = EventAccumulator(run, size_guidance={"images": 0})
        acc.Reload()
        os.makedirs(args.out, exist_ok=True)
        for name, tag in GALLERY.items():
            event = acc.Images(tag)[-1]
            # a 256-color palette keeps the committed PNGs small
            Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB").quantize(colors=256).save(
                os.path.join(args.out, name), optimize=True
            )
            print(f"{os.path.join(args.out, name)}: {tag} at epoch {event.step} ({event.width}x{event.height})")


if __name__ == "__main__":
    main()
