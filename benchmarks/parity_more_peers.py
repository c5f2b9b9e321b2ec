"""Parity of the maps and metrics with TorchRay, Quantus, Zennit and torch-lucent (numbers: benchmarks/README.md).

None of these peers is a dependency; install them apart from the environment (``--no-deps`` keeps torch and numpy
as they are; Quantus also imports pandas and scikit-image, torch-lucent kornia)::

    pip install --no-deps --target /tmp/peers torchray quantus zennit torch-lucent pandas scikit-image lazy_loader \
        kornia kornia_rs
    PYTHONPATH=.:/tmp/peers python benchmarks/parity_more_peers.py

A missing peer is reported and its section skipped. Scores: worst per-image correlation and largest difference
relative to the largest value of ours (``corr`` / ``diff``); metrics: largest difference or disagreement count.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import warnings
from functools import partial

import numpy as np
import torch
import torchvision

from lightning_viz.methods import cam as C
from lightning_viz.methods import gradients as G
from lightning_viz.methods.metrics import (
    _resize,
    curve_auc,
    energy_in_mask,
    perturbation_curve,
    pointing_game,
    rank_correlation,
)
from lightning_viz.methods.occlusion import occlusion, spread_to_pixels
from lightning_viz.methods.parameterization import COLOR_CORRELATION_SVD_SQRT, FFTParam
from lightning_viz.targets import LabelTarget


def have(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        print(f"-- {module} not installed: skipped")
        return False
    return True


def nets() -> dict[str, torch.nn.Module]:
    """ResNet-18 and VGG-11 (``weights=None``, 10 classes, eval); ResNet-18 also with BatchNorm statistics of 32
    random images (activations O(1), as in a trained net)."""
    out = {}
    for name in ("resnet18", "vgg11"):
        torch.manual_seed(0)
        net = getattr(torchvision.models, name)(weights=None, num_classes=10).eval()
        out[name] = net
    bn = copy.deepcopy(out["resnet18"]).train()
    with torch.no_grad():
        bn(torch.randn(32, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    out["resnet18+bn"] = bn.eval()
    return out


def images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def show(what: str, ours: torch.Tensor, peer: torch.Tensor) -> None:
    a, b = ours.detach().double().flatten(1), peer.detach().double().flatten(1)
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (ac * bc).sum(1) / (ac.norm(dim=1) * bc.norm(dim=1)).clamp_min(1e-300)
    diff = (a - b).abs().amax(1) / a.abs().amax(1).clamp_min(1e-300)
    print(f"{what:70s} corr {float(corr.min()):.6f}  diff {float(diff.max()):.1e}")


def torchray() -> None:
    from torchray.attribution.deconvnet import deconvnet
    from torchray.attribution.grad_cam import grad_cam
    from torchray.attribution.gradient import gradient
    from torchray.attribution.guided_backprop import guided_backprop
    from torchray.benchmark.pointing_game import PointingGame

    x = images(2, 64)
    layers = {"resnet18": ["layer4", "layer3"], "vgg11": ["features.19", "features.18"]}
    for name, net in nets().items():
        y = net(x).argmax(1)
        peer: dict[str, list[torch.Tensor]] = {}
        for i in range(len(x)):  # TorchRay takes one image and an int class, and backpropagates into the model
            xi, c, m = x[i : i + 1].clone().requires_grad_(True), int(y[i]), copy.deepcopy(net)
            for key, fn in (("saliency", gradient), ("guided_backprop", guided_backprop), ("deconvnet", deconvnet)):
                peer.setdefault(key, []).append(fn(m, xi, c)[:, 0])
            for layer in layers[name.split("+")[0]]:
                peer.setdefault(layer, []).append(grad_cam(m, xi, c, saliency_layer=layer, resize=True)[:, 0])
        show(f"TorchRay saliency {name}", G.saliency(net, x, "label", y), torch.cat(peer["saliency"]))
        for key in ("guided_backprop", "deconvnet"):
            ours = getattr(G, key)(net, x, "label", y).abs().amax(1)
            show(f"TorchRay {key} (max |.| over channels) {name}", ours, torch.cat(peer[key]))
        for layer in layers[name.split("+")[0]]:
            show(
                f"TorchRay grad_cam {name} {layer}",
                C.class_activation_map(net, x, layer, "gradcam", "label", y),
                torch.cat(peer[layer]),
            )
        if name == "vgg11":  # features.18 is a conv rectified in place by features.19: TorchRay reads the ReLU's map
            ours = C.class_activation_map(net, x, "features.19", "gradcam", "label", y)
            show("TorchRay grad_cam vgg11 features.18 vs ours at features.19", ours, torch.cat(peer["features.18"]))

    g = torch.Generator().manual_seed(0)
    n, h = 400, 32
    maps = torch.rand(n, 8, 8, generator=g)
    maps[::7] = maps[::7].round()  # ties
    masks = torch.zeros(n, h, h, dtype=torch.bool)
    for i in range(n):
        (y0, x0), (dy, dx) = torch.randint(0, h - 4, (2,), generator=g).tolist(), torch.randint(1, 8, (2,), generator=g)
        masks[i, y0 : y0 + dy, x0 : x0 + dx] = True
    sal = _resize(maps, (h, h)).flatten(1)
    peaks = sal.argmax(1)  # TorchRay's examples/attribution_benchmark.py: argmax of the flat map, (x, y)
    for tol in (0, 1, 2, 5, 15):
        game = PointingGame(1, tolerance=tol)
        theirs = torch.tensor([game.evaluate(masks[i], (int(peaks[i] % h), int(peaks[i] // h))) == 1 for i in range(n)])
        same = (pointing_game(maps, masks, tol) == theirs.float()).sum()
        line = f"TorchRay PointingGame tolerance {tol:2d}: ours (<= tol) agrees on {int(same)}/{n}"
        if tol:
            shifted = (pointing_game(maps, masks, math.sqrt(tol * tol - 1)) == theirs.float()).sum()
            line += f"; ours at sqrt(tol^2 - 1) on {int(shifted)}/{n}"
        print(line)


def quantus() -> None:
    import quantus as q

    net = nets()["resnet18+bn"]
    g = torch.Generator().manual_seed(0)
    b, h = 8, 48  # 48 * 48 pixels: divisible by PixelFlipping's features_in_step below
    x = torch.rand(b, 3, h, h, generator=g)
    x[0, 0, 0, 0] = 0.0  # Quantus' "black" baseline is the batch minimum: 0, our "zero"
    y = net(x).argmax(1)
    sal = G.saliency(net, x, "label", y)
    masks = torch.zeros(b, h, h)
    for i in range(b):
        y0, x0 = torch.randint(0, h - 10, (2,), generator=g).tolist()
        masks[i, y0 : y0 + 10, x0 : x0 + 12] = 1
    masks[1] = 0  # no object
    kw = dict(model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=sal[:, None].numpy(), device="cpu")
    kw["s_batch"] = masks[:, None].numpy()

    theirs = np.array(q.PointingGame(disable_warnings=True)(**kw), dtype=float)
    print("Quantus PointingGame:", theirs, "ours:", pointing_game(sal, masks).numpy())
    tied = sal.clone()
    tied[:, 0, 0] = tied[:, 20, 20] = tied.flatten(1).amax(1) + 1  # two maxima, the second on the object
    spot = torch.zeros(b, h, h)
    spot[:, 20, 20] = 1
    theirs = np.array(
        q.PointingGame(disable_warnings=True)(
            **{**kw, "a_batch": tied[:, None].numpy(), "s_batch": spot[:, None].numpy()}
        ),
        dtype=float,
    )
    print("Quantus PointingGame, tied maxima:", theirs, "ours:", pointing_game(tied, spot).numpy())

    signed = G.gradient(net, x, "label", y).sum(1)
    ours = energy_in_mask(signed, masks).numpy()
    for opts in ({}, {"abs": False, "positive_attributions": True}):
        theirs = np.array(
            q.AttributionLocalisation(disable_warnings=True, **opts)(**{**kw, "a_batch": signed[:, None].numpy()}),
            dtype=float,
        )
        print(
            f"Quantus AttributionLocalisation {opts}: max diff {np.nanmax(np.abs(theirs - ours)):.1e}, NaN at",
            np.flatnonzero(np.isnan(theirs)),
            "ours",
            np.flatnonzero(np.isnan(ours)),
        )

    for px, steps in ((64, 36), (192, 12)):  # a 3-channel map: Quantus flips channel entries, 3 per pixel
        flip = q.PixelFlipping(features_in_step=3 * px, perturb_baseline="black", disable_warnings=True)
        theirs = np.array(flip(**{**kw, "a_batch": np.repeat(sal[:, None].numpy(), 3, axis=1)}))
        curve = perturbation_curve(net, x, sal, y, None, "deletion", steps, "zero")
        auc = np.trapezoid(theirs, axis=1)
        want = steps * curve_auc(curve).numpy() - (curve[:, 0] + curve[:, 1]).numpy() / 2
        print(
            f"Quantus PixelFlipping {px} px a step: curve vs ours[1:] max diff "
            f"{np.abs(theirs - curve[:, 1:].numpy()).max():.1e}; its AUC vs steps * ours - (p0 + p1) / 2: "
            f"{np.abs(auc - want).max():.1e}"
        )

    x2 = images(6, 32)
    y2 = net(x2).argmax(1)

    def explain(model, inputs, targets, **_):
        return G.saliency(model.eval(), torch.as_tensor(inputs), "label", torch.as_tensor(targets))[:, None].numpy()

    theirs = np.array(
        q.MPRT(return_last_correlation=True, disable_warnings=True)(
            model=net, x_batch=x2.numpy(), y_batch=y2.numpy(), a_batch=None, explain_func=explain, device="cpu"
        )
    )
    wrapped = q.helpers.model.pytorch_model.PyTorchModel(net, channel_first=True, softmax=False, device="cpu")
    *_, (_, randomized) = wrapped.get_random_layer_generator(order="top_down", seed=42)
    ours = rank_correlation(G.saliency(net, x2, "label", y2), G.saliency(randomized.eval(), x2, "label", y2)).numpy()
    print(
        "Quantus MPRT (last layer) vs our rank_correlation on its randomized model: max diff "
        f"{np.abs(theirs - ours).max():.1e}"
    )


def zennit() -> None:
    from zennit.attribution import Gradient, IntegratedGradients, Occlusion, SmoothGrad, occlude_independent
    from zennit.composites import DeconvNet, GuidedBackprop

    x = images(2, 32)
    for name, net in nets().items():
        y = net(x).argmax(1)
        onehot = torch.eye(10)[y]

        def z(cls, composite=None, out=None, net=net, onehot=onehot, **kw):
            with cls(net, composite, **kw) as attributor:
                return attributor(x.clone(), onehot if out is None else out)[1]

        show(f"Zennit Gradient {name}", G.gradient(net, x, "label", y), z(Gradient))
        show(f"Zennit GuidedBackprop {name}", G.guided_backprop(net, x, "label", y), z(Gradient, GuidedBackprop()))
        show(f"Zennit DeconvNet {name}", G.deconvnet(net, x, "label", y), z(Gradient, DeconvNet()))
        for n in (8, 32):
            ig = z(IntegratedGradients, n_iter=n)
            show(f"Zennit IntegratedGradients n={n} {name}", G.integrated_gradients(net, x, "label", y, steps=n), ig)
            right = G._path_average(net, x, torch.zeros_like(x), torch.arange(1, n + 1.0) / n, LabelTarget(), y, 64) * x
            show(f"  our path average at k/n (the paper's right sum) {name}", right, ig)
        logit = net(x).gather(1, y[:, None])[:, 0, None, None]

        def pick(out, onehot=onehot):  # Occlusion scores attr_output(output).sum(): a callable, not the one-hot
            return out * onehot

        hide = partial(occlude_independent, fill_fn=torch.zeros_like, invert=True)  # occlude the window
        for stride in (8, 4):
            ours = spread_to_pixels(
                occlusion(net, x, "label", y, window=8, stride=stride, fill="zero")["score"], (32, 32), 8, stride
            )
            theirs = (64 // stride**2) * logit - z(Occlusion, out=pick, occlusion_fn=hide, window=8, stride=stride)[
                :, 0
            ]
            show(
                f"Zennit Occlusion(invert=True) stride {stride}: windows * s(x) - it {name}",
                ours,
                theirs / (64 // stride**2),
            )
            if stride == 4:
                show(
                    f"  pixels 4..27 only (no wrapped-around window) {name}",
                    ours[:, 4:28, 4:28],
                    theirs[:, 4:28, 4:28] / 4,
                )
        show(
            f"Zennit Occlusion default (keeps the window, occludes the rest) {name}",
            ours,
            z(Occlusion, out=pick, window=8, stride=8)[:, 0],
        )
        n = 128
        ours = G.smoothgrad(G.gradient, net, x, "label", y, n_samples=n, sigma=0.1)
        show(f"Zennit SmoothGrad n={n} (other noise) {name}", ours, z(SmoothGrad, noise_level=0.1, n_iter=n))
        show(
            f"  ours seed 0 vs seed 1 (the Monte Carlo floor) {name}",
            ours,
            G.smoothgrad(G.gradient, net, x, "label", y, n_samples=n, sigma=0.1, seed=1),
        )


def lucent() -> None:
    from lucent.optvis import transform
    from lucent.optvis.param.color import color_correlation_normalized, to_valid_rgb
    from lucent.optvis.param.spatial import fft_image

    for h, w in ((32, 32), (31, 45)):
        for decay in (1.0, 1.5):
            torch.manual_seed(0)
            (spectrum,), image_f = fft_image((2, 3, h, w), sd=0.01, decay_power=decay)
            ours = FFTParam(torch.zeros(2, 3, h, w), decay_power=decay, decorrelate=True)
            with torch.no_grad():
                ours.spectrum.copy_(spectrum[..., : w // 2 + 1, :])  # odd w: torch-lucent's extra column is unused
            theirs = torch.logit(to_valid_rgb(image_f, decorrelate=True)().double()).float() * 4  # undo sigmoid, /4
            show(f"torch-lucent fft_image + to_valid_rgb {h}x{w} decay {decay} (4 logit)", ours.image(), theirs)
    ours_m = COLOR_CORRELATION_SVD_SQRT / COLOR_CORRELATION_SVD_SQRT.norm(dim=0).max()
    print(
        "torch-lucent color_correlation_normalized: max diff "
        f"{np.abs(color_correlation_normalized - ours_m.numpy()).max():.1e}"
    )
    img = torch.rand(1, 3, 16, 16)
    np.random.seed(0)
    dx, dy = (int(v) for v in np.random.choice(8, 2))
    np.random.seed(0)
    theirs = transform.jitter(8)(img)
    ours = torch.roll(img, shifts=(dy, dx), dims=(-2, -1))
    print(
        f"torch-lucent jitter(8) by ({dx}, {dy}) vs our roll: away from the wrapped border max diff "
        f"{(theirs - ours)[..., dy:, dx:].abs().max():.1e}; on it torch-lucent fills "
        f"{theirs[..., :dy, :].abs().max():.1e}"
    )


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    for module, section in (("torchray", torchray), ("quantus", quantus), ("zennit", zennit), ("lucent", lucent)):
        if have(module):
            section()
