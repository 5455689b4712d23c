"""Representation analysis: one linear probe per (block, timestep), all in closed form.

DDPM-Seg's Fig. 2-4 ask which decoder blocks and noise levels carry semantics. We answer with
a ridge-regression probe (one-hot targets, standardised features) per (block, t): a single
``C x C`` solve each, so sweeping every up-block sub-module x 8+ timesteps takes seconds
instead of thousands of sklearn fits. Pixels are sampled class-balanced through
:meth:`FeatureMaps.sample`; test images are scored on every pixel (chunked).

Labels may have any resolution with the features' aspect ratio (64-px label maps on 512-px SD
features, 256-px maps on 64-px features): the features are read at the labels' pixels
(:func:`on_label_grid`). The probe is solved in float32 on the features' device (no float64,
which Apple MPS lacks); bfloat16/float16 feature maps are upcast to float32 when sampled.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from .features import FeatureMaps, extract_features, resolve_blocks
from .metrics import confusion_matrix, iou_per_class
from .pixel_classifier import EnsembleConfig, PixelEnsemble


def balanced_pixels(labels: torch.Tensor, per_class: int, seed: int = 0, ignore_index: int = 255):
    """Indices (img, y, x) and labels of up to ``per_class`` random pixels of every class."""
    labels = torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    flat = labels.reshape(-1)
    picks = []
    for c in torch.unique(flat).tolist():
        if c == ignore_index:
            continue
        idx = torch.nonzero(flat == c).squeeze(1)
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    idx = torch.cat(picks)
    n, h, w = labels.shape
    return idx // (h * w), (idx // w) % h, idx % w, flat[idx].long()


@dataclass
class RidgeProbe:
    """A linear classifier fitted in closed form on standardised features.

    ``mean`` / ``std`` ``(C,)`` standardise the features, ``weight`` ``(C + 1, K)`` maps them (last
    row: bias) to one-hot targets; all float32 on the features' device.
    """

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (C + 1, K)

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int, ridge: float = 1e-2) -> "RidgeProbe":
        """Ridge regression of one-hot ``y`` on standardised ``x``, solved in float32 on ``x``'s device.

        x: ``(M, C)`` features of any float dtype (bfloat16 / float16 are upcast to float32 first);
        y: ``(M,)`` integer labels in ``[0, num_classes)`` (not checked here: that would read them
        back from the device). Minimises ``|Xs W + b - Y|^2 + ridge * M * (|W|^2 + |b|^2)``, where
        ``Xs`` is ``x`` centred and divided by its per-channel std (channels constant in float32
        precision get weight 0). Centring makes the bias decouple (``b = mean(Y) / (1 + ridge)``),
        standardising bounds the Gram matrix's diagonal by 1 and ``ridge`` bounds its smallest
        eigenvalue from below, so a float32 Cholesky solve is stable (agrees with a float64
        solve to about 1e-4 relative, see tests). No float64 and no host synchronisation.
        """
        if not ridge >= 1e-6:
            raise ValueError(f"ridge must be >= 1e-6 (it keeps the float32 solve well conditioned); got {ridge}")
        if x.ndim != 2 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"expected x (M, C) and y (M,); got {tuple(x.shape)} and {tuple(y.shape)}")
        x = x.float()
        n = x.shape[0]
        mean = x.mean(0)
        xc = x - mean
        std = xc.std(0)
        # a channel whose spread is below float32 resolution of its values carries no information
        dead = std <= torch.maximum(torch.full_like(std, 1e-6), 1e-5 * mean.abs())
        std = torch.where(dead, torch.ones_like(std), std)
        xs = xc * torch.where(dead, torch.zeros_like(std), std.reciprocal())              # (M, C)
        classes = torch.arange(num_classes, device=x.device)
        onehot = (y.to(x.device)[:, None] == classes).float()                            # (M, K), no sync
        eye = torch.eye(xs.shape[1], device=x.device)
        gram = torch.addmm(eye, xs.T, xs, beta=ridge, alpha=1.0 / n)                     # Xs'Xs / M + ridge I
        chol, _ = torch.linalg.cholesky_ex(gram)  # SPD by construction (eigenvalues >= ridge)
        w = torch.cholesky_solve(xs.T @ onehot / n, chol)                                # (C, K)
        b = onehot.mean(0) / (1 + ridge)                                                 # (K,)
        return cls(mean, std, torch.cat([w, b[None]]))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """``(M, K)`` float32 class scores for ``(M, C)`` features (any float dtype, upcast)."""
        xs = (x.float() - self.mean) / self.std
        return torch.addmm(self.weight[-1], xs, self.weight[:-1])

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """``(M,)`` int64 labels: the argmax of :meth:`scores`."""
        return self.scores(x).argmax(1)


@dataclass
class ProbeTable:
    """mIoU per (block, timestep): ``miou[i, j]`` for ``blocks[i]`` at ``timesteps[j]``."""

    miou: np.ndarray
    blocks: list[str]
    timesteps: list[int]

    def best(self) -> tuple[str, int, float]:
        i, j = np.unravel_index(np.nanargmax(self.miou), self.miou.shape)
        return self.blocks[i], self.timesteps[j], float(self.miou[i, j])

    def to_markdown(self, digits: int = 3) -> str:
        head = "| block | " + " | ".join(f"t={t}" for t in self.timesteps) + " |"
        rows = [head, "|---" * (len(self.timesteps) + 1) + "|"]
        for b, r in zip(self.blocks, self.miou):
            rows.append(f"| {b} | " + " | ".join(f"{v:.{digits}f}" for v in r) + " |")
        return "\n".join(rows)


def on_label_grid(features: FeatureMaps, label_size: Sequence[int]) -> FeatureMaps:
    """``features`` described on the ``label_size`` (H, W) pixel grid (no copy: the maps stay at their
    own resolution and :meth:`FeatureMaps.sample` interpolates them at the labels' pixels).

    Labels and features need not share a resolution (64-px labels on 512-px SD features, or
    full-size labels on 256-px features) but must cover the same picture: the aspect ratios must
    agree. Labels drawn on non-square images go through the images' geometry first
    (:func:`~diffseg_utils.inputs.prepare_labels`).
    """
    h, w = (int(v) for v in label_size)
    H, W = features.image_size
    if (h, w) == (H, W):
        return features
    if abs(H * w - W * h) > max(H, W, h, w):
        raise ValueError(f"labels are {h}x{w} but the features describe {H}x{W} images (another aspect ratio); "
                         "bring the labels to the model's grid with "
                         "diffseg_utils.inputs.prepare_labels(labels, geometry, size=features.image_size)")
    return replace(features, image_size=(h, w))


def _as_label_maps(labels, name: str) -> torch.Tensor:
    labels = torch.as_tensor(np.asarray(labels)) if not isinstance(labels, torch.Tensor) else labels
    if labels.ndim != 3:
        raise ValueError(f"{name} must be (N, H, W) label maps; got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer class ids; got {labels.dtype} (convert with .long())")
    return labels


def _check_range(labels: torch.Tensor, num_classes: int, ignore_index: int, name: str) -> None:
    keep = labels[labels != ignore_index]
    if keep.numel() and (keep.min() < 0 or keep.max() >= num_classes):
        raise ValueError(f"{name} must be in [0, {num_classes - 1}] or ignore_index={ignore_index}; "
                         f"got {int(keep.min())}..{int(keep.max())}")


def probe_features(train: FeatureMaps, train_labels: torch.Tensor, test: FeatureMaps, test_labels: torch.Tensor,
                   num_classes: int, *, per_class: int = 2000, ridge: float = 1e-2, seed: int = 0,
                   ignore_index: int = 255, chunk: int = 32768) -> float:
    """Fit one ridge probe on all of ``train``'s maps (concatenated) and return test mIoU.

    Labels are ``(N, H, W)`` integer maps at any resolution with the features' aspect ratio: the
    features are read at the labels' pixels (:func:`on_label_grid`). The features may be stored in
    any float dtype (bfloat16/float16 are upcast to float32 when sampled); the probe runs on their
    device and the confusion matrix accumulates there (one read-back at the end).
    """
    train_labels = _as_label_maps(train_labels, "train_labels")
    test_labels = _as_label_maps(test_labels, "test_labels")
    _check_range(test_labels, num_classes, ignore_index, "test_labels")
    train, test = on_label_grid(train, train_labels.shape[-2:]), on_label_grid(test, test_labels.shape[-2:])
    img, y, x, lab = balanced_pixels(train_labels, per_class, seed, ignore_index)
    probe = RidgeProbe.fit(train.sample(img, y, x), lab.to(train.device), num_classes, ridge)
    n, h, w = test_labels.shape
    gt_all = test_labels.reshape(-1).to(test.device)
    cm = torch.zeros(num_classes * num_classes, dtype=torch.long, device=test.device)
    total = n * h * w
    for s in range(0, total, chunk):
        idx = torch.arange(s, min(s + chunk, total), device=test.device)
        pred = probe.predict(test.sample(idx // (h * w), (idx // w) % h, idx % w))
        gt = gt_all[idx].long()
        keep = gt != ignore_index
        cm.index_add_(0, torch.where(keep, gt * num_classes + pred, 0), keep.long())
    return float(np.nanmean(iou_per_class(cm.view(num_classes, num_classes).cpu()).numpy()))


def mlp_probe_predict(train: FeatureMaps, train_labels, test: FeatureMaps, num_classes: int, *, seed: int = 0,
                      ignore_index: int = 255, max_pixels: int | None = None,
                      size: Sequence[int] | None = None) -> torch.Tensor:
    """Labels ``(N, H, W)`` that one DDPM-Seg member MLP (a one-member :class:`PixelEnsemble` with the
    paper's widths, initialisation, Adam and early stop), trained on every labelled pixel of
    ``train``, predicts for the images of ``test``.

    ``train_labels`` may have any resolution with the features' aspect ratio (:func:`on_label_grid`);
    the prediction is on the ``size`` (H, W) grid, default the training labels' size.
    """
    train_labels = _as_label_maps(train_labels, "train_labels")
    size = tuple(size) if size is not None else tuple(train_labels.shape[-2:])
    train, test = on_label_grid(train, train_labels.shape[-2:]), on_label_grid(test, size)
    cfg = EnsembleConfig(num_classes=num_classes, num_members=1, seed=seed, ignore_index=ignore_index)
    ens = PixelEnsemble(cfg, train.channels, train.device).fit(train, train_labels, progress=False, max_pixels=max_pixels)
    return ens.predict(test)[0]


def mlp_probe(train: FeatureMaps, train_labels, test: FeatureMaps, test_labels, num_classes: int, *,
              seed: int = 0, ignore_index: int = 255, max_pixels: int | None = None) -> float:
    """Test mIoU of one DDPM-Seg member MLP (see :func:`mlp_probe_predict`); labels at any resolution
    with the features' aspect ratio."""
    test_labels = _as_label_maps(test_labels, "test_labels")
    pred = mlp_probe_predict(train, train_labels, test, num_classes, seed=seed, ignore_index=ignore_index,
                             max_pixels=max_pixels, size=test_labels.shape[-2:])
    cm = confusion_matrix(pred.cpu().reshape(-1), test_labels.reshape(-1), num_classes, ignore_index)
    return float(np.nanmean(iou_per_class(cm).numpy()))


def rgb_features(images: torch.Tensor) -> FeatureMaps:
    """Raw pixel colours as a FeatureMaps (the baseline every feature must beat)."""
    return FeatureMaps({(0, "rgb"): images.float()}, tuple(images.shape[-2:]), [0], ["rgb"])


def probe_grid(backbone=None, train_images=None, train_labels=None, test_images=None, test_labels=None,
               blocks: Sequence[str | int] | None = None, timesteps: Sequence[int] | None = None, *,
               num_classes: int | None = None, per_class: int = 2000, ridge: float = 1e-2, seed: int = 0,
               batch_size: int = 16, progress: bool = True, train_features: FeatureMaps | None = None,
               test_features: FeatureMaps | None = None, ignore_index: int = 255) -> ProbeTable:
    """Test mIoU of a ridge probe per (block, t), trained on labelled pixels of the training images.

    Either give a ``backbone`` with ``train_images`` / ``test_images`` (features are extracted once
    for all ``blocks`` x ``timesteps``), or precomputed ``train_features`` / ``test_features``
    (then no backbone is needed, and ``blocks`` / ``timesteps`` default to the features' own and
    otherwise select among them):

    >>> probe_grid(train_labels=y_tr, test_labels=y_te, train_features=f_tr, test_features=f_te)

    Labels are ``(N, H, W)`` integer maps, ``ignore_index`` = ignore, at any resolution with the
    features' aspect ratio (e.g. 64-px labels on 512-px SD features: the features are read at the
    labels' pixels). ``num_classes`` defaults to the largest label + 1.
    """
    if train_labels is None or test_labels is None:
        raise ValueError("give train_labels and test_labels: (N, H, W) integer label maps")
    train_labels = _as_label_maps(train_labels, "train_labels")
    test_labels = _as_label_maps(test_labels, "test_labels")
    for split, feats, images in (("train", train_features, train_images), ("test", test_features, test_images)):
        if feats is None and (backbone is None or images is None or blocks is None or timesteps is None):
            raise ValueError(f"no {split} features: pass {split}_features=FeatureMaps (no backbone needed), or a "
                             f"backbone with {split}_images, blocks and timesteps to extract them")
    if num_classes is None:
        seen = torch.cat([lab[lab != ignore_index].reshape(-1) for lab in (train_labels, test_labels)])
        if not seen.numel():
            raise ValueError("every label is ignore_index; nothing to probe")
        num_classes = int(seen.max()) + 1
    if blocks is not None and backbone is not None:
        blocks = resolve_blocks(backbone, blocks)
    elif blocks is not None and any(not isinstance(b, str) for b in blocks):
        raise ValueError("int blocks are ADM output_blocks indices and need the backbone to resolve them; "
                         "pass block names (features.blocks) or the backbone")
    kw = dict(batch_size=batch_size, progress=progress, seed=seed)
    tr = train_features if train_features is not None else extract_features(
        backbone, train_images, blocks, timesteps, **kw)
    te = test_features if test_features is not None else extract_features(
        backbone, test_images, blocks, timesteps, **kw)
    names = list(blocks) if blocks is not None else list(tr.blocks)
    ts = [int(t) for t in timesteps] if timesteps is not None else list(tr.timesteps)
    table = np.zeros((len(names), len(ts)))
    from tqdm.auto import tqdm

    for i, b in enumerate(tqdm(names, desc="probes", disable=not progress, leave=False)):
        for j, t in enumerate(ts):
            table[i, j] = probe_features(tr.select([b], [t]), train_labels, te.select([b], [t]), test_labels,
                                         num_classes, per_class=per_class, ridge=ridge, seed=seed,
                                         ignore_index=ignore_index)
    return ProbeTable(table, names, ts)
