"""ProbeSet: the fixed images every visualization is computed on, epoch after epoch.

Picked once, seeded and class-stratified, straight from a dataset by index (not through a
dataloader, whose sampler differs per rank under DDP), so every rank and every epoch sees the same
probes. Kept on CPU; saved in checkpoints so a resumed run uses the same probes.

Batches may be ``(x, y)``, ``(x, y, mask)``, ``x`` alone, or a dict with keys ``image``/``x``/``input``,
``label``/``y``/``target`` and optional ``mask``.
"""

from __future__ import annotations

import functools
import random
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .logging import indexed
from .targets import invalid_classes

__all__ = [
    "ProbeSet",
    "split_sample",
    "read_item",
    "CollatedItems",
    "dataset_attr",
    "dataset_targets",
    "dataset_normalization",
    "class_index",
    "SampleFormatError",
    "PROBE_BANK_KEY",
    "probe_bank_put",
    "probe_bank_get",
]

_IMAGE_KEYS = ("image", "images", "img", "pixel_values", "x", "input", "inputs")
_LABEL_KEYS = ("label", "labels", "y", "target", "targets", "class", "class_id")
_MASK_KEYS = ("mask", "masks")


class SampleFormatError(ValueError):
    """A dataset item (or batch) lightning-viz cannot read an image from."""


class NormalizationMismatchError(ValueError):
    """A probe ``mean``/``std`` with neither 1 value nor one per channel of the images."""


def split_sample(sample: Any, classes: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Return ``(image, label, mask)`` from one dataset item or one batch (missing parts are ``None``).

    Items: a tensor, ``(x, y[, mask, ...])`` or a dict (image under one of ``image``, ``images``, ``img``,
    ``pixel_values``, ``x``, ``input``, ``inputs``; label under ``label``, ``labels``, ``y``, ``target``,
    ``targets``, ``class``, ``class_id``; mask under ``mask``, ``masks``). A tuple's third element is the mask
    only when it is one: a tensor of the image's height and width (``[H, W]`` or ``[1, H, W]``; a batch's
    ``[B, H, W]`` or ``[B, 1, H, W]``); anything else there (an index, a path, extra targets) is ignored. A label
    that holds no numbers (a file name, a dict of targets) counts as none.
    One-hot or probability-vector labels (label smoothing, mixup) count as the class they give most weight to
    (:func:`class_index`); with ``classes=False`` labels are returned as read (what training on soft labels needs)."""
    if isinstance(sample, Tensor):
        return sample, None, None
    if isinstance(sample, dict):
        img = next((sample[k] for k in _IMAGE_KEYS if k in sample), None)
        if img is None:
            raise SampleFormatError(
                f"cannot find the image in a dict item with keys {sorted(sample)}; the image must be under one of "
                f"{list(_IMAGE_KEYS)}"
            )
        lab = next((sample[k] for k in _LABEL_KEYS if k in sample), None)
        mask = next((sample[k] for k in _MASK_KEYS if k in sample), None)
        lab = _as_tensor(lab)
        return img, class_index(lab, img) if classes else lab, mask
    if isinstance(sample, (tuple, list)) and len(sample) >= 1:
        img = sample[0]
        lab = _as_tensor(sample[1]) if len(sample) > 1 else None
        lab = class_index(lab, img) if classes else lab
        mask = sample[2] if len(sample) > 2 and _is_mask_of(sample[2], img) else None
        return img, lab, mask
    raise SampleFormatError(
        f"cannot read an item of type {type(sample).__name__}; expected a tensor, (x, y[, mask]) or a dict"
    )


def _is_mask_of(m: Any, img: Any) -> bool:
    """Whether ``m`` is a mask of image (or batch) ``img``: its height and width, one channel at most."""
    if not isinstance(m, Tensor) or not isinstance(img, Tensor) or img.ndim < 3 or m.ndim < 2:
        return False
    if tuple(m.shape[-2:]) != tuple(img.shape[-2:]):
        return False
    return m.ndim == img.ndim - 1 or (m.ndim == img.ndim and m.shape[-3] == 1)


def class_index(label: Tensor | None, img: Any) -> Tensor | None:
    """A one-hot or probability-vector label (``[K]`` per item, ``[B, K]`` per batch: non-negative, summing to 1;
    any real or integer dtype, e.g. ``int32`` one-hot rows from numpy) as the index of its largest entry; any other
    label as it is (a class index, or a multi-label target)."""
    if label is None or not isinstance(img, Tensor):
        return label
    return _vector_class(label, per_item=img.ndim == 3)


def _vector_class(label: Tensor, per_item: bool) -> Tensor:
    """:func:`class_index` of a label of one item (``per_item``: ``[K]``) or of a batch (``[B, K]``)."""
    if label.is_complex() or not (label.is_floating_point() or label.dtype in _INT_DTYPES or label.dtype == torch.bool):
        return label
    if label.ndim != (1 if per_item else 2) or label.shape[-1] < 2:
        return label
    v = label.double()
    if bool((v >= 0).all()) and bool(torch.allclose(v.sum(-1), torch.ones((), dtype=torch.float64), atol=1e-3)):
        return v.argmax(-1)
    return label


def _stratum(label: Any) -> int:
    """The class an entry of a dataset's ``targets`` stratifies the probe pick by: a class index, the class a
    one-hot / probability vector gives most weight to (:func:`class_index`), else ``-1`` (no class: a multi-label
    row, a class name, ...)."""
    t = _as_tensor(label)
    if t is None:
        return -1
    t = _vector_class(t.reshape(-1) if t.numel() > 1 else t, per_item=True)
    if t.numel() != 1 or t.is_complex() or not bool(torch.isfinite(t.double()).all()):
        return -1
    return int(t.reshape(()))


def _class_indices(labels: Tensor) -> bool:
    """Whether scalar labels can be class indices: whole numbers >= 0 (``float`` 0./1. labels of a binary
    classifier are; a regression target such as 2.7 or -1.3 is not)."""
    if labels.dtype == torch.bool:
        return True
    if labels.is_complex() or not (labels.is_floating_point() or labels.dtype in _INT_DTYPES):
        return False
    v = labels.double()
    return bool(torch.isfinite(v).all()) and bool((v == v.round()).all()) and bool((v >= 0).all())


_INT_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _probe_labels(labels: Tensor, n: int) -> Tensor:
    """Given probe labels as ``[n]`` class indices: one-hot / probability rows ``[n, K]`` as their largest entry (as
    items' labels are read), a column ``[n, 1]`` as it is; multi-hot rows, fractions and negatives are refused (cast
    to ``long`` they were other classes, or a row of K labels per probe)."""
    if labels.ndim == 2 and labels.shape[0] == n and labels.shape[1] > 1:
        labels = _vector_class(labels, per_item=False)
        if labels.ndim == 2:
            raise ValueError(
                f"probe labels must be one class index per probe ([{n}]); got shape {tuple(labels.shape)} with rows "
                f"such as {labels[0].tolist()[:8]} that are no one-hot / probability vector (multi-hot: a multi-label "
                "target?). Give one class per probe (e.g. the class to color or explain), or no labels"
            )
    labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{n} probe images but labels of shape {tuple(labels.shape)}; give one class index per probe")
    if labels.numel() and not _class_indices(labels):
        wrong = (labels if labels.is_complex() else invalid_classes(labels))[:5]
        bad = [round(float(v), 4) for v in wrong] if wrong.is_floating_point() else wrong.tolist()
        raise ValueError(
            f"probe labels must be class indices (whole numbers >= 0); got {bad} (regression "
            "targets, or -1 marking unlabeled images?). Give one class per probe, or no labels (target='predicted')"
        )
    return labels.long()


def read_item(dataset: Any, index: int, seed: int | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``split_sample(dataset[index])`` read inside :func:`~lightning_viz.capture.fork_rng`, so a dataset
    whose ``__getitem__`` draws a random augmentation leaves every global RNG as it was, and every generator the
    dataset keeps for itself (its transforms', e.g. albumentations 2's) too. With ``seed``, the CPU torch, numpy and
    python RNGs and those generators are seeded from ``(seed, index)`` for the read: the item is the same whatever
    their state (every DDP rank, unseeded, reads the same probe images)."""
    from .capture import fork_rng

    own = _own_generators(dataset)
    saved = [_generator_state(g) for g in own]
    try:
        with fork_rng():
            if seed is not None:
                item_seed = (seed * 1_000_003 + index) % 2**32
                torch.default_generator.manual_seed(item_seed)  # CPU only: seeding CUDA would queue a lazy seed
                np.random.seed(item_seed)
                random.seed(item_seed)
                for g in own:
                    _seed_generator(g, item_seed)
            return split_sample(dataset[index])
    finally:
        for g, state in zip(own, saved):
            _set_generator_state(g, state)


_GENERATORS = (np.random.Generator, np.random.RandomState, random.Random, torch.Generator)
_LEAVES = (str, bytes, int, float, bool, complex, Tensor, np.ndarray, type, types.ModuleType, types.FunctionType)


def _own_generators(root: Any, max_depth: int = 6, max_objects: int = 2000) -> list[Any]:
    """The random generators a dataset keeps for itself (``np.random.Generator``, ``RandomState``, ``random.Random``,
    ``torch.Generator``) among its attributes, its transforms' (albumentations 2 ``Compose.random_generator`` /
    ``py_random``), a wrapped dataset's or a collate_fn's: short lists and dicts are searched, long ones (a file list)
    are not."""
    found: list[Any] = []
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack and len(seen) < max_objects:
        obj, depth = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, _GENERATORS):
            found.append(obj)
            continue
        if depth >= max_depth or obj is None or isinstance(obj, _LEAVES):
            continue
        if isinstance(obj, dict):
            children = list(obj.values()) if len(obj) <= 64 else []
        elif isinstance(obj, (list, tuple)):
            children = list(obj) if len(obj) <= 64 else []
        elif isinstance(obj, functools.partial):
            children = [obj.func, *obj.args, *obj.keywords.values()]
        elif isinstance(obj, types.MethodType):
            children = [obj.__self__]
        else:
            try:  # an exotic object (a file handle, a database) may refuse even this
                attrs = getattr(obj, "__dict__", None)
            except Exception:
                attrs = None
            children = list(attrs.values()) if isinstance(attrs, dict) else []
        stack += [(c, depth + 1) for c in children]
    return found


def _generator_state(g: Any) -> Any:
    if isinstance(g, np.random.Generator):
        return g.bit_generator.state
    return g.get_state() if isinstance(g, (np.random.RandomState, torch.Generator)) else g.getstate()


def _set_generator_state(g: Any, state: Any) -> None:
    if isinstance(g, np.random.Generator):
        g.bit_generator.state = state
    elif isinstance(g, (np.random.RandomState, torch.Generator)):
        g.set_state(state)
    else:
        g.setstate(state)


def _seed_generator(g: Any, seed: int) -> None:
    if isinstance(g, np.random.Generator):
        g.bit_generator.state = type(g.bit_generator)(seed).state
    elif isinstance(g, torch.Generator):
        g.manual_seed(seed)
    else:
        g.seed(seed)


class CollatedItems:
    """The items of ``dataset`` as its DataLoader's ``collate_fn`` hands them to the model: each item collated as a
    batch of one, then taken out of it (a collate that converts PIL images or HWC numpy arrays, resizes or pads).
    Other attributes (``targets``, ``classes``, ``mean``, ``std``, ``transform``) are the dataset's."""

    def __init__(self, dataset: Any, collate_fn: Any):
        self.dataset, self.collate_fn = dataset, collate_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "collate_fn"):  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        item = self.dataset[index]
        try:
            img, lab, mask = split_sample(self.collate_fn([item]))
        except SampleFormatError:
            img, lab, mask = None, None, None
        if isinstance(img, Tensor) and img.ndim == 4 and img.shape[0] == 1:
            if isinstance(lab, Tensor) and lab.ndim >= 1 and lab.shape[0] == 1:
                lab = lab[0]
            if isinstance(mask, Tensor) and mask.ndim >= 3 and mask.shape[0] == 1:
                mask = mask[0]
            return img[0], lab, mask
        raw = split_sample(item)  # a collate that keeps a list of images (detection style): the item as it is
        if isinstance(raw[0], Tensor):
            return raw
        name = getattr(self.collate_fn, "__name__", type(self.collate_fn).__name__)
        what = f"shape {list(img.shape)}" if isinstance(img, Tensor) else type(img).__name__
        raise SampleFormatError(
            f"the dataloader's collate_fn {name} made a batch of one item whose images are {what}, not [1, C, H, W], "
            f"and the item's image is a {type(raw[0]).__name__}, not a tensor"
        )


def _parts(dataset: Any) -> list[Any]:
    """The datasets ``dataset`` wraps: a ``Subset``'s (``random_split``) or a :class:`CollatedItems`' ``dataset``, a
    ``ConcatDataset``'s ``datasets``; none for any other dataset (a wrapper of one's own may relabel its items)."""
    from torch.utils.data import ConcatDataset, Subset

    if isinstance(dataset, ConcatDataset):
        return list(dataset.datasets)
    return [dataset.dataset] if isinstance(dataset, (Subset, CollatedItems)) else []


def dataset_attr(dataset: Any, name: str) -> Any:
    """``dataset.<name>`` (``classes``, ``mean``, ``std``), else that of the dataset it wraps (``Subset``,
    ``random_split``; of a ``ConcatDataset`` when all its parts agree); ``None`` when there is none."""
    value = getattr(dataset, name, None)
    if value is not None:
        return value
    found = [dataset_attr(part, name) for part in _parts(dataset)]
    if not found or any(v is None for v in found):
        return None
    first = found[0]
    try:
        same = all(bool(np.array_equal(np.asarray(v, dtype=object), np.asarray(first, dtype=object))) for v in found)
    except Exception:
        same = False
    return first if same else None


def dataset_targets(dataset: Any) -> Any:
    """The labels of every item of ``dataset`` without reading items: its ``targets``, or those of the datasets it
    wraps (a ``Subset``'s at its ``indices``, a ``ConcatDataset``'s in order); ``None`` when unknown."""
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return targets
    parts = _parts(dataset)
    if not parts:
        return None
    found = [dataset_targets(part) for part in parts]
    if any(t is None for t in found):
        return None
    indices = getattr(dataset, "indices", None)
    if len(parts) == 1 and indices is not None:  # a Subset
        base = found[0]
        if isinstance(base, (Tensor, np.ndarray)):  # MNIST-style targets: one indexing, not one per item
            at = np.asarray(indices, dtype=np.int64)
            return base[at] if isinstance(base, np.ndarray) else base[torch.from_numpy(at)]
        return [base[int(i)] for i in indices]
    if len(parts) == 1:  # a view over the whole dataset (collate_fn)
        return found[0] if len(found[0]) == len(dataset) else None
    if all(isinstance(t, Tensor) for t in found):
        out: Any = torch.cat(found)
    elif all(isinstance(t, np.ndarray) for t in found):
        out = np.concatenate(found)
    else:
        out = [t for part in found for t in part]
    return out if len(out) == len(dataset) else None


def _transform_parts(t: Any, seen: set[int]) -> list[Any]:
    """Every transform inside ``t`` (``Compose`` lists, a ``StandardTransform``'s ``transform``), depth first."""
    if t is None or id(t) in seen:
        return []
    seen.add(id(t))
    out = [t]
    inner = getattr(t, "transforms", None)
    for part in inner if isinstance(inner, (list, tuple)) else [inner, getattr(t, "transform", None)]:
        if part is not None and not isinstance(part, (str, bytes, int, float)):
            out += _transform_parts(part, seen)
    return out


def dataset_normalization(dataset: Any) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` of the one ``Normalize`` transform of ``dataset`` (torchvision's v1 or v2, or any transform of
    that name with ``mean`` and ``std``; inside ``Compose``, through ``Subset``/``ConcatDataset``), in pixels in
    ``[0, 1]`` (a mean given in 0..255 units is divided by 255, with its std); ``None`` when there is no such transform
    or several disagree."""
    datasets, found = [dataset], set()
    while datasets:
        d = datasets.pop()
        datasets += _parts(d)
        for t in _transform_parts(getattr(d, "transform", None), set()) + _transform_parts(
            getattr(d, "transforms", None), set()
        ):
            if type(t).__name__ != "Normalize":
                continue
            if getattr(t, "normalization", "standard") != "standard":  # albumentations' per-image / min-max modes
                return None
            try:
                mean = torch.as_tensor(t.mean, dtype=torch.float64).flatten().tolist()
                std = torch.as_tensor(t.std, dtype=torch.float64).flatten().tolist()
            except (AttributeError, TypeError, ValueError, RuntimeError):
                return None  # a Normalize whose statistics are not numbers: unknown
            if max(mean, default=0.0) > 1.0:  # 0..255 units: the same normalization of pixels in [0, 1]
                mean, std = [m / 255 for m in mean], [v / 255 for v in std]
            found.add((tuple(mean), tuple(std)))
    if len(found) != 1:
        return None
    stats = found.pop()
    return list(stats[0]), list(stats[1])


def _plain(t: Tensor) -> Tensor:
    """Detached CPU tensor that autograd may use: probes picked under ``torch.inference_mode``
    (``trainer.validate``) would otherwise be inference tensors, which cannot be saved for backward
    (e.g. labels as a ``gather`` index of a target score)."""
    t = t.detach().cpu()
    if t.is_inference():
        with torch.inference_mode(False):
            t = t.clone()
    return t


def _as_tensor(v: Any) -> Tensor | None:
    """A label as a tensor; ``None`` when it holds no numbers (a file name, a dict of detection targets): no label."""
    if v is None or isinstance(v, Tensor):
        return v
    try:
        return torch.as_tensor(v)
    except (TypeError, ValueError, RuntimeError):
        return None


@dataclass
class ProbeSet:
    """Fixed probe samples, on CPU.

    Attributes:
        images: ``[N, C, H, W]`` model inputs (normalized as the model expects).
        labels: ``[N]`` class labels, or ``None``.
        masks: ``[N, H, W]`` ground-truth object masks (e.g. the shapes dataset), or ``None``.
        indices: ``[N]`` dataset indices the probes came from (``-1`` when given explicitly).
        mean, std: per-channel normalization to undo for display, or ``None`` (display min-max scales).
        offset: index of the first probe in the full set (non-zero for a rank's shard).
        total: the number of probes in the full set (``None``: ``offset + N``); the ids are padded to its digits.
    """

    images: Tensor
    labels: Tensor | None = None
    masks: Tensor | None = None
    indices: Tensor | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    offset: int = 0
    total: int | None = None
    _fingerprint: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"probe images must be [N, C, H, W]; got shape {tuple(self.images.shape)}")
        n, c = self.images.shape[:2]
        self.images = _plain(self.images)
        for attr in ("mean", "std"):  # a list of floats: numbers and tensors too (``mean = 0.1307``)
            value = getattr(self, attr)
            if value is not None:
                value = torch.as_tensor(value, dtype=torch.float64).flatten().tolist()
                if len(value) not in (1, c):
                    allowed = "1 value" if c == 1 else f"1 or {c} values"
                    raise NormalizationMismatchError(
                        f"probe {attr} has {len(value)} values but the probe images have {c} channel"
                        f"{'s' if c != 1 else ''}; give {allowed} (one per channel)"
                    )
                setattr(self, attr, value)
        if self.labels is not None:
            self.labels = _plain(_probe_labels(torch.as_tensor(self.labels), n))
        if self.masks is not None:
            m = _plain(self.masks)
            if m.ndim == 4 and m.shape[1] == 1:
                m = m[:, 0]
            if m.ndim != 3 or m.shape[0] != n:
                raise ValueError(f"probe masks must be [N, H, W] with N={n}; got {tuple(self.masks.shape)}")
            self.masks = _plain(m.float())
        if self.indices is None:
            self.indices = torch.full((n,), -1, dtype=torch.long)
        if self.total is None:
            self.total = self.offset + n

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def ids(self) -> list[str]:
        """Stable probe ids used in TensorBoard tags: ``p000``, ``p001``, ... (``p0000`` .. ``p1000`` for 1001
        probes: :func:`~lightning_viz.logging.indexed`)."""
        largest = int(self.total or 0) - 1
        return [indexed("p", self.offset + i, largest) for i in range(len(self))]

    def fingerprint(self) -> str:
        """Content hash: equal probe sets share cached passes."""
        if self._fingerprint is None:
            import hashlib

            h = hashlib.sha1(self.images.float().numpy().tobytes())
            if self.labels is not None:
                h.update(self.labels.numpy().tobytes())
            h.update(str(self.offset).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # ----------------------------------------------------------------- selection
    @classmethod
    def from_dataset(
        cls,
        dataset: Any,
        num: int = 16,
        seed: int = 0,
        stratified: bool = True,
        scan_limit: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> ProbeSet:
        """Pick ``num`` samples from a map-style dataset.

        A seeded permutation of the dataset's indices is scanned (at most ``scan_limit`` items,
        default ``20 * num``); with ``stratified`` the picks round-robin over classes in order of
        first appearance, so every class seen is represented as evenly as possible.
        """
        n_total = len(dataset)
        if n_total == 0:
            raise ValueError("cannot pick probes from an empty dataset")
        num = min(num, n_total)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(n_total, generator=gen).tolist()
        scan = order[: min(n_total, scan_limit or max(20 * num, num))]
        if not stratified:
            chosen = scan[:num]
        else:
            by_class: dict[int, list[int]] = {}
            labels = dataset_targets(dataset)
            for idx in scan:
                if labels is not None:
                    lab = _stratum(labels[idx])
                else:
                    _, lab_t, _ = read_item(dataset, idx, seed)
                    lab = int(lab_t) if lab_t is not None and lab_t.numel() == 1 else -1
                by_class.setdefault(lab, []).append(idx)
            chosen = []
            queues = list(by_class.values())
            while len(chosen) < num and any(queues):
                for q in queues:
                    if q and len(chosen) < num:
                        chosen.append(q.pop(0))
        return cls.from_indices(dataset, chosen, mean=mean, std=std, seed=seed)

    @classmethod
    def from_indices(cls, dataset: Any, indices: Sequence[int], mean=None, std=None, seed: int = 0) -> ProbeSet:
        """The items at ``indices``, each read with the global RNGs seeded from ``(seed, index)`` (a random
        augmentation in the dataset gives the same probe images on every rank and every run). ``uint8`` images
        with no ``mean``/``std`` given are pixels in ``[0, 255]``: ``mean=[0]``, ``std=[1/255]`` (shown as they are,
        not min-max scaled; synthesized images kept in ``[0, 255]``; occlusion's gray is 127.5)."""
        imgs, labs, masks = [], [], []
        for i in indices:
            img, lab, mask = read_item(dataset, i, seed)
            img = torch.as_tensor(img)
            if img.ndim != 3:  # e.g. a grayscale [H, W] with no channel dimension: stacked, it would read as [N, C, H]
                raise ValueError(
                    f"item {i} gives an image of shape {list(img.shape)}; a probe image is [C, H, W] (a grayscale "
                    "image is [1, H, W]: e.g. x.unsqueeze(0) in the dataset's __getitem__)"
                )
            imgs.append(img)
            labs.append(lab)
            masks.append(mask)
        shapes = {tuple(im.shape): i for i, im in zip(indices, imgs)}
        if len(shapes) > 1:
            seen = ", ".join(f"{list(s)} (item {i})" for s, i in list(shapes.items())[:4])
            raise ValueError(
                f"the probe images have different sizes: {seen}; probes are stacked into one batch, so "
                "every image needs one size (e.g. a torchvision.transforms.Resize((H, W)) transform)"
            )
        # Labels are one class index per item; one-hot or multi-label targets are not (the probes then have none),
        # nor are regression targets (a fraction or a negative value: cast to a class index it would be a wrong one).
        scalar = all(lab is not None and torch.as_tensor(lab).numel() == 1 for lab in labs)
        labels = torch.stack([torch.as_tensor(lab).view(()) for lab in labs]) if scalar else None
        if labels is not None and not _class_indices(labels):
            labels = None
        # a probe without a mask among probes with masks gets an empty one (no object: NaN in the localization
        # metrics, left out of their mean), so the others still score
        mask_t = None
        if any(m is not None for m in masks):
            shape = next(torch.as_tensor(m).shape[-2:] for m in masks if m is not None)
            mask_t = torch.stack(
                [torch.as_tensor(m).float().reshape(shape) if m is not None else torch.zeros(shape) for m in masks]
            )
        if mean is None and std is None and imgs and all(im.dtype == torch.uint8 for im in imgs):
            mean, std = [0.0], [1 / 255]  # uint8 pixels 0..255 are x = p / (1/255) of p in [0, 1]: shown as they are
        return cls(
            images=torch.stack(imgs).float(),
            labels=labels,
            masks=mask_t,
            indices=torch.as_tensor(list(indices), dtype=torch.long),
            mean=mean,
            std=std,
        )

    # ----------------------------------------------------------------- DDP
    def shard_bounds(self, rank: int, world_size: int) -> tuple[int, int]:
        """Contiguous block ``[start, stop)`` of this rank (sizes differ by at most one; may be empty)."""
        n = len(self)
        base, extra = divmod(n, world_size)
        start = rank * base + min(rank, extra)
        return start, start + base + (1 if rank < extra else 0)

    def shard(self, rank: int, world_size: int) -> ProbeSet:
        """This rank's contiguous share; concatenating all shards in rank order gives the full set."""
        if world_size <= 1:
            return self
        start, stop = self.shard_bounds(rank, world_size)
        return self.subset(slice(start, stop))

    def subset(self, sel: slice) -> ProbeSet:
        start = sel.start or 0
        assert self.indices is not None  # __post_init__ always sets it
        return ProbeSet(
            images=self.images[sel],
            labels=None if self.labels is None else self.labels[sel],
            masks=None if self.masks is None else self.masks[sel],
            indices=self.indices[sel],
            mean=self.mean,
            std=self.std,
            offset=self.offset + start,
            total=self.total,
        )

    # ----------------------------------------------------------------- display
    def display_images(self) -> Tensor:
        """Images in ``[0, 1]`` for rendering: normalization undone, or per-image min-max if unknown."""
        x = self.images.float()
        if self.mean is not None and self.std is not None:
            mean = torch.as_tensor(self.mean, dtype=x.dtype).view(1, -1, 1, 1)
            std = torch.as_tensor(self.std, dtype=x.dtype).view(1, -1, 1, 1)
            return (x * std + mean).clamp(0, 1)
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        return (x - lo) / (hi - lo).clamp_min(1e-12)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
        """Images on ``device`` (a fresh tensor, safe to mark ``requires_grad``)."""
        return self.images.to(device=device, dtype=dtype or self.images.dtype, copy=True)

    # ----------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "labels": self.labels,
            "masks": self.masks,
            "indices": self.indices,
            "mean": None if self.mean is None else [float(v) for v in self.mean],
            "std": None if self.std is None else [float(v) for v in self.std],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> ProbeSet:
        return cls(**state)


# --------------------------------------------------------------------------- checkpoint probe bank
#: Top-level checkpoint key of the probe bank shared by every callback's probes.
PROBE_BANK_KEY = "lightning_viz_probe_bank"


def _compact(t: Tensor) -> Tensor:
    """``t`` in the smallest dtype that gives back its exact bits (bool, uint8, float16, bfloat16), else unchanged."""
    bits = t.contiguous().view(torch.uint8)
    for dtype in (torch.bool, torch.uint8, torch.float16, torch.bfloat16):
        if dtype == t.dtype or (dtype.itemsize >= t.dtype.itemsize and dtype != torch.bool) or t.dtype == torch.bool:
            continue
        if torch.equal(t.to(dtype).to(t.dtype).contiguous().view(torch.uint8), bits):
            return t.to(dtype)
    return t


def _row_key(row: Tensor) -> bytes:
    import hashlib

    return hashlib.sha1(row.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).digest()


def _bank_put_tensor(bank: dict[str, Any], kind: str, t: Tensor) -> dict[str, Any]:
    """Store the rows of ``t`` (dim 0) in ``bank``, each distinct row once; return ``{"group", "rows"}``."""
    group = f"{kind}:{str(t.dtype).replace('torch.', '')}:{'x'.join(str(d) for d in t.shape[1:])}"
    groups = bank.setdefault("groups", {})
    old = groups.get(group)
    old = None if old is None else old.to(t.dtype)
    known = {} if old is None else {_row_key(r): i for i, r in enumerate(old)}
    n_old = 0 if old is None else old.shape[0]
    new: list[Tensor] = []
    rows: list[int] = []
    for r in t:
        k = _row_key(r)
        if k not in known:
            known[k] = n_old + len(new)
            new.append(r)
        rows.append(known[k])
    if new:
        stacked = torch.stack(new)
        groups[group] = _compact(stacked if old is None else torch.cat([old, stacked]))
    return {"group": group, "rows": torch.tensor(rows, dtype=torch.long)}


def _bank_get_tensor(bank: dict[str, Any], ref: dict[str, Any]) -> Tensor:
    dtype = getattr(torch, ref["group"].split(":")[1])
    return bank["groups"][ref["group"]][ref["rows"]].to(dtype)


#: Codec of images stored as the 8-bit pixels they were normalized from (``ref["images"]["codec"]``).
_U8_CODEC = "u8norm"


def _u8_stats(state: dict[str, Any], channels: int) -> tuple[Tensor, Tensor] | None:
    """``mean``/``std`` of ``state`` as float32 ``[C, 1, 1]`` tensors (as ``Normalize`` uses them), or ``None``."""
    mean, std = state.get("mean"), state.get("std")
    if mean is None or std is None or len(mean) not in (1, channels) or len(std) not in (1, channels):
        return None
    return (
        torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
        torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
    )


def _u8_decode(q: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Normalized float32 images from 8-bit pixels in ``ToTensor`` + ``Normalize`` order: ``(q / 255 - mean) / std``."""
    return (q.float() / 255 - mean) / std


def _u8_encode(images: Tensor, state: dict[str, Any]) -> Tensor | None:
    """The uint8 pixels ``q`` whose :func:`_u8_decode` gives back ``images`` bit for bit, or ``None`` if there are none
    (no mean/std, not float32, or not normalized from 8-bit data)."""
    stats = None if images.dtype != torch.float32 or images.ndim != 4 else _u8_stats(state, images.shape[1])
    if stats is None or not bool(torch.isfinite(images).all()):
        return None
    mean, std = stats
    q = ((images.double() * std.double() + mean.double()) * 255).round().clamp(0, 255).to(torch.uint8)
    back = _u8_decode(q, mean, std)
    if not torch.equal(back.contiguous().view(torch.uint8), images.contiguous().view(torch.uint8)):
        return None
    return q


def probe_bank_put(bank: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """Move a :meth:`ProbeSet.state_dict` into a checkpoint's probe ``bank``, returning a small reference.

    Images and masks are stored row by row, each distinct row once across every probe set of the
    checkpoint (callbacks with overlapping probes share them), in the smallest dtype that holds them
    exactly; :func:`probe_bank_get` gives back the bit-identical state. Images normalized from 8-bit
    pixels (``ToTensor`` + ``Normalize`` with the state's mean/std) are stored as those uint8 pixels,
    a quarter of float32, when decoding them gives back the exact bits (``codec: "u8norm"``)."""
    ref = {k: v for k, v in state.items() if k not in ("images", "masks")}
    q = _u8_encode(state["images"], state)
    if q is None:
        ref["images"] = _bank_put_tensor(bank, "images", state["images"])
    else:  # one group per mean/std: the same pixels decode to other images under other statistics
        stats = torch.cat([t.flatten() for t in _u8_stats(state, q.shape[1])])  # type: ignore[union-attr]
        kind = f"images/{_U8_CODEC}/{_row_key(stats).hex()[:16]}"
        ref["images"] = {**_bank_put_tensor(bank, kind, q), "codec": _U8_CODEC}
    ref["masks"] = None if state.get("masks") is None else _bank_put_tensor(bank, "masks", state["masks"])
    return ref


def probe_bank_get(bank: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    """The :meth:`ProbeSet.state_dict` that :func:`probe_bank_put` stored as ``ref``."""
    state = dict(ref)
    images = _bank_get_tensor(bank, ref["images"])
    codec = ref["images"].get("codec")
    if codec == _U8_CODEC:
        stats = _u8_stats(ref, images.shape[1])
        if stats is None:
            raise ValueError("probe bank: 8-bit probe images stored without their mean/std; the checkpoint is damaged")
        images = _u8_decode(images, *stats)
    elif codec is not None:
        raise ValueError(
            f"probe bank: unknown image codec {codec!r} (known: {_U8_CODEC!r} or none); "
            "the checkpoint comes from a newer lightning-viz"
        )
    state["images"] = images
    state["masks"] = None if ref.get("masks") is None else _bank_get_tensor(bank, ref["masks"])
    return state
