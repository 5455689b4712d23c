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


CLASS_COLOURS = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#882255", "#999933",
                 "#DDDDDD", "#44AA99", "#AA4499")
"""Labels 1-12: Okabe & Ito's colour-blind-safe eight (less black), then Paul Tol's wine, olive, pale grey, teal
and purple: hues a reader can tell apart, also with the common colour-vision deficiencies."""


def label_palette(n: int = 256, seed: int = 3) -> np.ndarray:
    """A fixed colour per label id: 0 is black, 1-12 :data:`CLASS_COLOURS`, higher ids seeded random colours,
    255 (ignore) white."""
    rng = np.random.default_rng(seed)
    pal = (rng.uniform(0.25, 1.0, size=(n, 3)) * 255).astype(np.uint8)
    pal[0] = 0
    fixed = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in CLASS_COLOURS], dtype=np.uint8)
    pal[1:1 + min(len(fixed), n - 1)] = fixed[:n - 1]
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
    """(C, H, W) features -> (H, W, 3) uint8: the first three principal components as colours.

    Deterministic: an exact eigendecomposition of the C x C covariance, each component's sign fixed
    so that its largest-magnitude loading is positive (the same map always gets the same colours).
    """
    c, h, w = features.shape
    x = features.float().reshape(c, -1).T
    x = x - x.mean(0)
    _, vecs = torch.linalg.eigh(x.T @ x)
    v = vecs[:, -3:].flip(1)  # top three components, largest first
    if v.shape[1] < 3:
        v = torch.cat([v, v.new_zeros(c, 3 - v.shape[1])], 1)
    sign = torch.sign(v.gather(0, v.abs().argmax(0, keepdim=True)))
    v = v * torch.where(sign == 0, torch.ones_like(sign), sign)
    p = x @ v
    p = (p - p.min(0).values) / (p.max(0).values - p.min(0).values).clamp_min(1e-6)
    return (p.reshape(h, w, 3).cpu().numpy() * 255).astype(np.uint8)


def label_legend(ax, class_names, labels=None, *, loc: str = "center left", fontsize: int = 6, unseen=(),
                 title: str | None = None):
    """A colour legend for label maps drawn by :func:`show_labels`, placed beside ``ax``.

    ``class_names[k]`` names label id ``k`` (0 = background). With ``labels`` only the ids that
    occur in them are listed. Names in ``unseen`` get a "*" and the legend title explains it.
    """
    from matplotlib.patches import Patch

    ids = range(len(class_names))
    if labels is not None:
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
        ids = [k for k in ids if (lab == k).any()]
    pal = label_palette(256)
    star = lambda n: f"{n} *" if n in unseen else n  # noqa: E731
    handles = [Patch(color=pal[k] / 255, label=star(class_names[k])) for k in ids]
    if unseen:
        title = (title + "\n" if title else "") + "* unseen in training"
    ax.legend(handles=handles, loc=loc, bbox_to_anchor=(1.02, 0.5), fontsize=fontsize, frameon=False, title=title,
              title_fontsize=fontsize)
    return ax


def show_features(features, images, labels, block: str, t: int, idx: int = 0, *, axes=None, k: int = 6,
                  seed: int = 0, class_names=None, title: str | None = None):
    """One image, its ground truth, the PCA colours and a k-means clustering of one feature map.

    ``features`` is a :class:`~diffseg_utils.features.FeatureMaps` holding ``(t, block)``;
    ``images`` (N, H, W, 3) uint8 and ``labels`` (N, H, W) the images it was extracted from.
    The map is upsampled (bilinear) to the image size first. Draws into 4 axes (made if None).
    """
    import matplotlib.pyplot as plt
    from sklearn.cluster import KMeans

    if (t, block) not in features.maps:
        raise KeyError(f"no features for block {block!r} at t={t}; have {features.keys}")
    fmap = features.maps[(t, block)][idx].float()
    up = torch.nn.functional.interpolate(fmap[None], size=features.image_size, mode="bilinear")[0]
    if axes is None:
        _, axes = plt.subplots(1, 4, figsize=(10, 2.4), gridspec_kw={"wspace": 0.05})
    show_image(images[idx], axes[0], title=title or f"image {idx}")
    show_labels(labels[idx], axes[1], title="ground truth")
    axes[2].imshow(pca_rgb(up))
    axes[2].set_axis_off()
    axes[2].set_title(f"PCA of {block}\nt={t}", fontsize=7)
    km = KMeans(k, n_init=3, random_state=seed).fit_predict(up.reshape(up.shape[0], -1).T.cpu().numpy())
    # clusters are not classes: grey levels of their own, so no cluster borrows a class's colour
    axes[3].imshow(km.reshape(features.image_size), cmap="gray", vmin=0, vmax=k - 1, interpolation="nearest")
    axes[3].set_axis_off()
    axes[3].set_title(f"k-means ({k}) on the features\n(cluster ids in grey, not classes)", fontsize=7)
    if class_names is not None:  # beside the last panel, where it covers nothing
        label_legend(axes[3], class_names, labels[idx], title="ground truth (2nd panel)")
    return axes


def figure_with_controls(draw, controls, describe: str) -> None:
    """Show ``draw()``'s figure as an ordinary output, then the ipywidgets ``controls``; a change of any
    control's value redraws the figure in place.

    The figure is a plain image output, so a notebook viewed without a kernel (GitHub, nbviewer) still
    shows the default view; ``describe`` is what such a viewer prints for the controls. Needs a live
    kernel to react. Returns None.
    """
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import display

    def render():
        fig = draw()
        plt.close(fig)
        return fig

    handle = display(render(), display_id=True)
    for w in controls:
        w.observe(lambda *_: handle.update(render()), names="value")
    bundle = widgets.HBox(list(controls))._repr_mimebundle_()
    bundle["text/plain"] = describe
    display(bundle, raw=True)


def feature_explorer(features, images, labels, blocks, timesteps, *, block: str | None = None, t: int | None = None,
                     seed: int = 0, class_names=None) -> None:
    """:func:`show_features` with a block dropdown, a t slider and an image slider
    (:func:`figure_with_controls`). ``features`` must hold every (t, block) offered."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    w_block = widgets.Dropdown(options=list(blocks), value=block or blocks[0], description="block")
    w_t = widgets.SelectionSlider(options=list(timesteps), value=t if t is not None else timesteps[0], description="t")
    w_img = widgets.IntSlider(0, 0, len(images) - 1, description="image")

    def draw():
        fig, axes = plt.subplots(1, 4, figsize=(10, 2.4), gridspec_kw={"wspace": 0.05})
        show_features(features, images, labels, w_block.value, w_t.value, w_img.value, axes=axes, seed=seed,
                      class_names=class_names)
        return fig

    figure_with_controls(draw, [w_block, w_t, w_img], "(controls: block, t and image; they need a live kernel)")
