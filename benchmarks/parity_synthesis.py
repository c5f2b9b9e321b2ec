"""Parity of unit images (activation maximization) with torch-lucent ``render_vis`` and flashtorch ``GradientAscent``
(numbers: benchmarks/README.md, "Parity of the synthesis").

Neither peer is a dependency; install them apart (``--no-deps`` keeps torch as it is; torch-lucent imports kornia)::

    pip install --no-deps --target /tmp/peers torch-lucent flashtorch kornia kornia_rs
    PYTHONPATH=.:/tmp/peers python benchmarks/parity_synthesis.py

The same objective (channel 3 of ResNet-18 ``layer2``, mean activation; ``weights=None``, 10 classes, BatchNorm
statistics of 32 random images, eval) on the same start and parameterization; differences relative to ours' range.
"""

from __future__ import annotations

import copy
import importlib.util
import warnings

import numpy as np
import torch
import torchvision

from lightning_viz.capture import capture, isolated
from lightning_viz.methods.objectives import channel
from lightning_viz.methods.parameterization import FFTParam
from lightning_viz.methods.synthesis import optimize_input

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
SIZE, STEPS, CH = 64, 30, 3


def have(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        print(f"-- {module} not installed: skipped")
        return False
    return True


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None, num_classes=10)
    with torch.no_grad():
        m.train()(torch.randn(32, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)))
    return m.eval()


def diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def start() -> torch.Tensor:
    return 0.1 * torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))


def ours(model, param: str, optimizer: str = "adam", lr: float = 0.05, steps: int = STEPS) -> torch.Tensor:
    with isolated(model):
        return optimize_input(
            model,
            channel("layer2", [CH]),
            (1, 3, SIZE, SIZE),
            steps,
            lr,
            param=param,
            init=start(),
            optimizer=optimizer,
        ).images


def activation(model, x: torch.Tensor) -> float:
    """The objective (channel ``CH`` of ``layer2``, mean) at ``x``."""
    a = {}
    h = model.layer2.register_forward_hook(lambda m, i, o: a.__setitem__("o", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return round(float(a["o"][0, CH].mean()), 3)


def lucent(model) -> None:
    from lucent.optvis import objectives, render

    # the same FFT image (ours, no sigmoid, no "/ 4"), no transforms, no ImageNet normalization, no upsampling
    # (fixed_image_size = the image size: an identity resize), torch.optim.Adam(lr=0.05)
    p = FFTParam(start())
    imgs = render.render_vis(
        model,
        objectives.channel("layer2", CH),
        lambda: (p.params, p.image),
        transforms=[],
        thresholds=(STEPS,),
        preprocess=False,
        fixed_image_size=SIZE,
        progress=False,
        show_image=False,
    )
    theirs = torch.from_numpy(np.transpose(imgs[-1], (0, 3, 1, 2)))
    d = diff(theirs, ours(model, "fft"))
    print(f"torch-lucent render_vis (our FFT image, Adam 0.05, {STEPS} steps) vs ours: diff {d:.1e}")
    # its defaults: param.image(SIZE) (FFT / 4 through a sigmoid), standard_transforms, ImageNet normalize, upsampled
    # to 224 px when smaller, 512 steps
    import kornia
    from lucent.optvis import param as lparam

    for name in ("get_rotation_matrix2d", "warp_affine"):  # torch-lucent 0.1.8 predates kornia 0.6's move
        if not hasattr(kornia, name):
            setattr(kornia, name, getattr(kornia.geometry.transform, name))
    torch.manual_seed(0)
    np.random.seed(0)
    imgs = render.render_vis(
        model,
        objectives.channel("layer2", CH),
        lambda: lparam.image(SIZE),
        thresholds=(STEPS,),
        progress=False,
        show_image=False,
    )
    x = (torch.from_numpy(np.transpose(imgs[-1], (0, 3, 1, 2))) - MEAN) / STD
    acts = {name: activation(model, img) for name, img in (("theirs", x), ("fft", ours(model, "fft")))}
    acts["pixel"] = activation(model, ours(model, "pixel"))
    print(f"torch-lucent defaults ({STEPS} steps): activation at {SIZE} px {acts}")


def flashtorch(model) -> None:
    from flashtorch.activmax import GradientAscent

    g = GradientAscent(model, img_size=SIZE, lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = g.optimize(model.layer2[0].conv1, CH, input_=start().requires_grad_(True), num_iter=5)
        except Exception as exc:  # its backward hook on the first conv
            print(f"flashtorch GradientAscent failed: {type(exc).__name__}: {exc}")
            return
    # its step: x += lr * g / (rms(g) + 1e-5), g = d mean activation / d x: our objective's gradient, RMS-normalized
    x, objective = start().clone(), channel("layer2.0.conv1", [CH])
    for _ in range(5):
        x = x.requires_grad_(True)
        with capture(model, objective.layers, grad=True) as cap:
            score = objective(model(x), cap.outputs).sum()
        (gr,) = torch.autograd.grad(score, x)
        x = (x + gr / (gr.pow(2).mean().sqrt() + 1e-5)).detach()
    d = diff(out[-1].detach(), x)
    print(f"flashtorch GradientAscent (5 steps, lr 1) vs its step on our objective's gradient: diff {d:.1e}")


def main() -> None:
    model = net()
    for module, section in (("lucent", lucent), ("flashtorch", flashtorch)):
        if have(module):
            section(copy.deepcopy(model))


if __name__ == "__main__":
    main()
