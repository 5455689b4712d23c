"""Grounded Diffusion's two evaluation protocols, for any text-conditional backbone.

* Protocol I (:func:`evaluate_on_generations`): generate images from prompts over *all*
  categories (the backbone's prompt template), take a segmenter's masks as ground truth, and score the grounding
  module and the training-free attention maps on the very same generations (one pass: features,
  attention maps and images come from the same denoising run). The maps are the ones the backbone
  has: DAAM's cross-attention maps on UNets and PixArt; joint cross-attention and ConceptAttention
  on MM-DiTs (SD3, Flux, toy-sd3). mIoU per category,
  averaged over seen and over unseen categories.
* Protocol II (:class:`GroundingLabeler` with :func:`~diffseg_utils.grounding.shards.synthesize`, then
  :func:`fit_segmenter` + :func:`evaluate_segmenter`): the grounded generator writes a segmentation
  data set for all categories (``python -m diffseg_utils.grounding.synth --labeler grounding`` under
  ``accelerate launch`` for large runs); a segmenter trained on it is scored on real labelled
  images (seen, unseen, harmonic mIoU) and compared with the same segmenter trained on labelled
  images of the seen categories only.

The dataset-specific parts (class lists, the segmenter network, the test and reference images)
come in as arguments; the toy world's are in :mod:`diffseg_utils.toy.grounding_defaults`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..attention_maps import CrossAttentionMaps
from ..backbones import Backbone
from ..metrics import confusion_matrix, iou_per_class
from .features import generate_with_features
from .labelers import GroundingLabeler, SegmenterLabeler
from .module import GroundingModule, class_embeddings, query_template
from .prompts import sample_prompt, sample_seed

__all__ = ["ATTENTION_METHODS", "attention_maps", "attention_masks", "ProtocolOneResult", "evaluate_on_generations", "GroundingLabeler", "fit_segmenter",
           "evaluate_segmenter", "harmonic"]


ATTENTION_METHODS = {"cross": ("daam",), "joint": ("joint_cross_attention", "concept_attention")}
"""The training-free map methods protocol I scores, by the attention a backbone has."""


def attention_maps(backbone: Backbone, *, cfg_batch: bool, concepts: Sequence[str] | None = None,
                   layers: Sequence[int] | None = None):
    """The attention-map collector this backbone supports (a context manager around any generation):
    :class:`~diffseg_utils.joint_attention.JointAttentionMaps` on MM-DiTs (joint cross-attention, plus
    ConceptAttention when ``concepts`` are given), else
    :class:`~diffseg_utils.attention_maps.CrossAttentionMaps` (DAAM; ``concepts`` and ``layers`` unused)."""
    from ..joint_attention import JointAttentionMaps, has_joint_blocks

    if not has_joint_blocks(backbone):
        return CrossAttentionMaps(backbone, cfg_batch=cfg_batch)
    return JointAttentionMaps(backbone, concepts=concepts, layers=layers, rows="second_half" if cfg_batch else "all")


def attention_masks(maps, prompts: Sequence[str], names: Sequence[Sequence[str]], image_size: int,
                    threshold: float = 0.4) -> dict[str, torch.Tensor]:
    """method -> ``(N, W, H, W)`` bool masks of each prompt's ``names`` from an :func:`attention_maps` collector:
    the word's map thresholded at ``threshold`` after min-max (DAAM's rule, for DAAM and joint cross-attention);
    ConceptAttention's argmax over its concepts."""
    if isinstance(maps, CrossAttentionMaps):
        return {"daam": maps.masks(prompts, names, image_size, threshold)}
    out = {"joint_cross_attention": maps.masks(prompts, names, image_size, threshold)}
    if maps.concepts is not None:
        out["concept_attention"] = maps.concept_masks(names, image_size)
    return out


def harmonic(a: float, b: float) -> float:
    """Harmonic mean of seen and unseen mIoU (0 when either is 0)."""
    return 0.0 if a <= 0 or b <= 0 else 2 * a * b / (a + b)


@dataclass
class ProtocolOneResult:
    """Per-category IoU of each method on generated images (oracle masks as ground truth)."""

    class_names: tuple[str, ...]
    seen: tuple[str, ...]
    iou: dict[str, dict[str, float]]          # method -> class -> IoU (nan: never found by the oracle)
    pairs: dict[str, int]                     # class -> number of (image, class) pairs scored
    examples: dict = field(default_factory=dict, repr=False)  # images, prompts, names; per-word masks per method
    pair_class: np.ndarray = field(default_factory=lambda: np.zeros(0, int), repr=False)  # (P,) class index per pair
    pair_counts: dict = field(default_factory=dict, repr=False)  # method -> (P, 2) intersection, union per pair

    def _split(self, split: str) -> list[int]:
        if split not in ("seen", "unseen"):
            raise ValueError(f"split must be 'seen' or 'unseen', got {split!r}")
        return [i for i, c in enumerate(self.class_names) if (c in self.seen) == (split == "seen")]

    def miou(self, method: str, split: str) -> float:
        vals = [self.iou[method][self.class_names[i]] for i in self._split(split)]
        vals = [v for v in vals if not np.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")

    def interval(self, method: str, split: str, *, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
        """95% percentile-bootstrap interval of :meth:`miou`: the scored (image, class) pairs are resampled
        with replacement within each class, each class's IoU recomputed (intersections / unions summed),
        averaged over the split's classes. Host arrays; ``(nan, nan)`` when no pair of the split was scored."""
        classes = [i for i in self._split(split) if (self.pair_class == i).any()]
        if not classes:
            return float("nan"), float("nan")
        rng = np.random.default_rng(seed)
        counts = np.asarray(self.pair_counts[method], dtype=np.float64)
        boot = np.zeros(n_boot)
        for i in classes:
            c = counts[self.pair_class == i]
            draw = c[rng.integers(0, len(c), size=(n_boot, len(c)))].sum(1)       # (n_boot, 2)
            boot += draw[:, 0] / np.maximum(draw[:, 1], 1)
        lo, hi = np.percentile(boot / len(classes), [2.5, 97.5])
        return float(lo), float(hi)

    def table(self) -> dict[str, dict[str, float]]:
        """method -> {seen, unseen, harmonic} mIoU."""
        out = {}
        for m in self.iou:
            s, u = self.miou(m, "seen"), self.miou(m, "unseen")
            out[m] = {"seen": s, "unseen": u, "harmonic": harmonic(s, u)}
        return out


@torch.no_grad()
def evaluate_on_generations(
    backbone: Backbone,
    module: GroundingModule,
    segmenter,
    class_names: Sequence[str],
    seen: Sequence[str],
    *,
    num_images: int = 64,
    seed: int = 10_000,
    num_steps: int = 20,
    guidance_scale: float = 5.0,
    feature_step: int = -1,
    batch_size: int = 16,
    threshold: float = 0.4,
    min_score: float = 0.05,
    keep_examples: int = 8,
    template: str | None = None,
    layers: Sequence[int] | None = None,
    background: str = "background",
    progress: bool = True,
) -> ProtocolOneResult:
    """Protocol I: grounding module vs attention maps on generations, segmenter masks as ground truth.

    Prompts ``template.format("c1[ and a c2]")`` over all ``class_names`` (seed ``seed``, disjoint
    from the training seeds by default); ``template`` defaults to the backbone's prompt template
    and must be the one the module was trained with (:func:`~.module.query_template`). A prompted
    class the segmenter does not find is not scored (we cannot know where it should be).

    The attention maps (:func:`attention_maps`) are summed over every step, conditional rows only:
    DAAM (UNets, PixArt) or joint cross-attention and ConceptAttention (MM-DiTs; joint blocks ``layers``,
    default every eligible one; concepts = ``class_names`` + ``background``). Word maps are thresholded
    at ``threshold`` after min-max; ConceptAttention's mask is its argmax over the concepts.
    Methods: ``"grounding"`` and :data:`ATTENTION_METHODS` of the backbone's kind.
    """
    class_names = tuple(class_names)
    template = query_template(backbone, module, template)
    queries = class_embeddings(backbone, class_names, template)            # (C, D)
    oracle = SegmenterLabeler(segmenter, min_score=min_score)              # top mask per prompted class
    concepts = [*class_names, background]
    inter: dict[str, np.ndarray] = {}
    union: dict[str, np.ndarray] = {}
    count = np.zeros(len(class_names), dtype=int)
    pair_class: list[int] = []
    pair_counts: dict[str, list] = {}
    ex: dict[str, list] = {"images": [], "prompts": [], "names": [], "oracle": []}
    for s in tqdm(range(0, num_images, batch_size), desc="protocol I", disable=not progress):
        idx = range(s, min(s + batch_size, num_images))
        pn = [sample_prompt(class_names, i, seed, template=template) for i in idx]
        prompts, names = [p for p, _ in pn], [n for _, n in pn]
        with attention_maps(backbone, cfg_batch=guidance_scale != 1.0, concepts=concepts, layers=layers) as cam:
            gen = generate_with_features(backbone, prompts, num_steps=num_steps, guidance_scale=guidance_scale,
                                         seed=[sample_seed(seed, i) for i in idx], feature_step=feature_step)
        size = gen.images.shape[-1]
        truth, valid = oracle(gen, names)                                                 # (n, M, H, W), (n, M)
        width = max(len(n) for n in names)
        cid = torch.tensor([[class_names.index(c) for c in n] + [0] * (width - len(n)) for n in names])
        logits = module(gen.features, queries[cid], out_size=size)                       # (n, W, H, W)
        pred = {"grounding": logits > 0, **attention_masks(cam, prompts, names, size, threshold)}  # (n, W, H, W)
        for m in pred:
            inter.setdefault(m, np.zeros(len(class_names)))
            union.setdefault(m, np.zeros(len(class_names)))
        gt = truth[:, :width].to(logits.device)                                          # (n, W, H, W)
        # per (image, word) counts, one copy to the host per batch
        counts = {m: torch.stack([(p.to(gt.device) & gt).sum((-2, -1)), (p.to(gt.device) | gt).sum((-2, -1))]).cpu()
                  for m, p in pred.items()}                                             # (2, n, W)
        for j, n in enumerate(names):
            for w, c in enumerate(n):
                if not valid[j, w]:  # the segmenter did not find it: not scored
                    continue
                ci = class_names.index(c)
                count[ci] += 1
                pair_class.append(ci)
                for m in inter:
                    inter[m][ci] += float(counts[m][0, j, w])
                    union[m][ci] += float(counts[m][1, j, w])
                    pair_counts.setdefault(m, []).append((float(counts[m][0, j, w]), float(counts[m][1, j, w])))
        if len(ex["images"]) < keep_examples:
            ex["images"].extend(gen.images.cpu())
            ex["prompts"].extend(prompts)
            ex["names"].extend(names)
            for m, p in pred.items():
                ex.setdefault(m, []).extend(p.cpu())
            ex["oracle"].extend(truth.cpu())
    ex = {k: v[:keep_examples] for k, v in ex.items()}
    iou = {m: {c: (inter[m][i] / union[m][i] if count[i] else float("nan")) for i, c in enumerate(class_names)}
           for m in inter}
    return ProtocolOneResult(class_names, tuple(seen), iou, {c: int(count[i]) for i, c in enumerate(class_names)}, ex,
                             np.asarray(pair_class, dtype=int), {m: np.asarray(v).reshape(-1, 2) for m, v in pair_counts.items()})


# ----------------------------------------------------------------- protocol II: a segmenter trained on synthetic data
def _translate(x: torch.Tensor, y: torch.Tensor, dy: int, dx: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) and labels (B, H, W) moved by (dy, dx) pixels: edge pixels repeated, their labels ignored."""
    h, w = x.shape[-2:]
    p = max(abs(dy), abs(dx))
    if not p:
        return x, y
    x = F.pad(x, (p, p, p, p), mode="replicate")[..., p - dy:p - dy + h, p - dx:p - dx + w]
    y = F.pad(y, (p, p, p, p), value=ignore_index)[..., p - dy:p - dy + h, p - dx:p - dx + w]
    return x, y


def fit_segmenter(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    net: torch.nn.Module,
    steps: int = 600,
    batch_size: int = 32,
    lr: float = 2e-3,
    shift: int = 0,
    permute_channels: bool = False,
    ignore_index: int = 255,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> torch.nn.Module:
    """Train the segmenter ``net`` on ``images`` (N, 3, H, W) uint8 and ``labels`` (N, H, W) ints in
    0..num_classes-1 (``ignore_index``: not trained on); AdamW with a cosine learning rate. Returns it in eval mode.

    Augmentation, drawn per batch: a horizontal flip (p = 0.5); with ``shift`` > 0 a translation by up to
    ``shift`` pixels each way (edge pixels repeated, labels there ignored); with ``permute_channels`` the RGB
    channels in a random order (label-preserving only where colour does not name the class, as in the toy world).
    net:    any module mapping (B, 3, H, W) float in [-1, 1] to (B, num_classes, H, W) logits (the
            toy's: :func:`diffseg_utils.toy.grounding_defaults.segmenter_net`).
    device: where it trains (default: where ``net`` is); batches are moved there one at a time,
            so the data set may stay on the CPU.
    """
    scored = labels[labels != ignore_index]
    if not scored.numel():
        raise ValueError(f"every label is ignore_index={ignore_index}: nothing to train on")
    if scored.min() < 0 or scored.max() >= num_classes:
        raise ValueError(f"labels must be in 0..{num_classes - 1} (or ignore_index={ignore_index}), got "
                         f"{int(scored.min())}..{int(scored.max())}")
    if shift < 0 or shift >= min(images.shape[-2:]):
        raise ValueError(f"shift must be in 0..{min(images.shape[-2:]) - 1} pixels, got {shift}")
    if images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (N, 3, H, W), got {images.dtype}; convert [-1, 1] images with "
                        "diffseg_utils.grounding.shards.to_uint8")
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    net = net.to(dev)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)  # sampling on the host: indices and flips never wait for the device
    net.train()
    for step in tqdm(range(steps), desc="segmenter", disable=not progress):
        for gr in opt.param_groups:
            gr["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=g)
        x = images[idx].to(dev).float() / 127.5 - 1
        y = labels[idx].to(dev).long()
        if torch.rand((), generator=g) < 0.5:
            x, y = x.flip(-1), y.flip(-1)
        if permute_channels:
            x = x[:, torch.randperm(3, generator=g).to(dev)]
        if shift:
            dy, dx = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()
            x, y = _translate(x, y, dy, dx, ignore_index)
        loss = F.cross_entropy(net(x), y, ignore_index=ignore_index)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()


@torch.no_grad()
def evaluate_segmenter(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                       seen: Sequence[str], *, chunk: int = 100, ignore_index: int | None = 255,
                       device: torch.device | str | None = None) -> dict[str, float]:
    """Seen / unseen / harmonic mIoU (foreground classes; background excluded) of ``net`` on labelled images.

    images: (N, 3, H, W) uint8; labels: (N, H, W) ints, 0 = background, ``k`` = ``class_names[k - 1]``,
    ``ignore_index`` not scored. Also returns each class's IoU (nan: in neither map). ``device``
    defaults to the net's; images go there ``chunk`` at a time.
    """
    k = len(class_names) + 1
    if images.shape[0] != labels.shape[0] or images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
    dev = torch.device(device) if device is not None else next(net.parameters()).device
    net = net.to(dev).eval()
    cm = torch.zeros(k, k, dtype=torch.long)
    for s in range(0, images.shape[0], chunk):
        x = images[s:s + chunk].to(dev).float() / 127.5 - 1
        cm += confusion_matrix(net(x).argmax(1), labels[s:s + chunk], k, ignore_index=ignore_index)
    iou = iou_per_class(cm).numpy()[1:]
    s_ = [iou[i] for i, c in enumerate(class_names) if c in seen]
    u_ = [iou[i] for i, c in enumerate(class_names) if c not in seen]
    s = float(np.nanmean(s_)) if s_ and not np.isnan(s_).all() else float("nan")
    u = float(np.nanmean(u_)) if u_ and not np.isnan(u_).all() else float("nan")
    return {"seen": s, "unseen": u, "harmonic": harmonic(s, u), **{c: float(iou[i]) for i, c in enumerate(class_names)}}
