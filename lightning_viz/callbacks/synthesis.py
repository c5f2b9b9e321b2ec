"""Callbacks that optimize the input with the model frozen: class-model images, unit images, feature
inversion and adversarial examples, every ``every_n_epochs`` epochs (step = epoch).

Tags:
* :class:`ClassModelCallback` -- ``viz-class_model/grid`` (each image with its class name underneath) and
  ``viz-class_model/class<c>/score`` (``class000_circle``: :func:`~lightning_viz.logging.indexed`);
* :class:`UnitCallback` -- ``viz-units/<layer>/grid`` and ``viz-units/<layer>/unit<c>/activation`` (``unit003``);
* :class:`InversionCallback` -- ``viz-inversion/<layer>/<probe-id>`` (original | reconstruction), or one
  ``viz-inversion/<layer>/grid`` with ``layout="grid"``, and ``viz-inversion/<layer>/feature_error``;
* :class:`AdversarialCallback` -- ``viz-adversarial/<probe-id>`` (image | amplified perturbation |
  adversarial, with "pred a -> b" in class names underneath), or one ``viz-adversarial/grid`` with
  ``layout="grid"``, ``viz-adversarial/{linf,l2,flip_rate}`` and ``viz-adversarial/min_flip_eps``
  (mean over probes of the smallest budget that flips each one).

``display_px`` (default 96): tiles are upscaled (nearest, integer factor) so the shorter side is at least that.

Images live in the model's input space; when the probe set knows its normalization (``mean``/``std``)
the images are kept in the valid pixel range ``[0, 1]`` and shown un-normalized.
Every random draw comes from a ``torch.Generator`` seeded with ``seed`` at each run, so two epochs
differ only because the model changed.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor, nn

from ..layers import canonical_name, hookable_layer, module_device, module_dtype
from ..logging import VizLogger, indexed, make_tag
from ..methods.adversarial import fgsm, minimal_flip_budget, pgd
from ..methods.checks import check_chunk_size
from ..methods.regularizers import build_regularizers
from ..methods.synthesis import (
    class_model_images,
    initial_images,
    invert_features,
    per_image_noise,
    unit_images,
    valid_range,
)
from ..probe import ProbeSet
from ..render import _shared_strip, class_name, compose, cut_name, fit_names, labeled_grid, upscale
from ..targets import binary_logits, check_probabilities
from ._options import LayersSpec, index_list, reject_options, renamed_option, single_layer
from .base import DEV_RUN_STEPS, VisualizationCallback, image_size_hint

__all__ = ["ClassModelCallback", "UnitCallback", "InversionCallback", "AdversarialCallback"]


def _display(images: Tensor, mean: Any, std: Any) -> Tensor:
    """Model-space images -> ``[0, 1]`` for display (normalization undone, else per-image min-max)."""
    return ProbeSet(images=images.detach().float().cpu(), mean=mean, std=std).display_images()


#: Image area (pixels) at which ``l2`` and ``tv`` are the plain weights of the summed penalties.
PRIOR_REFERENCE_PIXELS = 32 * 32


def prior_scale(shape: Any) -> float:
    """Factor on the ``l2`` and ``tv`` weights for images of ``shape`` (``[..., H, W]``): the penalties sum over
    the ``H * W`` pixels while the objectives (a class score, a mean activation, a normalized feature error) do
    not grow with the image, so the weights are per :data:`PRIOR_REFERENCE_PIXELS` (Mahendran & Vedaldi 2015
    normalize their priors by the pixel count too)."""
    h, w = int(shape[-2]), int(shape[-1])
    return PRIOR_REFERENCE_PIXELS / float(h * w)


def pixel_scale(probe: ProbeSet | None, device: Any = None) -> Optional[Tensor]:
    """``1 / std`` (``[1, C, 1, 1]``) when the probes' normalization only rescales pixels (``mean`` all 0, ``std`` not
    1: uint8 pixels ``0..255`` are ``mean=[0], std=[1/255]``), else ``None``. With it the optimization runs in
    pixel units (``optimize_input(scale=...)``): ``lr``, the init noise and the priors are sized for inputs of order
    1, and on a ``0..255`` input they moved the image by a fraction of a level (gray reconstructions)."""
    if probe is None or probe.mean is None or probe.std is None:
        return None
    mean, std = [float(v) for v in probe.mean], [float(v) for v in probe.std]
    if any(m != 0.0 for m in mean) or all(v == 1.0 for v in std):
        return None
    return 1.0 / torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)


class _InputOptimizationCallback(VisualizationCallback):
    """Shared options of the input-optimization callbacks (see :mod:`lightning_viz.methods.synthesis`).

    Args:
        steps: optimization steps.
        lr: learning rate of the optimizer, in the model's input units (pixel units ``[0, 1]`` when the normalization
            only rescales pixels, :func:`pixel_scale`).
        l2: weight of the ``||I||^2`` penalty (Simonyan et al. 2014), per 32 x 32 px of image (see ``tv``).
        l2_decay: ``I <- (1 - l2_decay) I`` after every step (Yosinski et al. 2015).
        blur_every: Gaussian blur every ``blur_every`` steps (0 = off), of width ``blur_sigma`` pixels.
        blur_sigma: blur width in pixels (default 0.5; only with ``blur_every``).
        jitter: random shift of up to ``jitter`` pixels before each forward pass (0 = off).
        tv: weight of the total-variation penalty (Mahendran & Vedaldi 2015). Both penalties sum over pixels, so
            ``l2`` and ``tv`` are scaled by :data:`PRIOR_REFERENCE_PIXELS` / ``(H * W)``: they weigh against the
            objective alike at any resolution (as the plain sums did at 32 x 32 px; at 224 px the plain weights
            buried the objective: gray class models, inversions at 0.9 relative feature error).
        clip_percentile: zero pixels whose norm is below this percentile of each image (0 = off).
        clip_contribution_percentile: zero pixels whose contribution ``|I * dS/dI|`` is below this percentile (0 = off).
        parameterization: ``"pixel"`` or ``"fft"`` (decorrelated Fourier basis, lucid).
        init: starting image: ``"zero"`` (the mean image), ``"gray"`` (mid-range) or ``"noise"`` (gray plus
            seeded noise; the default, since an all-zero input can be a zero-gradient saddle of a ReLU net).
        optimizer: ``"adam"`` or ``"sgd"`` (plain gradient ascent).
        seed: seed of the generator for init noise and jitter, reset at every run.
        chunk_size: optimize this many images at a time (``None``: all at once).
        input_shape: ``[C, H, W]`` of one image (class/unit callbacks; default: the probe images' shape).
        display_px: shorter side each shown image is upscaled to (0: as computed).
        **kwargs: schedule and probe options of :class:`VisualizationCallback`.
    """

    def __init__(
        self,
        steps: int = 64,
        lr: float = 0.05,
        l2: float = 0.0,
        l2_decay: float = 0.0,
        blur_every: int = 0,
        blur_sigma: Optional[float] = None,
        jitter: int = 0,
        tv: float = 0.0,
        clip_percentile: float = 0.0,
        clip_contribution_percentile: float = 0.0,
        parameterization: Literal["pixel", "fft"] = "pixel",
        init: Literal["zero", "gray", "noise"] = "noise",
        optimizer: Literal["adam", "sgd"] = "adam",
        seed: int = 0,
        chunk_size: Optional[int] = None,
        input_shape: Optional[list[int]] = None,
        display_px: int = 96,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        name = type(self).__name__
        if display_px < 0:
            raise ValueError(f"{name}: display_px must be >= 0; got {display_px}")
        self.display_px = display_px
        if steps < 1 or lr <= 0:
            raise ValueError(f"{name}: need steps >= 1 and lr > 0; got steps={steps}, lr={lr}")
        if parameterization not in ("pixel", "fft"):
            raise ValueError(f"{name}: parameterization must be 'pixel' or 'fft'; got {parameterization!r}")
        if init not in ("zero", "gray", "noise"):
            raise ValueError(f"{name}: init must be 'zero', 'gray' or 'noise'; got {init!r}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"{name}: optimizer must be 'adam' or 'sgd'; got {optimizer!r}")
        nonneg = dict(l2=l2, l2_decay=l2_decay, tv=tv, blur_every=blur_every, jitter=jitter)
        nonneg.update(clip_percentile=clip_percentile, clip_contribution_percentile=clip_contribution_percentile)
        negative = {k: v for k, v in nonneg.items() if v < 0}
        if negative:
            raise ValueError(f"{name}: {', '.join(negative)} must be >= 0 (0 = off); got {negative}")
        chunk_size = check_chunk_size(chunk_size)
        if blur_sigma is not None and not blur_every:  # was: no blur at all, silently
            raise ValueError(
                f"{name}: blur_sigma={blur_sigma} does nothing with blur_every=0 (blur off); give blur_every too "
                "(blur every that many steps, e.g. blur_every=4)"
            )
        blur_sigma = 0.5 if blur_sigma is None else blur_sigma
        if input_shape is not None and len(input_shape) != 3:
            raise ValueError(f"{name}: input_shape must be [C, H, W]; got {input_shape}")
        self.steps, self.lr, self.l2 = steps, lr, l2
        self.reg_options: dict[str, Any] = dict(
            l2_decay=l2_decay,
            blur_every=blur_every,
            blur_sigma=blur_sigma,
            jitter=jitter,
            tv=tv,
            clip_percentile=clip_percentile,
            clip_contribution_percentile=clip_contribution_percentile,
        )
        build_regularizers(**self.reg_options)  # validates the values now, not at the first epoch end
        self.parameterization, self.init, self.optimizer = parameterization, init, optimizer
        self.seed, self.chunk_size = seed, chunk_size
        self.input_shape = None if input_shape is None else [int(s) for s in input_shape]

    def optimize_kwargs(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        """Keyword arguments for :func:`~lightning_viz.methods.synthesis.optimize_input` (fresh generator and
        regularizers every run, so each epoch starts from the same seed; ``l2`` and ``tv`` scaled to the image
        area, :func:`prior_scale`)."""
        device = module_device(pl_module)
        scale = prior_scale(self.image_shape(probe))
        options = {**self.reg_options, "tv": self.reg_options["tv"] * scale}
        return dict(
            steps=self.steps,
            lr=self.lr,
            regularizers=build_regularizers(l2=self.l2 * scale, **options),
            param=self.parameterization,
            init=self.init,
            optimizer=self.optimizer,
            chunk_size=self.chunk_size,
            generator=torch.Generator().manual_seed(self.seed),  # on the CPU: the same draws on every device
            bounds=None if probe is None else valid_range(probe.mean, probe.std, device),
            scale=pixel_scale(probe, device),
        )

    def show(self, images01: Tensor) -> Tensor:
        """Images upscaled to ``display_px`` for display."""
        return upscale(images01, self.display_px) if self.display_px else images01

    def check_input(self, model: Any, x: Tensor) -> None:
        self.synthesis_input(model, x)

    def synthesis_input(self, model: Any, x: Tensor) -> Tensor:
        """One image of the shape that is optimized: ``x`` (one data item), or zeros of ``input_shape`` when given,
        which the model must take (checked here, at setup, not after the first epoch)."""
        if self.input_shape is None or list(x.shape[1:]) == self.input_shape:
            return x
        z = x.new_zeros(1, *self.input_shape)
        try:
            with torch.no_grad():
                model(z)
        except Exception as exc:
            raise ValueError(
                f"{type(self).__name__}: input_shape={self.input_shape}: the model fails on an image of that shape "
                f"({type(exc).__name__}: {exc}); the data's images are {list(x.shape[1:])}. "
                + (image_size_hint(z, exc) or "Give the [C, H, W] the model takes, or leave input_shape out.")
            ) from exc
        return z

    def image_shape(self, probe: ProbeSet | None) -> list[int]:
        if self.input_shape is not None:
            return self.input_shape
        assert probe is not None  # needs_probes is True exactly when input_shape is None
        return list(probe.images.shape[1:])

    def state_key_parts(self) -> tuple[Any, ...]:
        return (*super().state_key_parts(), self.steps, self.parameterization, self.init, self.seed)

    def dev_run_options(self) -> dict[str, Any]:
        """Two optimization steps, a blur (when on) in them."""
        reg_options = {**self.reg_options, "blur_every": min(self.reg_options["blur_every"], DEV_RUN_STEPS)}
        return {**super().dev_run_options(), "steps": min(self.steps, DEV_RUN_STEPS), "reg_options": reg_options}


#: what works instead for unit images and inversions of a layer no gradient reaches
_OUTSIDE = "Name a layer the forward runs with autograd on in layers=."


class ClassModelCallback(_InputOptimizationCallback):
    """Class-model images (Simonyan et al. 2014): for each class ``c``, the image maximizing
    ``S_c(I) - l2 ||I||^2`` from the same start, all classes in one batch; rank 0 only.

    Args:
        classes: class indices (default: the first ``max_classes`` classes of the model).
        max_classes: cap on the number of classes when ``classes`` is not given.
        l2: the lambda of that objective.
        **kwargs: the options of the input optimization (``steps``, ``lr``, ``blur_every``, ...) and of
            :class:`VisualizationCallback`. One probe image (``probe_source``, or ``probes``) gives the input
            shape and valid range unless ``input_shape`` is given; ``num_probes``/``probe_seed`` do not apply.
    """

    needs_input_grad = True

    method = "class_model"
    per_probe = False

    def __init__(self, classes: Optional[list[int]] = None, max_classes: int = 16, l2: float = 1e-3, **kwargs: Any):
        reject_options(
            type(self).__name__,
            kwargs,
            ("num_probes", "probe_seed"),
            "one probe image gives the input shape and value range",
        )
        super().__init__(l2=l2, num_probes=1, probe_seed=0, **kwargs)
        if classes is not None:
            classes = index_list("ClassModelCallback", "classes", classes, "class")
        if max_classes < 1:
            raise ValueError(f"ClassModelCallback: max_classes must be >= 1; got {max_classes}")
        self.classes = classes
        self.max_classes = max_classes
        self.needs_probes = self.input_shape is None

    def state_key_parts(self) -> tuple[Any, ...]:
        return (*super().state_key_parts(), tuple(self.classes or ()), self.l2)

    def dev_run_options(self) -> dict[str, Any]:  # two classes
        classes = None if self.classes is None else self.classes[:DEV_RUN_STEPS]
        options = {"classes": classes, "max_classes": min(self.max_classes, DEV_RUN_STEPS)}
        return {**super().dev_run_options(), **options}

    def class_options(self) -> dict[str, list[int]]:
        return {**super().class_options(), **({"classes": self.classes} if self.classes else {})}

    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        pl_module = self.adapted(pl_module)
        shape = self.image_shape(probe)
        classes, n = self.classes, self._num_classes
        if classes is None:
            with torch.no_grad():
                n = pl_module(
                    torch.zeros(1, *shape, device=module_device(pl_module), dtype=module_dtype(pl_module))
                ).shape[1]
            classes = list(range(min(n, self.max_classes)))
        # the l2 penalty of the objective is among the regularizers of optimize_kwargs
        res = class_model_images(pl_module, classes, shape, l2=0.0, **self.optimize_kwargs(pl_module, probe))
        return {
            "images": res.images.cpu(),
            "scores": res.scores.cpu(),
            "start_scores": res.start_scores.cpu(),
            "classes": torch.as_tensor(classes),
            "num_classes": torch.tensor([max(classes) + 1 if n is None else n]),  # the score tags' index width
        }

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        mean, std = (probe.mean, probe.std) if probe is not None else (None, None)
        self.warn_non_finite("the class-model images", results["images"], rows="classes")
        names = self.get_class_names(trainer)
        labels = [class_name(c, names) for c in results["classes"].tolist()]
        tiles = self.show(_display(results["images"], mean, std))
        title = f"the input maximizing each class score ({self.steps} steps)"
        logger.image(make_tag(self.method, "grid"), labeled_grid(tiles, labels, caption=title))
        largest = int(results["num_classes"][0]) - 1
        for c, label, s in zip(results["classes"].tolist(), labels, results["scores"]):
            logger.scalar(make_tag(self.method, indexed("class", c, largest, label), "score"), s)


class UnitCallback(_InputOptimizationCallback):
    """Unit visualization (Erhan et al. 2009; Yosinski et al. 2015): for each channel of ``layers`` the image
    maximizing its mean activation (``unit="channel"``) or its center unit (``"neuron"``); rank 0 only.

    Args:
        layers: the layer (one dotted name of ``model.named_modules()``, or a one-element list; required).
        channels: channel indices of that layer, one image each, in one batch (a list, a range, one int or an
            integer tensor; required).
        unit: ``"channel"`` or ``"neuron"``.
        layer: deprecated alias of ``layers``.
        **kwargs: as :class:`ClassModelCallback`.
    """

    method = "units"
    per_probe = False

    def __init__(
        self,
        layers: LayersSpec = None,
        channels: Optional[list[int]] = None,
        unit: Literal["channel", "neuron"] = "channel",
        layer: Optional[str] = None,
        **kwargs: Any,
    ):
        owner = type(self).__name__
        reject_options(
            owner, kwargs, ("num_probes", "probe_seed"), "one probe image gives the input shape and value range"
        )
        super().__init__(num_probes=1, probe_seed=0, **kwargs)
        layer = single_layer(owner, renamed_option(owner, "layer", "layers", layer, layers, None))
        if layer is None or channels is None:  # every missing option at once, not one after the other
            missing = [name for name, value in (("layers", layer), ("channels", channels)) if value is None]
            raise ValueError(
                f"UnitCallback needs {' and '.join(missing)}: the layer and the indices of its channels to visualize, "
                "e.g. UnitCallback(layers='net.conv3', channels=[0, 1, 2])"
            )
        channels = index_list("UnitCallback", "channels", channels, "channel")
        if unit not in ("channel", "neuron"):
            raise ValueError(f"UnitCallback: unit must be 'channel' or 'neuron'; got {unit!r}")
        self.layer = canonical_name(layer)
        self.channels = [int(c) for c in channels]
        self.unit: Literal["channel", "neuron"] = unit
        self.needs_probes = self.input_shape is None
        self._layer_channels: int | None = None  # seen at setup: the width of the unit tags' indices

    def state_key_parts(self) -> tuple[Any, ...]:
        return (*super().state_key_parts(), self.layer, tuple(self.channels), self.unit)

    def dev_run_options(self) -> dict[str, Any]:  # two channels
        return {**super().dev_run_options(), "channels": self.channels[:DEV_RUN_STEPS]}

    def _check_channels(self, n: int | None) -> None:
        """``channels`` within the layer's ``n`` channels (``None``: not known yet)."""
        if n is not None:
            self._layer_channels = n
        if n is not None and max(self.channels) >= n:
            raise ValueError(
                f"UnitCallback: layer {self.layer!r} has {n} channels (0..{n - 1}); got channels {self.channels}"
            )

    def check(self, pl_module: LightningModule) -> None:  # before any forward: the layer's declared width
        self._layer_channels = None
        module = hookable_layer(pl_module, self.layer)
        self._check_channels(getattr(module, "out_channels", None) or getattr(module, "out_features", None))

    def check_input(self, model: Any, x: Tensor) -> None:  # the output's width (also of blocks and pools)
        x = self.synthesis_input(model, x)
        out = self.check_layer_outputs(model, x, [self.layer], dims=(4, 2), what="layers", needs_grad=_OUTSIDE)[
            self.layer
        ]
        self._check_channels(out.shape[1])
        if self.unit == "neuron" and out.ndim != 4:
            raise ValueError(
                f"UnitCallback: unit='neuron' needs a [B, C, h, w] feature map (a neuron is one position); layer "
                f"{self.layer!r} gives {tuple(out.shape)}. Use unit='channel'."
            )

    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        pl_module = self.adapted(pl_module)
        res = unit_images(
            pl_module,
            self.layer,
            self.channels,
            self.image_shape(probe),
            unit=self.unit,
            **self.optimize_kwargs(pl_module, probe),
        )
        return {"images": res.images.cpu(), "scores": res.scores.cpu()}

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        mean, std = (probe.mean, probe.std) if probe is not None else (None, None)
        self.warn_non_finite(f"the {self.layer} unit images", results["images"], rows="channels")
        logger.image(
            make_tag(self.method, self.layer, "grid"),
            labeled_grid(
                self.show(_display(results["images"], mean, std)),
                [f"unit {c}" for c in self.channels],
                caption=f"{self.layer}: the input maximizing each unit's "
                f"{'mean' if self.unit == 'channel' else 'center'} activation ({self.steps} steps)",
            ),
        )
        largest = (self._layer_channels or max(self.channels) + 1) - 1
        for c, s in zip(self.channels, results["scores"]):
            logger.scalar(make_tag(self.method, self.layer, indexed("unit", c, largest), "activation"), s)


class InversionCallback(_InputOptimizationCallback):
    """Feature inversion (Mahendran & Vedaldi 2015): reconstruct each probe from its representation at ``layers``
    with an image prior (``tv``, ``l2``; defaults below), starting from seeded noise. Per probe, split over ranks.

    Args:
        layers: the layer whose output is inverted (one dotted name, or a one-element list; required).
        layer: deprecated alias of ``layers``.
        layout: ``"per_probe"`` (one image per probe) or ``"grid"`` (one image, a row per probe).
        **kwargs: as :class:`ClassModelCallback` (defaults here: ``init="noise"``, ``tv=1e-3``, ``l2=1e-4``),
            and the probe options of :class:`VisualizationCallback` (each probe is reconstructed).
    """

    method = "inversion"

    def __init__(
        self,
        layers: LayersSpec = None,
        init: Literal["zero", "gray", "noise"] = "noise",
        tv: float = 1e-3,
        l2: float = 1e-4,
        layer: Optional[str] = None,
        layout: Literal["per_probe", "grid"] = "per_probe",
        **kwargs: Any,
    ):
        owner = type(self).__name__
        reject_options(owner, kwargs, ("input_shape",), "each probe image is reconstructed at its own shape")
        super().__init__(init=init, tv=tv, l2=l2, input_shape=None, **kwargs)
        if layout not in ("per_probe", "grid"):
            raise ValueError(f"InversionCallback: layout must be 'per_probe' or 'grid'; got {layout!r}")
        self.layout = layout
        layer = single_layer(owner, renamed_option(owner, "layer", "layers", layer, layers, None))
        if layer is None:
            raise ValueError(
                "InversionCallback needs layers: the layer whose features to invert (e.g. layers='net.conv2')"
            )
        self.layer = canonical_name(layer)

    def state_key_parts(self) -> tuple[Any, ...]:
        return (*super().state_key_parts(), self.layer)

    def check(self, pl_module: LightningModule) -> None:
        hookable_layer(pl_module, self.layer)

    def check_input(self, model: Any, x: Tensor) -> None:  # called by the eval-mode forward (any output shape)
        self.check_layer_outputs(model, x, [self.layer], dims=None, needs_grad=_OUTSIDE)

    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        pl_module = self.adapted(pl_module)
        kw = self.optimize_kwargs(pl_module, probe)
        x = probe.to(module_device(pl_module), module_dtype(pl_module))
        if self.init == "noise":  # per-probe noise: the same reconstruction whatever the split over ranks
            noise = 0.1 * per_image_noise(x.shape, self.seed, probe.offset, device=x.device)
            if kw["scale"] is not None:  # 0.1 in pixel units
                noise = noise * kw["scale"]
            kw["init"] = initial_images("gray", x.shape, bounds=kw["bounds"], device=x.device) + noise
        res = invert_features(pl_module, x, self.layer, **kw)
        return {"images": res.images.cpu(), "error": (-res.scores).clamp_min(0).sqrt().cpu()}

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        self.warn_non_finite(f"the {self.layer} reconstructions", results["images"], rows="probes")
        originals = self.show(probe.display_images())
        recons = self.show(_display(results["images"], probe.mean, probe.std))
        names = self.get_class_names(trainer)
        heads = [
            pid if probe.labels is None else f"{pid} {class_name(probe.labels[i], names)}"
            for i, pid in enumerate(probe.ids)
        ]
        if self.layout == "grid":
            rows = [[_shared_strip(96, [h], 13), o, r] for h, o, r in zip(heads, originals, recons)]
            logger.image(
                make_tag(self.method, self.layer, "grid"),
                compose(rows, ["", "original", "reconstruction"], f"inversion of {self.layer}"),
            )
        else:
            for pid, head, orig, rec in zip(probe.ids, heads, originals, recons):
                title = f"{head}: inversion of {self.layer}"  # the probe and the layer, as the grid names them
                image = compose([[orig, rec]], ["original", "reconstruction"], title)
                logger.image(make_tag(self.method, self.layer, pid), image, caption=title)
        logger.scalar(make_tag(self.method, self.layer, "feature_error"), results["error"].mean())


class _ClassDecision(nn.Module):
    """One class's logit of each image (``classes[b]``) as a two-class model ``(-z/2, z/2)``: its arg-max is the
    class's own sigmoid decision ``z > 0``, its cross-entropy the binary one of ``z`` (a multi-label head's class)."""

    def __init__(self, module: nn.Module, classes: Tensor):
        super().__init__()
        self.module, self.classes = module, classes

    def forward(self, x: Tensor) -> Tensor:
        return binary_logits(self.module(x).gather(1, self.classes.view(-1, 1)))


class AdversarialCallback(VisualizationCallback):
    """Adversarial examples of the probes under an L-inf budget ``epsilon`` (pixel units by default), and the
    smallest budget that flips each probe, as a robustness curve over training. Per probe, split over ranks.

    The attack moves each probe away from the model's clean prediction (``mode="untargeted"``) or
    toward the next class ``(pred + 1) % K`` (``"next_class"``); a probe is flipped when its prediction
    leaves (reaches) that class.

    Args:
        epsilon: L-inf budget of the logged attack, in ``epsilon_units``.
        epsilon_units: ``"pixels"`` (default): ``epsilon``, ``step_size`` and ``min_flip_max_epsilon`` are in pixel
            units of the images before the probes' normalization (``[0, 1]``; e.g. ``8 / 255``), as torchattacks,
            ART and foolbox take them: per channel ``epsilon / std_c`` in the model's input (for uint8 probes,
            ``epsilon * 255`` levels); the ``linf`` / ``l2`` / ``min_flip_eps`` scalars are in the same units.
            ``"input"``: in the model's input units (the normalized tensor). Without a known normalization (no
            ``mean`` / ``std`` on the probes) the two are the same.
        attack: ``"pgd"`` (Madry et al. 2018) or ``"fgsm"`` (Goodfellow et al. 2015).
        steps: PGD steps.
        step_size: PGD step (default ``2.5 * epsilon / steps``).
        mode: ``"untargeted"`` or ``"next_class"`` (the attack's goal).
        target: deprecated alias of ``mode``.
        random_start: PGD starts from a seeded uniform point in the ball.
        seed: seed of the random start (reset every run).
        min_flip: also search the smallest flipping budget per probe (scan and bisection).
        min_flip_max_epsilon: upper end of the search (default ``4 * epsilon``); probes not flipped even
            there count as this value in ``min_flip_eps`` and are counted in ``min_flip_unflipped``.
        min_flip_iterations: halvings of the search (precision ``max / 2^iterations``; the first two by a
            scan of 4 budgets, as flipping need not be monotone in the budget).
        min_flip_attack: attack used in the search (``"fgsm"`` is cheapest; ``"pgd"`` uses ``steps``).
        loss: what the attacks climb: ``"ce"`` (cross-entropy) or ``"score"`` (the class logit itself).
        probabilities: ``"softmax"`` (one class per image: the prediction is the arg-max) or ``"sigmoid"``
            (multi-label heads: each class has its own decision ``sigmoid(z_c) > 0.5``; an arg-max change says
            nothing about them). With ``"sigmoid"`` the attack flips one class's decision, climbing its binary
            cross-entropy: ``"untargeted"`` that of the arg-max class (yes -> no, or no -> yes when no class is
            predicted), ``"next_class"`` makes class ``(pred + 1) % K`` a yes; captions show the class's
            probability before and after.
        chunk_size: attack this many probes at a time (``None``: all at once); results are the same.
        layout: ``"per_probe"`` (one image per probe) or ``"grid"`` (one image, a row per probe).
        display_px: shorter side each shown image is upscaled to (0: as computed).
        **kwargs: schedule and probe options of :class:`VisualizationCallback`.
    """

    needs_input_grad = True

    method = "adversarial"

    def __init__(
        self,
        epsilon: float = 0.03,
        epsilon_units: Literal["pixels", "input"] = "pixels",
        attack: Literal["pgd", "fgsm"] = "pgd",
        steps: int = 10,
        step_size: Optional[float] = None,
        mode: Literal["untargeted", "next_class"] = "untargeted",
        random_start: bool = True,
        seed: int = 0,
        min_flip: bool = True,
        min_flip_max_epsilon: Optional[float] = None,
        min_flip_iterations: int = 6,
        min_flip_attack: Literal["fgsm", "pgd"] = "fgsm",
        loss: Literal["ce", "score"] = "ce",
        probabilities: Literal["softmax", "sigmoid"] = "softmax",
        chunk_size: Optional[int] = None,
        layout: Literal["per_probe", "grid"] = "per_probe",
        display_px: int = 96,
        target: Optional[str] = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if layout not in ("per_probe", "grid") or display_px < 0:
            raise ValueError(
                f"AdversarialCallback: layout must be 'per_probe' or 'grid' and display_px >= 0; "
                f"got {layout!r}, {display_px}"
            )
        self.layout, self.display_px = layout, display_px
        mode = renamed_option(type(self).__name__, "target", "mode", target, mode, "untargeted")
        if epsilon <= 0:
            raise ValueError(f"AdversarialCallback: epsilon must be > 0; got {epsilon}")
        if epsilon_units not in ("pixels", "input"):
            raise ValueError(f"AdversarialCallback: epsilon_units must be 'pixels' or 'input'; got {epsilon_units!r}")
        self.epsilon_units = epsilon_units
        if attack not in ("pgd", "fgsm") or min_flip_attack not in ("pgd", "fgsm"):
            raise ValueError(
                "AdversarialCallback: attack and min_flip_attack must be 'pgd' or 'fgsm'; "
                f"got {attack!r}, {min_flip_attack!r}"
            )
        chunk_size = check_chunk_size(chunk_size)
        if loss not in ("ce", "score"):
            raise ValueError(f"AdversarialCallback: loss must be 'ce' or 'score'; got {loss!r}")
        if mode not in ("untargeted", "next_class"):
            raise ValueError(f"AdversarialCallback: mode must be 'untargeted' or 'next_class'; got {mode!r}")
        check_probabilities(probabilities, "AdversarialCallback(probabilities=...)")
        self.probabilities = probabilities
        if steps < 1 or (step_size is not None and step_size <= 0):
            raise ValueError(f"AdversarialCallback: need steps >= 1 and step_size > 0; got {steps}, {step_size}")
        if min_flip_iterations < 0 or (min_flip_max_epsilon is not None and min_flip_max_epsilon <= 0):
            raise ValueError("AdversarialCallback: min_flip_iterations must be >= 0 and min_flip_max_epsilon > 0")
        self.attack: Literal["pgd", "fgsm"]
        self.loss: Literal["ce", "score"]
        self.min_flip_attack: Literal["fgsm", "pgd"]
        self.epsilon, self.attack, self.steps, self.step_size = epsilon, attack, steps, step_size
        self.mode, self.random_start, self.seed, self.loss = mode, random_start, seed, loss
        self.chunk_size = chunk_size
        self.min_flip, self.min_flip_iterations, self.min_flip_attack = min_flip, min_flip_iterations, min_flip_attack
        self.min_flip_max_epsilon = min_flip_max_epsilon if min_flip_max_epsilon is not None else 4 * epsilon

    def state_key_parts(self) -> tuple[Any, ...]:
        return (*super().state_key_parts(), self.epsilon, self.attack, self.mode)

    def dev_run_options(self) -> dict[str, Any]:
        """Two PGD steps; a min-flip search of a scan and one bisection (3 halvings)."""
        options = {"steps": min(self.steps, DEV_RUN_STEPS), "min_flip_iterations": min(self.min_flip_iterations, 3)}
        return {**super().dev_run_options(), **options}

    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        pl_module = self.adapted(pl_module)
        n = len(probe)
        step = self.chunk_size or n
        parts = [self.attack_probes(pl_module, probe.subset(slice(i, i + step))) for i in range(0, n, step)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def check_probes(self, probe: ProbeSet) -> None:
        """A pixel-unit ``epsilon`` of 1 or more (8 meant as 8 levels of 255?) spans the whole ``[0, 1]`` pixel range:
        every probe could be replaced by any image (flip rate 1 whatever the model). Refused at setup."""
        super().check_probes(probe)
        if self.budget_std(probe) is not None and self.epsilon >= 1:
            raise ValueError(
                f"AdversarialCallback: epsilon={self.epsilon:g} is in pixel units (epsilon_units='pixels'), where "
                f"pixels are in [0, 1]: a budget of 1 or more allows any image. Give it as a fraction, e.g. "
                f"{self.epsilon:g}/255 = {self.epsilon / 255:.4f} for {self.epsilon:g} levels of 255, or "
                "epsilon_units='input' for a budget in the model's input units."
            )

    def budget_std(self, probe: ProbeSet) -> Optional[list[float]]:
        """The per-channel std that turns pixel-unit budgets into input units (``None``: input units already)."""
        if self.epsilon_units != "pixels" or probe.std is None:
            return None
        return [float(v) for v in probe.std]

    def attack_probes(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Tensor]:
        """Attack (and bisect the flip budget of) one chunk of probes; all results per probe, on CPU."""
        device = module_device(pl_module)
        x = probe.to(device, module_dtype(pl_module))
        bounds = valid_range(probe.mean, probe.std, device)
        std = self.budget_std(probe)
        with torch.no_grad():
            logits = pl_module(x)
        clean = logits.argmax(1)
        targeted = self.mode == "next_class"
        classes = (clean + 1) % logits.shape[1] if targeted else clean
        model: nn.Module = pl_module
        decided = classes  # sigmoid: the class whose own decision is attacked
        if self.probabilities == "sigmoid":
            # that class's yes/no as a two-class model (-z_c/2, z_c/2): the attacks flip its arg-max, z_c's sign
            model = _ClassDecision(pl_module, decided)
            classes = torch.ones_like(decided) if targeted else (logits.gather(1, decided.view(-1, 1))[:, 0] > 0).long()
        if self.attack == "fgsm":
            adv = fgsm(model, x, classes, self.epsilon, targeted=targeted, bounds=bounds, loss=self.loss, std=std)
        else:
            # per-probe random start: the same attack whatever the split of the probes over ranks
            start = (
                per_image_noise(x.shape, self.seed, probe.offset, uniform=True, device=device)
                if self.random_start
                else None
            )
            adv = pgd(
                model,
                x,
                classes,
                self.epsilon,
                steps=self.steps,
                step_size=self.step_size,
                targeted=targeted,
                random_start=False,
                start=start,
                bounds=bounds,
                loss=self.loss,
                std=std,
            )
        with torch.no_grad():
            adv_logits = pl_module(adv)
        adv_pred = adv_logits.argmax(1)
        out = {"adv": adv.cpu(), "clean_pred": clean.cpu(), "adv_pred": adv_pred.cpu(), "classes": classes.cpu()}
        if self.probabilities == "sigmoid":
            z, z_adv = (t.gather(1, decided.view(-1, 1))[:, 0].float() for t in (logits, adv_logits))
            out.update(decided=decided.cpu(), prob=z.sigmoid().cpu(), adv_prob=z_adv.sigmoid().cpu())
            out["flipped"] = ((z_adv > 0).long() == classes if targeted else (z_adv > 0).long() != classes).cpu()
        else:
            out["flipped"] = (adv_pred == classes if targeted else adv_pred != classes).cpu()
        if self.min_flip:
            out["min_eps"] = minimal_flip_budget(
                model,
                x,
                classes,
                self.min_flip_max_epsilon,
                self.min_flip_iterations,
                attack=self.min_flip_attack,
                steps=self.steps,
                targeted=targeted,
                bounds=bounds,
                loss=self.loss,
                std=std,
            ).cpu()
        return out

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        self.warn_non_finite("the adversarial images", results["adv"], rows="probes")
        delta = results["adv"] - probe.images.float()
        std = self.budget_std(probe)
        if std is not None:  # in epsilon's units: pixels
            delta = delta * torch.tensor(std, dtype=delta.dtype).view(1, -1, 1, 1)
        flat = delta.flatten(1)
        amplified = (0.5 + delta / (2 * self.epsilon)).clamp(0, 1)  # the full budget [-eps, eps] spans [0, 1]
        units = " (pixels)" if std is not None else ""
        originals = probe.display_images()
        advs = _display(results["adv"], probe.mean, probe.std)
        if self.display_px:
            originals, amplified, advs = (upscale(t, self.display_px) for t in (originals, amplified, advs))
        names = self.get_class_names(trainer)
        head = ["prediction", "original", f"delta +-{self.epsilon:g}", "adversarial"]

        def line(i: int, n: int | None = None, pred: str = "pred ") -> str:  # class names cut to n characters
            if "prob" in results:  # sigmoid: the attacked class's own probability, before -> after
                c, p, q = class_name(results["decided"][i], names), results["prob"][i], results["adv_prob"][i]
                return f"{cut_name(c, n)} {float(p):.0%} -> {float(q):.0%}"
            a, b = (class_name(results[k][i], names) for k in ("clean_pred", "adv_pred"))
            return f"{pred}{cut_name(a, n)} -> {cut_name(b, n)}"

        captions = [line(i) for i in range(len(probe))]

        def fitted(i: int, prefix: str, width: int, height: int, pred: str = "") -> str:  # long class names cut
            return fit_names(lambda n: prefix + line(i, n, pred), width, height)

        if self.layout == "grid":
            rows = [
                [_shared_strip(150, [fitted(i, f"{pid}: ", 150, 13)], 13), originals[i], amplified[i], advs[i]]
                for i, pid in enumerate(probe.ids)
            ]
            logger.image(
                make_tag(self.method, "grid"),
                compose(rows, head, f"{self.attack} attack, L-inf budget {self.epsilon:g}{units}"),
            )
        for i, pid in enumerate(probe.ids if self.layout == "per_probe" else []):
            logger.image(  # the panels named, as in the grid: the delta is amplified, gray = 0
                make_tag(self.method, pid),
                compose(
                    [[originals[i], amplified[i], advs[i]]],
                    head[1:],
                    fitted(
                        i,
                        f"{pid}: ",
                        sum(int(t[i].shape[-1]) + 2 for t in (originals, amplified, advs)) + 2,
                        16,
                        "pred ",
                    ),
                ),
                caption=f"{pid}: {captions[i]}",
            )
        flipped = results["flipped"]
        logger.scalar(make_tag(self.method, "linf"), flat.abs().amax(1).mean())
        logger.scalar(make_tag(self.method, "l2"), flat.norm(dim=1).mean())
        logger.scalar(make_tag(self.method, "flip_rate"), flipped.float().mean())
        if "min_eps" in results:
            eps = results["min_eps"]
            logger.scalar(make_tag(self.method, "min_flip_eps"), eps.clamp(max=self.min_flip_max_epsilon).mean())
            logger.scalar(make_tag(self.method, "min_flip_unflipped"), torch.isinf(eps).float().mean())
