"""Time every gradient / CAM method against the model's own batched forward + backward.

The reference is one forward + ``torch.autograd.grad`` of the summed target logit w.r.t. the input
batch (eval mode, frozen parameters) -- the least any gradient method can cost. Each method is then
timed on the same batch and reported as ``time / reference``: ~1 for single-pass methods (saliency,
Grad-CAM, ...), ~2 for Guided Grad-CAM (plain + guided pass), ~steps for integrated gradients,
~samples for SmoothGrad. The last rows time several methods read off one shared pass
(:class:`lightning_viz.methods.shared_pass.PassCache`) against running them one by one.

    python benchmarks/bench_methods.py --arch resnet18 --size 64 --batch 16 [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torchvision

from lightning_viz.capture import isolated
from lightning_viz.layers import last_conv_name
from lightning_viz.methods import cam as C
from lightning_viz.methods import gradients as G
from lightning_viz.methods.shared_pass import INPUT, PassCache


def timeit(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", help="torchvision architecture (weights=None)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ig-steps", type=int, default=8)
    ap.add_argument("--sg-samples", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=args.classes).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    layer = last_conv_name(model)

    with isolated(model):

        def reference():
            xi = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(model(xi).gather(1, labels[:, None]).sum(), xi)
            return g

        methods: dict[str, Callable[[], object]] = {
            "saliency": lambda: G.saliency(model, x, "label", labels),
            "guided_backprop": lambda: G.guided_backprop(model, x, "label", labels),
            "deconvnet": lambda: G.deconvnet(model, x, "label", labels),
            "input_x_gradient": lambda: G.input_x_gradient(model, x, "label", labels),
            f"integrated_gradients (steps={args.ig_steps})": lambda: G.integrated_gradients(
                model, x, "label", labels, steps=args.ig_steps
            ),
            f"smoothgrad_saliency (n={args.sg_samples})": lambda: G.smoothgrad(
                G.saliency, model, x, "label", labels, n_samples=args.sg_samples
            ),
        }
        for m in C.CAM_METHODS:
            if m == "cam":
                try:
                    C.cam_head(model, dict(model.named_modules())[layer].out_channels, layer)
                except ValueError:
                    continue
            methods[f"{m} ({layer})"] = lambda m=m: C.class_activation_map(model, x, layer, m, "label", labels)
        methods[f"guided_gradcam ({layer})"] = lambda: C.guided_class_activation_map(
            model, x, layer, "guided_gradcam", "label", labels
        )

        def shared():
            cache = PassCache()
            cache.register("label", None, [INPUT, layer])  # as the callbacks do at setup
            res = cache.get(model, x, "probe", "label", labels, [INPUT])
            G.gradient_from_pass("saliency", x, res.input_grad)
            for m in ("gradcam", "gradcampp", "xgradcam", "layercam"):
                C.cam_from_pass(cache.get(model, x, "probe", "label", labels, [layer]), layer, m, x.shape[-2:])

        def separate():
            G.saliency(model, x, "label", labels)
            for m in ("gradcam", "gradcampp", "xgradcam", "layercam"):
                C.class_activation_map(model, x, layer, m, "label", labels)

        methods["5 methods, one shared pass"] = shared
        methods["5 methods, one pass each"] = separate

        ref = timeit(reference, device, args.repeats)
        name = f"{args.arch} {args.size}px batch {args.batch} on {device}"
        print(f"{name}: forward+backward {ref * 1e3:.1f} ms ({args.batch / ref:.0f} img/s)")
        print(f"{'method':48s} {'ms':>9s} {'x fwd+bwd':>10s}")
        for label, fn in methods.items():
            t = timeit(fn, device, args.repeats)
            print(f"{label:48s} {t * 1e3:9.1f} {t / ref:10.2f}")


if __name__ == "__main__":
    main()
