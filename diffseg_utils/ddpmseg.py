"""DDPM-Seg (Baranchuk et al., ICLR 2022) end to end: features -> pixel-MLP ensemble -> labels.

>>> seg = FewShotSegmenter(bb, blocks=[5, 6, 7, 8, 12], timesteps=[50, 150, 250], num_classes=28)
>>> seg.fit(train_images, train_labels)            # (N, H, W) label maps, 255 = ignore
>>> result = seg.predict(test_images)              # labels, uncertainty, per-image scores
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .backbones import Backbone
from .datasets import MIN_CLASS_FRACTION, ignore_small_classes
from .features import FeatureMaps, extract_features
from .inputs import geometry_of, prepare_labels, restore_labels
from .pixel_classifier import EnsembleConfig, PixelEnsemble


@dataclass
class SegmentationResult:
    """DDPM-Seg's output for N images at the features' image size (H, W).

    labels: (N, H, W) int64 majority vote of the members;
    uncertainty: (N, H, W) float ensemble disagreement (entropy of the mean softmax minus the members'
    mean entropy, as DDPM-Seg computes it);
    image_scores: (N,) float mean of each image's top-10% pixel uncertainties.
    """

    labels: torch.Tensor
    uncertainty: torch.Tensor
    image_scores: torch.Tensor


class FewShotSegmenter:
    """The DDPM-Seg method on any :class:`Backbone` (paper defaults; every knob a parameter).

    blocks / timesteps: what to extract (ints in ``blocks`` are ADM ``output_blocks`` indices);
    ``config`` the ensemble's hyperparameters (default: the paper's, 10 members);
    ``min_class_fraction``: a class covering less than this share of a training image is ignored there
    (the paper's 20 pixels at 256², scaled with the area: :data:`~diffseg_utils.datasets.MIN_CLASS_FRACTION`).
    ``backbone`` may be None when every call passes precomputed ``features``.
    """

    def __init__(self, backbone: Backbone | None, blocks: Sequence[str | int], timesteps: Sequence[int], num_classes: int,
                 config: EnsembleConfig | None = None, noise_seed: int = 0,
                 min_class_fraction: float = MIN_CLASS_FRACTION,
                 batch_size: int = 8):
        self.backbone, self.blocks, self.timesteps = backbone, list(blocks), list(timesteps)
        self.config = config or EnsembleConfig(num_classes=num_classes)
        if self.config.num_classes != num_classes:
            raise ValueError(f"config.num_classes={self.config.num_classes} but num_classes={num_classes}")
        self.noise_seed, self.min_class_fraction, self.batch_size = noise_seed, min_class_fraction, batch_size
        self.ensemble: PixelEnsemble | None = None

    def features(self, images) -> FeatureMaps:
        """:class:`FeatureMaps` of ``images`` at the segmenter's blocks and timesteps."""
        if self.backbone is None:
            raise ValueError("this segmenter has no backbone; pass features=... (or build it with a backbone)")
        return extract_features(self.backbone, images, self.blocks, self.timesteps, seed=self.noise_seed,
                                batch_size=self.batch_size)

    def fit(self, images, labels, *, features: FeatureMaps | None = None, max_pixels: int | None = None,
            progress: bool = True) -> "FewShotSegmenter":
        """Train the ensemble on labelled images (or on precomputed ``features`` of them).

        labels: (N, H, W) integer class maps, ``config.ignore_index`` = ignore; with ``images`` at the
        images' own sizes (a list when they differ), with ``features`` at the features' image size.
        ``features`` must hold exactly the segmenter's timesteps and blocks (select them first).
        """
        fm = features or self.features(images)
        self._check(fm)
        if features is None:  # labels drawn on the user's images -> the features' grid, same placement as the pixels
            geo = geometry_of(images, self.backbone.resolution)
            labels = prepare_labels(labels, geo, size=fm.image_size, ignore_index=self.config.ignore_index).cpu()
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu()  # labels may come from an accelerator (np.asarray cannot read them there)
        labels = ignore_small_classes(np.asarray(labels), self.min_class_fraction, self.config.ignore_index)
        self.ensemble = PixelEnsemble(self.config, fm.channels, fm.device).fit(fm, labels, progress=progress,
                                                                                max_pixels=max_pixels)
        return self

    def predict(self, images=None, *, features: FeatureMaps | None = None) -> SegmentationResult:
        """Labels for ``images`` (anything :func:`~diffseg_utils.prepare_images` takes), or for precomputed
        ``features``. With images, ``labels`` (int64) and ``uncertainty`` (float) come back at each
        image's own size (B, H, W) — a non-square image is letterboxed for the model and the padding
        removed again, so every pixel gets a label; a list when sizes differ. With features, at the
        features' image size."""
        if self.ensemble is None:
            raise RuntimeError("the ensemble is not trained; call .fit(images, labels) first")
        fm = features or self.features(images)
        self._check(fm)
        labels, uncertainty, scores = self.ensemble.predict(fm)
        if features is None:  # back to each input image's own size (padding removed)
            geo = geometry_of(images, self.backbone.resolution)
            labels, uncertainty = restore_labels(labels, geo), restore_labels(uncertainty, geo)
        return SegmentationResult(labels, uncertainty, scores)

    def _check(self, fm: FeatureMaps) -> None:
        blocks = [b if isinstance(b, str) else None for b in self.blocks]
        ts = [int(t) for t in self.timesteps]
        if [int(t) for t in fm.timesteps] != ts or (None not in blocks and list(fm.blocks) != blocks):
            raise ValueError(f"features hold timesteps {fm.timesteps} x blocks {fm.blocks}, but this segmenter uses "
                             f"timesteps {ts} x blocks {self.blocks}; pass features.select(blocks, timesteps)")


def fewshot_miou(train_features: FeatureMaps, train_labels, test_features: FeatureMaps, test_labels, *,
                 num_classes: int, seed: int = 0, ignore_index: int = 255, max_pixels: int | None = None,
                 min_class_fraction: float = MIN_CLASS_FRACTION,
                 convention: str = "ddpmseg") -> tuple[float, SegmentationResult]:
    """Fit a 10-member DDPM-Seg ensemble on precomputed features and score it on test features.

    Features: :class:`FeatureMaps` of the train / test images (any blocks and timesteps, used as
    given); labels: (N, H, W) integer maps at the features' image size. Returns the test mIoU and
    the :class:`SegmentationResult`. ``convention="ddpmseg"`` scores as DDPM-Seg's ``compute_iou``
    (every class but the ignore label counts, absent ones as 0: :func:`~diffseg_utils.metrics.ddpmseg_miou`);
    ``"skip"`` leaves out classes absent from both maps (:func:`~diffseg_utils.metrics.mean_iou`).
    """
    from .metrics import ddpmseg_miou, mean_iou

    if convention not in ("ddpmseg", "skip"):
        raise ValueError(f"convention must be 'ddpmseg' or 'skip', got {convention!r}")

    cfg = EnsembleConfig(num_classes=num_classes, seed=seed, ignore_index=ignore_index)
    seg = FewShotSegmenter(None, train_features.blocks, train_features.timesteps, num_classes, config=cfg,
                           min_class_fraction=min_class_fraction)
    seg.fit(None, train_labels, features=train_features, max_pixels=max_pixels, progress=False)
    res = seg.predict(features=test_features)
    gt = torch.as_tensor(np.asarray(test_labels))
    if convention == "ddpmseg":
        return float(ddpmseg_miou(res.labels.cpu(), gt, num_classes, ignore_index)), res
    return float(mean_iou(res.labels.cpu(), gt, num_classes, ignore_index=ignore_index)), res
