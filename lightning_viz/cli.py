"""``lightning-viz`` command line: LightningCLI over :class:`ImageClassifier` and any LightningDataModule.

Examples::

    lightning-viz fit --config configs/demo.yaml
    lightning-viz fit --config configs/demo.yaml --trainer.max_epochs=5 --model.arch=resnet18
    lightning-viz fit --model.num_classes=10 --model.in_channels=1 --data=DigitsDataModule

Callbacks are added under ``trainer.callbacks`` (``class_path`` + ``init_args``) in the YAML config.
"""

from __future__ import annotations

from typing import Optional

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

# Imported so that jsonargparse knows the built-in data modules by their short class names.
from . import data as _data  # noqa: F401
from .models import ImageClassifier

__all__ = ["main", "cli_main"]


def cli_main(args: Optional[list[str]] = None, run: bool = True) -> LightningCLI:
    """Build (and with ``run``, run) the CLI on ``args`` (default ``sys.argv[1:]``); returns the ``LightningCLI``."""
    return LightningCLI(
        ImageClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: Optional[list[str]] = None) -> None:
    """Console-script entry point (``lightning-viz``); returns nothing so the exit status is 0 on success."""
    cli_main(args)


if __name__ == "__main__":  # pragma: no cover
    main()
