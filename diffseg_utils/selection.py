"""Choosing where to read features (blocks and timesteps) from data — on validation images only.

DDPM-Seg fixes its blocks and timesteps per dataset from a per-(block, t) analysis (paper,
Fig. 2–4). :func:`choose_places` is that analysis as one call: a closed-form ridge probe per
(block, t) is fitted on labelled *training* images and scored on *validation* images; the best
place and a small concatenation around it are returned. The test images a number is reported on
never enter the choice.

>>> choice = choose_places(bb, train.images, train.labels, val.images, val.labels,
...                        timesteps=[25, 50, 100, 200], num_classes=11)
>>> choice.blocks, choice.timesteps          # feed FewShotSegmenter(bb, choice.blocks, choice.timesteps, ...)
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .backbones import Backbone
from .features import FeatureMaps, extract_features
from .probes import ProbeTable, probe_grid


def decoder_blocks(backbone: Backbone) -> list[str]:
    """The candidates DDPM-Seg's analysis sweeps, in forward order: every hookable sub-module of a
    UNet's decoder (``up_blocks.*``) except the upsamplers; for a transformer every block (a DiT has
    no decoder: all its blocks share one token grid)."""
    return backbone.feature_blocks()


@dataclass
class PlaceChoice:
    """The outcome of :func:`choose_places`.

    ``table``: validation mIoU of a ridge probe per (block, t) (``table.miou`` is (blocks, timesteps));
    ``best_block`` / ``best_t`` / ``best_miou``: its best single place;
    ``blocks`` / ``timesteps``: the concatenation to use (the ``n_blocks`` best distinct blocks at
    ``best_t``, and ``best_t`` with its neighbours in the sweep).
    """

    table: ProbeTable = field(repr=False)
    best_block: str
    best_t: int
    best_miou: float
    blocks: list[str]
    timesteps: list[int]

    def best_of(self, features: FeatureMaps) -> FeatureMaps:
        """``features`` at the best single place (a view, no copy)."""
        return features.select([self.best_block], [self.best_t])

    def combo_of(self, features: FeatureMaps) -> FeatureMaps:
        """``features`` at the chosen concatenation of blocks and timesteps (a view, no copy)."""
        return features.select(self.blocks, self.timesteps)


def _distinct_best(table: ProbeTable, feats: FeatureMaps, t: int, n: int) -> list[str]:
    """The ``n`` best blocks at ``t`` whose outputs differ (a block and its last sub-layer can be equal)."""
    j = list(table.timesteps).index(t)
    chosen: list[str] = []
    for i in np.argsort(-table.miou[:, j], kind="stable"):
        b = table.blocks[i]
        if not any(torch.equal(feats.maps[(t, b)], feats.maps[(t, c)]) for c in chosen):
            chosen.append(b)
        if len(chosen) == n:
            break
    return chosen


def choose_places(backbone: Backbone | None = None, train_images=None, train_labels=None, val_images=None,
                  val_labels=None, *, timesteps: Sequence[int], num_classes: int, blocks: Sequence[str | int] | None = None,
                  n_blocks: int = 3, n_timesteps: int = 3, per_class: int = 2000, seed: int = 0,
                  batch_size: int = 16, progress: bool = True, train_features: FeatureMaps | None = None,
                  val_features: FeatureMaps | None = None, ignore_index: int = 255) -> PlaceChoice:
    """Pick blocks and timesteps for DDPM-Seg features on labelled validation images.

    images: anything :func:`~diffseg_utils.prepare_images` accepts (N, H, W, 3 uint8 arrays, PIL images, ...);
    labels: (N, H, W) integer class maps at the features' image size, 255 = ignore.
    ``blocks`` defaults to :func:`decoder_blocks`; ``timesteps`` is the sweep. Pass precomputed
    ``train_features`` / ``val_features`` (extracted at ``blocks`` x ``timesteps``) to skip extraction;
    then no backbone or images are needed:

    >>> choose_places(train_labels=y_tr, val_labels=y_va, train_features=f_tr, val_features=f_va,
    ...               timesteps=[50, 150], num_classes=3)
    """
    if backbone is None and (train_features is None or val_features is None):
        raise ValueError("give a backbone with train_images and val_images, or both train_features and val_features")
    if train_labels is None or val_labels is None:
        raise ValueError("give train_labels and val_labels: (N, H, W) integer class maps")
    if n_blocks < 1 or n_timesteps < 1:
        raise ValueError(f"n_blocks and n_timesteps must be >= 1; got {n_blocks}, {n_timesteps}")
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
        raise ValueError("timesteps is empty; give the noise levels to sweep, e.g. [25, 50, 100, 200]")
    if blocks is None:
        if backbone is None:
            blocks = list(train_features.blocks)
        else:
            blocks = decoder_blocks(backbone)
    kw = dict(seed=seed, batch_size=batch_size, progress=progress)
    f_tr = train_features or extract_features(backbone, train_images, list(blocks), timesteps, **kw)
    f_va = val_features or extract_features(backbone, val_images, list(blocks), timesteps, **kw)
    table = probe_grid(train_labels=train_labels, test_labels=val_labels, blocks=list(f_tr.blocks), timesteps=timesteps,
                       num_classes=num_classes, per_class=per_class, seed=seed, progress=False,
                       train_features=f_tr, test_features=f_va, ignore_index=ignore_index)
    best_block, best_t, best = table.best()
    j = timesteps.index(int(best_t))
    lo = max(0, min(j - (n_timesteps - 1) // 2, len(timesteps) - n_timesteps))
    combo_t = timesteps[lo:lo + n_timesteps]
    return PlaceChoice(table, best_block, int(best_t), float(best), _distinct_best(table, f_tr, int(best_t), n_blocks),
                       sorted(combo_t))
