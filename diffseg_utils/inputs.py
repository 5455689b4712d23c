"""Turn user images (PIL / numpy / torch, any mode and size) into a backbone's input tensor.

Policy (one place, documented):

* **Layouts.** PIL images; numpy arrays ``HxW``, ``HxWxC`` or ``NxHxWxC`` (channels last,
  as image libraries write them); torch tensors ``CxHxW`` or ``NxCxHxW`` (channels first,
  as torch writes them). A list may mix kinds and sizes.
* **Values.** Integer arrays are read as 0..255 (uint16 as 0..65535); float arrays must lie in
  ``[0, 1]`` (pass ``value_range=(-1, 1)`` if yours are already in ``[-1, 1]``).
* **Channels.** 1 (gray) is repeated to RGB; 2 (gray + alpha) and 4 (RGBA) are composited
  over white, as a viewer shows them; 3 is RGB. Anything else is an error.
* **Size.** The shorter side is resized (bicubic, antialiased) to ``size`` and the centre is
  cropped to ``size x size``; ``size`` must be a multiple of what the UNet needs.
* **Output.** ``(N, 3, size, size)`` float in the model's range (``[-1, 1]`` for SD and DDPM).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

ImageLike = Any  # PIL.Image.Image | np.ndarray | torch.Tensor


def _pil_to_array(img) -> np.ndarray:
    if img.mode in ("RGB", "L", "RGBA", "LA"):
        return np.asarray(img)
    if img.mode == "P" and "transparency" in img.info:
        return np.asarray(img.convert("RGBA"))
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float32)
        return arr / (65535.0 if arr.max() > 255 else 255.0)
    return np.asarray(img.convert("RGB"))


def _to_float_chw(x: ImageLike, value_range: tuple[float, float], index: int) -> torch.Tensor:
    """One image -> float32 (C, H, W) in [0, 1] (channels not yet fixed)."""
    where = f"image {index}"
    if hasattr(x, "mode") and hasattr(x, "size") and hasattr(x, "convert"):  # PIL
        x = _pil_to_array(x)
    if isinstance(x, np.ndarray):
        arr = x
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"{where}: numpy images must be HxW or HxWxC (channels last); got shape {arr.shape}")
        if arr.dtype == np.uint8:
            t = torch.from_numpy(np.array(arr, dtype=np.float32)) / 255.0
        elif arr.dtype == np.uint16:
            t = torch.from_numpy(arr.astype(np.float32)) / 65535.0
        elif arr.dtype == bool:
            t = torch.from_numpy(arr.astype(np.float32))
        elif np.issubdtype(arr.dtype, np.integer):
            t = torch.from_numpy(arr.astype(np.float32)) / 255.0
        elif np.issubdtype(arr.dtype, np.floating):
            t = _rescale(torch.from_numpy(arr.astype(np.float32)), value_range, where)
        else:
            raise ValueError(f"{where}: unsupported numpy dtype {arr.dtype}; use uint8 (0..255) or float (0..1)")
        t = t.permute(2, 0, 1)
    elif isinstance(x, torch.Tensor):
        t = x.detach()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3:
            raise ValueError(f"{where}: tensors must be CxHxW (channels first); got shape {tuple(t.shape)}")
        if t.dtype == torch.uint8:
            t = t.float() / 255.0
        elif t.is_floating_point():
            t = _rescale(t.float(), value_range, where)
        else:
            raise ValueError(f"{where}: unsupported tensor dtype {t.dtype}; use uint8 (0..255) or float (0..1)")
    else:
        raise TypeError(f"{where}: expected a PIL image, numpy array or torch tensor, got {type(x).__name__}")
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(f"{where}: image is empty (shape {tuple(t.shape)}); expected H, W >= 1")
    if not torch.isfinite(t).all():
        raise ValueError(f"{where}: image contains NaN or infinite values")
    c = t.shape[0]
    if c == 1:
        t = t.expand(3, -1, -1)
    elif c == 2:
        t = t[:1] * t[1:] + (1 - t[1:])  # gray + alpha over white
        t = t.expand(3, -1, -1)
    elif c == 4:
        t = t[:3] * t[3:] + (1 - t[3:])  # RGBA over white
    elif c != 3:
        raise ValueError(
            f"{where}: expected 1 (gray), 2 (gray+alpha), 3 (RGB) or 4 (RGBA) channels, got {c} "
            f"(shape {tuple(t.shape)}); numpy arrays are read channels-last, tensors channels-first"
        )
    return t


def _rescale(t: torch.Tensor, value_range: tuple[float, float], where: str) -> torch.Tensor:
    lo, hi = value_range
    if t.numel() and torch.isfinite(t).all():
        tmin, tmax = float(t.min()), float(t.max())
        tol = 1e-3 * (hi - lo)
        if tmin < lo - tol or tmax > hi + tol:
            raise ValueError(
                f"{where}: float values span [{tmin:.3g}, {tmax:.3g}] but value_range is {value_range}; "
                f"pass value_range=(-1, 1) for images already in [-1, 1], or uint8 for 0..255"
            )
    return ((t - lo) / (hi - lo)).clamp(0, 1)


def prepare_images(
    images: ImageLike | Sequence[ImageLike],
    size: int,
    *,
    multiple: int = 8,
    out_range: tuple[float, float] = (-1.0, 1.0),
    value_range: tuple[float, float] = (0.0, 1.0),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Convert images to a ``(N, 3, size, size)`` tensor in ``out_range`` (see module doc for the policy).

    ``multiple`` is the factor the backbone needs the side to be divisible by (VAE factor x
    UNet downsampling); a ``size`` that is not a multiple raises a ValueError naming the nearest ones.
    """
    if size <= 0 or size % multiple:
        lo = max(multiple, size // multiple * multiple)
        raise ValueError(f"size {size} is not a positive multiple of {multiple} (the backbone's downsampling); "
                         f"use {lo} or {lo + multiple}")
    if isinstance(images, torch.Tensor) and images.ndim == 4:
        items: list = list(images)
    elif isinstance(images, np.ndarray) and images.ndim == 4:
        items = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ValueError("no images given; expected at least one image")
    out = []
    for i, img in enumerate(items):
        t = _to_float_chw(img, value_range, i)[None]
        h, w = t.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            t = F.interpolate(t, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
            top, left = (nh - size) // 2, (nw - size) // 2
            t = t[..., top:top + size, left:left + size]
        out.append(t)
    x = torch.cat(out)
    lo, hi = out_range
    return (x * (hi - lo) + lo).to(device=device, dtype=dtype)
