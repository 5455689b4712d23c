"""The toy worlds as datasets: what :func:`diffseg_utils.load_dataset` needs to render them.

The general dataset registry names this module for "toy-shapes" and "toy-faces"
(``DatasetEntry.provider``) and calls :func:`renderer`; nothing general imports the toy worlds.
"""
from __future__ import annotations

from collections.abc import Callable

from . import world


def renderer(key: str, size: int | None, max_objects: int | None) -> tuple[Callable, tuple[str, ...], tuple[str, ...], int]:
    """``(render(split, start, count), class names with background first, world split names, size)``."""
    size = world.IMAGE_SIZE if size is None else int(size)
    if key == "toy-shapes":
        kw = {} if max_objects is None else {"max_objects": int(max_objects)}
        if kw and not 1 <= kw["max_objects"] <= 3:
            raise ValueError(f"max_objects must be 1..3, got {max_objects}")
        return (lambda s, a, c: world.render(s, a, c, size=size, **kw),
                ("background",) + world.CATEGORIES, tuple(world.SPLITS), size)
    if key == "toy-faces":
        if max_objects is not None:
            raise ValueError("max_objects is a toy-shapes option (a face image holds one face)")
        from . import faces

        return (lambda s, a, c: faces.render_faces(s, a, c, size=size),
                ("background",) + faces.PARTS, tuple(world.SPLITS), size)
    raise ValueError(f"no toy world named {key!r}; valid: 'toy-shapes', 'toy-faces'")
