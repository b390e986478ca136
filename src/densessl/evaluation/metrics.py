"""Segmentation metrics from one confusion matrix: IoU, mIoU and cluster-to-class matching.

Semantics follow Leopart/NeCo ``PredsmIoU`` (experiments/utils.py), but every score is read off a
single (num_pred, num_classes) confusion matrix instead of per-cluster/per-class boolean passes over
all pixels (the reference's cost is O(K * C * pixels), ours O(pixels + K * C)).
Convention: rows = predictions (clusters), columns = ground-truth classes.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = [
    "apply_matching",
    "confusion_matrix",
    "iou_from_confusion",
    "match_hungarian",
    "match_many_to_one",
    "miou",
    "segmentation_miou",
]


def _check_range(values: Tensor, upper: int, name: str) -> None:
    if values.numel() and (values.min() < 0 or values.max() >= upper):
        raise ValueError(
            f"{name} values must lie in [0, {upper}) (got min {values.min().item()}, max {values.max().item()}); "
            f"check num_pred/num_classes, or pass the ignore label as ignore_index"
        )


def confusion_matrix(
    pred: Tensor,
    target: Tensor,
    num_pred: int,
    num_classes: int,
    ignore_index: int | None = 255,
    weights: Tensor | None = None,
) -> Tensor:
    """Counts of (prediction, target) pairs: pred/target of any equal shape -> (num_pred, num_classes) int64.

    Pixels whose target equals ``ignore_index`` are dropped (None: keep all). ``weights`` (same shape,
    integer counts) lets one element stand for several pixels, e.g. pre-aggregated (token, class) pairs.
    """
    # Hand-written: overclustering needs the K x C cluster-class counts with K != C, and torchmetrics
    # only builds square C x C confusion matrices.
    if pred.shape != target.shape or (weights is not None and weights.shape != pred.shape):
        shapes = [tuple(pred.shape), tuple(target.shape)] + ([] if weights is None else [tuple(weights.shape)])
        raise ValueError(f"pred, target (and weights) must have the same shape, got {shapes}")
    pred, target = pred.reshape(-1), target.reshape(-1)
    weights = None if weights is None else weights.reshape(-1)
    if ignore_index is not None:
        keep = target != ignore_index
        pred, target = pred[keep], target[keep]
        weights = None if weights is None else weights[keep]
    _check_range(pred, num_pred, "pred")
    _check_range(target, num_classes, "target")
    key = pred.long() * num_classes + target
    # Weighted bincount sums in float64: exact for integer counts below 2**53.
    counts = torch.bincount(key, weights=weights, minlength=num_pred * num_classes).long()
    return counts.reshape(num_pred, num_classes)


def iou_from_confusion(conf: Tensor) -> Tensor:
    """Per-class IoU = TP / (TP + FP + FN) of a square (C, C) confusion -> (C,) float64.

    Classes absent from both prediction and target (TP + FP + FN = 0) get NaN; ``miou`` decides how
    they enter the mean.
    """
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"expected a square (C, C) confusion matrix, got {tuple(conf.shape)}: apply_matching first")
    conf = conf.double()
    tp = conf.diagonal()
    union = conf.sum(0) + conf.sum(1) - tp
    return tp / union.where(union > 0, torch.nan)


def miou(conf: Tensor, include_absent: bool = True) -> float:
    """Mean IoU of a square (C, C) confusion matrix.

    include_absent=True (default) follows Leopart/NeCo ``PredsmIoU.compute_miou``: a class absent from
    both prediction and target scores 0 and still counts in the mean over all C classes.
    include_absent=False skips such classes, which is torchmetrics' ``MulticlassJaccardIndex`` (macro).
    """
    iou = iou_from_confusion(conf)
    return float(iou.nan_to_num(0.0).mean() if include_absent else iou.nanmean())


def match_many_to_one(conf: Tensor) -> Tensor:
    """Map each cluster to the class where its precision is highest: (K, C) confusion -> (K,) int64.

    Precision TP / (TP + FP) shares the row total, so it is the argmax of the row; ties and empty
    clusters go to the lowest class index, as the reference's strict ``>`` greedy loop does.
    """
    return conf.argmax(dim=1)


def match_hungarian(conf: Tensor) -> Tensor:
    """One-to-one matching maximising total IoU (scipy, cost 1 - IoU): (K, C) confusion -> (K,) int64.

    Clusters left unmatched (K > C) go to class 0, as in the reference.
    """
    conf = conf.double()
    union = conf.sum(1, keepdim=True) + conf.sum(0, keepdim=True) - conf
    iou = conf / union.clamp_min(1e-8)
    # Classes as rows, like the reference's score matrix, so ties resolve the same way.
    classes, clusters = linear_sum_assignment(1.0 - iou.T.numpy())
    mapping = torch.zeros(conf.shape[0], dtype=torch.int64)
    mapping[torch.from_numpy(clusters)] = torch.from_numpy(classes.astype(np.int64))
    return mapping


def apply_matching(conf: Tensor, mapping: Tensor, num_classes: int) -> Tensor:
    """Merge cluster rows into their matched classes: (K, C) confusion, (K,) mapping -> (C, C)."""
    merged = torch.zeros(num_classes, conf.shape[1], dtype=conf.dtype)
    return merged.index_add_(0, mapping, conf)


def segmentation_miou(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int | None = 255, include_absent: bool = True
) -> float:
    """mIoU of class predictions against targets of the same shape (no matching)."""
    return miou(confusion_matrix(pred, target, num_classes, num_classes, ignore_index), include_absent)
