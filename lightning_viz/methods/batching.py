"""Batch sizes from a memory budget, for every method that pushes many perturbed copies of the inputs
through the model (integrated-gradient path points, SmoothGrad samples, Score-CAM masks, occlusion
windows, deletion/insertion curves).

The activation memory of one image is measured once per (model, image shape, dtype, device) -- one
single-image no-grad forward summing every leaf module's output (:func:`activation_bytes_per_image`) --
and batches are filled up to ``memory_mb`` (:func:`images_per_forward`). A pass that also differentiates
keeps those activations for the backward and adds as much again for their gradients, so it counts
:data:`GRAD_FACTOR` x. The default budget (:func:`default_memory_mb`) is :data:`CPU_MEMORY_MB` on the
CPU and a quarter of the free memory (at most :data:`GPU_MEMORY_MB`) on a GPU, times the factor of
:func:`scaled_budget` (a callback that ran out of device memory computes again at half its budget). An explicit
``chunk_size`` always wins; results never depend on the batch size (each perturbed image is
evaluated independently; only the float rounding of batched kernels may differ, ~1e-7 relative).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = [
    "CPU_MEMORY_MB",
    "GPU_MEMORY_MB",
    "GRAD_FACTOR",
    "CPU_THROUGHPUT_MB",
    "CPU_MIN_IMAGES",
    "CPU_GRAD_MAX_IMAGES",
    "CPU_SCORECAM_MB",
    "CPU_SCORECAM_MAX_IMAGES",
    "activation_bytes_per_image",
    "default_memory_mb",
    "images_per_forward",
    "throughput_images",
    "grad_throughput_images",
    "scaled_budget",
]

#: default activation budget of one forward on the CPU, MiB
#: (resnet18 at 64 px: ~215 images per forward, ~107 with a backward)
CPU_MEMORY_MB = 512.0
#: cap of the default budget on a GPU, MiB (the default is a quarter of the free memory, at most this)
GPU_MEMORY_MB = 4096.0
#: a forward + backward holds about this many times the activations of a no-grad forward
GRAD_FACTOR = 2
#: on the CPU, the no-grad forwards of many perturbed images (deletion/insertion curves, occlusion windows) hold at
#: most this much activation memory at a time: larger batches leave the cache and cost more per image (SmallCNN at
#: 32 px, one thread: ~2x per image at 1360 images a forward than at 136-272; occlusion's 392 at once ~1.5x 144)
CPU_THROUGHPUT_MB = 48.0
#: ... but at least this many images a forward where the memory budget holds them: resnet18 at 224 px has ~29 MiB of
#: activations per image, so the cap alone gave one image per forward (74 vs 53 ms per image at 8, one thread)
CPU_MIN_IMAGES = 8
#: on the CPU, a forward + backward of many perturbed copies (integrated-gradient path points, SmoothGrad samples)
#: takes at most this many images at a time: larger batches gain nothing per image and cost more (2 threads,
#: integrated gradients: SmallCNN at 32 px, channels_last, 128 points 18.6 ms in one batch, 13.5-14.1 ms in batches
#: of 32-72; resnet18 at 64 px, 512 points 1092 ms in batches of 107, 1039 ms of 64, 1151 ms of 32, 1706 ms of 10)
CPU_GRAD_MAX_IMAGES = 64
#: on the CPU, Score-CAM's masked images (each a new input, its mask upsampled and normalized) go at most this much
#: activation memory and this many images a forward: resnet18 at 64 px, 2 threads, 2048 masked images (wall, against
#: torchcam's batches of 32 in one process): 20 a forward (CPU_THROUGHPUT_MB) 1.09-1.11x, 32 0.99-1.01x, 48 1.13x,
#: 64 1.12-1.19x; at 128 px (512 images) 8 0.87x, 16 0.82x, 32 1.07x. This budget gives 33 and 8 (CPU_MIN_IMAGES).
CPU_SCORECAM_MB = 80.0
CPU_SCORECAM_MAX_IMAGES = 64

_BUDGET_SCALE: ContextVar[float] = ContextVar("lightning_viz_budget_scale", default=1.0)

_MEASURED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]] = weakref.WeakKeyDictionary()


def activation_bytes_per_image(model: nn.Module, x1: Tensor) -> int:
    """Bytes of every leaf module's output in one no-grad forward of a single image ``x1[1, C, H, W]``,
    plus the image itself (hooks removed after); measured once per (model, shape, dtype, device), then cached.

    An upper-bound-ish estimate of what one more image in a no-grad forward batch costs.
    """
    key = (tuple(x1.shape[1:]), x1.dtype, str(x1.device))
    cache = _MEASURED.setdefault(model, {})
    if key in cache:
        return cache[key]
    total = [x1.numel() * x1.element_size()]

    def hook(_m, _i, out):
        if isinstance(out, Tensor):
            total[0] += out.numel() * out.element_size()

    handles = []
    try:  # a scripted module takes no hooks (its outputs go uncounted): none left behind on the others either
        for m in model.modules():
            if not list(m.children()) and not isinstance(m, torch.jit.ScriptModule):
                handles.append(m.register_forward_hook(hook))
        with torch.no_grad():
            model(x1[:1].detach())
    finally:
        for h in handles:
            h.remove()
    cache[key] = int(total[0])
    return cache[key]


def default_memory_mb(device: torch.device | str) -> float:
    """The default activation budget: :data:`CPU_MEMORY_MB` on the CPU; on CUDA a quarter of the memory
    available to torch -- free on the device plus what torch's caching allocator holds unused (after a
    training epoch most of the card is such cache, which ``mem_get_info`` counts as taken) -- at most
    :data:`GPU_MEMORY_MB` (at least :data:`CPU_MEMORY_MB`)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        budget = float(max(CPU_MEMORY_MB, min(GPU_MEMORY_MB, (free + max(0, cached)) / 4 / 2**20)))
    else:
        budget = CPU_MEMORY_MB
    return budget * _BUDGET_SCALE.get()


@contextlib.contextmanager
def scaled_budget(scale: float) -> Iterator[None]:
    """:func:`default_memory_mb` times ``scale`` (in ``(0, 1]``) inside the block (this thread / context only)."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1]; got {scale}")
    token = _BUDGET_SCALE.set(scale)
    try:
        yield
    finally:
        _BUDGET_SCALE.reset(token)


def images_per_forward(model: nn.Module, x: Tensor, memory_mb: Optional[float] = None, grad: bool = False) -> int:
    """How many images like ``x[0]`` fit one forward (``grad``: forward + backward) within ``memory_mb`` of
    activations (``None``: :func:`default_memory_mb` of ``x``'s device); at least 1."""
    if memory_mb is None:
        memory_mb = default_memory_mb(x.device)
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be > 0; got {memory_mb}")
    per_image = activation_bytes_per_image(model, x[:1]) * (GRAD_FACTOR if grad else 1)
    return max(1, int(memory_mb * 2**20 // max(per_image, 1)))


def throughput_images(
    model: nn.Module, x: Tensor, cpu_mb: Optional[float] = None, cpu_max_images: Optional[int] = None
) -> int:
    """Images like ``x[0]`` per no-grad forward of a method that pushes many perturbed copies (deletion/insertion
    curves, occlusion): as many as the default memory budget holds (:func:`images_per_forward`), on the CPU at most
    ``cpu_mb`` (default :data:`CPU_THROUGHPUT_MB`) of activations (cache-sized batches cost less per image) and
    ``cpu_max_images``, but at least :data:`CPU_MIN_IMAGES` images the budget holds."""
    budget = default_memory_mb(x.device)
    if x.device.type != "cpu":
        return images_per_forward(model, x, budget)
    chunk = images_per_forward(model, x, min(budget, CPU_THROUGHPUT_MB if cpu_mb is None else cpu_mb))
    if cpu_max_images is not None:
        chunk = min(chunk, cpu_max_images)
    return max(chunk, min(CPU_MIN_IMAGES, images_per_forward(model, x, budget)))


def grad_throughput_images(model: nn.Module, x: Tensor) -> int:
    """Images like ``x[0]`` per forward + backward of a method that pushes many perturbed copies (integrated-gradient
    path points, SmoothGrad samples): as many as the default memory budget holds (:func:`images_per_forward` with
    ``grad``), on the CPU at most :data:`CPU_GRAD_MAX_IMAGES`."""
    chunk = images_per_forward(model, x, grad=True)
    return min(chunk, CPU_GRAD_MAX_IMAGES) if x.device.type == "cpu" else chunk
