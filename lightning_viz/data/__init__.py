"""Built-in datasets that need no download, as LightningDataModules.

* :class:`ShapesDataModule` / :class:`ShapesDataset`: procedural colored shapes with ground-truth masks.
* :class:`DigitsDataModule`: scikit-learn's bundled 8x8 handwritten digits, upscaled.
* :class:`ImageFolderDataModule`: your own images, one folder per class.
"""

from .digits import DigitsDataModule
from .folder import ImageFolderDataModule
from .shapes import ShapesDataModule, ShapesDataset

__all__ = ["ShapesDataModule", "ShapesDataset", "DigitsDataModule", "ImageFolderDataModule"]
