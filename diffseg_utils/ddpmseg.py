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
from .datasets import ignore_small_classes
from .features import FeatureMaps, extract_features
from .pixel_classifier import EnsembleConfig, PixelEnsemble


@dataclass
class SegmentationResult:
    labels: torch.Tensor        # (N, H, W) majority vote
    uncertainty: torch.Tensor   # (N, H, W) ensemble disagreement
    image_scores: torch.Tensor  # (N,) mean of the top-10% pixel uncertainties


class FewShotSegmenter:
    """The DDPM-Seg method on any :class:`Backbone` (paper defaults; every knob a parameter).

    blocks / timesteps: what to extract (ints in ``blocks`` are ADM ``output_blocks`` indices);
    ``config`` the ensemble's hyperparameters (default: the paper's, 10 members);
    ``min_class_pixels``: classes smaller than this in a training image are ignored (paper: 20).
    """

    def __init__(self, backbone: Backbone, blocks: Sequence[str | int], timesteps: Sequence[int], num_classes: int,
                 config: EnsembleConfig | None = None, noise_seed: int = 0, min_class_pixels: int = 20,
                 batch_size: int = 8):
        self.backbone, self.blocks, self.timesteps = backbone, list(blocks), list(timesteps)
        self.config = config or EnsembleConfig(num_classes=num_classes)
        if self.config.num_classes != num_classes:
            raise ValueError(f"config.num_classes={self.config.num_classes} but num_classes={num_classes}")
        self.noise_seed, self.min_class_pixels, self.batch_size = noise_seed, min_class_pixels, batch_size
        self.ensemble: PixelEnsemble | None = None

    def features(self, images) -> FeatureMaps:
        return extract_features(self.backbone, images, self.blocks, self.timesteps, seed=self.noise_seed,
                                batch_size=self.batch_size)

    def fit(self, images, labels, *, features: FeatureMaps | None = None, max_pixels: int | None = None,
            progress: bool = True) -> "FewShotSegmenter":
        """Train the ensemble on labelled images (or on precomputed ``features`` of them)."""
        fm = features or self.features(images)
        labels = ignore_small_classes(np.asarray(labels), self.min_class_pixels, self.config.ignore_index)
        self.ensemble = PixelEnsemble(self.config, fm.channels, fm.device).fit(fm, labels, progress=progress,
                                                                                max_pixels=max_pixels)
        return self

    def predict(self, images=None, *, features: FeatureMaps | None = None) -> SegmentationResult:
        if self.ensemble is None:
            raise RuntimeError("the ensemble is not trained; call .fit(images, labels) first")
        fm = features or self.features(images)
        return SegmentationResult(*self.ensemble.predict(fm))
