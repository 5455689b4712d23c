"""Feature sources that know nothing learned: the floors every diffusion feature must beat.

Raw colour (:func:`~diffseg_utils.probes.rgb_features`) tells a part only where colour does;
colour plus pixel position (:func:`rgbxy_features`) also captures "the face is usually in the
middle, hair at the top" — the prior a probe can learn from 20 roughly aligned images without
any representation at all. DDPM-Seg's claim is about what features add on top of both.
"""
from __future__ import annotations

import numpy as np
import torch

from .features import FeatureMaps


def rgbxy_features(images: torch.Tensor) -> FeatureMaps:
    """Colour and normalised pixel position as a :class:`FeatureMaps` with one 5-channel map.

    images: (N, 3, H, W) float in [0, 1] (any float dtype; kept). Channels: R, G, B, x, y with
    x, y in [0, 1] at pixel centres.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W); got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be float in [0, 1]; got {images.dtype} (divide uint8 images by 255)")
    n, _, h, w = images.shape
    ys = (torch.arange(h, device=images.device, dtype=images.dtype) + 0.5) / h
    xs = (torch.arange(w, device=images.device, dtype=images.dtype) + 0.5) / w
    grid = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)])[None].expand(n, 2, h, w)
    return FeatureMaps({(0, "rgbxy"): torch.cat([images, grid], 1)}, (h, w), [0], ["rgbxy"])


def baseline_features(images, kind: str = "rgb", device: torch.device | str | None = None) -> FeatureMaps:
    """A baseline :class:`FeatureMaps` of images given as (N, H, W, 3) uint8 (numpy or torch).

    ``kind``: "rgb" (colour only) or "rgbxy" (colour and position); values as float32 in [0, 1].
    """
    if kind not in ("rgb", "rgbxy"):
        raise ValueError(f"kind must be 'rgb' or 'rgbxy', got {kind!r}")
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != torch.uint8:
        raise ValueError(f"images must be (N, H, W, 3) uint8; got {tuple(x.shape)} {x.dtype}")
    x = x.to(device or "cpu").permute(0, 3, 1, 2).float() / 255
    if kind == "rgbxy":
        return rgbxy_features(x)
    return FeatureMaps({(0, "rgb"): x}, tuple(x.shape[-2:]), [0], ["rgb"])
