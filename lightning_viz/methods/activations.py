"""Feature maps: the activations of chosen layers for a batch of images (Zeiler & Fergus 2014, Sec. 2;
Yosinski et al. 2015, "Understanding Neural Networks Through Deep Visualization", Sec. 2 live activations).

One batched forward pass (per chunk) with forward hooks from :func:`lightning_viz.capture.capture`;
the hooks keep copies, so a following in-place ReLU does not alter what is recorded (the layer's
own output, e.g. pre-activation for a conv followed by ``ReLU(inplace=True)``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..capture import capture, detect_layouts
from .checks import check_chunk_size, check_images, input_matches_model

__all__ = ["feature_maps"]


def feature_maps(
    model: nn.Module, x: Tensor, layers: str | Iterable[str], chunk_size: int | None = None
) -> dict[str, Tensor]:
    """Outputs of ``layers`` (one name or several) for ``x[B, C, H, W]``: ``{name: Tensor[B, C', h, w]}`` (Zeiler &
    Fergus 2014).

    The caller controls train/eval mode (use :func:`lightning_viz.capture.isolated` on a live model).
    ``chunk_size`` bounds memory: the batch is processed ``chunk_size`` images at a time (same values).

    Raises:
        ValueError: a layer's output is not a 4-D ``[B, C, h, w]`` feature map.
    """
    check_images("feature_maps", x)
    names = [layers] if isinstance(layers, str) else list(layers)  # one name is a layer, not its characters
    chunk_size = check_chunk_size(chunk_size)
    step = x.shape[0] if chunk_size is None else chunk_size
    parts: dict[str, list[Tensor]] = {n: [] for n in names}
    with torch.no_grad(), capture(model, names) as cap, input_matches_model("feature_maps", model, x):
        detect_layouts(model, x, names)  # a Swin stage, a ViT block: read as [B, C, h, w] maps
        for start in range(0, max(x.shape[0], 1), max(step, 1)):  # an empty batch: one empty pass, empty maps
            cap.clear()
            model(x[start : start + step])
            for n in names:
                out = cap[n]
                if out.ndim != 4:
                    raise ValueError(
                        f"feature_maps: layer {n!r} outputs shape {tuple(out.shape)}, not a [B, C, h, w] feature map; "
                        "choose a convolutional layer or block."
                    )
                parts[n].append(out)
    return {n: torch.cat(p, dim=0) for n, p in parts.items()}
