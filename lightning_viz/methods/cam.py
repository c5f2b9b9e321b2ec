"""Class activation maps: one core, one small weight function per variant.

Core (every variant): ``L = ReLU(sum_k w_k * A_k)`` for a layer's activations ``A [B, K, h, w]``,
bilinearly upsampled to the input size (:func:`cam_map`). A variant only chooses the weights ``w``
(``[B, K]``, or ``[B, K, h, w]`` for element-wise weights) from ``A`` and the gradient
``G = dS/dA`` of the target score -- both read off one :func:`~lightning_viz.methods.shared_pass.gradient_pass`
(``A`` is ``ReLU(output)`` when the forward rectifies the layer's output in place, e.g. DenseNet's ``norm5``):

* ``cam`` -- Zhou et al., "Learning Deep Features for Discriminative Localization", CVPR 2016:
  ``w_k = W_fc[c, k]`` of the linear layer after global average pooling (needs a class, and a model
  whose last ``nn.Linear`` called in the forward takes the ``K`` pooled channels of the layer -- else a clear error).
* ``gradcam`` -- Selvaraju et al., ICCV 2017: ``w_k = mean_ij G_kij``.
* ``gradcampp`` -- Chattopadhay et al., "Grad-CAM++", WACV 2018 (arXiv:1710.11063), Eq. 19, exponential trick
  (score ``exp(S)``, so 2nd/3rd-order derivatives are powers of ``G``):
  ``alpha_kij = G^2 / (2 G^2 + sum_ab A_kab G^3)``, ``w_k = sum_ij alpha_kij ReLU(G_kij)``.
* ``xgradcam`` -- Fu et al., "Axiom-based Grad-CAM", BMVC 2020: ``w_k = sum_ij (A_kij / sum_ab A_kab) G_kij``.
* ``layercam`` -- Jiang et al., "LayerCAM", TIP 2021: element-wise ``w_kij = ReLU(G_kij)``.
* ``counterfactual_gradcam`` -- Selvaraju et al. 2017, Sec. 5: Grad-CAM with negated gradients.
* ``guided_gradcam`` / ``guided_gradcampp`` -- Selvaraju et al. 2017, Sec. 3: guided backprop
  ``[B, C, H, W]`` times the (Grad-CAM / Grad-CAM++) map upsampled to the input.
* ``scorecam`` -- Wang et al., "Score-CAM", CVPR-W 2020, Eq. 6-10 and Sec. 3.2 (gradient-free): ``w_k`` is the
  softmax probability of the target class (a callable target's own score) for the input masked by
  ``A_k`` upsampled and min-max normalized (Eq. 6's baseline score ``f(X_b)`` is not subtracted); ``K`` extra
  forwards per image, batched in chunks.
* ``hirescam`` -- Draelos & Carin, "Use HiResCAM instead of Grad-CAM for faithful explanations of
  convolutional neural networks", 2020: element-wise ``w_kij = G_kij`` (``sum_k G_k * A_k``).
* ``eigencam`` -- Muhammad & Yeasin, "Eigen-CAM", IJCNN 2020 (class-agnostic, no gradient): the
  projection of each position's centred activations on their first principal component (sign chosen to
  correlate positively with ``sum_k A_k``, since the SVD leaves it open).
* ``ablationcam`` -- Desai & Ramaswamy, "Ablation-CAM", WACV 2020: ``w_k = (y_c - y_c^k) / y_c``
  with ``y_c^k`` the target score with channel ``k`` of the layer zeroed; ``K`` extra forwards per image.

Every variant is one :class:`CAMVariant` entry of :data:`CAM_VARIANTS` saying what it needs: weights
from ``(A, G)``, the classifier head, a map from ``A`` alone, weights from extra forwards, or a guided
pass; :func:`register_cam_variant` adds one, and the callback and every function here follow the entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Optional, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..capture import detect_layouts, layout_of
from ..layers import LayerNotFoundError, get_layer, last_called_linear
from ..progress import progress
from ..targets import (
    CallableTarget,
    Probabilities,
    TargetSpec,
    check_probabilities,
    class_probability,
    resolve_target,
)
from . import batching
from .batching import default_memory_mb, images_per_forward, throughput_images
from .checks import (
    check_chunk_size,
    check_eval,
    check_images,
    check_labels_per_image,
    check_logits,
    input_matches_model,
)
from .shared_pass import PassResult, chunks, gradient_pass

__all__ = [
    "CAMVariant",
    "CAM_VARIANTS",
    "register_cam_variant",
    "cam_variant",
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
    "rectified",
    "cam_from_pass",
    "scorecam_weights",
    "scorecam_from_pass",
    "hirescam_weights",
    "eigencam_map",
    "ablationcam_weights",
    "variant_from_pass",
    "guided_cam_from_passes",
    "class_activation_map",
    "guided_class_activation_map",
]

_EPS = 1e-7


def cam_map(activations: Tensor, weights: Tensor, size: Optional[tuple[int, ...]] = None) -> Tensor:
    """``ReLU(sum_k w_k A_k)`` ``[B, h, w]``, bilinearly upsampled to ``size`` if given."""
    if activations.ndim != 4:
        raise ValueError(
            f"CAM needs activations [B, K, h, w] from a convolutional layer; got shape {tuple(activations.shape)}"
        )
    w = weights if weights.ndim == 4 else weights[:, :, None, None]
    cam = F.relu((w * activations).sum(dim=1))
    if size is not None and tuple(cam.shape[-2:]) != tuple(size):
        cam = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
    return cam


def gradcam_weights(a: Tensor, g: Tensor) -> Tensor:
    """Grad-CAM: global-average-pooled gradients ``[B, K]``, summed in float64: on a global-average-pooling + linear
    head the ``h * w`` equal gradients then pool exactly to the head's weight over ``h * w`` (a float32 sum rounds),
    so Grad-CAM is CAM scaled, exactly where ``h * w`` is a power of two, and ranks the pixels alike."""
    return g.mean(dim=(2, 3), dtype=torch.float64).to(g.dtype)


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


def cam_head(
    model: nn.Module, channels: int, layer: str = "?", head: Optional[str] = None, advice: Optional[str] = None
) -> nn.Linear:
    """The classifier of a ``GAP -> nn.Linear`` head over ``channels`` features: ``head`` (the last ``nn.Linear``
    called in a forward, e.g. ``PassResult.head``), else the last one defined (no forward at hand); it must take
    exactly ``channels`` inputs (else CAM is undefined: clear error, ending with ``advice`` when given)."""
    name = head if head is not None else last_called_linear(model)
    if name is None:
        raise LayerNotFoundError(
            "CAM needs a global-average-pooling + nn.Linear classifier head, "
            f"but {type(model).__name__} has no nn.Linear; use 'gradcam' (same idea, no head needed)."
        )
    which = "called in the forward" if head is not None else "defined"
    linear = cast(nn.Linear, get_layer(model, name))
    if linear.in_features != channels:
        raise LayerNotFoundError(
            f"CAM needs the classifier (the last nn.Linear {which}, {name!r}) to read the globally average-pooled "
            f"channels of layer {layer!r} ({channels} channels), but it has in_features={linear.in_features}: the "
            "model has no GAP+linear head over that layer. "
            + (advice or "Choose the layer that feeds global average pooling, or use 'gradcam'.")
        )
    return linear


def verify_cam_head(
    activations: Tensor, logits: Tensor, head: nn.Linear, layer: str = "?", advice: Optional[str] = None
) -> bool:
    """Check numerically that ``layer`` feeds a GAP + linear head (Zhou et al. 2016): for every class ``c``,
    ``mean_ij sum_k W[c, k] A_kij + b_c`` (the spatial mean of the pre-ReLU class map plus the bias) must equal
    logit ``c``, up to one shift per image (a ``log_softmax`` after the classifier). Else CAM's weights do not
    belong to that layer (a block before the last, a conv before its BatchNorm / residual add) or the output is
    the scores scaled (a temperature): clear error. Returns ``True`` when the head reads ``ReLU(A)`` instead of ``A``
    (a functional ``F.relu`` between the layer and the pooling): CAM must then use ``ReLU(A)``. ``advice`` replaces
    the closing advice of the errors."""
    if activations.ndim != 4:
        raise LayerNotFoundError(
            f"CAM needs a layer with [B, K, h, w] output; {layer!r} gives {tuple(activations.shape)}"
        )
    w = _two_class(head.weight.detach().double().to(activations.device))
    if activations.shape[1] != w.shape[1]:
        raise LayerNotFoundError(
            f"CAM needs the last linear layer to read the globally average-pooled channels of layer {layer!r} "
            f"({activations.shape[1]} channels), but it has in_features={w.shape[1]}: the model has no GAP+linear head "
            "over that layer. " + (advice or "Choose the layer that feeds global average pooling, or use 'gradcam'.")
        )
    a = activations.detach().double()
    ref = logits.detach().double().to(a.device)
    if ref.ndim != 2 or ref.shape[1] != w.shape[0]:
        raise LayerNotFoundError(
            f"CAM reads each class's weights from the last nn.Linear, which has {w.shape[0]} outputs (classes), but "
            f"the logits have shape {tuple(ref.shape)}: they are not that layer's outputs (a logits_fn that selects "
            "or transforms them?). Let the logits be the classifier's outputs, or use 'gradcam' (no head needed)."
        )
    if a.shape[0] == 0:  # no image to compare the head with (an empty batch): nothing to tell from it
        return False
    tol = 1e-3 if logits.dtype in (torch.float32, torch.float64) else 3e-2
    # the bound scales with the class maps' terms sum_k |W_ck mean(A_k)| + |b_c| (the logits' own rounding aside), not
    # with 1 + max |logit|: an as-built EfficientNet's activations and logits of ~1e-13 made that bound vacuous
    rounding = 8 * torch.finfo(logits.dtype).eps * float(ref.abs().max()) if logits.is_floating_point() else 0.0
    errs, scaled = [], None
    for rectified in (False, True):
        pooled = (a.relu() if rectified else a).mean(dim=(2, 3))
        pred, terms = pooled @ w.T, pooled.abs() @ w.abs().T
        if head.bias is not None:
            bias = _two_class(head.bias.detach().double().to(pred.device))
            pred, terms = pred + bias, terms + bias.abs()
        bound = tol * float(terms.max()) + rounding
        if not (torch.isfinite(pred).all() and torch.isfinite(ref).all()):
            return False  # a non-finite model: nothing to tell from it
        if ref.shape != pred.shape:
            errs.append(float("inf"))
            continue
        # the logits up to one shift per image: a log_softmax after the classifier (NLLLoss models) changes no
        # class's evidence against another, and CAM maps the classifier's scores (Zhou et al. also read them
        # before the softmax)
        d = pred - ref
        errs.append(float((d - d.mean(dim=1, keepdim=True)).abs().max()))
        if errs[-1] <= bound:
            return rectified
        c = pred - pred.mean(dim=1, keepdim=True)
        s = float((c * (ref - ref.mean(dim=1, keepdim=True))).sum() / (c * c).sum().clamp_min(1e-30))
        if abs(s - 1.0) > 1e-2 and float((s * c - ref + ref.mean(dim=1, keepdim=True)).abs().max()) <= abs(s) * bound:
            scaled = s
    err = min(errs)
    if scaled is not None:
        raise LayerNotFoundError(
            f"CAM reads the classifier's scores of layer {layer!r}, but the model's output is those scores times "
            f"{scaled:.4g} (a temperature, logits / T? or a layer between them that scales them, e.g. a SiLU on "
            "activations near 0), so the maps would not explain the target's score. Let the "
            "forward (or a logits_fn) return the classifier's logits, or use 'gradcam' (no head needed)."
        )
    raise LayerNotFoundError(
        f"CAM needs layer {layer!r} to feed global average pooling and the last nn.Linear directly, but it does "
        f"not: the spatial mean of its class maps plus the bias differs from the logits by up to {err:.3g} "
        "(other layers lie between them: a block before the last one, or a conv before its BatchNorm, residual "
        "add or ReLU). "
        + (
            advice
            or "Choose the last block before the pooling (e.g. 'layer4' of a ResNet; the default layer), "
            "or use 'gradcam'."
        )
    )


@torch.no_grad()
def scorecam_weights(
    model: nn.Module,
    x: Tensor,
    activations: Tensor,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    classes: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    probabilities: Probabilities = "softmax",
) -> Tensor:
    """Score-CAM weights ``[B, K]``: the target's probability (softmax, or with ``probabilities="sigmoid"`` its
    own ``sigmoid(z_c)`` for multi-label heads; for a callable target, its score)
    on ``x * norm(upsample(A_k))`` for every channel ``k``; ``chunk_size`` masked images per forward
    (``None``: :func:`~lightning_viz.methods.batching.throughput_images`, the default memory budget, on the CPU at
    most :data:`~lightning_viz.methods.batching.CPU_SCORECAM_MB` of activations; the result does not depend on
    it). ``classes`` (e.g. a pass's ``PassResult.classes``) pins the class per image."""
    check_probabilities(probabilities)
    labels = check_labels_per_image("scorecam", labels, x.shape[0])
    b, k = activations.shape[:2]
    acts = activations.float().flatten(0, 1)  # [B * K, h, w]; each chunk upsamples and normalizes only its masks
    tgt = resolve_target(target)
    if classes is None and not isinstance(tgt, CallableTarget):
        classes = tgt.classes(check_logits("Score-CAM", model(x), x.shape[0]), labels)
    out = torch.empty(b * k, device=x.device, dtype=x.dtype)
    img = torch.arange(b * k, device=x.device) // k  # flat index = image * K + channel
    chunk_size = check_chunk_size(chunk_size) or throughput_images(
        model, x, batching.CPU_SCORECAM_MB, batching.CPU_SCORECAM_MAX_IMAGES
    )
    for sl in chunks(b * k, chunk_size):
        progress(sl.start, b * k, "masked images")  # a line every few seconds inside a callback run (rank 0)
        masks = F.interpolate(acts[sl, None], size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
        lo = masks.flatten(1).amin(1)[:, None, None, None]
        hi = masks.flatten(1).amax(1)[:, None, None, None]
        # constant at the layer's resolution (a 1 x 1 map, a saturated channel): a zero mask; testing the upsampled
        # map alone would stretch the rounding noise of the interpolation (~1e-7 relative) to a [0, 1] random mask
        varies = (acts[sl].flatten(1).amax(1) > acts[sl].flatten(1).amin(1))[:, None, None, None] & (hi > lo)
        # no floor on the range: activations of ~1e-13 (an untrained EfficientNet) still give masks up to 1
        masks = torch.where(varies, (masks - lo) / torch.where(varies, hi - lo, 1.0), torch.zeros_like(masks))
        masked = x[img[sl]] * masks.to(x.dtype)
        logits = model(masked)
        if isinstance(tgt, CallableTarget):
            out[sl] = tgt.score(logits, None)
        else:
            assert classes is not None  # given, or set above for every non-callable target
            out[sl] = class_probability(logits, classes.to(x.device)[img[sl]], probabilities)
    return out.view(b, k)


def hirescam_weights(a: Tensor, g: Tensor) -> Tensor:
    """HiResCAM: the gradients themselves, element-wise ``[B, K, h, w]`` (map ``ReLU(sum_k G_k * A_k)``)."""
    return g


def eigencam_map(a: Tensor) -> Tensor:
    """Eigen-CAM ``[B, h, w]`` (before the ReLU of the core): each position's activations ``[h*w, K]``,
    centred over positions, projected on their first right singular vector; the sign is chosen so the
    projection correlates positively with ``sum_k A_k`` (0 where the activations are constant; NaN for an image
    whose activations are not finite, the others unaffected)."""
    b, _k, h, w = a.shape
    m = a.detach().double().flatten(2).transpose(1, 2)  # [B, h*w, K]
    m = m - m.mean(dim=1, keepdim=True)
    finite = m.isfinite().flatten(1).all(dim=1)
    if not bool(finite.all()):  # the SVD of a non-finite matrix fails for the whole batch: NaN for those images
        out = torch.full((b, h, w), float("nan"), dtype=a.dtype, device=a.device)
        if bool(finite.any()):
            out[finite] = eigencam_map(a[finite])
        return out
    _, _, vh = torch.linalg.svd(m, full_matrices=False)
    proj = m @ vh[:, 0, :, None]  # [B, h*w, 1]
    total = a.detach().double().sum(dim=1).flatten(1)
    corr = ((total - total.mean(dim=1, keepdim=True)) * proj[..., 0]).sum(dim=1)
    sign = torch.where(corr < 0, -1.0, 1.0).to(proj.dtype)
    return (proj[..., 0] * sign[:, None]).view(b, h, w).to(a.dtype)


@torch.no_grad()
def ablationcam_weights(
    model: nn.Module,
    x: Tensor,
    layer: str,
    activations: Tensor,
    scores: Tensor,
    target: TargetSpec = "label",
    classes: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """Ablation-CAM weights ``[B, K]``: ``(y - y^k) / y`` with ``y`` the target score (``scores``, e.g. a
    pass's ``PassResult.scores``) and ``y^k`` the same score with channel ``k`` of ``layer``'s output
    zeroed (a forward hook); ``chunk_size`` ablated images per forward (``None``: as many as the default memory
    budget holds, :func:`~lightning_viz.methods.batching.images_per_forward`); 0 where ``y = 0``. What precedes
    ``layer`` runs once per image and chunk (its output copied, one channel zeroed per copy) where that gives the
    whole forwards' scores on the first two ablations, else every ablated image runs whole."""
    b, k = activations.shape[:2]
    tgt = resolve_target(target)
    if classes is None and not isinstance(tgt, CallableTarget):
        raise ValueError("ablationcam needs the target classes of the pass (PassResult.classes)")
    module = get_layer(model, layer)
    layout = layout_of(model, layer)
    out = torch.empty(b * k, device=x.device, dtype=torch.float64)
    img = torch.arange(b * k, device=x.device) // k  # flat index = image * K + channel
    channel = torch.arange(b * k, device=x.device) % k
    size = check_chunk_size(chunk_size) or images_per_forward(model, x)

    def ablated_logits(sl: slice, shared: bool) -> Tensor:
        """Logits of the chunk's ablated images; ``shared`` (one image): that image once up to ``layer``, then
        the chunk's copies of its output, each with its channel zeroed (what precedes ``layer`` is the same for
        every copy, and tensors of it broadcast against the copies)."""
        n = sl.stop - sl.start
        keep = torch.ones(n, k, device=x.device)
        keep[torch.arange(n, device=x.device), channel[sl]] = 0

        def ablate(_m: nn.Module, _inputs: object, output: Tensor) -> Tensor:
            if shared and output.shape[0] == 1:
                output = output.expand(n, *output.shape[1:])
                copies[0] += output[0].numel() * output.element_size()
            a = output if layout is None else layout.to_map(output, layer)  # the map of read_as_map, if any
            a = a * keep.to(output.dtype).view(*keep.shape, *([1] * (a.ndim - 2)))
            return a if layout is None else layout.from_map(a, output)

        handles = [module.register_forward_hook(ablate)]
        try:
            if shared:  # what each copy costs: the outputs of the modules after the layer (batch n, not 1)
                copies[0] = 0
                for m in model.modules():
                    if not list(m.children()):
                        handles.append(m.register_forward_hook(partial(count_copies, n)))
            return model(x[img[sl.start]][None] if shared else x[img[sl]])
        finally:
            for h in handles:
                h.remove()

    copies = [0]

    def count_copies(n: int, _m: nn.Module, _inputs: object, output: object) -> None:
        if isinstance(output, Tensor) and output.ndim and output.shape[0] == n > 1:
            copies[0] += output.numel() * output.element_size() // n

    # One image's copies share everything before ``layer`` (a ResNet-50's ``layer4``: ~all of the forward), checked
    # on the first two ablations against whole forwards; a model where the copies do not broadcast (a concatenation
    # with an earlier tensor, a batch-size-dependent reshape) takes whole forwards of every ablated image.
    check, shared_ok = slice(0, min(2, k)), False
    if b * k:
        whole = ablated_logits(check, False)
        try:
            shared = ablated_logits(check, True)
            scale = float(whole.abs().amax().clamp_min(1e-30))
            ok = shared.shape == whole.shape and torch.allclose(shared.double(), whole.double(), 1e-4, 1e-5 * scale)
            shared_ok = bool(ok)
        except Exception:  # the model's own check of the batch, a shape error: whole forwards, as before
            pass
    if shared_ok and chunk_size is None:  # copies within the budget: all of an image's channels at a deep layer
        size = max(size, min(k, int(default_memory_mb(x.device) * 2**20) // max(1, copies[0])))
    starts = [s for i in range(b) for s in range(i * k, (i + 1) * k, size)] if shared_ok else range(0, b * k, size)
    for start in starts:
        stop = min(start + size, (int(img[start]) + 1) * k if shared_ok else b * k)
        sl = slice(start, stop)
        progress(sl.start, b * k, "ablated images")  # a line every few seconds inside a callback run (rank 0)
        logits = ablated_logits(sl, shared_ok)
        if isinstance(tgt, CallableTarget):
            out[sl] = tgt.score(logits, None).double()
        else:
            assert classes is not None  # checked above for every non-callable target
            out[sl] = logits.gather(1, classes.to(x.device)[img[sl], None]).squeeze(1).double()
    y = scores.detach().to(x.device, torch.float64)[:, None]
    drop = (y - out.view(b, k)) / torch.where(y != 0, y, torch.ones_like(y))
    return torch.where(y != 0, drop, torch.zeros_like(drop)).to(activations.dtype)


# ---------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class CAMVariant:
    """One CAM variant: exactly one of the ways to get its map, and what that needs.

    Attributes:
        name: canonical method name (tags, options).
        reference: paper and equation.
        weights: ``(A, G) -> w`` (``[B, K]`` or element-wise ``[B, K, h, w]``) from one plain gradient pass.
        activation_map: ``A -> [B, h, w]`` map from the activations alone (no gradient, no class).
        forward_weights: ``(model, x, layer, A, result, target, labels, chunk_size, probabilities) -> w [B, K]``
            from extra forwards of the input (``result`` is the plain pass: its classes and scores;
            ``probabilities``: ``"softmax"`` or ``"sigmoid"``, how logits become class probabilities).
        head: weights from the classifier (the last ``nn.Linear`` over the GAP of the layer): needs a class.
        guided_of: the variant whose map multiplies guided backprop (needs a pass with the guided ReLU rule).
        needs_class: a class target is required (not a callable score).
        aliases: other accepted spellings.
    """

    name: str
    reference: str
    weights: Optional[Callable[[Tensor, Tensor], Tensor]] = None
    activation_map: Optional[Callable[[Tensor], Tensor]] = None
    forward_weights: Optional[Callable[..., Tensor]] = None
    head: bool = False
    guided_of: Optional[str] = None
    needs_class: bool = False
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ways = [
            self.weights is not None,
            self.activation_map is not None,
            self.forward_weights is not None,
            self.head,
            self.guided_of is not None,
        ]
        if sum(ways) != 1:
            raise ValueError(
                f"CAM variant {self.name!r} must have exactly one of weights, activation_map, "
                f"forward_weights, head, guided_of; got {sum(ways)}"
            )

    @property
    def guided(self) -> bool:
        """True when the map is ``[B, C, H, W]`` guided backprop times a CAM (needs a guided pass)."""
        return self.guided_of is not None

    @property
    def needs_input(self) -> bool:
        """True when the map needs extra forwards of the input images."""
        return self.forward_weights is not None


def _scorecam_forward(
    model: nn.Module,
    x: Tensor,
    layer: str,
    a: Tensor,
    result: PassResult,
    target: TargetSpec,
    labels: Optional[Tensor],
    chunk_size: Optional[int],
    probabilities: Probabilities = "softmax",
) -> Tensor:
    return scorecam_weights(model, x, a, target, labels, result.classes, chunk_size, probabilities)


def _ablation_forward(
    model: nn.Module,
    x: Tensor,
    layer: str,
    a: Tensor,
    result: PassResult,
    target: TargetSpec,
    labels: Optional[Tensor],
    chunk_size: Optional[int],
    probabilities: Probabilities = "softmax",
) -> Tensor:
    return ablationcam_weights(model, x, layer, a, result.scores, target, result.classes, chunk_size)


#: Every CAM variant by canonical name, in the order they are listed to users.
CAM_VARIANTS: dict[str, CAMVariant] = {}
_ALIASES: dict[str, str] = {}


def register_cam_variant(variant: CAMVariant) -> CAMVariant:
    """Add (or replace) a variant; the callback, :func:`class_activation_map` and the checks follow it."""
    for key in (variant.name, *variant.aliases):
        owner = _ALIASES.get(key.lower())
        if owner is not None and owner != variant.name:
            raise ValueError(f"CAM method name {key!r} is already used by {owner!r}")
    if variant.guided_of is not None:
        base = CAM_VARIANTS.get(variant.guided_of)
        if base is None or base.guided or base.needs_input:
            raise ValueError(f"guided CAM {variant.name!r}: guided_of must name a registered plain-pass variant")
    CAM_VARIANTS[variant.name] = variant
    for key in (variant.name, *variant.aliases):
        _ALIASES[key.lower()] = variant.name
    _refresh_names()
    return variant


def _refresh_names() -> None:
    global CAM_METHODS, GUIDED_CAM_METHODS, WEIGHT_FUNCTIONS
    CAM_METHODS = tuple(n for n, v in CAM_VARIANTS.items() if not v.guided)
    GUIDED_CAM_METHODS = tuple(n for n, v in CAM_VARIANTS.items() if v.guided)
    WEIGHT_FUNCTIONS = {n: v.weights for n, v in CAM_VARIANTS.items() if v.weights is not None}


CAM_METHODS: tuple[str, ...] = ()
GUIDED_CAM_METHODS: tuple[str, ...] = ()
WEIGHT_FUNCTIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {}

for _v in (
    CAMVariant("cam", "Zhou et al. 2016", head=True, needs_class=True),
    CAMVariant("gradcam", "Selvaraju et al. 2017", weights=gradcam_weights, aliases=("grad-cam",)),
    CAMVariant(
        "gradcampp", "Chattopadhay et al. 2018, Eq. 19", weights=gradcampp_weights, aliases=("gradcam++", "grad-cam++")
    ),
    CAMVariant("xgradcam", "Fu et al. 2020", weights=xgradcam_weights),
    CAMVariant("layercam", "Jiang et al. 2021", weights=layercam_weights),
    CAMVariant(
        "counterfactual_gradcam",
        "Selvaraju et al. 2017, Sec. 5",
        weights=counterfactual_weights,
        aliases=("counterfactual",),
    ),
    CAMVariant("hirescam", "Draelos & Carin 2020", weights=hirescam_weights),
    CAMVariant("eigencam", "Muhammad & Yeasin 2020", activation_map=eigencam_map),
    CAMVariant("scorecam", "Wang et al. 2020, Eq. 6-10", forward_weights=_scorecam_forward),
    CAMVariant("ablationcam", "Desai & Ramaswamy 2020", forward_weights=_ablation_forward, aliases=("ablation-cam",)),
    CAMVariant("guided_gradcam", "Selvaraju et al. 2017, Sec. 3", guided_of="gradcam"),
    CAMVariant(
        "guided_gradcampp",
        "Selvaraju et al. 2017, Sec. 3 with Grad-CAM++",
        guided_of="gradcampp",
        aliases=("guided_gradcam++",),
    ),
):
    register_cam_variant(_v)


def canonical_cam_method(name: str) -> str:
    """Canonical method name (``"gradcam++"`` -> ``"gradcampp"``); clear error listing the allowed ones."""
    key = _ALIASES.get(name.lower())
    if key is None:
        aliases = ", ".join(repr(a) for v in CAM_VARIANTS.values() for a in v.aliases)
        raise ValueError(f"unknown CAM method {name!r}; allowed: {', '.join(CAM_VARIANTS)} (aliases: {aliases})")
    return key


def cam_variant(name: str) -> CAMVariant:
    """The registry entry of ``name`` (any accepted spelling)."""
    return CAM_VARIANTS[canonical_cam_method(name)]


def gradient_free_hint() -> str:
    """The sentence naming the CAM variants that need no gradient (for a layer no gradient reaches)."""
    free = [n for n, v in CAM_VARIANTS.items() if v.weights is None and v.guided_of is None]
    return f"The CAM variants {', '.join(free)} need no gradient."


def _check_layer(a: Tensor, layer: str, what: str = "CAM") -> None:
    if a.ndim != 4:
        raise ValueError(
            f"{what} needs a layer with [B, K, h, w] output; {layer!r} gives {tuple(a.shape)}. "
            "Choose a conv layer or block."
        )


def _head_weights(
    a: Tensor, classes: Optional[Tensor], model: Optional[nn.Module], layer: str, head: Optional[str] = None
) -> Tensor:
    if classes is None:
        raise ValueError(
            "CAM needs a target class ('label', 'predicted' or a class index); a callable target has "
            "none. Use 'gradcam'."
        )
    if model is None:
        raise ValueError("CAM needs the model to read the classifier weights")
    linear = cam_head(model, a.shape[1], layer, head)
    weight = _two_class(linear.weight.detach())
    return weight.to(a.dtype)[classes.to(weight.device)].to(a.device)


def _two_class(p: Tensor) -> Tensor:
    """A one-output head's weight ``[1, C]`` or bias ``[1]`` as the two classes the model adapter reads a one-logit
    model as (:func:`lightning_viz.targets.binary_logits`: ``(-z/2, z/2)``); any other head's as it is."""
    return torch.cat([-0.5 * p, 0.5 * p]) if p.shape[0] == 1 else p


def variant_from_pass(
    result: PassResult,
    layer: str,
    method: str = "gradcam",
    size: Optional[tuple[int, ...]] = None,
    model: Optional[nn.Module] = None,
    x: Optional[Tensor] = None,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    probabilities: Probabilities = "softmax",
) -> Tensor:
    """The ``[B, H, W]`` map of any non-guided variant from a plain pass that recorded ``layer``; ``model``
    (classifier head, extra forwards), ``x``, ``target``, ``labels`` and ``probabilities`` (extra forwards:
    Score-CAM's softmax or per-class sigmoid) as the variant needs.
    ``size`` defaults to the input size for variants that forward ``x``."""
    v = cam_variant(method)
    if v.guided:
        raise ValueError(
            f"{v.name!r} is guided backprop times a CAM, [B, C, H, W]: use guided_class_activation_map "
            "or guided_cam_from_passes"
        )
    if result.rule is not None:
        raise ValueError(f"CAM weights need plain gradients; this pass used the {result.rule!r} ReLU rule")
    a = result.layer(layer)[0]
    _check_layer(a, layer, v.name)
    if v.activation_map is not None:
        cam = F.relu(v.activation_map(a))
        if size is not None and tuple(cam.shape[-2:]) != tuple(size):
            cam = F.interpolate(cam[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]
        return cam
    if v.forward_weights is not None:
        if model is None or x is None:
            raise ValueError(f"{v.name} needs the model and the input images for its extra forwards")
        w = v.forward_weights(model, x, layer, a, result, target, labels, chunk_size, probabilities)
        return cam_map(a, w.to(a.dtype), tuple(size) if size is not None else tuple(x.shape[-2:]))
    if v.head:
        w = _head_weights(a, result.classes, model, layer, result.head)
    else:
        assert v.weights is not None  # exactly one way per variant (CAMVariant.__post_init__)
        w = v.weights(a, result.gradient(layer, v.name, gradient_free_hint()))
    return cam_map(a, w, None if size is None else tuple(size))


def cam_from_pass(
    result: PassResult,
    layer: str,
    method: str = "gradcam",
    size: Optional[tuple[int, ...]] = None,
    model: Optional[nn.Module] = None,
) -> Tensor:
    """The ``[B, H, W]`` map of ``method`` (a variant that needs no extra forward: see :func:`variant_from_pass`)
    from a plain (no ReLU rule) pass that recorded ``layer``; ``model`` is needed for ``"cam"`` (classifier weights)."""
    v = cam_variant(method)
    if v.needs_input:
        raise ValueError(f"{v.name} needs the input images and extra forwards: use variant_from_pass(..., x=...)")
    return variant_from_pass(result, layer, v.name, size, model)


def scorecam_from_pass(
    result: PassResult,
    model: nn.Module,
    x: Tensor,
    layer: str,
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    probabilities: Probabilities = "softmax",
) -> Tensor:
    """Score-CAM ``[B, H, W]`` of ``layer`` from a pass's activations (and target classes) plus ``K``
    masked forwards per image (``probabilities``: see :func:`scorecam_weights`)."""
    return variant_from_pass(
        result, layer, "scorecam", tuple(x.shape[-2:]), model, x, target, labels, chunk_size, probabilities
    )


def guided_cam_from_passes(plain: PassResult, guided: PassResult, layer: str, method: str = "guided_gradcam") -> Tensor:
    """Guided Grad-CAM(++) ``[B, C, H, W]``: guided-backprop input gradient times the upsampled CAM."""
    v = cam_variant(method)
    if v.guided_of is None:
        raise ValueError(f"{v.name!r} is not a guided CAM method; allowed: {', '.join(GUIDED_CAM_METHODS)}")
    if guided.rule != "guided":
        raise ValueError("guided CAM needs a pass with the 'guided' ReLU rule")
    input_grad = guided.input_grad
    if input_grad is None:
        raise ValueError("guided CAM needs a guided pass taken with input_grad=True")
    size = tuple(input_grad.shape[-2:])
    cam = variant_from_pass(plain, layer, v.guided_of, size)
    return input_grad * cam[:, None]


def rectified(result: PassResult, layer: str) -> PassResult:
    """``result`` with ``layer``'s activations ``ReLU(A)``: what a head-reading variant (``cam``) weighs when a
    functional ReLU lies between the layer and the pooling (:func:`verify_cam_head` returned ``True``)."""
    return replace(result, activations={**result.activations, layer: result.layer(layer)[0].relu()})


def _detect_layouts(model: nn.Module, x: Tensor, layer: str) -> None:
    check_images("class_activation_map", x)
    check_eval("gradient and CAM methods", model)  # before any forward, as gradient_pass
    with input_matches_model("class_activation_map", model, x), torch.no_grad():
        detect_layouts(model, x, [layer])


def class_activation_map(
    model: nn.Module,
    x: Tensor,
    layer: str,
    method: str = "gradcam",
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    probabilities: Probabilities = "softmax",
) -> Tensor:
    """``[B, H, W]`` CAM of ``layer`` by ``method`` (each variant's paper and equation: :data:`CAM_VARIANTS`); one
    forward + one backward per chunk, plus the variant's extra forwards (the backward stops at ``layer``: no input
    gradient is taken). ``probabilities``: Score-CAM's softmax or per-class sigmoid (:func:`scorecam_weights`).
    ``"cam"`` checks numerically, as the callback does at setup, that ``layer`` feeds the GAP + linear head
    (:func:`verify_cam_head`; a functional ReLU in between: CAM of ``ReLU(A)``). A Swin stage's channels-last map
    and a ViT block's tokens are read as ``[B, C, h, w]`` maps (:func:`~lightning_viz.capture.detect_layouts`)."""
    _detect_layouts(model, x, layer)
    result = gradient_pass(model, x, target, labels, [layer], None, chunk_size, input_grad=False)
    if cam_variant(method).head and result.classes is not None:
        a = result.layer(layer)[0]
        if a.ndim == 4 and verify_cam_head(a, result.logits, cam_head(model, a.shape[1], layer, result.head), layer):
            result = rectified(result, layer)
    return variant_from_pass(
        result, layer, method, tuple(x.shape[-2:]), model, x, target, labels, chunk_size, probabilities
    )


def guided_class_activation_map(
    model: nn.Module,
    x: Tensor,
    layer: str,
    method: str = "guided_gradcam",
    target: TargetSpec = "label",
    labels: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
) -> Tensor:
    """``[B, C, H, W]`` Guided Grad-CAM(++) of ``layer`` (Selvaraju et al. 2017, Sec. 3: guided backprop times the
    upsampled CAM; a plain and a guided pass per chunk)."""
    _detect_layouts(model, x, layer)
    plain = gradient_pass(model, x, target, labels, [layer], None, chunk_size, input_grad=False)
    guided = gradient_pass(model, x, target, labels, (), "guided", chunk_size)
    return guided_cam_from_passes(plain, guided, layer, method)
