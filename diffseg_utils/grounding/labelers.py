"""Labelers: one mask per prompted class of a generated batch (from a segmenter or the grounding module).

A class the labeler misses gets ``valid=False`` and so no loss term, never an empty-mask negative
(the paper's "training without zero masks").
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from .features import GeneratedBatch
from .prompts import MAX_CLASSES


class Labeler(Protocol):
    """Labels a generated batch: one mask per prompted class.

    ``__call__(batch, names) -> (masks (N, M, H, W) bool, valid (N, M) bool)`` with M =
    :data:`~.prompts.MAX_CLASSES`; entry ``j`` of sample ``i`` is for ``names[i][j]``, padding and
    missed classes have ``valid=False``. A labeler may look at ``batch.images`` (a segmenter) or
    ``batch.features`` (the trained grounding module). An optional ``config`` dict (JSON)
    goes into the manifest, so resuming with another labeler is caught.
    """

    def __call__(self, batch: GeneratedBatch, names: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]: ...


def weights_fingerprint(*modules) -> str:
    """A short hash of the modules' floating-point weights (names, shapes, rounded sums), recorded in
    manifests so that a dataset made with other weights is refused rather than silently reused.

    The sums are taken in float64 on the CPU (one copy per tensor, once per synthesis): float64 is
    not available on every accelerator (Apple MPS)."""
    h = hashlib.sha1()
    for m in modules:
        for name, p in (m.state_dict().items() if isinstance(m, torch.nn.Module) else ()):
            if torch.is_floating_point(p):
                d = p.detach().to("cpu", torch.float64)
                h.update(f"{name}{tuple(p.shape)}{float(d.sum()):.6g}{float((d * d).sum()):.6g}".encode())
    return h.hexdigest()[:12]


def labeler_config(labeler: Labeler) -> dict[str, Any]:
    """What the manifest records about a labeler: its ``config`` dict (else its name), plus a
    fingerprint of its weights when it wraps a torch module (``module`` or ``segmenter``)."""
    cfg = getattr(labeler, "config", None)
    if cfg is None:
        cfg = {"name": getattr(labeler, "__name__", type(labeler).__name__)}
    nets = [getattr(labeler, a, None) for a in ("module", "segmenter")]
    nets += [getattr(n, "net", None) for n in nets]  # a segmenter wrapping a network (e.g. the toy's oracle)
    if any(isinstance(n, torch.nn.Module) for n in nets):
        cfg = {**cfg, "weights": weights_fingerprint(*nets)}
    return json.loads(json.dumps(cfg))


class SegmenterLabeler:
    """Labels from a segmenter / detector: the top-scoring mask of each prompted class.

    ``segmenter(images (N, 3, H, W) in [-1, 1])`` returns a
    :class:`~diffseg_utils.grounding.segmenter.SegmenterOutput`: ``masks`` (N, K, H', W') bool,
    ``scores`` (N, K) and ``class_names`` (K names; a detector may repeat a name once per
    instance). A prompted class that is not among ``class_names``, scores below ``min_score`` or
    has an empty mask gets ``valid=False`` (the paper: Mask R-CNN, score >= 0.05, no loss for
    missed classes). Masks are resized (nearest) to the image size when the segmenter's differ.
    ``name`` (default: the segmenter's ``name`` attribute, else its class name) goes into the
    manifest. ``classes``: label only these prompted classes (the others get ``valid=False`` and so read
    as background in index masks), e.g. the seen classes, for a data set made without the grounding module.
    """

    def __init__(self, segmenter, min_score: float = 0.05, name: str | None = None,
                 classes: Sequence[str] | None = None):
        self.segmenter = segmenter
        self.min_score = float(min_score)
        self.classes = None if classes is None else frozenset(classes)
        name = name or getattr(segmenter, "name", None) or type(segmenter).__name__
        self.config = {"name": name, "min_score": self.min_score,
                       **({} if classes is None else {"classes": sorted(self.classes)})}

    def __repr__(self) -> str:
        return f"SegmenterLabeler({self.config['name']}, min_score={self.min_score})"

    @torch.no_grad()
    def __call__(self, batch: GeneratedBatch, names: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.segmenter(batch.images)
        n, _, h, w = batch.images.shape
        seg_masks = out.masks.bool()
        if seg_masks.shape[-2:] != (h, w):
            seg_masks = F.interpolate(seg_masks.float(), size=(h, w), mode="nearest").bool()
        # one copy to the host per batch: the per-class choice below is a few Python comparisons
        seg_masks, scores = seg_masks.cpu(), out.scores.float().cpu()
        seg_names = list(out.class_names)
        masks = torch.zeros(n, MAX_CLASSES, h, w, dtype=torch.bool)
        valid = torch.zeros(n, MAX_CLASSES, dtype=torch.bool)
        for i, sample_names in enumerate(names):
            for j, name in enumerate(sample_names):
                ks = [k for k, c in enumerate(seg_names) if c == name]
                if not ks or (self.classes is not None and name not in self.classes):
                    continue  # the segmenter does not know this class (or may not name it): no label, no loss
                k = ks[int(scores[i, ks].argmax())]
                if scores[i, k] >= self.min_score and seg_masks[i, k].any():
                    masks[i, j] = seg_masks[i, k]
                    valid[i, j] = True
        return masks, valid


class GroundingLabeler:
    """Labels generated images with the grounding module (the data-set factory of protocol II).

    Same signature as :class:`SegmenterLabeler`: ``labeler(batch, names) -> (masks (N, M, H, W)
    bool, valid (N, M) bool)``. Where masks of two prompted classes overlap, the pixel goes to
    the class with the larger logit. The text queries use the template the module was trained
    with, which must be the backbone's (:func:`~diffseg_utils.grounding.module.query_template`).
    """

    def __init__(self, backbone, module, class_names: Sequence[str], max_classes: int = MAX_CLASSES,
                 name: str = "grounding", template: str | None = None):
        from .module import class_embeddings, query_template

        self.module = module.eval()
        self.class_names = tuple(class_names)
        self.max_classes = max_classes
        self.template = query_template(backbone, module, template)
        self.queries = class_embeddings(backbone, self.class_names, self.template)
        self.config = {"name": name, "embed_dim": module.embed_dim, "template": self.template}

    @torch.no_grad()
    def __call__(self, batch, names: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.max_classes
        unknown = {c for n in names for c in n} - set(self.class_names)
        if unknown:
            raise ValueError(f"classes {sorted(unknown)} have no text query; known: {list(self.class_names)}")
        cid = torch.tensor([[self.class_names.index(c) for c in n] + [0] * (m - len(n)) for n in names])
        valid = torch.tensor([[w < len(n) for w in range(m)] for n in names])
        logits = self.module(batch.features, self.queries[cid.to(self.queries.device)],
                             out_size=batch.images.shape[-1])
        logits = logits.masked_fill(~valid.to(logits.device)[..., None, None], float("-inf"))
        best = logits.argmax(1, keepdim=True)                                  # (N, 1, H, W)
        masks = (logits > 0) & (torch.arange(m, device=logits.device)[None, :, None, None] == best)
        return masks.cpu(), valid
