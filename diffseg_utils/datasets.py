"""Segmentation datasets behind one call: ``load_dataset(name_or_path, split=...)``.

>>> ds = load_dataset("toy-shapes", split="train")          # procedural, rendered on access
>>> ds.class_names, ds.num_classes, ds.ignore_index, ds.image_size
>>> train = ds.take(20)                                      # images (20, H, W, 3) uint8, labels (20, H, W) int64
>>> test = load_dataset("bedroom_28", split="test")          # DDPM-Seg's release, from a local folder
>>> mine = load_dataset("results/grounding/export")          # images/ + masks/ + classes.json
>>> photos = load_dataset(["a.jpg", "b.png"])                # images only (labels None)

What a name or path can be (:func:`list_datasets` lists the names):

* ``"toy-shapes"`` (alias ``"toy"``) and ``"toy-faces"``: the procedural worlds
  (:mod:`diffseg_utils.toy.world`, :mod:`diffseg_utils.toy.faces`), deterministic and lazy.
  Splits: ``"train"`` = ``fewshot_train`` images 0, 1, ...; ``"test"`` = ``fewshot_test`` images
  0 .. 9 999; ``"validation"`` (``"val"``) = ``fewshot_test`` images from :data:`VALIDATION_START`
  on (disjoint from the test images; what picks blocks, timesteps and other settings). Any of the
  worlds' own split names (``"eval"``, ``"grounding_test"``, ...) also works, from index 0.
* DDPM-Seg's six released datasets by name (:data:`DDPMSEG_DATASETS`: ``bedroom_28``,
  ``ffhq_34``, ``cat_15``, ``horse_21``, ``celeba_19``, ``ade_bedroom_30``; ``"Bedroom-28"`` works
  too), read from ``<root>/<name>/real/{train,test}/`` where ``root`` is the ``root=`` argument, else
  the ``$DDPMSEG_DATASETS`` environment variable, else ``data/ddpm-segmentation/``. Class counts,
  ignore labels, class names and the number of images per split are the official ones
  (``experiments/<name>/ddpm.json`` and ``src/data_util.py`` of yandex-research/ddpm-segmentation).
* A folder in one of these layouts (checked in this order):

  - **generic** (what :func:`diffseg_utils.grounding.export.export_segmentation_dataset` writes):
    ``images/<stem>.png|jpg``, ``masks/<stem>.png`` (8-bit index PNG: pixel value = class index;
    palette colours are only for viewing) or ``masks/<stem>.npy``, and ``classes.json`` with
    ``{"class_names": [...], "background": 0, "ignore_index": 255}``: with ``"background": 0``
    (the export's convention, and the default) mask value 0 is background and ``k`` is
    ``class_names[k - 1]``; with ``"background": null`` value ``k`` is ``class_names[k]``.
    ``ignore_index`` may be ``null``. With ``split=...``, ``<root>/<split>/`` holds the layout
    (``classes.json`` there or in ``<root>``);
  - **DDPM-Seg release**: ``<root>/real/<split>/`` (or ``<root>/<split>/``) with image files and
    same-stem ``.npy`` label maps. A folder named after a DDPM-Seg dataset gets its official
    classes; another needs a ``classes.json`` beside ``real/`` or ``class_names=``;
  - **images only**: a folder of image files (or ``<root>/images/``) with no masks; labels are
    ``None`` (for the training-free methods). A list of image files works the same way.

Loading never executes code from a file: ``.npy`` files are read with ``allow_pickle=False``,
``classes.json`` with :mod:`json`, images with PIL. Every label map is checked against its image's
size and against the class range (``0 .. num_classes - 1`` or ``ignore_index``).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .inputs import geometry_of, prepare_images, prepare_labels
from .registry import DATA_DIR

__all__ = ["DATASETS", "DATASET_ALIASES", "DDPMSEG_DATASETS", "DDPMSEG_DOWNLOAD_URL", "DDPMSEG_ENV", "DatasetConfig",
           "FileDataset", "IMAGE_SUFFIXES", "PROCEDURAL_SPLIT_SIZE", "ProceduralDataset", "Sample",
           "SegmentationDataset", "SegmentationSplit", "TOY_FEWSHOT_DIR", "VALIDATION_START", "ignore_small_classes",
           "MIN_CLASS_FRACTION",
           "list_datasets", "load_dataset", "load_split", "write_split"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

# ------------------------------------------------------------------------------ DDPM-Seg configs
DDPMSEG_REPO = "https://github.com/yandex-research/ddpm-segmentation"
DDPMSEG_DOWNLOAD_URL = "https://storage.yandexcloud.net/yandex-research/ddpm-segmentation/datasets.tar.gz"
"""The official release of the six datasets (~47 MB; the repo's ``datasets/download_datasets.sh``)."""
DDPMSEG_ENV = "DDPMSEG_DATASETS"
"""Environment variable naming the folder that holds ``<name>/real/{train,test}`` (the extracted release)."""
DDPMSEG_DEFAULT_ROOT = DATA_DIR / "ddpm-segmentation"


@dataclass(frozen=True)
class DatasetConfig:
    """One DDPM-Seg dataset as the official code runs it (``experiments/<name>/ddpm.json``).

    ``num_classes`` is the classifier's output count (``number_class``), ``ignore_index`` the label
    skipped in training and in mIoU (``ignore_label``); the name's number counts the classes that
    are scored (Bedroom-28: 29 outputs, class 0 = background is the ignore label).
    ``train_images`` / ``test_images``: the first that many sorted files of ``real/train`` and
    ``real/test`` (``training_number`` / ``testing_number``). ``image_size``: the side the official
    code resizes images (bilinear) and labels (nearest) to (``dim[0]``). ``class_names``: index ->
    name (``src/data_util.py``). ``checkpoint``: the official ADM checkpoint (``model_path``);
    ``backbone``: the registry name of the closest diffusers checkpoint.
    """

    name: str
    num_classes: int
    train_images: int
    test_images: int
    backbone: str
    blocks: tuple[int, ...] = (5, 6, 7, 8, 12)   # ADM output_blocks
    timesteps: tuple[int, ...] = (50, 150, 250)
    ignore_index: int = 255
    note: str = ""
    class_names: tuple[str, ...] = ()
    image_size: int = 256
    checkpoint: str = ""

    def __post_init__(self) -> None:
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")


# Class names as the official src/data_util.py lists them (spelling kept, so per-class results line up).
_BEDROOM_CLASSES = (
    "background", "bed", "bed***footboard", "bed***headboard", "bed***side rail", "carpet", "ceiling",
    "chandelier / ceiling fan blade", "curtain", "cushion", "floor", "table/nightstand/dresser",
    "table/nightstand/dresser***top", "picture / mirrow", "pillow", "lamp***column", "lamp***shade", "wall",
    "window", "curtain rod", "window***frame", "chair", "picture / mirror***frame", "plinth",
    "door / door frame", "pouf", "wardrobe", "plant", "table staff",
)
_FFHQ_CLASSES = ("background", "head") + tuple("head***" + p for p in (
    "cheek", "chin", "ear", "ear***helix", "ear***lobule", "eye***bottom lid", "eye***eyelashes", "eye***iris",
    "eye***pupil", "eye***sclera", "eye***tear duct", "eye***top lid", "eyebrow", "forehead", "frown", "hair",
    "hair***sideburns", "jaw", "moustache", "mouth***inferior lip", "mouth***oral commissure",
    "mouth***superior lip", "mouth***teeth", "neck", "nose", "nose***ala of nose", "nose***bridge",
    "nose***nose tip", "nose***nostril", "philtrum", "temple", "wrinkles"))
_CAT_CLASSES = ("background", "back", "belly", "chest", "leg", "paw", "head", "ear", "eye", "mouth", "tongue",
                "nose", "tail", "whiskers", "neck")
_HORSE_CLASSES = ("background", "person", "back", "barrel", "bridle", "chest", "ear", "eye", "forelock", "head",
                  "hoof", "leg", "mane", "muzzle", "neck", "nostril", "tail", "thigh", "saddle", "shoulder",
                  "leg protection")
_CELEBA_CLASSES = ("background", "cloth", "ear_r", "eye_g", "hair", "hat", "l_brow", "l_ear", "l_eye", "l_lip",
                   "mouth", "neck", "neck_l", "nose", "r_brow", "r_ear", "r_eye", "skin", "u_lip")
# ADE-Bedroom-30 has no background class: label 0 is "wall" (the first 30 of the official 50).
_ADE_BEDROOM_CLASSES = ("wall", "bed", "floor", "table", "lamp", "ceiling", "painting", "windowpane", "pillow",
                        "curtain", "cushion", "door", "chair", "cabinet", "chest", "mirror", "rug", "armchair",
                        "book", "sconce", "plant", "wardrobe", "clock", "light", "flower", "vase", "fan", "box",
                        "shelf", "television")

# Values from yandex-research/ddpm-segmentation, experiments/<name>/ddpm.json (number_class, ignore_label,
# training_number, testing_number, dim, steps, blocks, model_path) and src/data_util.py (class names).
DDPMSEG_DATASETS: dict[str, DatasetConfig] = {
    # experiments/bedroom_28/ddpm.json: 29 classes, ignore_label 0 (background), 40 / 20 images
    "bedroom_28": DatasetConfig("bedroom_28", 29, 40, 20, "ddpm-bedroom", ignore_index=0,
                                class_names=_BEDROOM_CLASSES, checkpoint="lsun_bedroom.pt",
                                note="class 0 (background) is the ignore label: 28 classes are scored"),
    # experiments/ffhq_34/ddpm.json: 34 classes, ignore_label 255, 20 / 20 images
    "ffhq_34": DatasetConfig("ffhq_34", 34, 20, 20, "ddpm-celebahq", class_names=_FFHQ_CLASSES,
                             checkpoint="ffhq.pt",
                             note="paper uses an ADM trained on FFHQ-256; no diffusers port, CelebA-HQ is nearest"),
    # experiments/cat_15/ddpm.json: 15 classes, ignore_label 255, 30 / 20 images
    "cat_15": DatasetConfig("cat_15", 15, 30, 20, "ddpm-cat", class_names=_CAT_CLASSES, checkpoint="lsun_cat.pt"),
    # experiments/horse_21/ddpm.json: 21 classes, ignore_label 255, 30 / 30 images
    "horse_21": DatasetConfig("horse_21", 21, 30, 30, "ddpm-church", class_names=_HORSE_CLASSES,
                              checkpoint="lsun_horse.pt",
                              note="paper uses an ADM trained on LSUN-Horse; no diffusers port"),
    # experiments/celeba_19/ddpm.json: 19 classes, ignore_label 255, 20 / 500 images, the FFHQ model
    "celeba_19": DatasetConfig("celeba_19", 19, 20, 500, "ddpm-celebahq", class_names=_CELEBA_CLASSES,
                               checkpoint="ffhq.pt", note="official runs use the FFHQ-256 ADM"),
    # experiments/ade_bedroom_30/ddpm.json: 30 classes, ignore_label 255, 50 / 650 images
    "ade_bedroom_30": DatasetConfig("ade_bedroom_30", 30, 50, 650, "ddpm-bedroom", class_names=_ADE_BEDROOM_CLASSES,
                                    checkpoint="lsun_bedroom.pt", note="no background class: label 0 is 'wall'"),
}

TOY_FEWSHOT_DIR = DATA_DIR / "toy-fewshot"
"""The toy shapes world's first 20 ``fewshot_train`` / ``fewshot_test`` images in DDPM-Seg's release layout."""

# ------------------------------------------------------------------------------ procedural splits
VALIDATION_START = 10_000
"""Validation images of the procedural worlds are ``fewshot_test`` images from this index on
(as :data:`diffseg_utils.toy.quality.VAL_START`); test images are ``fewshot_test`` 0 .. 9 999."""
PROCEDURAL_SPLIT_SIZE = 10_000
"""Default length of a procedural split (the test split may not be longer: it would reach the validation images)."""
_PROCEDURAL_SPLITS = {"train": ("fewshot_train", 0), "test": ("fewshot_test", 0),
                      "validation": ("fewshot_test", VALIDATION_START), "val": ("fewshot_test", VALIDATION_START)}


@dataclass(frozen=True)
class DatasetEntry:
    """A named dataset: ``kind`` is "procedural" (rendered) or "ddpm-seg" (a local folder in the release layout);
    a procedural one names the module (``provider``) whose ``renderer(key, size, max_objects)`` draws it."""

    kind: str
    description: str
    provider: str | None = None


DATASETS: dict[str, DatasetEntry] = {
    "toy-shapes": DatasetEntry("procedural", "the toy shapes world: 10 shape classes + background, 64 px",
                               "diffseg_utils.toy.procedural"),
    "toy-faces": DatasetEntry("procedural", "the toy faces world: 10 face parts + background, 64 px",
                              "diffseg_utils.toy.procedural"),
    **{k: DatasetEntry("ddpm-seg", f"DDPM-Seg's {k} ({c.num_classes} classes, ignore label {c.ignore_index}, "
                                   f"{c.train_images} train / {c.test_images} test images)")
       for k, c in DDPMSEG_DATASETS.items()},
}
DATASET_ALIASES = {"toy": "toy-shapes"}


def list_datasets() -> dict[str, str]:
    """Name -> one-line description, for every named dataset (aliases: :data:`DATASET_ALIASES`)."""
    return {k: v.description for k, v in DATASETS.items()}


def _canonical_name(name: str) -> str | None:
    """The registered name for ``name`` ("toy" -> "toy-shapes", "Bedroom-28" -> "bedroom_28"), or None."""
    if name in DATASETS:
        return name
    if name in DATASET_ALIASES:
        return DATASET_ALIASES[name]
    norm = name.lower().replace("-", "_")
    for k in DATASETS:
        if k.replace("-", "_") == norm:
            return k
    return DATASET_ALIASES.get(name.lower())


# ------------------------------------------------------------------------------ containers
@dataclass
class Sample:
    """One item of a dataset: ``image`` (H, W, 3) uint8, ``label`` (H, W) int64 or None, ``name``."""

    image: np.ndarray
    label: np.ndarray | None
    name: str


@dataclass
class SegmentationSplit:
    """Images and label maps of several items, as arrays.

    images: (N, H, W, 3) uint8 (a list of (H_i, W_i, 3) arrays when sizes differ)
    labels: (N, H, W) int64 (a list when sizes differ), or None for an images-only dataset
    names:  per item, the file stem (files) or ``"<world split>/<index>"`` (procedural)
    """

    images: Any
    labels: Any
    names: list[str] = field(default_factory=list)
    class_names: tuple[str, ...] | None = None
    ignore_index: int | None = None

    def __len__(self) -> int:
        return len(self.images)

    def tensors(self, device=None):
        """``(images, labels)`` as torch tensors: images (N, 3, H, W) uint8 (torch's channels-first
        layout, which :func:`~diffseg_utils.inputs.prepare_images` reads), labels (N, H, W) int64 or None."""
        import torch

        if isinstance(self.images, list):
            raise ValueError("the images differ in size, so they do not stack into one tensor; load the dataset "
                             "with size=... to resize them, or use the list in .images")
        x = torch.from_numpy(np.ascontiguousarray(self.images)).permute(0, 3, 1, 2).to(device)
        y = None if self.labels is None else torch.from_numpy(np.asarray(self.labels, np.int64)).to(device)
        return x, y


def _stack(arrays: list[np.ndarray], dtype) -> Any:
    if not arrays:
        return np.zeros((0, 0, 0, 3) if dtype == np.uint8 else (0, 0, 0), dtype)
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays).astype(dtype, copy=False)
    return [a.astype(dtype, copy=False) for a in arrays]


class SegmentationDataset:
    """A dataset of images with (optional) label maps; items are read or rendered on access.

    Attributes: ``name``, ``split``, ``class_names`` (label ``k`` = ``class_names[k]``; None for
    images only), ``num_classes``, ``ignore_index`` (a label value that is not a class, or None),
    ``image_size`` ((H, W) shared by every image, or None when sizes differ or are unknown),
    ``config`` (the :class:`DatasetConfig` of a DDPM-Seg dataset, else None), ``source``.

    ``ds[i]`` is a :class:`Sample`; ``ds[a:b]`` and ``ds.take(n, start)`` a :class:`SegmentationSplit`
    (arrays; ``.tensors()`` for torch); ``len(ds)``; iteration yields samples.
    """

    def __init__(self, name: str, split: str | None, length: int, class_names: Sequence[str] | None,
                 ignore_index: int | None, image_size: tuple[int, int] | None, source: str,
                 config: DatasetConfig | None = None):
        self.name, self.split, self._len = name, split, int(length)
        self.class_names = tuple(class_names) if class_names is not None else None
        self.ignore_index, self.image_size, self.source, self.config = ignore_index, image_size, source, config

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None

    @property
    def has_labels(self) -> bool:
        return self.class_names is not None

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        cls = f"{self.num_classes} classes" if self.has_labels else "images only"
        return (f"{type(self).__name__}({self.name!r}, split={self.split!r}, {len(self)} images, {cls}, "
                f"ignore_index={self.ignore_index}, image_size={self.image_size})")

    def _read(self, indices: list[int]) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[str]]:
        raise NotImplementedError

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._split(list(range(*i.indices(len(self)))))
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"index a dataset with an int or a slice, got {type(i).__name__}")
        j = int(i) + len(self) if i < 0 else int(i)
        if not 0 <= j < len(self):
            raise IndexError(f"index {i} out of range for a dataset of {len(self)} images")
        imgs, labs, names = self._read([j])
        return Sample(imgs[0], None if labs is None else labs[0], names[0])

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def take(self, n: int | None = None, start: int = 0) -> SegmentationSplit:
        """Items ``start .. start + n - 1`` (all from ``start`` when n is None) as arrays."""
        if start < 0 or (n is not None and n < 0):
            raise ValueError(f"start and n must be >= 0, got start={start}, n={n}")
        stop = len(self) if n is None else start + n
        if stop > len(self):
            raise ValueError(f"asked for items {start}..{stop - 1} but {self.name!r} split {self.split!r} "
                             f"has {len(self)} images")
        return self._split(list(range(start, stop)))

    def _split(self, indices: list[int]) -> SegmentationSplit:
        imgs, labs, names = self._read(indices)
        return SegmentationSplit(_stack(imgs, np.uint8), None if labs is None else _stack(labs, np.int64), names,
                                 self.class_names, self.ignore_index)


class ProceduralDataset(SegmentationDataset):
    """A procedural world's split: item ``i`` is image ``start + i`` of the world split ``world_split``,
    rendered on access by ``render(world_split, start, count)`` -> (images, labels). Deterministic."""

    def __init__(self, name: str, split: str, render: Callable, world_split: str, start: int, length: int,
                 class_names: Sequence[str], size: int):
        super().__init__(name, split, length, class_names, None, (size, size), f"procedural:{world_split}[{start}:]")
        self._render, self.world_split, self.start = render, world_split, start

    def _read(self, indices):
        if not indices:
            return [], [], []
        runs, run = [], [indices[0]]  # render contiguous runs in one vectorised call
        for i in indices[1:]:
            if i == run[-1] + 1:
                run.append(i)
            else:
                runs.append(run)
                run = [i]
        runs.append(run)
        imgs, labs = [], []
        for r in runs:
            b = self._render(self.world_split, self.start + r[0], len(r))
            imgs.extend(b.images)
            labs.extend(lab.astype(np.int64) for lab in b.labels)
        return imgs, labs, [f"{self.world_split}/{self.start + i}" for i in indices]


def _read_label(path: Path) -> np.ndarray:
    """A label map from ``.npy`` (never unpickled) or an index PNG, as stored."""
    from PIL import Image

    if path.suffix.lower() == ".npy":
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as e:  # object arrays would need unpickling: refused, nothing is run
            raise ValueError(f"{path}: cannot be read without unpickling ({e}); save label maps as plain "
                             "integer arrays (np.save(path, labels.astype(np.uint8)))") from None
    with Image.open(path) as im:
        if im.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L", "1"):
            raise ValueError(f"{path.name}: mask PNG has mode {im.mode}; expected an index PNG (mode P or L, "
                             "pixel value = class index), not a colour mask")
        return np.asarray(im)


def _check_label(lab: np.ndarray, path: Path, image_hw: tuple[int, int], num_classes: int | None,
                 ignore_index: int | None) -> np.ndarray:
    """``lab`` as int64 after checking dtype, shape against the image's (H, W), and values against
    ``0 .. num_classes - 1`` or ``ignore_index`` (no range check when num_classes is None)."""
    if lab.dtype.kind == "f":
        if not np.all(np.isfinite(lab)) or not np.all(lab == np.round(lab)):
            raise ValueError(f"{path.name}: label map holds non-integer values (dtype {lab.dtype}); a label map "
                             "holds class indices")
    elif lab.dtype.kind not in "iub":
        raise ValueError(f"{path.name}: label map has dtype {lab.dtype}; expected integer class indices")
    if lab.ndim != 2:
        raise ValueError(f"{path.name}: label map has shape {lab.shape}; expected (H, W) class indices "
                         "(an RGB colour mask must be converted to indices first)")
    if lab.shape != image_hw:
        raise ValueError(f"{path.name}: label map is {lab.shape} but its image is {image_hw} (H, W): "
                         "image and mask sizes mismatch")
    lab = lab.astype(np.int64)
    if num_classes is not None:
        bad = (lab < 0) | (lab >= num_classes)
        if ignore_index is not None:
            bad &= lab != ignore_index
        if bad.any():
            raise ValueError(f"{path.name}: labels {np.unique(lab[bad])[:5].tolist()} outside 0..{num_classes - 1} "
                             f"(ignore_index={ignore_index}); check the class list (classes.json / class_names=) "
                             "or map these values to the ignore index")
    return lab


class FileDataset(SegmentationDataset):
    """Image files with optional same-stem label files (``.npy`` or index ``.png``), read on access.

    ``size`` resizes every square image (bilinear, as the official DDPM-Seg transform) and label map
    (nearest) to ``size x size``; a non-square one is letterboxed exactly as
    :func:`~diffseg_utils.inputs.prepare_images` places it for a model (longer side to ``size``, centred,
    mid-gray border) and its labels through :func:`~diffseg_utils.inputs.prepare_labels` (the border gets
    the ignore label, 255 when the dataset has none, so it is never trained on nor scored). None keeps each
    file's own size.
    """

    def __init__(self, name: str, split: str | None, image_files: Sequence[Path], label_files: Sequence[Path] | None,
                 class_names: Sequence[str] | None, ignore_index: int | None, source: str, *,
                 size: int | None = None, config: DatasetConfig | None = None, validate: bool = True):
        from PIL import Image

        self.image_files = [Path(p) for p in image_files]
        self.label_files = None if label_files is None else [Path(p) for p in label_files]
        if self.label_files is not None and len(self.label_files) != len(self.image_files):
            raise ValueError(f"{len(self.image_files)} images but {len(self.label_files)} label maps in {source}")
        if (self.label_files is None) != (class_names is None):
            raise ValueError("label maps and class names come together: give both or neither")
        self._size = size
        self._hw = []  # (H, W) of each file; PIL reads only the header here
        for f in self.image_files:
            try:
                with Image.open(f) as im:
                    self._hw.append((im.height, im.width))
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read image {f}: {e}") from None
        sizes = set(self._hw)
        native = next(iter(sizes)) if len(sizes) == 1 else None
        if size is not None:
            native = (size, size)
        super().__init__(name, split, len(self.image_files), class_names, ignore_index, native, source, config)
        if validate and self.label_files is not None:  # every label map once: sizes and value ranges
            for lf, hw in zip(self.label_files, self._hw):
                _check_label(_read_label(lf), lf, hw, self.num_classes, self.ignore_index)

    def _read(self, indices):
        from PIL import Image

        imgs, labs = [], [] if self.label_files is not None else None
        for i in indices:
            with Image.open(self.image_files[i]) as im:
                im = im.convert("RGB")
                hw = (im.height, im.width)
                letterbox = self._size is not None and hw[0] != hw[1]
                if letterbox:  # as prepare_images places it for a model: nothing cropped, nothing stretched
                    x = prepare_images(np.asarray(im, np.uint8), self._size, multiple=1, out_range=(0.0, 255.0))
                    imgs.append(x[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy())
                else:
                    if self._size is not None and hw != (self._size, self._size):
                        im = im.resize((self._size, self._size), Image.BILINEAR)
                    imgs.append(np.asarray(im, np.uint8))
            if labs is not None:
                lab = _check_label(_read_label(self.label_files[i]), self.label_files[i], hw, self.num_classes,
                                   self.ignore_index)
                if letterbox:
                    geo = geometry_of(np.zeros((*hw, 3), np.uint8), self._size)
                    ignore = self.ignore_index if self.ignore_index is not None else 255
                    lab = prepare_labels(lab[None], geo, ignore_index=ignore)[0].numpy()
                elif self._size is not None and hw != (self._size, self._size):
                    lab = np.asarray(Image.fromarray(lab.astype(np.int32)).resize((self._size, self._size),
                                                                                  Image.NEAREST)).astype(np.int64)
                labs.append(lab)
        return imgs, labs, [self.image_files[i].stem for i in indices]


# ------------------------------------------------------------------------------ load_dataset
def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _read_classes_json(path: Path) -> tuple[tuple[str, ...], int | None]:
    """``(class names by label value, ignore_index)`` from a classes.json (see the module docstring)."""
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("class_names"), list):
        raise ValueError(f"{path} must hold an object with a 'class_names' list (and optionally 'background': 0 "
                         "or null, 'ignore_index': int or null)")
    names = tuple(str(c) for c in meta["class_names"])
    background = meta.get("background", 0)
    if background not in (0, None):
        raise ValueError(f"{path}: 'background' must be 0 (value 0 = background, k = class_names[k - 1]) or null "
                         f"(k = class_names[k]); got {background!r}")
    ignore = meta.get("ignore_index", 255)
    if ignore is not None and not isinstance(ignore, int):
        raise ValueError(f"{path}: 'ignore_index' must be an integer or null, got {ignore!r}")
    return (("background",) + names if background == 0 else names), ignore


def _pair_masks(images: list[Path], mask_dir: Path) -> list[Path]:
    """The mask of each image (same stem, .png or .npy); counts must agree."""
    masks = {}
    for p in mask_dir.iterdir():
        if p.suffix.lower() in (".png", ".npy"):
            if p.stem in masks:
                raise ValueError(f"{mask_dir} holds two masks for {p.stem!r} ({masks[p.stem].name}, {p.name}); keep one")
            masks[p.stem] = p
    missing = [f.name for f in images if f.stem not in masks]
    extra = sorted(set(masks) - {f.stem for f in images})
    if missing or extra:
        raise ValueError(f"mismatched images and masks: {len(images)} images, {len(masks)} masks in {mask_dir}; "
                         f"images without a mask: {missing[:5]}, masks without an image: {extra[:5]}")
    return [masks[f.stem] for f in images]


def _pair_npy(images: list[Path], d: Path) -> list[Path]:
    npys = {p.stem: p for p in d.iterdir() if p.suffix.lower() == ".npy"}
    missing = [f.with_suffix(".npy").name for f in images if f.stem not in npys]
    extra = sorted(set(npys) - {f.stem for f in images})
    if missing or extra:
        raise ValueError(f"mismatched images and label maps in {d}: {len(images)} images, {len(npys)} .npy files; "
                         f"label maps missing: {missing[:5]}, label maps without an image: {extra[:5]}")
    return [npys[f.stem] for f in images]


def _ddpmseg_root(root: str | Path | None) -> Path:
    if root is not None:
        return Path(root)
    return Path(os.environ[DDPMSEG_ENV]) if os.environ.get(DDPMSEG_ENV) else DDPMSEG_DEFAULT_ROOT


def _release_dir(root: Path, split: str) -> Path | None:
    for d in (root / "real" / split, root / split):
        if d.is_dir():
            return d
    return None


def _load_ddpmseg(cfg: DatasetConfig, folder: Path, split: str, num_images: int | None, size: int | None,
                  validate: bool, how_found: str) -> FileDataset:
    if split not in ("train", "test"):
        raise ValueError(f"{cfg.name} has splits 'train' and 'test' (the release has no validation split: "
                         f"hold out some train images, e.g. ds[:{cfg.train_images - 10}] / ds[{cfg.train_images - 10}:]); "
                         f"got {split!r}")
    d = _release_dir(folder, split)
    if d is None:
        raise FileNotFoundError(f"{folder}/real/{split} does not exist ({how_found})")
    files = _images_in(d)
    official = cfg.train_images if split == "train" else cfg.test_images
    n = official if num_images is None else num_images
    if len(files) < n:
        raise ValueError(f"{d} holds {len(files)} images; {cfg.name}'s {split} split has {official} in the official "
                         f"release{'' if num_images is None else f' and {n} were asked for'}; re-extract "
                         f"{DDPMSEG_DOWNLOAD_URL} or pass num_images=<= {len(files)}")
    labels = _pair_npy(files, d)[:n]
    files = files[:n]  # as the official loader: the first n sorted files
    return FileDataset(cfg.name, split, files, labels, cfg.class_names, cfg.ignore_index, str(d),
                       size=size, config=cfg, validate=validate)


def _missing_ddpmseg(cfg: DatasetConfig, root: Path, explicit: bool) -> FileNotFoundError:
    where = "root=" if explicit else (f"${DDPMSEG_ENV}" if os.environ.get(DDPMSEG_ENV) else "the default folder")
    return FileNotFoundError(
        f"DDPM-Seg dataset {cfg.name!r} not found: no {root / cfg.name / 'real'} (looked in {root}, from {where}). "
        f"Get it: download {DDPMSEG_DOWNLOAD_URL} (~47 MB, the official release; {DDPMSEG_REPO} "
        f"datasets/download_datasets.sh) and extract it with `tar -xzf datasets.tar.gz -C {root}` so that "
        f"{root / cfg.name / 'real' / 'train'} exists; or extract it elsewhere and set {DDPMSEG_ENV}=<that folder> "
        f"or pass root=<that folder>.")


def load_dataset(name_or_path: str | os.PathLike | Sequence[str | os.PathLike], split: str | None = None, *,
                 size: int | None = None, num_images: int | None = None, root: str | os.PathLike | None = None,
                 class_names: Sequence[str] | None = None, ignore_index: int | None = None,
                 max_objects: int | None = None, validate: bool = True) -> SegmentationDataset:
    """A dataset by registered name (:func:`list_datasets`), folder path, or list of image files.

    split: procedural worlds "train" (default), "test", "validation"/"val" (or a world split name);
        DDPM-Seg datasets "train" (default) or "test"; folders None (the folder itself) or a sub-folder.
    size: procedural worlds render at ``size`` (default 64); file datasets resize images (bilinear) and
        label maps (nearest) to ``size x size`` (default: keep each file's size).
    num_images: length of a procedural split (default :data:`PROCEDURAL_SPLIT_SIZE`), or how many of a
        DDPM-Seg split's sorted files to use (default: the official count).
    root: the folder holding DDPM-Seg's extracted release (default ``$DDPMSEG_DATASETS``, else
        ``data/ddpm-segmentation``).
    class_names / ignore_index: for a release-layout folder that is neither a DDPM-Seg name nor
        holds a ``classes.json`` (label ``k`` = ``class_names[k]``).
    max_objects: toy-shapes only, 1..3 objects per scene (default 3).
    validate: read every label map once at load time and check sizes and value ranges (file datasets);
        with False the checks run when an item is read.

    Returns a :class:`SegmentationDataset`. Raises ValueError / FileNotFoundError naming the problem.
    """
    if isinstance(name_or_path, (list, tuple)):
        return _images_only([Path(p) for p in name_or_path], "files", split, size)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a dataset name, a folder, or a list of image files; "
                        f"got {type(name_or_path).__name__}")
    key = _canonical_name(str(name_or_path)) if isinstance(name_or_path, str) else None
    if key is not None:
        if (class_names is not None or ignore_index is not None):
            raise ValueError(f"{key!r} defines its own classes and ignore index; class_names= / ignore_index= "
                             "are for folders without a classes.json")
        if DATASETS[key].kind == "procedural":
            return _procedural(key, split, size, num_images, max_objects)
        if max_objects is not None:
            raise ValueError("max_objects is a toy-shapes option")
        cfg = DDPMSEG_DATASETS[key]
        base = _ddpmseg_root(root)
        for folder in (base / key, base / "datasets" / key):
            if (folder / "real").is_dir():
                return _load_ddpmseg(cfg, folder, split or "train", num_images, size, validate, f"root {base}")
        raise _missing_ddpmseg(cfg, base, root is not None)
    path = Path(name_or_path)
    if not path.exists():
        valid = sorted(DATASETS) + sorted(DATASET_ALIASES)
        raise ValueError(f"{str(name_or_path)!r} is neither a dataset name nor an existing path; valid names: "
                         f"{', '.join(valid)}; or give a folder (images/ + masks/ + classes.json, DDPM-Seg's "
                         "real/<split>/ with .npy labels, or plain images) or a list of image files")
    if max_objects is not None:
        raise ValueError("max_objects is a toy-shapes option")
    if path.is_file():
        return _images_only([path], "files", split, size)
    return _load_folder(path, split, size, num_images, class_names, ignore_index, validate)


def _procedural(key: str, split: str | None, size: int | None, num_images: int | None,
                max_objects: int | None) -> ProceduralDataset:
    import importlib

    render, names, world_splits, size = importlib.import_module(DATASETS[key].provider).renderer(key, size, max_objects)
    split = split or "train"
    if split in _PROCEDURAL_SPLITS:
        world_split, start = _PROCEDURAL_SPLITS[split]
    elif split in world_splits:
        world_split, start = split, 0
    else:
        raise ValueError(f"unknown split {split!r} for {key}; valid: {sorted(_PROCEDURAL_SPLITS)} or a world split "
                         f"{sorted(world_splits)}")
    n = PROCEDURAL_SPLIT_SIZE if num_images is None else int(num_images)
    if n < 0:
        raise ValueError(f"num_images must be >= 0, got {n}")
    if world_split == "fewshot_test" and start == 0 and n > VALIDATION_START:
        raise ValueError(f"the test split holds at most {VALIDATION_START} images (fewshot_test from "
                         f"{VALIDATION_START} on is the validation split); got num_images={n}")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    return ProceduralDataset(key, split, render, world_split, start, n, names, size)


def _images_only(files: list[Path], source: str, split: str | None, size: int | None) -> FileDataset:
    if split is not None:
        raise ValueError("a list of image files has no splits; pass split=None")
    if not files:
        raise ValueError("no image files given")
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"image file {f} does not exist")
        if f.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{f} is not an image file ({', '.join(IMAGE_SUFFIXES)})")
    return FileDataset(source, None, files, None, None, None, source, size=size)


def _load_folder(root: Path, split: str | None, size: int | None, num_images: int | None,
                 class_names: Sequence[str] | None, ignore_index: int | None, validate: bool) -> FileDataset:
    d = root if split is None else root / split
    # 1. generic layout: images/ + masks/ + classes.json (here or in root)
    cj = next((p for p in (d / "classes.json", root / "classes.json") if p.is_file()), None)
    if cj is not None and (d / "images").is_dir() and not (d / "masks").is_dir():
        raise FileNotFoundError(f"{d} has images/ and {cj.name} but no masks/ folder: put each image's index mask in "
                                "masks/<same stem>.png or .npy (or remove classes.json for an images-only set)")
    if (d / "images").is_dir() and (d / "masks").is_dir():
        if cj is None:
            raise FileNotFoundError(f"{d} has images/ and masks/ but no classes.json (here or in {root}); write "
                                    '{"class_names": [...], "background": 0, "ignore_index": 255} beside them')
        if class_names is not None or ignore_index is not None:
            raise ValueError(f"{cj} names the classes already; drop class_names= / ignore_index=")
        names, ignore = _read_classes_json(cj)
        files = _images_in(d / "images")
        masks = _pair_masks(files, d / "masks")[:num_images]
        files = files[:num_images]
        return FileDataset(root.name, split, files, masks, names, ignore, str(d), size=size, validate=validate)
    # 2. DDPM-Seg's release layout: real/<split>/ (or <split>/) with same-stem .npy label maps
    rel = _release_dir(root, split or "train")
    if rel is not None and any(p.suffix.lower() == ".npy" for p in rel.iterdir()):
        cfg = DDPMSEG_DATASETS.get(root.name)
        if cfg is not None and class_names is None and cj is None:
            return _load_ddpmseg(cfg, root, split or "train", num_images, size, validate, f"folder {root}")
        if cj is not None:
            if class_names is not None or ignore_index is not None:
                raise ValueError(f"{cj} names the classes already; drop class_names= / ignore_index=")
            names, ignore = _read_classes_json(cj)
        elif class_names is not None:
            names, ignore = tuple(class_names), ignore_index
        else:
            raise ValueError(f"{root} is in DDPM-Seg's release layout but its classes are unknown: add a classes.json "
                             f'({{"class_names": [...], "background": null, "ignore_index": 255}}) or pass '
                             f"class_names=[...] (label k = class_names[k]) and ignore_index=")
        files = _images_in(rel)
        labels = _pair_npy(files, rel)[:num_images]
        return FileDataset(root.name, split or "train", files[:num_images], labels, names, ignore, str(rel),
                           size=size, validate=validate)
    # 3. images only
    for cand in (d, d / "images"):
        if cand.is_dir() and not (cand / "masks").exists():
            files = _images_in(cand)
            if files:
                if any(p.suffix.lower() == ".npy" for p in cand.iterdir()):
                    break  # label maps beside images: release layout without the real/<split> folders
                if class_names is not None or ignore_index is not None:
                    raise ValueError(f"{cand} holds images only; class_names= / ignore_index= need label maps")
                return FileDataset(root.name, split, files[:num_images], None, None, None, str(cand), size=size)
    if d.is_dir() and _images_in(d) and any(p.suffix.lower() == ".npy" for p in d.iterdir()):
        if class_names is None and cj is None:
            raise ValueError(f"{d} holds images with .npy label maps but the classes are unknown: add a classes.json "
                             "or pass class_names=[...]")
        names, ignore = _read_classes_json(cj) if cj is not None else (tuple(class_names), ignore_index)
        files = _images_in(d)
        labels = _pair_npy(files, d)[:num_images]
        return FileDataset(root.name, split, files[:num_images], labels, names, ignore, str(d), size=size,
                           validate=validate)
    if split is not None and not d.is_dir():
        raise FileNotFoundError(f"no split folder {d} (nor {root}/real/{split}); the folder's splits: "
                                f"{sorted(p.name for p in root.iterdir() if p.is_dir())}")
    raise FileNotFoundError(f"{d} holds no dataset: expected images/ + masks/ + classes.json, DDPM-Seg's layout "
                            "real/<split>/<name>.png + <name>.npy, or image files")


# ------------------------------------------------------------------------------ the older helpers
def load_split(root: str | Path, split: str = "train", limit: int | None = None,
               num_classes: int | None = None, ignore_index: int = 255) -> SegmentationSplit:
    """Read ``<root>/real/<split>`` (or ``<root>/<split>``): image files with same-stem ``.npy`` labels.

    All of it, as arrays (:func:`load_dataset` is the lazy interface with class names). Checks every
    label map against its image size and, given ``num_classes``, its value range.
    """
    from PIL import Image

    root = Path(root)
    d = _release_dir(root, split)
    if d is None:
        raise FileNotFoundError(f"no split folder {root}/real/{split} (or {root}/{split}); expected DDPM-Seg's layout "
                                f"<root>/real/{{train,test}}/<name>.png + <name>.npy")
    files = _images_in(d)
    if not files:
        raise FileNotFoundError(f"{d} holds no {IMAGE_SUFFIXES} images")
    files = files[:limit] if limit else files
    images, labels = [], []
    for f in files:
        lab_path = f.with_suffix(".npy")
        if not lab_path.exists():
            raise FileNotFoundError(f"label map {lab_path.name} missing for image {f.name} in {d}")
        with Image.open(f) as im:
            images.append(np.asarray(im.convert("RGB")))
        labels.append(_check_label(_read_label(lab_path), lab_path, images[-1].shape[:2], num_classes, ignore_index))
    if len({i.shape for i in images}) > 1:
        raise ValueError(f"images in {d} differ in size; resize them to one size first")
    return SegmentationSplit(np.stack(images), np.stack(labels), [f.stem for f in files], None, ignore_index)


def write_split(root: str | Path, split: str, images: np.ndarray, labels: np.ndarray, prefix: str = "") -> Path:
    """Write images (PNG) and labels (.npy, uint8) in DDPM-Seg's layout."""
    from PIL import Image

    d = Path(root) / "real" / split
    d.mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(images, labels)):
        Image.fromarray(np.asarray(img, np.uint8)).save(d / f"{prefix}{i:04d}.png")
        np.save(d / f"{prefix}{i:04d}.npy", np.asarray(lab, np.uint8))
    return d


MIN_CLASS_FRACTION = 20 / 256 ** 2
"""DDPM-Seg's small-class rule as a share of the image: the official code ignores a class with fewer than
20 pixels in a 256² training image (0.03%); at 64² that is 1.25 pixels, at 512² 80."""


def ignore_small_classes(labels: np.ndarray, min_fraction: float = MIN_CLASS_FRACTION,
                         ignore_index: int = 255) -> np.ndarray:
    """DDPM-Seg's rule, scaled with the image area: a class covering less than ``min_fraction`` of an
    image's pixels (``H * W * min_fraction``; 20 px at 256²) becomes ``ignore_index`` in that image."""
    out = np.array(labels, copy=True)
    if not 0 <= min_fraction < 1:
        raise ValueError(f"min_fraction must be in [0, 1), got {min_fraction} (the paper's is 20 / 256**2)")
    for i in range(out.shape[0]):
        min_pixels = min_fraction * out[i].size
        vals, counts = np.unique(out[i], return_counts=True)
        for v, c in zip(vals, counts):
            if v != ignore_index and c < min_pixels:
                out[i][out[i] == v] = ignore_index
    return out


@dataclass
class FewShotData:
    """Labelled images for a few-shot experiment, split three ways (see :func:`fewshot_splits`).

    ``train`` fits, ``val`` chooses (blocks, timesteps, thresholds), ``test`` reports; each is a
    :class:`SegmentationSplit` with images (N, H, W, 3) uint8 and labels (N, H, W) int64 at ``size``.
    ``ignore_index`` is never None: datasets without an ignore label use 255 (absent from their maps).
    """

    name: str
    train: SegmentationSplit
    val: SegmentationSplit
    test: SegmentationSplit
    class_names: tuple[str, ...]
    ignore_index: int
    size: int
    note: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def fewshot_splits(name_or_path: str | os.PathLike, *, n_train: int, n_val: int, n_test: int, size: int,
                   root: str | os.PathLike | None = None, test: str | os.PathLike | None = None) -> FewShotData:
    """Train / validation / test images of a labelled dataset at ``size`` x ``size`` pixels.

    Procedural worlds have all three splits. A dataset without a validation split (DDPM-Seg's
    releases, folders with train/test only) takes its validation images from the *end* of its
    training files and its training images from the start, so the two never overlap; ``note`` says so.
    A folder without a ``train/`` split (e.g. a synthetic set written by
    :func:`~diffseg_utils.grounding.export.export_segmentation_dataset`) is its own training split.
    ``test``: another dataset whose test split is scored (the same class names in the same order), e.g.
    real images for a segmenter trained on synthetic ones. Asking for more images than a split holds raises ValueError.
    """
    if min(n_train, n_val, n_test) < 0 or n_train == 0 or n_test == 0:
        raise ValueError(f"need n_train >= 1, n_val >= 0, n_test >= 1; got {n_train}, {n_val}, {n_test}")
    kw = dict(size=size) if root is None else dict(size=size, root=root)
    flat = Path(name_or_path).is_dir() and (Path(name_or_path) / "images").is_dir()
    train_ds = load_dataset(name_or_path, None if flat else "train", **kw)
    if train_ds.class_names is None:
        raise ValueError(f"{name_or_path!r} has no label maps; few-shot segmentation needs labelled images")
    if flat and test is None:
        raise ValueError(f"{str(name_or_path)!r} is one folder of labelled images with no test split: name the "
                         "images to score with test= (e.g. the real dataset it stands in for)")
    test_ds = load_dataset(test if test is not None else name_or_path, "test", **kw)
    if tuple(test_ds.class_names or ()) != tuple(train_ds.class_names):
        raise ValueError(f"the test set {str(test)!r} labels {test_ds.class_names}, the training set "
                         f"{str(name_or_path)!r} {train_ds.class_names}: they must name the same classes in the same order")
    note = ""
    try:
        val_ds = load_dataset(name_or_path, "validation", **kw)
        val = val_ds.take(n_val)
        train = train_ds.take(n_train)
    except (ValueError, FileNotFoundError):
        if flat:
            note = "one folder: "
        if n_train + n_val > len(train_ds):
            raise ValueError(f"{name_or_path!r} has {len(train_ds)} training images and no validation split; "
                             f"n_train + n_val = {n_train + n_val} do not fit") from None
        train, val = train_ds.take(n_train), train_ds.take(n_val, start=len(train_ds) - n_val)
        note += (f"no validation split: validation = the last {n_val} of the {len(train_ds)} training images, "
                 f"training = the first {n_train}")
    if test is not None:
        note += f"{'; ' if note else ''}test images from {str(test)!r}"
    for split, ds_, n in (("train", train_ds, n_train), ("test", test_ds, n_test)):
        if n > len(ds_):
            raise ValueError(f"{name_or_path!r} has {len(ds_)} {split} images; asked for {n}")
    ignore = train_ds.ignore_index if train_ds.ignore_index is not None else 255
    return FewShotData(str(name_or_path), train, val, test_ds.take(n_test), tuple(train_ds.class_names), ignore, size,
                       note)
