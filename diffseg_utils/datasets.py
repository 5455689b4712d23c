"""Few-shot segmentation datasets in DDPM-Seg's release layout, and the paper's settings.

Layout (as in yandex-research/ddpm-segmentation's released datasets)::

    <root>/real/train/<name>.png|jpg   <root>/real/train/<name>.npy   (H x W int label map)
    <root>/real/test/...

``load_split(root, "train")`` returns images and labels; ``DDPMSEG_DATASETS`` holds each
dataset's classes, train/test sizes, blocks and timesteps so the paper's runs can be written
as they are. The toy set ships in ``data/toy-fewshot`` in the same layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .registry import DATA_DIR

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class DatasetConfig:
    """One DDPM-Seg dataset: what the paper trained and evaluated (METHODS.md section 1)."""

    name: str
    num_classes: int
    train_images: int
    test_images: int
    backbone: str                   # registry name of the closest diffusers checkpoint
    blocks: tuple[int, ...] = (5, 6, 7, 8, 12)   # ADM output_blocks
    timesteps: tuple[int, ...] = (50, 150, 250)
    ignore_index: int = 255
    note: str = ""


DDPMSEG_DATASETS: dict[str, DatasetConfig] = {
    "bedroom_28": DatasetConfig("bedroom_28", 28, 40, 20, "ddpm-bedroom"),
    "ffhq_34": DatasetConfig("ffhq_34", 34, 20, 20, "ddpm-celebahq",
                             note="paper uses an ADM trained on FFHQ-256; no diffusers port, CelebA-HQ is nearest"),
    "cat_15": DatasetConfig("cat_15", 15, 30, 20, "ddpm-cat"),
    "horse_21": DatasetConfig("horse_21", 21, 30, 30, "ddpm-church",
                              note="paper uses an ADM trained on LSUN-Horse; no diffusers port"),
    "celeba_19": DatasetConfig("celeba_19", 19, 20, 500, "ddpm-celebahq"),
    "ade_bedroom_30": DatasetConfig("ade_bedroom_30", 30, 50, 650, "ddpm-bedroom"),
    "toy": DatasetConfig("toy", 11, 20, 20, "toy", blocks=(), timesteps=(),
                         note="the shipped toy set; blocks/timesteps come from notebook 01"),
}

TOY_FEWSHOT_DIR = DATA_DIR / "toy-fewshot"


@dataclass
class SegmentationSplit:
    """Images ``(N, H, W, 3)`` uint8 and labels ``(N, H, W)`` int64 of one split, with file names."""

    images: np.ndarray
    labels: np.ndarray
    names: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)


def load_split(root: str | Path, split: str = "train", limit: int | None = None,
               num_classes: int | None = None, ignore_index: int = 255) -> SegmentationSplit:
    """Read ``<root>/real/<split>`` (or ``<root>/<split>``): image files with same-stem ``.npy`` labels.

    Checks every label map against its image size and, given ``num_classes``, its value range.
    """
    from PIL import Image

    root = Path(root)
    d = root / "real" / split if (root / "real" / split).is_dir() else root / split
    if not d.is_dir():
        raise FileNotFoundError(f"no split folder {root}/real/{split} (or {root}/{split}); expected DDPM-Seg's layout "
                                f"<root>/real/{{train,test}}/<name>.png + <name>.npy")
    files = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"{d} holds no {IMAGE_SUFFIXES} images")
    files = files[:limit] if limit else files
    images, labels = [], []
    for f in files:
        lab_path = f.with_suffix(".npy")
        if not lab_path.exists():
            raise FileNotFoundError(f"label map {lab_path.name} missing for image {f.name} in {d}")
        img = np.asarray(Image.open(f).convert("RGB"))
        lab = np.load(lab_path).astype(np.int64)
        if lab.shape != img.shape[:2]:
            raise ValueError(f"{lab_path.name}: label map is {lab.shape} but image is {img.shape[:2]}")
        if num_classes is not None:
            bad = (lab != ignore_index) & ((lab < 0) | (lab >= num_classes))
            if bad.any():
                raise ValueError(f"{lab_path.name}: labels {np.unique(lab[bad])[:5]} outside 0..{num_classes - 1} "
                                 f"(ignore_index={ignore_index})")
        images.append(img)
        labels.append(lab)
    if len({i.shape for i in images}) > 1:
        raise ValueError(f"images in {d} differ in size; resize them to one size first")
    return SegmentationSplit(np.stack(images), np.stack(labels), [f.stem for f in files])


def write_split(root: str | Path, split: str, images: np.ndarray, labels: np.ndarray, prefix: str = "") -> Path:
    """Write images (PNG) and labels (.npy, uint8) in DDPM-Seg's layout."""
    from PIL import Image

    d = Path(root) / "real" / split
    d.mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(np.asarray(img, np.uint8)).save(d / f"{prefix}{i:04d}.png")
        np.save(d / f"{prefix}{i:04d}.npy", np.asarray(lab, np.uint8))
    return d


def ignore_small_classes(labels: np.ndarray, min_pixels: int = 20, ignore_index: int = 255) -> np.ndarray:
    """DDPM-Seg's rule: a class with fewer than ``min_pixels`` pixels in an image becomes ``ignore_index``."""
    out = np.array(labels, copy=True)
    for i in range(out.shape[0]):
        vals, counts = np.unique(out[i], return_counts=True)
        for v, c in zip(vals, counts):
            if v != ignore_index and c < min_pixels:
                out[i][out[i] == v] = ignore_index
    return out
