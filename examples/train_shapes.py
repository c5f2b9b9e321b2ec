"""Train a small CNN on the built-in shapes and attach lightning-viz callbacks in plain Python.

python examples/train_shapes.py
tensorboard --logdir lightning_logs --samples_per_plugin images=1000
"""

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_viz.callbacks.activations import ActivationCallback
from lightning_viz.callbacks.filters import FilterCallback
from lightning_viz.data import ShapesDataModule
from lightning_viz.models import ImageClassifier


def main() -> None:
    L.seed_everything(0)
    data = ShapesDataModule(num_train=2000, num_val=400, image_size=32, batch_size=64)
    model = ImageClassifier(arch="small_cnn", num_classes=4, in_channels=3, lr=2e-3)
    callbacks = [
        FilterCallback(layers="net.conv1"),  # first-layer kernels, every epoch
        ActivationCallback(layers=["net.conv1", "net.relu3"], num_probes=4),  # feature maps of 4 probes
    ]
    trainer = L.Trainer(
        max_epochs=3,
        devices=1,
        logger=TensorBoardLogger("lightning_logs", name="example"),
        callbacks=callbacks,
        log_every_n_steps=10,
    )
    trainer.fit(model, datamodule=data)


if __name__ == "__main__":
    main()
