"""Frozen-backbone evaluators and segmentation metrics."""

from densessl.evaluation.features import DenseFeatures, extract_dense_features
from densessl.evaluation.metrics import (
    apply_matching,
    confusion_matrix,
    iou_from_confusion,
    match_hungarian,
    match_many_to_one,
    miou,
    segmentation_miou,
)
from densessl.evaluation.overcluster import (
    OverclusterInputs,
    OverclusterOptions,
    OverclusterResult,
    cluster_miou,
    kmeans_labels,
    overcluster,
    prepare_overcluster_inputs,
    resize_masks,
)

__all__ = [
    "DenseFeatures",
    "OverclusterInputs",
    "OverclusterOptions",
    "OverclusterResult",
    "apply_matching",
    "cluster_miou",
    "confusion_matrix",
    "extract_dense_features",
    "iou_from_confusion",
    "kmeans_labels",
    "match_hungarian",
    "match_many_to_one",
    "miou",
    "overcluster",
    "prepare_overcluster_inputs",
    "resize_masks",
    "segmentation_miou",
]
