"""Pure torch visualization methods (no Lightning): ``fn(model, x[B, C, H, W], ...) -> Tensor[B, ...]``.

One module per family; the most used functions are re-exported here.
"""

from .activations import feature_maps
from .adversarial import fgsm, minimal_flip_budget, pgd
from .cam import (
    CAM_VARIANTS,
    CAMVariant,
    cam_map,
    class_activation_map,
    guided_class_activation_map,
    register_cam_variant,
)
from .embeddings import (
    extract_features,
    knn_accuracy,
    pca_2d,
    pca_variance_ratio,
    penultimate_layer,
    silhouette,
    tsne_2d,
)
from .filters import conv_filters, linear_templates
from .gradients import (
    deconvnet,
    gradient,
    guided_backprop,
    input_x_gradient,
    integrated_gradients,
    saliency,
    smoothgrad,
)
from .metrics import deletion_auc, energy_in_mask, insertion_auc, pointing_game, rank_correlation, topk_iou
from .objectives import Objective, channel, class_logit, feature_match, neuron
from .occlusion import occlusion
from .patches import merge_topk, scan_topk, topk_per_unit
from .receptive_field import crop_boxes, receptive_field
from .relu_rules import relu_rule
from .shared_pass import gradient_pass
from .synthesis import class_model_images, invert_features, optimize_input, unit_images

__all__ = [
    "feature_maps",
    "fgsm",
    "pgd",
    "minimal_flip_budget",
    "cam_map",
    "class_activation_map",
    "guided_class_activation_map",
    "CAMVariant",
    "CAM_VARIANTS",
    "register_cam_variant",
    "extract_features",
    "penultimate_layer",
    "pca_2d",
    "pca_variance_ratio",
    "tsne_2d",
    "silhouette",
    "knn_accuracy",
    "conv_filters",
    "linear_templates",
    "gradient",
    "saliency",
    "guided_backprop",
    "deconvnet",
    "input_x_gradient",
    "integrated_gradients",
    "smoothgrad",
    "deletion_auc",
    "insertion_auc",
    "pointing_game",
    "energy_in_mask",
    "rank_correlation",
    "topk_iou",
    "Objective",
    "class_logit",
    "channel",
    "neuron",
    "feature_match",
    "occlusion",
    "merge_topk",
    "scan_topk",
    "topk_per_unit",
    "receptive_field",
    "crop_boxes",
    "relu_rule",
    "gradient_pass",
    "class_model_images",
    "unit_images",
    "invert_features",
    "optimize_input",
]
