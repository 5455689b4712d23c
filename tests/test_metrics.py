import numpy as np
import pytest
import torch

from diffseg_utils.metrics import (confusion_matrix, ddpmseg_miou, hungarian_match, hungarian_miou, mean_iou,
                                   miou_from_confusion, pixel_accuracy)


def official_compute_iou(preds, gts, number_class, ignore_label):
    """A plain restatement of DDPM-Seg's formula (src/pixel_classifier.py compute_iou), per image, per class."""
    inter, union = [0] * number_class, [0] * number_class
    for p, g in zip(preds, gts):
        for c in range(number_class):
            if c == ignore_label:
                continue
            inter[c] += int(((p == c) & (g == c)).sum())
            union[c] += int(((p == c) | (g == c)).sum())
    ious = [inter[c] / (1e-8 + union[c]) for c in range(number_class) if c != ignore_label]
    return float(np.mean(ious))


def test_ddpmseg_miou_hand_made():
    gt = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 0, 1, 0]])
    # official: class 0 inter 3 / union 5 (the 255 pixel predicted 0 is in its union), class 1 .75, class 2 absent: 0
    miou, ious = ddpmseg_miou(pred, gt, 3, 255, per_class=True)
    assert miou == pytest.approx((0.6 + 0.75 + 0.0) / 3)
    np.testing.assert_allclose(ious, [0.6, 0.75, 0.0])
    assert miou == pytest.approx(official_compute_iou([pred], [gt], 3, 255))
    # this repo's default skips the absent class and the ignored pixel
    assert mean_iou(pred, gt, 3) == pytest.approx(0.75)
    assert mean_iou(pred, gt, 3, absent="count") == pytest.approx(0.5)
    # Bedroom-28 style: ignore label 0 is a class id; its pixels still count against predicted classes
    gt0 = np.array([[0, 1, 1, 2]])
    pred0 = np.array([[1, 1, 2, 2]])
    m0, i0 = ddpmseg_miou(pred0, gt0, 3, 0, per_class=True)
    assert np.isnan(i0[0]) and i0[1:] == pytest.approx([1 / 3, 1 / 2]) and m0 == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert mean_iou(pred0, gt0, 3, ignore_index=0) == pytest.approx((1 / 2 + 1 / 2) / 2)  # pixel 0 removed


@pytest.mark.parametrize("ignore", [255, 0, None])
def test_ddpmseg_miou_equals_the_official_formula(ignore):
    rng = np.random.default_rng(0 if ignore is None else ignore)
    k = 6
    # maps of different sizes, class 5 absent everywhere, a few ignore pixels
    gts = [rng.integers(0, k - 1, size=s) for s in [(7, 9), (5, 5), (11, 4)]]
    preds = [rng.integers(0, k - 1, size=g.shape) for g in gts]
    if ignore == 255:
        for g in gts:
            g[rng.random(g.shape) < 0.2] = 255
    got = ddpmseg_miou(preds, gts, k, ignore)
    assert got == pytest.approx(official_compute_iou(preds, gts, k, ignore), abs=1e-12)
    stacked = ddpmseg_miou(torch.as_tensor(np.stack([preds[1]] * 2)), torch.as_tensor(np.stack([gts[1]] * 2)), k,
                           ignore)
    assert stacked == pytest.approx(official_compute_iou([preds[1]] * 2, [gts[1]] * 2, k, ignore), abs=1e-12)


def test_ddpmseg_miou_errors():
    with pytest.raises(ValueError, match="ignore_label=255"):
        ddpmseg_miou(np.zeros((2, 2), int), np.full((2, 2), 7), 3, 255)
    with pytest.raises(ValueError, match="predicted labels"):
        ddpmseg_miou(np.full((2, 2), 3), np.zeros((2, 2), int), 3, 255)
    with pytest.raises(TypeError, match="integer"):
        ddpmseg_miou(np.zeros((2, 2)), np.zeros((2, 2), int), 3, 255)
    with pytest.raises(ValueError, match="differ in shape"):
        ddpmseg_miou(np.zeros((2, 2), int), np.zeros((2, 3), int), 3, 255)


def test_mean_iou_absent_modes():
    gt = np.array([0, 0, 1, 1, 1, 3])
    pred = np.array([0, 1, 1, 1, 1, 3])
    # classes: 0 -> 1/2, 1 -> 3/4, 2 absent from both, 3 -> 1
    assert mean_iou(pred, gt, 4, None) == pytest.approx((0.5 + 0.75 + 1) / 3)
    assert mean_iou(pred, gt, 4, None, absent="count") == pytest.approx((0.5 + 0.75 + 0 + 1) / 4)
    # an ignore index inside the class range is not a class to score, in either mode
    assert mean_iou(pred, gt, 4, ignore_index=3, absent="count") == pytest.approx((0.5 + 0.75 + 0) / 3)
    cm = confusion_matrix(pred, gt, 4, None)
    assert miou_from_confusion(cm, absent="count") == mean_iou(pred, gt, 4, None, absent="count")
    with pytest.raises(ValueError, match="absent must be one of"):
        mean_iou(pred, gt, 4, absent="zero")


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


def test_paired_difference_against_a_plain_computation():
    import numpy as np

    from diffseg_utils.metrics import paired_difference

    a, b = np.array([0.5, 0.6, 0.7, 0.4]), np.array([0.4, 0.6, 0.5, 0.5])
    d = paired_difference(a, b, n_boot=2000, seed=1)
    assert abs(d.mean - 0.05) < 1e-12 and abs(d.std - np.std(a - b)) < 1e-12
    assert (d.wins, d.losses, d.n) == (2, 1, 4) and d.lo <= d.mean <= d.hi
    assert -0.1 <= d.lo and d.hi <= 0.2 + 1e-12          # within the range of the per-item differences
    assert paired_difference(a, a).lo == paired_difference(a, a).hi == 0.0
    import pytest

    with pytest.raises(ValueError, match="1-D score arrays"):
        paired_difference(a, b[:3])
