"""Real data pipelines: items that only the DataLoader's collate_fn turns into model inputs, image folders, wrapped
datasets (Subset, ConcatDataset, random_split) and the normalization of their transforms."""

from __future__ import annotations

import os

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


# ----------------------------------------------------------------------------- image folders and wrapped datasets
CLASSES = ("ant", "bee", "cow")


def _write_folder(root, n: int = 4) -> None:
    """``n`` PNGs per class, each one flat color (R encodes the class, G the index): colors can be checked."""
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", (10, 12), (60 * c + 40, 30 * i + 20, 90)).save(root / name / f"{i}.png")


class _Counting:
    """An image loader that counts the files it decodes."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        from torchvision.datasets.folder import default_loader

        self.calls += 1
        return default_loader(path)


def _fit_cam(tmp_path, dataset, loader_kw=None) -> tuple[CAMCallback, object]:
    loader = DataLoader(dataset, batch_size=4, **(loader_kw or {}))
    cb = CAMCallback(layers=["net.conv2"], num_probes=3)
    trainer = tiny_trainer(str(tmp_path / "logs"), [cb], max_epochs=1)
    trainer.fit(LitTiny(TinyCNN()), loader, loader)
    return cb, trainer


@pytest.mark.parametrize("wrap", ["subset", "random_split", "concat"])
def test_wrapped_datasets_keep_class_names_statistics_and_targets(tmp_path, wrap):
    """An ImageFolder (with ``mean``/``std`` attributes, as the README asks) inside a Subset, a random_split part or
    a ConcatDataset: captions name the folder classes, probes are shown un-normalized, and the class-stratified pick
    reads the wrapped dataset's ``targets`` instead of decoding 20 images per probe (before: class indices, min-max
    colors, every scanned file decoded)."""
    from torch.utils.data import ConcatDataset, Subset, random_split
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)

    class WithStats(ImageFolder):
        pass

    WithStats.mean, WithStats.std = mean, std
    _write_folder(tmp_path / "imgs")
    count = _Counting()
    tf = T.Compose([T.Resize((8, 8)), T.ToTensor(), T.Normalize(mean, std)])
    full = WithStats(str(tmp_path / "imgs"), transform=tf, loader=count)
    ds = {
        "subset": lambda: Subset(full, [1, 2, 5, 6, 9, 10]),
        "random_split": lambda: random_split(full, [0.5, 0.5], generator=torch.Generator().manual_seed(0))[0],
        "concat": lambda: ConcatDataset([full, full]),
    }[wrap]()

    class CountPicks(CAMCallback):
        def _pick_probes(self, trainer):
            before = count.calls
            probes = super()._pick_probes(trainer)
            self.decoded = count.calls - before
            return probes

    loader = DataLoader(ds, batch_size=4)
    cb = CountPicks(layers=["net.conv2"], num_probes=3)
    trainer = tiny_trainer(str(tmp_path / "logs"), [cb], max_epochs=1)
    trainer.fit(LitTiny(TinyCNN()), loader, loader)
    p = cb.probes
    assert cb.get_class_names(trainer) == list(CLASSES)
    assert p.mean == list(mean) and p.std == list(std)
    assert sorted(p.labels.tolist()) == [0, 1, 2] and cb.decoded == 3  # the three probes only
    expected_red = (60 * p.labels.float() + 40) / 255  # flat colors: every pixel of the displayed image
    torch.testing.assert_close(p.display_images()[:, 0, 4, 4], expected_red, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["v1", "v2", "v2_in_255_units", "subset"])
def test_normalize_of_the_transform_is_undone_for_display(tmp_path, kind):
    """A user's ImageFolder whose transform ends in Normalize (torchvision v1 or v2; statistics in [0, 1] or in
    0..255 units; inside a Subset) and no mean/std attribute: the probes are shown in their file colors (before:
    min-max scaled over all channels, a gray image turned blue), and the occlusion gray / synthesis bounds follow."""
    from torch.utils.data import Subset
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    _write_folder(tmp_path / "imgs")
    tf = {
        "v1": T.Compose([T.Resize((8, 8)), T.ToTensor(), T.Normalize(mean, std)]),
        "v2": v2.Compose(
            [v2.Resize((8, 8)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        ),
        "v2_in_255_units": v2.Compose(
            [
                v2.Resize((8, 8)),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=False),
                v2.Normalize([255 * m for m in mean], [255 * s for s in std]),
            ]
        ),
        "subset": T.Compose([T.Resize((8, 8)), T.ToTensor(), T.Normalize(mean, std)]),
    }[kind]
    ds = ImageFolder(str(tmp_path / "imgs"), transform=tf)
    cb, _ = _fit_cam(tmp_path, Subset(ds, list(range(0, 12, 2))) if kind == "subset" else ds)
    p = cb.probes
    assert p.mean == pytest.approx(mean, abs=1e-7)
    assert p.std == pytest.approx(std, abs=1e-7)
    files = [Image.open(ds.samples[int(i) if kind != "subset" else 2 * int(i)][0]) for i in p.indices]
    pixels = torch.stack([torch.tensor(f.getpixel((4, 4)), dtype=torch.float32) / 255 for f in files])
    torch.testing.assert_close(p.display_images()[:, :, 4, 4], pixels, atol=1e-5, rtol=0)


def test_several_different_normalizations_are_not_guessed():
    """Two parts of a ConcatDataset normalized differently: no statistics (display min-max), not one of them."""
    from torch.utils.data import ConcatDataset
    from torchvision import transforms as T

    from lightning_viz.probe import dataset_normalization

    class Tf(Dataset):
        def __init__(self, m):
            self.transform = T.Compose([T.ToTensor(), T.Normalize([m] * 3, [0.2] * 3)])

        def __len__(self):
            return 2

    assert dataset_normalization(Tf(0.5)) == ([0.5] * 3, [0.2] * 3)
    assert dataset_normalization(ConcatDataset([Tf(0.5), Tf(0.5)])) == ([0.5] * 3, [0.2] * 3)
    assert dataset_normalization(ConcatDataset([Tf(0.5), Tf(0.4)])) is None


def test_image_folder_reads_16_bit_grayscale_rgba_palette_and_gray_files(tmp_path):
    """One file of each kind a real folder holds, flat value each; ImageFolderDataModule gives the file's colors
    (a 16-bit grayscale PNG read as v / 257, not clipped to white by PIL's convert("RGB"))."""
    from lightning_viz.data.folder import ImageFolderDataModule

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    files = {
        "rgb": (Image.new("RGB", (6, 5), (200, 100, 50)), (200, 100, 50)),
        "gray": (Image.new("L", (6, 5), 90), (90, 90, 90)),
        "rgba": (Image.new("RGBA", (6, 5), (10, 220, 30, 128)), (10, 220, 30)),
        "palette": (Image.new("RGB", (6, 5), (0, 0, 255)).convert("P"), (0, 0, 255)),
        "gray16": (Image.fromarray(np.full((5, 6), 20000, dtype=np.uint16)), (78, 78, 78)),  # 20000 / 257 = 77.8
    }
    for i, (name, (img, _)) in enumerate(files.items()):
        img.save(tmp_path / ("a" if i % 2 else "b") / f"{name}.png")
    assert Image.open(tmp_path / "b" / "gray16.png").mode.startswith("I")  # a real 16-bit file
    dm = ImageFolderDataModule(str(tmp_path), image_size=4, val_fraction=0.0, mean=[0, 0, 0], std=[1, 1, 1])
    full = dm.train_set.dataset
    for (path, _), (x, _) in zip(full.samples, (full[i] for i in range(len(full)))):
        expected = torch.tensor(files[os.path.basename(path)[:-4]][1], dtype=torch.float32) / 255
        torch.testing.assert_close(x[:, 2, 2], expected, atol=1e-6, rtol=0, msg=path)


class _OwnGenerators:
    """An augmentation that owns its generators, as albumentations 2's ``Compose`` does (``random_generator``,
    ``py_random``), plus a ``torch.Generator``: none of the global RNGs is drawn from."""

    def __init__(self, seed):
        import random

        self.random_generator = np.random.default_rng(seed)
        self.py_random = random.Random(seed)
        self.torch_gen = torch.Generator().manual_seed(seed)

    def __call__(self, image):
        if self.py_random.random() < 0.5:
            image = image[:, ::-1]
        shift = float(torch.rand((), generator=self.torch_gen))
        return image * self.random_generator.uniform(0.5, 1.5) + shift


class _Augmented(Dataset):
    def __init__(self, aug_seed):
        self.x = np.random.default_rng(0).random((24, 8, 8, 3)).astype(np.float32)
        self.transform = {"image": _OwnGenerators(aug_seed)}  # nested, as in a config dict

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x = np.ascontiguousarray(self.transform["image"](self.x[i]))
        return torch.from_numpy(x).permute(2, 0, 1), i % 3


class _Batches(LitTiny):
    def __init__(self):
        super().__init__(TinyCNN())
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[0].clone())
        return super().training_step(batch, batch_idx)


def test_dataset_generators_of_its_own_are_untouched_and_seeded_for_probes(tmp_path):
    """Reading the probes drew from the augmentation's own generators: the training batches changed when a callback
    was attached, and the probes depended on the generators' state. Now every training batch is bit-identical with
    and without callbacks, and two datasets whose generators are seeded differently give the same probes."""

    def fit(callbacks, aug_seed=1):
        torch.manual_seed(0)
        model, ds = _Batches(), _Augmented(aug_seed)
        loader = DataLoader(ds, batch_size=6, shuffle=True)
        tiny_trainer(str(tmp_path), callbacks, max_epochs=2, logger=False, default_root_dir=str(tmp_path)).fit(
            model, loader, DataLoader(ds, 6)
        )
        return model.seen

    plain = fit([])
    cb = CAMCallback(layers=["net.conv2"], num_probes=4, probe_source="train")
    seen = fit([cb])
    assert len(seen) == len(plain) == 8 and all(torch.equal(a, b) for a, b in zip(seen, plain))
    other = CAMCallback(layers=["net.conv2"], num_probes=4, probe_source="train")
    fit([other], aug_seed=7)
    assert torch.equal(cb.probes.images, other.probes.images)


def test_a_relabeling_wrapper_of_ones_own_does_not_inherit_class_names_or_targets():
    """A wrapper of the user's that maps the wrapped dataset's 3 classes to 2 keeps neither its ``classes`` nor its
    ``targets`` (only Subset, random_split and ConcatDataset are known to keep the labels)."""
    from torch.utils.data import Subset

    from lightning_viz.probe import dataset_attr, dataset_targets

    class Base(Dataset):
        classes, targets = ["a", "b", "c"], [0, 1, 2, 0]

        def __len__(self):
            return 4

    class Binary(Dataset):
        def __init__(self, dataset):
            self.dataset = dataset

        def __len__(self):
            return len(self.dataset)

    assert dataset_attr(Binary(Base()), "classes") is None and dataset_targets(Binary(Base())) is None
    assert dataset_attr(Subset(Base(), [3, 1]), "classes") == ["a", "b", "c"]
    assert dataset_targets(Subset(Base(), [3, 1])) == [0, 1]


def test_probe_reads_pass_over_attributes_that_refuse_inspection():
    """A dataset holding a handle whose ``__dict__`` raises (a closed file, a database) is read as before."""
    from lightning_viz.probe import read_item

    class Handle:
        @property
        def __dict__(self):
            raise RuntimeError("closed")

    class WithHandle(Dataset):
        handle = None

        def __init__(self):
            self.handle = Handle()

        def __getitem__(self, i):
            return torch.full((3, 2, 2), float(i)), 1

    image, label, _ = read_item(WithHandle(), 2, seed=0)
    assert torch.equal(image, torch.full((3, 2, 2), 2.0)) and int(label) == 1


def test_a_collate_fn_that_keeps_a_list_of_images_reads_the_items_and_errors_name_the_dataset(tmp_path):
    """A detection-style collate (``tuple(zip(*batch))``: a list of images) keeps the probes as the items are (as
    before collate_fns were read); a pipeline where neither gives an image tensor fails at setup naming the user's
    dataset class, not lightning-viz's view over it."""
    from lightning_viz.callbacks.base import VisualizationError

    def as_lists(batch):
        return tuple(zip(*batch))

    class Lists(LitTiny):
        def training_step(self, batch, batch_idx):
            return super().training_step((torch.stack(batch[0]), torch.tensor(batch[1])), batch_idx)

        def validation_step(self, batch, batch_idx):
            return super().validation_step((torch.stack(batch[0]), torch.tensor(batch[1])), batch_idx)

    ds = _Pictures("sizes")
    ds.arrays = [a[:6] for a in ds.arrays]  # one size: the model stacks the lists
    cb = CAMCallback(layers=["net.conv2"], num_probes=3)
    loader = DataLoader(ds, batch_size=3, collate_fn=as_lists)
    tiny_trainer(str(tmp_path), [cb], max_epochs=1, logger=False, default_root_dir=str(tmp_path / "a")).fit(
        Lists(TinyCNN()), loader, loader
    )
    assert torch.equal(cb.probes.images, torch.stack([ds[i][0] for i in cb.probes.indices.tolist()]))

    pil = DataLoader(_Pictures("pil"), batch_size=3, collate_fn=as_lists)
    trainer = tiny_trainer(
        str(tmp_path),
        [CAMCallback(layers=["net.conv2"], num_probes=3)],
        logger=False,
        default_root_dir=str(tmp_path / "b"),
    )
    with pytest.raises(VisualizationError, match=r"the _Pictures dataset .*collate_fn .*as_lists.*not a tensor"):
        trainer.fit(Lists(TinyCNN()), pil, pil)


def test_subset_of_tensor_or_array_targets_is_indexed_at_once():
    """MNIST-style ``targets`` (a tensor, or an array) of a Subset come out as one indexed tensor / array (one
    indexing for 60000 items, not a Python loop of 0-d tensors)."""
    from torch.utils.data import Subset

    from lightning_viz.probe import dataset_targets

    class Digits(Dataset):
        def __init__(self, targets):
            self.targets = targets

        def __len__(self):
            return len(self.targets)

    t = torch.arange(10) % 4
    got = dataset_targets(Subset(Digits(t), [9, 2, 5]))
    assert isinstance(got, torch.Tensor) and got.tolist() == [1, 2, 1]
    got = dataset_targets(Subset(Digits(t.numpy()), [9, 2, 5]))
    assert isinstance(got, np.ndarray) and got.tolist() == [1, 2, 1]
    got = dataset_targets(torch.utils.data.ConcatDataset([Digits(t), Digits(t[:3])]))
    assert isinstance(got, torch.Tensor) and got.tolist() == t.tolist() + [0, 1, 2]


def test_images_prepared_in_a_batch_transfer_hook_are_warned_about_once(tmp_path):
    """A module that normalizes uint8 batches in ``on_after_batch_transfer`` (GPU preprocessing) trains on [-2, 2]
    inputs while the probes stay the dataset's 0..255 pixels: one VisualizationWarning at setup says so (before:
    silent), and a module without such hooks gets none."""
    import warnings

    from torch.utils.data import TensorDataset

    from lightning_viz import GradientCallback
    from lightning_viz.callbacks.base import VisualizationWarning

    class GpuNorm(LitTiny):
        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            return (x.float() / 255 - 0.5) / 0.25, y

    x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(12) % 3
    for module, data, expected in ((GpuNorm(TinyCNN()), x, 1), (LitTiny(TinyCNN()), x.float() / 255, 0)):
        loader = DataLoader(TensorDataset(data, y), batch_size=6)
        cbs = [GradientCallback(num_probes=2), CAMCallback(layers=["net.conv2"], num_probes=3)]
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            tiny_trainer(str(tmp_path), cbs, max_epochs=1, logger=False, default_root_dir=str(tmp_path)).fit(
                module, loader, loader
            )
        hits = [w for w in seen if issubclass(w.category, VisualizationWarning) and "batch_transfer" in str(w.message)]
        assert len(hits) == expected
        if expected:
            assert "GpuNorm.on_after_batch_transfer" in str(hits[0].message)
            assert "probes=ProbeSet" in str(hits[0].message)


def test_an_albumentations_style_normalize_gives_its_statistics_unless_it_normalizes_per_image():
    """albumentations' ``Normalize(mean, std, max_pixel_value=255)`` inside ``Compose.transforms`` is the same
    normalization of pixels in [0, 1]; with ``normalization="image"`` (per-image statistics) there is none to undo."""
    from lightning_viz.probe import dataset_normalization

    class Normalize:  # albumentations.Normalize's attributes
        def __init__(self, normalization="standard"):
            self.mean, self.std, self.max_pixel_value = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0
            self.normalization = normalization

    class Compose:
        def __init__(self, transforms):
            self.transforms = transforms

    class Albu(Dataset):
        def __init__(self, normalization):
            self.transform = Compose([object(), Normalize(normalization)])

    mean, std = dataset_normalization(Albu("standard"))
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])
    assert dataset_normalization(Albu("image")) is None
