"""Gradient receptive fields: every position's backward against the middle row and column's (translation equivariance).

:func:`~lightning_viz.methods.receptive_field.gradient_receptive_field` runs one backward per output position and
trial (resnet18's layer3 at 224 px: 14 x 14 positions x 2 trials = 392); :func:`gradient_receptive_boxes` (what
``receptive_field`` and TopPatchesCallback use) gets the same boxes from the middle column, the middle row and 16
check positions. Both run interleaved in one process, ``--repeats`` times; the script reports the boxes' equality,
the positions each computes and the median of the per-repeat time ratios (ratio: full / rows-and-columns).

    python benchmarks/bench_receptive_field.py --arch resnet18 --layers layer2,layer3 --size 224 [--device cuda]

``--fast arithmetic`` times ``receptive_field``'s ``auto`` (layer arithmetic followed op by op through residual sums,
concatenations and gates: one forward) against the rows-and-columns gradient boxes it replaced on branched models
(both ``_unclip``-ed as ``auto`` returns them; ratio: gradient / arithmetic):

    python benchmarks/bench_receptive_field.py --fast arithmetic --arch resnet50 --layers layer3,layer4 --repeats 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torchvision

from lightning_viz.methods.receptive_field import (
    _probe_positions,
    _unclip,
    gradient_receptive_boxes,
    gradient_receptive_field,
    receptive_field,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", help="torchvision architecture (weights=None)")
    ap.add_argument("--layers", default="layer2,layer3")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--width", type=int, default=None, help="image width (default: --size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--fast", choices=["rows", "arithmetic"], default="rows", help="what to time against the full")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(weights=None).eval().to(device)
    shape = (3, args.size, args.width or args.size)
    if args.fast == "arithmetic":
        return against_arithmetic(model, args, shape, device)
    print(f"{args.arch} {shape[1]}x{shape[2]}, {args.threads} threads, {device}, {args.repeats} interleaved repeats")
    print("| layer | grid | positions (full / rows+columns) | boxes equal | full s | rows+columns s | ratio |")
    print("|---|---|---:|---|---:|---:|---:|")

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t

    for layer in args.layers.split(","):
        full_s, fast_s, ratios, equal = [], [], [], True
        for r in range(args.repeats):
            order = [0, 1] if r % 2 == 0 else [1, 0]
            res = {}
            for k in order:
                if k == 0:
                    (_, boxes), s = timed(partial(gradient_receptive_field, model, layer, shape))
                    res["full"] = (boxes, s)
                else:
                    boxes, s = timed(partial(gradient_receptive_boxes, model, layer, shape))
                    res["fast"] = (boxes, s)
            equal &= torch.equal(res["full"][0], res["fast"][0])
            full_s.append(res["full"][1])
            fast_s.append(res["fast"][1])
            ratios.append(res["full"][1] / res["fast"][1])
        h, w = res["full"][0].shape[:2]
        full, fast, ratio = (statistics.median(v) for v in (full_s, fast_s, ratios))
        print(
            f"| {layer} | {h}x{w} | {h * w} / {len(_probe_positions(h, w))} | {equal} | {full:.1f} | {fast:.1f} "
            f"| **{ratio:.2f}** |",
            flush=True,
        )


def against_arithmetic(model: torch.nn.Module, args: argparse.Namespace, shape: tuple, device: torch.device) -> None:
    print(f"{args.arch} {shape[1]}x{shape[2]}, {args.threads} threads, {device}, {args.repeats} interleaved repeats")
    print(
        "| layer | grid | backward images (gradient / arithmetic) | boxes equal | gradient s | arithmetic s | ratio |"
    )
    print("|---|---|---:|---|---:|---:|---:|")
    for layer in args.layers.split(","):
        grad_s, arith_s, ratios, equal = [], [], [], True
        for r in range(args.repeats):
            res = {}
            for k in [0, 1] if r % 2 == 0 else [1, 0]:
                t = time.perf_counter()
                if k == 0:
                    boxes = _unclip(gradient_receptive_boxes(model, layer, shape), shape[1], shape[2])
                else:
                    boxes = receptive_field(model, layer, shape)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                res[k] = (boxes, time.perf_counter() - t)
            equal &= torch.equal(res[0][0], res[1][0])
            grad_s.append(res[0][1])
            arith_s.append(res[1][1])
            ratios.append(res[0][1] / res[1][1])
        h, w = res[0][0].shape[:2]
        g, a, ratio = (statistics.median(v) for v in (grad_s, arith_s, ratios))
        print(
            f"| {layer} | {h}x{w} | {2 * len(_probe_positions(h, w))} / 0 | {equal} | {g:.1f} | {a:.2f} "
            f"| **{ratio:.0f}** |",
            flush=True,
        )


if __name__ == "__main__":
    main()
