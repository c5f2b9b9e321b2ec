"""CAM-family callback: CAM, Grad-CAM, Grad-CAM++, XGrad-CAM, LayerCAM, counterfactual Grad-CAM, HiResCAM, Eigen-CAM,
Score-CAM, Ablation-CAM and Guided Grad-CAM(++) of chosen layers,
logged as one panel per probe ``viz-cam/panel/<probe-id>`` (every method
and layer side by side).

All methods and layers of one callback -- and of every other gradient/CAM callback of the model at the
same epoch -- come from one shared forward + backward per chunk (plus one guided pass if a guided
method is asked for); see :mod:`lightning_viz.methods.shared_pass`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal, Optional, Union, cast

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..capture import capture
from ..layers import (
    CONV_TYPES,
    LayerNotFoundError,
    MapLayout,
    conv_layer_names,
    conv_produced_maps,
    default_cam_layer,
    get_layer,
    linear_calls,
    linear_layer_names,
    named_layers,
    require_conv,
    resolve_layers,
)
from ..methods.cam import (
    CAM_VARIANTS,
    cam_head,
    cam_variant,
    canonical_cam_method,
    gradient_free_hint,
    guided_cam_from_passes,
    rectified,
    variant_from_pass,
    verify_cam_head,
)
from ..methods.checks import check_layers_get_gradients
from ..methods.gradients import reduce_channels
from ..methods.shared_pass import gradient_pass
from ..probe import ProbeSet
from ..targets import CallableTarget
from ._options import LayersSpec, as_layer_list
from .base import VisualizationWarning
from .gradients import GradientMapCallback

__all__ = ["CAMCallback"]


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


@contextmanager
def _norms_reading(model: nn.Module, layers: list[str]) -> Iterator[dict[str, str]]:
    """``{layer: norm}`` for each of ``layers`` whose output tensor itself is the input of a normalization layer
    (BatchNorm, GroupNorm, LayerNorm, or any module whose class name contains ``Norm``, e.g. torchvision's
    ``FrozenBatchNorm2d``) during forwards inside the block (hooks, removed on exit): a conv named before its
    BatchNorm. Such a norm is close to the identity at initialization, so the numeric head check cannot see it."""
    found: dict[str, str] = {}
    outputs: dict[str, Tensor] = {}  # the tensors themselves (an id could be reused once one is freed)
    all_layers = named_layers(model)

    def keep(name: str):
        def hook(_m: nn.Module, _i: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                outputs[name] = out

        return hook

    def check(name: str):
        def hook(_m: nn.Module, inputs: tuple) -> None:
            first = inputs[0] if inputs else None
            for layer, out in outputs.items():
                if first is out and not (name + ".").startswith(layer + "."):
                    found.setdefault(layer, name)

        return hook

    handles = [get_layer(model, n).register_forward_hook(keep(n)) for n in layers]
    handles += [
        m.register_forward_pre_hook(check(n))
        for n, m in all_layers.items()
        if n and (isinstance(m, _NORMS) or "Norm" in type(m).__name__)
    ]
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


class CAMCallback(GradientMapCallback):
    """Class activation maps of the probe images.

    ``L = ReLU(sum_k w_k A_k)`` with one weighting per variant: CAM, Zhou et al. 2016; Grad-CAM, Selvaraju et
    al. 2017 (Sec. 5 counterfactual, Sec. 3 guided); Grad-CAM++, Chattopadhay et al. 2018, Eq. 19; XGrad-CAM,
    Fu et al. 2020; LayerCAM, Jiang et al. 2021; Score-CAM, Wang et al. 2020, Eq. 6-10; HiResCAM,
    Draelos & Carin 2020; Eigen-CAM, Muhammad & Yeasin 2020; Ablation-CAM, Desai & Ramaswamy 2020.

    Args:
        methods: any of :data:`~lightning_viz.methods.cam.CAM_VARIANTS`: ``cam``, ``gradcam``, ``gradcampp``
            (or ``gradcam++``), ``xgradcam``, ``layercam``, ``counterfactual_gradcam``, ``hirescam``,
            ``eigencam`` (class-agnostic), ``scorecam`` and ``ablationcam`` (K extra forwards per image),
            ``guided_gradcam``, ``guided_gradcampp`` (or ``guided_gradcam++``).
        layers: layer name or names (``model.named_modules()``, e.g. ``net.layer4``); default: the last block
            feeding global pooling (:func:`~lightning_viz.layers.default_cam_layer`: ``layer4.1`` of a ResNet,
            ``features.<last>`` of VGG/DenseNet/MobileNet/EfficientNet/ConvNeXt), found by one forward at setup.
            Blocks containing convolutions are fine; ``cam`` also needs the GAP + linear head right after the
            layer (the last ``nn.Linear`` called in the forward; verified numerically at setup, where a norm reading the
            layer's output is refused).
        target: ``"label"`` (default), ``"predicted"``, a class index, or (from Python) a callable
            ``logits -> score[B]`` -- not with ``cam``, which needs a class.
        reduce: channel reduction of the guided methods' ``[C, H, W]`` output (``abs_max``, ``sum``, ``abs_sum``).
        chunk_size, share_pass: see :class:`GradientMapCallback`.
        **kwargs: rendering (:class:`MapCallback`) and schedule/probe options (``VisualizationCallback``).
    """

    method = "cam"

    def __init__(
        self,
        methods: Union[str, list[str]] = ["gradcam"],
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
            raise ValueError(f"methods must name at least one method; allowed: {', '.join(CAM_VARIANTS)}")
        try:
            self.methods = list(dict.fromkeys(canonical_cam_method(m) for m in methods))
        except ValueError as exc:
            raise ValueError(f"methods: {exc}") from None
        needs_class = [m for m in self.methods if cam_variant(m).needs_class]
        if needs_class and isinstance(self.target, CallableTarget):
            raise ValueError(
                f"method {needs_class[0]!r} needs a target class ('label', 'predicted' or a class index); "
                "a callable target has none. Use 'gradcam' with a callable target."
            )
        if reduce not in ("abs_max", "sum", "abs_sum"):
            raise ValueError(f"reduce must be 'abs_max', 'sum' or 'abs_sum'; got {reduce!r}")
        self.reduce = reduce
        self.layer_names = as_layer_list(type(self).__name__, layers)  # None: the last block before global pooling
        self.layers: list[str] = []
        self._head_verified = False
        self._rectified: dict[str, bool] = {}  # cam: layers whose output reaches the head through a functional ReLU
        self._unverified: list[str] = []  # named layers without convs: a forward must show a conv-produced map
        self._layouts: dict[str, MapLayout] = {}  # layers read as [B, C, h, w] maps (see _read_as_maps)
        self._maps_read = False

    def check_model(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.layer_names is None:  # the default layer of this setup's model (callbacks reused for another one)
            self.layers, self._head_verified, self._rectified = [], False, {}
        self._maps_read = False
        super().check_model(trainer, pl_module, stage)

    def check(self, pl_module: LightningModule) -> None:
        if self.layer_names is None:  # the default layer needs a forward: found in check_input (setup) or compute
            if not self.layers:
                if self._uses_head() and not linear_layer_names(pl_module):  # refuse now: no nn.Linear at all
                    with self._naming():
                        cam_head(pl_module, -1)  # raises: names the model, says it has no nn.Linear
                # else the setup forward tells the default layer's width (a block concatenating branches, as
                # GoogLeNet's and Inception's last ones, has no module of that width) and verifies the head
                return
        else:
            self.layers = resolve_layers(pl_module, self.layer_names)
        self._unverified = []
        for name in self.layers:
            layer = get_layer(pl_module, name)
            if self.layer_names is not None and not any(isinstance(m, CONV_TYPES) for m in layer.modules()):
                # a norm / activation / pooling after convs, a Swin stage's channels-last map, a ViT block's tokens
                # are fine; a linear layer's [B, C] is not: see _verify_maps
                self._unverified.append(name)
            if self._uses_head() and isinstance(layer, CONV_TYPES):
                self._head_possible(pl_module, {layer.out_channels}, name)
        super().check(pl_module)

    def _head_possible(self, pl_module: LightningModule, widths: set[int], layer: str) -> None:
        """Before any forward (which tells the head: the last nn.Linear called): some nn.Linear must read ``widths``."""
        linears = [cast(nn.Linear, get_layer(pl_module, n)) for n in linear_layer_names(pl_module)]
        if not any(m.in_features in widths for m in linears):
            with self._naming():
                cam_head(pl_module, max(widths, default=-1), layer, advice=self._head_advice(layer))  # raises

    def _head_advice(self, layer: str) -> Optional[str]:
        """What to do when ``cam`` finds no GAP + linear head over ``layer``: for the default layer (the last map
        before the pooling) the model has none, so only the methods without a head can help."""
        if self.layer_names is not None:
            return None
        why = f"the default layer {layer!r} is the model's last feature map before the global pooling"
        others = ", ".join(repr(m) for m, v in CAM_VARIANTS.items() if not v.head)
        return (
            f"As {why}, the model has no GAP + nn.Linear head (e.g. a norm or a conv lies between the pooling and "
            f"the classifier) and 'cam' cannot explain it: use the methods that need no such head ({others})."
        )

    def relu_rule_methods(self) -> list[str]:
        return [m for m in self.methods if cam_variant(m).guided]

    def plain_methods(self) -> list[str]:
        """The CAMs the guided methods multiply (``gradcam`` for ``guided_gradcam``)."""
        return list(dict.fromkeys(str(cam_variant(m).guided_of) for m in self.relu_rule_methods()))

    def check_input(self, model: Any, x: Tensor) -> None:
        super().check_input(model, x)  # guided methods on a forward without ReLUs: a warning
        if self.layer_names is None:
            self.layers = [default_cam_layer(model, x, type(self).__name__)]
            self.check(model)
        weighted = [m for m in self.methods if cam_variant(m).weights is not None or cam_variant(m).guided_of]
        if weighted:  # their gradient must reach the layers: not inside torch.no_grad() or before a .detach()
            result = gradient_pass(model, x, "predicted", None, self.layers, None, None, input_grad=False)
            check_layers_get_gradients(
                type(self).__name__,
                result.without_grad,
                f"Leave out methods {weighted} for these layers. {gradient_free_hint()}",
                result.unreached,
            )
        self._read_as_maps(model, x)
        self._verify_maps(model, x)
        self._warn_single_position(model, x)
        if self._uses_head():
            with (
                torch.no_grad(),
                capture(model, self.layers) as cap,
                linear_calls(model) as calls,
                _norms_reading(model, self.layers) as norms,
            ):
                logits = model(x)
            with self._naming():
                self._verify_head(model, logits, {n: cap[n] for n in self.layers}, calls[-1] if calls else None)
                for name, norm in norms.items():  # at init a norm is (nearly) the identity: the numbers agree yet
                    raise LayerNotFoundError(
                        f"CAM needs layer {name!r} to feed global average pooling and the last nn.Linear directly, "
                        f"but its output goes through {norm!r} ({type(get_layer(model, norm)).__name__}) first: "
                        "the classifier's weights do not belong to that layer once training changes the norm. "
                        + (
                            self._head_advice(name)
                            or "Choose the block after the norm (e.g. 'layer4' of a ResNet; the default layer), "
                            "or use 'gradcam'."
                        )
                    )

    def _warn_single_position(self, model: Any, x: Tensor) -> None:
        """A layer whose map has one position for the data's images (a ResNet's ``layer4`` on 32 px CIFAR-size
        images) gives constant CAMs, one value per image spread over it: say so at setup, not with blank heatmaps."""
        with torch.no_grad(), capture(model, self.layers) as cap:
            model(x)
        flat = [n for n in self.layers if cap[n].ndim == 4 and cap[n].shape[-2:].numel() == 1]
        if flat:
            rank_zero_warn(
                f"{type(self).__name__}: layer {flat[0]!r} gives a 1x1 map for {x.shape[-2]}x{x.shape[-1]} images, "
                "so its class activation maps are constant (one value per image, spread over the whole image). "
                "Name an earlier layer with a spatial map in layers=[...] (e.g. 'layer3' of a ResNet) or use larger "
                "images.",
                category=VisualizationWarning,
            )

    def _read_as_maps(self, model: Any, x: Tensor) -> None:
        """Layers whose output is a channels-last ``[B, h, w, C]`` map (a Swin stage) or ``[B, tokens, C]`` patch
        tokens (a ViT block) are read as ``[B, C, h, w]`` maps from now on, as pytorch-grad-cam's
        ``reshape_transform`` does (:func:`~lightning_viz.layers.map_layouts`); the captions say so."""
        self._layouts = self.read_as_maps(model, x, self.layers)
        self._maps_read = True
        self._warn_tokens_without_gradient(model, x)

    def _warn_tokens_without_gradient(self, model: Any, x: Tensor) -> None:
        """A ViT's last block (or anything after its last attention): only the class token reaches the head, so
        the patch tokens' gradient is 0 and every gradient-weighted map is blank; say so at setup."""
        tokens = [n for n, lay in self._layouts.items() if lay.kind == "tokens"]
        if not tokens or not any(cam_variant(m).weights is not None for m in self.methods):
            return
        result = gradient_pass(model, x, "predicted", None, tokens, None, None, input_grad=False)
        for name in tokens:
            if not bool(result.grads[name].any()):
                rank_zero_warn(
                    f"{type(self).__name__}: the score's gradient does not reach the patch tokens of layer {name!r} "
                    "(after the last attention only the class token reaches the head), so its gradient-weighted "
                    "maps are all zero. Name a layer before the last block's attention, e.g. its first LayerNorm "
                    "('blocks.11.norm1' of a timm ViT, 'encoder.layers.encoder_layer_11.ln_1' of torchvision's).",
                    category=VisualizationWarning,
                )

    def _verify_maps(self, model: Any, x: Tensor) -> None:
        """Named layers without convolutions must give a conv-produced ``[B, C, h, w]`` map in a forward of ``x``: a
        norm, activation or pooling right after convolutions (DenseNet's ``features.norm5``, VGG's last
        ``MaxPool2d``, the layers pytorch-grad-cam's docs name), not a transformer's tokens or a flattened vector."""
        if not self._unverified:
            return
        maps = conv_produced_maps(model, x)
        for name in self._unverified:
            if name not in maps and name not in self._layouts:
                if any(isinstance(m, nn.Linear) for m in get_layer(model, name).modules()):
                    with self._naming():
                        require_conv(model, name, "CAM")  # raises, listing the conv layers
                convs = conv_layer_names(model)
                raise LayerNotFoundError(
                    f"{type(self).__name__}: layers names {name!r}, a {type(get_layer(model, name)).__name__} whose "
                    "output is no feature map produced by convolutions; CAM needs a convolution, a block containing "
                    "one, or a norm / activation / pooling right after them ([B, C, h, w]), a channels-last "
                    "[B, h, w, C] map (a Swin stage) or a transformer's [B, tokens, C] after a conv patch embedding "
                    f"(a ViT block). Conv layers: {', '.join(repr(c) for c in convs[-8:]) or '(none)'}."
                )
        self._unverified = []

    def _uses_head(self) -> bool:
        return any(cam_variant(m).head for m in self.methods)

    def _verify_head(self, model: Any, logits: Tensor, activations: dict[str, Tensor], head: Optional[str]) -> None:
        """Variants with the classifier head (``cam``) only: each layer must feed the GAP + linear head, whose
        classifier is ``head``, the last nn.Linear called in the forward (numerical check, once)."""
        if head is None:
            raise LayerNotFoundError(
                "CAM needs a global-average-pooling + nn.Linear classifier head, but no nn.Linear is called in the "
                "model's forward; use the methods that need no such head (e.g. 'gradcam')."
            )
        self._rectified = {
            name: verify_cam_head(
                a,
                logits,
                cam_head(model, a.shape[1], name, head, self._head_advice(name)),
                name,
                self._head_advice(name),
            )
            for name, a in activations.items()
        }
        self._head_verified = True

    def pass_needs(self, pl_module: LightningModule) -> dict[Optional[str], list[str]]:
        needs: dict[Optional[str], list[str]] = {None: list(self.layers)}
        if any(cam_variant(m).guided for m in self.methods):
            needs["guided"] = []
        return needs

    def state_key_parts(self) -> tuple[Any, ...]:
        return super().state_key_parts() + (tuple(self.methods), tuple(self.layer_names or ()))

    def compute_maps(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Tensor]:
        pl_module = self.adapted(pl_module)
        x = self.probe_images(pl_module, probe)
        if not self.layers:
            self.check(pl_module)
            if not self.layers:  # setup found no data item: the default layer from the first probe
                self.layers = [default_cam_layer(pl_module, x[:1], type(self).__name__)]
                self.check(pl_module)
        if not self._maps_read:  # setup found no data item; a conv's own output is [B, C, h, w]
            if any(not isinstance(get_layer(pl_module, n), CONV_TYPES) for n in self.layers):
                self._read_as_maps(pl_module, x[:1])
            self._maps_read = True
        self._verify_maps(pl_module, x[:1])  # setup found no data item to check the named layers on
        plain = self.get_pass(pl_module, probe, x, None, self.layers)
        if self._uses_head() and not self._head_verified:
            with self._naming():
                self._verify_head(pl_module, plain.logits, {n: plain.layer(n)[0] for n in self.layers}, plain.head)
        guided = None
        if any(cam_variant(m).guided for m in self.methods):
            guided = self.get_pass(pl_module, probe, x, "guided", [])
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            for m in self.methods:
                if guided is not None and cam_variant(m).guided:
                    out[f"{m}/{layer}"] = reduce_channels(guided_cam_from_passes(plain, guided, layer, m), self.reduce)
                else:
                    src = plain
                    if cam_variant(m).head and self._rectified.get(layer):  # the head reads ReLU(A): so must CAM
                        src = rectified(plain, layer)
                    out[f"{m}/{layer}"] = variant_from_pass(
                        src,
                        layer,
                        m,
                        tuple(x.shape[-2:]),
                        pl_module,
                        x,
                        self.target,
                        probe.labels,
                        self.chunk_size,
                        self.probabilities,
                    )
        return out
