"""CAM-family callback: CAM, Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, counterfactual Grad-CAM and
Guided Grad-CAM(++) of chosen layers, logged as one panel per probe ``viz-cam/panel/<probe-id>`` (every method
and layer side by side).

All methods and layers of one callback -- and of every other gradient/CAM callback of the model at the
same epoch -- come from one shared forward + backward per chunk (plus one guided pass if a guided
method is asked for); see :mod:`lightning_viz.methods.shared_pass`.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from lightning.pytorch import LightningModule
from torch import Tensor

from ..layers import CONV_TYPES, get_layer, require_conv, resolve_layers
from ..methods.cam import cam_head, cam_variant, canonical_cam_method, guided_cam_from_passes, variant_from_pass
from ..methods.gradients import reduce_channels
from ..probe import ProbeSet
from ..targets import CallableTarget
from ._options import LayersSpec, as_layer_list
from .gradients import GradientMapCallback

__all__ = ["CAMCallback"]


class CAMCallback(GradientMapCallback):
    """Class activation maps of the probe images.

    Args:
        methods: any of :data:`~lightning_viz.methods.cam.CAM_VARIANTS`: ``cam``, ``gradcam``, ``gradcampp``
            (or ``gradcam++``), ``xgradcam``, ``layercam``, ``counterfactual_gradcam``, ``hirescam``,
            ``eigencam`` (class-agnostic), ``scorecam`` and ``ablationcam`` (K extra forwards per image),
            ``guided_gradcam``, ``guided_gradcampp`` (or ``guided_gradcam++``).
        layers: layer name or names (``model.named_modules()``, e.g. ``net.layer4``); default: the last conv layer.
            Blocks containing convolutions are fine; ``cam`` also needs a GAP + linear head over the layer.
        target: ``"label"`` (default), ``"predicted"``, a class index, or (from Python) a callable
            ``logits -> score[B]`` -- not with ``cam``, which needs a class.
        reduce: channel reduction of the guided methods' ``[C, H, W]`` output (``abs_max``, ``sum``, ``abs_sum``).
        chunk_size, share_pass: see :class:`GradientMapCallback`.
        **kwargs: rendering (:class:`MapCallback`) and schedule/probe options (``VisualizationCallback``).
    """

    method = "cam"

    def __init__(
        self,
        methods: list[str] = ["gradcam"],
        layers: LayersSpec = None,
        target: Union[str, int] = "label",
        reduce: Literal["abs_max", "sum", "abs_sum"] = "abs_max",
        chunk_size: Optional[int] = None,
        share_pass: bool = True,
        **kwargs: Any,
    ):
        super().__init__(target=target, chunk_size=chunk_size, share_pass=share_pass, **kwargs)
        if isinstance(methods, str):
            methods = [methods]
        if not methods:
            raise ValueError("CAMCallback needs at least one method")
        self.methods = list(dict.fromkeys(canonical_cam_method(m) for m in methods))
        needs_class = [m for m in self.methods if cam_variant(m).needs_class]
        if needs_class and isinstance(self.target, CallableTarget):
            raise ValueError(f"method {needs_class[0]!r} needs a target class ('label', 'predicted' or a class index); "
                             "a callable target has none. Use 'gradcam' with a callable target.")
        if reduce not in ("abs_max", "sum", "abs_sum"):
            raise ValueError(f"reduce must be 'abs_max', 'sum' or 'abs_sum'; got {reduce!r}")
        self.reduce = reduce
        self.layer_names = as_layer_list(type(self).__name__, layers)  # None: the last conv layer
        self.layers: list[str] = []

    def check(self, pl_module: LightningModule) -> None:
        self.layers = resolve_layers(pl_module, self.layer_names)
        for name in self.layers:
            layer = get_layer(pl_module, name)
            if not any(isinstance(m, CONV_TYPES) for m in layer.modules()):
                require_conv(pl_module, name, "CAM")  # raises, listing the conv layers
            if any(cam_variant(m).head for m in self.methods) and isinstance(layer, CONV_TYPES):
                cam_head(pl_module, layer.out_channels, name)
        super().check(pl_module)

    def pass_needs(self, pl_module: LightningModule) -> dict[Optional[str], list[str]]:
        needs: dict[Optional[str], list[str]] = {None: list(self.layers)}
        if any(cam_variant(m).guided for m in self.methods):
            needs["guided"] = []
        return needs

    def state_key_parts(self) -> tuple[Any, ...]:
        return super().state_key_parts() + (tuple(self.methods), tuple(self.layer_names or ()))

    def compute_maps(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Tensor]:
        if not self.layers:
            self.check(pl_module)
        x = self.probe_images(pl_module, probe)
        plain = self.get_pass(pl_module, probe, x, None, self.layers)
        guided = None
        if any(cam_variant(m).guided for m in self.methods):
            guided = self.get_pass(pl_module, probe, x, "guided", [])
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            for m in self.methods:
                if guided is not None and cam_variant(m).guided:
                    out[f"{m}/{layer}"] = reduce_channels(guided_cam_from_passes(plain, guided, layer, m), self.reduce)
                else:
                    out[f"{m}/{layer}"] = variant_from_pass(plain, layer, m, tuple(x.shape[-2:]), pl_module, x,
                                                            self.target, probe.labels, self.chunk_size)
        return out
