"""Plot helpers for the notebooks (each takes ``ax=None`` and returns the axes it drew on)."""
from __future__ import annotations

import numpy as np
import torch


def _ax(ax, figsize=(3, 3)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def to_uint8(img) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] or uint8 / (H, W, 3) array -> (H, W, 3) uint8 for imshow."""
    if isinstance(img, torch.Tensor) and img.dtype == torch.uint8:
        img = img.detach().cpu()
        return (img.permute(1, 2, 0) if img.ndim == 3 and img.shape[0] in (1, 3) else img).numpy()
    if isinstance(img, torch.Tensor):
        img = img.detach().float().cpu()
        if img.ndim == 3 and img.shape[0] in (1, 3):
            img = ((img.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0)
        return img.round().byte().numpy()
    img = np.asarray(img)
    return img if img.dtype == np.uint8 else (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def label_palette(n: int = 256, seed: int = 3) -> np.ndarray:
    """A fixed colour per label id; 0 is black, 255 (ignore) is white."""
    rng = np.random.default_rng(seed)
    pal = (rng.uniform(0.25, 1.0, size=(n, 3)) * 255).astype(np.uint8)
    pal[0] = 0
    if n > 255:
        pal[255] = 255
    return pal


def colorize(labels) -> np.ndarray:
    """(H, W) int labels -> (H, W, 3) uint8 colours."""
    lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
    return label_palette(max(256, int(lab.max()) + 1))[lab]


def show_image(img, ax=None, title: str | None = None):
    ax = _ax(ax)
    ax.imshow(to_uint8(img))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def show_labels(labels, ax=None, title: str | None = None, image=None, alpha: float = 0.6):
    """A label map in fixed colours, optionally blended over an image."""
    ax = _ax(ax)
    col = colorize(labels).astype(np.float32)
    if image is not None:
        col = alpha * col + (1 - alpha) * to_uint8(image).astype(np.float32)
    ax.imshow(col.astype(np.uint8), interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=8)
    return ax


def image_grid(images, labels=None, titles=None, ncols: int = 8, size: float = 1.4):
    """A grid of images (and their label maps below each row when given). Returns the figure."""
    import matplotlib.pyplot as plt

    n = len(images)
    nrows = -(-n // ncols)
    rows = nrows * (2 if labels is not None else 1)
    fig, axes = plt.subplots(rows, ncols, figsize=(size * ncols, size * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for i in range(n):
        r, c = divmod(i, ncols)
        rr = r * (2 if labels is not None else 1)
        show_image(images[i], axes[rr, c], titles[i] if titles else None)
        if labels is not None:
            show_labels(labels[i], axes[rr + 1, c])
    fig.tight_layout()
    return fig


def heatmap(values, row_labels, col_labels, ax=None, title: str | None = None, fmt: str = "{:.2f}",
            cmap: str = "viridis", vmin=None, vmax=None):
    """An annotated heat map (e.g. probe mIoU per block x timestep)."""
    values = np.asarray(values, dtype=float)
    ax = _ax(ax, figsize=(1 + 0.6 * len(col_labels), 0.8 + 0.3 * len(row_labels)))
    im = ax.imshow(values, cmap=cmap, aspect="auto", vmin=vmin, vmax=vmax)
    ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], fontsize=7)
    ax.set_yticks(range(len(row_labels)), [str(r) for r in row_labels], fontsize=7)
    lo, hi = np.nanmin(values), np.nanmax(values)
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6,
                    color="black" if v > lo + 0.6 * (hi - lo) else "white")
    if title:
        ax.set_title(title, fontsize=9)
    ax.figure.colorbar(im, ax=ax, fraction=0.03)
    return ax


def pca_rgb(features: torch.Tensor) -> np.ndarray:
    """(C, H, W) features -> (H, W, 3) uint8: the first three principal components as colours."""
    c, h, w = features.shape
    x = features.float().reshape(c, -1).T
    x = x - x.mean(0)
    _, _, v = torch.pca_lowrank(x, q=3, center=False)
    p = x @ v[:, :3]
    p = (p - p.min(0).values) / (p.max(0).values - p.min(0).values).clamp_min(1e-6)
    return (p.reshape(h, w, 3).cpu().numpy() * 255).astype(np.uint8)
