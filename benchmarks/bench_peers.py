"""Side by side: every lightning-viz method at its defaults against Captum, pytorch-grad-cam and torchcam.

One run times, for each method, our implementation (pure ``lightning_viz.methods`` functions inside
``capture.isolated``, exactly what the callbacks call, with every option at its default), each peer
that implements the method (with its fastest reasonable settings), and the *floor*: the model's own
batched forward + ``torch.autograd.grad`` of the target logits w.r.t. the input. The machine this was
written on is shared and noisy, so repeats are *interleaved*: every repeat runs floor, ours and each
peer once (in alternating order), and the ratios reported are medians of the per-repeat ratios.

Peers are optional, dev-only dependencies (``pip install captum grad-cam torchcam``); a missing one
is reported and skipped. Captum runs on a frozen copy of the model (it needs no parameter gradients);
torchcam and pytorch-grad-cam need ``requires_grad`` parameters (documented usage: they backpropagate
into them), so they get a copy whose parameters require grad.

    python benchmarks/bench_peers.py                                   # resnet18, 64 px, 16 probes, 2 threads
    python benchmarks/bench_peers.py --device cuda --size 224 --batch 64
    python benchmarks/bench_peers.py --methods gradcam,guided_backprop --repeats 9
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import io
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import redirect_stderr
from typing import Optional

import torch
import torchvision

from lightning_viz.capture import isolated
from lightning_viz.layers import last_conv_name
from lightning_viz.methods import cam as C
from lightning_viz.methods import gradients as G
from lightning_viz.methods.occlusion import default_window, occlusion
from lightning_viz.methods.shared_pass import INPUT, PassCache

Fn = Callable[[], object]


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(kind: str) -> Callable[[], float]:
    return time.process_time if kind == "cpu" else time.perf_counter


def build_groups(args, model, frozen, trainable, x, labels, layer_name):
    """``[(method, ours, {peer: fn}, floor batch or None)]``; peers only where installed."""
    lab_list = [int(v) for v in labels]
    layer_f, layer_t = frozen.get_submodule(layer_name), trainable.get_submodule(layer_name)
    size = tuple(x.shape[-2:])
    sigma = 0.15 * float(x.max() - x.min())  # ours: 0.15 of each image's range; Captum takes an absolute stdev
    win, stride = default_window(size)
    captum = have("captum")
    tcam = have("torchcam")
    pgc = have("pytorch_grad_cam")
    if captum:
        from captum import attr as ca
    if tcam:
        import torchcam.methods as tm
    if pgc:
        import pytorch_grad_cam as pg
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pg_targets = [ClassifierOutputTarget(c) for c in lab_list]

    def torchcam_fn(cls, **kw):
        def run():
            with tm.__dict__[cls](trainable, layer_name, **kw) as extractor:
                out = trainable(x)
                return extractor(lab_list, out)

        return run

    def pg_fn(cls):
        def run():
            with redirect_stderr(io.StringIO()):  # ScoreCAM draws progress bars
                cam = getattr(pg, cls)(model=trainable, target_layers=[layer_t])
                try:
                    return cam(input_tensor=x, targets=pg_targets)
                finally:
                    cam.activations_and_grads.release()

        return run

    def captum_cam(cls, **kw):
        def run():
            a = getattr(ca, cls)(frozen, layer_f).attribute(x, target=labels, **kw)
            return ca.LayerAttribution.interpolate(a, size, "bilinear") if a.shape[-2:] != size else a

        return run

    groups: list[tuple[str, Fn, dict[str, Fn], Optional[int]]] = []

    def add(name: str, ours: Fn, peers: dict[str, Optional[Fn]], floor_batch: Optional[int] = None) -> None:
        groups.append((name, ours, {k: v for k, v in peers.items() if v is not None}, floor_batch))

    add(
        "saliency",
        lambda: G.saliency(model, x, "label", labels),
        {"Captum Saliency": (lambda: ca.Saliency(frozen).attribute(x, target=labels)) if captum else None},
    )
    add(
        "input_x_gradient",
        lambda: G.input_x_gradient(model, x, "label", labels),
        {"Captum InputXGradient": (lambda: ca.InputXGradient(frozen).attribute(x, target=labels)) if captum else None},
    )
    add(
        "guided_backprop",
        lambda: G.guided_backprop(model, x, "label", labels),
        {"Captum GuidedBackprop": (lambda: ca.GuidedBackprop(frozen).attribute(x, target=labels)) if captum else None},
    )
    add(
        "deconvnet",
        lambda: G.deconvnet(model, x, "label", labels),
        {"Captum Deconvolution": (lambda: ca.Deconvolution(frozen).attribute(x, target=labels)) if captum else None},
    )
    steps = args.ig_steps
    add(
        f"integrated_gradients ({steps} steps)",
        lambda: G.integrated_gradients(model, x, "label", labels, steps=steps),
        {
            f"Captum IntegratedGradients (internal_batch_size={args.peer_batch})": (
                lambda: ca.IntegratedGradients(frozen).attribute(
                    x, target=labels, n_steps=steps, method="riemann_middle", internal_batch_size=args.peer_batch
                )
            )
            if captum
            else None
        },
    )
    n = args.sg_samples
    add(
        f"smoothgrad saliency ({n} samples)",
        lambda: G.smoothgrad(G.saliency, model, x, "label", labels, n_samples=n),
        {
            "Captum NoiseTunnel(Saliency) (nt_samples_batch_size=8)": (
                lambda: ca.NoiseTunnel(ca.Saliency(frozen)).attribute(
                    x, target=labels, nt_type="smoothgrad", nt_samples=n, nt_samples_batch_size=8, stdevs=sigma
                )
            )
            if captum
            else None
        },
    )
    cam_peers = {
        "gradcam": (
            {
                "Captum LayerGradCam": captum_cam("LayerGradCam") if captum else None,
                "torchcam GradCAM": torchcam_fn("GradCAM") if tcam else None,
                "pytorch-grad-cam GradCAM": pg_fn("GradCAM") if pgc else None,
            }
        ),
        "gradcampp": {
            "torchcam GradCAMpp": torchcam_fn("GradCAMpp") if tcam else None,
            "pytorch-grad-cam GradCAMPlusPlus": pg_fn("GradCAMPlusPlus") if pgc else None,
        },
        "xgradcam": {
            "torchcam XGradCAM": torchcam_fn("XGradCAM") if tcam else None,
            "pytorch-grad-cam XGradCAM": pg_fn("XGradCAM") if pgc else None,
        },
        "layercam": {
            "torchcam LayerCAM": torchcam_fn("LayerCAM") if tcam else None,
            "pytorch-grad-cam LayerCAM": pg_fn("LayerCAM") if pgc else None,
        },
        "cam": {"torchcam CAM": torchcam_fn("CAM", fc_layer="fc") if tcam else None},
    }
    for m, peers in cam_peers.items():
        add(f"{m} ({layer_name})", lambda m=m: C.class_activation_map(model, x, layer_name, m, "label", labels), peers)
    add(
        f"guided_gradcam ({layer_name})",
        lambda: C.guided_class_activation_map(model, x, layer_name, "guided_gradcam", "label", labels),
        {
            "Captum GuidedGradCam": (lambda: ca.GuidedGradCam(frozen, layer_f).attribute(x, target=labels))
            if captum
            else None
        },
    )
    # Score-CAM: K = 512 masked forwards per probe on resnet18; timed on the first --scorecam-probes probes
    # (floor and peers too), or one run would take minutes on a CPU
    xs, ls = x[: args.scorecam_probes], labels[: args.scorecam_probes]
    ls_list = lab_list[: args.scorecam_probes]

    def torchcam_score():
        with tm.ScoreCAM(trainable, layer_name, input_shape=tuple(x.shape[1:])) as extractor:
            return extractor(ls_list, trainable(xs))

    def pg_score():
        with redirect_stderr(io.StringIO()):
            cam = pg.ScoreCAM(model=trainable, target_layers=[layer_t])
            try:
                return cam(input_tensor=xs, targets=pg_targets[: args.scorecam_probes])
            finally:
                cam.activations_and_grads.release()

    add(
        f"scorecam ({layer_name}, {len(xs)} probes)",
        lambda: C.class_activation_map(model, xs, layer_name, "scorecam", "label", ls),
        {
            "torchcam ScoreCAM (batch_size=32)": torchcam_score if tcam else None,
            "pytorch-grad-cam ScoreCAM": pg_score if pgc else None,
        },
        floor_batch=len(xs),
    )
    add(
        f"occlusion (default window {win[0]}, stride {stride[0]})",
        lambda: occlusion(model, x, "label", labels),
        {
            f"Captum Occlusion (perturbations_per_eval={args.peer_batch // 2})": (
                lambda: ca.Occlusion(frozen).attribute(
                    x,
                    target=labels,
                    sliding_window_shapes=(x.shape[1],) + win,
                    strides=(x.shape[1],) + stride,
                    baselines=0.0,
                    perturbations_per_eval=args.peer_batch // 2,
                )
            )
            if captum
            else None
        },
    )

    def shared_five():  # what the callbacks do: saliency + four CAMs read off one pass
        cache = PassCache()
        cache.register("label", None, [INPUT, layer_name])
        res = cache.get(model, x, "probe", "label", labels, [INPUT])
        G.gradient_from_pass("saliency", x, res.input_grad)
        for m in ("gradcam", "gradcampp", "xgradcam", "layercam"):
            C.cam_from_pass(cache.get(model, x, "probe", "label", labels, [layer_name]), layer_name, m, size)

    add("5 maps, one shared pass (saliency + 4 CAMs)", shared_five, {})
    return groups


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", help="torchvision architecture (weights=None)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="probe images")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per method (median)")
    ap.add_argument("--ig-steps", type=int, default=32)
    ap.add_argument("--sg-samples", type=int, default=32)
    ap.add_argument("--peer-batch", type=int, default=128, help="Captum internal_batch_size (occlusion: half of it)")
    ap.add_argument("--scorecam-probes", type=int, default=4, help="probes Score-CAM is timed on (512 forwards each)")
    ap.add_argument("--methods", default="", help="comma-separated substrings of the method names to run")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time or process CPU time")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(weights=None, num_classes=args.classes).to(device).eval()
    frozen = copy.deepcopy(model).requires_grad_(False)
    trainable = copy.deepcopy(model)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)
    layer = last_conv_name(model).rsplit(".", 2)[0] if args.arch.startswith("resnet") else last_conv_name(model)
    missing = [
        p
        for p, mod in (("captum", "captum"), ("grad-cam", "pytorch_grad_cam"), ("torchcam", "torchcam"))
        if not have(mod)
    ]
    if missing:
        print(f"peers not installed, skipped: {', '.join(missing)} (pip install {' '.join(missing)})")

    def make_floor(n: Optional[int]) -> Fn:
        def floor():
            xi = x[:n].clone().requires_grad_(True)
            (g,) = torch.autograd.grad(frozen(xi).gather(1, labels[:n, None]).sum(), xi)
            return g

        return floor

    now = clock(args.clock)

    def timed(fn: Fn) -> float:
        sync(device)
        t = now()
        fn()
        sync(device)
        return now() - t

    with isolated(model):
        groups = build_groups(args, model, frozen, trainable, x, labels, layer)
        wanted = [w.strip() for w in args.methods.split(",") if w.strip()]
        groups = [g for g in groups if not wanted or any(w in g[0] for w in wanted)]
        print(
            f"{args.arch} {args.size}px, {args.batch} probes, {args.threads} threads, {device}, {args.clock} clock, "
            f"{args.repeats} interleaved repeats, torch {torch.__version__}"
        )
        print(
            "| method | ours ms | ours x floor | best peer | peer ms | peer x floor | ours / best peer "
            "| other peers x floor |"
        )
        print("|---|---:|---:|---|---:|---:|---:|---|")
        for name, ours, peers, floor_batch in groups:
            impls = {"floor": make_floor(floor_batch), "ours": ours, **peers}
            for key, fn in list(impls.items()):  # warm-up; a peer that fails is reported and dropped
                try:
                    fn()
                except Exception as exc:
                    if key in ("floor", "ours"):
                        raise
                    print(f"  ({key} failed on {name}: {type(exc).__name__}: {exc}; skipped)", file=sys.stderr)
                    del impls[key]
            times: dict[str, list[float]] = {k: [] for k in impls}
            order = list(impls)
            for r in range(args.repeats):
                for key in order if r % 2 == 0 else order[::-1]:
                    times[key].append(timed(impls[key]))
            ratio = {k: statistics.median(a / f for a, f in zip(v, times["floor"])) for k, v in times.items()}
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            peer_keys = [k for k in impls if k not in ("floor", "ours")]
            if peer_keys:
                best = min(peer_keys, key=lambda k: ratio[k])
                vs = statistics.median(a / b for a, b in zip(times["ours"], times[best]))
                others = ", ".join(f"{k} {ratio[k]:.2f}" for k in peer_keys if k != best) or "-"
                print(
                    f"| {name} | {med['ours']:.1f} | {ratio['ours']:.2f} | {best} | {med[best]:.1f} "
                    f"| {ratio[best]:.2f} "
                    f"| **{vs:.3f}** | {others} |"
                )
            else:
                print(f"| {name} | {med['ours']:.1f} | {ratio['ours']:.2f} | - | - | - | - | - |")
            sys.stdout.flush()
        print(f"floor (forward + input backward): {statistics.median(times['floor']) * 1e3:.1f} ms in the last group")


if __name__ == "__main__":
    main()
