"""Segmentation metrics: dataset mIoU, pixel accuracy, Hungarian mIoU.

Every mIoU here accumulates intersection and union per class over the whole set (not a mean of
per-image scores). Two conventions differ in which classes enter the mean:

* :func:`mean_iou` (default ``absent="skip"``, used by this repo's probes and internal checks):
  pixels whose ground truth is ``ignore_index`` are removed first; a class absent from both the
  prediction and the ground truth of the whole set has no IoU and is left out of the mean.
  ``absent="count"`` keeps every class ``0 .. num_classes - 1`` except ``ignore_index`` in the mean,
  an absent one scoring 0.
* :func:`ddpmseg_miou`: exactly DDPM-Seg's ``compute_iou`` (``src/pixel_classifier.py`` of
  yandex-research/ddpm-segmentation), for numbers compared with the paper's.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ABSENT_MODES", "confusion_matrix", "ddpmseg_miou", "foreground_breakdown", "hungarian_match",
           "hungarian_miou", "iou_per_class", "mean_iou", "miou_from_confusion", "paired_difference", "PairedDifference",
           "pixel_accuracy", "psnr"]


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


ABSENT_MODES = ("skip", "count")


def miou_from_confusion(cm: torch.Tensor, *, ignore_index: int | None = None, absent: str = "skip") -> float:
    """mIoU from a (K, K) confusion matrix (rows ground truth, columns prediction); see :func:`mean_iou`.

    A class ``ignore_index`` inside ``0 .. K - 1`` is not a class to score and never enters the mean.
    """
    if absent not in ABSENT_MODES:
        raise ValueError(f"absent must be one of {ABSENT_MODES}, got {absent!r}")
    iou = iou_per_class(cm).numpy()
    scored = np.ones(len(iou), bool)
    if ignore_index is not None and 0 <= ignore_index < len(iou):
        scored[ignore_index] = False
    iou = iou[scored]
    if absent == "count":
        iou = np.nan_to_num(iou, nan=0.0)
    if not np.isfinite(iou).any():
        return float("nan")  # no class present anywhere (e.g. every pixel ignored)
    return float(np.nanmean(iou))


def mean_iou(pred, gt, num_classes: int, ignore_index: int | None = 255, *, absent: str = "skip") -> float:
    """Dataset mIoU: intersections and unions accumulated over all images, then averaged over classes.

    pred, gt: integer label maps of one shape (any, e.g. (N, H, W); numpy or torch); predictions in
    ``0 .. num_classes - 1``, ground truth there or ``ignore_index``. Pixels whose ground truth is
    ``ignore_index`` are removed before counting; a class ``ignore_index`` inside the class range is
    not scored.

    absent: what a class absent from *both* maps over the whole set counts as.
        ``"skip"`` (default): nothing; it is left out of the mean (classes a set never shows do not
        lower its score). ``"count"``: IoU 0; the mean is over every scored class, as DDPM-Seg's
        ``compute_iou`` averages. (:func:`ddpmseg_miou` also keeps the ignored pixels, as that code does.)
    """
    return miou_from_confusion(confusion_matrix(pred, gt, num_classes, ignore_index), ignore_index=ignore_index,
                               absent=absent)


def ddpmseg_miou(preds, gts, num_classes: int, ignore_label: int | None, *, per_class: bool = False):
    """DDPM-Seg's mIoU, as its official ``compute_iou`` computes it (for numbers read against the paper).

    preds, gts: label maps of the whole test set: arrays or tensors (N, H, W) or sequences of
    (H_i, W_i) maps, integers; ground truth in ``0 .. num_classes - 1`` or ``ignore_label``.

    For every class ``c`` in ``0 .. num_classes - 1`` except ``ignore_label``, intersection
    ``|pred == c & gt == c|`` and union ``|pred == c | gt == c|`` are summed over all pixels of all
    images, and ``IoU_c = intersection / (union + 1e-8)``. The result is the mean of these IoUs:

    * a class absent from both maps over the whole set counts, with IoU 0 (unlike
      :func:`mean_iou`'s default);
    * pixels whose ground truth is ``ignore_label`` are **not** removed: a prediction of class ``c``
      there adds to ``c``'s union (a false positive). With Bedroom-28's ``ignore_label = 0`` this
      scores the unlabelled background pixels against whatever class is predicted there;
    * ``ignore_label = None`` (no ignore label, e.g. the toy worlds) scores every class.

    Returns the mIoU (float), or with ``per_class=True`` ``(miou, ious)``: ``ious`` (num_classes,)
    float64 numpy, NaN at ``ignore_label``. Counting runs on the inputs' device; one transfer at the end.
    """
    if isinstance(preds, (list, tuple)):
        if len(preds) != len(gts):
            raise ValueError(f"{len(preds)} predictions but {len(gts)} ground-truth maps")
        preds = torch.cat([torch.as_tensor(np.asarray(p) if not isinstance(p, torch.Tensor) else p).reshape(-1)
                           for p in preds]) if preds else torch.zeros(0, dtype=torch.long)
        gts = torch.cat([torch.as_tensor(np.asarray(g) if not isinstance(g, torch.Tensor) else g).reshape(-1)
                         for g in gts]) if gts else torch.zeros(0, dtype=torch.long)
    pred = torch.as_tensor(preds)
    gt = torch.as_tensor(gts).to(pred.device)
    if pred.shape != gt.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and ground truth {tuple(gt.shape)} differ in shape")
    if pred.is_floating_point() or gt.is_floating_point():
        raise TypeError("label maps must be integer class indices, not floats")
    pred, gt = pred.reshape(-1).long(), gt.reshape(-1).long()
    k = num_classes
    other = (gt < 0) | (gt >= k)
    if ignore_label is not None:
        bad = other & (gt != ignore_label)
    else:
        bad = other
    if bad.any():
        raise ValueError(f"ground-truth labels must be in [0, {k - 1}] or ignore_label={ignore_label}; got "
                         f"{torch.unique(gt[bad])[:5].tolist()}")
    if pred.numel() and (pred.min() < 0 or pred.max() >= k):
        raise ValueError(f"predicted labels must be in [0, {k - 1}]; got {pred.min().item()}..{pred.max().item()}")
    # ground truth outside the class range (the ignore label, e.g. 255) goes to an extra row k: it
    # matches no class, but a prediction there still enters that class's union
    gt = torch.where(other, torch.full_like(gt, k), gt)
    cm = torch.bincount(gt * k + pred, minlength=(k + 1) * k).reshape(k + 1, k).cpu().numpy().astype(np.float64)
    inter = np.diag(cm[:k])
    union = cm.sum(0) + cm[:k].sum(1) - inter
    ious = inter / (union + 1e-8)
    if ignore_label is not None and 0 <= ignore_label < k:
        ious[ignore_label] = np.nan
    miou = float(np.nanmean(ious)) if np.isfinite(ious).any() else float("nan")
    return (miou, ious) if per_class else miou


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


@dataclass(frozen=True)
class PairedDifference:
    """Per-item differences ``a - b`` of two methods scored on the same items: mean, standard deviation,
    a percentile-bootstrap 95% interval of the mean, and on how many items ``a`` is ahead / behind."""

    mean: float
    std: float
    lo: float
    hi: float
    wins: int
    losses: int
    n: int

    def __str__(self) -> str:
        return (f"{self.mean:+.3f} (std {self.std:.3f}; 95% bootstrap interval [{self.lo:+.3f}, {self.hi:+.3f}]; "
                f"ahead on {self.wins}, behind on {self.losses} of {self.n})")


def paired_difference(a, b, *, n_boot: int = 10_000, seed: int = 0) -> PairedDifference:
    """Paired comparison of per-item scores ``a`` and ``b`` (same items, same order; host arrays): the mean
    difference with a percentile bootstrap over items (``n_boot`` resamples, ``seed``)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"need two 1-D score arrays of one length >= 1, got shapes {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return PairedDifference(float(d.mean()), float(d.std()), float(lo), float(hi), int((d > 0).sum()),
                            int((d < 0).sum()), len(d))


def psnr(reference: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """Mean per-image PSNR in dB of (N, C, H, W) images in [-1, 1] (measured on the [0, 1] scale)."""
    mse = (((reconstruction.float() - reference.float()) / 2) ** 2).mean((1, 2, 3)).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())
