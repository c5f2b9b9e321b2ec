"""Real data pipelines: items that only the DataLoader's collate_fn turns into model inputs, image folders, wrapped
datasets (Subset, ConcatDataset, random_split) and the normalization of their transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import LitTiny, TinyCNN, read_events, tiny_trainer
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from lightning_viz import CAMCallback


class _Pictures(Dataset):
    """Items as a pipeline without a tensor transform gives them: PIL images of different sizes (``pil``), HWC uint8
    arrays in a dict (``numpy``, albumentations-style), or CHW tensors of different sizes with an index and a path
    (``sizes``)."""

    def __init__(self, kind: str, n: int = 9):
        rng = np.random.default_rng(0)
        self.kind = kind
        self.arrays = [rng.integers(0, 256, (6 + i % 3, 8, 3), dtype=np.uint8) for i in range(n)]
        if kind == "numpy":
            self.arrays = [a[:6] for a in self.arrays]  # one size: the collate only converts

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        a, y = self.arrays[i], i % 3
        if self.kind == "pil":
            return Image.fromarray(a), y
        if self.kind == "numpy":
            return {"image": a, "label": y}
        return torch.from_numpy(a).permute(2, 0, 1).float() / 255, y, i, f"/data/{i}.png"


def _to_chw(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a)).permute(2, 0, 1).float() / 255


def _collate(items):
    """What the users' collate does: convert each item to a [3, 6, 8] float tensor (resizing where needed)."""
    xs, ys = [], []
    for item in items:
        x, y = (item["image"], item["label"]) if isinstance(item, dict) else (item[0], item[1])
        x = x if isinstance(x, torch.Tensor) else _to_chw(x)
        xs.append(F.interpolate(x[None], size=(6, 8), mode="nearest")[0])
        ys.append(y)
    return torch.stack(xs), torch.tensor(ys)


@pytest.mark.parametrize("kind", ["pil", "numpy", "sizes"])
def test_probes_are_the_items_as_the_loaders_collate_fn_gives_them(tmp_path, kind):
    """PIL images, HWC numpy arrays and images of several sizes that the DataLoader's own collate_fn converts train
    fine; the probes are read through the same collate_fn (a batch of one), not from the raw items (which failed:
    'Could not infer dtype of Image', a [6, 8, 3] array read as 6 channels, 'different sizes')."""
    ds = _Pictures(kind)
    loader = DataLoader(ds, batch_size=3, collate_fn=_collate)
    cb = CAMCallback(layers=["net.conv2"], num_probes=4)
    trainer = tiny_trainer(str(tmp_path), [cb], max_epochs=1)
    trainer.fit(LitTiny(TinyCNN()), loader, loader)
    p = cb.probes
    idx = p.indices.tolist()
    expected_x, expected_y = _collate([ds[i] for i in idx])
    assert torch.equal(p.images, expected_x) and torch.equal(p.labels, expected_y)
    assert {f"viz-cam/panel/{i}" for i in p.ids} <= set(read_events(str(tmp_path)).Tags()["images"])
