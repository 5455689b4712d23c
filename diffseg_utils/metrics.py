"""Segmentation metrics: dataset mIoU (DDPM-Seg's accumulation), pixel accuracy, Hungarian mIoU.

mIoU accumulates intersection and union per class over the whole set (not a mean of
per-image scores) and skips ``ignore_index``; classes absent from both prediction and ground
truth do not count.
"""
from __future__ import annotations

import numpy as np
import torch


def confusion_matrix(pred, gt, num_classes: int, ignore_index: int | None = 255) -> torch.Tensor:
    """(num_classes x num_classes) counts, rows = ground truth, columns = prediction."""
    pred = torch.as_tensor(pred).reshape(-1).long()
    gt = torch.as_tensor(gt).reshape(-1).long().to(pred.device)
    keep = torch.ones_like(gt, dtype=torch.bool) if ignore_index is None else gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    if gt.numel() and (gt.min() < 0 or gt.max() >= num_classes):
        raise ValueError(f"ground-truth labels must be in [0, {num_classes - 1}] (or ignore_index={ignore_index}); "
                         f"got {gt.min().item()}..{gt.max().item()}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f"predicted labels must be in [0, {num_classes - 1}]; got {pred.min().item()}..{pred.max().item()}")
    return torch.bincount(gt * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes).cpu()


def iou_per_class(cm: torch.Tensor) -> torch.Tensor:
    """IoU per class from a confusion matrix; NaN where the class is in neither map."""
    cm = cm.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.full_like(inter, float("nan")))


def mean_iou(pred, gt, num_classes: int, ignore_index: int | None = 255) -> float:
    """Dataset mIoU: intersections and unions accumulated over all images, then averaged over classes."""
    return float(np.nanmean(iou_per_class(confusion_matrix(pred, gt, num_classes, ignore_index)).numpy()))


def pixel_accuracy(pred, gt, ignore_index: int | None = 255) -> float:
    pred, gt = torch.as_tensor(pred).reshape(-1), torch.as_tensor(gt).reshape(-1).to(torch.as_tensor(pred).device)
    keep = gt != ignore_index if ignore_index is not None else torch.ones_like(gt, dtype=torch.bool)
    return float((pred[keep] == gt[keep]).float().mean())


def foreground_breakdown(pred, gt, background: int = 0, ignore_index: int | None = 255) -> dict[str, float]:
    """Split a semantic segmentation's error into *finding* objects and *naming* them.

    ``fg_iou``: IoU of "any object" (pred != background) against (gt != background);
    ``class_acc_on_fg``: among pixels both maps call foreground, the fraction whose class agrees
    (chance is 1 / number of object classes). A low mIoU with a high ``fg_iou`` means the
    features localise objects but do not tell their categories apart.
    """
    pred = torch.as_tensor(pred).reshape(-1).long()
    gt = torch.as_tensor(gt).reshape(-1).long().to(pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same number of pixels; got {pred.numel()} and {gt.numel()}")
    keep = gt != ignore_index if ignore_index is not None else torch.ones_like(gt, dtype=torch.bool)
    pred, gt = pred[keep], gt[keep]
    pf, gf = pred != background, gt != background
    both = pf & gf
    union = int((pf | gf).sum())
    return {"fg_iou": float(both.sum()) / union if union else float("nan"),
            "class_acc_on_fg": float((pred[both] == gt[both]).float().mean()) if both.any() else float("nan")}


def hungarian_match(pred: np.ndarray, gt: np.ndarray, ignore_index: int | None = 255) -> dict[int, int]:
    """One-to-one map predicted segment id -> ground-truth class maximising total IoU (scipy)."""
    from scipy.optimize import linear_sum_assignment

    pred, gt = np.asarray(pred).ravel(), np.asarray(gt).ravel()
    if ignore_index is not None:
        keep = gt != ignore_index
        pred, gt = pred[keep], gt[keep]
    ps, gs = np.unique(pred), np.unique(gt)
    pi, gi = np.searchsorted(ps, pred), np.searchsorted(gs, gt)
    inter = np.zeros((len(ps), len(gs)))
    np.add.at(inter, (pi, gi), 1)
    union = inter.sum(1, keepdims=True) + inter.sum(0, keepdims=True) - inter
    iou = inter / np.maximum(union, 1)
    r, c = linear_sum_assignment(-iou)
    return {int(ps[i]): int(gs[j]) for i, j in zip(r, c)}


def hungarian_miou(pred, gt, ignore_index: int | None = 255) -> float:
    """Per-image mIoU after Hungarian matching of predicted segments to ground-truth classes.

    Unmatched ground-truth classes score 0 (they count in the mean); unmatched predicted
    segments count as wrong pixels through the unions.
    """
    pred, gt = np.asarray(pred).astype(np.int64), np.asarray(gt).astype(np.int64)
    mapping = hungarian_match(pred, gt, ignore_index)
    remapped = np.full_like(gt, -1)
    for p, g in mapping.items():
        remapped[pred == p] = g
    keep = gt != ignore_index if ignore_index is not None else np.ones_like(gt, bool)
    ious = []
    for g in np.unique(gt[keep]):
        a, b = remapped[keep] == g, gt[keep] == g
        ious.append((a & b).sum() / max((a | b).sum(), 1))
    return float(np.mean(ious))


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of (N, C, H, W) images in [-1, 1] (measured on the [0, 1] scale)."""
    mse = (((reconstruction.float() - reference.float()) / 2) ** 2).mean((1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())
