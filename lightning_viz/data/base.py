"""Plumbing shared by the built-in datamodules: a train and a val split, and their loaders."""

from __future__ import annotations

from typing import Optional

import lightning as L
from torch.utils.data import DataLoader, Dataset

__all__ = ["SplitDataModule"]


class SplitDataModule(L.LightningDataModule):
    """``train_set``/``val_set`` (built by the subclass in ``__init__`` or ``setup``) served in batches of
    ``batch_size`` with ``num_workers`` workers; the train loader shuffles. There is no held-out test split: the
    test and predict loaders serve the validation split (``lightning-viz test/predict --ckpt_path ...``)."""

    def __init__(self, batch_size: int, num_workers: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {batch_size}")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            ds,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None, f"{type(self).__name__}.setup('fit') must build train_set"
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        assert self.val_set is not None, f"{type(self).__name__}.setup('validate') must build val_set"
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
