"""The probe bank's 8-bit image codec (issue 9 item 14): images normalized from 8-bit pixels are stored as those
uint8 pixels and come back bit-identical; anything else keeps the exact float path. Real torchvision transforms on
real PIL images and PNG files, real ShapesDataset items, real checkpoints through ``Trainer.fit``."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import LitTiny, TinyCNN, tiny_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from torchvision import transforms

from lightning_viz.callbacks.embeddings import EmbeddingCallback
from lightning_viz.callbacks.gradients import GradientCallback
from lightning_viz.data.shapes import ShapesDataModule, ShapesDataset
from lightning_viz.probe import PROBE_BANK_KEY, ProbeSet, probe_bank_get, probe_bank_put

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def _size(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def _pil_normalized(n: int = 6, size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(uint8 pixels [N, 3, H, W], ToTensor + Normalize of the PIL images made from them)``."""
    q = torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    q[0, :, 0, 0] = torch.tensor([0, 255, 128], dtype=torch.uint8)  # both ends of the range
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    x = torch.stack([tf(Image.fromarray(p.permute(1, 2, 0).numpy())) for p in q])
    return q, x


def test_bank_stores_8bit_normalized_images_as_uint8_and_gives_back_the_bits():
    q, x = _pil_normalized()
    state = ProbeSet(images=x, labels=torch.arange(6), mean=MEAN, std=STD).state_dict()
    bank: dict = {}
    ref = probe_bank_put(bank, state)
    stored = bank["groups"][ref["images"]["group"]]
    assert ref["images"]["codec"] == "u8norm"
    assert stored.dtype == torch.uint8 and torch.equal(stored, q)  # the very pixels the images came from
    back = probe_bank_get(bank, ref)
    assert back["images"].dtype == torch.float32 and _bits(back["images"]) == _bits(x)
    assert back["mean"] == state["mean"] and back["std"] == state["std"]
    # A second probe set with the same statistics shares the rows; the same pixels under other statistics are
    # other images, so they get their own group.
    ref2 = probe_bank_put(bank, ProbeSet(images=x[2:4], mean=MEAN, std=STD).state_dict())
    assert ref2["images"]["group"] == ref["images"]["group"] and ref2["images"]["rows"].tolist() == [2, 3]
    assert bank["groups"][ref["images"]["group"]].shape[0] == 6
    other = ProbeSet(
        images=transforms.Normalize((0.5,) * 3, (0.25,) * 3)(q[:2].float() / 255), mean=[0.5] * 3, std=[0.25] * 3
    ).state_dict()
    ref3 = probe_bank_put(bank, other)
    assert ref3["images"]["codec"] == "u8norm" and ref3["images"]["group"] != ref["images"]["group"]
    assert _bits(probe_bank_get(bank, ref3)["images"]) == _bits(other["images"])


@pytest.mark.parametrize("case", ["not_8bit", "one_ulp_off", "no_stats", "nan", "float64"])
def test_images_not_from_8bit_pixels_keep_the_exact_float_path(case):
    _, x = _pil_normalized()
    mean, std = MEAN, STD
    if case == "not_8bit":
        x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    elif case == "one_ulp_off":
        x = x.clone()
        x[3, 1, 2, 2] = torch.nextafter(x[3, 1, 2, 2], torch.tensor(10.0))
    elif case == "no_stats":
        mean = std = None
    elif case == "nan":
        x = x.clone()
        x[0, 0, 0, 0] = float("nan")
    else:
        x = x.double()
    state = ProbeSet(images=x, mean=mean, std=std).state_dict()
    bank: dict = {}
    ref = probe_bank_put(bank, state)
    assert "codec" not in ref["images"] and ref["images"]["group"].startswith("images:")
    back = probe_bank_get(bank, ref)["images"]
    assert back.dtype == x.dtype and _bits(back) == _bits(x)


def test_unknown_codec_is_refused_with_a_clear_message():
    _, x = _pil_normalized()
    bank: dict = {}
    ref = probe_bank_put(bank, ProbeSet(images=x, mean=MEAN, std=STD).state_dict())
    ref["images"]["codec"] = "jpeg"
    with pytest.raises(ValueError, match="unknown image codec 'jpeg'.*newer lightning-viz"):
        probe_bank_get(bank, ref)


def test_shapes_probes_are_8bit_and_take_a_quarter_of_float32():
    ds = ShapesDataset(256, image_size=32, seed=3)
    raw = torch.stack([ds.raw(i)[0] for i in range(8)])
    assert torch.equal(raw * 255, (raw * 255).round()) and raw.min() >= 0 and raw.max() <= 1  # 8-bit pixels
    probes = ProbeSet.from_dataset(ds, num=256, mean=ds.mean, std=ds.std)
    bank: dict = {}
    ref = probe_bank_put(bank, probes.state_dict())
    assert ref["images"]["codec"] == "u8norm"
    assert _bits(probe_bank_get(bank, ref)["images"]) == _bits(probes.images)
    images_bank = {"groups": {ref["images"]["group"]: bank["groups"][ref["images"]["group"]]}}
    float_bytes = probes.images.numel() * 4
    assert 0.24 * float_bytes < _size(images_bank) < 0.27 * float_bytes


def test_image_folder_pngs_take_the_8bit_path(tmp_path):
    from lightning_viz.data.folder import ImageFolderDataModule

    g = torch.Generator().manual_seed(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            px = torch.randint(0, 256, (12, 10, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(px).save(tmp_path / cls / f"{i}.png")
    dm = ImageFolderDataModule(str(tmp_path), image_size=8, val_fraction=0.0)  # Resize on PIL, then ToTensor
    probes = ProbeSet.from_dataset(dm.train_set, num=6, mean=dm.mean, std=dm.std)
    bank: dict = {}
    ref = probe_bank_put(bank, probes.state_dict())
    assert ref["images"]["codec"] == "u8norm" and bank["groups"][ref["images"]["group"]].dtype == torch.uint8
    assert _bits(probe_bank_get(bank, ref)["images"]) == _bits(probes.images)


def _shapes_callbacks():
    return [
        GradientCallback(methods=["saliency"], num_probes=4, normalize="fixed"),
        EmbeddingCallback(num_probes=8, projection=["pca"]),
    ]


def test_checkpoint_with_8bit_probes_resumes_bit_exactly(tmp_path):
    cbs = _shapes_callbacks()
    ckdir = tmp_path / "ckpt"
    dm = ShapesDataModule(num_train=24, num_val=16, image_size=8, batch_size=8)
    trainer = tiny_trainer(
        str(tmp_path / "a"),
        cbs + [ModelCheckpoint(dirpath=ckdir, save_last=True)],
        max_epochs=1,
        enable_checkpointing=True,
    )
    trainer.fit(LitTiny(TinyCNN(num_classes=4)), datamodule=dm)
    ckpt = torch.load(ckdir / "last.ckpt", weights_only=False)
    [(group, stored)] = [(g, t) for g, t in ckpt[PROBE_BANK_KEY]["groups"].items() if g.startswith("images")]
    assert group.startswith("images/u8norm/") and stored.dtype == torch.uint8 and stored.shape == (8, 3, 8, 8)

    resumed = _shapes_callbacks()
    other = ShapesDataModule(num_train=24, num_val=16, image_size=8, batch_size=8, seed=5)  # other data: no re-pick
    tiny_trainer(str(tmp_path / "b"), resumed, max_epochs=2).fit(
        LitTiny(TinyCNN(num_classes=4)), datamodule=other, ckpt_path=str(ckdir / "last.ckpt")
    )
    for old, new in zip(cbs, resumed):
        for k, v in old.probes.state_dict().items():
            w = new.probes.state_dict()[k]
            assert (_bits(v) == _bits(w) and v.dtype == w.dtype) if isinstance(v, torch.Tensor) else v == w, k
