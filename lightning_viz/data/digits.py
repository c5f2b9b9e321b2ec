"""Handwritten digits from scikit-learn (``load_digits``, bundled with the package: no download).

1797 grayscale 8x8 images of the digits 0-9 (Alpaydin & Kaynak, UCI "Optical Recognition of
Handwritten Digits"), scaled to [0, 1], upscaled bilinearly to ``image_size`` and normalized with the
training split's mean and standard deviation.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from .base import SplitDataModule

__all__ = ["DigitsDataModule", "LabeledTensors", "load_digit_images"]


class LabeledTensors(Dataset):
    """Images and labels held in memory; ``targets`` lets ``ProbeSet`` stratify without loading items."""

    def __init__(self, images: Tensor, labels: Tensor):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]


def load_digit_images(image_size: int = 16) -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``([N, 1, image_size, image_size] in [0, 1], [N] labels)``."""
    from sklearn.datasets import load_digits

    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 (the digits are 8x8); got {image_size}")
    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return x.clamp(0, 1), torch.as_tensor(d.target, dtype=torch.long)


class DigitsDataModule(SplitDataModule):
    """scikit-learn digits with a seeded train/val split; batches of ``(x[B, 1, S, S], y)``, 10 classes.

    ``mean``/``std`` (one value each, from the training split) are the normalization used; ``classes`` are
    the class names ``"0"`` .. ``"9"``.

    Args:
        image_size: height and width the 8 x 8 digits are upscaled to.
        val_fraction: share of the images held out for validation (seeded split).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seed of the train/val split.
    """

    num_classes = 10
    in_channels = 1
    classes = [str(d) for d in range(10)]

    def __init__(
        self, image_size: int = 16, val_fraction: float = 0.2, batch_size: int = 64, num_workers: int = 0, seed: int = 0
    ):
        super().__init__(batch_size, num_workers)
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be strictly between 0 and 1; got {val_fraction}")
        self.save_hyperparameters()
        self.image_size, self.val_fraction = image_size, val_fraction
        self.seed = seed
        x, y = load_digit_images(image_size)
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(len(y) * val_fraction))
        val_idx, train_idx = order[:n_val], order[n_val:]
        train_x = x[train_idx]
        mean, std = float(train_x.mean()), float(train_x.std())
        self.mean, self.std = (mean,), (std,)
        self.train_set = LabeledTensors((train_x - mean) / std, y[train_idx])
        self.val_set = LabeledTensors((x[val_idx] - mean) / std, y[val_idx])

    def setup(self, stage: Optional[str] = None) -> None:  # data is built in __init__ (1797 small images)
        pass
