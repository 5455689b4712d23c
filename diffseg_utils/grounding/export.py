"""Export a segmentation dataset (PNG images, PNG index masks, ``classes.json``) and read it back.

This is the generic folder layout :func:`diffseg_utils.datasets.load_dataset` reads, so a
synthesised set (e.g. :meth:`~.shards.GroundingShards.index_masks`) loads back by path.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

def export_segmentation_dataset(out_dir: str | Path, images, index_masks, class_names: Sequence[str]) -> Path:
    """Write an image/label-map dataset: ``images/00000.png``, ``masks/00000.png``, ``classes.json``.

    images:      (N, 3, H, W) or (N, H, W, 3) uint8 (numpy or torch)
    index_masks: (N, H, W) ints, 0 = background, ``k`` = ``class_names[k - 1]``, 255 = ignore;
                 saved as palette PNGs (pixel value = class index, colours only for viewing)
    """
    from PIL import Image

    imgs = np.asarray(images.cpu() if isinstance(images, torch.Tensor) else images)
    labs = np.asarray(index_masks.cpu() if isinstance(index_masks, torch.Tensor) else index_masks)
    if imgs.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {imgs.dtype}; convert [-1, 1] tensors with grounding.shards.to_uint8(...)")
    if imgs.ndim == 4 and imgs.shape[1] == 3 and imgs.shape[-1] != 3:
        imgs = imgs.transpose(0, 2, 3, 1)
    if imgs.ndim != 4 or imgs.shape[-1] != 3:
        raise ValueError(f"images must be (N, 3, H, W) or (N, H, W, 3), got {imgs.shape}")
    if labs.shape != imgs.shape[:3]:
        raise ValueError(f"index_masks {labs.shape} do not match images {imgs.shape[:3]} (N, H, W)")
    k = len(class_names)
    if k > 254:
        raise ValueError(f"{k} classes do not fit an 8-bit PNG with 0 = background and 255 = ignore")
    bad = (labs != 255) & ((labs < 0) | (labs > k))
    if bad.any():
        raise ValueError(f"index_masks hold values {np.unique(labs[bad])[:5]} outside 0..{k} (and 255 = ignore)")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    palette = _palette()
    for i, (img, lab) in enumerate(zip(imgs, labs)):
        Image.fromarray(np.ascontiguousarray(img)).save(out / "images" / f"{i:05d}.png")
        p = Image.fromarray(lab.astype(np.uint8))
        p.putpalette(palette)  # an 8-bit image with a palette becomes mode "P"; values are kept
        p.save(out / "masks" / f"{i:05d}.png")
    (out / "classes.json").write_text(json.dumps(
        {"class_names": list(class_names), "background": 0, "ignore_index": 255,
         "note": "mask pixel k = class_names[k - 1]; 0 = background; 255 = ignore"}, indent=1))
    return out


def _palette() -> list[int]:
    rng = np.random.default_rng(0)
    pal = rng.integers(40, 256, size=(256, 3))
    pal[0], pal[255] = 0, 255
    return pal.astype(np.uint8).ravel().tolist()


def load_segmentation_dataset(root: str | Path):
    """Read :func:`export_segmentation_dataset`'s layout back.

    Returns ``(split, class_names)``: a :class:`~diffseg_utils.datasets.SegmentationSplit`
    (images (N, H, W, 3) uint8, labels (N, H, W) int64, file stems) and the class names
    (label ``k`` = ``class_names[k - 1]``).
    """
    from PIL import Image

    from ..datasets import SegmentationSplit

    root = Path(root)
    if not (root / "classes.json").exists():
        raise FileNotFoundError(f"no classes.json in {root}; expected images/, masks/ and classes.json as written "
                                "by export_segmentation_dataset(...)")
    class_names = json.loads((root / "classes.json").read_text())["class_names"]
    files = sorted((root / "images").glob("*.png"))
    images, labels = [], []
    for f in files:
        mf = root / "masks" / f.name
        if not mf.exists():
            raise FileNotFoundError(f"mask {mf} missing for image {f}")
        images.append(np.asarray(Image.open(f).convert("RGB")))
        labels.append(np.asarray(Image.open(mf)).astype(np.int64))  # palette/L PNG: pixel = class index
    if not images:
        return SegmentationSplit(np.zeros((0, 0, 0, 3), np.uint8), np.zeros((0, 0, 0), np.int64), []), class_names
    return SegmentationSplit(np.stack(images), np.stack(labels), [f.stem for f in files]), class_names
