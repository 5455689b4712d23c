import numpy as np
import pytest
import torch

from diffseg_utils.metrics import confusion_matrix, hungarian_match, hungarian_miou, mean_iou, pixel_accuracy


def test_mean_iou_accumulates_over_the_set_and_ignores():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])
    # class 0: inter 3, union 4 -> .75 ; class 1: inter 3, union 4 -> .75 (pixel at 255 ignored)
    assert mean_iou(pred, gt, 2) == pytest.approx(0.75)
    assert pixel_accuracy(pred, gt) == pytest.approx(6 / 7)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        confusion_matrix(np.array([0, 2]), np.array([0, 2]), 2)


def test_hungarian_on_hand_made_cases():
    gt = np.array([[1, 1, 2, 2], [1, 1, 2, 2]], np.uint8)  # uint8, as label maps are stored
    perm = np.array([[7, 7, 3, 3], [7, 7, 3, 3]])  # the same segmentation, other ids
    assert hungarian_match(perm, gt) == {7: 1, 3: 2}
    assert hungarian_miou(perm, gt) == pytest.approx(1.0)
    one = np.zeros_like(gt)  # one segment for two classes: one class matched at IoU .5, the other 0
    assert hungarian_miou(one, gt) == pytest.approx(0.25)
    split = np.array([[1, 2, 3, 3], [1, 2, 3, 3]])  # class 1 split in two halves
    assert hungarian_miou(split, gt) == pytest.approx((0.5 + 1.0) / 2)


def test_foreground_breakdown_separates_finding_from_naming():
    from diffseg_utils.metrics import foreground_breakdown

    gt = torch.tensor([[0, 0, 1, 1], [0, 2, 2, 255]])
    # every object pixel found, but half of them named wrongly; one background pixel called an object
    pred = torch.tensor([[0, 3, 1, 2], [0, 2, 1, 0]])
    out = foreground_breakdown(pred, gt)
    assert out["fg_iou"] == 4 / 5                      # 4 fg in both, union 5 (the ignored pixel skipped)
    assert out["class_acc_on_fg"] == 2 / 4
    perfect = foreground_breakdown(gt, gt)
    assert perfect == {"fg_iou": 1.0, "class_acc_on_fg": 1.0}
    with pytest.raises(ValueError, match="same number of pixels"):
        foreground_breakdown(pred[:1], gt)
