"""Gradient-attribution callbacks: saliency, signed gradient, guided backprop, deconvnet, input x gradient,
integrated gradients and SmoothGrad around any of them, logged as overlays per probe image.

Methods that are read off one gradient pass (see :data:`lightning_viz.methods.gradients.PASS_RULES`)
share it with every other gradient/CAM callback of the same model at the same epoch
(:class:`lightning_viz.methods.shared_pass.PassCache`): each callback registers its layers at ``setup``,
and the first one to run computes one forward + one backward per chunk for all of them. The cached
passes are dropped at the next training batch and at ``teardown``: nothing is held while the model
trains, and no pass outlives an optimizer step, whatever the optimizer does (also mid-epoch validation).
"""

from __future__ import annotations

import weakref
from typing import Any, Literal, Optional, Union

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..layers import module_device, module_dtype, unwrap_model
from ..methods.checks import check_chunk_size
from ..methods.gradients import GRADIENT_METHODS, PASS_RULES, gradient_from_pass, reduce_channels, smoothgrad
from ..methods.relu_rules import check_scripted_relus, relu_rule
from ..methods.shared_pass import INPUT, PassCache, PassResult, model_version, pass_cache
from ..probe import ProbeSet
from ..targets import resolve_target
from .base import DEV_RUN_STEPS, VisualizationWarning, override
from .maps import MapCallback, probabilities

__all__ = ["GradientMapCallback", "GradientCallback", "SMOOTHGRAD_PREFIX"]

SMOOTHGRAD_PREFIX = "smoothgrad_"


class GradientMapCallback(MapCallback):
    """Shared plumbing of gradient and CAM callbacks: target, chunking, and the shared pass.

    Subclasses list what they need from a pass in :meth:`pass_needs` (``{rule: layers}``) and read
    passes with :meth:`get_pass`.

    Args:
        target: ``"label"`` (default), ``"predicted"``, a class index, or (from Python) a callable
            ``logits -> score[B]``.
        chunk_size: probe images per forward/backward (``None``: as many as the memory budget of
            :mod:`lightning_viz.methods.batching` holds); results do not depend on it.
        share_pass: reuse one pass per epoch with the other gradient/CAM callbacks of the model
            (``False``: the methods of this callback still share one pass, but no other callback does).
    """

    def __init__(
        self,
        target: Union[str, int] = "label",
        chunk_size: Optional[int] = None,
        share_pass: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.target = resolve_target(target)  # raises a clear error for an unknown spec
        chunk_size = check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.share_pass = share_pass
        self._own_cache = PassCache()  # used when share_pass is False

    def pass_needs(self, pl_module: LightningModule) -> dict[Optional[str], list[str]]:
        """``{relu_rule: layer names}`` this callback reads from shared passes (``shared_pass.INPUT``: the input
        gradient, computed only when some consumer lists it)."""
        return {}

    def cache(self, pl_module: LightningModule) -> PassCache:
        """The model's shared :class:`PassCache`, or this callback's own one (``share_pass=False``)."""
        return pass_cache(self.adapted(pl_module)) if self.share_pass else self._own_cache

    def relu_rule_methods(self) -> list[str]:
        """This callback's methods that change the backward of ReLUs (guided backprop, deconvnet, guided CAMs)."""
        return []

    def plain_methods(self) -> list[str]:
        """What to use instead of :meth:`relu_rule_methods` on a model without ReLUs (they give its maps)."""
        return ["saliency", "gradient"]

    def check_input(self, model: Any, x: Tensor) -> None:
        """Warn when the methods that only change the backward of ReLUs meet a forward that calls no ReLU
        (EfficientNet's SiLU, ConvNeXt's GELU): their maps are then the plain gradient's, under another name."""
        super().check_input(model, x)
        methods = self.relu_rule_methods()
        if not methods:
            return
        with torch.enable_grad(), relu_rule("guided") as mode:
            model(x.detach().requires_grad_())
        if mode is not None and mode.calls == 0:
            rank_zero_warn(
                f"{type(self).__name__}: {type(unwrap_model(model)).__name__} calls no ReLU in its forward (nn.ReLU, "
                f"F.relu, torch.relu or Tensor.relu), so {', '.join(map(repr, methods))} "
                f"give{'s' if len(methods) == 1 else ''} the plain gradient's maps here (guided CAMs: the gradient "
                "times the CAM): guided backprop and the deconvnet change only the backward of ReLUs (SiLU, GELU or "
                f"Hardswish keep their gradient). Use {' or '.join(map(repr, self.plain_methods()))} instead.",
                category=VisualizationWarning,
            )

    def check(self, pl_module: LightningModule) -> None:
        methods = self.relu_rule_methods()
        if methods:  # before any forward: a TorchScript module's ReLUs are out of the rule's reach
            check_scripted_relus(
                type(self).__name__, unwrap_model(pl_module), f"methods {', '.join(map(repr, methods))}"
            )
        cache = self.cache(pl_module)
        for rule, layers in self.pass_needs(pl_module).items():
            cache.register(self.target, rule, layers)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # free the last run's passes while training
        self.cache(pl_module).clear()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.cache(pl_module).clear()  # before the base releases the model (the cache is looked up through it)
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # a fit stopped by an error, Ctrl+C or SIGTERM gets no teardown: the last passes are freed here
        self.cache(pl_module).clear()
        super().on_exception(trainer, pl_module, exception)

    @staticmethod
    def probe_images(pl_module: LightningModule, probe: ProbeSet) -> Tensor:
        """The probe images on the model's device and in its (floating-point) parameter dtype."""
        return probe.to(module_device(pl_module), module_dtype(pl_module))

    def predict(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Tensor]:
        """The panel's predictions from the logits of a pass already made on these probes (no extra forward);
        a forward of its own only when this callback used no shared pass (e.g. integrated gradients alone)."""
        cache, fingerprint = self.cache(pl_module), probe.fingerprint()
        if cache.version == (weakref.ref(pl_module),) + model_version(pl_module):  # passes of this model state
            for key, result in cache.entries.items():
                if key[0] == fingerprint and result.logits.shape[0] == len(probe):
                    return probabilities(result.logits, self.probabilities)
        return super().predict(pl_module, probe)

    def get_pass(
        self, pl_module: LightningModule, probe: ProbeSet, x: Tensor, rule: Optional[str], layers: list[str]
    ) -> PassResult:
        """The pass of ``rule`` over (at least) ``layers`` on this probe set, computed once per model state."""
        return self.cache(pl_module).get(
            self.adapted(pl_module), x, probe.fingerprint(), self.target, probe.labels, layers, rule, self.chunk_size
        )

    def state_key_parts(self) -> tuple[Any, ...]:
        return super().state_key_parts() + (self.target.name,)


class GradientCallback(GradientMapCallback):
    """Gradient attribution maps of the probe images, logged as one panel per probe ``viz-gradients/panel/<probe-id>``.

    Saliency, Simonyan et al. 2014, Sec. 3.1; guided backprop, Springenberg et al. 2015; deconvnet, Zeiler & Fergus
    2014, Sec. 2.1; input x gradient, Shrikumar et al. 2016; integrated gradients, Sundararajan et al. 2017;
    SmoothGrad, Smilkov et al. 2017.

    Args:
        methods: any of ``saliency`` (Simonyan, max |grad| over channels), ``gradient`` (signed),
            ``guided_backprop``, ``deconvnet``, ``input_x_gradient``, ``integrated_gradients``, and
            ``smoothgrad_<any of those>`` (SmoothGrad around it).
        reduce: how ``[C, H, W]`` attributions become a map: ``abs_max`` (default), ``sum`` (signed;
            ``signed`` then defaults to True), ``abs_sum``. Saliency is already a map.
        smoothgrad_samples: SmoothGrad noise samples per image (Smilkov et al. 2017).
        smoothgrad_sigma: SmoothGrad noise standard deviation, as a fraction of each image's value range.
        smoothgrad_seed: seed of SmoothGrad's own noise generator.
        ig_steps: integrated-gradients path points (Sundararajan et al. 2017).
        ig_baseline: integrated-gradients constant baseline value.
        target, chunk_size, share_pass: see :class:`GradientMapCallback`.
        **kwargs: rendering (:class:`MapCallback`) and schedule/probe options (``VisualizationCallback``).
    """

    needs_input_grad = True

    method = "gradients"

    def __init__(
        self,
        methods: Union[str, list[str]] = ["saliency"],
        target: Union[str, int] = "label",
        reduce: Literal["abs_max", "sum", "abs_sum"] = "abs_max",
        smoothgrad_samples: int = 16,
        smoothgrad_sigma: float = 0.15,
        smoothgrad_seed: int = 0,
        ig_steps: int = 32,
        ig_baseline: float = 0.0,
        chunk_size: Optional[int] = None,
        share_pass: bool = True,
        **kwargs: Any,
    ):
        kwargs.setdefault("signed", reduce == "sum")
        super().__init__(target=target, chunk_size=chunk_size, share_pass=share_pass, **kwargs)
        if isinstance(methods, str):
            methods = [methods]
        allowed = list(GRADIENT_METHODS) + [SMOOTHGRAD_PREFIX + m for m in GRADIENT_METHODS]
        if not methods:
            raise ValueError(f"methods must name at least one method; allowed: {', '.join(allowed)}")
        for m in methods:
            if m not in allowed:
                raise ValueError(f"methods: unknown gradient method {m!r}; allowed: {', '.join(allowed)}")
        if reduce not in ("abs_max", "sum", "abs_sum"):
            raise ValueError(f"reduce must be 'abs_max', 'sum' or 'abs_sum'; got {reduce!r}")
        if smoothgrad_samples < 1:
            raise ValueError(f"smoothgrad_samples must be >= 1; got {smoothgrad_samples}")
        if smoothgrad_sigma < 0:
            raise ValueError(f"smoothgrad_sigma must be >= 0; got {smoothgrad_sigma}")
        if ig_steps < 1:
            raise ValueError(f"ig_steps must be >= 1; got {ig_steps}")
        self.methods = list(dict.fromkeys(methods))
        self.reduce = reduce
        self.smoothgrad_samples = smoothgrad_samples
        self.smoothgrad_sigma = smoothgrad_sigma
        self.smoothgrad_seed = smoothgrad_seed
        self.ig_steps = ig_steps
        self.ig_baseline = ig_baseline

    def pass_needs(self, pl_module: LightningModule) -> dict[Optional[str], list[str]]:
        return {PASS_RULES[m]: [INPUT] for m in self.methods if m in PASS_RULES}

    def relu_rule_methods(self) -> list[str]:
        return [m for m in self.methods if PASS_RULES.get(m.removeprefix(SMOOTHGRAD_PREFIX)) is not None]

    def state_key_parts(self) -> tuple[Any, ...]:
        return super().state_key_parts() + (tuple(self.methods), self.reduce)

    def dev_run_options(self) -> dict[str, Any]:
        return {
            **super().dev_run_options(),
            "ig_steps": min(self.ig_steps, DEV_RUN_STEPS),
            "smoothgrad_samples": min(self.smoothgrad_samples, DEV_RUN_STEPS),
        }

    def attribution(self, pl_module: LightningModule, probe: ProbeSet, x: Tensor, method: str) -> Tensor:
        """Raw attribution of one method: ``[N, C, H, W]`` (saliency ``[N, H, W]``)."""
        if method in PASS_RULES:
            result = self.get_pass(pl_module, probe, x, PASS_RULES[method], [INPUT])
            assert result.input_grad is not None  # asked for INPUT: the pass holds the input gradient
            return gradient_from_pass(method, x, result.input_grad)
        kwargs = (
            {"baseline": self.ig_baseline, "steps": self.ig_steps} if method.endswith("integrated_gradients") else {}
        )
        if method.startswith(SMOOTHGRAD_PREFIX):
            fn = GRADIENT_METHODS[method[len(SMOOTHGRAD_PREFIX) :]]
            ids = range(probe.offset, probe.offset + len(probe))  # global probe index: same noise on any DDP split
            return smoothgrad(
                fn,
                pl_module,
                x,
                self.target,
                probe.labels,
                self.chunk_size,
                self.smoothgrad_samples,
                self.smoothgrad_sigma,
                self.smoothgrad_seed,
                ids,
                **kwargs,
            )
        return GRADIENT_METHODS[method](pl_module, x, self.target, probe.labels, self.chunk_size, **kwargs)

    def compute_maps(self, pl_module: LightningModule, probe: ProbeSet) -> dict[str, Tensor]:
        pl_module = self.adapted(pl_module)
        x = self.probe_images(pl_module, probe)
        return {
            f"{m}/input": reduce_channels(self.attribution(pl_module, probe, x, m), self.reduce) for m in self.methods
        }
