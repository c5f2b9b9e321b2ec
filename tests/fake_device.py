"""A stand-in accelerator for CPU-only runs: every tensor "on the device" is a fake one, so a method that builds a
tensor on the CPU and mixes it with device tensors fails here as it would on a GPU.

:class:`FakeDevice` is PyTorch's own ``FakeTensorMode`` (whose device checks are the ones real kernels make:
"Expected all tensors to be on the same device", CPU zero-dim tensors and CPU index tensors allowed) with
:data:`DEVICE` -- ``lazy`` -- standing in for ``cuda``: a fake ``cuda`` device runs forwards, but the autograd
engine asks CUDA for the streams of fake CUDA tensors and fails without a GPU, and ``meta`` refuses ``.item()``
(and ``torch.as_tensor(value, device="meta")`` gives a real meta tensor); a fake ``lazy`` device (the lazy-tensor
backend, built into every torch) takes all of it and is touched by no branch of the package.
On top of that mode:

* CPU work runs for real (an op with no fake tensor and no device argument): index lists, seeded noise,
  ``.tolist()`` of CPU tensors behave as they do;
* device -> host copies (``.cpu()``, ``.tolist()``, ``.numpy()`` after ``.cpu()``) give real zeros of the shape and
  dtype, and device scalars read on the host (``.item()``, ``bool()``, ``float()``) read ``read_as`` (0; ``bool``:
  ``read_as != 0``; integers 0), ``torch.equal`` ``False``;
  ``nonzero`` (boolean masks) finds nothing. The values are meaningless (only devices, shapes and dtypes are
  checked), so control flow that depends on them takes its "nothing found" branch;
* a random op on the device with a CPU ``torch.Generator`` raises, as CUDA does ("Expected a 'cuda' device
  type for generator").

What it cannot see: ``torch.cuda`` calls (``mem_get_info``), CUDA-only kernels and numerics, CUDA RNG use,
streams, host syncs, code that branches on ``device.type == "cuda"`` (tests/cuda_checks.py covers those on a GPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import _pytree as pytree

aten = torch.ops.aten

#: the stand-in device (see the module doc for why not a fake "cuda")
DEVICE = torch.device("lazy", 0)


class FakeDevice(FakeTensorMode):
    """``FakeTensorMode`` for :data:`DEVICE` tensors, the CPU for real (see the module doc)."""

    def __init__(self, read_as: float = 0.0) -> None:
        super().__init__(allow_non_fake_inputs=True)
        self.read_as = read_as

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        fakes = [a for a in pytree.arg_tree_leaves(*args, **kwargs) if isinstance(a, FakeTensor)]
        device = kwargs.get("device")
        if device is not None and torch.device(device).type == DEVICE.type and torch.device(device).index is None:
            device = kwargs["device"] = DEVICE  # as torch gives "cuda" its index 0 (FakeTensorMode does not for "lazy")
        target = torch.device(device) if device is not None else (fakes[0].device if fakes else torch.device("cpu"))
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and gen.device.type != target.type:
            raise RuntimeError(
                f"Expected a '{target.type}' device type for generator but found '{gen.device.type}' ({func})"
            )
        if not fakes and target.type == "cpu":
            return func(*args, **kwargs)  # the CPU side runs for real
        if fakes and func is aten._to_copy.default and target.type == "cpu":
            src = args[0]
            return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)  # device -> host: real zeros
        if func is aten._local_scalar_dense.default:
            t = args[0]
            return bool(self.read_as) if t.dtype == torch.bool else self.read_as if t.is_floating_point() else 0
        if func is aten.equal.default:
            return False
        if func is aten.nonzero.default:
            return super().__torch_dispatch__(
                aten.new_empty.default, types, (args[0], [0, args[0].dim()]), {"dtype": torch.long}
            )
        return super().__torch_dispatch__(func, types, args, kwargs)


@contextlib.contextmanager
def fake_device(read_as: float = 0.0) -> Iterator[FakeDevice]:
    """Inside: ``module.to(DEVICE)`` replaces the module's parameters by fake ones (move a copy); tensors moved or
    created on :data:`DEVICE` are fake."""
    old = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        with FakeDevice(read_as) as mode:
            yield mode
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(old)
