"""Feature sources that know nothing learned: the floors every diffusion feature must beat.

Raw colour (:func:`~diffseg_utils.probes.rgb_features`) tells a part only where colour does;
colour plus pixel position (:func:`rgbxy_features`) also captures "the face is usually in the
middle, hair at the top" — the prior a probe can learn from 20 roughly aligned images without
any representation at all. DDPM-Seg's claim is about what features add on top of both.

Position enters as random Fourier features of (x, y) (Tancik et al., NeurIPS 2020), not as the two
raw coordinates: a linear probe on raw (x, y) can only split the image by a straight line, so it
would understate the prior (on centred faces a part is a blob, not a half-plane). On these
features a linear probe (and the ensemble's MLPs) can draw any smooth region of the image plane.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .backbones import Backbone
from .features import FeatureMaps, extract_features

POSITION_FEATURES = 64
"""Number of random Fourier position channels (half cosines, half sines)."""
POSITION_SCALE = 3.0
"""Standard deviation of the random frequencies, in cycles per image side: regions down to about
1/6 of the image can be drawn; higher would let a probe memorise pixels of its 20 training images."""


def position_features(h: int, w: int, *, num: int = POSITION_FEATURES, scale: float = POSITION_SCALE, seed: int = 0,
                      device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Random Fourier features of the pixel position: ``(num, h, w)`` of ``dtype`` in [-1, 1].

    Channel pairs ``cos(2π ω·p)``, ``sin(2π ω·p)`` with ``p`` = (x, y) in [0, 1] at pixel centres
    (the shorter side scaled to keep pixels square) and frequencies ``ω ~ N(0, scale²)`` drawn from ``seed``
    on the host in float32, so every device gets the same features.
    """
    if num < 2 or num % 2:
        raise ValueError(f"num must be an even number >= 2 (cosine and sine pairs), got {num}")
    if h < 1 or w < 1:
        raise ValueError(f"h and w must be >= 1, got {h} x {w}")
    omega = torch.randn(num // 2, 2, generator=torch.Generator().manual_seed(seed)) * scale
    side = max(h, w)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / side
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / side
    p = torch.stack([xs[None, :].expand(h, w), ys[:, None].expand(h, w)], -1)  # (h, w, 2)
    phase = 2 * math.pi * (p @ omega.T)  # (h, w, num/2)
    return torch.cat([phase.cos(), phase.sin()], -1).permute(2, 0, 1).to(device=device, dtype=dtype)


def rgbxy_features(images: torch.Tensor, *, seed: int = 0) -> FeatureMaps:
    """Colour and pixel position as a :class:`FeatureMaps` with one ``3 + POSITION_FEATURES``-channel map.

    images: (N, 3, H, W) float in [0, 1] (any float dtype; kept). Channels: R, G, B, then
    :func:`position_features` (the same for every image; ``seed`` draws its frequencies).
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W); got shape {tuple(images.shape)}")
    if not images.dtype.is_floating_point:
        raise TypeError(f"images must be float in [0, 1]; got {images.dtype} (divide uint8 images by 255)")
    n, _, h, w = images.shape
    pos = position_features(h, w, seed=seed, device=images.device, dtype=images.dtype)
    return FeatureMaps({(0, "rgbxy"): torch.cat([images, pos[None].expand(n, -1, -1, -1)], 1)}, (h, w), [0],
                       ["rgbxy"])


def baseline_features(images, kind: str = "rgb", device: torch.device | str | None = None) -> FeatureMaps:
    """A baseline :class:`FeatureMaps` of images given as (N, H, W, 3) uint8 (numpy or torch).

    ``kind``: "rgb" (colour only, 3 channels) or "rgbxy" (colour and position, :func:`rgbxy_features`);
    colour as float32 in [0, 1].
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


FLOORS = ("raw RGB", "raw RGB + position", "untrained denoiser")
"""The floors :func:`floor_features` returns, in the order a table lists them."""


def floor_features(backbone: Backbone, images: Sequence, *, blocks: Sequence[str | int], timesteps: Sequence[int],
                   seed: int = 0, **extract_kw) -> dict[str, tuple[FeatureMaps, ...]]:
    """The features of every floor (:data:`FLOORS`) for each image set in ``images``: one call for the notebooks.

    images:  a sequence of image sets, each (N, H, W, 3) uint8 (``Dataset.images``), e.g. (train, val, test).
    Returns ``{floor: (FeatureMaps per set, in order)}``: "raw RGB" (3 channels, float32 in [0, 1]), "raw RGB +
    position" (:func:`rgbxy_features`) and "untrained denoiser": :func:`~diffseg_utils.extract_features` of
    ``untrained_like(backbone, seed)`` at ``blocks`` x ``timesteps`` (``seed`` and ``extract_kw`` passed on, so its
    features are read exactly as the trained backbone's are). Which places of the untrained denoiser a table uses (its
    own choice on validation images, or the trained one's) is the caller's decision.
    """
    from .loading import untrained_like

    if not len(images):
        raise ValueError("images is empty: give at least one image set, e.g. [data.train.images, data.test.images]")
    rand = untrained_like(backbone, seed=seed)
    kw = dict(seed=seed, **extract_kw)
    return {"raw RGB": tuple(baseline_features(x, "rgb", backbone.device) for x in images),
            "raw RGB + position": tuple(baseline_features(x, "rgbxy", backbone.device) for x in images),
            "untrained denoiser": tuple(extract_features(rand, x, list(blocks), list(timesteps), **kw) for x in images)}
