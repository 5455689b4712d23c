"""Representation analysis: one linear probe per (block, timestep), all in closed form.

DDPM-Seg's Fig. 2-4 ask which decoder blocks and noise levels carry semantics. We answer with
a ridge-regression probe (one-hot targets, standardised features) per (block, t): a single
``C x C`` solve each, so sweeping every up-block sub-module x 8+ timesteps takes seconds
instead of thousands of sklearn fits. Pixels are sampled class-balanced through
:meth:`FeatureMaps.sample`; test images are scored on every pixel (chunked).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .features import FeatureMaps, extract_features
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
    """A linear classifier fitted in closed form on standardised features."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (C + 1, K)

    @classmethod
    def fit(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int, ridge: float = 1e-2) -> "RidgeProbe":
        x = x.double()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = torch.cat([(x - mean) / std, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], 1)
        onehot = torch.nn.functional.one_hot(y.to(x.device), num_classes).double()
        a = xs.T @ xs + ridge * len(x) * torch.eye(xs.shape[1], dtype=x.dtype, device=x.device)
        return cls(mean.float(), std.float(), torch.linalg.solve(a, xs.T @ onehot).float())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        xs = (x.float() - self.mean) / self.std
        return (xs @ self.weight[:-1] + self.weight[-1]).argmax(1)


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


def probe_features(train: FeatureMaps, train_labels: torch.Tensor, test: FeatureMaps, test_labels: torch.Tensor,
                   num_classes: int, *, per_class: int = 2000, ridge: float = 1e-2, seed: int = 0,
                   ignore_index: int = 255, chunk: int = 32768) -> float:
    """Fit one ridge probe on all of ``train``'s maps (concatenated) and return test mIoU."""
    img, y, x, lab = balanced_pixels(train_labels, per_class, seed, ignore_index)
    probe = RidgeProbe.fit(train.sample(img, y, x), lab.to(train.device), num_classes, ridge)
    test_labels = torch.as_tensor(test_labels)
    n, h, w = test_labels.shape
    cm = torch.zeros(num_classes, num_classes, dtype=torch.long)
    total = n * h * w
    for s in range(0, total, chunk):
        idx = torch.arange(s, min(s + chunk, total))
        pred = probe.predict(test.sample(idx // (h * w), (idx // w) % h, idx % w))
        cm += confusion_matrix(pred.cpu(), test_labels.reshape(-1)[idx], num_classes, ignore_index)
    return float(np.nanmean(iou_per_class(cm).numpy()))


def mlp_probe_predict(train: FeatureMaps, train_labels, test: FeatureMaps, num_classes: int, *, seed: int = 0,
                      ignore_index: int = 255, max_pixels: int | None = None) -> torch.Tensor:
    """Labels ``(N, H, W)`` that one DDPM-Seg member MLP (a one-member :class:`PixelEnsemble` with the
    paper's widths, initialisation, Adam and early stop), trained on every labelled pixel of
    ``train``, predicts for the images of ``test``."""
    train_labels = torch.as_tensor(np.asarray(train_labels))
    cfg = EnsembleConfig(num_classes=num_classes, num_members=1, seed=seed, ignore_index=ignore_index)
    ens = PixelEnsemble(cfg, train.channels, train.device).fit(train, train_labels, progress=False, max_pixels=max_pixels)
    return ens.predict(test)[0]


def mlp_probe(train: FeatureMaps, train_labels, test: FeatureMaps, test_labels, num_classes: int, *,
              seed: int = 0, ignore_index: int = 255, max_pixels: int | None = None) -> float:
    """Test mIoU of one DDPM-Seg member MLP (see :func:`mlp_probe_predict`)."""
    pred = mlp_probe_predict(train, train_labels, test, num_classes, seed=seed, ignore_index=ignore_index,
                             max_pixels=max_pixels)
    test_labels = torch.as_tensor(np.asarray(test_labels))
    cm = confusion_matrix(pred.cpu().reshape(-1), test_labels.reshape(-1), num_classes, ignore_index)
    return float(np.nanmean(iou_per_class(cm).numpy()))


def rgb_features(images: torch.Tensor) -> FeatureMaps:
    """Raw pixel colours as a FeatureMaps (the baseline every feature must beat)."""
    return FeatureMaps({(0, "rgb"): images.float()}, tuple(images.shape[-2:]), [0], ["rgb"])


def probe_grid(backbone, train_images, train_labels, test_images, test_labels, blocks: Sequence[str | int],
               timesteps: Sequence[int], *, num_classes: int | None = None, per_class: int = 2000,
               ridge: float = 1e-2, seed: int = 0, batch_size: int = 16, progress: bool = True,
               train_features: FeatureMaps | None = None, test_features: FeatureMaps | None = None) -> ProbeTable:
    """Test mIoU of a ridge probe per (block, t), trained on labelled pixels of ``train_images``.

    Features are extracted once for all blocks and timesteps (pass ``*_features`` to reuse
    them). Labels are ``(N, H, W)`` ints at the features' image size, 255 = ignore.
    """
    train_labels, test_labels = torch.as_tensor(np.asarray(train_labels)), torch.as_tensor(np.asarray(test_labels))
    for name, lab in (("train_labels", train_labels), ("test_labels", test_labels)):
        if lab.ndim != 3:
            raise ValueError(f"{name} must be (N, H, W) label maps; got shape {tuple(lab.shape)}")
    k = num_classes or int(max(train_labels[train_labels != 255].max(), test_labels[test_labels != 255].max())) + 1
    kw = dict(blocks=blocks, timesteps=timesteps, batch_size=batch_size, progress=progress, seed=seed)
    tr = train_features or extract_features(backbone, train_images, **kw)
    te = test_features or extract_features(backbone, test_images, **kw)
    if tuple(train_labels.shape[-2:]) != tr.image_size:
        raise ValueError(f"labels are {tuple(train_labels.shape[-2:])} but features describe {tr.image_size} images; "
                         "resize the labels (nearest) to the backbone's input size")
    names = tr.blocks
    table = np.zeros((len(names), len(tr.timesteps)))
    from tqdm.auto import tqdm

    for i, b in enumerate(tqdm(names, desc="probes", disable=not progress, leave=False)):
        for j, t in enumerate(tr.timesteps):
            table[i, j] = probe_features(tr.select([b], [t]), train_labels, te.select([b], [t]), test_labels, k,
                                         per_class=per_class, ridge=ridge, seed=seed)
    return ProbeTable(table, names, list(tr.timesteps))
