"""Ablation-CAM at a deep layer: ours (what precedes the layer once per image and chunk, its output copied per
ablated channel) against pytorch-grad-cam's AblationCAM (a whole forward per ablated channel, ``batch_size=32``).

Both run interleaved in one process ``--repeats`` times; the script prints the largest difference of the min-max
normalized maps and the median of per-repeat time ratios (pytorch-grad-cam / ours).

    python benchmarks/bench_ablation_cam.py --arch resnet18 --layer layer4 --size 224 --probes 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

from lightning_viz.capture import isolated
from lightning_viz.layers import get_layer
from lightning_viz.methods import cam as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", help="torchvision architecture (weights=None)")
    ap.add_argument("--layer", default="layer4")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--probes", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from pytorch_grad_cam import AblationCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(weights=None).eval()
    x = torch.rand(args.probes, 3, args.size, args.size)
    labels = torch.arange(args.probes) % 10

    def minmax(m: torch.Tensor) -> torch.Tensor:
        m = m - m.flatten(1).amin(1)[:, None, None]
        return m / m.flatten(1).amax(1).clamp_min(1e-7)[:, None, None]

    ours_s, peer_s, ratios, diff = [], [], [], 0.0
    for r in range(args.repeats):
        res = {}
        for k in (0, 1) if r % 2 == 0 else (1, 0):
            t = time.perf_counter()
            if k == 0:
                with isolated(model):
                    res[k] = C.class_activation_map(model, x, args.layer, "ablationcam", target="label", labels=labels)
            else:
                with AblationCAM(model=model, target_layers=[get_layer(model, args.layer)]) as cam:
                    res[k] = torch.as_tensor(
                        cam(input_tensor=x, targets=[ClassifierOutputTarget(int(c)) for c in labels])
                    )
            res[k + 2] = time.perf_counter() - t
        diff = max(diff, float((minmax(res[0]) - res[1]).abs().max()))
        ours_s.append(res[2])
        peer_s.append(res[3])
        ratios.append(res[3] / res[2])
    print(f"{args.arch} {args.layer}, {args.size} px, {args.probes} probe(s), {args.threads} threads")
    print("| ours s | pytorch-grad-cam s | pytorch-grad-cam / ours | max map difference |")
    print("|---:|---:|---:|---:|")
    print(
        f"| {statistics.median(ours_s):.1f} | {statistics.median(peer_s):.1f} | **{statistics.median(ratios):.1f}** "
        f"| {diff:.1e} |"
    )


if __name__ == "__main__":
    main()
