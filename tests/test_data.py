"""Built-in data: procedural shapes (determinism, masks, balance, normalization), digits, image folders."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from lightning_viz.data.digits import DigitsDataModule, load_digit_images
from lightning_viz.data.folder import IMAGENET_MEAN, IMAGENET_STD, ImageFolderDataModule
from lightning_viz.data.shapes import SHAPE_NAMES, ShapesDataModule, ShapesDataset, draw_shape
from lightning_viz.probe import ProbeSet


# ----------------------------------------------------------------------------- shapes
def test_shapes_item_deterministic_per_seed_and_index_and_access_order():
    a = ShapesDataset(12, image_size=16, seed=3)
    b = ShapesDataset(12, image_size=16, seed=3)
    later_first = [b[i] for i in reversed(range(12))][::-1]  # other instance, other access order
    for i in range(12):
        (xa, ya, ma), (xb, yb, mb) = a[i], later_first[i]
        assert torch.equal(xa, xb) and ya == yb and torch.equal(ma, mb)
    other = ShapesDataset(12, image_size=16, seed=4)
    assert not any(torch.equal(a[i][0], other[i][0]) for i in range(12))
    assert not torch.equal(a[0][0], a[4][0])  # same class, different draw


def test_shapes_do_not_touch_global_rng():
    ds = ShapesDataset(8, image_size=16)
    state = torch.get_rng_state()
    _ = [ds[i] for i in range(8)]
    assert torch.equal(state, torch.get_rng_state())


def test_shapes_labels_balanced_and_match_targets():
    ds = ShapesDataset(40, image_size=8, num_classes=4)
    labels = [ds[i][1] for i in range(40)]
    assert labels == ds.targets
    assert np.bincount(labels).tolist() == [10, 10, 10, 10]
    ds3 = ShapesDataset(9, image_size=8, num_classes=3)
    assert sorted(set(ds3.targets)) == [0, 1, 2] and ds3.classes == list(SHAPE_NAMES[:3])


def test_shapes_mask_covers_exactly_the_shape():
    ds = ShapesDataset(16, image_size=32, noise=0.02, normalize=False)
    for i in range(16):
        img, _, mask = ds[i]
        assert mask.shape == (32, 32) and set(mask.unique().tolist()) == {0.0, 1.0}
        inside, outside = img[:, mask.bool()], img[:, ~mask.bool()]
        assert 0.02 < inside.shape[1] / mask.numel() < 0.6
        # The shape is one color and the background another: each region is uniform up to the noise,
        # which would fail if the mask were shifted or the wrong shape (both regions mixed).
        assert inside.std(dim=1).max() < 0.05 and outside.std(dim=1).max() < 0.05
        # The shape's brightest channel is >= 0.8, the background's every channel <= 0.3.
        assert (inside.mean(dim=1) - outside.mean(dim=1)).max() > 0.45


def test_draw_shape_hand_counted_areas():
    # Pixel centres at k + 0.5; square half-side 0.8 * r = 4 around 16 covers centres 12.5..19.5: 8 x 8.
    assert draw_shape(1, 32, 16.0, 16.0, 5.0).sum() == 64
    # Cross arms of half-width r/3 = 1 and half-length 3 around 16: 2 x 6 + 6 x 2 - 2 x 2 = 20 pixels.
    assert draw_shape(3, 32, 16.0, 16.0, 3.0).sum() == 20
    circle = draw_shape(0, 64, 32.0, 32.0, 10.0).sum()
    assert abs(circle - np.pi * 100) < 8
    tri = draw_shape(2, 64, 32.0, 32.0, 10.0)  # apex up: rows widen towards the base
    widths = tri.sum(dim=1)
    assert widths[23] <= widths[28] <= widths[40] and abs(tri.sum() - 200) < 12  # area = base * height / 2
    with pytest.raises(ValueError, match="unknown shape kind 4"):
        draw_shape(4, 8, 4, 4, 2)


def test_shapes_normalization_and_display_roundtrip():
    ds = ShapesDataset(256, image_size=16, seed=1)
    x = torch.stack([ds[i][0] for i in range(256)])
    assert x.mean(dim=(0, 2, 3)).abs().max() < 0.1
    assert (x.std(dim=(0, 2, 3)) - 1).abs().max() < 0.1
    dm = ShapesDataModule(num_train=32, num_val=32, image_size=16, batch_size=8, seed=1)
    dm.setup("fit")
    probes = ProbeSet.from_dataset(dm.val_set, num=8, mean=dm.mean, std=dm.std)
    assert probes.masks is not None and probes.masks.shape == (8, 16, 16)
    assert np.bincount(probes.labels.numpy()).tolist() == [2, 2, 2, 2]
    raw = torch.stack([dm.val_set.raw(int(i))[0] for i in probes.indices])
    torch.testing.assert_close(probes.display_images(), raw, atol=1e-5, rtol=0)


def test_shapes_datamodule_batches_and_disjoint_splits():
    dm = ShapesDataModule(num_train=24, num_val=8, image_size=16, batch_size=8, seed=0)
    dm.setup("fit")
    x, y, m = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 3, 16, 16) and y.shape == (8,) and m.shape == (8, 16, 16)
    assert len(dm.val_dataloader().dataset) == 8 and dm.mean == dm.train_set.mean
    assert not any(torch.equal(dm.train_set[i][0], dm.val_set[i][0]) for i in range(8))
    assert dm.classes == ["circle", "square", "triangle", "cross"]
    with pytest.raises(ValueError, match="num_classes must be between 1 and 4"):
        ShapesDataModule(num_classes=5)


# ----------------------------------------------------------------------------- digits
def test_digits_shapes_split_and_normalization():
    dm = DigitsDataModule(image_size=16, val_fraction=0.2, seed=0)
    assert len(dm.train_set) + len(dm.val_set) == 1797 and len(dm.val_set) == 359
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (64, 1, 16, 16) and y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) <= 9
    imgs = dm.train_set.images
    assert abs(float(imgs.mean())) < 1e-4 and abs(float(imgs.std()) - 1) < 1e-4
    assert len(dm.mean) == len(dm.std) == 1 and dm.num_classes == 10 and dm.in_channels == 1
    same = DigitsDataModule(image_size=16, seed=0)
    other = DigitsDataModule(image_size=16, seed=1)
    assert torch.equal(same.val_set.labels, dm.val_set.labels)
    assert not torch.equal(other.val_set.images, dm.val_set.images)
    # Un-normalizing gives the [0, 1] pixels back; at 8 px they are sklearn's values / 16.
    from sklearn.datasets import load_digits

    x8, _y8 = load_digit_images(8)
    assert torch.equal(x8[5, 0], torch.as_tensor(load_digits().images[5], dtype=torch.float32) / 16)
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)


# ----------------------------------------------------------------------------- image folder
def _write_pngs(root, classes=("cat", "dog"), n=5, size=20):
    from PIL import Image

    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(n):
            color = (40 * c + 10, 100, 200 - i)
            Image.new("RGB", (size, size + 4), color).save(os.path.join(root, name, f"{i}.png"))


def test_image_folder_split_labels_and_normalization(tmp_path):
    _write_pngs(tmp_path)
    dm = ImageFolderDataModule(str(tmp_path), image_size=16, val_fraction=0.2, batch_size=4, seed=0)
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2 and dm.mean == IMAGENET_MEAN
    assert len(dm.train_set) == 8 and len(dm.val_set) == 2
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    x, y = dm.val_set[0]
    assert x.shape == (3, 16, 16) and y == dm.val_set.targets[0]
    pixel = (torch.tensor([40 * y + 10, 100, 200 - 0]) / 255)[:2]  # R and G do not depend on the image index
    expect = (pixel - torch.tensor(IMAGENET_MEAN[:2])) / torch.tensor(IMAGENET_STD[:2])
    torch.testing.assert_close(x[:2, 8, 8], expect, atol=1e-5, rtol=0)
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (4, 3, 16, 16) and yb.shape == (4,)
    again = ImageFolderDataModule(str(tmp_path), image_size=16, seed=0)
    assert again.val_set.indices == dm.val_set.indices


def test_image_folder_train_val_layout(tmp_path):
    _write_pngs(tmp_path / "train", n=3)
    _write_pngs(tmp_path / "val", n=2)
    dm = ImageFolderDataModule(str(tmp_path), image_size=8)
    assert len(dm.train_set) == 6 and len(dm.val_set) == 4 and dm.num_classes == 2


def test_image_folder_train_without_val_is_an_error_not_two_classes(tmp_path):
    """root/train + root/test (no val/) must not become a 2-class problem 'test' vs 'train'."""
    _write_pngs(tmp_path / "train", n=2)
    _write_pngs(tmp_path / "test", n=2)
    with pytest.raises(ValueError, match=r"has 'train' but no 'val' folder.*root/train/<class>.*root/val/<class>"):
        ImageFolderDataModule(str(tmp_path), image_size=8)


def test_image_folder_clear_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="does not exist") as e:
        ImageFolderDataModule(str(missing))
    assert str(missing) in str(e.value)
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolderDataModule(str(tmp_path))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match="no images") as e:
        ImageFolderDataModule(str(tmp_path))
    assert str(tmp_path) in str(e.value) and ".png" in str(e.value)


class _Items(torch.utils.data.Dataset):
    """Tiny images in the item formats real datasets use (``kind``)."""

    def __init__(self, kind: str, n: int = 12):
        g = torch.Generator().manual_seed(0)
        self.x, self.y, self.kind = torch.randn(n, 3, 8, 8, generator=g), torch.arange(n) % 3, kind

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        x, y = self.x[i], self.y[i]
        return {
            "index": (x, y, torch.tensor(i)),  # a third element that is no mask
            "weights": (x, y, torch.ones(5)),
            "mask": (x, y, (x[:1] > 0).float()),  # [1, H, W]: a mask
            "hf": {"pixel_values": x, "labels": y},
            "class_id": {"img": x, "class_id": int(y)},
            "onehot": (x, torch.nn.functional.one_hot(y, 3).float()),
            "smoothed": (x, torch.nn.functional.one_hot(y, 3).float() * 0.9 + 0.1 / 3),
            "multilabel": (x, torch.tensor([1.0, 1.0, 0.0])),
            "nokey": {"picture": x, "label": y},
        }[self.kind]


@pytest.mark.parametrize("kind", ["index", "weights", "mask", "hf", "class_id", "onehot", "smoothed", "multilabel"])
def test_probes_read_real_item_formats(kind):
    ds = _Items(kind)
    p = ProbeSet.from_dataset(ds, num=6, seed=0)
    idx = p.indices
    torch.testing.assert_close(p.images, ds.x[idx])
    if kind == "multilabel":  # several classes at once: no class label
        assert p.labels is None
    else:  # a class index, or the class a one-hot / smoothed label gives most weight to
        assert torch.equal(p.labels, ds.y[idx])
    if kind == "mask":
        assert torch.equal(p.masks, (ds.x[idx, 0] > 0).float())
    else:  # an index, per-item weights, ...: not a mask
        assert p.masks is None


def test_unreadable_items_fail_at_setup_naming_the_callback_and_the_accepted_keys(tmp_path):
    import lightning as L
    from helpers import LitTiny, tiny_trainer
    from torch.utils.data import DataLoader

    from lightning_viz.callbacks.activations import ActivationCallback
    from lightning_viz.callbacks.base import VisualizationError

    steps = []

    class Count(L.Callback):
        def on_train_batch_start(self, *args):
            steps.append(1)

    trainer = tiny_trainer(str(tmp_path), [ActivationCallback(layers=["net.conv1"], num_probes=2), Count()])
    loader = DataLoader(_Items("nokey"), batch_size=4)
    with pytest.raises(VisualizationError, match=r"ActivationCallback: reading an item of the _Items dataset") as err:
        trainer.fit(LitTiny(), loader, loader)
    assert "['label', 'picture']" in str(err.value) and "'pixel_values'" in str(err.value)
    assert "probes=ProbeSet" in str(err.value) and steps == []


class _ItemsDataset(torch.utils.data.Dataset):
    """Items ``(x, y)`` from a list (images of any shape), for probe-picking failures."""

    def __init__(self, xs, ys):
        self.xs, self.ys = xs, ys

    def __len__(self):
        return len(self.xs)

    def __getitem__(self, i):
        return self.xs[i], self.ys[i]


@pytest.mark.parametrize("case", ["no_channel_dim", "sizes_differ"])
def test_unstackable_probe_images_fail_at_setup_with_one_clear_hint(tmp_path, case):
    """A grayscale [H, W] item (no channel dimension) and items of different sizes stop Trainer.fit before the
    first training step, naming the callback, the item's shape and the fix once (not a [N, C, H] probe set)."""
    from helpers import LitTiny, TinyCNN, tiny_trainer

    from lightning_viz import GradientCallback
    from lightning_viz.callbacks.base import VisualizationError

    class AddsChannel(TinyCNN):  # a grayscale model fed [B, H, W] batches
        def forward(self, x):
            return super().forward(x.unsqueeze(-3) if x.ndim == 3 else x)

    g = torch.Generator().manual_seed(0)
    if case == "no_channel_dim":
        xs = [torch.rand(8, 8, generator=g) for _ in range(6)]
        expected = r"GradientCallback: picking .*item \d gives an image of shape \[8, 8\]; a probe image is \[C, H, W\]"
    else:
        xs = [torch.rand(3, 8, 8 + 4 * (i % 2), generator=g) for i in range(6)]
        expected = r"GradientCallback: picking .*different sizes: .*\[3, 8, 12\].*Resize\(\(H, W\)\)"
    ys = [i % 3 for i in range(6)]
    loader = torch.utils.data.DataLoader(_ItemsDataset(xs, ys), batch_size=1)
    model = LitTiny(AddsChannel(in_channels=1) if case == "no_channel_dim" else None)
    trainer = tiny_trainer(str(tmp_path), callbacks=[GradientCallback(num_probes=4)])
    with pytest.raises(VisualizationError, match=expected) as info:
        trainer.fit(model, loader, loader)
    assert str(info.value).count("Resize") <= 1 and str(info.value).count("probes=ProbeSet") == 1
    assert trainer.global_step == 0


def test_uint8_probe_images_are_shown_as_pixels_not_min_max_stretched(tmp_path):
    """Dark uint8 images (0..60) and no mean/std: the probes read as pixels in [0, 255] (display x / 255 exactly,
    not stretched to [0, 1] per image), through a real Trainer.fit whose model divides by 255 itself."""
    from helpers import LitTiny, TinyCNN, read_events, tiny_trainer

    from lightning_viz import GradientCallback

    class FromBytes(TinyCNN):
        def forward(self, x):
            return super().forward(x.float() / 255)

    g = torch.Generator().manual_seed(0)
    xs = [torch.randint(0, 61, (3, 8, 8), generator=g, dtype=torch.uint8) for _ in range(6)]
    loader = torch.utils.data.DataLoader(_ItemsDataset(xs, [i % 3 for i in range(6)]), batch_size=3)
    cb = GradientCallback(num_probes=4)
    tiny_trainer(str(tmp_path), callbacks=[cb], max_epochs=1).fit(LitTiny(FromBytes()), loader, loader)
    p = cb.probes
    assert p.mean == [0.0] and p.std == [1 / 255]
    expected = torch.stack([xs[i] for i in p.indices.tolist()]).float() / 255
    torch.testing.assert_close(p.display_images(), expected, rtol=0, atol=1e-6)
    assert float(p.display_images().amax()) <= 60 / 255 + 1e-6
    assert {f"viz-gradients/panel/{i}" for i in p.ids} <= set(read_events(str(tmp_path)).Tags()["images"])
    # explicit float images keep min-max display (nothing known about their range)
    assert ProbeSet.from_indices(_ItemsDataset([x.float() for x in xs], [0] * 6), [0, 1]).mean is None
