"""Class activation maps: one core, one small weight function per variant.

Core (every variant): ``L = ReLU(sum_k w_k * A_k)`` for a layer's activations ``A [B, K, h, w]``,
bilinearly upsampled to the input size (:func:`cam_map`). A variant only chooses the weights ``w``
(``[B, K]``, or ``[B, K, h, w]`` for element-wise weights) from ``A`` and the gradient
``G = dS/dA`` of the target score -- both read off one :func:`~lightning_viz.methods.shared_pass.gradient_pass`:

* ``cam`` -- Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016, Eq. 2:
  ``w_k = W_fc[c, k]`` of the linear layer after global average pooling (needs a class, and a model
  whose last ``nn.Linear`` takes the ``K`` pooled channels of the layer -- else a clear error).
* ``gradcam`` -- Selvaraju et al., ICCV 2017, Eq. 1: ``w_k = mean_ij G_kij``.
* ``gradcampp`` -- Chattopadhay et al., "Grad-CAM++", WACV 2018, Eq. 19 with the exponential trick
  (score ``exp(S)``, so 2nd/3rd-order derivatives are powers of ``G``):
  ``alpha_kij = G^2 / (2 G^2 + sum_ab A_kab G^3)``, ``w_k = sum_ij alpha_kij ReLU(G_kij)``.
* ``xgradcam`` -- Fu et al., "Axiom-based Grad-CAM", BMVC 2020, Eq. 9: ``w_k = sum_ij (A_kij / sum_ab A_kab) G_kij``.
* ``layercam`` -- Jiang et al., "LayerCAM", TIP 2021, Eq. 5: element-wise ``w_kij = ReLU(G_kij)``.
* ``counterfactual_gradcam`` -- Selvaraju et al. 2017, Sec. 5: Grad-CAM with negated gradients.
* ``guided_gradcam`` / ``guided_gradcampp`` -- Selvaraju et al. 2017, Sec. 3: guided backprop
  ``[B, C, H, W]`` times the (Grad-CAM / Grad-CAM++) map upsampled to the input.
* ``scorecam`` -- Wang et al., "Score-CAM", CVPR-W 2020, Eq. 5-7 (gradient-free): ``w_k`` is the
  softmax probability of the target class (a callable target's own score) for the input masked by
  ``A_k`` upsampled and min-max normalized; ``K`` extra forwards per image, batched in chunks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import linear_layer_names, named_layers, LayerNotFoundError
from ..targets import CallableTarget, TargetSpec, resolve_target
from .shared_pass import PassResult, chunks, gradient_pass

__all__ = [
    "CAM_METHODS",
    "GUIDED_CAM_METHODS",
    "WEIGHT_FUNCTIONS",
    "canonical_cam_method",
    "cam_map",
    "gradcam_weights",
    "gradcampp_weights",
    "xgradcam_weights",
    "layercam_weights",
    "counterfactual_weights",
    "cam_head",
    "verify_cam_head",
    "cam_from_pass",
    "scorecam_weights",
    "scorecam_from_pass",
    "guided_cam_from_passes",
    "class_activation_map",
    "guided_class_activation_map",
]

_EPS = 1e-7


def cam_map(activations: Tensor, weights: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
    """``ReLU(sum_k w_k A_k)`` ``[B, h, w]``, bilinearly upsampled to ``size`` if given."""
    if activations.ndim != 4:
        raise ValueError(f"CAM needs activations [B, K, h, w] from a convolutional layer; got shape {tuple(activations.shape)}")
    w = weights if weights.ndim == 4 else weights[:, :, None, None]
    cam = F.relu((w * activations).sum(dim=1))
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return cam


def gradcam_weights(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM: global-average-pooled gradients ``[B, K]``."""
    return g.mean(dim=(2, 3))


def counterfactual_weights(a: Tensor, g: Tensor) -> Tensor:
    """Counterfactual Grad-CAM: pooled negated gradients ``[B, K]``."""
    return -g.mean(dim=(2, 3))


def gradcampp_weights(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM++ closed form (exponential trick) ``[B, K]``; ``alpha`` is 0 where its denominator is."""
    g2, g3 = g.pow(2), g.pow(3)
    denom = 2 * g2 + a.sum(dim=(2, 3), keepdim=True) * g3
    nonzero = denom != 0
    alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    return (alpha * F.relu(g)).sum(dim=(2, 3))


def xgradcam_weights(a: Tensor, g: Tensor) -> Tensor:
    """XGrad-CAM: activation-normalized gradient sum ``[B, K]``."""
    return (a * g).sum(dim=(2, 3)) / (a.sum(dim=(2, 3)) + _EPS)


def layercam_weights(a: Tensor, g: Tensor) -> Tensor:
    """LayerCAM: element-wise positive gradients ``[B, K, h, w]``."""
    return F.relu(g)


WEIGHT_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "gradcam": gradcam_weights,
    "gradcampp": gradcampp_weights,
    "xgradcam": xgradcam_weights,
    "layercam": layercam_weights,
    "counterfactual_gradcam": counterfactual_weights,
}
CAM_METHODS = ("cam",) + tuple(WEIGHT_FUNCTIONS) + ("scorecam",)
GUIDED_CAM_METHODS = ("guided_gradcam", "guided_gradcampp")
_ALIASES = {"gradcam++": "gradcampp", "grad-cam++": "gradcampp", "guided_gradcam++": "guided_gradcampp",
            "grad-cam": "gradcam", "counterfactual": "counterfactual_gradcam"}


def canonical_cam_method(name: str) -> str:
    """Canonical method name (``"gradcam++"`` -> ``"gradcampp"``); clear error listing the allowed ones."""
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in CAM_METHODS + GUIDED_CAM_METHODS:
        raise ValueError(
            f"unknown CAM method {name!r}; allowed: {', '.join(CAM_METHODS + GUIDED_CAM_METHODS)} "
            "(aliases: 'gradcam++', 'guided_gradcam++', 'counterfactual')"
        )
    return key


def cam_head(model: nn.Module, channels: int, layer: str = "?") -> nn.Linear:
    """The classifier of a ``GAP -> nn.Linear`` head over ``channels`` features: the model's last
    ``nn.Linear``, which must take exactly ``channels`` inputs (else CAM is undefined: clear error)."""
    linears = linear_layer_names(model)
    if not linears:
        raise LayerNotFoundError(
            f"CAM needs a global-average-pooling + nn.Linear classifier head, but {type(model).__name__} has no nn.Linear; "
            "use 'gradcam' (same idea, no head needed)."
        )
    name = linears[-1]
    head = named_layers(model)[name]
    if head.in_features != channels:
        raise LayerNotFoundError(
            f"CAM needs the last linear layer to read the globally average-pooled channels of layer {layer!r} "
            f"({channels} channels), but {name!r} has in_features={head.in_features}: the model has no GAP+linear head "
            "over that layer. Choose the layer that feeds global average pooling, or use 'gradcam'."
        )
    return head


def verify_cam_head(activations: Tensor, logits: Tensor, head: nn.Linear, layer: str = "?") -> bool:
    """Check numerically that ``layer`` feeds a GAP + linear head (Zhou et al. 2016, Eq. 2): for every class ``c``,
    ``mean_ij sum_k W[c, k] A_kij + b_c`` (the spatial mean of the pre-ReLU class map plus the bias) must equal
    logit ``c``. Else CAM's weights do not belong to that layer (a block before the last, a conv before its
    BatchNorm / residual add): clear error. Returns ``True`` when the head reads ``ReLU(A)`` instead of ``A``
    (a functional ``F.relu`` between the layer and the pooling): CAM must then use ``ReLU(A)``."""
    if activations.ndim != 4:
        raise LayerNotFoundError(f"CAM needs a layer with [B, K, h, w] output; {layer!r} gives "
                                 f"{tuple(activations.shape)}")
    w = head.weight.detach().double().to(activations.device)
    if activations.shape[1] != w.shape[1]:
        raise LayerNotFoundError(
            f"CAM needs the last linear layer to read the globally average-pooled channels of layer {layer!r} "
            f"({activations.shape[1]} channels), but it has in_features={w.shape[1]}: the model has no GAP+linear head "
            "over that layer. Choose the layer that feeds global average pooling, or use 'gradcam'."
        )
    a = activations.detach().double()
    ref = logits.detach().double().to(a.device)
    tol = 1e-3 if logits.dtype in (torch.float32, torch.float64) else 3e-2
    errs = []
    for rectified in (False, True):
        pred = (a.relu() if rectified else a).mean(dim=(2, 3)) @ w.T
        if head.bias is not None:
            pred = pred + head.bias.detach().double().to(pred.device)
        if not (torch.isfinite(pred).all() and torch.isfinite(ref).all()):
            return False  # a non-finite model: nothing to tell from it
        errs.append(float((pred - ref).abs().max()) if ref.shape == pred.shape else float("inf"))
        if errs[-1] <= tol * (1.0 + float(ref.abs().max())):
            return rectified
    err = min(errs)
    raise LayerNotFoundError(
        f"CAM needs layer {layer!r} to feed global average pooling and the last nn.Linear directly, but it does "
        f"not: the spatial mean of its class maps plus the bias differs from the logits by up to {err:.3g} "
        "(other layers lie between them: a block before the last one, or a conv before its BatchNorm, residual "
        "add or ReLU). Choose the last block before the pooling (e.g. 'layer4' of a ResNet; the default layer), "
        "or use 'gradcam'."
    )


@torch.no_grad()
def scorecam_weights(model: nn.Module, x: Tensor, activations: Tensor, target: TargetSpec = "label",
                     labels: Optional[Tensor] = None, classes: Optional[Tensor] = None,
                     chunk_size: Optional[int] = None) -> Tensor:
    """Score-CAM weights ``[B, K]``: the target's softmax probability (for a callable target, its score)
    on ``x * norm(upsample(A_k))`` for every channel ``k``; ``chunk_size`` masked images per forward
    (``None``: ``B``). ``classes`` (e.g. a pass's ``PassResult.classes``) pins the class per image."""
    b, k = activations.shape[:2]
    masks = F.interpolate(activations.float(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    lo = masks.flatten(2).amin(2)[..., None, None]
    hi = masks.flatten(2).amax(2)[..., None, None]
    masks = torch.where(hi > lo, (masks - lo) / (hi - lo).clamp_min(1e-12), torch.zeros_like(masks))
    tgt = resolve_target(target)
    if classes is None and not isinstance(tgt, CallableTarget):
        classes = tgt.classes(model(x), labels)
    out = torch.empty(b * k, device=x.device, dtype=x.dtype)
    img = torch.arange(b * k, device=x.device) // k  # flat index = image * K + channel
    for sl in chunks(b * k, chunk_size or b):
        masked = x[img[sl]] * masks.flatten(0, 1)[sl, None].to(x.dtype)
        logits = model(masked)
        if isinstance(tgt, CallableTarget):
            out[sl] = tgt.score(logits, None)
        else:
            out[sl] = logits.softmax(dim=1).gather(1, classes.to(x.device)[img[sl], None]).squeeze(1)
    return out.view(b, k)


def _layer_weights(method: str, a: Tensor, g: Tensor, classes: Optional[Tensor], model: Optional[nn.Module], layer: str) -> Tensor:
    if method == "cam":
        if classes is None:
            raise ValueError("CAM needs a target class ('label', 'predicted' or a class index); a callable target has none. Use 'gradcam'.")
        if model is None:
            raise ValueError("CAM needs the model to read the classifier weights")
        head = cam_head(model, a.shape[1], layer)
        return head.weight.detach().to(a.dtype)[classes.to(head.weight.device)].to(a.device)
    return WEIGHT_FUNCTIONS[method](a, g)


def cam_from_pass(result: PassResult, layer: str, method: str = "gradcam", size: Optional[tuple[int, int]] = None,
                  model: Optional[nn.Module] = None) -> Tensor:
    """The ``[B, H, W]`` map of ``method`` (a :data:`CAM_METHODS` name except ``scorecam``, which needs the
    input: :func:`scorecam_from_pass`) from a plain (no ReLU rule) pass that recorded ``layer``;
    ``model`` is needed for ``"cam"`` (classifier weights)."""
    method = canonical_cam_method(method)
    if method == "scorecam":
        raise ValueError("scorecam needs the input images and extra forwards: use scorecam_from_pass")
    if method in GUIDED_CAM_METHODS:
        raise ValueError(f"{method!r} is guided backprop times a CAM, [B, C, H, W]: use guided_class_activation_map "
                         "or guided_cam_from_passes")
    if result.rule is not None:
        raise ValueError(f"CAM weights need plain gradients; this pass used the {result.rule!r} ReLU rule")
    a, g = result.layer(layer)
    if a.ndim != 4:
        raise ValueError(f"CAM needs a layer with [B, K, h, w] output; {layer!r} gives {tuple(a.shape)}. Choose a conv layer or block.")
    return cam_map(a, _layer_weights(method, a, g, result.classes, model, layer), size)


def scorecam_from_pass(result: PassResult, model: nn.Module, x: Tensor, layer: str, target: TargetSpec = "label",
                       labels: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> Tensor:
    """Score-CAM ``[B, H, W]`` of ``layer`` from a pass's activations (and target classes) plus ``K``
    masked forwards per image."""
    a, _ = result.layer(layer)
    if a.ndim != 4:
        raise ValueError(f"Score-CAM needs a layer with [B, K, h, w] output; {layer!r} gives {tuple(a.shape)}.")
    w = scorecam_weights(model, x, a, target, labels, result.classes, chunk_size)
    return cam_map(a, w.to(a.dtype), tuple(x.shape[-2:]))


def guided_cam_from_passes(plain: PassResult, guided: PassResult, layer: str, method: str = "guided_gradcam") -> Tensor:
    """Guided Grad-CAM(++) ``[B, C, H, W]``: guided-backprop input gradient times the upsampled CAM."""
    method = canonical_cam_method(method)
    if method not in GUIDED_CAM_METHODS:
        raise ValueError(f"{method!r} is not a guided CAM method; allowed: {', '.join(GUIDED_CAM_METHODS)}")
    if guided.rule != "guided":
        raise ValueError("guided CAM needs a pass with the 'guided' ReLU rule")
    size = tuple(guided.input_grad.shape[-2:])
    cam = cam_from_pass(plain, layer, method[len("guided_"):], size)
    return guided.input_grad * cam[:, None]


def class_activation_map(model: nn.Module, x: Tensor, layer: str, method: str = "gradcam", target: TargetSpec = "label",
                         labels: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> Tensor:
    """``[B, H, W]`` CAM of ``layer`` (one forward + one backward per chunk)."""
    result = gradient_pass(model, x, target, labels, [layer], None, chunk_size)
    if canonical_cam_method(method) == "scorecam":
        return scorecam_from_pass(result, model, x, layer, target, labels, chunk_size)
    return cam_from_pass(result, layer, method, tuple(x.shape[-2:]), model)


def guided_class_activation_map(model: nn.Module, x: Tensor, layer: str, method: str = "guided_gradcam",
                                target: TargetSpec = "label", labels: Optional[Tensor] = None,
                                chunk_size: Optional[int] = None) -> Tensor:
    """``[B, C, H, W]`` Guided Grad-CAM(++) of ``layer`` (a plain and a guided pass per chunk)."""
    plain = gradient_pass(model, x, target, labels, [layer], None, chunk_size)
    guided = gradient_pass(model, x, target, labels, (), "guided", chunk_size)
    return guided_cam_from_passes(plain, guided, layer, method)
