"""EmbeddingCallback: a layer's features for the probe set -> TensorBoard projector, 2-D scatters, separation scores."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..layers import hookable_layer, module_device, module_dtype
from ..logging import VizLogger, make_tag, step_label
from ..methods.batching import images_per_forward
from ..methods.checks import check_chunk_size
from ..methods.embeddings import (
    extract_features,
    knn_accuracy,
    pca_2d,
    pca_variance_ratio,
    penultimate_layer,
    scatter_image,
    silhouette,
    tsne_2d,
)
from ..probe import ProbeSet
from ..progress import interruptible, reporting
from ..render import class_name, one_line, to_rgb
from ._options import LayersSpec, renamed_option, single_layer
from .base import VisualizationCallback, VisualizationWarning

__all__ = ["EmbeddingCallback"]

PENULTIMATE = "penultimate"
#: TensorBoard's Projector refuses a sprite image wider or higher than this ("exceeds maximum dimensions").
SPRITE_MAX_PX = 8192


def sprite_cell_limit(num_images: int) -> int:
    """The largest square cell that fits ``num_images`` in a sprite of at most :data:`SPRITE_MAX_PX` a side
    (a ``ceil(sqrt(N))`` x ``ceil(sqrt(N))`` grid, as ``add_embedding`` lays it out)."""
    return SPRITE_MAX_PX // max(1, math.ceil(math.sqrt(num_images)))


def _go_on(done: int, total: int, what: str) -> None:
    """A progress check that never stops the loop."""


def square_thumbnails(images: Tensor, size: int) -> Tensor:
    """``images[N, C, H, W]`` (in [0, 1]) as ``size`` x ``size`` thumbnails: the longer side scaled to ``size``, the
    aspect ratio kept (the projector's sprite cells are square), centered on white."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):  # the same pixels
        return images
    scale = size / max(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    thumbs = F.interpolate(images, size=(th, tw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (size - th) // 2, (size - tw) // 2
    return F.pad(thumbs, (left, size - tw - left, top, size - th - top), value=1.0)


class EmbeddingCallback(VisualizationCallback):
    """Embeddings of the probe set, epoch by epoch, so class separation can be watched while training.

    PCA, Pearson 1901; t-SNE, van der Maaten & Hinton 2008; silhouette score, Rousseeuw 1987.

    Features are the output of ``layers`` (one layer; conv maps averaged over space) or, by default, the
    penultimate features: the input of the last ``nn.Linear`` called in the model's forward (the
    classifier head of resnet/vgg/densenet/mobilenet; found by one forward at setup). Logged at step = epoch, with
    ``<layer>`` = the layer name or ``"penultimate"``:

    * ``viz-embeddings/<layer>/pca`` (and ``/tsne``): scatter image colored by class, class names in the legend;
    * ``viz-embeddings/<layer>/silhouette`` and ``/knn_accuracy``: class-separation scalars (need labels);
    * the TensorBoard projector (``projector: true``): features with metadata columns
      ``label``/``prediction`` (class names when known) and image sprites, under ``<log_dir>/<epoch:05d>/<tag>/``.

    Args:
        layers: the layer (one name of ``model.named_modules()`` or a one-element list), or ``None`` for the
            penultimate features. One layer per instance.
        projection: 2-D projections to plot, one name or a list: ``"pca"`` (SVD, cheap) and/or ``"tsne"``
            (exact t-SNE in torch, deterministic; scikit-learn's Barnes-Hut above 512 probes; slower).
        projector: also write the TensorBoard projector files.
        sprite_size: side in pixels of each probe thumbnail in the projector sprite (non-square probes keep their
            aspect ratio, on white); the sprite, ``ceil(sqrt(num_probes))`` thumbnails a side, must stay within
            TensorBoard's 8192 px (e.g. 128 px for 4096 probes).
        knn_k: neighbours for the leave-one-out kNN accuracy.
        tsne_perplexity: t-SNE perplexity (capped below N/3).
        tsne_iterations: t-SNE gradient steps (>= 250; 500 by default, half of scikit-learn's 1000 at the same
            trustworthiness on probe-set sizes; 400 measured a slightly higher KL and lower silhouette).
        chunk_size: probe images per forward (``None``: as many as the memory budget of
            :mod:`lightning_viz.methods.batching` holds; 128 probes of a 224 px ResNet-50 at once took 1.3 GB).
        num_probes: probe set size (default 128).
        layer: deprecated alias of ``layers``.
        batch_size: deprecated alias of ``chunk_size``.
        **kwargs: :class:`VisualizationCallback` options.
    """

    method = "embeddings"

    def __init__(
        self,
        layers: LayersSpec = None,
        projection: Union[Literal["pca", "tsne"], list[Literal["pca", "tsne"]]] = ["pca"],
        projector: bool = True,
        sprite_size: int = 32,
        knn_k: int = 5,
        tsne_perplexity: float = 30.0,
        tsne_iterations: int = 500,
        chunk_size: Optional[int] = None,
        num_probes: int = 128,
        layer: Optional[str] = None,
        batch_size: Optional[int] = None,
        **kwargs: Any,
    ):
        super().__init__(num_probes=num_probes, **kwargs)
        owner = type(self).__name__
        layer = single_layer(owner, renamed_option(owner, "layer", "layers", layer, layers, None))
        chunk_size = renamed_option(owner, "batch_size", "chunk_size", batch_size, chunk_size, None)
        if isinstance(projection, str):
            projection = [projection]
        bad = [p for p in projection if p not in ("pca", "tsne")]
        if bad:
            raise ValueError(f"projection must be a list of 'pca' and/or 'tsne'; got {projection!r}")
        for name, v in (("sprite_size", sprite_size), ("knn_k", knn_k)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1; got {v}")
        chunk_size = check_chunk_size(chunk_size)
        if tsne_iterations < 250:
            raise ValueError(
                f"tsne_iterations must be >= 250 (t-SNE's early-exaggeration phase); got {tsne_iterations}"
            )
        if tsne_perplexity <= 0:
            raise ValueError(f"tsne_perplexity must be > 0; got {tsne_perplexity}")
        n = self.num_probes if self.probes is None else len(self.probes)
        if projector and sprite_size > sprite_cell_limit(n):
            raise ValueError(
                f"sprite_size={sprite_size} with {n} probes makes a {math.ceil(math.sqrt(n)) * sprite_size} px "
                f"sprite, and TensorBoard's Projector refuses sprites over {SPRITE_MAX_PX} px a side: use "
                f"sprite_size <= {sprite_cell_limit(n)}, fewer probes, or projector=False"
            )
        self.layer = layer
        self.projection = list(projection)
        self.projector = projector
        self.sprite_size, self.knn_k, self.tsne_perplexity = sprite_size, knn_k, tsne_perplexity
        self.chunk_size = chunk_size
        self.tsne_iterations = tsne_iterations

    def dev_run_probes(self) -> int:
        """Two probes per class and one more (the pick goes round the classes): enough for the silhouette, the kNN
        vote and a t-SNE (3 points or more)."""
        return 2 * (self._num_classes or 2) + 1

    def dev_run_options(self) -> dict[str, Any]:  # t-SNE's early-exaggeration phase only
        return {**super().dev_run_options(), "tsne_iterations": min(self.tsne_iterations, 250)}

    def _warn_once(self, message: str) -> None:
        """Warn (rank 0) the first time this callback meets ``message``, not at every epoch."""
        told = self.__dict__.setdefault("_told", set())
        if message not in told:
            told.add(message)
            rank_zero_warn(message, category=VisualizationWarning)

    @property
    def layer_tag(self) -> str:
        return self.layer or PENULTIMATE

    def state_key_parts(self) -> tuple[Any, ...]:
        return super().state_key_parts() + (self.layer_tag, tuple(self.projection))

    def shared_tags(self) -> set[str]:
        # the separation scores and the projector entry of a layer, whatever the projections
        tags = {f"{self.layer_tag}/silhouette", f"{self.layer_tag}/knn_accuracy"}
        return tags | ({f"{self.layer_tag} (projector)"} if self.projector else set())

    def check(self, pl_module: LightningModule) -> None:
        if self.layer is None:
            with self._naming():
                penultimate_layer(pl_module)  # raises a clear error when the model has no nn.Linear
        else:
            hookable_layer(pl_module, self.layer)

    def check_input(self, model: Any, x: Tensor) -> None:
        if self.layer is None:  # the penultimate features: the input of the last nn.Linear called
            with self._naming():
                penultimate_layer(model, x)
        else:  # called by the eval-mode forward (not an auxiliary head that runs only in training)
            self.read_as_maps(model, x, [self.layer])  # a Swin stage, a ViT block: averaged as [B, C, h, w] maps
            self.check_layer_outputs(model, x, [self.layer], dims=None)

    def compute(self, pl_module: LightningModule, probe: ProbeSet | None) -> dict[str, Any]:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        model = self.adapted(pl_module)
        x = probe.to(module_device(model), module_dtype(model))
        feats, logits = extract_features(model, x, self.layer, self.chunk_size or images_per_forward(model, x))
        return {"features": feats.cpu(), "prediction": logits.argmax(1).cpu()}

    def log_results(self, logger: VizLogger, results: dict[str, Any], probe: ProbeSet | None, trainer: Trainer) -> None:
        assert probe is not None  # needs_probes is True: the base class always passes the probes
        feats, preds, labels = results["features"], results["prediction"], probe.labels
        ok = self.warn_non_finite(f"the {self.layer_tag} features", feats)
        if int(ok.sum()) < 2:
            if bool(ok.all()):  # one probe (a one-item dataset): nothing to project, said once
                rank_zero_warn(
                    f"EmbeddingCallback: {int(ok.sum())} probe to embed; projections, separation scores and the "
                    "projector need at least 2 (num_probes >= 2 and a dataset with 2 items or more).",
                    category=VisualizationWarning,
                )
            return  # nothing to project (warned)
        if not bool(ok.all()):  # leave the non-finite probes out of everything
            feats, preds = feats[ok], preds[ok]
            labels = None if labels is None else labels[ok]
        name = self.layer_tag
        names = self.get_class_names(trainer)
        # one line each: a line break in a class name split its metadata.tsv row (TensorBoard then refuses the file, its
        # line count no longer the tensor's) and the legend could not measure it
        names = None if names is None else [one_line(str(n)) for n in names]
        # t-SNE of many probes: progress lines, as in the compute; no SIGTERM stop here (rank 0 alone: under DDP the
        # other ranks wait for it in a collective)
        with reporting(self.method), interruptible(_go_on):
            for proj in self.projection:
                if proj == "pca":
                    pts = pca_2d(feats)
                    r1, r2 = pca_variance_ratio(feats, pts)  # how much of the cloud the plane shows
                    title = f"{name} PCA, {step_label(logger.step)} (PC1 {r1:.0%}, PC2 {r2:.0%} of variance)"
                else:
                    pts = tsne_2d(
                        feats, seed=self.probe_seed, perplexity=self.tsne_perplexity, iterations=self.tsne_iterations
                    )
                    title = f"{name} t-SNE, {step_label(logger.step)}"
                logger.image(make_tag(self.method, name, proj), scatter_image(pts, labels, title, class_names=names))
        if labels is None:
            self._warn_once(
                "EmbeddingCallback: the probes have no class labels (the data gives none, or labels that are not "
                "one class index 0..K-1 per item: multi-hot rows of a multi-label task, -1 marking unlabeled items, "
                "regression targets), so the scatters are drawn in one color and silhouette and knn_accuracy are not "
                "logged. To color them by a class of your choice, pass probes=ProbeSet(images, labels=<one class "
                "index per probe>)."
            )
        else:
            # a silhouette needs 2 <= classes <= N - 1 (else NaN), a kNN vote a class of 2 probes (else 0, or 1)
            classes = int(torch.unique(labels).numel())
            if 2 <= classes <= len(labels) - 1:
                logger.scalar(make_tag(self.method, name, "silhouette"), silhouette(feats, labels))
                logger.scalar(make_tag(self.method, name, "knn_accuracy"), knn_accuracy(feats, labels, self.knn_k))
            else:
                self._warn_once(
                    f"EmbeddingCallback: the {len(labels)} probes hold "
                    + ("one class: nothing to separate" if classes < 2 else f"{classes} classes, one probe each")
                    + "; silhouette and knn_accuracy need 2 classes or more and a class of 2 probes or more, so they "
                    "are not logged"
                    + ("." if classes < 2 else " (raise num_probes above the number of classes, or give probes=).")
                )
        if self.projector:
            lab = ["?"] * len(preds) if labels is None else [class_name(v, names) for v in labels]
            metadata = [[a, class_name(p, names)] for a, p in zip(lab, preds)]
            sprites = square_thumbnails(probe.display_images()[ok], self.sprite_size)
            sprites = to_rgb(sprites.clamp(0, 1))  # the projector takes RGB: gray repeated, RGBA's alpha dropped
            logger.embedding(
                feats,
                metadata=metadata,
                label_img=sprites,
                tag=make_tag(self.method, name),
                metadata_header=["label", "prediction"],
            )
