"""The single-class protocol on real labelled images (ImageNet-Segmentation's, as ConceptAttention reports it).

Each image holds one object of a known class: every method is asked for that class and answers with a
foreground mask, scored against the label map by the foreground and background IoU (their mean is the
image's mIoU) and the pixel accuracy, averaged over images. The methods are the ones the backbone has
(:data:`~.protocols.ATTENTION_METHODS`: DAAM on cross-attention models, joint cross-attention and
ConceptAttention on MM-DiTs) and, when a module is given, the grounding module (:func:`~.ground.ground`
on the images, an extrapolation: it was trained on generated images).

All attention maps of an image come from **one** denoiser forward: the image encoded, noised to ``t``
(one noise draw from ``seed``, shared by the images), conditioned on ``template.format(class)``; a word
map is thresholded at ``threshold`` after min-max (DAAM's rule), ConceptAttention's mask is the class's
argmax against the concept "background".
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..backbones import Backbone
from ..features import make_noise
from ..inputs import restore_labels
from .ground import ground
from .module import GroundingModule, query_template
from .protocols import attention_maps, attention_masks

__all__ = ["FLOORS", "SingleClassResult", "evaluate_single_class"]

FLOORS = ("no object", "whole image")
"""Masks that know nothing: every pixel background, every pixel the object."""


@dataclass
class SingleClassResult:
    """Per-image scores of each method (host arrays, image order of the input).

    scores:  method -> ``(N, 3)`` float64: foreground IoU, background IoU, pixel accuracy.
    classes: ``(N,)`` the class name of each image.
    t:       the noise level of the attention forward.
    floors:  the same scores of masks that know nothing: :data:`FLOORS` -> ``(N, 3)``. With small objects
             "no object" scores a high background IoU, so a map's mIoU is read against these, not against 0.
    """

    scores: dict[str, np.ndarray]
    classes: tuple[str, ...]
    t: float
    floors: dict[str, np.ndarray]

    def table(self, floors: bool = False) -> dict[str, dict[str, float]]:
        """method -> {"miou": mean of (fg IoU + bg IoU) / 2, "fg_iou", "accuracy"}, means over images
        (``floors=True``: the :data:`FLOORS`' rows instead)."""
        return {m: {"miou": float(s[:, :2].mean()), "fg_iou": float(s[:, 0].mean()), "accuracy": float(s[:, 2].mean())}
                for m, s in (self.floors if floors else self.scores).items()}

    def interval(self, method: str, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
        """95% percentile-bootstrap interval of the method's mIoU over images (resampled with replacement)."""
        v = self.per_image_miou(method)
        boot = v[np.random.default_rng(seed).integers(0, len(v), size=(n_boot, len(v)))].mean(1)
        lo, hi = np.percentile(boot, [2.5, 97.5])
        return float(lo), float(hi)

    def per_image_miou(self, method: str) -> np.ndarray:
        """``(N,)`` each image's mIoU (for paired comparisons: :func:`~diffseg_utils.metrics.paired_difference`)."""
        return self.scores[method][:, :2].mean(1)


def _scores(mask: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(n, H, W)`` bool masks, truth and valid pixels -> ``(n, 3)`` fg IoU, bg IoU, accuracy (float32)."""
    def iou(a, b):
        return ((a & b & valid).sum((-2, -1)).float() / ((a | b) & valid).sum((-2, -1)).clamp_min(1).float())

    acc = ((mask == gt) & valid).sum((-2, -1)).float() / valid.sum((-2, -1)).clamp_min(1).float()
    return torch.stack([iou(mask, gt), iou(~mask, ~gt), acc], 1)


@torch.no_grad()
def evaluate_single_class(backbone: Backbone, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str], *,
                          module: GroundingModule | None = None, t: float = 500, template: str | None = None,
                          threshold: float = 0.4, background: str = "background", layers: Sequence[int] | None = None,
                          seed: int = 0, batch_size: int = 16, num_steps: int = 20, ignore_index: int = 255,
                          maps: bool = True) -> SingleClassResult:
    """Score every map method of ``backbone`` (and the grounding ``module``) on one-object images.

    images: ``(N, 3, H, W)`` uint8 (or anything :meth:`Backbone.preprocess` takes, stacked);
    labels: ``(N, H, W)`` int64 at the images' size: 0 = background, ``k`` = ``class_names[k - 1]``,
            ``ignore_index`` ignored; each image must hold exactly one class.
    t:      the attention forward's noise level (the backbone's ``t``; flow models: ``t = 1000 s``).
    template: the prompt template (default: the module's / the backbone's).
    layers: MM-DiT joint blocks to average (default every eligible one).
    num_steps: the sampler length whose ``feature_step`` timestep the grounding module's features use.
    maps:   False scores the grounding ``module`` alone (its masks do not depend on ``t``: no attention forward).
    """
    class_names = tuple(class_names)
    labels = torch.as_tensor(labels)
    if labels.ndim != 3 or len(labels) != len(images):
        raise ValueError(f"labels must be (N, H, W) for the N = {len(images)} images; got shape {tuple(labels.shape)}")
    present = [sorted(set(torch.unique(y).tolist()) - {0, ignore_index}) for y in labels]
    bad = [i for i, p in enumerate(present) if len(p) != 1 or not 1 <= p[0] <= len(class_names)]
    if bad:
        raise ValueError(f"images {bad[:5]} do not hold exactly one of the {len(class_names)} classes (found "
                         f"{[present[i] for i in bad[:5]]}); the single-class protocol needs one object per image")
    if not maps and module is None:
        raise ValueError("nothing to score: give a grounding module, or maps=True for the attention maps")
    template = query_template(backbone, module, template)
    cls = np.array([p[0] - 1 for p in present])
    out: dict[str, np.ndarray] = {}
    y_all = labels.to(backbone.device)
    valid_all, gt_all = y_all != ignore_index, y_all == torch.as_tensor(cls + 1, device=y_all.device)[:, None, None]
    floors = {name: _scores(torch.full_like(gt_all, name == "whole image"), gt_all, valid_all).cpu().numpy().astype(np.float64)
              for name in FLOORS}
    for c in np.unique(cls):
        name = class_names[c]
        for s in range(0, int((cls == c).sum()), batch_size):
            idx = torch.as_tensor(np.flatnonzero(cls == c)[s:s + batch_size])
            masks = {}
            if maps:
                x, geo = backbone.preprocess(images[idx], return_geometry=True)
                z0 = backbone.encode(x)
                prompts = [template.format(name)] * len(idx)
                eps = make_noise(backbone, len(idx), "shared", seed)
                with attention_maps(backbone, cfg_batch=False, concepts=[name, background], layers=layers) as cam:
                    backbone.predict(backbone.add_noise(z0, t, eps), t, backbone.encode_prompt(prompts))
                masks = {m: restore_labels(v[:, 0].to(torch.uint8), geo).bool()
                         for m, v in attention_masks(cam, prompts, [[name]] * len(idx), x.shape[-1], threshold).items()}
            if module is not None:
                masks["grounding"] = ground(backbone, module, images[idx], [name], template=template, seed=seed,
                                            num_steps=num_steps).masks[:, 0]
            y = labels[idx].to(backbone.device)
            valid, gt = y != ignore_index, y == c + 1
            for m, mask in masks.items():
                out.setdefault(m, np.zeros((len(images), 3)))[idx.numpy()] = _scores(mask.to(y.device), gt, valid).cpu().numpy()
    return SingleClassResult(out, tuple(class_names[c] for c in cls), float(t), floors)
