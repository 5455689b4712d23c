"""The toy world: procedural 64x64 scenes of coloured shapes with exact label maps.

Every image holds 1-3 objects from ten shape categories, each in a *random* colour (so a
pixel's colour never tells its class), drawn in order over a smooth textured background;
later objects occlude earlier ones. The label map holds the visible class per pixel
(0 = background, ``k`` = ``CATEGORIES[k - 1]``) and the caption names the objects, e.g.
"a photo of a star and a ring".

Rendering is vectorised over a batch (numpy), deterministic for a ``(split, index)``
pair, and fast enough (thousands of images per second) to generate training data on the fly.

Named splits (see :data:`SPLITS`) never share a seed, so the generator's training data,
the oracle's training data and the few-shot train/test sets are disjoint draws.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CATEGORIES: tuple[str, ...] = (
    "circle", "square", "triangle", "ring", "cross",
    "diamond", "star", "heart", "crescent", "hexagon",
)
"""Shape categories; class id ``k`` in label maps is ``CATEGORIES[k - 1]`` (0 = background)."""

NUM_CLASSES = len(CATEGORIES) + 1  # with background

UNSEEN_CATEGORIES: tuple[str, ...] = ("diamond", "heart", "hexagon")
"""Fixed zero-shot split for grounding: these 3 of 10 (30%) are never used to train it."""

SEEN_CATEGORIES: tuple[str, ...] = tuple(c for c in CATEGORIES if c not in UNSEEN_CATEGORIES)

SPLITS: dict[str, int] = {
    "generator": 0,       # training data of the tiny Stable Diffusion (VAE, UNet, text encoder)
    "oracle": 1,          # training data of the oracle segmenter
    "oracle_test": 2,     # held-out test set of the oracle segmenter
    "fewshot_train": 3,   # labelled images for few-shot segmentation / probes
    "fewshot_test": 4,    # held-out images for few-shot segmentation / probes
    "vae_test": 5,        # held-out images for the VAE reconstruction check
    "eval": 6,            # images for training-free methods (EmerDiff) and misc. evaluation
    "grounding_gt": 7,    # ground-truth images of seen categories (grounding protocol II reference)
    "grounding_test": 8,  # held-out images of all categories (grounding protocol II test set)
}
"""Named splits and their seed stream ids; ``(split, index)`` fixes an image."""

IMAGE_SIZE = 64


@dataclass
class ToyBatch:
    """A batch of toy scenes.

    images:   (N, 64, 64, 3) uint8 RGB
    labels:   (N, 64, 64) uint8, 0 = background, k = CATEGORIES[k - 1]
    classes:  per image, the class ids of its objects in drawing order
    captions: per image, e.g. "a photo of a star and a ring"
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[list[int]]
    captions: list[str]

    def __len__(self) -> int:
        return len(self.images)


def caption_for(names: list[str] | tuple[str, ...]) -> str:
    """The caption of a scene holding the named objects, in drawing order."""
    if not names:
        raise ValueError("a caption needs at least one object name")
    objs = [f"a {n}" for n in names]
    if len(objs) == 1:
        return f"a photo of {objs[0]}"
    return "a photo of " + ", ".join(objs[:-1]) + f" and {objs[-1]}"


def _shape_masks(kind: int, x: np.ndarray, y: np.ndarray, size: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Inside-masks of one shape category for a group of objects.

    x, y: (G, H, W) coordinates in the object's rotated frame, centred on it (pixels);
    size: (G, 1, 1) outer radius; extra: (G, 1, 1) a shape-specific random number in [0, 1).
    """
    r = np.sqrt(x * x + y * y)
    s = size
    name = CATEGORIES[kind]
    if name == "circle":
        return r <= s
    if name == "square":
        return np.maximum(np.abs(x), np.abs(y)) <= 0.8 * s
    if name == "triangle":  # equilateral, apex up, circumradius s
        return (y <= 0.5 * s) & (np.sqrt(3) * x - y <= s) & (-np.sqrt(3) * x - y <= s)
    if name == "ring":
        return (r <= s) & (r >= (0.45 + 0.15 * extra) * s)
    if name == "cross":
        w = 0.3 * s
        return ((np.abs(x) <= w) & (np.abs(y) <= s)) | ((np.abs(y) <= w) & (np.abs(x) <= s))
    if name == "diamond":
        return np.abs(x) / (0.75 * s) + np.abs(y) / s <= 1.0
    if name == "star":  # five points; radius interpolates between tips and valleys
        theta = np.arctan2(x, -y)  # 0 at the top point
        phase = np.abs(((theta / (2 * np.pi / 5)) % 1.0) - 0.5) * 2  # 1 at tips, 0 at valleys
        return r <= s * (0.42 + 0.58 * phase**1.5)
    if name == "heart":  # implicit heart curve, scaled to radius s
        u, v = x / (0.9 * s), -y / (0.9 * s) + 0.15
        return (u * u + v * v - 1) ** 3 - u * u * v**3 <= 0
    if name == "crescent":
        off = (0.35 + 0.2 * extra) * s
        return (r <= s) & (np.sqrt((x - off) ** 2 + (y + 0.2 * off) ** 2) > 0.85 * s)
    if name == "hexagon":
        ang = np.arctan2(y, x)
        sector = np.mod(ang, np.pi / 3) - np.pi / 6
        return r * np.cos(sector) <= 0.88 * s
    raise AssertionError(name)


def _backgrounds(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    """Smooth two-colour gradients with low-amplitude, low-frequency texture. (n, H, W, 3) float."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    c0 = rng.uniform(0.15, 0.85, size=(n, 1, 1, 3)).astype(np.float32)
    c1 = np.clip(c0 + rng.uniform(-0.25, 0.25, size=(n, 1, 1, 3)), 0, 1).astype(np.float32)
    ang = rng.uniform(0, 2 * np.pi, size=(n, 1, 1)).astype(np.float32)
    ramp = 0.5 + 0.5 * (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5)) * 1.4
    bg = c0 + (c1 - c0) * np.clip(ramp, 0, 1)[..., None]
    # texture: a few random low-frequency sinusoids, amplitude <= 0.06
    freq = rng.uniform(1.0, 4.0, size=(n, 2, 1, 1)).astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, size=(n, 2, 1, 1)).astype(np.float32)
    amp = rng.uniform(0.0, 0.06, size=(n, 1, 1, 1)).astype(np.float32)
    tex = np.sin(2 * np.pi * freq[:, 0] * xx + phase[:, 0]) * np.sin(2 * np.pi * freq[:, 1] * yy + phase[:, 1])
    return bg + amp * tex[..., None]


def _blur(imgs: np.ndarray) -> np.ndarray:
    """A soft camera blur (separable [1, 2, 1] / 4) of (N, H, W, 3) floats: anti-aliased edges."""
    pad = np.pad(imgs, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    imgs = 0.25 * pad[:, :-2] + 0.5 * pad[:, 1:-1] + 0.25 * pad[:, 2:]
    return 0.25 * imgs[:, :, :-2] + 0.5 * imgs[:, :, 1:-1] + 0.25 * imgs[:, :, 2:]


def render(split: str, start: int, count: int, *, size: int = IMAGE_SIZE,
           max_objects: int = 3, categories: tuple[int, ...] | None = None) -> ToyBatch:
    """Render images ``start … start+count-1`` of a named split.

    Deterministic in ``(split, start, count)`` and independent of batching: image ``i`` is
    the same whether rendered alone or inside a larger batch (each image has its own RNG).
    ``categories`` restricts the drawn classes (ids 1..10), e.g. to the seen ones.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {sorted(SPLITS)}")
    if count < 0 or start < 0:
        raise ValueError("start and count must be >= 0")
    pool = np.array(categories if categories is not None else range(1, len(CATEGORIES) + 1))
    if pool.size == 0 or pool.min() < 1 or pool.max() > len(CATEGORIES):
        raise ValueError(f"categories must be class ids in 1..{len(CATEGORIES)}, got {categories}")
    max_objects = min(max_objects, len(pool))
    rngs = [np.random.default_rng([SPLITS[split], start + i, size]) for i in range(count)]

    imgs = np.empty((count, size, size, 3), np.float32)
    labels = np.zeros((count, size, size), np.uint8)
    classes: list[list[int]] = []
    params = []  # per image: list of (cls, cx, cy, s, rot, extra, rgb)
    for i, rng in enumerate(rngs):
        bg = _backgrounds(rng, 1, size)[0]
        imgs[i] = bg
        n_obj = int(rng.integers(1, max_objects + 1))
        cls = rng.choice(pool, size=n_obj, replace=False)
        objs = []
        for c in cls:
            s = rng.uniform(0.17, 0.31) * size
            cx, cy = rng.uniform(s * 0.8, size - s * 0.8, size=2)
            rot = rng.uniform(-np.pi / 9, np.pi / 9)  # +-20 deg: keeps square vs diamond apart
            extra = rng.uniform()
            # random colour, far enough from the local background to be visible
            bg_col = bg[int(np.clip(cy, 0, size - 1)), int(np.clip(cx, 0, size - 1))]
            for _ in range(20):
                rgb = rng.uniform(0, 1, size=3)
                if np.abs(rgb - bg_col).sum() > 0.6:
                    break
            objs.append((int(c), cx, cy, s, rot, extra, rgb.astype(np.float32)))
        params.append(objs)
        classes.append([int(c) for c in cls])

    # vectorised drawing: object slot by slot, grouped by shape category
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for slot in range(max_objects):
        members = [(i, p[slot]) for i, p in enumerate(params) if slot < len(p)]
        for kind in range(len(CATEGORIES)):
            group = [(i, o) for i, o in members if o[0] == kind + 1]
            if not group:
                continue
            idx = np.array([i for i, _ in group])
            cx = np.array([o[1] for _, o in group], np.float32)[:, None, None]
            cy = np.array([o[2] for _, o in group], np.float32)[:, None, None]
            s = np.array([o[3] for _, o in group], np.float32)[:, None, None]
            rot = np.array([o[4] for _, o in group], np.float32)[:, None, None]
            extra = np.array([o[5] for _, o in group], np.float32)[:, None, None]
            rgb = np.stack([o[6] for _, o in group])[:, None, None, :]
            dx, dy = xx - cx, yy - cy
            x = np.cos(rot) * dx + np.sin(rot) * dy
            y = -np.sin(rot) * dx + np.cos(rot) * dy
            m = _shape_masks(kind, x, y, s, extra)
            # mild shading so objects are not perfectly flat
            shade = 1.0 + 0.08 * (x / np.maximum(s, 1)) - 0.08 * (y / np.maximum(s, 1))
            col = np.clip(rgb * shade[..., None], 0, 1)
            imgs[idx] = np.where(m[..., None], col, imgs[idx])
            labels[idx] = np.where(m, kind + 1, labels[idx])

    # an object hidden by later ones may leave no visible pixels: drop it from the caption
    captions = []
    for i in range(count):
        visible = [c for c in classes[i] if (labels[i] == c).sum() >= 20]
        if not visible:  # cannot happen with the first object fully drawn, but stay safe
            visible = [int(np.bincount(labels[i].ravel(), minlength=NUM_CLASSES)[1:].argmax()) + 1]
        classes[i] = visible
        captions.append(caption_for([CATEGORIES[c - 1] for c in visible]))

    images = (np.clip(_blur(imgs), 0, 1) * 255 + 0.5).astype(np.uint8)
    return ToyBatch(images=images, labels=labels, classes=classes, captions=captions)
