"""Images in, masks back out: user images (PIL / numpy / torch, any mode and size) to a backbone's
square input tensor, and model-resolution labels or scores back to each image's own size.

>>> x, geo = prepare_images(photos, 512, return_geometry=True)   # (N, 3, 512, 512) in [-1, 1]
>>> labels = some_method(x)                                       # (N, h, w) at the model's grid
>>> masks = restore_labels(labels, geo)                           # (N, H, W), or a list if sizes differ

Policy (one place, documented):

* **Layouts.** PIL images; numpy arrays ``HxW``, ``HxWxC`` or ``NxHxWxC`` (channels last,
  as image libraries write them); torch tensors ``HxW``, ``CxHxW`` or ``NxCxHxW`` (channels
  first, as torch writes them). A list may mix kinds and sizes. An empty list is an error.
* **Values.** ``uint8`` is 0..255. ``uint16`` (and PIL's 16-bit modes ``I;16*`` / ``I``, which is
  how PIL opens 16-bit PNGs) is 0..65535. Every other integer dtype (int8/16/32/64, uint32/64,
  torch int tensors) must hold values in 0..255 and is read like uint8; values outside raise
  (an int32 image up to 1000 is not guessed at: rescale it yourself). Float arrays and tensors
  (float16/bfloat16/32/64) must lie in ``value_range``, default ``[0, 1]``; pass
  ``value_range=(-1, 1)`` for images already in the models' range. Values outside the range by
  more than 0.1% of its width raise; within that tolerance they are clipped. NaN and +-inf raise.
  Boolean arrays are masks, not images, and raise (convert with ``mask.astype(np.uint8) * 255``).
* **Channels.** 1 (gray, PIL ``L``) is repeated to RGB; 2 (gray + alpha, PIL ``LA``) and 4
  (RGBA, PIL ``RGBA`` and palette ``P`` images with transparency) are composited over white, as
  a viewer shows them; 3 is RGB. Other PIL modes (``P``, ``CMYK``, ``YCbCr``, ``1``, ...) go
  through ``Image.convert("RGB")``; PIL's float mode ``F`` follows the float rule. Any other
  channel count is an error.
* **Size** (``fit``). Every image ends up ``size x size``:

  - ``"pad"`` (default, letterbox): the longer side is resized (bicubic, antialiased) to
    ``size`` and the shorter side is padded, centred, with ``pad_value`` (mid-gray by default):
    no part of the image is lost;
  - ``"crop"``: the shorter side is resized to ``size`` and the centre ``size x size`` is kept:
    the sides of a non-square image are not seen by the model (the behaviour before ``fit``);
  - ``"resize"``: both sides are resized to ``size`` (the aspect ratio is not kept).

  For a square image the three agree. ``size`` must be a multiple of what the UNet needs.
* **Output.** ``(N, 3, size, size)`` float in ``out_range`` (``[-1, 1]`` for SD and DDPM), and
  with ``return_geometry=True`` a :class:`Geometry` recording how each image was placed, which
  :func:`restore_labels` uses to bring model outputs back to each image's own size and
  :func:`prepare_labels` uses to bring label maps drawn on the images to the model's grid.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, Union, overload

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

ImageLike: TypeAlias = Union[PIL.Image.Image, np.ndarray, torch.Tensor]
"""One image: a PIL image, a numpy array (HxW or HxWxC) or a torch tensor (HxW or CxHxW)."""

FITS = ("pad", "crop", "resize")


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class ImageGeometry:
    """Where one image sits on the model's ``size x size`` canvas.

    The input image, ``height x width`` pixels, was resized to ``resized = (rh, rw)`` pixels and
    placed with its top-left corner at canvas pixel ``(top, left)``: ``top, left >= 0`` is padding
    (``fit="pad"``), ``<= 0`` cropping (``fit="crop"``: the canvas shows rows ``-top .. -top+size``
    of the resized image).
    """

    height: int
    width: int
    size: int
    fit: str
    resized: tuple[int, int]
    top: int
    left: int

    @classmethod
    def compute(cls, height: int, width: int, size: int, fit: str = "pad") -> "ImageGeometry":
        """The placement ``prepare_images(..., fit=fit)`` gives an ``height x width`` image."""
        if fit not in FITS:
            raise ValueError(f"fit must be one of {FITS}; got {fit!r}")
        if fit == "resize" or (height, width) == (size, size):
            return cls(height, width, size, fit, (size, size), 0, 0)
        scale = size / (max(height, width) if fit == "pad" else min(height, width))
        rh, rw = max(1, round(height * scale)), max(1, round(width * scale))
        if fit == "pad":
            rh, rw = min(rh, size), min(rw, size)
            return cls(height, width, size, fit, (rh, rw), (size - rh) // 2, (size - rw) // 2)
        rh, rw = max(rh, size), max(rw, size)
        return cls(height, width, size, fit, (rh, rw), -((rh - size) // 2), -((rw - size) // 2))

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the input image."""
        return self.height, self.width

    def valid_box(self) -> tuple[int, int, int, int]:
        """``(y0, y1, x0, x1)``: the canvas pixels that show the image (the rest is padding)."""
        rh, rw = self.resized
        return (max(0, self.top), min(self.size, self.top + rh), max(0, self.left), min(self.size, self.left + rw))


@dataclass(frozen=True)
class Geometry:
    """The placement of every image of a batch (:class:`ImageGeometry` each), from
    :func:`prepare_images` with ``return_geometry=True`` or from :func:`geometry_of`.

    ``len(geo)`` is the batch size; ``geo[i]`` one image's placement; ``geo[a:b]`` a sub-batch.
    """

    images: tuple[ImageGeometry, ...]

    def __len__(self) -> int:
        return len(self.images)

    @overload
    def __getitem__(self, i: int) -> ImageGeometry: ...
    @overload
    def __getitem__(self, i: slice) -> "Geometry": ...

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Geometry(self.images[i])
        return self.images[i]

    @property
    def size(self) -> int:
        """The model-side canvas size."""
        return self.images[0].size

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """``(H, W)`` of each input image."""
        return [g.image_size for g in self.images]

    @property
    def uniform(self) -> bool:
        """True when every input image has the same size (then restored outputs stack into one tensor)."""
        return len(set(self.image_sizes)) == 1


def _pil_like(x) -> bool:
    return hasattr(x, "mode") and hasattr(x, "size") and hasattr(x, "convert")


def _split_batch(images) -> list:
    if isinstance(images, (torch.Tensor, np.ndarray)) and images.ndim == 4:
        items: list = list(images)
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ValueError("no images given; expected at least one image (an empty list or batch was passed)")
    return items


def _hw(x, index: int) -> tuple[int, int]:
    """(H, W) of one image without converting its pixels."""
    if _pil_like(x):
        return x.size[1], x.size[0]
    if isinstance(x, np.ndarray):
        if x.ndim not in (2, 3):
            raise ValueError(f"image {index}: numpy images must be HxW or HxWxC (channels last); got shape {x.shape}")
        return x.shape[0], x.shape[1]
    if isinstance(x, torch.Tensor):
        if x.ndim not in (2, 3):
            raise ValueError(f"image {index}: tensors must be HxW or CxHxW (channels first); got shape {tuple(x.shape)}")
        return x.shape[-2], x.shape[-1]
    raise TypeError(f"image {index}: expected a PIL image, numpy array or torch tensor, got {type(x).__name__}")


def geometry_of(images: ImageLike | Sequence[ImageLike], size: int, fit: str = "pad") -> Geometry:
    """The :class:`Geometry` that ``prepare_images(images, size, fit=fit)`` would record, read from
    the images' shapes only (no pixel is converted): use it when a method prepares the images itself
    (``extract_features``, ``emerdiff_segment``) and you want its outputs at your images' sizes."""
    return Geometry(tuple(ImageGeometry.compute(*_hw(x, i), size, fit) for i, x in enumerate(_split_batch(images))))


# --------------------------------------------------------------------------- pixels
def _pil_to_array(img) -> np.ndarray:
    if img.mode in ("RGB", "L", "RGBA", "LA"):
        return np.asarray(img)
    if img.mode == "P" and "transparency" in img.info:
        return np.asarray(img.convert("RGBA"))
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(f"PIL image of mode {img.mode!r} is read as 16-bit (0..65535) but holds values "
                             f"{arr.min()}..{arr.max()}; convert it to 'RGB' or to a uint8 array in 0..255 first")
        return arr.astype(np.uint16)
    if img.mode == "F":
        return np.asarray(img)
    return np.asarray(img.convert("RGB"))


def _int_range_error(where: str, dtype, vmin, vmax, lo: int, hi: int) -> ValueError:
    return ValueError(
        f"{where}: images of dtype {dtype} must hold values in {lo}..{hi}; got {vmin}..{vmax}. Convert it: "
        f"e.g. (x - x.min()) / (x.max() - x.min()) as float in [0, 1], or np.clip(x, 0, 255).astype(np.uint8) "
        f"if the values are 8-bit levels")


def _to_float_chw(x: ImageLike, value_range: tuple[float, float], index: int) -> torch.Tensor:
    """One image -> float32 (C, H, W) in [0, 1] (channels not yet fixed)."""
    where = f"image {index}"
    if _pil_like(x):
        x = _pil_to_array(x)
    if isinstance(x, np.ndarray):
        arr = x
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.ndim != 3:
            raise ValueError(f"{where}: numpy images must be HxW or HxWxC (channels last); got shape {arr.shape}")
        if arr.dtype == bool:
            raise TypeError(f"{where}: got a boolean array, which is a mask, not an image; pass a uint8 image "
                            "(for a mask as an image: mask.astype(np.uint8) * 255)")
        if np.issubdtype(arr.dtype, np.integer):
            hi = 65535 if arr.dtype == np.uint16 else 255
            if arr.dtype != np.uint8 and arr.size and (arr.min() < 0 or arr.max() > hi):
                raise _int_range_error(where, arr.dtype, arr.min(), arr.max(), 0, hi)
            t = torch.from_numpy(arr.astype(np.float32)) / hi
        elif np.issubdtype(arr.dtype, np.floating):
            t = _rescale(torch.from_numpy(arr.astype(np.float32)), value_range, where)
        else:
            raise TypeError(f"{where}: unsupported numpy dtype {arr.dtype}; use uint8 (0..255) or float (0..1)")
        t = t.permute(2, 0, 1)
    elif isinstance(x, torch.Tensor):
        t = x.detach()
        if t.ndim == 2:
            t = t[None]
        if t.ndim != 3:
            raise ValueError(f"{where}: tensors must be HxW or CxHxW (channels first); got shape {tuple(t.shape)}")
        if t.dtype == torch.bool:
            raise TypeError(f"{where}: got a boolean tensor, which is a mask, not an image; pass a uint8 image "
                            "(for a mask as an image: mask.to(torch.uint8) * 255)")
        if t.is_floating_point():
            t = _rescale(t.float(), value_range, where)
        elif t.is_complex():
            raise TypeError(f"{where}: unsupported tensor dtype {t.dtype}; use uint8 (0..255) or float (0..1)")
        else:  # integer tensors
            hi = 65535 if t.dtype == getattr(torch, "uint16", None) else 255
            if t.dtype != torch.uint8 and t.numel():
                vmin, vmax = (int(v) for v in torch.aminmax(t.to(torch.int64)))
                if vmin < 0 or vmax > hi:
                    raise _int_range_error(where, t.dtype, vmin, vmax, 0, hi)
            t = t.float() / hi
    else:
        raise TypeError(f"{where}: expected a PIL image, numpy array or torch tensor, got {type(x).__name__}")
    if t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(f"{where}: image is empty (shape {tuple(t.shape)}); expected H, W >= 1")
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
    """Float values in ``value_range`` (0.1% tolerance, then clipped) -> [0, 1]; NaN/inf and values outside raise."""
    lo, hi = value_range
    if t.numel():
        finite = torch.isfinite(t).all()
        tmin, tmax = torch.aminmax(t)
        finite, tmin, tmax = bool(finite), float(tmin), float(tmax)  # one read per image, not per step
        if not finite:
            bad = "NaN" if bool(torch.isnan(t).any()) else "infinite"
            raise ValueError(f"{where}: image contains {bad} values (NaN or inf); replace them first, "
                             f"e.g. np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0), then check where they came from")
        tol = 1e-3 * (hi - lo)
        if tmin < lo - tol or tmax > hi + tol:
            raise ValueError(
                f"{where}: float values span [{tmin:.4g}, {tmax:.4g}] but value_range is {tuple(value_range)}; "
                f"pass value_range=(-1, 1) for images already in [-1, 1], divide 0..255 floats by 255, "
                f"or clip first if the overshoot is interpolation ringing"
            )
    return ((t - lo) / (hi - lo)).clamp(0, 1)


def prepare_images(
    images: ImageLike | Sequence[ImageLike],
    size: int,
    *,
    fit: str = "pad",
    pad_value: float = 0.5,
    multiple: int = 8,
    out_range: tuple[float, float] = (-1.0, 1.0),
    value_range: tuple[float, float] = (0.0, 1.0),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    return_geometry: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, Geometry]:
    """Convert images to a ``(N, 3, size, size)`` tensor in ``out_range`` (policy: module doc).

    images:    one :data:`ImageLike`, a list of them (sizes may differ), or a 4-D batch
               (numpy ``NxHxWxC``, torch ``NxCxHxW``).
    fit:       ``"pad"`` (letterbox, default), ``"crop"`` (centre crop) or ``"resize"`` (stretch).
    pad_value: the padding's gray level in [0, 1] image units (0.5 -> 0 in [-1, 1]).
    multiple:  the factor the backbone needs the side to be divisible by (VAE factor x UNet
               downsampling); a ``size`` that is not a multiple raises a ValueError naming the nearest ones.
    return_geometry: also return the :class:`Geometry` that :func:`restore_labels` needs.

    Returns ``x`` of ``dtype`` on ``device`` (or ``(x, geometry)``).
    """
    if size <= 0 or size % multiple:
        lo = max(multiple, size // multiple * multiple)
        raise ValueError(f"size {size} is not a positive multiple of {multiple} (the backbone's downsampling); "
                         f"use {lo} or {lo + multiple}")
    if fit not in FITS:
        raise ValueError(f"fit must be one of {FITS}; got {fit!r}")
    if not 0.0 <= pad_value <= 1.0:
        raise ValueError(f"pad_value is a gray level in [0, 1] image units; got {pad_value}")
    items = _split_batch(images)
    out, geos = [], []
    for i, img in enumerate(items):
        t = _to_float_chw(img, value_range, i)[None]
        g = ImageGeometry.compute(t.shape[-2], t.shape[-1], size, fit)
        if g.resized != (g.height, g.width):
            t = F.interpolate(t, size=g.resized, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if g.top > 0 or g.left > 0 or g.top + g.resized[0] < size or g.left + g.resized[1] < size:  # pad
            canvas = t.new_full((1, 3, size, size), pad_value)
            canvas[..., g.top:g.top + g.resized[0], g.left:g.left + g.resized[1]] = t
            t = canvas
        else:  # crop (or exact fit)
            t = t[..., -g.top:-g.top + size, -g.left:-g.left + size]
        out.append(t)
        geos.append(g)
    x = torch.cat(out)
    lo, hi = out_range
    x = (x * (hi - lo) + lo).to(device=device, dtype=dtype)
    return (x, Geometry(tuple(geos))) if return_geometry else x


# --------------------------------------------------------------------------- labels and scores
def _canvas_grid(g: ImageGeometry, device) -> torch.Tensor:
    """``grid_sample`` grid (1, H, W, 2) locating each input-image pixel centre on the canvas."""
    rh, rw = g.resized
    ys = ((torch.arange(g.height, device=device, dtype=torch.float32) + 0.5) * (rh / g.height) + g.top) / g.size
    xs = ((torch.arange(g.width, device=device, dtype=torch.float32) + 0.5) * (rw / g.width) + g.left) / g.size
    gy, gx = torch.meshgrid(ys * 2 - 1, xs * 2 - 1, indexing="ij")
    return torch.stack([gx, gy], -1)[None]


def _image_grid(g: ImageGeometry, out: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``grid_sample`` grid (1, h, w, 2) locating each model-grid pixel centre on the input image,
    and the (h, w) mask of grid pixels that fall inside the image (not in the padding)."""
    h, w = out
    rh, rw = g.resized
    ys = ((torch.arange(h, device=device, dtype=torch.float32) + 0.5) * (g.size / h) - g.top) / rh
    xs = ((torch.arange(w, device=device, dtype=torch.float32) + 0.5) * (g.size / w) - g.left) / rw
    inside = ((ys >= 0) & (ys < 1))[:, None] & ((xs >= 0) & (xs < 1))[None, :]
    gy, gx = torch.meshgrid(ys * 2 - 1, xs * 2 - 1, indexing="ij")
    return torch.stack([gx, gy], -1)[None], inside


def restore_labels(
    labels_or_scores: torch.Tensor | np.ndarray,
    geometry: Geometry,
    *,
    mode: str | None = None,
    fill: float | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Model-grid outputs back to each input image's own size, undoing :func:`prepare_images`' placement.

    labels_or_scores: ``(B, h, w)`` integer labels, or ``(B, K, h, w)`` (or ``(B, h, w)`` float)
        scores, covering the model's ``size x size`` canvas at any resolution ``h x w`` (the
        image size, the latent grid, a 16x16 attention grid, ...); ``B == len(geometry)``.
    mode: ``"nearest"`` (default for integer dtypes) or ``"bilinear"`` (default for floats).
    fill: value for input pixels the model never saw (only with ``fit="crop"``: the cut-off sides);
        default 255 (the ignore label) for integer labels, 0 for scores. Padding (``fit="pad"``) is
        simply dropped: every input pixel has a prediction.

    Returns, in the input's dtype and device, a ``(B, [K,] H, W)`` tensor when all images share one
    size, else a list of ``([K,] H_i, W_i)`` tensors (one per image, each at its own size).
    """
    x = torch.as_tensor(labels_or_scores)
    if not isinstance(geometry, Geometry):
        raise TypeError(f"geometry must be the Geometry from prepare_images(..., return_geometry=True) or "
                        f"geometry_of(images, size); got {type(geometry).__name__}")
    if x.ndim not in (3, 4):
        raise ValueError(f"expected (B, h, w) labels or (B, K, h, w) scores; got shape {tuple(x.shape)}")
    if x.shape[0] != len(geometry):
        raise ValueError(f"got {x.shape[0]} maps for a geometry of {len(geometry)} images; pass geometry[a:b] "
                         "for a sub-batch")
    integer = not (x.is_floating_point() or x.is_complex())
    mode = mode or ("nearest" if integer else "bilinear")
    if mode not in ("nearest", "bilinear"):
        raise ValueError(f"mode must be 'nearest' or 'bilinear'; got {mode!r}")
    if integer and mode != "nearest":
        raise ValueError("integer labels can only be restored with mode='nearest' (bilinear would invent "
                         "labels between classes); restore scores with 'bilinear' and take the argmax")
    fill = (255 if integer else 0.0) if fill is None else fill
    src = x if x.ndim == 4 else x[:, None]
    outs = []
    for i, g in enumerate(geometry.images):
        # float32 sampling: exact for integer labels below 2**24, and grid_sample lacks some low-precision kernels
        grid = _canvas_grid(g, x.device)
        o = F.grid_sample(src[i:i + 1].float(), grid, mode=mode, padding_mode="border", align_corners=False)[0]
        if g.fit == "crop":  # input pixels outside the canvas were never seen by the model
            gx, gy = grid[0, ..., 0], grid[0, ..., 1]
            seen = (gx > -1) & (gx < 1) & (gy > -1) & (gy < 1)
            o = torch.where(seen, o, torch.full_like(o, float(fill)))
        o = o.round().to(x.dtype) if integer else o.to(x.dtype)
        outs.append(o if x.ndim == 4 else o[0])
    return torch.stack(outs) if geometry.uniform else outs


def prepare_labels(
    labels: torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray],
    geometry: Geometry,
    size: int | tuple[int, int] | None = None,
    *,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Label maps drawn on the input images -> the model's grid, through the same placement as the images.

    labels: ``(B, H, W)`` integer maps (or a list of ``(H_i, W_i)`` maps when sizes differ), each at
        its image's own size as recorded in ``geometry``.
    size:   the output grid (default: the canvas ``geometry.size``; pass e.g. the features' image size).
    Nearest sampling; canvas pixels in the padding get ``ignore_index``. Returns ``(B, h, w)`` int64
    on the labels' device, ready for :func:`~diffseg_utils.probes.probe_grid` or a pixel classifier.
    """
    items = list(labels) if isinstance(labels, (list, tuple)) else list(torch.as_tensor(labels))
    if len(items) != len(geometry):
        raise ValueError(f"got {len(items)} label maps for a geometry of {len(geometry)} images")
    size = size or geometry.size
    out_hw = (size, size) if isinstance(size, int) else tuple(size)
    outs = []
    for i, (lab, g) in enumerate(zip(items, geometry.images)):
        lab = torch.as_tensor(lab)
        if lab.is_floating_point() or lab.dtype == torch.bool:
            raise TypeError(f"label map {i}: labels must be an integer dtype (class ids); got {lab.dtype}. "
                            "If the values are whole numbers, convert with .astype(np.int64) / .long()")
        if tuple(lab.shape) != g.image_size:
            raise ValueError(f"label map {i} has shape {tuple(lab.shape)} but its image was {g.image_size}; "
                             "label maps must be drawn at their image's own size")
        grid, inside = _image_grid(g, out_hw, lab.device)
        o = F.grid_sample(lab[None, None].float(), grid, mode="nearest", padding_mode="border",
                          align_corners=False)[0, 0].round().long()
        outs.append(torch.where(inside, o, torch.full_like(o, ignore_index)))
    return torch.stack(outs)
