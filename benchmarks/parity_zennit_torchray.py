"""Parity of the gradient methods and Grad-CAM / HiResCAM with Zennit and TorchRay on five torchvision nets
(numbers: benchmarks/README.md, "Parity with Zennit and TorchRay on five architectures").

Neither peer is a dependency; install them apart from the environment (``--no-deps`` keeps torch as it is)::

    pip install --no-deps --target /tmp/peers zennit torchray
    PYTHONPATH=.:/tmp/peers python benchmarks/parity_zennit_torchray.py                  # 64 px
    PYTHONPATH=.:/tmp/peers python benchmarks/parity_zennit_torchray.py --size 224 --as-built

ResNet-18, VGG-16-BN, DenseNet-121, MobileNetV3-small and EfficientNet-B0, ``weights=None``, seed 0, eval, 10
classes, target the predicted class; by default with BatchNorm statistics of 32 random images (activations O(1), as
in a trained net), ``--as-built`` without. A missing peer is reported and its section skipped. Score: worst per-image
correlation and largest difference relative to the largest value of ours (``corr`` / ``diff``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import warnings

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lightning_viz.layers import default_cam_layer
from lightning_viz.methods import cam as C
from lightning_viz.methods import gradients as G
from lightning_viz.targets import LabelTarget

ARCHS = ("resnet18", "vgg16_bn", "densenet121", "mobilenet_v3_small", "efficientnet_b0")


def have(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        print(f"-- {module} not installed: skipped")
        return False
    return True


def net(name: str, size: int, as_built: bool) -> nn.Module:
    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(weights=None, num_classes=10)
    if not as_built:
        with torch.no_grad():
            m.train()(torch.randn(32, 3, size, size, generator=torch.Generator().manual_seed(1)))
    return m.eval()


def densenet_relu_module(m: nn.Module) -> nn.Module:
    """torchvision's DenseNet with the ``F.relu(features, inplace=True)`` of its ``forward`` as an ``nn.ReLU`` module
    (``"1"``): the same function, now seen by module-hook peers (Zennit's rules, TorchRay's probe)."""
    return nn.Sequential(m.features, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1), m.classifier).eval()


def show(what: str, ours: torch.Tensor, peer: torch.Tensor) -> None:
    a, b = ours.detach().double().flatten(1), peer.detach().double().flatten(1)
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    corr = (ac * bc).sum(1) / (ac.norm(dim=1) * bc.norm(dim=1)).clamp_min(1e-300)
    diff = (a - b).abs().amax(1) / a.abs().amax(1).clamp_min(1e-300)
    print(f"{what:78s} corr {float(corr.min()):.6f}  diff {float(diff.max()):.1e}", flush=True)


def zennit(m: nn.Module, x: torch.Tensor, y: torch.Tensor, tag: str, samples: int) -> None:
    from zennit.attribution import Gradient, IntegratedGradients, SmoothGrad
    from zennit.composites import DeconvNet, GuidedBackprop

    onehot = torch.eye(10)[y]

    def z(model, cls, composite=None, **kw):
        with cls(model, composite, **kw) as attributor:
            return attributor(x.clone(), onehot)[1]

    show(f"Zennit Gradient {tag}", G.gradient(m, x, "label", y), z(m, Gradient))
    for key, comp in (("guided_backprop", GuidedBackprop), ("deconvnet", DeconvNet)):
        ours = getattr(G, key)(m, x, "label", y)
        show(f"Zennit {comp.__name__} {tag}", ours, z(m, Gradient, comp()))
        if tag.startswith("densenet121"):  # Zennit's rules sit on nn.ReLU modules: not on forward's F.relu
            show(f"  with DenseNet's F.relu as an nn.ReLU {tag}", ours, z(densenet_relu_module(m), Gradient, comp()))
    n = 16
    ig = z(m, IntegratedGradients, n_iter=n)
    ours = G.integrated_gradients(m, x, "label", y, steps=n)
    show(f"Zennit IntegratedGradients n={n} vs ours (midpoints) {tag}", ours, ig)
    right = G._path_average(m, x, torch.zeros_like(x), torch.arange(1, n + 1.0) / n, LabelTarget(), y, 64) * x
    show(f"  our path average at k/n (its right sum) {tag}", right, ig)
    if samples:
        ours = G.smoothgrad(G.gradient, m, x, "label", y, n_samples=samples, sigma=0.1)
        theirs = z(m, SmoothGrad, noise_level=0.1, n_iter=samples)
        show(f"Zennit SmoothGrad n={samples} (other noise) {tag}", ours, theirs)
        again = G.smoothgrad(G.gradient, m, x, "label", y, n_samples=samples, sigma=0.1, seed=1)
        show(f"  ours seed 0 vs seed 1 (the Monte Carlo floor) {tag}", ours, again)


def torchray(m: nn.Module, x: torch.Tensor, y: torch.Tensor, tag: str) -> None:
    from torchray.attribution.deconvnet import deconvnet
    from torchray.attribution.grad_cam import grad_cam
    from torchray.attribution.gradient import gradient
    from torchray.attribution.guided_backprop import guided_backprop
    from torchray.attribution.linear_approx import linear_approx

    layer = default_cam_layer(m, x)
    peer: dict[str, list[torch.Tensor]] = {}
    for i in range(len(x)):  # TorchRay takes one image and an int class, and backpropagates into the model
        xi, c, mi = x[i : i + 1].clone().requires_grad_(True), int(y[i]), copy.deepcopy(m)
        for key, fn in (("saliency", gradient), ("guided_backprop", guided_backprop), ("deconvnet", deconvnet)):
            peer.setdefault(key, []).append(fn(mi, xi, c)[:, 0])
        peer.setdefault("grad_cam", []).append(grad_cam(mi, xi, c, saliency_layer=layer, resize=True)[:, 0])
        peer.setdefault("linear_approx", []).append(linear_approx(mi, xi, c, saliency_layer=layer)[:, 0])
    show(f"TorchRay gradient {tag}", G.saliency(m, x, "label", y), torch.cat(peer["saliency"]))
    for key in ("guided_backprop", "deconvnet"):
        ours = getattr(G, key)(m, x, "label", y).abs().amax(1)
        show(f"TorchRay {key} (max |.| over channels) {tag}", ours, torch.cat(peer[key]))
    ours = C.class_activation_map(m, x, layer, "gradcam", "label", y)
    show(f"TorchRay grad_cam {tag} {layer}", ours, torch.cat(peer["grad_cam"]))
    if tag.startswith("densenet121"):  # norm5 is rectified in place by forward's F.relu; TorchRay reads after it
        relu = densenet_relu_module(m)
        at_relu = C.class_activation_map(relu, x, "1", "gradcam", "label", y)
        show(f"  ours at the ReLU after norm5 (as an nn.ReLU) {tag}", at_relu, torch.cat(peer["grad_cam"]))
    # linear_approx = sum_k A_k G_k at the layer's resolution, signed, not resized: ReLU, then bilinear = HiResCAM
    approx = torch.cat(peer["linear_approx"])
    up = F.interpolate(approx.relu()[:, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
    show(
        f"TorchRay linear_approx, ReLU + bilinear vs hirescam {tag} {layer}",
        C.class_activation_map(m, x, layer, "hirescam", "label", y),
        up,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--as-built", action="store_true", help="no BatchNorm statistics (activations ~1e-9..1e-13)")
    p.add_argument("--smoothgrad-samples", type=int, default=32, help="0: skip SmoothGrad")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (see the README: DenseNet and 2 threads)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    peers = [s for s, mod in ((zennit, "zennit"), (torchray, "torchray")) if have(mod)]
    x = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(3))
    for name in args.archs.split(","):
        m = net(name, args.size, args.as_built)
        y = m(x).argmax(1)
        tag = f"{name} {args.size}px{' as built' if args.as_built else ''}"
        for section in peers:
            if section is zennit:
                zennit(m, x, y, tag, args.smoothgrad_samples)
            else:
                torchray(m, x, y, tag)


if __name__ == "__main__":
    main()
