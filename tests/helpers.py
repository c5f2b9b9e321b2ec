"""Shared test utilities: tiny models, tiny data, event-file reading, and 'training untouched' checks."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_viz.callbacks.maps import MapCallback


class RecordingWriter:
    """Stands in for a SummaryWriter: keeps what was written."""

    def __init__(self):
        self.images: dict[str, list] = {}
        self.scalars: dict[str, list] = {}
        self.layouts: list = []

    def add_image(self, tag, img, step, dataformats="HWC"):
        self.images.setdefault(tag, []).append((step, img))

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, []).append((step, value))

    def add_custom_scalars(self, layout):
        self.layouts.append(layout)

    def flush(self):
        pass

    def last_images(self) -> dict:
        """The last image written under each tag."""
        return {tag: written[-1][1] for tag, written in self.images.items()}


class TinyCNN(nn.Module):
    """conv-bn-ReLU(inplace) -> conv -> F.relu -> GAP -> linear: in-place and functional relu, a CAM head."""

    def __init__(self, in_channels: int = 3, num_classes: int = 3, width: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(self.pool(x).flatten(1))


class LitTiny(L.LightningModule):
    """Minimal classifier LightningModule around any nn.Module (attribute ``net``)."""

    def __init__(self, net: nn.Module | None = None, lr: float = 0.05):
        super().__init__()
        self.net = net if net is not None else TinyCNN()
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class InputGradMap(MapCallback):
    """Test-only map method: ``|d logit_label / d x|``, max over channels (Simonyan et al. 2014, Sec. 3.1)."""

    method = "inputgrad"

    def compute_maps(self, pl_module, probe):
        x = probe.to(pl_module.device, pl_module.dtype).requires_grad_()
        score = pl_module(x).gather(1, probe.labels.to(x.device).view(-1, 1)).sum()
        (g,) = torch.autograd.grad(score, x)
        return {"inputgrad/input": g.abs().amax(dim=1)}


def tiny_dataset(n: int = 48, channels: int = 3, size: int = 8, num_classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = torch.randn(n, channels, size, size, generator=g) * 0.5
    x[:, 0] += y.view(-1, 1, 1).float()  # learnable signal
    return TensorDataset(x, y)


def trained_tiny_cnn(steps: int = 40, width: int = 4, n: int = 48) -> tuple[TinyCNN, torch.Tensor, torch.Tensor]:
    """A TinyCNN fitted (seeded, plain full-batch SGD) to ``tiny_dataset(n)``; returns ``(model, x, y)``."""
    torch.manual_seed(0)
    model = TinyCNN(width=width)
    x, y = tiny_dataset(n).tensors
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def tiny_loaders(n: int = 48, batch_size: int = 8, **kw) -> tuple[DataLoader, DataLoader]:
    ds = tiny_dataset(n, **kw)
    return DataLoader(ds, batch_size=batch_size), DataLoader(ds, batch_size=batch_size)


def tiny_trainer(logdir: str, callbacks=(), max_epochs: int = 2, **kw) -> L.Trainer:
    from lightning.pytorch.loggers import TensorBoardLogger

    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("accelerator", "cpu")
    if "logger" not in kw:  # logger=False (or another logger) may be given
        kw["logger"] = TensorBoardLogger(logdir, name="", version=0)
    return L.Trainer(
        max_epochs=max_epochs,
        callbacks=list(callbacks),
        enable_progress_bar=False,
        enable_model_summary=False,
        devices=1,
        log_every_n_steps=1,
        **kw,
    )


def read_events(logdir: str):
    """An EventAccumulator over every event file under ``logdir`` (all images/scalars kept)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True)
    assert files, f"no event files under {logdir}"
    acc = EventAccumulator(os.path.dirname(files[0]), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def image_steps(acc, tag: str) -> list[int]:
    """The steps of ``tag``'s images in the order they were written. (Several event files in one directory are read
    in name order, and with TensorBoard's per-process file counter past 9 or 99 within one second, names sort out of
    creation order: hence by wall time, which keeps the file order of equal times.)"""
    return [e.step for e in sorted(acc.Images(tag), key=lambda e: e.wall_time)]


def scalar_steps(acc, tag: str) -> list[int]:
    """As :func:`image_steps`, for scalars."""
    return [e.step for e in sorted(acc.Scalars(tag), key=lambda e: e.wall_time)]


def snapshot(model: nn.Module) -> dict:
    """Everything a visualization must not change: parameters, .grad, buffers, modes, hooks, requires_grad, RNG."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: (
                len(m._forward_hooks),
                len(m._forward_pre_hooks),
                len(m._backward_hooks),
                len(getattr(m, "_backward_pre_hooks", {})),
            )
            for n, m in model.named_modules()
        },
        "rng": torch.get_rng_state().clone(),
    }


def assert_untouched(before: dict, after: dict) -> None:
    for n, p in before["params"].items():
        assert torch.equal(p, after["params"][n]), f"parameter {n} changed"
    for n, g in before["grads"].items():
        g2 = after["grads"][n]
        assert (g is None) == (g2 is None), f".grad of {n} changed (None-ness)"
        if g is not None:
            assert torch.equal(g, g2), f".grad of {n} changed"
    assert before["requires_grad"] == after["requires_grad"], "requires_grad flags changed"
    for n, b in before["buffers"].items():
        assert torch.equal(b, after["buffers"][n]), f"buffer {n} changed"
    assert before["modes"] == after["modes"], "module train/eval modes changed"
    assert before["hooks"] == after["hooks"], "hooks left behind"
    assert torch.equal(before["rng"], after["rng"]), "global RNG state consumed"


def check_untouched(model: nn.Module, fn: Callable[[], object]):
    """Run ``fn`` and assert it left ``model`` (and the global RNG) exactly as it was; returns fn's result."""
    before = snapshot(model)
    out = fn()
    assert_untouched(before, snapshot(model))
    return out
