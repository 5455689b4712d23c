"""Figures and a widget for EmerDiff results (:class:`~diffseg_utils.emerdiff.EmerDiffResult`).

EmerDiff's segments are k-means clusters, not classes: their ids are arbitrary. To make a prediction
readable beside a ground truth, :func:`match_segments` renames each segment to the class the
Hungarian matching gives it (the pairing the Hungarian mIoU scores), so matched segments take the
class's colour and a good result *looks like* the ground truth; a segment matched to no class is
white. Without a ground truth the raw ids are drawn. Each plot helper takes ``axes=None``.
"""
from __future__ import annotations

import numpy as np
import torch

from .viz import label_legend, show_image, show_labels

UNMATCHED = 255
"""Id given to a segment that the matching pairs with no class (drawn white)."""


def _np(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def match_segments(pred, gt, ignore_index: int | None = 255) -> np.ndarray:
    """(H, W) segment ids -> (H, W) int64 class ids by one-to-one Hungarian matching to ``gt`` (same
    size); segments matched to no class become :data:`UNMATCHED`."""
    from .metrics import hungarian_match

    pred, gt = _np(pred).astype(np.int64), _np(gt).astype(np.int64)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} differ in size")
    out = np.full_like(pred, UNMATCHED)
    for p, g in hungarian_match(pred, gt, ignore_index).items():
        out[pred == p] = g
    return out


def show_emerdiff(result, i: int, image, gt=None, class_names=None, *, axes=None, ignore_index: int | None = 255):
    """Image ``i`` of ``result``: the image, its low-res k-means segments, their bilinear upsampling (the
    paper's baseline), EmerDiff's pixel segments and the ground truth, all at the image's own size.

    With ``gt`` the three segmentations are drawn matched to classes (:func:`match_segments`) and the
    ground truth gets a colour legend. Draws into 5 axes (made if None); returns them.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 5, figsize=(11, 2.6))
    panels = [("k-means segments (low-res)", result.upsampled_labels("nearest")[i]),
              ("bilinear upsampling", result.upsampled_labels("bilinear")[i]),
              ("EmerDiff", result.labels[i])]
    show_image(image, axes[0], title="image")
    for ax, (title, lab) in zip(axes[1:4], panels):
        show_labels(match_segments(lab, gt, ignore_index) if gt is not None else _np(lab), ax, title=title)
    if gt is not None:
        show_labels(gt, axes[4], title="ground truth")
        if class_names is not None:
            label_legend(axes[4], class_names, gt)
    else:
        axes[4].set_axis_off()
    return axes


def show_modulation(result, i: int, k: int, *, axes=None):
    """Segment ``k`` of image ``i``: its low-res mask (over the mean of the two decodings), the +lam and -lam
    decodings (``result`` from ``return_images=True``) and the blurred difference map ``||I- - I+||``.
    Model canvas (the letterbox border included). Draws into 4 axes (made if None); returns them."""
    import matplotlib.pyplot as plt

    if result.images_plus is None:
        raise ValueError("the result holds no modulated images; run emerdiff_segment(..., return_images=True)")
    if axes is None:
        _, axes = plt.subplots(1, 4, figsize=(9, 2.5))
    mask = (result.low_res[i] == k).long()
    canvas = result.images_plus.shape[-2:]
    mask_px = torch.nn.functional.interpolate(mask[None, None].float(), size=tuple(canvas), mode="nearest")[0, 0].long()
    base = (result.images_plus[i, k] + result.images_minus[i, k]) / 2
    show_labels(mask_px * 255, axes[0], title=f"segment {k}: the modulated region", image=base, alpha=0.5)
    show_image(result.images_plus[i, k], axes[1], title="+λ")
    show_image(result.images_minus[i, k], axes[2], title="−λ")
    im = axes[3].imshow(_np(result.diffs[i, k]), cmap="magma", vmin=0, vmax=1)
    axes[3].set_axis_off()
    axes[3].set_title("‖I⁻ − I⁺‖, blurred (bright = changed)", fontsize=8)
    axes[3].figure.colorbar(im, ax=axes[3], fraction=0.046, pad=0.04).set_label("÷ its maximum", fontsize=7)
    return axes


def segment_explorer(result, images, gts=None, class_names=None, *, ignore_index: int | None = 255) -> None:
    """:func:`show_modulation` of one segment above the image's :func:`show_emerdiff` row, with an image
    slider and a segment dropdown (:func:`~diffseg_utils.viz.figure_with_controls`); ``result`` must hold
    the modulated images (``return_images=True``)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt

    from .viz import figure_with_controls

    n = result.low_res.shape[0]
    seg_ids = lambda i: [int(k) for k in torch.unique(result.low_res[i])]  # noqa: E731
    w_img = widgets.IntSlider(0, 0, n - 1, description="image")
    w_seg = widgets.Dropdown(options=seg_ids(0), description="segment")
    w_img.observe(lambda *_: setattr(w_seg, "options", seg_ids(w_img.value)), names="value")  # before the redraw

    def draw():
        i, k = w_img.value, w_seg.value if w_seg.value in seg_ids(w_img.value) else seg_ids(w_img.value)[0]
        fig, axes = plt.subplots(2, 5, figsize=(11, 5), gridspec_kw={"hspace": 0.35})
        show_modulation(result, i, k, axes=axes[0, :4])
        axes[0, 4].set_axis_off()
        show_emerdiff(result, i, images[i], None if gts is None else gts[i], class_names, axes=axes[1],
                      ignore_index=ignore_index)
        return fig

    figure_with_controls(draw, [w_img, w_seg], "(controls: image and segment; they need a live kernel)")
