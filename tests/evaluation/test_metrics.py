import math

import pytest
import torch
from torchmetrics.classification import MulticlassJaccardIndex

from densessl.evaluation.metrics import (
    apply_matching,
    confusion_matrix,
    iou_from_confusion,
    match_hungarian,
    match_many_to_one,
    miou,
    segmentation_miou,
)


def test_confusion_matrix_counts_pairs_rows_pred_cols_target():
    pred = torch.tensor([[0, 0, 1], [2, 1, 1]])
    target = torch.tensor([[0, 1, 1], [0, 255, 1]], dtype=torch.uint8)
    conf = confusion_matrix(pred, target, num_pred=3, num_classes=2)
    # pairs (pred, target): (0,0) (0,1) (1,1) (2,0) (1,1); (1,255) is ignored
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 1], [0, 2], [1, 0]]


def test_confusion_matrix_weights_count_repeated_pixels():
    pred, target = torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 255, 1])
    weights = torch.tensor([3, 2, 7, 1])
    conf = confusion_matrix(pred, target, 2, 2, weights=weights)
    assert conf.dtype == torch.int64 and conf.tolist() == [[0, 4], [0, 2]]
    expanded = confusion_matrix(pred.repeat_interleave(weights), target.repeat_interleave(weights), 2, 2)
    assert torch.equal(conf, expanded)


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="target values"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 255]), 2, 2, ignore_index=None)
    with pytest.raises(ValueError, match="pred values"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 2, 2)
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0]), 2, 2)


def test_iou_and_miou_hand_computed_with_absent_class():
    conf = torch.tensor([[3, 1, 0], [2, 4, 0], [0, 0, 0]])
    iou = iou_from_confusion(conf)
    # class 0: TP 3, FP 1, FN 2 -> 3/6; class 1: TP 4, FP 2, FN 1 -> 4/7; class 2 absent -> NaN
    assert iou[0].item() == pytest.approx(0.5)
    assert iou[1].item() == pytest.approx(4 / 7)
    assert math.isnan(iou[2].item())
    assert miou(conf) == pytest.approx((0.5 + 4 / 7) / 3)  # reference: absent class counts as 0
    assert miou(conf, include_absent=False) == pytest.approx((0.5 + 4 / 7) / 2)


def test_iou_is_zero_not_nan_for_class_only_predicted():
    conf = torch.tensor([[2, 0], [1, 0]])  # class 1 predicted once, never in the target
    assert iou_from_confusion(conf).tolist() == pytest.approx([2 / 3, 0.0])


def test_many_to_one_and_hungarian_differ_on_hand_made_square_case():
    conf = torch.tensor([[5, 4], [1, 0]])
    # precision: both clusters are mostly class 0
    assert match_many_to_one(conf).tolist() == [0, 0]
    # IoU: k0c0 = 5/10, k1c1 = 0 (total .5) vs k0c1 = 4/9, k1c0 = 1/6 (total .61)
    assert match_hungarian(conf).tolist() == [1, 0]


def test_hungarian_sends_unmatched_cluster_to_class_zero():
    conf = torch.tensor([[6, 0], [0, 6], [0, 3]])
    many, hung = match_many_to_one(conf), match_hungarian(conf)
    assert many.tolist() == [0, 1, 1]
    assert hung.tolist() == [0, 1, 0]
    assert apply_matching(conf, many, 2).tolist() == [[6, 0], [0, 9]]
    assert miou(apply_matching(conf, many, 2)) == pytest.approx(1.0)
    # merged [[6, 3], [0, 6]]: IoU 6/9 for both classes
    assert miou(apply_matching(conf, hung, 2)) == pytest.approx(2 / 3)


def test_many_to_one_empty_cluster_goes_to_class_zero():
    assert match_many_to_one(torch.tensor([[0, 0, 0], [0, 2, 2]])).tolist() == [0, 1]


def test_ignored_pixels_do_not_change_miou():
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (500,), generator=gen)
    target = torch.randint(0, 4, (500,), generator=gen)
    base = segmentation_miou(pred, target, 4)
    extra_pred = torch.cat([pred, torch.randint(0, 4, (300,), generator=gen)])
    extra_target = torch.cat([target, torch.full((300,), 255)])
    assert segmentation_miou(extra_pred, extra_target, 4) == base
    # the same extra pixels with real labels do change it, so the check above can fail
    assert segmentation_miou(extra_pred, torch.cat([target, torch.zeros(300, dtype=torch.int64)]), 4) != base


@pytest.mark.parametrize("seed", [0, 1])
def test_parity_with_torchmetrics_including_absent_class_and_ignore(seed):
    gen = torch.Generator().manual_seed(seed)
    num_classes = 6
    pred = torch.randint(0, 5, (40, 40), generator=gen)  # class 5 never predicted ...
    target = torch.randint(0, 5, (40, 40), generator=gen)  # ... nor in the target
    target[torch.rand(40, 40, generator=gen) < 0.1] = 255
    pred[pred == 3] = 2  # class 3 only in the target (IoU 0, not absent)
    conf = confusion_matrix(pred, target, num_classes, num_classes)

    per_class = MulticlassJaccardIndex(num_classes, average=None, ignore_index=255)(pred, target)
    macro = MulticlassJaccardIndex(num_classes, ignore_index=255)(pred, target)
    ours = iou_from_confusion(conf)
    assert torch.allclose(ours.nan_to_num(0.0).float(), per_class)
    assert miou(conf, include_absent=False) == pytest.approx(macro.item(), abs=1e-6)
    assert miou(conf) == pytest.approx(per_class.mean().item(), abs=1e-6)
    assert miou(conf) < miou(conf, include_absent=False)  # the absent class 5 matters here
