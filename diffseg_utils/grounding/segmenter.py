"""The segmenter / detector interface the grounding pipeline labels generated images with.

Any object with ``__call__(images) -> SegmenterOutput`` works: the paper's Mask R-CNN behind a
thin wrapper, the toy world's oracle, or a fake in a test::

    out = segmenter(images)     # images: (N, 3, H, W) float in [-1, 1], on the segmenter's device
    out.masks                   # (N, K, H', W') bool, one mask per entry of out.class_names
    out.scores                  # (N, K) float in [0, 1]; 0 where the entry was not found
    out.class_names             # K names; a detector may repeat a name once per instance
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class SegmenterOutput:
    """Per-entry masks and confidence scores for a batch of images."""

    masks: torch.Tensor   # (N, K, H, W) bool
    scores: torch.Tensor  # (N, K) float, 0 = not found
    class_names: tuple[str, ...]


class Segmenter(Protocol):
    """Anything that maps images ``(N, 3, H, W)`` in [-1, 1] to a :class:`SegmenterOutput`."""

    def __call__(self, images: torch.Tensor) -> SegmenterOutput: ...
