"""Your own images: one sub-folder per class, read with torchvision's ``ImageFolder``.

Layouts::

    root/<class>/<image>.png                 split into train/val by a seeded permutation
    root/train/<class>/...  root/val/<class>/...   used as given
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional, cast

import torch
from torch.utils.data import Subset

from .base import SplitDataModule

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

__all__ = ["ImageFolderDataModule", "IMAGENET_MEAN", "IMAGENET_STD", "load_rgb"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _LabeledSubset(Subset):
    """A ``Subset`` that keeps ``targets`` (so probes are picked by class without decoding every image)."""

    @property
    def targets(self) -> list[int]:
        base = cast("ImageFolder", self.dataset).targets  # built over an ImageFolder by _build
        return [base[i] for i in self.indices]


def load_rgb(path: str):
    """The image file at ``path`` as an 8-bit RGB PIL image. 16-bit grayscale files (PNG ``I;16``, ``I``) are scaled
    to 8 bits (``v / 257``): PIL's own ``convert("RGB")``, torchvision's loader, clips them to 255 (white)."""
    import numpy as np
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
            v = np.asarray(img, dtype=np.float64)
            return Image.fromarray(np.clip(np.rint(v / 257), 0, 255).astype(np.uint8)).convert("RGB")
        return img.convert("RGB")


def _image_folder(path: str, transform) -> ImageFolder:
    """``ImageFolder(path)`` with errors that name the path and say what layout is expected."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
        raise FileNotFoundError(
            f"ImageFolderDataModule: image folder {path!r} {what}. "
            "Expected root/<class_name>/<image files> (or root/train/... and root/val/...)."
        )
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise FileNotFoundError(
            f"ImageFolderDataModule: {path!r} has no class sub-folders. "
            "Expected root/<class_name>/<image files>, one sub-folder per class."
        )
    try:
        return ImageFolder(path, transform=transform, loader=load_rgb)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"ImageFolderDataModule: no images in the class folders of {path!r} "
            f"(classes: {', '.join(classes)}). "
            f"Allowed extensions: {', '.join(IMG_EXTENSIONS)}. ({exc})"
        ) from exc


class ImageFolderDataModule(SplitDataModule):
    """Images from ``root`` resized to ``image_size`` x ``image_size``, RGB, normalized with ``mean``/``std``.

    Args:
        root: folder with one sub-folder per class, or with ``train/`` and ``val/`` folders laid out so.
        image_size: side of the square the images are resized to.
        val_fraction: share of the images held out for validation when there is no ``val/`` folder.
        batch_size: images per batch.
        num_workers: DataLoader worker processes.
        seed: seed of the train/val split.
        mean: per-channel normalization mean (default: the ImageNet statistics).
        std: per-channel normalization standard deviation (default: the ImageNet statistics).
    """

    in_channels = 3

    def __init__(
        self,
        root: str,
        image_size: int = 64,
        val_fraction: float = 0.2,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
    ):
        super().__init__(batch_size, num_workers)
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
        for name, v in (("mean", mean), ("std", std)):
            if v is not None and len(v) != 3:
                raise ValueError(f"{name} must have 3 values (R, G, B); got {list(v)}")
        self.save_hyperparameters()
        self.root, self.image_size, self.val_fraction = root, image_size, val_fraction
        self.seed = seed
        self.mean = tuple(mean) if mean is not None else IMAGENET_MEAN
        self.std = tuple(std) if std is not None else IMAGENET_STD
        self._build()  # fail at construction (with the path in the message), not mid-training

    def _build(self) -> None:
        from torchvision import transforms

        tf = transforms.Compose(
            [
                transforms.Resize((self.image_size, self.image_size)),
                transforms.ToTensor(),
                transforms.Normalize(self.mean, self.std),
            ]
        )
        train_dir, val_dir = os.path.join(self.root, "train"), os.path.join(self.root, "val")
        if os.path.isdir(train_dir) and os.path.isdir(val_dir):
            train, val = _image_folder(train_dir, tf), _image_folder(val_dir, tf)
            if train.classes != val.classes:
                raise ValueError(
                    f"ImageFolderDataModule: {train_dir!r} and {val_dir!r} have different class folders: "
                    f"{train.classes} vs {val.classes}"
                )
            self.train_set, self.val_set = train, val
        elif os.path.isdir(train_dir) or os.path.isdir(val_dir):  # else 'train' (or 'val') would become a class
            have, miss = ("train", "val") if os.path.isdir(train_dir) else ("val", "train")
            raise ValueError(
                f"ImageFolderDataModule: {self.root!r} has {have!r} but no {miss!r} folder. Expected "
                "root/train/<class>/... and root/val/<class>/..., or root/<class>/... (split by val_fraction)."
            )
        else:
            full = _image_folder(self.root, tf)
            order = torch.randperm(len(full), generator=torch.Generator().manual_seed(self.seed)).tolist()
            n_val = round(len(full) * self.val_fraction)
            if self.val_fraction > 0 and len(full) > 1:
                n_val = min(max(n_val, 1), len(full) - 1)
            self.train_set = _LabeledSubset(full, sorted(order[n_val:]))
            self.val_set = _LabeledSubset(full, sorted(order[:n_val]))
            train = full
        self.classes: list[str] = list(train.classes)
        self.num_classes = len(self.classes)
