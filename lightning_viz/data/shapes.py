"""Procedural colored shapes with ground-truth masks: a dataset that needs no download.

Each image shows one shape (circle, square, triangle or cross; the class) of a random color,
position and size on a dark, noisy background of another random color. Every item is drawn from
its own ``torch.Generator`` seeded from ``(seed, index)``, so item ``i`` is the same on every call,
in every worker and on every DDP rank, and the global RNG is never touched. The mask marks the
shape's pixels, which lets attribution maps be checked against where the object really is.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .base import SplitDataModule

__all__ = ["SHAPE_NAMES", "SHAPES_MEAN", "SHAPES_STD", "ShapesDataset", "ShapesDataModule", "draw_shape"]

SHAPE_NAMES = ("circle", "square", "triangle", "cross")

#: Per-channel statistics of the raw [0, 1] images (measured over 4096 items at 32 px, channels pooled: the
#: generator treats R, G, B alike). Items are normalized with them.
SHAPES_MEAN = (0.279, 0.279, 0.279)
SHAPES_STD = (0.274, 0.274, 0.274)

_SEED_STRIDE = 1_000_003  # a prime larger than any dataset size we use: (seed, index) -> distinct seeds


def draw_shape(kind: int, size: int, cx: float, cy: float, r: float) -> Tensor:
    """Binary mask ``[size, size]`` (float, 0/1) of shape ``kind`` centred at ``(cx, cy)``
    with radius ``r`` (pixels)."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = (xx - cx).abs(), yy - cy
    if kind == 0:  # circle
        inside = dx**2 + dy**2 <= r**2
    elif kind == 1:  # square (same area as the circle would be too big; side 1.6 r)
        inside = (dx <= 0.8 * r) & (dy.abs() <= 0.8 * r)
    elif kind == 2:  # triangle pointing up, apex at cy - r, base at cy + r
        inside = (dy >= -r) & (dy <= r) & (dx <= (dy + r) / 2)
    elif kind == 3:  # plus-shaped cross with arms of width 2r/3
        arm = r / 3
        inside = ((dx <= arm) & (dy.abs() <= r)) | ((dy.abs() <= arm) & (dx <= r))
    else:
        raise ValueError(f"unknown shape kind {kind}; allowed 0..{len(SHAPE_NAMES) - 1} ({', '.join(SHAPE_NAMES)})")
    return inside.float()


class ShapesDataset(Dataset):
    """``num`` procedural shape images; item ``i`` is ``(image[3, H, W] normalized, label, mask[H, W])``.

    Labels cycle ``i % num_classes`` (exactly balanced); everything else about the item (position,
    size, colors, noise) comes from a generator seeded with ``(seed, i)``.

    Args:
        num: number of items.
        image_size: height and width in pixels (>= 8).
        num_classes: how many of :data:`SHAPE_NAMES` to use (1..4).
        seed: dataset seed; different seeds give different images for the same index.
        noise: standard deviation of the per-pixel background/shape noise (on the [0, 1] scale).
        normalize: subtract :data:`SHAPES_MEAN` and divide by :data:`SHAPES_STD`.
    """

    mean = SHAPES_MEAN
    std = SHAPES_STD

    def __init__(
        self,
        num: int = 1000,
        image_size: int = 32,
        num_classes: int = 4,
        seed: int = 0,
        noise: float = 0.06,
        normalize: bool = True,
    ):
        if not 1 <= num_classes <= len(SHAPE_NAMES):
            raise ValueError(
                f"num_classes must be between 1 and {len(SHAPE_NAMES)} ({', '.join(SHAPE_NAMES)}); got {num_classes}"
            )
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 pixels; got {image_size}")
        if num < 0:
            raise ValueError(f"num must be >= 0; got {num}")
        self.num = num
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.noise = noise
        self.normalize = normalize
        self.classes = list(SHAPE_NAMES[:num_classes])

    def __len__(self) -> int:
        return self.num

    @property
    def targets(self) -> list[int]:
        """All labels without drawing any image (used by ``ProbeSet`` for class-stratified picks)."""
        return [i % self.num_classes for i in range(self.num)]

    def generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * _SEED_STRIDE + index)

    def raw(self, index: int) -> tuple[Tensor, int, Tensor]:
        """``(image[3, H, W] in [0, 1], label, mask[H, W])`` before normalization; pixels are multiples of 1/255."""
        if not 0 <= index < self.num:
            raise IndexError(f"index {index} out of range for {self.num} shapes")
        g = self.generator(index)
        s = self.image_size
        label = index % self.num_classes

        def u(lo: float, hi: float, n: int = 1) -> Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=g)

        r = float(u(0.22 * s, 0.36 * s))
        cx, cy = (float(v) for v in u(r + 1, s - r - 1, 2))
        mask = draw_shape(label, s, cx, cy, r)
        background = u(0.0, 0.3, 3)
        # A bright color: every channel in [0.35, 1], one random channel pushed to >= 0.8.
        color = u(0.35, 1.0, 3)
        color[int(torch.randint(3, (1,), generator=g))] = float(u(0.8, 1.0))
        canvas = background.view(3, 1, 1) + (color - background).view(3, 1, 1) * mask
        canvas = canvas + self.noise * torch.randn(3, s, s, generator=g)
        # 8-bit pixels, like decoded image files: normalized images keep exactly what an 8-bit file would give.
        return (canvas.clamp(0, 1) * 255).round() / 255, label, mask

    def __getitem__(self, index: int) -> tuple[Tensor, int, Tensor]:
        if index < 0:
            index += self.num
        img, label, mask = self.raw(index)
        if self.normalize:
            mean = torch.tensor(self.mean).view(3, 1, 1)
            std = torch.tensor(self.std).view(3, 1, 1)
            img = (img - mean) / std  # float32, in ToTensor + Normalize order (the probe bank stores it as uint8)
        return img, label, mask


class ShapesDataModule(SplitDataModule):
    """Train/val :class:`ShapesDataset` splits (disjoint seeds), batches of ``(x, y, mask)``.

    ``mean``/``std`` are the normalization used, so probe images can be shown un-normalized.

    Args:
        num_train: training images.
        num_val: validation images.
        image_size: height and width in pixels (>= 8).
        num_classes: how many of :data:`SHAPE_NAMES` to use (1..4).
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: dataset seed (the validation split draws from other seeds than the training split).
        noise: standard deviation of the per-pixel background/shape noise (on the [0, 1] scale).
    """

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 400,
        image_size: int = 32,
        num_classes: int = 4,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        noise: float = 0.06,
    ):
        super().__init__(batch_size, num_workers)
        ShapesDataset(0, image_size=image_size, num_classes=num_classes)  # validates the options now, not at setup
        self.save_hyperparameters()
        self.num_train, self.num_val = num_train, num_val
        self.image_size, self.num_classes = image_size, num_classes
        self.seed, self.noise = seed, noise
        self.mean = tuple(SHAPES_MEAN)
        self.std = tuple(SHAPES_STD)
        self.in_channels = 3
        self.classes = list(SHAPE_NAMES[:num_classes])

    def setup(self, stage: Optional[str] = None) -> None:
        size, k, noise = self.image_size, self.num_classes, self.noise
        # Seeds 2*seed and 2*seed+1: the two splits never share an item.
        self.train_set = ShapesDataset(self.num_train, image_size=size, num_classes=k, seed=2 * self.seed, noise=noise)
        self.val_set = ShapesDataset(self.num_val, image_size=size, num_classes=k, seed=2 * self.seed + 1, noise=noise)


def _measure_stats(num: int = 4096, image_size: int = 32) -> tuple[list[float], list[float]]:
    """Recompute :data:`SHAPES_MEAN` / :data:`SHAPES_STD` (kept for maintainers)."""
    ds = ShapesDataset(num, image_size=image_size, normalize=False)
    x = torch.stack([ds.raw(i)[0] for i in range(num)])
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


if __name__ == "__main__":  # pragma: no cover
    m, s = _measure_stats()
    print("mean", [round(v, 4) for v in m], "std", [round(v, 4) for v in s])
