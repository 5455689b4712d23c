"""The faces world: procedural stylised faces with exact part labels (an FFHQ-34 analog).

DDPM-Seg's setting is *one kind of object* and its *parts*: a class-specific, unconditional
diffusion model, then ~20 labelled images to segment the parts. This world is that setting
at toy scale. Every image is one face, roughly centred as in aligned face datasets, with
ten part classes plus background (:data:`PARTS`).

Within-class variation is large on purpose, so that neither a pixel's colour nor its position
tells its part: every part takes a random colour from a wide palette (skin need not be
skin-coloured), the face moves, scales, tilts and turns left or right (eyes, nose and mouth
shift with the turn, the far ear shrinks), hair comes in four styles (none, short, long,
fringe over the forehead), eyes and mouth open or closed, glasses appear on a third of the
faces and occlude the eyes' surroundings, and backgrounds are textured gradients.

"left eye" / "right eye" are the eyes on the image's left and right (smaller / larger x in the
face's own frame). They look alike, so a probe must tell them apart by their position *relative
to the face*, not by their look or their absolute position.

Rendering is vectorised over a batch (numpy), deterministic for a ``(split, index)`` pair and
independent of batching, like the shapes world (:mod:`diffseg_utils.toy.world`), whose named
splits and textured backgrounds it shares.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .world import SPLITS, _backgrounds, _blur

PARTS: tuple[str, ...] = (
    "skin", "hair", "left eye", "right eye", "nose", "mouth", "ears", "neck", "clothes", "glasses",
)
"""Part classes; class id ``k`` in label maps is ``PARTS[k - 1]`` (0 = background)."""

NUM_CLASSES = len(PARTS) + 1  # with background

IMAGE_SIZE = 64

HAIR_STYLES: tuple[str, ...] = ("none", "short", "long", "fringe")


@dataclass
class FaceBatch:
    """A batch of face images.

    images: (N, S, S, 3) uint8 RGB
    labels: (N, S, S) uint8, 0 = background, k = PARTS[k - 1]
    params: per image, the drawn attributes (hair style, glasses, eyes open, ...), for analysis
    """

    images: np.ndarray
    labels: np.ndarray
    params: list[dict]

    def __len__(self) -> int:
        return len(self.images)


def _colours(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float = 0.45) -> np.ndarray:
    """A random RGB colour in [0, 1] at L1 distance > min_dist from each colour in ``avoid``."""
    for _ in range(30):
        c = rng.uniform(0, 1, size=3)
        if all(np.abs(c - a).sum() > min_dist for a in avoid):
            break
    return c.astype(np.float32)


def _sample(rng: np.random.Generator, size: int) -> dict:
    """The random attributes of one face (all lengths in pixels)."""
    b = rng.uniform(0.28, 0.36) * size             # face half-height
    p = {
        "b": b,
        "a": b * rng.uniform(0.72, 0.88),           # face half-width
        "cx": size / 2 + rng.uniform(-0.1, 0.1) * size,
        "cy": size * 0.47 + rng.uniform(-0.08, 0.08) * size,
        "rot": rng.uniform(-0.2, 0.2),              # radians, about +-11 deg
        "yaw": rng.uniform(-0.28, 0.28),            # left-right turn, fraction of the half-width
        "hair": HAIR_STYLES[int(rng.integers(0, 4))],
        "hair_wave": rng.uniform(0, 1),
        "glasses": bool(rng.uniform() < 1 / 3),
        "eye_open": rng.uniform(0.5, 1.0) if rng.uniform() < 0.8 else 0.3,
        "eye_w": rng.uniform(0.21, 0.29),
        "eye_y": rng.uniform(-0.2, -0.05),
        "mouth_open": rng.uniform(0.1, 0.22) if rng.uniform() < 0.4 else 0.06,
        "mouth_w": rng.uniform(0.32, 0.5),
        "mouth_y": rng.uniform(0.45, 0.58),
        "nose_len": rng.uniform(0.16, 0.26),
    }
    bg = np.float32(0.5)
    skin = _colours(rng, [])
    hair = _colours(rng, [skin])
    p["colours"] = {
        "skin": skin, "hair": hair,
        "eyes": _colours(rng, [skin]),
        "nose": np.clip(skin * rng.uniform(0.55, 0.8) + rng.uniform(-0.1, 0.1, 3), 0, 1).astype(np.float32),
        "mouth": _colours(rng, [skin]),
        "ears": np.clip(skin * rng.uniform(0.8, 0.95), 0, 1).astype(np.float32),
        "neck": np.clip(skin * rng.uniform(0.7, 0.9), 0, 1).astype(np.float32),
        "clothes": _colours(rng, [skin]),
        "glasses": _colours(rng, [skin], 0.6),
    }
    del bg
    return p


def _stack(params: list[dict], key: str) -> np.ndarray:
    return np.array([q[key] for q in params], np.float32)[:, None, None]


def render_faces(split: str, start: int, count: int, *, size: int = IMAGE_SIZE) -> FaceBatch:
    """Render faces ``start … start+count-1`` of a named split (:data:`~.world.SPLITS`).

    Deterministic in ``(split, index, size)`` and independent of batching. ``images`` are
    (count, size, size, 3) uint8, ``labels`` (count, size, size) uint8 with 0 = background and
    ``k`` = ``PARTS[k - 1]``; every label is the part drawn last at that pixel's centre.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {sorted(SPLITS)}")
    if count < 0 or start < 0:
        raise ValueError("start and count must be >= 0")
    if size < 16:
        raise ValueError(f"size must be >= 16 pixels for the parts to be visible, got {size}")
    # a stream id of its own (100 + split), so faces never share random numbers with shapes
    rngs = [np.random.default_rng([100 + SPLITS[split], start + i, size]) for i in range(count)]
    imgs = np.empty((count, size, size, 3), np.float32)
    params = []
    for i, rng in enumerate(rngs):
        imgs[i] = _backgrounds(rng, 1, size)[0]
        params.append(_sample(rng, size))
    labels = np.zeros((count, size, size), np.uint8)
    if count == 0:
        return FaceBatch(images=imgs.astype(np.uint8), labels=labels, params=params)

    a, b = _stack(params, "a"), _stack(params, "b")
    cx, cy, rot = _stack(params, "cx"), _stack(params, "cy"), _stack(params, "rot")
    yaw = _stack(params, "yaw")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    # face frame, in units of the half-width (u) and half-height (v); v grows downwards
    u = (np.cos(rot) * dx + np.sin(rot) * dy) / a
    v = (-np.sin(rot) * dx + np.cos(rot) * dy) / b

    def paint(part: str, mask: np.ndarray, colour_key: str | None = None) -> None:
        col = np.stack([q["colours"][colour_key or part] for q in params])[:, None, None, :]
        shade = 1.0 + 0.06 * u - 0.06 * v  # mild light from the upper left
        imgs[:] = np.where(mask[..., None], np.clip(col * shade[..., None], 0, 1), imgs)
        labels[:] = np.where(mask, PARTS.index(part) + 1, labels)

    def has(key: str, value) -> np.ndarray:
        return np.array([q[key] == value for q in params])[:, None, None]

    def ellipse(u0, v0, ru, rv) -> np.ndarray:
        return ((u - u0) / ru) ** 2 + ((v - v0) / rv) ** 2 <= 1.0

    wave = _stack(params, "hair_wave")
    long_hair, short_hair, fringe = has("hair", "long"), has("hair", "short"), has("hair", "fringe")
    # back to front: clothes, long hair behind the head, neck, ears, face, features, front hair, glasses
    paint("clothes", ellipse(0.0, 2.15, 2.2, 0.95))
    paint("hair", long_hair & (ellipse(0.0, 0.1, 1.32, 1.25) | ((np.abs(u) <= 1.3) & (v >= 0) & (v <= 1.35))))
    paint("neck", (np.abs(u) <= 0.48) & (v >= 0.5) & (v <= 1.45))
    ear_far = 0.18 * (1 - 2.2 * np.abs(yaw))  # the ear on the side the face turns to shrinks
    left_r = np.where(yaw < 0, ear_far, 0.18)
    right_r = np.where(yaw > 0, ear_far, 0.18)
    ears = ellipse(-1.0 - 0.3 * yaw, 0.02, np.maximum(left_r, 0.05), 0.28) | \
        ellipse(1.0 - 0.3 * yaw, 0.02, np.maximum(right_r, 0.05), 0.28)
    paint("ears", ears)
    face = ellipse(0.0, 0.0, 1.0, 1.0)
    paint("skin", face)
    # eyes, nose, mouth shift with the turn
    eye_w, eye_y = _stack(params, "eye_w"), _stack(params, "eye_y")
    eye_h = 0.85 * eye_w * _stack(params, "eye_open") * (a / b)
    shift = yaw * 1.0
    ex = 0.42
    left_eye = ellipse(-ex + shift, eye_y, eye_w * (1 - 0.8 * np.maximum(yaw, 0)), eye_h)
    right_eye = ellipse(ex + shift, eye_y, eye_w * (1 - 0.8 * np.maximum(-yaw, 0)), eye_h)
    nose_len = _stack(params, "nose_len")
    nv = (v - (eye_y + 0.1)) / nose_len  # 0 at the top, 1 at the tip
    nose = (nv >= 0) & (nv <= 1) & (np.abs(u - 1.25 * shift) <= 0.05 + 0.13 * nv)
    paint("nose", nose)
    mouth_w, mouth_y, mouth_open = _stack(params, "mouth_w"), _stack(params, "mouth_y"), _stack(params, "mouth_open")
    mouth = ellipse(shift * 0.9, mouth_y, mouth_w, mouth_open + 0.06) & (v >= mouth_y - 0.4 * mouth_open - 0.03)
    paint("mouth", mouth)
    paint("left eye", left_eye, "eyes")
    paint("right eye", right_eye, "eyes")
    # front hair: a cap over the top of the head (short), plus bangs down the forehead (fringe)
    edge = -0.45 - 0.12 * np.sin(u * (3 + 4 * wave) + 6 * wave)
    cap = ellipse(0.0, 0.0, 1.12, 1.12) & (v <= edge)
    bangs = fringe & face & (v <= eye_y - eye_h - 0.08 + 0.05 * np.sin(u * 9 + 5 * wave))
    paint("hair", ((short_hair | long_hair | fringe) & cap) | bangs)
    # glasses: two rims around the eyes and a bridge; lenses are clear (eyes stay visible)
    gl = has("glasses", True)
    rim_u, rim_v = eye_w + 0.13, 0.24
    ring = lambda u0: (ellipse(u0, eye_y, rim_u + 0.07, rim_v + 0.07) & ~ellipse(u0, eye_y, rim_u, rim_v))
    bridge = (np.abs(u - shift) <= ex - rim_u) & (np.abs(v - eye_y + 0.05) <= 0.05)
    paint("glasses", gl & (ring(-ex + shift) | ring(ex + shift) | bridge))

    images = (np.clip(_blur(imgs), 0, 1) * 255 + 0.5).astype(np.uint8)
    out_params = [{k: (val if not isinstance(val, np.floating) else float(val)) for k, val in q.items() if k != "colours"}
                  for q in params]
    return FaceBatch(images=images, labels=labels, params=out_params)
